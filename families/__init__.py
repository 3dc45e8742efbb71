"""Model families: everything that differs between SDXL, FLUX.1 and the next base model, behind one interface
(families/base.py), one module per family. trainer/, evaluation/ and sweep/ ask `get(cfg.model.family)` for it and
never branch on the family themselves.

Adding a family: one module here with one `Family` subclass, one line in `FAMILIES`, one conf/model/*.yaml with
`family: <name>` (docs/families.md). A family's module is imported on first use only: naming the known families
(config validation, a misspelt key refused before anything loads) costs no torch or diffusers import."""
from __future__ import annotations

import importlib

from common.errors import ConfigError

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


__all__ = ["Base", "DEFAULT", "EvalDefaults", "FAMILIES", "Family", "Noised", "get", "names", "unknown_family"]
