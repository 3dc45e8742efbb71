"""A Hydra launcher that runs the sweep's batches (sweep/plan.py) as Ray tasks: across the machines of a Ray cluster,
one GPU per task, whose jobs train together as packs (`pack_size` trainings at most; 1 runs every job alone).

We use Ray directly rather than hydra-ray-launcher, whose releases pin old dependencies (cloudpickle<3, ...).
Each batch is one task running `execute_batch` (sweep/launchers/process.py): the worker composes its jobs' configs as
Hydra's own launchers do, in the launching process's sweep folder and working directory, then trains them. Every
task gets a fresh worker process (max_calls=1): its models and CUDA state go when it ends, as with
hydra/launcher=processes. Ray reserves `num_gpus` per task and sets CUDA_VISIBLE_DEVICES; the GPU's id is recorded
on each trial's MLflow run.

A worker that dies mid-pack (killed, out of memory, its node lost) is not lost: Ray runs the task again, up to
`max_retries` times; finished trials are skipped and each of the others resumes from its last checkpoint into its
own MLflow run. An exception inside a trial is not retried: the job records the trial as failed and the sweep goes
on. A batch whose retries are spent has each of its trials reported lost by name (process.lost_job): the sweep's
end marks them failed and exits 1, the other trials are selected as usual. If the launching process ends, Ray ends
its tasks with it.

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

from .packing import check_pack_size, in_launch_order, plan_jobs
from .process import GPU_ENV, batch_returns, execute_batch, lost_batch, prepare_launch
from .resume import FOLDER_ENV

log = logging.getLogger(__name__)
# read by the job's config: conf/tracking/server.yaml, MLflow's credentials (given by variable, or taken out of an
# http tracking.uri: tracking.credentials_to_env), and the sweep folder the launching process chose
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", FOLDER_ENV)


class RayLauncher:
    def __init__(self, address: str | None = None, num_gpus: float | None = None, num_cpus: float = 1,
                 max_retries: int = 1, runtime_env: Any = None, init: Any = None, pack_size: int = 8):
        if max_retries < 0:
            raise ValueError(f"hydra.launcher.max_retries={max_retries}: give 0 (the trials of a worker that "
                             "dies fail) or more (it runs again and resumes from its checkpoints)")
        if num_cpus <= 0:
            raise ValueError(f"hydra.launcher.num_cpus={num_cpus}: give the CPU cores each task (batch) reserves, > 0")
        if num_gpus is not None and num_gpus < 0:
            raise ValueError(f"hydra.launcher.num_gpus={num_gpus}: give the GPUs each task (batch) reserves (1, or 0.5 to "
                             "share one), or null for 1 when the cluster has GPUs")
        self.address, self.num_gpus, self.num_cpus, self.max_retries = address, num_gpus, num_cpus, max_retries
        self.pack_size = check_pack_size(pack_size)
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

        sweep_dir, state = prepare_launch(self.config)
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        first = initial_job_idx  # task names stay unique over the launches of one sweep (an Optuna search's)
        plan = plan_jobs(self.hydra_context, self.config, jobs, self.pack_size,
                         lambda p: p.label(lambda b: f"Ray task {_task_name(first, b)}"))
        if plan is None:  # plan_only=true
            return []
        self._connect()
        shared = [ray.put(x) for x in (self.hydra_context, self.config, state)]  # sent once, not once per task
        task = ray.remote(max_calls=1)(_run_task)
        pending = {}
        for number, positions in enumerate(plan.batches, 1):
            batch = [jobs[i] for i in positions]
            log.info("batch %d: %d job(s) in Ray task %s (%g CPU, %g GPU)", number, len(batch),
                     _task_name(first, number), self.num_cpus, self.num_gpus)
            ref = task.options(name=_task_name(first, number), num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                               max_retries=self.max_retries, retry_exceptions=False,
                               runtime_env=self._runtime_env()).remote(
                number, batch, *shared, self.task_function, sweep_dir.name, max(1, int(self.num_cpus)), os.getcwd())
            pending[ref] = (len(pending), number, batch)
        outs: list = [None] * len(pending)
        while pending:  # as they finish, whatever the order
            [ref], _ = ray.wait(list(pending), num_returns=1)
            slot, number, batch = pending.pop(ref)
            outs[slot] = self._collect(ref, number, batch, sweep_dir)
        return in_launch_order(plan, outs)

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

    def _collect(self, ref, number: int, batch: list[tuple[int, list[str]]], sweep_dir: Path) -> list:
        import ray
        from ray.exceptions import RayError, RayTaskError

        try:
            outcome = ray.get(ref)
            log.info("batch %d ended: %s", number, ", ".join(f"#{idx} {status}" for (idx, _), (status, _) in
                                                              zip(batch, outcome)))
            return batch_returns(sweep_dir, batch, outcome)
        except RayTaskError as exc:  # raised in the batch's process outside the trials (which record their own)
            why = f"{type(exc.cause).__name__}: {exc.cause}"
        except RayError as exc:  # the process running it is gone (killed, out of memory, node lost), every time
            why = (f"worker died ({type(exc).__name__}); hydra.launcher.max_retries={self.max_retries} retries "
                   "used")
        return lost_batch(sweep_dir, batch, why)


def _task_name(first_job: int, batch: int) -> str:
    return f"sweep-batch-{first_job}-{batch}"


def _run_task(number, batch, hydra_context, config, state, task_function, sweep_name, threads, cwd):
    """The Ray task: the batch's jobs in this worker, told which GPU Ray reserved for it (recorded on their MLflow
    runs)."""
    import ray

    gpus = ray.get_gpu_ids()
    if gpus:
        os.environ[GPU_ENV] = ",".join(str(g) for g in gpus)
    return execute_batch(number, batch, hydra_context, config, state, task_function, sweep_name, None, threads,
                         cwd=cwd)


def _plain(value: Any) -> Any:
    """A config node as plain dicts and lists, which Ray takes."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
