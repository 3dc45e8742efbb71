"""Multirun jobs that train together: a Hydra launcher that runs a batch of jobs as one pack of trials.

The jobs are planned first (sweep/plan.py): batches hold whole trainings (a 300-step trial goes with the 1000-step
trial whose training writes it, trainer/planner.py), at most `pack_size` trainings each. Each job of a batch runs
in its own thread through Hydra's own `run_job` (its folder, .hydra files, callbacks,
MLflow child run, result.json), one thread at a time: everything a job does before and after training holds
`_TURN`. Where a job would train, it hands its trial to the batch's rendezvous and gives up its turn; when every
job of the batch has either arrived or ended without training (skipped, failed its checks), the last one trains
all arrived trials in one `trainer.train` call, which packs the compatible ones (trainer/packed.py) and trains
the rest one by one. Each job then takes its turn again and records its own result. Checkpoint hooks (live
scoring, Optuna pruning) run inside that call, each with its own trial's adapter on the UNet.

The launchers that spread a sweep over processes, GPUs, Ray tasks or Slurm jobs plan it the same way
(`plan_jobs`) and run each batch through `run_batch` in a process of their own. Outside a batch (a single run,
the basic launcher) `train` here is `trainer.train`."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig

from common import stop, timeline
from common.errors import UserError
from trainer import train as _train_now
from trainer import training_config_hash

from ..config import typed_job
from ..logs import for_trial
from ..plan import Plan, make_plan, trial_key
from ..results import finished_objective

log = logging.getLogger(__name__)

_TURN = threading.RLock()  # one job thread at a time runs outside the shared training call
_LOCAL = threading.local()
BATCH_ENV = "SDXL_SWEEP_BATCH"  # the plan's batch a job ran in (recorded on its MLflow run)


class Rendezvous:
    """Where the jobs of one batch meet to train together."""

    def __init__(self, jobs: int):
        self.waiting = jobs  # jobs that may still arrive
        self.entries: list[dict] = []
        self.done = threading.Condition(_TURN)
        self.trained = False

    def arrive(self, trials, model, data, cache_dir, progress: bool):
        entry = {"trials": trials, "key": (repr(model), repr(data), str(cache_dir)), "args": (model, data, cache_dir),
                 "progress": progress, "results": None, "error": None}
        with self.done:
            self.entries.append(entry)
            self.waiting -= 1
            if self.waiting == 0:
                self._train_all()
            else:
                self.done.wait_for(lambda: self.trained)
        if entry["error"] is not None:
            raise entry["error"]
        return entry["results"]

    def leave(self) -> None:
        """A job that ended without arriving (already finished, failed before training)."""
        with self.done:
            self.waiting -= 1
            if self.waiting == 0 and self.entries and not self.trained:
                self._train_all()

    def _train_all(self) -> None:
        groups: dict[tuple, list[dict]] = {}
        for e in self.entries:  # one base model and one data set per trainer call
            groups.setdefault(e["key"], []).append(e)
        try:
            for group in groups.values():
                specs = [t for e in group for t in e["trials"]]
                names = ", ".join(s.name for s in specs)
                batch = f"batch of {len(specs)}"  # logged as the batch, not as the trial whose thread trains it
                for_trial(batch, log.info)("training %d trial(s) of this batch together: %s", len(specs), names)
                try:
                    results = for_trial(batch, _train_now)(specs, *group[0]["args"],
                                                           progress=any(e["progress"] for e in group))
                except BaseException as exc:  # every trial of the call fails with it (e.g. out of memory)
                    for e in group:
                        e["error"] = exc
                    continue
                by_spec = dict(zip(map(id, specs), results))
                for e in group:
                    e["results"] = [by_spec[id(t)] for t in e["trials"]]
        finally:
            self.trained = True
            self.done.notify_all()


def train(trials, model, data, cache_dir, progress: bool = True):
    """`trainer.train`, or, inside a job of the packing launcher, this job's share of its batch's joint call."""
    rv: Rendezvous | None = getattr(_LOCAL, "rendezvous", None)
    if rv is None:
        return _train_now(trials, model, data, cache_dir, progress=progress)
    _LOCAL.arrived, _LOCAL.rendezvous = True, None  # a second call in the same job trains on its own
    return rv.arrive(trials, model, data, cache_dir, progress)


class PackingLauncher:
    """hydra/launcher=packed: the sweep's plan first (sweep/plan.py: which trials one training serves, printed and
    written to plan.json; plan_only=true stops there), then batches of at most `pack_size` trainings, each with
    all the trials it serves, whose jobs train as one pack where compatible."""

    def __init__(self, pack_size: int = 8):
        self.pack_size = check_pack_size(pack_size)
        self.config: DictConfig | None = None
        self.hydra_context = None
        self.task_function = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        return self.launch_jobs([(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)])

    def launch_jobs(self, jobs: list[tuple[int, list[str]]]) -> list:
        """`launch` of jobs numbered by the caller (the Optuna sweeper's rounds: each trial keeps its number, or
        the number of the dead trial whose folder it resumes)."""
        from hydra.core.utils import configure_log, setup_globals

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        with timeline.span("starting up: planning"):
            plan = plan_jobs(self.hydra_context, self.config, jobs, self.pack_size)
        if plan is None:  # plan_only=true
            return []
        log.info("Launching %d jobs, up to %d trainings together", len(jobs), self.pack_size)
        outs = []
        for number, positions in enumerate(plan.batches, 1):
            stop.check()  # a stop asked for: no further batch starts
            out = run_batch(self.hydra_context, self.config, self.task_function, [jobs[i] for i in positions], number)
            stop.check()  # its jobs ended on the stop (their runs KILLED, checkpoints kept): no other error to raise
            for r in out:
                if isinstance(r, BaseException):
                    raise r
            outs.append(out)
        return in_launch_order(plan, outs)


def check_pack_size(pack_size: int) -> int:
    if pack_size < 1:
        raise ValueError(f"hydra.launcher.pack_size={pack_size}: needs at least 1 (1 trains every job on its own)")
    return pack_size


def in_launch_order(plan: Plan, outs: list[list]) -> list:
    """One result per job, in the order Hydra gave the jobs, from one list of results per batch of the plan."""
    returns = {i: r for positions, out in zip(plan.batches, outs) for i, r in zip(positions, out)}
    return [returns[i] for i in sorted(returns)]


def plan_jobs(hydra_context, config: DictConfig, jobs: list[tuple[int, list[str]]], pack_size: int,
              place: Callable[[Plan], None] | None = None) -> Plan | None:
    """The plan of these jobs (sweep/plan.py: trainings, batches of at most pack_size trainings, packs), placed on
    the launcher's workers (`place`), printed and written to the sweep folder; None with plan_only=true (then no
    job runs). A job whose config is unusable is planned as a batch of its own (it fails on its own when it runs).
    A search's launches are planned without a word (the sweeper asks its trials round by round: a plan of each
    round, again and again, says nothing the sweeper's own log does not)."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    planned, only, finished = [], False, set()
    for k, (idx, o) in enumerate(jobs):
        cfg = hydra_context.config_loader.load_sweep_config(config, list(o))
        try:
            conf = typed_job(cfg)
        except UserError:
            conf = None
        only = only or bool(conf and conf.plan_only)
        planned.append((trial_key(o, sweep_dir) or f"job{idx}", conf))
        if conf is not None and _already_finished(cfg, sweep_dir, idx, conf):
            finished.add(k)
    plan = make_plan(planned, pack_size, frozenset(finished))
    if place is not None:
        place(plan)
    searching = any(a.startswith("optuna_trial=") for _, o in jobs for a in o)
    if not searching or only:
        log.info("%s\n(written to %s)", plan.text(), plan.write(sweep_dir))
    if only:
        log.info("plan_only=true: nothing trained; run the same command without it to train")
        return None
    return plan


def _already_finished(cfg: DictConfig, sweep_dir: Path, idx: int, conf) -> bool:
    """Whether the job's trial folder holds its trial finished with this very configuration (the job will skip it)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.hydra.job.num = idx  # the trial folder's name starts with it
    out = sweep_dir / str(cfg.hydra.sweep.subdir)
    cfg_hash = training_config_hash(conf.model, conf.data, conf.lora, conf.train)
    return finished_objective(out, cfg_hash, conf.train.max_steps) is not None


def run_batch(hydra_context, config: DictConfig, task_function, batch: list[tuple[int, list[str]]],
              number: int) -> list:
    """The jobs of one batch of the plan (number: its place in the plan, recorded on each trial's MLflow run), each
    in a thread of this process through Hydra's `run_job`, training together where they would train. One
    JobReturn per job, or the exception that ended its thread outside the task."""
    from hydra.core.utils import filter_overrides

    os.environ[BATCH_ENV] = str(number)
    for idx, o in batch:
        log.info("\t#%d : %s (batch %d)", idx, " ".join(filter_overrides(o)), number)
    rv = Rendezvous(len(batch))
    out: list = [None] * len(batch)
    threads = [threading.Thread(target=_job, args=(hydra_context, config, task_function, rv, idx, o, out, i),
                                name=f"job-{idx}") for i, (idx, o) in enumerate(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _job(hydra_context, config, task_function, rv: Rendezvous, idx: int, overrides: list[str], out: list,
         slot: int) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job
    from omegaconf import open_dict

    _LOCAL.rendezvous, _LOCAL.arrived = rv, False
    try:
        with _TURN:  # as Hydra's basic launcher does it, one job at a time
            with timeline.span("composing each job's config"):
                cfg = hydra_context.config_loader.load_sweep_config(config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
                cfg.hydra.job.num = idx
            HydraConfig.instance().set_config(cfg)
            out[slot] = run_job(hydra_context=hydra_context, task_function=task_function, config=cfg,
                                job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises or reports it
        out[slot] = exc
    finally:
        if not _LOCAL.arrived:
            rv.leave()
        _LOCAL.rendezvous = None
