"""A registered version's LoRA, read as data: what `sweep.generate`, `sweep.serve` and `sweep.export` load from a
store. Anyone who can write to a store can register anything and move `champion` to it; loading a version through
MLflow (`mlflow.pyfunc.load_model`, a flavour's `load_model`, `mlflow models serve`) runs whatever code that version
brings. So this module never loads a version through MLflow: it downloads three named files (MLmodel, the LoRA's
safetensors file and its checkpoint.json), reads the two records as YAML / JSON data, refuses a version that is not
this project's LoRA flavour before anything else of it is fetched, and checks the LoRA's bytes against the sha256
recorded twice (the version's `lora_sha256` tag, the checkpoint's own checkpoint.json). The file is then loaded
as safetensors by the caller (evaluation.generate: never pickle). docs/security.md states the trust model."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.errors import UserError
from common.lorafile import LORA_FILE, RECORD_FILE, sha256_file
from evaluation.generate import EvalInputError, check_lora_file

from .registry import GENERATION_TAG, registered_version

MLMODEL = "MLmodel"
RECORD_LIMIT = 1 << 20  # MLmodel and checkpoint.json are a few kB; anything larger is not ours
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a plain file or folder name: no path, no ".."
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SETTINGS = {"resolution": int, "num_inference_steps": int, "guidance_scale": float, "lora_scale": float,
             "seed": int, "seconds_per_image": float, "scheduler": str, "device": str}


class RefusedVersion(UserError):
    """A registered version this project will not load: not its LoRA flavour, or a LoRA whose bytes are not the
    ones recorded. Raised before anything of the version is loaded; entry points exit 2 with the message."""


@dataclass(frozen=True)
class RegisteredLora:
    """A registered version's LoRA file, fetched into a folder of the caller's and checked, and what is recorded
    about it (the version's tags, the base model its flavour names, the settings it was evaluated with)."""

    uri: str
    name: str
    version: str
    lora: Path
    sha256: str
    base: str
    tags: dict = field(default_factory=dict)
    generation: dict | None = None

    @property
    def described(self) -> str:
        """'models:/m@champion (version 3: trial lr=0.0001 step 4)', for what a command prints."""
        return (f"{self.uri} (version {self.version}: trial {self.tags.get('trial', '?')} step "
                f"{self.tags.get('step', '?')})")


def fetch_lora(uri: str, store: str, folder: Path) -> RegisteredLora:
    """The LoRA of the version `uri` (models:/name@alias or models:/name/N) names in `store`, downloaded into
    `folder` and checked; RefusedVersion for a version that is not this project's LoRA or whose file's bytes
    differ from what is recorded for it."""
    from mlflow import MlflowClient

    mv = registered_version(uri, store)
    if mv is None:
        raise RefusedVersion(f"{uri}: not a registered model version; give models:/<name>@champion or "
                             "models:/<name>/<version> (python -m sweep.tracking champion prints the champion's)")
    name, number, tags = mv.name, str(mv.version), dict(mv.tags or {})
    where = f"{uri} (registered model {name} version {number})"
    folder = Path(folder)
    source = MlflowClient(store).get_model_version_download_uri(name, number)  # where its artifacts are
    flavour = lora_flavour(_record(source, store, MLMODEL, folder / "model", where, yaml.safe_load), where)
    tag = tags.get("lora_sha256", "")
    if not _SHA256.match(tag):
        raise RefusedVersion(f"{where} is not this project's LoRA: it has no lora_sha256 tag (every version a sweep "
                             f"registers carries its LoRA's sha256; found {tag[:80]!r}); nothing of it was loaded. "
                             "Point model= at a version a sweep registered, or run a sweep to register one")
    adapter = flavour["adapter_weights"]
    record = _record(source, store, f"{adapter}/{RECORD_FILE}", folder / "lora", where, json.loads)
    lora = _download(source, store, f"{adapter}/{LORA_FILE}", folder / "lora", where)
    recorded = record.get("lora_sha256") if isinstance(record, dict) else None
    actual = verify_lora(lora, {"the version's lora_sha256 tag": tag, f"its {RECORD_FILE}": recorded}, where)
    try:
        check_lora_file(lora)  # safetensors holding LoRA weights, never pickle
    except EvalInputError as exc:
        raise RefusedVersion(f"{where}: {exc}") from None
    return RegisteredLora(uri=uri, name=name, version=number, lora=lora, sha256=actual,
                          base=str(flavour.get("base_model") or ""), tags=tags,
                          generation=settings_of(tags.get(GENERATION_TAG)) or settings_of(flavour.get("generation")))


def lora_flavour(mlmodel, where: str) -> dict:
    """The MLmodel's diffusers flavour, when it is the one this project registers (a LoRA adapter in a folder of the
    model, no code of its own), with the model's metadata's `generation`; RefusedVersion naming what it is instead."""
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    conf = flavors.get("diffusers") if isinstance(flavors, dict) else None
    if not isinstance(conf, dict) or conf.get("adapter_type") != "lora":
        raise RefusedVersion(f"{where} is not this project's LoRA: {_flavours(flavors)}, where a sweep registers "
                             "an mlflow.diffusers LoRA adapter; nothing of it was loaded (a model that brings its own "
                             "code would run it). Point model= at a version a sweep registered "
                             "(models:/<name>/<version>), or move the alias back to one")
    adapter, code, weight = conf.get("adapter_weights"), conf.get("code"), conf.get("weight_name")
    if not isinstance(adapter, str) or not _NAME.match(adapter) or code or weight not in (None, LORA_FILE):
        raise RefusedVersion(f"{where} is not this project's LoRA: its diffusers flavour has adapter_weights="
                             f"{str(adapter)[:80]!r}, code={str(code)[:80]!r}, weight_name={str(weight)[:80]!r} "
                             f"(a sweep registers adapter_weights='adapter_weights', no code, {LORA_FILE}); "
                             "nothing of it was loaded")
    metadata = mlmodel.get("metadata")
    return {**conf, "generation": metadata.get("generation") if isinstance(metadata, dict) else None}


def _flavours(flavors) -> str:
    if not isinstance(flavors, dict) or not flavors:
        return "its MLmodel names no flavour"
    said = []
    for name, conf in flavors.items():
        loader = conf.get("loader_module") if isinstance(conf, dict) else None
        kind = conf.get("adapter_type") if isinstance(conf, dict) else None
        said.append(f"{name}" + (f" (loader {loader})" if loader else "") + (f" (adapter {kind})" if kind else ""))
    return "its MLmodel's flavours are " + ", ".join(said)[:300]


def verify_lora(lora: Path, recorded: dict[str, str | None], where: str) -> str:
    """The file's sha256, when it agrees with every hash recorded for it ({what records it: sha256}); else
    RefusedVersion naming each record that disagrees. A missing record refuses too: both travel with every LoRA a
    sweep registers."""
    actual = sha256_file(lora)
    missing = [what for what, sha in recorded.items() if not sha]
    if missing:
        raise RefusedVersion(f"{where}: no sha256 recorded in {' and '.join(missing)}, so its LoRA's bytes cannot be "
                             "checked; refused (a sweep records it there for every version it registers)")
    wrong = [f"{what} says {sha[:16]}..." for what, sha in recorded.items() if sha != actual]
    if wrong:
        raise RefusedVersion(f"{where}: the LoRA file's content hash {actual[:16]}... does not match the recorded "
                             f"sha256 ({'; '.join(wrong)}): the file changed or is damaged since it was registered; "
                             "refused. Register it again from its sweep, or use another version")
    return actual


def settings_of(value) -> dict | None:
    """The recorded evaluation settings (the `generation` tag's JSON, or the MLmodel's metadata), keeping only the
    known keys with values of their types: what generate and serve pass to the pipeline."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    ok = lambda v, kind: isinstance(v, kind) or (kind is float and isinstance(v, int))
    kept = {k: v for k, v in value.items()
            if k in _SETTINGS and not isinstance(v, bool) and (v is None or ok(v, _SETTINGS[k]))}
    return kept or None


def _download(source: str, store: str, path: str, folder: Path, where: str) -> Path:
    """One file of the version's artifacts (`source`: where the store keeps them), nothing else of them."""
    import mlflow

    folder.mkdir(parents=True, exist_ok=True)
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/{path}",
                                                       dst_path=str(folder), tracking_uri=store))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing path
        first = (str(exc).splitlines() or [""])[0][:200]
        raise RefusedVersion(f"{where} is not this project's LoRA: it has no {path} ({type(exc).__name__}: "
                             f"{first}); nothing of it was loaded") from None
    if not got.is_file() or got.is_symlink():
        raise RefusedVersion(f"{where} is not this project's LoRA: its {path} is not a plain file; nothing of it "
                             "was loaded")
    return got


def _record(source: str, store: str, path: str, folder: Path, where: str, parse):
    """A small record of the version (MLmodel as YAML, checkpoint.json as JSON), read as data."""
    got = _download(source, store, path, folder, where)
    if got.stat().st_size > RECORD_LIMIT:
        raise RefusedVersion(f"{where}: its {path} is {got.stat().st_size} bytes, not a record this project writes")
    try:
        return parse(got.read_text())
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RefusedVersion(f"{where}: its {path} cannot be read ({type(exc).__name__}); refused") from None
