"""Which folder a multirun writes to: a new one, or with resume=true the newest one launched with the same
overrides, so that re-running the same command continues it (finished trials skipped, others resumed)."""
from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import shlex
from pathlib import Path

from .. import stored

from ..redaction import redact_text

log = logging.getLogger(__name__)
_CHOSEN: dict[str, str] = {}
FOLDER_ENV = "SDXL_SWEEP_FOLDER"  # set by the launching process: jobs elsewhere (submitit, Slurm, Ray) read it


# hydra overrides that change how a sweep runs, not what it computes: a re-run with other values continues it
_RUN_ONLY = ("hydra.sweeper.n_jobs", "hydra/launcher", "hydra.launcher.", "hydra.verbose", "hydra.job_logging",
             "hydra/job_logging", "hydra.hydra_logging", "hydra/hydra_logging")


def sweep_folder(resume: bool, sweeps_root: str, overrides: list[str], hydra_overrides: list[str] = ()) -> str:
    """Decided once per process, at the first resolution (the sweep's, with the sweep's own overrides); the
    per-job configs Hydra composes later (with per-job overrides) get the same answer."""
    if "name" not in _CHOSEN and os.environ.get(FOLDER_ENV):  # a job of a sweep launched elsewhere
        _CHOSEN["name"] = os.environ[FOLDER_ENV]
    if "name" not in _CHOSEN:
        prev = previous_sweep(Path(sweeps_root), overrides, hydra_overrides) if resume else None
        if prev:
            log.info("resume=true: continuing the sweep in %s", prev)
        _CHOSEN["name"] = prev.name if prev else dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        _CHOSEN["new"] = not prev
    return _CHOSEN["name"]


def claim_new_folder(folder: Path) -> Path:
    """A new sweep's folder, created now, atomically: its timestamp's name, or with a suffix (`_2`, `_3`, ...) when
    a sweep started in the same second has it already (both would write the same trial folders). The sweep's
    config follows (the resolver answers the new name). A resumed folder, or one chosen by the launching process,
    is the folder given."""
    if not _CHOSEN.pop("new", False) or _CHOSEN.get("name") != folder.name:
        return folder
    for n in itertools.count(1):
        mine = folder.with_name(folder.name if n == 1 else f"{folder.name}_{n}")
        try:
            mine.mkdir(parents=True)
        except FileExistsError:
            continue
        _CHOSEN["name"] = mine.name
        return mine
    raise AssertionError("unreachable")  # pragma: no cover


def use_folder(name: str) -> None:
    """In a job's own process: the sweep folder its launcher chose."""
    _CHOSEN["name"] = name


def export_folder(name: str) -> None:
    """In the launching process: the chosen folder for job processes that compose their config again (submitit
    pickles the sweep's config and composes each job's on the node; Slurm passes the environment on)."""
    os.environ[FOLDER_ENV] = name


def previous_sweep(sweeps_root: Path, overrides: list[str], hydra_overrides: list[str] = ()) -> Path | None:
    """The newest earlier sweep folder launched with the same overrides (resume and plan_only flags and how-to-run
    settings such as the number of parallel jobs aside). A folder where only a plan was written (plan_only=true)
    is not a sweep to continue."""
    want = _signature(overrides, hydra_overrides)
    if not sweeps_root.is_dir():
        return None
    for folder in sorted((p for p in sweeps_root.iterdir() if (p / "multirun.yaml").is_file()), reverse=True):
        o = stored.load(folder / "multirun.yaml").hydra.overrides
        if _signature(o.task, o.hydra) == want and not _plan_only(o.task):
            return folder
    return None


def _plan_only(task) -> bool:
    return any(str(o).lower() == "plan_only=true" for o in task)


def _signature(task, hydra) -> tuple:
    """The overrides as multirun.yaml keeps them: with their secrets hidden (callbacks.on_job_start)."""
    return (sorted(redact_text(str(o)) for o in task if not str(o).startswith(("resume=", "plan_only="))),
            sorted(redact_text(str(o)) for o in hydra if not str(o).startswith(_RUN_ONLY)))


def note_run_dir(folder: Path) -> None:
    """A single run's folder: its resume command names it (a single run's folder is new at every launch)."""
    _CHOSEN["run_dir"] = str(folder)


def resume_command(argv: list[str]) -> str:
    """The command that continues what this process was doing: the user's own, with resume=true (a multirun finds
    its folder again by its overrides, `previous_sweep`; a single run is told its folder)."""
    args = [a for a in argv if not a.lower().startswith(("resume=", "hydra.run.dir="))]
    if not any(a in ("-m", "--multirun") for a in args) and "run_dir" in _CHOSEN:
        args.append(f"hydra.run.dir={_CHOSEN['run_dir']}")
    return redact_text(" ".join(["python -m sweep", *map(shlex.quote, args), "resume=true"]))  # no secret shown
