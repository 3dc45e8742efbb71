"""The families layer (families/): SDXL behind it behaves exactly as before it, and `model.family` picks a family
or names the known ones.

The no-change test reruns two demo-scale sweeps on the tiny model and compares what they leave with
tests/data/sdxl_reference.json, recorded before SDXL moved into families/sdxl.py (see `REFERENCE`'s "made"):
- every checkpoint's pytorch_lora_weights.safetensors and the champion's diffusers export, byte for byte (sha256);
- the champion's web-UI file, byte for byte except its `modelspec.date` (the export's wall-clock time), which is
  dropped before hashing (the tensors and all other metadata are compared);
- report/selection.json (metrics, champion, runner-up, intervals, pareto, baseline, registry), without times and
  with the sweep's folder taken out of its paths.
Two things are pinned because they are not deterministic otherwise: PYTHONHASHSEED=0 (peft keeps
`target_modules` as a set, so the order it is written in a checkpoint's `lora_adapter_metadata` follows Python's
string hashing: two runs of the same sweep gave files with equal tensors and different bytes) and one torch
thread (CPU reductions may sum in another order on another thread count).

Regenerate the reference (only for a change meant to alter SDXL's numbers, saying so in the commit):
    SDXL_REFERENCE_WRITE=1 python -m pytest -n0 tests/test_families.py -k reference
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from safetensors import safe_open

import families
from common.errors import ConfigError
from common.lorafile import safetensors_bytes
from sweep import CONF_DIR
from trainer.config import SPEED_ONLY, stable_hash, training_config_hash
from trainer.models import resolve_source

from .conftest import typed

REFERENCE = Path(__file__).parent / "data" / "sdxl_reference.json"
# the two sweeps: the packed recipe (two trials in one pack), and the lone one (text-encoder LoRA)
SWEEPS = {
    "packed": ["-m", "lr=1e-4,5e-4", "steps=4", "train.checkpoint_every=2", "data.resolution=64"],
    "lone_text_encoder": ["-m", "lr=1e-4", "lora.train_text_encoder=true", "steps=2", "train.checkpoint_every=2",
                          "data.resolution=64"],
}
TIMES = {"at", "created", "started", "finished", "time", "date"}  # selection.json keys holding wall-clock times


def run_sweep(args: list[str], cwd: Path) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "sweep", *args, "progress=false"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    (folder,) = (cwd / "outputs" / "sweeps").iterdir()
    return folder


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PATH_DEPENDENT = ("modelspec.date", "sdxl_lora_sweep.config_hash")


def webui_digest(path: Path) -> str:
    """The web-UI file's sha256 with its metadata's export time and config hash dropped (the same tensors, the same
    other metadata, written in the project's canonical header order). The config hash covers data.instance_dir, an
    absolute path into the checkout, so it differs in every other clone; the checkpoints' bytes do not hold it."""
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in PATH_DEPENDENT}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    return sha256(safetensors_bytes(tensors, meta))


def _stable(value, folder: str):
    """selection.json without wall-clock times, its paths relative to the sweep folder."""
    if isinstance(value, dict):
        return {k: _stable(v, folder) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [_stable(v, folder) for v in value]
    if isinstance(value, str):
        return value.replace(folder, "<sweep>")
    return value


def fingerprint(folder: Path) -> dict:
    """What a sweep leaves that must not change when the code around SDXL moves."""
    files = {}
    for path in sorted(folder.rglob("*.safetensors")):
        rel = str(path.relative_to(folder))
        if "training_state" in path.parts:
            continue
        is_webui = path.parent.name == "champion" and path.name != "pytorch_lora_weights.safetensors"
        files[rel] = webui_digest(path) if is_webui else sha256(path.read_bytes())
    selection = json.loads((folder / "report" / "selection.json").read_text())
    return {"files": files, "selection": _stable(selection, str(folder))}


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict[str, dict]:
    out = {}
    for name, args in SWEEPS.items():
        cwd = tmp_path_factory.mktemp(name)
        out[name] = fingerprint(run_sweep(args, cwd))
    return out


@pytest.mark.slow
def test_sdxl_sweeps_leave_the_reference_bytes_and_selection(swept):
    if os.environ.get("SDXL_REFERENCE_WRITE") == "1":
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REFERENCE.parents[2], capture_output=True, check=False,
                                text=True).stdout.strip()
        made = (f"tests/test_families.py with SDXL_REFERENCE_WRITE=1 at commit {commit} (before families/ existed), "
                "torch 2.13 CPU, diffusers 0.42.1, peft 0.21, transformers 5.25")
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps({"made": made, "sweeps": swept}, indent=1, sort_keys=True) + "\n")
    ref = json.loads(REFERENCE.read_text())["sweeps"]
    for name in SWEEPS:
        assert swept[name]["files"] == ref[name]["files"], f"{name}: checkpoint or export bytes changed"
        assert swept[name]["selection"] == ref[name]["selection"], f"{name}: selection.json changed"
    # the reference is not empty: both recipes' checkpoints, the champion's two files
    assert len(ref["packed"]["files"]) == 6 and len(ref["lone_text_encoder"]["files"]) == 3


def test_an_unknown_family_is_refused_naming_it_and_the_known_ones():
    with pytest.raises(ConfigError) as err:
        families.get("fluxx")
    assert "model.family='fluxx'" in str(err.value) and "sdxl" in str(err.value)
    with pytest.raises(ConfigError) as err:  # as a sweep's config: before any model is built or loaded
        typed("model.family=fluxx", "model.name=never_built")
    assert "model.family='fluxx' is not a known model family; use one of flux, sdxl" in str(err.value)


def test_every_model_config_names_a_known_family():
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        m = typed(f"model={path.stem}").model
        assert families.get(m.family).name == m.family, path.name


def test_hashes_of_the_default_family_are_those_written_before_model_family_existed(demo):
    """Checkpoints and caches written before `family` joined ModelConfig still resume and hit."""
    m, d, lo, t = demo.model, demo.data, demo.lora, demo.train
    old = {k: v for k, v in asdict(m).items() if k not in ("family", "options", "quantize")}  # newer than the hashes
    tr = {k: v for k, v in asdict(t).items() if k not in ("max_steps", "checkpoint_every", "resume", "device",
                                                           *SPEED_ONLY)}
    assert training_config_hash(m, d, lo, t) == stable_hash({"model": old, "data": asdict(d), "lora": asdict(lo),
                                                              "train": tr})
    assert m.identity() == old
    assert training_config_hash(replace(m, family="other"), d, lo, t) != training_config_hash(m, d, lo, t)
    assert training_config_hash(replace(m, quantize="float8"), d, lo, t) != training_config_hash(m, d, lo, t)


def test_the_family_is_found_from_a_pipeline_a_saved_pipeline_and_a_lora_file(cache_dir):
    sdxl = families.get("sdxl")
    folder = resolve_source(typed("model=tiny").model, cache_dir)
    assert families.for_source(folder) is sdxl
    assert families.for_parts(["unet", "text_encoder"]) is sdxl
    with pytest.raises(TypeError, match="no pipeline of a known model family"):
        families.of_pipeline(object())
