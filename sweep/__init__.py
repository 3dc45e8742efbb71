"""Sweeps of SDXL DreamBooth-LoRA fine-tunes: Hydra entry point, trial orchestration (tracking, selection: later)."""
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_DIR / "conf"


def _project_dir() -> str:
    return str(PROJECT_DIR)


def _sweep_folder(resume, sweeps_root, overrides, hydra_overrides=(), sweeper="") -> str:
    from .resume import sweep_folder

    # an Optuna study continues when the same command runs again: its folder does too
    resume = bool(resume) or str(sweeper).endswith("OptunaSweeper")
    return sweep_folder(resume, str(sweeps_root), [str(o) for o in overrides], [str(o) for o in hydra_overrides])


def register_resolvers() -> None:
    """${project_dir:} in YAML: where the bundled assets live, whatever the working directory.
    ${sweep_folder:...} in hydra.sweep.dir: a new timestamp, or with resume=true (always, for Optuna) the folder of
    the newest sweep launched with the same overrides."""
    for name, fn in (("project_dir", _project_dir), ("sweep_folder", _sweep_folder)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
