"""The Optuna sweeper's work (Hydra finds the class in hydra_plugins/sdxl_lora_sweep; it delegates here).

Each of `n_jobs` workers asks the study for a trial as soon as its previous one ends (no batches), launches
it as an ordinary Hydra job with `optuna_trial=<number>` and keeps the trial's heartbeat while it runs. The
job reports checkpoint scores and tells the study how it ended; a job that died without telling is failed
here. Re-running the same command continues the study: finished trials are kept, trials a dead sweeper left
running are failed and re-queued (their re-run resumes from the trial folder's checkpoints), and the trial
budget counts what is done."""
from __future__ import annotations

import logging
import threading
import warnings
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
        lock = threading.Lock()
        returns: list[Any] = []
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
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        sid = storage.get_study_id_from_name(study.study_name)
        while True:
            with lock:  # one ask at a time, so the budget check and the new trial agree
                counted, waiting = budget(study, self.s.n_trials)
                if not waiting and counted >= self.s.n_trials:
                    return
                with warnings.catch_warnings():  # we keep the heartbeat ourselves (_Heartbeat), not Study.optimize
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    trial = study.ask()
                for k, v in worker_attrs().items():
                    trial.set_user_attr(k, v)
                params = suggest(trial, space)
            tid = storage.get_trial_id_from_study_id_trial_number(sid, trial.number)
            origin = storage.get_trial(tid).system_attrs.get("failed_trial")
            # a re-run of a trial that died uses its folder (and MLflow run), so it resumes from its checkpoints
            idx = trial.number if origin is None else int(origin)
            overrides = fixed + [f"{k}={override_value(v)}" for k, v in params.items()] + \
                [f"optuna_trial={trial.number}"]
            with _Heartbeat(storage, tid, self.s.heartbeat_interval):
                try:
                    [ret] = self.launcher.launch([overrides], initial_job_idx=idx)
                except BaseException as exc:  # the launcher itself failed: the trial must not stay RUNNING
                    _fail(storage, tid, f"launch failed: {type(exc).__name__}: {exc}")
                    raise
            if storage.get_trial(tid).state == TrialState.RUNNING:  # the job ended without telling the study
                why = f"{ret._return_value!r}" if ret.status == JobStatus.FAILED else "the job did not report"
                _fail(storage, tid, why)
            with lock:
                returns.append(ret)


def prepare(s: SearchSettings, config: DictConfig, arguments: list[str]):
    """Everything checked and opened before a trial runs: the search space against the config, the settings,
    the storage, the study (created, or continued if it matches). The sweep's callback runs it before the MLflow
    parent run exists, so that bad input leaves nothing behind; the sweeper runs it again to get the study."""
    space, fixed = parse_space(s.params, [str(a) for a in arguments])
    check_keys(space, config)
    check_settings(s, space)
    if s.n_jobs > 1 and str(config.hydra.launcher.get("_target_", "")).endswith(("BasicLauncher", "PackingLauncher")):
        raise ConfigError([f"hydra.sweeper.n_jobs={s.n_jobs} runs trials side by side, which needs each in its own "
                           "process: add hydra/launcher=processes (or use n_jobs=1)"])
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    root = Path(str(config.paths.root)).expanduser().resolve()
    url, name = coordinates(s, sweep_dir, root)
    storage = open_storage(url, s)
    study = open_study(storage, name, s, space, pruner=make_pruner(s))
    study.set_user_attr("sweep_dir", str(sweep_dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return space, fixed, url, storage, study


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
