"""Checkpoints: a diffusers LoRA file any SDXL pipeline loads, its JSON record, and the state to resume from.

    checkpoints/step-000100/
        pytorch_lora_weights.safetensors   diffusers format (the family's pipeline: pipe.load_lora_weights)
        checkpoint.json                    step, loss, config hash, sha256 of the LoRA file
        training_state/                    optimizer, LR schedule and RNG state (safetensors + JSON, no pickle)

Each folder is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint that looks finished."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common import faults
from common.errors import DiskFullError
from common.lorafile import LORA_FILE, RECORD_FILE, CheckpointRecord, canonicalize, sha256_file

log = logging.getLogger(__name__)

STATE_DIR = "training_state"


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def write_checkpoint(output_dir: Path, step: int, *, save_lora, record: dict[str, Any],
                     state_tensors: dict[str, torch.Tensor], state_json: dict[str, Any]) -> Path:
    """`save_lora(folder)` writes the LoRA file; everything else is written here. Returns the final folder."""
    final = step_dir(output_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        save_lora(tmp)
        canonicalize(tmp / LORA_FILE)  # diffusers' header order is random: the same LoRA, the same sha256
        rec = CheckpointRecord(step=step, lora_sha256=sha256_file(tmp / LORA_FILE), created=time.time(), **record)
        (tmp / STATE_DIR).mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in state_tensors.items()}, tmp / STATE_DIR / "state.safetensors")
        (tmp / STATE_DIR / "state.json").write_text(json.dumps(state_json))
        (tmp / RECORD_FILE).write_text(json.dumps(asdict(rec), indent=2))
        umask = os.umask(0)
        os.umask(umask)
        for f in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700; a checkpoint is shared like any output file
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        faults.hit("checkpoint_write", str(record.get("trial", "*")))
        if final.exists():  # a re-run of the same step (resume after a crash right after the rename)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            earlier = [c for c in list_checkpoints(output_dir) if c != final]
            keep = f"the last checkpoint, {earlier[-1]}, is intact" if earlier else "no earlier checkpoint exists"
            free = shutil.disk_usage(final.parent).free / 2**20
            raise DiskFullError(f"no space left to write checkpoint {final.name} in {final.parent} ({free:.0f} MiB "
                                f"free); {keep}. Free disk space (or set paths.output_dir on a larger disk) and run "
                                "the same command again with resume=true to continue from it") from None
        raise
    return final


def verify(folder: Path) -> CheckpointRecord | None:
    """The record if the folder is a complete checkpoint whose LoRA file matches its hash, else None."""
    try:
        rec = CheckpointRecord.read(folder)
        ok = (folder / LORA_FILE).is_file() and sha256_file(folder / LORA_FILE) == rec.lora_sha256
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return rec if ok else None


def clean_partial(output_dir: Path) -> None:
    """Remove checkpoint folders a killed process left half-written (never renamed into place)."""
    root = Path(output_dir) / "checkpoints"
    for tmp in root.glob(".step-*.tmp-*") if root.is_dir() else []:
        log.info("removing %s: a checkpoint whose writing was interrupted (the finished ones are intact)", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_valid(output_dir: Path) -> tuple[Path, CheckpointRecord] | None:
    """Newest checkpoint that verifies; damaged ones are skipped with a warning (earlier work is kept)."""
    for folder in reversed(list_checkpoints(output_dir)):
        rec = verify(folder)
        if rec is not None and (folder / STATE_DIR / "state.safetensors").is_file():
            return folder, rec
        log.warning("ignoring damaged checkpoint %s (missing file or hash mismatch)", folder)
    return None


def optimizer_state_to_flat(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors, JSON) so it can be stored without pickle."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for name, v in meta["scalars"].items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def read_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(folder / STATE_DIR / "state.safetensors"), json.loads((folder / STATE_DIR / "state.json").read_text())
