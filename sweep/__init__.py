"""Sweeps of SDXL DreamBooth-LoRA fine-tunes: Hydra entry point, trial orchestration (tracking, selection: later)."""
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_DIR / "conf"

# ${project_dir:} in YAML: where the bundled assets live, whatever the working directory
if not OmegaConf.has_resolver("project_dir"):
    OmegaConf.register_new_resolver("project_dir", lambda: str(PROJECT_DIR))


def _sweep_folder(resume, sweeps_root, overrides) -> str:
    from .resume import sweep_folder

    return sweep_folder(bool(resume), str(sweeps_root), [str(o) for o in overrides])


# ${sweep_folder:...} in hydra.sweep.dir: a new timestamp, or with resume=true the folder of the newest sweep
# launched with the same overrides
if not OmegaConf.has_resolver("sweep_folder"):
    OmegaConf.register_new_resolver("sweep_folder", _sweep_folder)
