"""Ctrl-C and SIGTERM sent to real sweeps (CPU, tiny model, the CLI as users run it) at training, at scoring and at
the sweep's end, then the resume command the sweep printed, run as printed: the stop leaves no traceback and no
RUNNING run, and the resumed sweep picks the champion an uninterrupted one picks. Also: a second Ctrl-C, stale runs
of dead processes, and swept values with quotes in MLflow's filter strings (real sqlite stores)."""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sweep.config import TrackingConfig
from sweep.tracking import Tracker
from sweep.tracking.__main__ import main as tracking_main

ARGS = ["-m", "lr=1e-4,5e-4", "steps=4", "train.checkpoint_every=2", "data.resolution=64", "progress=false",
        "tracking.system_metrics=false"]


def start(cwd: Path, faults: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SDXL_SWEEP_FAULTS": faults,
           "SDXL_SWEEP_PAUSED": str(cwd / "paused")}
    return subprocess.Popen([sys.executable, "-m", "sweep", *ARGS], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SDXL_SWEEP_FAULTS"}
    return subprocess.run(cmd, cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=900)


def wait_paused(p: subprocess.Popen, cwd: Path, timeout: float = 600) -> str:
    """The fault point's name once the sweep waits there (common/faults.py `pause`)."""
    until = time.monotonic() + timeout
    while not (cwd / "paused").is_file():
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.monotonic() < until, "the sweep never reached its fault point"
        time.sleep(0.1)
    return (cwd / "paused").read_text()


def statuses(cwd: Path) -> dict[str, str]:
    c = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("sdxl-lora-sweep")
    return {r.info.run_name: r.info.status for r in c.search_runs([exp.experiment_id])}


def champion(cwd: Path) -> tuple:
    [sel] = cwd.glob("outputs/sweeps/*/report/selection.json")
    c = json.loads(sel.read_text())["champion"]
    return c["trial"], c["step"], c["scale"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple:
    cwd = tmp_path_factory.mktemp("reference")
    p = run([sys.executable, "-m", "sweep", *ARGS], cwd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return champion(cwd)


@pytest.mark.slow
@pytest.mark.parametrize("point, sig", [
    ("train_step:*:2", signal.SIGINT),  # after step 2 of the pack (its checkpoint not yet written)
    ("evaluate:*:1", signal.SIGTERM),  # the first checkpoint's images generated, not yet scored (in training)
    ("evaluate:*:5", signal.SIGINT),  # the sweep's end: racing, after the 4 live scorings of training
], ids=["training-SIGINT", "scoring-SIGTERM", "finalize-SIGINT"])
def test_a_stopped_sweep_resumes_to_the_same_champion(point, sig, reference, tmp_path):
    p = start(tmp_path, f"{point}=pause")
    wait_paused(p, tmp_path)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 128 + sig, out[-3000:]
    assert "Traceback" not in out and "cannot schedule new futures" not in out, out[-5000:]
    runs = statuses(tmp_path)
    assert runs and set(runs.values()) <= {"KILLED", "FINISHED"}, runs
    assert [s for name, s in runs.items() if not name.startswith("lr=")] == ["KILLED"]  # the sweep's own run
    if point.startswith("evaluate:*:5"):
        assert "racing:" in out and not list(tmp_path.glob("outputs/sweeps/*/report/selection.json"))
    else:  # the trials stopped resumable, not failed
        results = [json.loads(f.read_text()) for f in tmp_path.glob("outputs/sweeps/*/*/result.json")]
        assert results and {r["status"] for r in results} == {"stopped"}, results
    [hint] = [ln for ln in out.splitlines() if ln.startswith("to continue: ")]
    cmd = shlex.split(hint.removeprefix("to continue: "))
    assert cmd[:3] == ["python", "-m", "sweep"] and cmd[3:] == ARGS + ["resume=true"]
    again = run([sys.executable, *cmd[1:]], tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resume=true: continuing the sweep in" in again.stdout + again.stderr
    assert len(list(tmp_path.glob("outputs/sweeps/*"))) == 1
    assert set(statuses(tmp_path).values()) == {"FINISHED"}
    assert champion(tmp_path) == reference


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    p = start(tmp_path, "train_step:*:2=hold")  # a step that would go on for minutes
    wait_paused(p, tmp_path)
    p.send_signal(signal.SIGINT)
    time.sleep(1)
    assert p.poll() is None  # the first waits for the step
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 130, out[-3000:]
    assert "stopping at once" in out and "Traceback" not in out, out[-3000:]
    assert "to continue: python -m sweep " in out
    assert set(statuses(tmp_path).values()) == {"KILLED"}  # the last words closed the runs


def _tracker(root: Path) -> Tracker:
    return Tracker(TrackingConfig(system_metrics=False), root)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_runs_of_dead_processes_on_this_host_are_closed_when_a_sweep_starts(tmp_path):
    t = _tracker(tmp_path)
    first = t.start_sweep(tmp_path / "a", "a", {})
    host = socket.gethostname()
    made = {name: t.client.create_run(first["experiment_id"], run_name=name, tags={"worker": w}).info.run_id
            for name, w in [("dead", f"{host}:{_dead_pid()}"), ("alive", f"{host}:{os.getppid()}"),
                            ("elsewhere", f"another-host:{_dead_pid()}"), ("untagged", "")]}
    t.client.set_tag(first["parent_run_id"], "worker", f"{host}:{_dead_pid()}")  # as if its sweep was killed
    t.start_sweep(tmp_path / "b", "b", {})  # a later sweep in the same store
    status = {n: t.client.get_run(r).info.status for n, r in made.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING", "untagged": "RUNNING"}
    assert t.client.get_run(first["parent_run_id"]).info.status == "KILLED"
    # resume=true reopens the killed sweep's parent run, and a trial's run is found and reopened as before
    again = t.start_sweep(tmp_path / "a", "a", {})
    assert t.client.get_run(again["parent_run_id"]).info.status == "RUNNING"
    child = t.child_run(again, "lr=1", {"worker": f"{host}:{_dead_pid()}"})
    t.close_stale()
    assert t.child_run(again, "lr=1", {}) == child and t.client.get_run(child).info.status == "RUNNING"
    # and the command line does the same on its own
    t.client.set_tag(child, "worker", f"{host}:{_dead_pid()}")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert tracking_main(["close-stale", "--uri", uri]) == 0
    assert t.client.get_run(child).info.status == "KILLED"


@pytest.mark.parametrize("trial", ["prompt=a photo of sks's dog", 'prompt=a "sks" dog', """prompt='s "x" \\'"""])
def test_a_swept_value_with_quotes_finds_its_own_run(trial, tmp_path):
    t = _tracker(tmp_path)
    sweep = t.start_sweep(tmp_path / "s", "s", {})
    other = t.child_run(sweep, "prompt=a photo of sks dog", {"trial_folder": "0_other"})
    run_id = t.child_run(sweep, trial, {"trial_folder": f"1_{trial}"})
    assert run_id != other
    assert t.child_run(sweep, trial, {"trial_folder": f"1_{trial}"}) == run_id  # reopened, not a second run
    assert t.running_child(sweep, f"1_{trial}") == run_id
    t.finish(run_id)
    assert t.running_child(sweep, f"1_{trial}") is None
