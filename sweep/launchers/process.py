"""A Hydra launcher that runs the sweep's batches (sweep/plan.py) each in a fresh process, up to `n_workers` at a
time: the jobs of a batch train together as packs in their process, as in hydra/launcher=packed
(sweep/launchers/packing.py), so every GPU trains a pack, not one trial. `pack_size=1` runs every job alone.

With `gpus` (a list of device indices, or "auto" for every visible GPU), each batch's process is pinned to one GPU
of its own (CUDA_VISIBLE_DEVICES), taken from a pool of free ones and given back when the batch ends, so the next
batch starts on whichever GPU frees up first (not `batch number % GPUs`, which collides when batches end out of
order). The plan shows where each batch is expected to run; each trial's MLflow run records where it ran.

A batch's process holds its own models and accelerator state and gives all memory back when it ends. A process
that dies (killed, out of memory) is started again for its batch, up to `max_retries` times: finished trials are
skipped and the others resume from their checkpoints; after that its trials are each reported lost by name and the
other batches go on. The sweeper hands over one job per call (Optuna workers) or many (the grid); either way each
batch starts as soon as a worker is free. A batch's process ends itself if the launching process dies, so an
interrupted sweep leaves nothing training behind."""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import queue
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from common import stop

from .. import register_resolvers
from ..redaction import redact_text
from ..results import LOST_FILE
from . import resume
from .packing import check_pack_size, in_launch_order, plan_jobs, run_batch

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
            raise ValueError("hydra.launcher.gpus=auto (cluster=gpus sets it): torch sees no CUDA GPU on this machine; "
                             "leave out cluster=gpus, or use hydra/launcher=processes for several CPU processes")
        return list(range(n))
    ids = [int(g) for g in gpus]
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ValueError(f"hydra.launcher.gpus={list(gpus)}: give distinct GPU indices >= 0, e.g. [0,1], or auto")
    return ids


class ProcessPoolLauncher:
    def __init__(self, n_workers: int = 2, gpus=None, pack_size: int = 8, max_retries: int = 1):
        if n_workers < 1:
            raise ValueError(f"hydra.launcher.n_workers={n_workers}: needs at least 1")
        if max_retries < 0:
            raise ValueError(f"hydra.launcher.max_retries={max_retries}: give 0 (the trials of a process that dies "
                             "fail) or more (a new process runs them again; they resume from their checkpoints)")
        self.gpus = resolve_gpus(gpus)
        self.n_workers = len(self.gpus) if self.gpus else n_workers  # one batch per GPU
        self.pack_size = check_pack_size(pack_size)
        self.max_retries = max_retries
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
        sweep_dir, state = prepare_launch(self.config)
        stop.on_signal(forward_stop)
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        workers = [f"GPU {g}" for g in self.gpus] or [f"process {k + 1}" for k in range(self.n_workers)]
        plan = plan_jobs(self.hydra_context, self.config, jobs, self.pack_size, lambda p: p.place_on(workers))
        if plan is None:  # plan_only=true
            return []
        batches = [(number, [jobs[i] for i in positions]) for number, positions in enumerate(plan.batches, 1)]
        with ThreadPoolExecutor(max_workers=max(1, len(batches))) as pool:
            outs = list(pool.map(lambda b: self._batch(b[0], b[1], state, sweep_dir), batches))
        return in_launch_order(plan, outs)

    def _batch(self, number: int, batch: list[tuple[int, list[str]]], state, sweep_dir: Path) -> list:
        """One batch of the plan in a process of its own (on a free GPU), run again in a new process if that one dies
        (its trials resume from their checkpoints; finished ones are skipped), at most max_retries times."""
        with self._slots:  # at most n_workers job processes, whoever calls
            stop.check()  # a stop asked for: no further batch starts
            gpu = self._free.get() if self.gpus else None  # the first GPU to free up
            try:
                for attempt in range(self.max_retries + 1):
                    if gpu is not None:
                        log.info("batch %d (%d job(s)) runs on GPU %d", number, len(batch), gpu)
                    try:
                        outcome = self._process(number, batch, state, sweep_dir.name, gpu)
                        break
                    except Exception as exc:  # the process died (killed, out of memory)
                        stop.check()  # ... or stopped at once: not run again
                        why = f"its process ended abnormally ({type(exc).__name__}: {exc})"
                        if attempt == self.max_retries:
                            return lost_batch(sweep_dir, batch,
                                              f"{why}; hydra.launcher.max_retries={self.max_retries} retries used")
                        log.warning("batch %d: %s; a new process runs it again (retry %d of %d), its trials resume "
                                    "from their last checkpoints", number, why, attempt + 1, self.max_retries)
            finally:
                if gpu is not None:
                    self._free.put(gpu)
        stop.check()  # its jobs stopped on the signal the launcher forwarded: not lost, resumable
        return batch_returns(sweep_dir, batch, outcome)

    def _process(self, number: int, batch: list, state, sweep_name: str, gpu: int | None) -> list:
        ctx = multiprocessing.get_context("spawn")
        # pinned by the initializer: it runs before the job's arguments are unpickled, and unpickling them
        # imports modules that may start CUDA, after which CUDA_VISIBLE_DEVICES no longer counts
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=pin_gpu, initargs=(gpu,)) as ex:
            return ex.submit(execute_batch, number, batch, self.hydra_context, self.config, state, self.task_function,
                             sweep_name, os.getpid(), self._threads(), gpu).result()

    def _threads(self) -> int:
        """CPU threads per job process: the cores shared out, so that parallel CPU jobs do not oversubscribe them."""
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
        f.write(json.dumps({"job": idx, "overrides": [redact_text(o) for o in overrides], "why": redact_text(why),
                            "at": time.time()}) + "\n")
    return _job_return(overrides, "COMPLETED", math.nan)


def batch_returns(sweep_dir: Path, batch: list[tuple[int, list[str]]], outcome: list[tuple[str, object]]) -> list:
    """A batch's outcome (execute_batch) as one JobReturn per job; a job that broke outside its task is lost; a
    batch whose process was stopped (a signal) stops the sweep (its trials resume)."""
    stopped = next((value for status, value in outcome if status == "STOPPED"), None)
    if stopped is not None:
        stop.request(stopped)
        stop.check()
    return [lost_job(sweep_dir, idx, o, value) if status == "ERROR" else _job_return(o, status, value)
            for (idx, o), (status, value) in zip(batch, outcome)]


def lost_batch(sweep_dir: Path, batch: list[tuple[int, list[str]]], why: str) -> list:
    """A batch whose process (or machine) died for good: each of its jobs lost, by name."""
    return [lost_job(sweep_dir, idx, o, why) for idx, o in batch]


def _job_return(overrides: list[str], status: str, value):
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=overrides, status=JobStatus[status])
    ret._return_value = value
    return ret


def forward_stop(signum: int, at_once: bool) -> None:
    """The launching process's stop signal, passed on to the job processes as SIGTERM (the terminal's Ctrl-C
    reaches them too; they ignore it, so that one Ctrl-C is one stop); on a second signal, waited for briefly
    while they close their runs."""
    children = multiprocessing.active_children()
    for p in children:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if at_once:
        deadline = time.monotonic() + stop.LAST_WORDS_S
        for p in children:
            p.join(max(0.0, deadline - time.monotonic()))


def pin_gpu(gpu: int | None) -> None:
    """In a fresh job process, before anything else: the job sees its one GPU as cuda:0; a stop comes from the
    launching process (forward_stop)."""
    stop.install(ignore_sigint=True)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        os.environ[GPU_ENV] = str(gpu)


def execute_batch(number, batch, hydra_context, config, singleton_state, task_function, sweep_name, parent_pid,
                  threads, gpu=None, cwd=None) -> list[tuple[str, object]]:
    """In the batch's process: its jobs, composed as Hydra's own launchers do, training together
    (packing.run_batch). Returns (status name, return value or error) per job: a JobReturn holds config classes
    that do not pickle; status "ERROR" is a job that broke outside its task (its message as value).
    parent_pid None: no watch on the launching process (a Ray worker's parent is its raylet, which ends it).
    cwd: the launching process's working directory, which relative paths (paths.root=".") are read against.
    gpu: the GPU `pin_gpu` made the only one visible (the process pool's initializer), checked here."""
    if cwd is not None:
        os.chdir(cwd)
    import torch
    from hydra.core.singleton import Singleton
    from hydra.core.utils import setup_globals
    from omegaconf.omegaconf import register_default_resolvers

    if gpu is not None and torch.cuda.is_available() and torch.cuda.device_count() != 1:
        raise RuntimeError(f"batch {number} was to see GPU {gpu} alone but sees {torch.cuda.device_count()} GPUs: "
                           "CUDA started before CUDA_VISIBLE_DEVICES was set")
    if parent_pid is not None:
        _watch_parent(parent_pid)
    torch.set_num_threads(threads)
    Singleton.set_state(singleton_state)
    register_default_resolvers()  # oc.env and the like: the resolvers stayed behind (lambdas do not pickle)
    setup_globals()
    register_resolvers()
    resume.use_folder(sweep_name)  # the sweep folder the launching process chose, not a new timestamp
    outcome = []
    for ret in run_batch(hydra_context, config, task_function, batch, number):
        if isinstance(ret, stop.Stopped):  # its run is KILLED and its result.json says so: the launcher stops
            outcome.append(("STOPPED", ret.signum))
            continue
        if isinstance(ret, BaseException):
            outcome.append(("ERROR", f"{type(ret).__name__}: {ret}"))
            continue
        value = ret._return_value
        if isinstance(value, BaseException):
            value = RuntimeError(f"{type(value).__name__}: {value}")  # picklable whatever the original held
        outcome.append((ret.status.name, value))
    return outcome


def _watch_parent(pid: int, every: float = 1.0) -> None:
    def watch():
        while True:
            if os.getppid() != pid:  # re-parented: the launcher is gone
                os._exit(3)
            time.sleep(every)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
