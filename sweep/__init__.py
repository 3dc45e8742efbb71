"""Sweeps of SDXL DreamBooth-LoRA fine-tunes: the Hydra entry point, one trial per job, and the sweep's end (selection,
registry, report, export). Layers, each importing only from those below (checked by import-linter, pyproject.toml):
entry points (__main__, callbacks, generate, server, review, promote, the packages' __main__) > orchestrators (job,
finalize, checks) > services (tracking, search, launchers, report, export) > base (results | confidence > config >
selection > metrics, and logs, redaction, offline_models, cli, stored, markdown)."""
import hashlib
from pathlib import Path

from omegaconf import OmegaConf

from .launchers.resume import sweep_folder
from .logs import drop_known_notices
from .redaction import is_secret_key, redact_text

drop_known_notices()  # before anything imports transformers or mlflow

PROJECT_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_DIR / "conf"


def _project_dir() -> str:
    return str(PROJECT_DIR)


def _sweep_folder(resume, sweeps_root, overrides, hydra_overrides=(), sweeper="") -> str:
    # an Optuna study continues when the same command runs again: its folder does too
    resume = bool(resume) or str(sweeper).endswith("OptunaSweeper")
    return sweep_folder(resume, str(sweeps_root), [str(o) for o in overrides], [str(o) for o in hydra_overrides])


def _trial_dir(num, dirname="") -> str:
    """A trial folder's name, "<job number>_<overrides>", kept within file-system limits: past 120 characters the
    overrides are cut and a hash of the whole keeps names unique (.hydra/overrides.yaml has them all). A value
    holding a path separator cannot make it a path: the trial folder stays in the sweep folder. A secret is no
    part of a name: an override whose key names one is left out, a password in a URL hidden."""
    dirname = ",".join(redact_text(o) for o in str(dirname).split(",") if not is_secret_key(o.partition("=")[0]))
    name = f"{num}_{dirname}".replace("/", "%2F").replace("\\", "%5C")
    if len(name) <= 120:
        return name
    return f"{name[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def register_resolvers() -> None:
    """${project_dir:} in YAML: where the bundled assets live, whatever the working directory.
    ${sweep_folder:...} in hydra.sweep.dir: a new timestamp, or with resume=true (always, for Optuna) the folder of
    the newest sweep launched with the same overrides. ${trial_dir:...} in hydra.sweep.subdir: a trial folder's
    name, cut to a safe length."""
    for name, fn in (("project_dir", _project_dir), ("sweep_folder", _sweep_folder), ("trial_dir", _trial_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
