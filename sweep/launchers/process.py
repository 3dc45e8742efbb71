"""A Hydra launcher that runs every job in a fresh process, up to `n_workers` at a time.

With `gpus` (a list of device indices, or "auto" for every visible GPU), each job process is pinned to one GPU
of its own (CUDA_VISIBLE_DEVICES), taken from a pool of free ones and given back when the job ends, so the next
job starts on whichever GPU frees up first (not `job number % GPUs`, which collides when jobs end out of order).

A job's process holds its own models and accelerator state and gives all memory back when it ends; a job that
crashes (or is killed) fails alone. The sweeper hands over one job per call (Optuna workers) or many (the grid);
either way each job starts as soon as a worker is free. A job process ends itself if the launching process
dies, so an interrupted sweep leaves nothing training behind."""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from .. import register_resolvers
from ..results import LOST_FILE
from . import resume

log = logging.getLogger(__name__)


GPU_ENV = "SDXL_SWEEP_GPU"  # the GPU index a job was pinned to (recorded on its MLflow run)


def resolve_gpus(gpus) -> list[int]:
    """hydra.launcher.gpus: null (no pinning), "auto" (every GPU this process sees) or a list of indices."""
    if gpus is None:
        return []
    if str(gpus) == "auto":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("hydra.launcher.gpus=auto: no CUDA GPU is visible; drop it (CPU jobs) or list indices")
        return list(range(n))
    ids = [int(g) for g in gpus]
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError(f"hydra.launcher.gpus={list(gpus)}: give distinct GPU indices >= 0, e.g. [0,1], or auto")
    return ids


class ProcessPoolLauncher:
    def __init__(self, n_workers: int = 2, gpus=None):
        if n_workers < 1:
            raise ValueError(f"hydra.launcher.n_workers={n_workers}: needs at least 1")
        self.gpus = resolve_gpus(gpus)
        self.n_workers = len(self.gpus) if self.gpus else n_workers  # one job per GPU
        self.config: DictConfig | None = None
        self.hydra_context = None
        self.task_function = None
        self._slots = threading.Semaphore(self.n_workers)
        self._free: queue.Queue[int] = queue.Queue()
        for g in self.gpus:
            self._free.put(g)

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from hydra.core.utils import filter_overrides

        sweep_dir, state = prepare_launch(self.config)
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        for idx, o in jobs:
            log.info("\t#%d : %s (own process)", idx, " ".join(filter_overrides(o)))
        with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            return list(pool.map(lambda job: self._one(job[0], job[1], state, sweep_dir.name), jobs))

    def _one(self, idx: int, overrides: list[str], state, sweep_name: str):
        with self._slots:  # at most n_workers job processes, whoever calls
            gpu = self._free.get() if self.gpus else None  # the first GPU to free up
            try:
                if gpu is not None:
                    log.info("job #%d runs on GPU %d", idx, gpu)
                ctx = multiprocessing.get_context("spawn")
                # pinned by the initializer: it runs before the job's arguments are unpickled, and unpickling them
                # imports modules that may start CUDA, after which CUDA_VISIBLE_DEVICES no longer counts
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=pin_gpu, initargs=(gpu,)) as ex:
                    fut = ex.submit(execute_job, idx, overrides, self.hydra_context, self.config, state,
                                    self.task_function, sweep_name, os.getpid(), self._threads(), gpu)
                    try:
                        status, value = fut.result()
                    except Exception as exc:  # the process died (killed, out of memory): this job is lost
                        return lost_job(Path(str(self.config.hydra.sweep.dir)), idx, overrides,
                                        f"its process ended abnormally ({type(exc).__name__}: {exc})")
            finally:
                if gpu is not None:
                    self._free.put(gpu)
        return _job_return(overrides, status, value)

    def _threads(self) -> int:
        """CPU threads per job: the cores shared out, so that parallel CPU jobs do not oversubscribe them."""
        return max(1, (os.cpu_count() or 1) // self.n_workers)


def prepare_launch(config: DictConfig) -> tuple[Path, dict]:
    """What a launcher of jobs in other processes does first: Hydra's globals and logging, the sweep folder, and
    Hydra's state for the job processes, without its resolvers (lambdas do not pickle: each process registers
    its own)."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, setup_globals

    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state = Singleton.get_state()
    state["omegaconf_resolvers"] = {}
    return sweep_dir, state


def lost_job(sweep_dir: Path, idx: int, overrides: list[str], why: str):
    """A job whose process (or machine) died: named in the log and in <sweep>/lost_jobs.jsonl, which the sweep's end
    reports as a failed trial (exit status 1). It comes back as a NaN result, not a FAILED one: Hydra's grid
    sweeper would stop at a FAILED job before the others are selected and reported; the Optuna sweeper fails the
    study trial of a job that did not report either way. `resume=true` runs it again."""
    log.error("job #%d (%s) is lost: %s; the others go on, and resume=true runs it again", idx, " ".join(overrides),
              why)
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(sweep_dir) / LOST_FILE, "a") as f:
        f.write(json.dumps({"job": idx, "overrides": list(overrides), "why": why, "at": time.time()}) + "\n")
    return _job_return(overrides, "COMPLETED", math.nan)


def _job_return(overrides: list[str], status: str, value):
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=overrides, status=JobStatus[status])
    ret._return_value = value
    return ret


def pin_gpu(gpu: int | None) -> None:
    """In a fresh job process, before anything else: the job sees its one GPU as cuda:0."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        os.environ[GPU_ENV] = str(gpu)


def execute_job(idx, overrides, hydra_context, config, singleton_state, task_function, sweep_name, parent_pid,
                threads, gpu=None, cwd=None):
    """In the job's process: the job's config composed as Hydra's own launchers do, then the task. Returns
    (status name, return value or exception): the JobReturn itself holds config classes that do not pickle.
    parent_pid None: no watch on the launching process (a Ray worker's parent is its raylet, which ends it).
    cwd: the launching process's working directory, which relative paths (paths.root=".") are read against.
    gpu: the GPU `pin_gpu` made the only one visible (the process pool's initializer), checked here."""
    if cwd is not None:
        os.chdir(cwd)
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals
    from omegaconf import open_dict
    from omegaconf.omegaconf import register_default_resolvers

    if gpu is not None and torch.cuda.is_available() and torch.cuda.device_count() != 1:
        raise RuntimeError(f"job #{idx} was to see GPU {gpu} alone but sees {torch.cuda.device_count()} GPUs: CUDA "
                           "started before CUDA_VISIBLE_DEVICES was set")
    if parent_pid is not None:
        _watch_parent(parent_pid)
    torch.set_num_threads(threads)
    Singleton.set_state(singleton_state)
    register_default_resolvers()  # oc.env and the like: the resolvers stayed behind (lambdas do not pickle)
    setup_globals()
    register_resolvers()
    resume.use_folder(sweep_name)  # the sweep folder the launching process chose, not a new timestamp
    cfg = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
        cfg.hydra.job.num = idx
    HydraConfig.instance().set_config(cfg)
    ret = run_job(hydra_context=hydra_context, task_function=task_function, config=cfg,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    value = ret._return_value
    if isinstance(value, BaseException):
        value = RuntimeError(f"{type(value).__name__}: {value}")  # picklable whatever the original held
    return ret.status.name, value


def _watch_parent(pid: int, every: float = 1.0) -> None:
    def watch():
        while True:
            if os.getppid() != pid:  # re-parented: the launcher is gone
                os._exit(3)
            time.sleep(every)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
