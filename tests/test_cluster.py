"""The scale-out presets (conf/cluster/): what they compose to, a sweep through submitit (the launcher Slurm uses,
here with its local executor), and the services description (deploy/compose.yaml). Ray: tests/test_ray.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from sweep import CONF_DIR, PROJECT_DIR


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_cluster_presets_pick_the_launcher_and_the_shared_tracking_server(monkeypatch):
    local = composed()
    assert local.hydra.launcher._target_.endswith("PackingLauncher") and local.tracking.uri is None
    gpus = composed("cluster=gpus")
    assert gpus.hydra.launcher._target_.endswith("ProcessLauncher") and gpus.hydra.launcher.gpus == "auto"
    assert gpus.hydra.launcher.pack_size == 8 and gpus.hydra.launcher.max_retries == 1
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    ray = composed("cluster=ray")
    assert ray.hydra.launcher._target_.endswith("RayLauncher") and ray.hydra.launcher.num_gpus == 1
    assert ray.tracking.uri == "http://mlflow.internal:5000"
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    slurm = composed("cluster=slurm", "hydra.launcher.partition=gpu")
    assert slurm.hydra.launcher._target_.endswith("PackedSlurmLauncher") and slurm.hydra.launcher.pack_size == 8
    assert (slurm.hydra.launcher.gpus_per_node, slurm.hydra.launcher.tasks_per_node) == (1, 1)
    assert slurm.hydra.launcher.partition == "gpu" and slurm.tracking.uri == "http://mlflow.internal:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert composed("tracking=server").tracking.uri == "http://127.0.0.1:5000"


@pytest.mark.slow
def test_a_sweep_through_submitit_trains_one_pack_per_job_composed_on_its_node_into_one_sweep(tmp_path):
    """Submitit pickles the sweep and composes every job's config again where the batch runs (on a Slurm node);
    three trials in packs of two are two submitit jobs, whose trials land in the launching command's sweep folder,
    under its MLflow parent run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SDXL_SWEEP_FOLDER", None)
    p = subprocess.run([sys.executable, "-m", "sweep", "-m", "lr=1e-4,5e-4,1e-5", "steps=2",
                        "train.checkpoint_every=2", "data.resolution=64", "progress=false",
                        "tracking.system_metrics=false", "hydra/launcher=slurm_local", "hydra.launcher.timeout_min=10",
                        "hydra.launcher.pack_size=2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "pack 2 (batch 2, submitit job 2 of the array)" in p.stdout + p.stderr
    [sweep_dir] = (tmp_path / "outputs" / "sweeps").iterdir()  # one folder: the jobs did not make their own
    results = [json.loads((d / "result.json").read_text()) for d in sweep_dir.iterdir()
               if (d / "result.json").is_file()]
    assert sorted(r["pack_size"] for r in results) == [1, 2, 2]  # a pack of two, and one alone
    jobs = [d for d in (sweep_dir / ".submitit").iterdir() if d.is_dir() and d.name != "%j"]  # %j: the array's own
    assert len(jobs) == 2  # one submitit job per batch
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("sdxl-lora-sweep").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["lr=0.0001", "lr=0.0005", "lr=1e-05"]
    assert sorted(r.data.tags["batch"] for r in children) == ["1", "1", "2"]
    assert len({r.data.tags["worker"] for r in children}) == 2  # a process per batch
    assert all(r.info.status == "FINISHED" for r in children) and parent.info.status == "FINISHED"
    selection = json.loads((sweep_dir / "report" / "selection.json").read_text())
    assert c.get_model_version_by_alias("sdxl-lora-sks-woman", "champion").tags["trial"] == \
        selection["champion"]["trial"]


def test_the_services_description_publishes_every_port_on_loopback_only():
    """deploy/compose.yaml: MLflow, PostgreSQL and the S3-compatible store, each port bound to 127.0.0.1 by default;
    every password comes from deploy/.env (required, none written in the file)."""
    spec = yaml.safe_load((PROJECT_DIR / "deploy" / "compose.yaml").read_text())
    assert {"mlflow", "postgres", "minio"} <= set(spec["services"])
    for name, svc in spec["services"].items():
        for port in svc.get("ports", []):
            # 127.0.0.1, or MLflow's own address (MLFLOW_BIND, for a server with logins) defaulting to it
            assert str(port).startswith(("127.0.0.1:", "${MLFLOW_BIND:-127.0.0.1}:")), (name, port)
    text = (PROJECT_DIR / "deploy" / "compose.yaml").read_text()
    for var in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD"):
        assert f"${{{var}:?" in text  # compose refuses to start without it
    assert "--backend-store-uri postgresql+psycopg://" in spec["services"]["mlflow"]["command"]
    assert "deploy/.env" in (PROJECT_DIR / ".gitignore").read_text()
    assert Path(PROJECT_DIR / "deploy" / "initdb" / "10-databases.sh").stat().st_mode & 0o111
