"""Model families: everything that differs between SDXL, FLUX.1 and the next base model, behind one interface
(families/base.py), one module per family. trainer/, evaluation/ and sweep/ ask `get(cfg.model.family)` for it and
never branch on the family themselves.

Adding a family: one module here with one `Family` subclass, one line in `FAMILIES`, one conf/model/*.yaml with
`family: <name>` (docs/families.md). A family's module is imported on first use only: naming the known families
(config validation, a misspelt key refused before anything loads) costs no diffusers import."""
from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.errors import ConfigError, ModelSourceError

from .base import Base, EvalDefaults, Family, Noised

# name (model.family) -> "module:class"; imported on first use
FAMILIES: dict[str, str] = {
    "sdxl": "families.sdxl:SDXL",
    "flux": "families.flux:Flux",
}
DEFAULT = "sdxl"
_INSTANCES: dict[str, Family] = {}


def names() -> list[str]:
    """The known families, sorted (what an error lists)."""
    return sorted(FAMILIES)


def unknown_family(name: object) -> str:
    """The message for a model.family nobody registered: the value and the known ones."""
    return (f"model.family={name!r} is not a known model family; use one of {', '.join(names())} "
            "(docs/families.md says how to add one)")


def get(name: str) -> Family:
    """The family called `name` (model.family), one instance per process. Raises ConfigError naming the value and
    the known families."""
    if name not in FAMILIES:
        raise ConfigError([unknown_family(name)])
    if name not in _INSTANCES:
        module, _, cls = FAMILIES[name].partition(":")
        _INSTANCES[name] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[name]


def every() -> list[Family]:
    """Every known family (their modules imported): for what only the families can recognise."""
    return [get(name) for name in names()]


def of_pipeline(pipe: Any) -> Family:
    """The family whose pipeline class `pipe` is (what evaluation asks of a pipeline it was handed)."""
    cls = type(pipe).__name__
    for family in every():
        if cls in family.pipeline_classes:
            return family
    raise TypeError(f"{cls} is no pipeline of a known model family ({', '.join(names())})")


def denoiser_of(pipe: Any):
    """The pipeline's trained module (its family's denoiser_part: pipe.unet, pipe.transformer)."""
    return getattr(pipe, of_pipeline(pipe).denoiser_part)


def for_source(pretrained: str) -> Family:
    """The family of the pipeline saved at `pretrained` (a folder or hub id), by its model_index.json's class
    name. Raises OSError when it cannot be read (no such folder, not in the hub's cache offline), ModelSourceError
    for a pipeline no family serves."""
    index = Path(pretrained) / "model_index.json"
    if index.is_file():
        cls = json.loads(index.read_text()).get("_class_name")
    else:
        from diffusers import DiffusionPipeline

        cls = DiffusionPipeline.load_config(pretrained).get("_class_name")
    for family in every():
        if cls in family.pipeline_classes:
            return family
    raise ModelSourceError(f"{pretrained!r} holds a {cls}, which no model family serves (known: "
                           + ", ".join(f"{f.name}: {'/'.join(f.pipeline_classes)}" for f in every()) + ")")


def for_parts(parts: Iterable[str]) -> Family:
    """The family a LoRA file's parts (its keys' first names: unet, transformer, ...) belong to; the default
    family when none says (a file without part names)."""
    parts = set(parts)
    for family in every():
        if family.denoiser_part in parts:
            return family
    return get(DEFAULT)


__all__ = ["DEFAULT", "FAMILIES", "Base", "EvalDefaults", "Family", "Noised", "denoiser_of", "every", "for_parts",
           "for_source", "get", "names", "of_pipeline", "unknown_family"]
