"""Faults injected into real sweeps (CPU, tiny model, the CLI as users run it), then what is left is read back:
checkpoints, results, MLflow runs and metrics. Fault points: common/faults.py. The count of what was lost
must be 0 every time: each test compares against an uninterrupted sweep, or checks every record is there."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from sweep.results import read_result, read_scores
from trainer.checkpoint import verify

from .services import free_port, mlflow_server, postgres

pytestmark = pytest.mark.slow
ARGS = ["-m", "lr=1e-4,5e-4", "steps=4", "train.checkpoint_every=2", "data.resolution=64", "progress=false",
        "tracking.system_metrics=false"]
TRIALS = ["lr=0.0001", "lr=0.0005"]
LR = {"lr=0.0001": 1e-4, "lr=0.0005": 5e-4}


def sweep(*args: str, cwd: Path, faults: str = "", wait: bool = True, timeout: float = 900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SDXL_SWEEP_FAULTS": faults}
    if not faults:
        env.pop("SDXL_SWEEP_FAULTS")
    cmd = [sys.executable, "-m", "sweep", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def trial_dirs(cwd: Path) -> dict[str, Path]:
    [sweep_dir] = cwd.glob("outputs/sweeps/*")
    return {next(o for o in d.name.split("_", 1)[1].split(",") if o.startswith("lr=")): d
            for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()}


def mlflow_state(uri: str) -> dict:
    """What MLflow holds of the sweep: per trial run its status and every (metric, step) it logged, duplicates kept."""
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("sdxl-lora-sweep")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    out = {"parents": [r.info.status for r in parents], "children": {}}
    for r in children:
        metrics = {k: sorted(m.step for m in c.get_metric_history(r.info.run_id, k)) for k in r.data.metrics}
        hashes = {k: v for k, v in r.data.tags.items() if k.startswith("lora_sha256.")}
        out["children"].setdefault(r.info.run_name, []).append((r.info.status, metrics, hashes))
    return out


def outcome(cwd: Path) -> dict:
    """Everything a sweep leaves that must match an uninterrupted one: weights, checkpoints, scores, champion."""
    state = {}
    for name, d in trial_dirs(cwd).items():
        ckpts = sorted((d / "checkpoints").iterdir())
        assert all(c.name.startswith("step-") for c in ckpts), ckpts  # no half-written checkpoint left behind
        assert all(verify(c) is not None for c in ckpts)
        result = read_result(d)  # strict JSON: NaN (no face found) is written as null and read back as NaN
        state[name] = {"checkpoints": [c.name for c in ckpts], "status": result["status"],
                       "metrics": result["metrics"], "tracked": result["tracked"],
                       "scores": {k: m for k, (m, _) in read_scores(d).items()},  # with the race's rounds
                       "lora": load_file(ckpts[-1] / "pytorch_lora_weights.safetensors")}
    [sel] = cwd.glob("outputs/sweeps/*/report/selection.json")
    champ = json.loads(sel.read_text())["champion"]
    state["champion"] = (champ["trial"], champ["step"])
    return state


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "champion":
            assert a[k] == b[k]
            continue
        assert {x: a[k][x] for x in ("checkpoints", "status", "tracked")} == \
               {x: b[k][x] for x in ("checkpoints", "status", "tracked")}
        assert a[k]["lora"].keys() == b[k]["lora"].keys()
        for t in a[k]["lora"]:  # a resumed trial ends with the weights of an uninterrupted one: a resumed trial may
            # train alone where it trained in a pack, so within 1% of the most an AdamW step can move (lr x steps)
            torch.testing.assert_close(a[k]["lora"][t], b[k]["lora"][t], rtol=0, atol=0.01 * LR[k] * 4)
        for part in ("metrics", "scores"):
            assert a[k][part].keys() == b[k][part].keys(), (k, part)
            for ck in a[k][part]:
                for m, v in a[k][part][ck].items():
                    assert b[k][part][ck][m] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), (k, part, ck, m)


def assert_complete_in_mlflow(cwd: Path, uri: str | None = None) -> None:
    """One parent, one FINISHED run per trial (never two), every loss step and every checkpoint's score once."""
    state = mlflow_state(uri or f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    assert state["parents"] == ["FINISHED"]
    assert sorted(state["children"]) == TRIALS
    for name, runs in state["children"].items():
        [(status, metrics, hashes)] = runs
        assert status == "FINISHED"
        assert metrics["train_loss"] == [1, 2, 3, 4] and metrics["lr"] == [1, 2, 3, 4]
        for m in ("clip_t", "clip_i", "face_detection_rate"):
            assert metrics[m] == [2, 4], (name, m, metrics[m])
        assert metrics["objective"] == [0]
        assert sorted(hashes) == ["lora_sha256.step-000002", "lora_sha256.step-000004"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("reference")
    p = sweep(*ARGS, cwd=cwd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert_complete_in_mlflow(cwd)
    return outcome(cwd)


@pytest.mark.parametrize("fault", [
    "train_step:*:3",        # the pack's third step: the checkpoint of step 2 is the one to resume from
    "checkpoint_write:*:2",  # the second trial's checkpoint of step 2: files written, not yet renamed into place
    "evaluate:*:1",          # the first checkpoint's images generated, not yet scored
    "mlflow_log:*:1",        # the first finished trial half recorded in MLflow
])
def test_killed_anywhere_then_resumed_loses_nothing(tmp_path, reference, fault):
    p = sweep(*ARGS, cwd=tmp_path, faults=f"{fault}=kill")
    assert p.returncode == -9, p.stdout[-3000:] + p.stderr[-3000:]  # SIGKILL: no handler ran, nothing was tidied
    p = sweep(*ARGS, "resume=true", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert len(list(tmp_path.glob("outputs/sweeps/*"))) == 1  # the same sweep folder was continued
    assert_same(reference, outcome(tmp_path))
    assert_complete_in_mlflow(tmp_path)


def test_a_race_killed_at_the_sweeps_end_resumes_without_regenerating_scored_images(tmp_path, reference):
    """The 4 checkpoints get racing's first round while they train (4 scoring calls); the 5th call is the race's,
    at the sweep's end: killed there, the sweep run again continues the race where it stood. Every image already
    scored stays as it was (not generated again), and the outcome is the uninterrupted sweep's."""
    p = sweep(*ARGS, cwd=tmp_path, faults="evaluate:*:5=kill")
    assert p.returncode == -9, p.stdout[-3000:] + p.stderr[-3000:]
    scored = {}
    for d in trial_dirs(tmp_path).values():
        cells = json.loads((d / "eval" / "metrics.json").read_text())["cells"]
        for ckpt, mine in cells.items():
            for key in mine:
                if not key.startswith("prior_"):
                    png = d / "eval" / "images" / ckpt / f"base_{key}.png"
                    scored[png] = png.stat().st_mtime_ns
    # round one: 4 checkpoints x 2 prompts (and the baseline's images), nothing more was scored before the kill
    assert len([png for png in scored if png.parent.name != "baseline"]) == 4 * 2
    p = sweep(*ARGS, "resume=true", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "racing:" in p.stdout + p.stderr
    assert {png: png.stat().st_mtime_ns for png in scored} == scored
    assert_same(reference, outcome(tmp_path))
    [race] = tmp_path.glob("outputs/sweeps/*/report/race.json")
    assert json.loads(race.read_text())["checkpoints"] == 4


def test_one_trial_raises_one_runs_out_of_memory_one_diverges_and_the_other_finishes(tmp_path, reference):
    """Four trials in one pack: 1e-5's scoring raises, 5e-4 does not fit in memory even alone (the pack is split
    down to it), 1e8 turns NaN. Each fails alone, with its reason; 1e-4 ends as it does in an undisturbed sweep."""
    faults = "evaluate:lr=1e-05:1=raise,train_step:lr=0.0005:1+=oom"
    p = sweep("-m", "lr=1e-4,1e-5,5e-4,1e8", *ARGS[2:], cwd=tmp_path, faults=faults)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]  # the sweep finished; its exit status tells that trials failed
    assert "3 trial(s) failed" in out
    assert "a pack of 4 trials does not fit in GPU memory" in out
    state = mlflow_state(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = c.get_experiment_by_name("sdxl-lora-sweep")
    reasons = {r.info.run_name: r.data.tags.get("failure_reason", "") for r in c.search_runs([exp.experiment_id])}
    assert [s for s, *_ in state["children"]["lr=0.0001"]] == ["FINISHED"]
    for name, needle in (("lr=1e-05", "injected fault at evaluate"), ("lr=0.0005", "out of GPU memory even alone"),
                         ("lr=100000000.0", "loss became nan")):
        assert [s for s, *_ in state["children"][name]] == ["FAILED"], name
        assert needle in reasons[name], (name, reasons[name])
    dirs = trial_dirs(tmp_path)
    ok = json.loads((dirs["lr=0.0001"] / "result.json").read_text())
    assert ok["status"] == "finished" and ok["metrics"].keys() == reference["lr=0.0001"]["metrics"].keys()
    mine = load_file(dirs["lr=0.0001"] / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors")
    for t, v in reference["lr=0.0001"]["lora"].items():  # its pack mates' failures never touched its weights
        torch.testing.assert_close(mine[t], v, rtol=0, atol=0.01 * 1e-4 * 4)
    assert (dirs["lr=1e-05"] / "checkpoints" / "step-000002").is_dir()  # the failed trial's checkpoint is kept
    selection = json.loads(next(tmp_path.glob("outputs/sweeps/*/report/selection.json")).read_text())
    assert selection["champion"]["trial"] == "lr=0.0001"


def test_a_tracking_server_that_does_not_answer_stops_the_sweep_before_training(tmp_path):
    port = free_port()  # nothing listens there
    t0 = time.time()
    p = sweep(*ARGS, f"tracking.uri=http://127.0.0.1:{port}", cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert f"tracking.uri=http://127.0.0.1:{port}: no MLflow server answers there" in out
    assert f"python -m sweep.server --port {port}" in out and "Traceback" not in out
    assert not list(tmp_path.glob("outputs/sweeps/*/*/checkpoints"))  # refused before any training
    assert time.time() - t0 < 120


def test_a_tracking_server_going_away_mid_sweep_loses_no_record(tmp_path):
    """The server dies once the trials have started: training and scoring go on, MLflow's records wait in the
    sweep's journal, the sweep says so and exits 1; with the server back, `sweep.tracking sync` sends them all
    and registers the champion. MLflow then holds what an undisturbed sweep's store holds."""
    server = mlflow_server(tmp_path / "server")
    srv = server.__enter__()
    try:
        proc = sweep(*ARGS, f"tracking.uri={srv.uri}", "steps=6", cwd=tmp_path, wait=False)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if list(tmp_path.glob("outputs/sweeps/*/*/checkpoints/step-000002")):
                break
            time.sleep(0.2)
        srv.stop()  # killed with its workers: requests are refused from now on
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 1, out[-4000:]
        [sweep_dir] = tmp_path.glob("outputs/sweeps/*")
        pending = sweep_dir / "mlflow_pending.jsonl"
        assert pending.is_file() and f"python -m sweep.tracking sync {sweep_dir}" in out
        for d in trial_dirs(tmp_path).values():  # the work itself is complete
            assert json.loads((d / "result.json").read_text())["status"] == "finished"
            assert [c.name for c in sorted((d / "checkpoints").iterdir())] == \
                   ["step-000002", "step-000004", "step-000006"]
        srv.start()  # back, on the same port and store
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        s = subprocess.run([sys.executable, "-m", "sweep.tracking", "sync", str(sweep_dir)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert s.returncode == 0, s.stdout[-3000:] + s.stderr[-3000:]
        assert not pending.exists()
        state = mlflow_state(srv.uri)
        assert state["parents"] == ["FINISHED"] and sorted(state["children"]) == TRIALS
        for name, runs in state["children"].items():
            [(status, metrics, hashes)] = runs  # one run per trial: none lost, none made twice
            assert status == "FINISHED"
            assert metrics["train_loss"] == list(range(1, 7))
            assert metrics["clip_t"] == [2, 4, 6]
            assert len(hashes) == 3
        champ = MlflowClient(srv.uri).get_model_version_by_alias("sdxl-lora-sks-woman", "champion")
        assert Path(champ.tags["checkpoint"]).is_relative_to(sweep_dir)
    finally:
        server.__exit__(None, None, None)


def test_eight_trial_processes_log_to_one_server_and_lose_nothing(tmp_path):
    """Eight trials, each in its own process, all at once, logging to one MLflow server on PostgreSQL: every run,
    every loss step and every checkpoint score arrives."""
    lrs = [f"{k}e-5" for k in range(1, 9)]
    with postgres("mlflow") as urls, mlflow_server(tmp_path / "server", urls["mlflow"]) as srv:
        p = sweep("-m", f"lr={','.join(lrs)}", "steps=2", "train.checkpoint_every=2", "data.resolution=64",
                  "progress=false", "tracking.system_metrics=false", "hydra/launcher=processes",
                  "hydra.launcher.n_workers=8", "hydra.launcher.pack_size=1", f"tracking.uri={srv.uri}", cwd=tmp_path,
                  timeout=1500)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        c = MlflowClient(srv.uri)
        exp = c.get_experiment_by_name("sdxl-lora-sweep")
        children = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 8 and all(r.info.status == "FINISHED" for r in children)
        starts = sorted((r.info.start_time, r.info.end_time) for r in children)
        assert starts[-1][0] < starts[0][1]  # all eight ran at once
        for r in children:
            [d] = tmp_path.glob(f"outputs/sweeps/*/{r.data.tags['trial_folder']}")
            log = [json.loads(ln) for ln in (d / "train_log.jsonl").read_text().splitlines()]
            assert [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, "train_loss")] == \
                   [(x["step"], pytest.approx(x["loss"])) for x in log]
            scores = json.loads((d / "result.json").read_text())["metrics"]["step-000002"]
            for k, v in scores.items():
                if v is not None and v == v:  # NaN (null in result.json) is not logged
                    assert [m.value for m in c.get_metric_history(r.info.run_id, k)] == [pytest.approx(v)]
            assert len(r.data.params) > 50
