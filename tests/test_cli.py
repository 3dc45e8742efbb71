"""`python -m sweep` as a user runs it: one trial, a multirun over learning rates, and clear input errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "sweep", *args, "progress=false"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_multirun_over_learning_rates_loads_the_base_once(tmp_path):
    p = sweep("-m", "lr=1e-4,5e-4", "steps=4", "train.checkpoint_every=2", "data.resolution=64", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "outputs" / "sweeps").glob("*/*") if p.is_dir())
    assert len(jobs) == 2 and jobs[0].name.startswith("0_") and "lr=0.0001" in jobs[0].name
    assert "lr=0.0005" in jobs[1].name  # folders named by their overrides
    for job in jobs:
        result = json.loads((job / "result.json").read_text())
        assert result["status"] == "finished" and result["steps"] == 4
        assert sorted(c.name for c in (job / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
        assert (job / ".hydra" / "config.yaml").is_file()  # the resolved config beside the weights
    log = p.stdout + p.stderr
    assert log.count("loading base model") == 1, log[-3000:]


def test_single_run_and_resume_in_the_same_folder(tmp_path):
    run_dir = tmp_path / "run"
    p = sweep("steps=2", "train.checkpoint_every=2", "data.resolution=64", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    p = sweep("steps=4", "train.checkpoint_every=2", "data.resolution=64", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["resumed_from"] == 2 and result["steps"] == 4


@pytest.mark.parametrize("args, needle", [
    (["lr=-1"], "train.lr (lr)=-1.0 must be > 0"),
    (["data.instance_dir=/no/such/photos"], "data.instance_dir='/no/such/photos' does not exist"),
    (["data.instance_prompt='a photo of a woman'"], "does not contain the subject token 'sks'"),
    (["model=sdxl_base", "model.pretrained=nobody/nothing"], "Pass a local folder"),
])
def test_bad_input_exits_2_with_the_fix_and_no_traceback(tmp_path, args, needle):
    p = sweep(*args, cwd=tmp_path)
    assert p.returncode == 2
    out = p.stdout + p.stderr
    assert needle in out and "Traceback" not in out
    assert "loading base model" not in out  # refused before any model loads
