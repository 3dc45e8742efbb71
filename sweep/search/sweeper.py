"""The Optuna sweeper's work (Hydra finds the class in hydra_plugins/sdxl_lora_sweep; it delegates here).

Trials are launched as ordinary Hydra jobs with `optuna_trial=<number>`; the sweeper keeps each trial's heartbeat
while it runs. On the packing launcher (the default) the sweeper works in rounds: it asks the study for `n_jobs`
trials and launches them as one batch, whose trials train as one pack (sweep/launchers/packing.py); the next round
is asked when the pack has ended. On a launcher that runs each job in its own process (`processes`, Ray, Slurm),
each of `n_jobs` workers asks for a trial as soon as its previous one ends (no rounds). The job reports checkpoint
scores and tells the study how it ended; a job that died without telling is failed here. Re-running the same
command continues the study: finished trials are kept, trials a dead sweeper left running are failed and
re-queued (their re-run resumes from the trial folder's checkpoints), and the trial budget counts what is done."""
from __future__ import annotations

import logging
import threading
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainer import ConfigError

from .. import results
from ..redaction import redact
from .space import check_keys, override_value, parse_space, suggest
from .study import (SearchSettings, budget, check_settings, coordinates, make_pruner, make_sampler, open_storage,
                    open_study, pareto_rows, recover, worker_attrs)

log = logging.getLogger(__name__)


class OptunaSweep:
    def __init__(self, settings: SearchSettings):
        self.s = settings
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Any]:
        try:
            return self._sweep(arguments)
        except ConfigError as exc:  # every problem, before any trial starts
            log.error("%s", exc)
            raise SystemExit(2) from None

    def _sweep(self, arguments: list[str]) -> list[Any]:
        from optuna.trial import TrialState

        s, config = self.s, self.config
        space, fixed, url, storage, study = prepare(s, config, arguments)
        name = study.study_name
        study.sampler = make_sampler(s, space, seed_offset=len(study.get_trials(deepcopy=False)))
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        if not (sweep_dir / "multirun.yaml").is_file():
            OmegaConf.save(config, sweep_dir / "multirun.yaml")
        recover(study, storage)
        done, waiting = budget(study, s.n_trials)
        log.info("Optuna study %r in %s: %d of %d trials done or running, %d to re-run; search space %s", name,
                 redact("storage", url), done, s.n_trials, waiting, {k: repr(d) for k, d in space.items()})
        returns: list[Any] = []
        impl = getattr(self.launcher, "impl", self.launcher)
        if hasattr(impl, "launch_jobs"):  # the packing launcher: rounds of n_jobs trials, each round one pack
            self._rounds(study, storage, space, fixed, impl, returns)
        else:
            lock = threading.Lock()
            workers = [threading.Thread(target=self._worker, args=(study, storage, space, fixed, lock, returns),
                                        name=f"optuna-worker-{i}") for i in range(s.n_jobs)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        states = [t.state for t in study.get_trials(deepcopy=False)]
        counts = {st.name.lower(): states.count(st) for st in TrialState if states.count(st)}
        rows = pareto_rows(study)
        results.write_json(sweep_dir / "report" / "optuna_study.json",
                          {"study": name, "storage": redact("storage", url), "counts": counts,
                           "objectives": list(s.objectives), "directions": list(s.directions),
                           "pareto_front" if s.multi_objective else "best": rows,
                           "trials": [_trial_row(t) for t in study.get_trials(deepcopy=False)]})
        log.info("Optuna study %r: %s", name, counts)
        if counts.get("running"):
            log.info("other workers are still running trials of this study: the report below covers what is done; "
                     "the last worker to finish reports (and registers) again")
        for r in rows:
            log.info("%s trial %s: %s", "Pareto front:" if s.multi_objective else "best:", r["trial"], r)
        return returns

    def _worker(self, study, storage, space, fixed, lock, returns) -> None:
        """One of n_jobs workers: a trial at a time, each launched as soon as the worker's previous one ends."""
        while True:
            with lock:  # one ask at a time, so the budget check and the new trial agree
                asked = self._ask(study, storage, space, fixed)
            if asked is None:
                return
            tid, idx, overrides = asked
            with _Heartbeat(storage, tid, self.s.heartbeat_interval):
                try:
                    [ret] = self.launcher.launch([overrides], initial_job_idx=idx)
                except BaseException as exc:  # the launcher itself failed: the trial must not stay RUNNING
                    _fail(storage, tid, f"launch failed: {type(exc).__name__}: {exc}")
                    raise
            _settle(storage, tid, ret)
            with lock:
                returns.append(ret)

    def _rounds(self, study, storage, space, fixed, launcher, returns) -> None:
        """n_jobs trials asked at once and launched as one batch of the packing launcher (one pack where they are
        compatible); the next round when all of them have ended."""
        while True:
            asked = []
            while len(asked) < self.s.n_jobs and (one := self._ask(study, storage, space, fixed)) is not None:
                asked.append(one)
            if not asked:
                return
            with ExitStack() as beats:
                for tid, _, _ in asked:
                    beats.enter_context(_Heartbeat(storage, tid, self.s.heartbeat_interval))
                try:
                    rets = launcher.launch_jobs([(idx, overrides) for _, idx, overrides in asked])
                except BaseException as exc:  # the launcher itself failed: no trial of the round stays RUNNING
                    for tid, _, _ in asked:
                        _fail(storage, tid, f"launch failed: {type(exc).__name__}: {exc}")
                    raise
            for (tid, _, _), ret in zip(asked, rets):
                _settle(storage, tid, ret)
                returns.append(ret)

    def _ask(self, study, storage, space, fixed) -> tuple[int, int, list[str]] | None:
        """The next trial while the budget is open: its storage id, its job index (a re-run of a trial that died
        uses the dead trial's folder and MLflow run, so it resumes from its checkpoints) and its overrides."""
        counted, waiting = budget(study, self.s.n_trials)
        if not waiting and counted >= self.s.n_trials:
            return None
        with warnings.catch_warnings():  # we keep the heartbeat ourselves (_Heartbeat), not Study.optimize
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        for k, v in worker_attrs().items():
            trial.set_user_attr(k, v)
        params = suggest(trial, space)
        tid = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                              trial.number)
        origin = storage.get_trial(tid).system_attrs.get("failed_trial")
        idx = trial.number if origin is None else int(origin)
        return tid, idx, fixed + [f"{k}={override_value(v)}" for k, v in params.items()] + \
            [f"optuna_trial={trial.number}"]


def prepare(s: SearchSettings, config: DictConfig, arguments: list[str]):
    """Everything checked and opened before a trial runs: the search space against the config, the settings,
    the storage, the study (created, or continued if it matches). The sweep's callback runs it before the MLflow
    parent run exists, so that bad input leaves nothing behind; the sweeper runs it again to get the study."""
    space, fixed = parse_space(s.params, [str(a) for a in arguments])
    check_keys(space, config)
    check_settings(s, space)
    if s.n_jobs > 1 and str(config.hydra.launcher.get("_target_", "")).endswith("BasicLauncher"):
        raise ConfigError([f"hydra.sweeper.n_jobs={s.n_jobs} runs trials side by side, which Hydra's basic launcher "
                           "cannot: drop hydra/launcher=basic (the default launcher trains each round of n_jobs "
                           "trials as one pack) or use n_jobs=1"])
    if OmegaConf.select(config, "plan_only", default=False):
        raise ConfigError(["plan_only=true prints the plan of a grid sweep; an Optuna search picks its trials as it "
                           "goes, so there is none to print: drop plan_only (each round of hydra.sweeper.n_jobs "
                           "trials trains as one pack)"])
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    root = Path(str(config.paths.root)).expanduser().resolve()
    url, name = coordinates(s, sweep_dir, root)
    storage = open_storage(url, s)
    study = open_study(storage, name, s, space, pruner=make_pruner(s))
    study.set_user_attr("sweep_dir", str(sweep_dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return space, fixed, url, storage, study


def _settle(storage, tid: int, ret) -> None:
    """A job that ended without telling the study how its trial went (it died, or failed outside training)
    fails its trial."""
    from hydra.core.utils import JobStatus
    from optuna.trial import TrialState

    if storage.get_trial(tid).state == TrialState.RUNNING:
        why = f"{ret._return_value!r}" if ret.status == JobStatus.FAILED else "the job did not report"
        _fail(storage, tid, why)


def _fail(storage, tid: int, reason: str) -> None:
    from optuna.trial import TrialState

    try:
        storage.set_trial_user_attr(tid, "fail_reason", reason[:500])
        storage.set_trial_state_values(tid, TrialState.FAIL)
    except Exception as exc:  # finished meanwhile (told by another process): nothing to fail
        log.debug("trial %s not failed: %s", tid, exc)


def _trial_row(t) -> dict[str, Any]:
    return {"number": t.number, "state": t.state.name, "params": t.params, "values": t.values,
            "intermediate": {int(k): v for k, v in t.intermediate_values.items()},
            "best_step": t.user_attrs.get("best_step"), "pruned_step": t.user_attrs.get("pruned_step"),
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "fail_reason": t.user_attrs.get("fail_reason")}


class _Heartbeat:
    """Records the trial's heartbeat while its job runs (a sweeper that dies stops it: the trial goes stale)."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{trial_id}")

    def _run(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # the storage may be briefly unreachable; the next beat retries
                log.warning("heartbeat of trial %s failed: %s", self.trial_id, exc)
            if self.stop.wait(self.interval):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
