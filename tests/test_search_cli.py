"""`python -m sweep -m search=demo` end to end: an Optuna search that prunes, selects and registers a champion,
survives being killed, shares one study between worker processes on PostgreSQL, and opens in optuna-dashboard.
Everything is read back through the Optuna and MLflow APIs."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from .services import free_port, postgres

pytestmark = pytest.mark.slow
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SMALL = ["steps=12", "train.checkpoint_every=4", "data.resolution=64"]  # the demo's three checkpoints, smaller


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sweep", "-m", "search=demo", "progress=false", *args]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _run(*args: str, cwd: Path, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _study(url: str) -> optuna.Study | None:
    names = optuna.study.get_all_study_names(url)
    return optuna.load_study(study_name=names[0], storage=url) if names else None


def _mlflow_children(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    [exp] = [e for e in client.search_experiments() if e.name == "sdxl-lora-sweep"]
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_demo_search_prunes_picks_a_champion_and_resumes_after_a_kill(tmp_path):
    url = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_cmd(*SMALL), cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    victim, deadline = None, time.time() + 1200
    try:
        while time.time() < deadline and proc.poll() is None:  # kill it mid-trial, after a checkpoint was scored
            time.sleep(1)
            # open the storage only once the sweeper has made it (the sweep folder's multirun.yaml comes after
            # the study): opening it first would race the sweeper's creation of the tables
            made = list((tmp_path / "outputs" / "sweeps").glob("*/multirun.yaml"))
            study = _study(url) if made else None
            trials = study.get_trials() if study else []
            running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
            if sum(t.state in FINISHED for t in trials) >= 2 and running:
                victim = running[0].number
                done = {t.number for t in trials if t.state in FINISHED}
                break
    finally:
        with contextlib.suppress(ProcessLookupError):  # SIGKILL: no cleanup runs, as when a machine goes away
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert victim is not None, (tmp_path / "first.log").read_text()[-3000:]
    [sweep_dir] = (tmp_path / "outputs" / "sweeps").iterdir()
    # trials the study had as finished must stay untouched; the victim may have written its result.json and been
    # killed before it was told to the study (seen once in CI): it is re-run, resuming from its last checkpoint,
    # and writes that file again
    before = {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/result.json")
              if int(p.parent.name.split("_", 1)[0]) in done}
    weights_before = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/checkpoints/*/*.safetensors")}
    assert len(before) >= 2
    # the victim may also have finished all its work (result.json written) in the instant before the kill: then the
    # re-run only reports it to the study (seen once in CI) instead of resuming it from a checkpoint
    victim_had_finished = any(sweep_dir.glob(f"{victim}_*/result.json"))

    p = _run(*SMALL, cwd=tmp_path)  # the same command again
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert [d.name for d in (tmp_path / "outputs" / "sweeps").iterdir()] == [sweep_dir.name]  # same folder

    study = _study(url)
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert states.count(TrialState.PRUNED) >= 1
    assert trials[victim].state == TrialState.FAIL and "died" in trials[victim].user_attrs["fail_reason"]
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
    assert retry.state in FINISHED and retry.params == trials[victim].params
    assert len(trials) - 1 == 6  # the budget: six trials, the killed one counted once (through its re-run)
    # finished trials were not repeated: their results and weights are untouched
    for name, mtime in before.items():
        assert (sweep_dir / name / "result.json").stat().st_mtime_ns == mtime, name
    for path, mtime in weights_before.items():
        assert path.stat().st_mtime_ns == mtime, path
    folders = sorted(d for d in sweep_dir.iterdir() if (d / "result.json").is_file())
    assert len(folders) == 6
    victim_result = json.loads((next(d for d in folders if d.name.startswith(f"{victim}_")) / "result.json").read_text())
    if victim_had_finished:
        assert victim_result["status"] in ("finished", "pruned") and victim_result["tracked"] is True
    else:
        assert victim_result["resumed_from"] >= 4  # the re-run continued from the killed trial's checkpoint
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    for t in pruned:  # a pruned trial stopped where the pruner said, before the last checkpoint
        assert t.user_attrs["pruned_step"] < 12 and max(t.intermediate_values) == t.user_attrs["pruned_step"]

    # MLflow: one parent, one child run per trial folder, pruned ones marked with their step; the champion
    client, parents, children = _mlflow_children(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["trial"] for r in children) == [d.name for d in folders]
    assert all(r.info.status == "FINISHED" for r in children)
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    for t in pruned:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna.state"] == "PRUNED"
        assert int(run.data.tags["pruned_at_step"]) == t.user_attrs["pruned_step"]
    assert set(by_trial) <= {t.number for t in trials}
    champion = client.get_model_version_by_alias("sdxl-lora-sks-woman", "champion")
    selection = json.loads((sweep_dir / "report" / "selection.json").read_text())
    assert selection["champion"] and champion.run_id == parents[0].info.run_id
    report = json.loads((sweep_dir / "report" / "optuna_study.json").read_text())
    assert report["counts"]["pruned"] >= 1 and report["best"][0]["trial"] == study.best_trial.number
    assert (sweep_dir / "report" / "optuna_intermediate.png").is_file()

    # optuna-dashboard opens the same storage (the command the README documents)
    port = free_port()
    exe = Path(sys.executable).parent / "optuna-dashboard"  # the venv's console script, active or not
    dash = subprocess.Popen([str(exe) if exe.is_file() else "optuna-dashboard", url, "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = _get_json(f"http://127.0.0.1:{port}/api/studies", 60)
        [summary] = body["study_summaries"]
        assert summary["study_name"] == study.study_name
    finally:
        dash.terminate()
        dash.wait(timeout=30)


def test_rounds_of_n_jobs_trials_train_as_one_pack_each_on_the_default_launcher(tmp_path):
    """`hydra.sweeper.n_jobs=2` on the default (packing) launcher: the sweeper asks two trials at a time and they
    train as one pack; the next two are asked when that pack has ended, so the pruner sees the first round."""
    p = _run(*SMALL, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    out = p.stdout + p.stderr
    [sweep_dir] = (tmp_path / "outputs" / "sweeps").iterdir()
    study = _study(f"sqlite:///{tmp_path}/mlruns/optuna.db")
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state in FINISHED for t in trials), \
        [(t.number, t.state) for t in trials]
    packs = [line.split("together: ", 1)[1].split(", ") for line in out.splitlines()
             if "trial(s) of this batch together: " in line]
    assert [sorted(int(n.split("_", 1)[0]) for n in pack) for pack in packs] == [[0, 1], [2, 3]], out[-4000:]
    first, second = trials[:2], trials[2:]
    assert max(t.datetime_start for t in first) < min(t.datetime_complete for t in first)  # side by side
    assert min(t.datetime_start for t in second) >= max(t.datetime_complete for t in first)  # asked after round 1
    assert "plan" not in {f.name.rsplit(".", 1)[0] for f in sweep_dir.iterdir()}  # a search prints no plan
    folders = sorted(d.name for d in sweep_dir.iterdir() if (d / "result.json").is_file())
    assert [int(f.split("_", 1)[0]) for f in folders] == [0, 1, 2, 3]
    _, parents, children = _mlflow_children(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["trial"] for r in children) == folders
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}
    assert json.loads((sweep_dir / "report" / "selection.json").read_text())["champion"]


@pytest.fixture
def postgres_url():
    with postgres("optuna") as urls:
        yield urls["optuna"]


def test_two_workers_share_one_study_on_postgresql(tmp_path, postgres_url):
    """Two sweeper processes (one running two trials at a time in their own processes) against one study:
    every trial is run once, by one worker, and ends finished; none is lost or run twice."""
    sweep_dir = tmp_path / "outputs" / "sweeps" / "shared"
    common = [f"hydra.sweeper.storage={postgres_url}", "hydra.sweeper.study_name=pg", f"hydra.sweep.dir={sweep_dir}",
              "hydra.sweeper.n_trials=5", "steps=20", "data.resolution=64"]
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in (0, 1)]
    first = subprocess.Popen(_cmd(*common, "hydra/launcher=processes", "hydra.sweeper.n_jobs=2"), cwd=tmp_path,
                             env=_env(), stdout=logs[0], stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (sweep_dir / "sweep.json").is_file() and time.time() < deadline:
        time.sleep(0.5)  # the parent run exists before the second worker joins (as a launching command would do)
    second = subprocess.Popen(_cmd(*common), cwd=tmp_path, env=_env(), stdout=logs[1], stderr=subprocess.STDOUT)
    rcs = [first.wait(timeout=900), second.wait(timeout=900)]
    out = [(tmp_path / f"worker{i}.log").read_text() for i in (0, 1)]
    assert rcs == [0, 0], out[0][-3000:] + out[1][-3000:]

    study = optuna.load_study(study_name="pg", storage=postgres_url)
    trials = study.get_trials()
    assert all(t.state in FINISHED for t in trials), [(t.number, t.state) for t in trials]
    # each worker asks only while the budget is open: at most one surplus trial per extra worker thread
    assert 5 <= len(trials) <= 7
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2  # both workers took trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)  # and drew different points
    starts = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(starts, starts[1:]))  # trials ran side by side
    folders = sorted(d.name for d in sweep_dir.iterdir() if (d / "result.json").is_file())
    assert sorted(int(f.split("_")[0]) for f in folders) == sorted(t.number for t in trials)  # one folder each
    _, parents, children = _mlflow_children(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert len(parents) == 1
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == sorted(t.number for t in trials)
    assert sorted(r.data.tags["trial"] for r in children) == folders  # one run per trial, none twice
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}


def _get_json(url: str, timeout: float):
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
