"""Hydra callbacks: the MLflow parent run before the first trial, selection/registry/report after the last."""
from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from common import timeline
from trainer import UserError

from .checks import check_sweep
from .config import resolve_path, typed_job
from .finalize import finalize_folder
from .launchers import check_launcher
from .launchers.resume import claim_new_folder, export_folder
from .phases import process_started
from .redaction import redact_logs
from .results import HYDRA_FILES, hide_secrets_in, read_sweep, stored_configs
from .search import SearchSettings
from .search.sweeper import prepare
from .tracking import PENDING_FILE, git_commit, make_tracker

log = logging.getLogger(__name__)


def end_failed(config: DictConfig, sweep_dir: Path, reason: str) -> None:
    """The sweep's parent run ended FAILED with `reason` (tag failure_reason), the reason said last, exit 1."""
    sweep = read_sweep(sweep_dir) or {}
    if sweep.get("parent_run_id"):
        try:
            conf = typed_job(config)
            # this command's own URI first: the recorded one has its password hidden
            tracking = replace(conf.tracking, uri=conf.tracking.uri or sweep.get("tracking_uri"))
            tracker = make_tracker(tracking, resolve_path(conf.paths, "."))
            tracker.set_tags(sweep["parent_run_id"], {"failure_reason": reason[:4000]})
            tracker.end_sweep(sweep["parent_run_id"], "FAILED")
        except Exception as exc:  # the reason is still said; the run stays as it was
            log.warning("could not mark the sweep's MLflow run %s FAILED: %s", sweep["parent_run_id"], exc)
    log.error("%s", reason)
    raise SystemExit(1)


_HELD: list = []  # lock files held for the life of this process


def hold_folder(folder: Path) -> None:
    """Refuse a second sweep in a folder a running one holds (e.g. two `resume=true` launches of one command):
    both would train the same trials into the same files. The lock goes with the process, even when killed."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        log.error("%s is in use by another sweep (pid %s), still running: wait for it to end, or start a new "
                  "sweep (without resume=true, or with another hydra.sweep.dir)", folder, holder)
        raise SystemExit(2) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD.append(f)


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        optuna = str(config.hydra.sweeper.get("_target_", "")).endswith("OptunaSweeper")
        try:
            # every job's config, every value of every swept key, the photos and the base model: all at once
            with timeline.span("starting up: checking the sweep"):
                conf = check_sweep(config, GlobalHydra.instance().config_loader(), optuna)
            check_launcher(config)
            if optuna:
                prepare(SearchSettings.from_config(config.hydra.sweeper), config, list(config.hydra.overrides.task))
            if conf.plan_only:  # the launcher prints the plan; nothing is trained, tracked or held
                return
            with timeline.span("starting up: MLflow"):
                tracker = make_tracker(conf.tracking, resolve_path(conf.paths, "."))
                tracker.check()  # a tracking server that does not answer: refused now, not after hours of training
        except UserError as exc:  # refuse the whole sweep before any trial starts (and before its MLflow run)
            log.error("%s\nthe sweep was refused before it started (nothing trained, no MLflow run): fix the above "
                      "and run the command again", exc)
            raise SystemExit(2) from None
        except Exception:  # a bug: Hydra would only warn, and run the sweep unchecked and untracked
            log.exception("the sweep could not start")
            raise SystemExit(1) from None
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        if not optuna:  # Optuna workers share a folder on purpose (their study coordinates them); a grid must not
            sweep_dir = claim_new_folder(sweep_dir)  # two sweeps started in the same second: two folders
            hold_folder(sweep_dir)
        export_folder(sweep_dir.name)
        try:
            with timeline.span("starting up: MLflow"):
                tracker.start_sweep(sweep_dir, sweep_dir.name, {"overrides": " ".join(config.hydra.overrides.task)[:4000],
                                                                "git_commit": git_commit()})
        except UserError as exc:  # the server refused this user the experiment (AccessDenied): nothing trained yet
            log.error("%s\nthe sweep was refused before it started (nothing trained)", exc)
            raise SystemExit(2) from None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Hydra has just saved this job's config (.hydra/*.yaml) and the sweep's (multirun.yaml) with the values as
        typed: their secrets are hidden before the job runs. MLflow's handler hides them in its lines too."""
        redact_logs("mlflow")
        out = Path(config.hydra.runtime.output_dir)
        hide_secrets_in([p for p in (out.parent / "multirun.yaml", *(out / ".hydra" / n for n in HYDRA_FILES))
                         if p.is_file()])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Selection, registry, report. Hydra only warns about an exception here (the sweep would exit 0 with its
        parent run RUNNING): a failure ends the parent run FAILED and the process with status 1, its reason last."""
        sweep_dir = Path(config.hydra.sweep.dir)
        hide_secrets_in(stored_configs(sweep_dir))  # a plan_only sweep's multirun.yaml; a job lost before its start
        if OmegaConf.select(config, "plan_only", default=False):
            return
        try:
            # this command's tracking settings: the stored configs hold the URI with its password hidden
            sel, failed = finalize_folder(sweep_dir, tracking=typed_job(config).tracking,
                                          start=process_started())
        except Exception as exc:
            if not isinstance(exc, UserError):  # a bug: its traceback, for the issue a user may file
                log.error("the sweep's end failed", exc_info=True)
            why = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            end_failed(config, sweep_dir, f"the sweep's end (selection, registration, report) failed: {why}. "
                       "Its trials are kept: run the same command with resume=true to end it again")
        if sel is None:  # not one trial got as far as writing its result
            end_failed(config, sweep_dir, "no trial finished: see the errors above")
        if (sweep_dir / PENDING_FILE).is_file():  # trained, but MLflow has not heard it all
            raise SystemExit(1)
        if failed:  # the sweep finished, but the exit status must not hide failed trials
            log.error("%d trial(s) failed; see the report and the FAILED runs in MLflow", failed)
            raise SystemExit(1)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run: its config, photos and base model checked as a sweep's are, before its folder and MLflow
        run exist (Hydra creates the folder next)."""
        try:
            check_sweep(config, GlobalHydra.instance().config_loader(), optuna=False)
        except UserError as exc:
            log.error("%s", exc)
            raise SystemExit(2) from None

    def on_run_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        """A single run is its own sweep: select, report and end its MLflow parent run. Hydra has unset its
        HydraConfig by now; the run's folder is in the config it passes (run_job wrote hydra.runtime.output_dir)."""
        if OmegaConf.select(config, "plan_only", default=False):
            return
        out = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
        if out is None and job_return is not None:
            out = getattr(job_return, "working_dir", None)
        if out is None:
            log.error("no run folder in the config Hydra passed: nothing to report")
            return
        finalize_folder(Path(out), tracking=typed_job(config).tracking, start=process_started())

