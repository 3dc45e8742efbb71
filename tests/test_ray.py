"""hydra/launcher=ray on CPU: a Ray cluster started here on loopback runs a 3-trial sweep that logs to a real MLflow
tracking server on a real PostgreSQL. Every trial and the champion are read back through MLflow; a worker killed
mid-trial is retried (its trial resumes from its checkpoint) or, without retries, reported failed by name; an Optuna
search shares its study with the workers through PostgreSQL."""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import optuna
import psutil
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from .services import free_port, kill_a_batch_mid_pack, mlflow_server, postgres

pytest.importorskip("ray", reason="hydra/launcher=ray needs Ray: pip install -e '.[ray]'")
pytestmark = pytest.mark.slow
GRID = "lr=1e-4,1e-5,5e-4"
SMALL = ["steps=4", "train.checkpoint_every=2", "data.resolution=64", "progress=false"]
LONGER = ["steps=6", "train.checkpoint_every=2", "data.resolution=64", "progress=false"]  # time to kill a worker
# Ray advertises the machine's routable address even when told 127.0.0.1, unless it is kept to one node: then every
# Ray process binds and talks on loopback only. The cluster takes a token of its own (not ~/.ray/auth_token, which
# `ray start` would pick up and a driver given an address would not).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "HF_HUB_OFFLINE": "1"}


@contextmanager
def ray_cluster(cpus: int = 2) -> Iterator[str]:
    """`ray start --head` on 127.0.0.1 (no GPU) with a temp folder of its own; yields its address. Ended by its
    process group, not `ray stop`, which would end every Ray instance on the machine."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    exe = Path(sys.executable).parent / "ray"
    cmd = [str(exe), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
           f"--temp-dir={temp}"]
    log = temp / "start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **RAY_ENV}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        _end_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _end_group(proc: subprocess.Popen) -> None:
    """The head's processes (GCS, raylet, agents, workers) share its process group; any that left it are its
    descendants."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(cpus=2) as address:
        yield address


@pytest.fixture(scope="module")
def databases():
    with postgres("mlflow", "optuna") as urls:
        yield urls


@pytest.fixture(scope="module")
def server(tmp_path_factory, databases):
    """One MLflow tracking server on PostgreSQL for the module, as a team shares one; each test its own experiment."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), databases["mlflow"]) as s:
        yield s


def sweep(*args: str, cwd: Path, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "sweep", "-m", *args]
    env = {**os.environ, **RAY_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def on_ray(cluster: str, server, name: str) -> list[str]:
    """The jobs on the test's Ray cluster, logged to the MLflow server as experiment (and registered model) `name`."""
    return ["hydra/launcher=ray", f"hydra.launcher.address={cluster}", f"tracking.uri={server.uri}",
            f"tracking.experiment={name}", f"tracking.registered_model={name}"]


def runs(c: MlflowClient, name: str):
    every = c.search_runs([c.get_experiment_by_name(name).experiment_id])
    return ([r for r in every if r.data.tags.get("kind") == "sweep"],
            [r for r in every if "mlflow.parentRunId" in r.data.tags])


def test_ray_cluster_runs_the_sweep_into_mlflow_and_registers_a_champion(tmp_path, cluster, server):
    """cluster=ray as documented: the server's URI in MLFLOW_TRACKING_URI, which only the launching command has."""
    p = sweep(GRID, *SMALL, "cluster=ray", f"hydra.launcher.address={cluster}", "hydra.launcher.num_gpus=0",
              "tracking.experiment=ray-grid", "tracking.registered_model=ray-grid", cwd=tmp_path,
              env={"MLFLOW_TRACKING_URI": server.uri})
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert "(sweep-batch-0-1 pid=" in out  # the trials' output, forwarded from their Ray worker: one task, one pack
    c = MlflowClient(server.uri)
    [parent], children = runs(c, "ray-grid")
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["lr=0.0001", "lr=0.0005", "lr=1e-05"]
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
        assert r.info.start_time > parent.info.start_time  # the launching command made the parent first
        assert [m.step for m in c.get_metric_history(r.info.run_id, "clip_t")] == [2, 4]
        assert len(c.get_metric_history(r.info.run_id, "train_loss")) == 4
        assert "gpu" not in r.data.tags  # a cluster without GPUs: none reserved
        assert r.data.tags["batch"] == "1"
    champ = c.get_model_version_by_alias("ray-grid", "champion")
    sweep_dir = Path(parent.data.tags["sweep_dir"])
    assert sweep_dir.is_relative_to(tmp_path / "outputs" / "sweeps")
    assert Path(champ.tags["checkpoint"]).is_relative_to(sweep_dir) and Path(champ.tags["checkpoint"]).is_dir()
    assert parent.data.tags["registry.champion_version"] == str(champ.version)


def test_a_killed_worker_is_retried_and_its_pack_resumes(tmp_path, cluster, server):
    """Six compatible trials in packs of three: two Ray tasks, both at once on the two-CPU cluster. One task's
    worker is killed mid-pack: Ray runs the task again, and each of its three trials resumes from its checkpoint
    into its own MLflow run; the other task's trials are untouched."""
    proc = sweep("lr=1e-4,2e-4,3e-4,4e-4,5e-4,6e-4", *LONGER, *on_ray(cluster, server, "ray-retried"),
                 "hydra.launcher.max_retries=1", "hydra.launcher.pack_size=3", cwd=tmp_path, wait=False)
    c = MlflowClient(server.uri)
    killed, pid = kill_a_batch_mid_pack(proc, tmp_path, c, size=3, experiment="ray-retried")
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-5000:]
    assert "pack 2 (batch 2, Ray task sweep-batch-0-2)" in out
    [parent], children = runs(c, "ray-retried")
    assert len(children) == 6  # the retried trials reopened their own runs
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    by_batch = {b: [r for r in children if r.data.tags["batch"] == b] for b in ("1", "2")}
    spans = {b: (min(r.info.start_time for r in rs), max(r.info.end_time for r in rs)) for b, rs in by_batch.items()}
    assert spans["1"][0] < spans["2"][1] and spans["2"][0] < spans["1"][1]  # the two packs trained at once
    for b, rs in by_batch.items():
        results = [json.loads(next(tmp_path.glob(f"outputs/sweeps/*/{r.data.tags['trial_folder']}/result.json"))
                              .read_text()) for r in rs]
        assert len(rs) == 3 and all(res["status"] == "finished" and res["pack_size"] == 3 for res in results)
        if b == killed:
            assert all(res["resumed_from"] in (2, 4) for res in results), results
            assert all(int(r.data.tags["worker"].rsplit(":", 1)[1]) != pid for r in rs)  # a new worker
        else:
            assert all(not res.get("resumed_from") for res in results)


def test_a_killed_worker_without_retries_reports_each_trial_of_its_pack_failed_by_name(tmp_path, cluster, server):
    """Three trials in packs of two: the pack's worker is killed and not retried; both its trials are reported lost
    by name, the third trial (the other task) finishes and is selected."""
    proc = sweep(GRID, *LONGER, *on_ray(cluster, server, "ray-lost"), "hydra.launcher.max_retries=0",
                 "hydra.launcher.pack_size=2", cwd=tmp_path, wait=False)
    c = MlflowClient(server.uri)
    killed, _ = kill_a_batch_mid_pack(proc, tmp_path, c, size=2, experiment="ray-lost")
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 1, out[-5000:]  # the sweep ended, selected among the others, and says two failed
    assert out.count("is lost: worker died") == 2 and "2 trial(s) failed" in out
    assert "hydra.launcher.max_retries=0 retries used" in out
    [parent], children = runs(c, "ray-lost")
    lost = [r for r in children if r.data.tags["batch"] == killed]
    [other] = [r for r in children if r.data.tags["batch"] != killed]
    assert len(lost) == 2 and other.info.status == "FINISHED"  # the rest of the sweep ran
    for r in lost:
        assert f"job #{r.data.tags['trial_folder'].split('_', 1)[0]} (" in out
        [folder] = tmp_path.glob(f"outputs/sweeps/*/{r.data.tags['trial_folder']}")
        result = json.loads((folder / "result.json").read_text())  # written by the sweep's end, for the lost trial
        assert result["status"] == "failed" and result["lost"] and "resume=true" in result["error"]
        assert r.info.status == "FAILED" and "process killed" in r.data.tags["failure_reason"]
    assert parent.info.status == "FAILED" and parent.data.tags["trials.failed"] == "2"
    selection = json.loads(next(tmp_path.glob("outputs/sweeps/*/report/selection.json")).read_text())
    assert selection["champion"]["trial"] == other.info.run_name


def test_an_optuna_search_shares_its_study_on_postgresql_with_the_ray_workers(tmp_path, cluster, server, databases):
    """search=demo through Ray, two trials at a time: the launching command creates the study (PostgreSQL) and the
    parent run; each worker reports its checkpoints' scores to the study and logs its run to the MLflow server."""
    p = sweep("search=demo", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2", "hydra.sweeper.study_name=ray",
              f"hydra.sweeper.storage={databases['optuna']}", *SMALL, *on_ray(cluster, server, "ray-optuna"),
              cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    study = optuna.load_study(study_name="ray", storage=databases["optuna"])
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert all(t.intermediate_values for t in trials)  # scores reported from the workers, checkpoint by checkpoint
    c = MlflowClient(server.uri)
    [parent], children = runs(c, "ray-optuna")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == sorted(t.number for t in trials)
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    assert c.get_model_version_by_alias("ray-optuna", "champion")
