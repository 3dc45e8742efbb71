"""A sweep folder and the strings in it are data, end to end through the commands (issue 33, items 4 and 5): markup
in a prompt, a trial name, `reason=` and `by=` is inert in report.md, the model card and the MLflow description; a
`${oc.env:...}` written into a finished sweep's stored config is read as text by sweep.export and sweep.report; a
folder's recorded tracking server is used only when the caller names it. One tiny demo sweep for the module."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .test_tracking import client, runs, sweep

pytestmark = pytest.mark.slow

PROMPT = "a photo of sks woman <img src=x onerror=alert(1)> | ![x](http://evil/)"
REASON = "![x](http://evil/) sharper <script>alert(2)</script> | face"
BY = "<img src=y onerror=alert(3)>|eve"
SECRET = "s3cr3t-from-the-callers-environment"
UNSAFE = re.compile(r"<img|<script|!\[x\]|\[x\]\(")  # the strings' HTML, image or link, unescaped


def command(module: str, *args: str, cwd: Path, **env: str):
    clean = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env={**clean, "HF_HUB_OFFLINE": "1", **env},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> tuple[Path, Path]:
    """(working folder, sweep folder): a demo sweep whose prompt (so its trial's name) carries markup, its pick then
    promoted by a person whose name and reason carry markup."""
    cwd = tmp_path_factory.mktemp("untrusted")
    p = sweep("-m", "lr=1e-4", "steps=2", "train.checkpoint_every=2", "data.resolution=64", "eval.seeds=[0]",
              "progress=false", f"eval.prompts=[{json.dumps(PROMPT)}]", cwd=cwd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [folder] = (cwd / "outputs" / "sweeps").iterdir()
    champion = json.loads((folder / "report" / "selection.json").read_text())["champion"]
    p = command("sweep.promote", f"{champion['trial']}@{champion['step']}", f"reason={REASON}", f"by={BY}",
                f"sweep={folder}", cwd=cwd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return cwd, folder


def _inert(markdown: str, *readable: str) -> None:
    assert not UNSAFE.search(markdown), UNSAFE.search(markdown)
    for line in markdown.splitlines():
        if line.startswith("|"):  # a table row keeps its columns: no bare | from a string
            assert line.count("|") - line.count("\\|") == len(re.split(r"(?<!\\)\|", line)) - 1
    for s in readable:
        assert s in markdown, s


def test_markup_in_a_prompt_a_trial_name_a_reason_and_a_name_is_inert(crafted):
    cwd, folder = crafted
    report = (folder / "report" / "report.md").read_text()
    card = (folder / "champion" / "README.md").read_text()
    c = client(cwd)
    [parent], _ = runs(c)
    note = c.get_run(parent.info.run_id).data.tags["mlflow.note.content"]
    escaped_prompt = "a photo of sks woman &lt;img src=x onerror=alert(1)&gt; \\| !\\[x\\](http://evil/)"
    escaped_reason = "!\\[x\\](http://evil/) sharper &lt;script&gt;alert(2)&lt;/script&gt; \\| face"
    _inert(report, escaped_prompt, escaped_reason, "Reviewed by &lt;img src=y onerror=alert(3)&gt;\\|eve")
    _inert(card, escaped_prompt, escaped_reason)
    _inert(note, escaped_prompt, escaped_reason)
    header = next(line for line in report.splitlines() if line.startswith("| trial"))
    row = next(line for line in report.splitlines() if line.startswith("| data.resolution=64"))
    assert len(re.split(r"(?<!\\)\|", row)) == len(re.split(r"(?<!\\)\|", header))  # the row's columns: the header's
    version = c.get_model_version_by_alias("sdxl-lora-sks-woman", "champion")
    assert version.tags["review.reason"] == REASON and version.tags["review.by"] == BY  # tags: data, kept verbatim


def test_a_stored_env_interpolation_is_read_as_text_and_the_variable_leaks_nowhere(crafted, tmp_path):
    """A crafted prompt `${oc.env:SOME_SECRET}` in a finished sweep's stored config, the variable set for the
    commands: the model card, the report, the MLflow description and the console hold the text, never the value."""
    cwd, folder = crafted
    [trial] = [d for d in folder.iterdir() if (d / "result.json").is_file()]
    config = trial / ".hydra" / "config.yaml"
    original = config.read_text()
    crafted_prompt = "a photo of sks woman ${oc.env:SOME_SECRET}"
    config.write_text(original.replace("instance_prompt: a photo of sks woman",
                                       f"instance_prompt: '{crafted_prompt}'"))
    try:
        out = tmp_path / "export"
        e = command("sweep.export", str(folder), f"out={out}", cwd=cwd, SOME_SECRET=SECRET)
        r = command("sweep.report", str(folder), cwd=cwd, SOME_SECRET=SECRET)
    finally:
        config.write_text(original)
    assert e.returncode == 0 and r.returncode == 0, e.stderr[-3000:] + r.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert crafted_prompt in card  # the instance prompt, as its characters
    written = [f.read_bytes() for d in (out, folder / "report", folder / "champion") for f in d.iterdir()]
    c = client(cwd)
    [parent], _ = runs(c)
    tags = json.dumps(c.get_run(parent.info.run_id).data.tags)
    for where in (e.stdout, e.stderr, r.stdout, r.stderr, tags, *map(lambda b: b.decode("latin-1"), written)):
        assert SECRET not in where


def test_a_folders_recorded_server_is_used_only_when_the_caller_names_a_store(crafted):
    """sweep.json naming a server elsewhere: without tracking_uri= the report is refused, naming the server and the
    fix, before anything is written; the caller's store, named, wins (and a line says so)."""
    cwd, folder = crafted
    record = folder / "sweep.json"
    original = record.read_text()
    mine = json.loads(original)["tracking_uri"]
    record.write_text(json.dumps({**json.loads(original), "tracking_uri": "http://tracking.example.invalid:5000"}))
    report = folder / "report" / "report.md"
    before = report.stat().st_mtime_ns
    try:
        refused = command("sweep.report", str(folder), cwd=cwd)
        untouched = report.stat().st_mtime_ns == before
        named = command("sweep.report", str(folder), f"tracking_uri={mine}", cwd=cwd)
    finally:
        record.write_text(original)
    assert refused.returncode == 2 and untouched, refused.stderr[-3000:]
    assert "http://tracking.example.invalid:5000, a server you did not name" in refused.stderr
    assert "tracking_uri=http://tracking.example.invalid:5000" in refused.stderr and "Traceback" not in refused.stderr
    assert named.returncode == 0, named.stderr[-3000:]
    assert f"writing to {mine}, the store you named" in named.stdout + named.stderr
    assert report.stat().st_mtime_ns > before
