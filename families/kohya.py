"""kohya's LoRA format, the one ComfyUI, Automatic1111 and Forge load: what every family's web-UI export shares (its
error, dtypes, the adapter config read from a diffusers file, the `.alpha` that keeps peft's scale). Each family maps
its own module names (families/sdxl.py: the UNet's SGM paths, lora_unet_* / lora_te1_* / lora_te2_*)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class WebUIExportError(ValueError):
    """The LoRA cannot be written in the web-UI format (the message says why and what to use instead)."""


def adapter_config(path: Path) -> dict[str, dict]:
    """{part: peft LoraConfig as a dict} from the diffusers file's own metadata (`lora_adapter_metadata`, written by
    `save_lora_weights` with the adapter's config), e.g. {"unet": {"r": 8, "lora_alpha": 4.0, ...}}."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    flat = json.loads(raw) if raw else {}
    out: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, name = key.partition(".")
        out.setdefault(part, {})[name] = value
    return out


def kohya_alpha(cfg: dict, rank: int) -> float:
    """The `.alpha` that makes a UI's scale (alpha / rank) equal to peft's: lora_alpha / r, or lora_alpha / sqrt(r)
    with rsLoRA; per-module patterns (rank_pattern / alpha_pattern) are not supported here."""
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise WebUIExportError("this LoRA has per-module ranks or alphas (rank_pattern / alpha_pattern), which the "
                               "web-UI export does not map; use format=diffusers")
    alpha = float(cfg.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(cfg["r"]) if cfg.get("use_rslora") else alpha / cfg["r"]
    return scaling * rank
