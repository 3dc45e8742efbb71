"""Sweeps of SDXL DreamBooth-LoRA fine-tunes: Hydra entry point, trial orchestration (tracking, selection: later)."""
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_DIR / "conf"

# ${project_dir:} in YAML: where the bundled assets live, whatever the working directory
if not OmegaConf.has_resolver("project_dir"):
    OmegaConf.register_new_resolver("project_dir", lambda: str(PROJECT_DIR))
