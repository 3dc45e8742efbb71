"""Hydra callbacks: the MLflow parent run before the first trial, selection/registry/report after the last."""
from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from trainer import UserError, instance_photos

from .config import resolve_path, typed_job
from .finalize import finalize_folder
from .launchers import check_launcher
from .launchers.resume import export_folder
from .search import SearchSettings
from .search.sweeper import prepare
from .tracking import PENDING_FILE, git_commit, make_tracker

log = logging.getLogger(__name__)


def _sweeps_data(overrides: list[str]) -> bool:
    """Whether the sweep varies a `data.*` key (then each trial checks its own photos and resolution)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return any(o.is_sweep_override() and o.key_or_group.lstrip("+~").startswith("data") for o in parsed)


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
        log.error("%s is in use by another sweep (pid %s): wait for it to end, or start a new sweep (without "
                  "resume=true)", folder, holder)
        raise SystemExit(2) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD.append(f)


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            conf = typed_job(config)
            if not _sweeps_data(list(config.hydra.overrides.task)):  # every trial trains on these photos: a
                instance_photos(conf.data)  # missing or unusable folder refuses the sweep, not each trial
            check_launcher(config)
            if str(config.hydra.sweeper.get("_target_", "")).endswith("OptunaSweeper"):
                prepare(SearchSettings.from_config(config.hydra.sweeper), config, list(config.hydra.overrides.task))
            if conf.plan_only:  # the launcher prints the plan; nothing is trained, tracked or held
                return
            tracker = make_tracker(conf.tracking, resolve_path(conf.paths, "."))
            tracker.check()  # a tracking server that does not answer: refused now, not after hours of training
        except UserError as exc:  # refuse the whole sweep before any trial starts (and before its MLflow run)
            log.error("%s", exc)
            raise SystemExit(2) from None
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        export_folder(sweep_dir.name)
        if not str(config.hydra.sweeper.get("_target_", "")).endswith("OptunaSweeper"):  # Optuna workers share
            hold_folder(sweep_dir)  # a folder on purpose (their study coordinates them); a grid must not
        tracker.start_sweep(sweep_dir, sweep_dir.name,
                            {"overrides": " ".join(config.hydra.overrides.task)[:4000], "git_commit": git_commit()})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "plan_only", default=False):
            return
        sel, failed = finalize_folder(Path(config.hydra.sweep.dir))
        if sel is None:  # not one trial got as far as writing its result
            log.error("no trial finished: see the errors above")
            raise SystemExit(1)
        if (Path(config.hydra.sweep.dir) / PENDING_FILE).is_file():  # trained, but MLflow has not heard it all
            raise SystemExit(1)
        if failed:  # the sweep finished, but the exit status must not hide failed trials
            log.error("%d trial(s) failed; see the report and the FAILED runs in MLflow", failed)
            raise SystemExit(1)

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
        finalize_folder(Path(out))

