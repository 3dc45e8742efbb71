"""Loading the base model (hub id, local folder, or an architecture built with random weights) once per process,
through its family (families/: model.family)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

import families
from common import timeline
from common.device import resolve_device
from common.errors import DeviceError
from families import Base

from .config import ModelConfig, stable_hash

log = logging.getLogger(__name__)

_LOADED: dict[str, Base] = {}
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"  # in folders built from config; evaluation notes that their scores mean nothing
BaseModel = Base  # the frozen base a trial trains on, as its family loaded it (families/base.py)


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if requested == "fp16" and device.type != "cuda":
        raise DeviceError("train.mixed_precision=fp16 needs a CUDA GPU; use mixed_precision=no on CPU")
    return requested


def weight_dtype_for(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def resolve_source(cfg: ModelConfig, cache_dir: Path) -> str:
    """A local folder holding the pipeline, or a hub id already in the local cache or reachable.

    Raises ModelSourceError before anything heavy is loaded."""
    if cfg.architecture:
        return str(build_from_architecture(cfg, cache_dir))
    return check_source(cfg)


def check_source(cfg: ModelConfig) -> str:
    """model.pretrained as from_pretrained will read it, checked by its family without loading or downloading
    weights (a sweep checks its base model with this before anything of it exists); "" for a model built from
    model.architecture. Raises ModelSourceError naming the fix."""
    return families.get(cfg.family).check_source(cfg)


def build_from_architecture(cfg: ModelConfig, cache_dir: Path) -> Path:
    """Build the family's pipeline with random weights from `cfg.architecture`, save it once, return the folder.

    The saved folder is then loaded through from_pretrained like a downloaded model."""
    arch = cfg.architecture or {}
    out = Path(cache_dir) / "models" / f"{cfg.name}-{stable_hash(arch)}-{cfg.build_dtype}"
    if (out / "model_index.json").is_file():
        return out
    log.info("building %s with random weights into %s", cfg.name, out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else _mk(out.parent)))
    families.get(cfg.family).build(cfg, tmp)
    (tmp / RANDOM_WEIGHTS_MARKER).write_text("built from config with random weights: its images are noise\n")
    publish(tmp, out)
    return out


def publish(tmp: Path, out: Path) -> None:
    """Rename a finished folder into place: a half-written one is never picked up. If another process (a
    parallel trial) published the same folder first, ours is dropped: both hold the same content."""
    try:
        os.replace(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def load_base_model(cfg: ModelConfig, device: torch.device, weight_dtype: torch.dtype, cache_dir: Path) -> Base:
    """Load (or reuse, within this process) the frozen base. Same config, device and dtype: same objects."""
    source = resolve_source(cfg, cache_dir)
    key = stable_hash({"model": cfg.identity(), "device": str(device), "dtype": str(weight_dtype)})
    if key in _LOADED:
        return _LOADED[key]
    _LOADED.clear()  # one base at a time: a different model replaces the old one instead of doubling memory
    log.info("loading base model from %s", source)
    fingerprint = stable_hash(cfg.identity())  # keys every cache derived from this model
    with timeline.span("loading the base model"):
        base = families.get(cfg.family).load(cfg, source, device, weight_dtype, fingerprint)
    _LOADED[key] = base
    return base


def shared_pipeline(cfg: ModelConfig, device_name: str, precision: str, cache_dir: Path):
    """A pipeline over the base the trainer holds (loaded once per process), for generating with checkpoints."""
    device = resolve_device(device_name)
    base = load_base_model(cfg, device, weight_dtype_for(resolve_precision(precision, device)), cache_dir)
    return base.pipeline()


def release_models() -> None:
    """Forget the loaded base (between sweeps, or before loading another model) and free its memory."""
    from diffusers.training_utils import free_memory

    _LOADED.clear()
    free_memory()
