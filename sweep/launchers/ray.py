"""A Hydra launcher that runs every job as a Ray task: across the machines of a Ray cluster, one GPU per trial.

We use Ray directly rather than hydra-ray-launcher, whose releases pin old dependencies (cloudpickle<3, ...).
Each job is one task running `execute_job` (sweep/launchers/process.py): the worker composes the job's config as Hydra's
own launchers do, in the launching process's sweep folder and working directory, then trains the trial. Every
task gets a fresh worker process (max_calls=1): a trial's models and CUDA state go when it ends, as with
hydra/launcher=processes. Ray reserves `num_gpus` per task and sets CUDA_VISIBLE_DEVICES; the GPU's id is recorded
on the trial's MLflow run.

A worker that dies mid-trial (killed, out of memory, its node lost) is not lost: Ray runs the task again, up to
`max_retries` times, and the trial resumes from its last checkpoint into its own MLflow run. An exception inside
a trial is not retried: the job records the trial as failed and the sweep goes on. A job whose retries are spent
is reported lost by name (launcher.lost_job): the sweep's end marks its trial failed and exits 1, the other trials
are selected as usual. If the launching process ends, Ray ends its tasks with it.

Every node must see the sweep folder (paths.root) at the same path, have this project installed, and reach the
MLflow server (tracking=server) and, for an Optuna search, the study's storage; the launching process creates the
MLflow parent run (and the study) before any task starts. A job's config is composed on its worker, whose
environment is its node's: the variables the config reads are sent along from the launching process."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from .process import GPU_ENV, _job_return, execute_job, lost_job, prepare_launch
from .resume import FOLDER_ENV

log = logging.getLogger(__name__)
# read by the job's config: conf/tracking/server.yaml, and the sweep folder the launching process chose
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", FOLDER_ENV)


class RayLauncher:
    def __init__(self, address: str | None = None, num_gpus: float | None = None, num_cpus: float = 1,
                 max_retries: int = 1, runtime_env: Any = None, init: Any = None):
        if max_retries < 0:
            raise ValueError(f"hydra.launcher.max_retries={max_retries}: give 0 (a trial whose worker dies "
                             "fails) or more (it runs again and resumes from its checkpoints)")
        if num_cpus <= 0:
            raise ValueError(f"hydra.launcher.num_cpus={num_cpus}: give the CPU cores each trial reserves, > 0")
        if num_gpus is not None and num_gpus < 0:
            raise ValueError(f"hydra.launcher.num_gpus={num_gpus}: give the GPUs each trial reserves (1, or 0.5 to "
                             "share one), or null for 1 when the cluster has GPUs")
        self.address, self.num_gpus, self.num_cpus, self.max_retries = address, num_gpus, num_cpus, max_retries
        self.runtime_env = _plain(runtime_env) or {}
        self.init = _plain(init) or {}
        self.config: DictConfig | None = None
        self.hydra_context = None
        self.task_function = None
        self._connecting = threading.Lock()  # the Optuna sweeper's n_jobs threads launch at once
        self._connected = False

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        import ray
        from hydra.core.utils import filter_overrides

        sweep_dir, state = prepare_launch(self.config)
        self._connect()
        shared = [ray.put(x) for x in (self.hydra_context, self.config, state)]  # sent once, not once per job
        task = ray.remote(max_calls=1)(_run_task)
        pending = {}
        for slot, o in enumerate(job_overrides):
            idx = initial_job_idx + slot
            log.info("\t#%d : %s (Ray task, %g CPU, %g GPU)", idx, " ".join(filter_overrides(o)), self.num_cpus,
                     self.num_gpus)
            ref = task.options(name=f"sweep-job-{idx}", num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                               max_retries=self.max_retries, retry_exceptions=False,
                               runtime_env=self._runtime_env()).remote(
                idx, list(o), *shared, self.task_function, sweep_dir.name, max(1, int(self.num_cpus)), os.getcwd())
            pending[ref] = (slot, idx, list(o))
        returns: list = [None] * len(pending)
        while pending:  # as they finish, whatever the order
            [ref], _ = ray.wait(list(pending), num_returns=1)
            slot, idx, o = pending.pop(ref)
            returns[slot] = self._collect(ref, idx, o)
        return returns

    def _connect(self) -> None:
        """Join the cluster (address, else RAY_ADDRESS) or start a Ray instance in this process; once: a local
        instance stays up for the next batch and ends with this process."""
        import ray

        with self._connecting:
            if self._connected:
                return
            if not ray.is_initialized():
                address = self.address or os.environ.get("RAY_ADDRESS") or "local"
                ray.init(address=address, **self.init)
            self._connected = True
            gpus = ray.cluster_resources().get("GPU", 0)
            if self.num_gpus is None:
                self.num_gpus = 1 if gpus > 0 else 0
            elif self.num_gpus > 0 and gpus == 0:
                log.warning("hydra.launcher.num_gpus=%g but the Ray cluster has no GPU: the trials wait until a node "
                            "with one joins; hydra.launcher.num_gpus=0 runs them on CPUs", self.num_gpus)

    def _runtime_env(self) -> dict | None:
        """hydra.launcher.runtime_env, its env_vars joined by the launching process's FORWARDED_ENV."""
        forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env_vars = {**forwarded, **self.runtime_env.get("env_vars", {})}
        return {**self.runtime_env, "env_vars": env_vars} if env_vars else self.runtime_env or None

    def _collect(self, ref, idx: int, overrides: list[str]):
        import ray
        from ray.exceptions import RayError, RayTaskError

        try:
            status, value = ray.get(ref)
            log.info("job #%d (%s) ended: %s", idx, " ".join(overrides), status)
            return _job_return(overrides, status, value)
        except RayTaskError as exc:  # raised in the job's process outside the trial (which records its own)
            why = f"{type(exc.cause).__name__}: {exc.cause}"
        except RayError as exc:  # the process running it is gone (killed, out of memory, node lost), every time
            why = (f"worker died ({type(exc).__name__}); hydra.launcher.max_retries={self.max_retries} retries "
                   "used")
        return lost_job(Path(str(self.config.hydra.sweep.dir)), idx, overrides, why)


def _run_task(idx, overrides, hydra_context, config, state, task_function, sweep_name, threads, cwd):
    """The Ray task: the job in this worker, told which GPU Ray reserved for it (recorded on its MLflow run)."""
    import ray

    gpus = ray.get_gpu_ids()
    if gpus:
        os.environ[GPU_ENV] = ",".join(str(g) for g in gpus)
    return execute_job(idx, overrides, hydra_context, config, state, task_function, sweep_name, None, threads,
                       cwd=cwd)


def _plain(value: Any) -> Any:
    """A config node as plain dicts and lists, which Ray takes."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
