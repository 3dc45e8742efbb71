"""MLflow: one parent run per sweep, one child run per trial. The only module (with registry.py) that imports mlflow.

The parent run and experiment are created by the launching process before any trial starts (concurrent
first use of one SQLite store races); trials find the parent through `sweep.json` in the sweep folder
and link to it with the `mlflow.parentRunId` tag, so they may run in other processes or machines."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: sqlite:///<paths.root>/mlruns/mlflow.db, artifacts in <paths.root>/mlruns/artifacts
    experiment: str = "sdxl-lora-sweep"
    registered_model: str = "sdxl-lora-champion"
    system_metrics: bool = True


def store_uri(cfg: TrackingConfig, root: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment)."""
    if cfg.uri:
        return cfg.uri, None
    folder = (root / "mlruns").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


class Tracker:
    def __init__(self, cfg: TrackingConfig, root: Path):
        import mlflow
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri, self.artifact_location = store_uri(cfg, root)
        mlflow.set_tracking_uri(self.uri)
        self.mlflow = mlflow
        self.client = MlflowClient(self.uri)

    # sweep level -----------------------------------------------------------------------------------------
    def start_sweep(self, sweep_dir: Path, name: str, tags: dict[str, str]) -> dict[str, str]:
        """Create (or, for a resumed sweep, reopen) the experiment and the parent run; record them in sweep.json."""
        record_path = Path(sweep_dir) / SWEEP_FILE
        if record_path.is_file():
            rec = json.loads(record_path.read_text())
            self.client.update_run(rec["parent_run_id"], status="RUNNING")
            return rec
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            self.cfg.experiment, artifact_location=self.artifact_location)
        tags = {k: redact(k, v) for k, v in {**tags, "sweep_dir": str(sweep_dir), "kind": "sweep"}.items()}
        run = self.client.create_run(exp_id, run_name=name, tags=tags)
        rec = {"parent_run_id": run.info.run_id, "experiment_id": exp_id, "tracking_uri": self.uri}
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(rec, indent=2))
        return rec

    def end_sweep(self, parent_run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(parent_run_id, status)

    # trial level -----------------------------------------------------------------------------------------
    def child_run(self, sweep: dict[str, str], trial: str, tags: dict[str, str]) -> str:
        """The trial's run under the sweep's parent: reopened if this trial was started before (resume)."""
        found = self.client.search_runs([sweep["experiment_id"]],
                                        filter_string=f"tags.`mlflow.parentRunId` = '{sweep['parent_run_id']}' "
                                                      f"and tags.trial = '{trial}'", max_results=1)
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        tags = {**{k: redact(k, v) for k, v in tags.items()}, "trial": trial, "mlflow.parentRunId": sweep["parent_run_id"]}
        run = self.client.create_run(sweep["experiment_id"], run_name=trial, tags=tags)
        return run.info.run_id

    @contextmanager
    def active(self, run_id: str) -> Iterator[None]:
        """The run as MLflow's active run (system metrics: GPU memory/utilisation, CPU, RAM) while training."""
        with self.mlflow.start_run(run_id=run_id, log_system_metrics=self.cfg.system_metrics):
            yield

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, redact(k, v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i:i + 100])

    def log_metrics(self, run_id: str, rows: list[tuple[str, float, int]]) -> None:
        """(name, value, step) rows; NaN values are skipped (MLflow stores them, but plots break on them)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(s)) for k, v, s in rows if v is not None and math.isfinite(v)]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(run_id, metrics=ms[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, redact(k, v))

    def log_artifacts(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)


class NullTracker:
    """tracking.enabled=false: the same calls, nothing recorded."""

    uri = "disabled"

    def start_sweep(self, sweep_dir, name, tags):
        return {"parent_run_id": "", "experiment_id": "", "tracking_uri": ""}

    def child_run(self, sweep, trial, tags):
        return ""

    @contextmanager
    def active(self, run_id):
        yield

    def __getattr__(self, name):  # log_params, log_metrics, set_tags, log_artifacts, finish, end_sweep
        return lambda *a, **k: None


def make_tracker(cfg: TrackingConfig, root: Path):
    return Tracker(cfg, root) if cfg.enabled else NullTracker()


def read_sweep(sweep_dir: Path) -> dict[str, str] | None:
    p = Path(sweep_dir) / SWEEP_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(idx)} (cuda:{idx}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'all')})"
    return "cpu"


SECRET_KEY = re.compile(r"(token|password|passwd|secret|api_key|access_key)", re.IGNORECASE)


def redact(key: str, value: Any) -> str:
    """What may be recorded of a value: secrets in keys such as *token*/*password* hidden, passwords in URLs
    (user:password@host) masked wherever they appear, e.g. in a command line kept as a tag."""
    text = str(value)
    if SECRET_KEY.search(key.rsplit(".", 1)[-1]) and text not in ("", "None", "null"):
        return "***"
    return re.sub(r"(\w+://[^:/@\s]+):[^@\s]*@", r"\1:***@", text)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
