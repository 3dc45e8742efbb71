"""A sweep folder's stored Hydra files (.hydra/config.yaml, overrides.yaml, hydra.yaml, multirun.yaml) read as data.

Hydra stores configs unresolved, so a value may still hold `${oc.env:AWS_SECRET_ACCESS_KEY}` or another resolver's
call: resolving it when the folder is opened (sweep.report, sweep.export, sweep.promote...) would run whatever the
folder's author wrote, with the reader's environment. Here every interpolation that is not a plain reference to
another key of the same file is made literal text: `${oc.env:X}` reads as the characters `${oc.env:X}`. Plain
references (`${lr}`, `${data.subject_token}`) still follow the file's own values, and `${project_dir:}` (the demo's
photos) is this installation's folder, written in as text: no resolver runs."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
from omegaconf.grammar_parser import parse

from common.errors import UserError

PROJECT_DIR = Path(__file__).resolve().parents[1]  # as sweep.PROJECT_DIR (${project_dir:} in conf/data/demo.yaml)
PROJECT_DIR_TOKEN = "${project_dir:}"
_KEY = r"[A-Za-z_][\w-]*"
PLAIN_REFERENCE = re.compile(rf"\$\{{{_KEY}(?:\.{_KEY}|\[\d+\])*\}}")  # ${a.b[0].c}: another key, nothing else


class StoredConfigError(UserError):
    """A stored value this reader cannot turn into literal text (the folder is refused, naming the key)."""


def load(path: Path) -> DictConfig | ListConfig:
    """The YAML file at `path` with every interpolation but plain references made literal text (module docstring)."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    keys = _keys(raw)
    return OmegaConf.create(_inert(raw, "", keys, Path(path)))


def _keys(node: Any, prefix: str = "") -> set[str]:
    """Every key path in the file ("data.subject_token", "eval.prompts[0]"), for telling a reference's target."""
    out: set[str] = set()
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(node, list) else f"{prefix}.{k}" if prefix else str(k)
        out |= {key, *_keys(v, key)}
    return out


def _inert(node: Any, key: str, keys: set[str], path: Path) -> Any:
    if isinstance(node, dict):
        return {k: _inert(v, f"{key}.{k}" if key else str(k), keys, path) for k, v in node.items()}
    if isinstance(node, list):
        return [_inert(v, f"{key}[{i}]", keys, path) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node
    found = _interpolations(node)
    if found is not None and all(_harmless(i, keys) for i in found):
        return re.sub(r"(?<!\\)" + re.escape(PROJECT_DIR_TOKEN), str(PROJECT_DIR), node)
    return literal(node, key, path)


def _harmless(interpolation: str, keys: set[str]) -> bool:
    """${project_dir:}, or a plain reference to a key of the same file (never a hydra.* one: config.yaml holds none,
    and Hydra's runtime values are not there to follow)."""
    if interpolation == PROJECT_DIR_TOKEN:
        return True
    return bool(PLAIN_REFERENCE.fullmatch(interpolation)) and interpolation[2:-1] in keys \
        and not interpolation.startswith("${hydra")


def literal(value: str, key: str = "?", path: Path | None = None) -> str:
    """`value` escaped so that OmegaConf reads it as exactly these characters: before each `${`, its run of k
    backslashes becomes 2k+1 (an escaped `${` after k literal backslashes). Checked by OmegaConf's own grammar: a
    value it would still read as an interpolation refuses the folder, naming the key."""
    escaped = re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m[1]) + 1) + "${", value)
    if _interpolations(escaped) != []:
        raise StoredConfigError(f"{path or 'a stored config'}: {key}={value!r} cannot be read as plain text; this "
                                "folder's stored config is refused: remove or rewrite that value")
    return escaped


def _interpolations(value: str) -> list[str] | None:
    """The text of every interpolation OmegaConf's grammar finds in `value`, nested ones included (None: it cannot
    parse the value, which then is not read as plain text either)."""
    try:
        todo = [parse(value)]
    except Exception:
        return None
    found = []
    while todo:
        node = todo.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationContext):
            found.append(node.getText())
        todo.extend(getattr(node, "children", None) or [])
    return found
