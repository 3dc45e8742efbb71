"""The root config schema. Hydra composes YAML from conf/; `to_typed` checks it against these dataclasses once,
at the edge, and everything past it works with typed objects."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from evaluation import EvalConfig, validate_eval
from trainer import ConfigError, DataConfig, LoraSettings, ModelConfig, TrainConfig, validate

from .cli import did_you_mean, flat_keys
from .offline_models import build_clip
from .selection import SelectionConfig, config_problems
from .stored import literal


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: sqlite:///<paths.root>/mlruns/mlflow.db, artifacts in <paths.root>/mlruns/artifacts
    experiment: str = "sdxl-lora-sweep"
    registered_model: str | None = None  # None: one model per subject, sdxl-lora-<token>-<class> (tracking/registry.py)
    system_metrics: bool = True
    copy_weights: bool = False  # each checkpoint's LoggedModel holds a copy of its LoRA (else its path and sha256)


@dataclass
class PathsConfig:
    root: str = "."
    output_dir: str = "outputs"
    cache_dir: str = ".cache/sdxl-lora-sweep"


BUDGETS = ("auto", "race", "full")


@dataclass
class EvalSection(EvalConfig):
    """Evaluation as configured: evaluation's own settings plus how the sweep provides them."""

    enabled: bool = True
    clip_architecture: Optional[Dict[str, Any]] = None  # build a random-weight CLIP instead of loading clip_model
    # race: checkpoints get one seed per prompt as they are written, the sweep's end gives more only to those that
    # can still win (sweep/racing.py); full: every seed for every checkpoint; auto: race in a multirun
    budget: str = "auto"
    race_alpha: float = 0.05  # racing drops the best checkpoint with probability at most this

    def settings(self, clip_model: str) -> EvalConfig:
        names = EvalConfig.__dataclass_fields__
        return EvalConfig(**{**{k: getattr(self, k) for k in names}, "clip_model": clip_model})

    def races(self, multirun: bool) -> bool:
        """Whether checkpoints are raced: eval.budget=race, or auto in a multirun; never with one seed (nothing to
        save) nor with a refiner (its checkpoints are scored after training, all seeds at once)."""
        wanted = self.budget == "race" or (self.budget == "auto" and multirun)
        return self.enabled and wanted and len(self.seeds) > 1 and not self.refiner


@dataclass
class SweepConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # shorthands, as users type them: `lr=1e-4`, `steps=500`, `rank=8` (train.lr etc. follow them)
    lr: float = 1e-4
    steps: int = 500
    rank: int = 4
    progress: bool = True
    resume: bool = False  # multirun: continue the newest sweep launched with the same overrides
    plan_only: bool = False  # print the plan (trainings, packs, estimated time; sweep/plan.py) and train nothing
    optuna_trial: Optional[int] = None  # set by the Optuna sweeper: the trial this job reports to


MISSING_HINTS = {"data.instance_dir": "the folder of your photos, e.g. data.instance_dir=$HOME/photos/me"}


def typed_job(config: DictConfig, values: bool = True) -> SweepConfig:
    """A composed job (or sweep) config, hydra section left out unresolved (it may point at runtime values such
    as hydra.job.num), as a SweepConfig; `values=False`: its keys and types checked only (see to_typed)."""
    cfg = OmegaConf.to_container(config, resolve=False)
    cfg.pop("hydra", None)
    return to_typed(OmegaConf.create(cfg)) if values else schema_typed(OmegaConf.create(cfg))


def to_typed(cfg: DictConfig) -> SweepConfig:
    """Hydra's DictConfig -> SweepConfig. Wrong types and unknown keys become a ConfigError naming the key (the
    first one only: OmegaConf stops there); then every bad value at once."""
    typed = schema_typed(cfg)
    problems = validate(typed.model, typed.data, typed.lora, typed.train)
    if typed.eval.enabled:
        problems += validate_eval(typed.eval)
        if typed.eval.budget not in BUDGETS:
            problems.append(f"eval.budget={typed.eval.budget!r} is not one of {BUDGETS}")
        if not 0.0 < typed.eval.race_alpha < 1.0:
            problems.append(f"eval.race_alpha={typed.eval.race_alpha} must be between 0 and 1 (e.g. 0.05)")
        if not (typed.eval.clip_model or typed.eval.clip_architecture):
            problems.append("eval.clip_model is empty: a hub id or folder, e.g. openai/clip-vit-large-patch14")
    problems += config_problems(typed.selection)  # the rule, its objective, its weights' metric names
    if problems:
        raise ConfigError(problems)
    return typed


def schema_typed(cfg: DictConfig) -> SweepConfig:
    """The config's keys and types checked against the schema, not yet its values' ranges and rules: what a value
    is worth on its own, whatever the other keys are (sweep/checks.py checks each swept value so). Resolved once:
    a value that still holds `${` after resolving (a stored folder's text, an escaped `\\${`) stays that text."""
    data = _as_text(OmegaConf.to_container(cfg, resolve=True))
    data.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), data)
        typed = OmegaConf.to_object(merged)
    except MissingMandatoryValue as exc:  # a `???` in the YAML: the user must give it
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError([f"{key} is not set: {MISSING_HINTS.get(key, f'give it on the command line, {key}=...')}"]) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError([_type_problem(key, msg) or
                           f"{key}: {msg}{_close_matches(key)} (check the spelling and type of this override)"]) from None
    return typed


def _as_text(node: Any) -> Any:
    """Resolved values made literal for the schema's merge, which would read a `${` in them as an interpolation again
    (and resolve `${oc.env:...}` from a folder's stored prompt)."""
    if isinstance(node, dict):
        return {k: _as_text(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_as_text(v) for v in node]
    return literal(node) if isinstance(node, str) and "${" in node else node


def evaluation_settings(conf: SweepConfig) -> EvalConfig:
    """What evaluation is given: the eval section with its CLIP resolved (a hub id or folder, or the random-weight
    CLIP built from clip_architecture into the cache)."""
    clip = conf.eval.clip_model
    if conf.eval.clip_architecture:
        clip = build_clip(conf.eval.clip_architecture, resolve_path(conf.paths, conf.paths.cache_dir))
    return conf.eval.settings(clip)


def _close_matches(key: str) -> str:
    """', did you mean train.lr?' for a misspelt key: the schema's keys spelt alike, or the key another trainer's
    name stands for (learning_rate -> lr)."""
    keys = flat_keys(OmegaConf.structured(SweepConfig))
    if key in keys or "[" in key:
        return ""
    close = did_you_mean(key, keys)
    return f"; did you mean {' or '.join(close)}?" if close else ""


_KINDS = {"Float": "a number", "Integer": "a whole number"}


def _type_problem(key: str, msg: str) -> str | None:
    """"lr='fast' is not a number: give one, e.g. lr=0.0001" for OmegaConf's "Value 'fast' of type 'str' could not
    be converted to Float" (the example is the schema's default)."""
    m = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", msg)
    if not m or m.group(2) not in _KINDS:
        return None
    default = OmegaConf.select(OmegaConf.structured(SweepConfig), key, default=None)
    example = f", e.g. {key}={default}" if isinstance(default, (int, float)) and not isinstance(default, bool) else ""
    return f"{key}={m.group(1)!r} is not {_KINDS[m.group(2)]}: give one{example}"


def resolve_path(paths: PathsConfig, p: str) -> Path:
    """`p` as an absolute path: relative paths are relative to `paths.root` (itself relative to the cwd)."""
    q = Path(p).expanduser()
    return q if q.is_absolute() else (Path(paths.root).expanduser() / q).resolve()


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
