"""Which folder a multirun writes to: a new one, or with resume=true the newest one launched with the same
overrides, so that re-running the same command continues it (finished trials skipped, others resumed)."""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)
_CHOSEN: dict[str, str] = {}


def sweep_folder(resume: bool, sweeps_root: str, overrides: list[str]) -> str:
    """Decided once per process, at the first resolution (the sweep's, with the sweep's own overrides); the
    per-job configs Hydra composes later (with per-job overrides) get the same answer."""
    if "name" not in _CHOSEN:
        prev = previous_sweep(Path(sweeps_root), overrides) if resume else None
        if prev:
            log.info("resume=true: continuing the sweep in %s", prev)
        _CHOSEN["name"] = prev.name if prev else dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return _CHOSEN["name"]


def previous_sweep(sweeps_root: Path, overrides: list[str]) -> Path | None:
    """The newest earlier sweep folder launched with the same overrides (resume flags aside)."""
    want = sorted(o for o in overrides if not o.startswith("resume="))
    if not sweeps_root.is_dir():
        return None
    for folder in sorted((p for p in sweeps_root.iterdir() if (p / "multirun.yaml").is_file()), reverse=True):
        task = OmegaConf.load(folder / "multirun.yaml").hydra.overrides.task
        if sorted(o for o in task if not o.startswith("resume=")) == want:
            return folder
    return None
