"""The records a sweep leaves (sweep/results.py): written all or nothing under a unique temporary name, and
read-modify-written under a lock, so that neither a killed writer nor two writers at once lose anything."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys

from sweep.results import update_json, write_json, write_text


def _append_many(path: str, who: str, n: int) -> None:
    for i in range(n):
        update_json(path, lambda cur: [*(cur or []), f"{who}{i}"], [])


def test_two_processes_appending_at_once_keep_every_entry(tmp_path):
    path = tmp_path / "promotion.json"
    procs = [multiprocessing.get_context("spawn").Process(target=_append_many, args=(str(path), who, 25))
             for who in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = json.loads(path.read_text())
    assert sorted(entries) == sorted(f"{w}{i}" for w in "ab" for i in range(25))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_writer_killed_mid_write_leaves_the_old_record_and_its_temp_file_goes_with_the_next_write(tmp_path):
    path = tmp_path / "selection.json"
    write_json(path, {"champion": "old"})
    code = ("import os, signal, sweep.results as r\n"
            "real = os.replace\n"
            "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"  # killed between fsync and rename
            f"r.write_json({str(path)!r}, {{'champion': 'new'}})\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert json.loads(path.read_text()) == {"champion": "old"}  # never half a file
    [stale] = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert stale.name.startswith(".selection.json.")  # a dot file beside it, its writer's pid in the name
    write_text(path, '{"champion": "newer"}')
    assert json.loads(path.read_text()) == {"champion": "newer"}
    assert [p.name for p in tmp_path.iterdir()] == ["selection.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
