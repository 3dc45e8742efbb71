"""A checkpoint's LoRA in the format ComfyUI, Automatic1111 and Forge load: kohya's names, its real alpha, its metadata.

The diffusers file names modules by diffusers' paths (`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.
to_k.lora.down.weight`), which those UIs skip key by key without a word. kohya's SDXL trainer writes

    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight   the UNet, by the original (SGM) paths
    lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight         text encoders 1 and 2, by HF's paths
    <name>.alpha                                                                  one scalar per module

and a UI applies `up @ down * alpha / rank`. diffusers' `convert_state_dict_to_kohya` is right about the text
encoders and the lora_down/lora_up names, and is used for them; it is wrong for this tool in two places, fixed here:
it writes alpha = rank whatever the adapter's alpha was (rank and alpha are what a sweep varies), and it keeps the
UNet's diffusers paths (`lora_unet_down_blocks_1_attentions_0_...`), which kohya's SDXL files never use."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from safetensors import safe_open

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PARTS = ("unet", "text_encoder", "text_encoder_2")
# diffusers writes text-encoder LoRA weights as `lora_linear_layer.down` (its older name), the UNet's as `lora.down`
_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora(?:_linear_layer)?\.(down|up)\.weight$")


class WebUIExportError(ValueError):
    """The LoRA cannot be written in the web-UI format (the message says why and what to use instead)."""


def sgm_path(diffusers_path: str, layers_per_block: int) -> str:
    """A module path of the SDXL UNet in diffusers' naming -> the original (SGM/LDM) path that kohya names keys by.

    Input block n holds, per level i, `layers_per_block` (resnet, attention) pairs after the stem and then the
    downsampler: down_blocks.i.attentions.j is input_blocks.(1 + i (L+1) + j).1; up blocks have one layer more,
    so up_blocks.i.attentions.j is output_blocks.(i (L+1) + j).1; the mid block's attention is middle_block.1.
    Inside an attention (Transformer2DModel / SpatialTransformer) both use the same names."""
    step = layers_per_block + 1
    m = re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", diffusers_path)
    if m:
        return f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.1.{m[3]}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", diffusers_path)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", diffusers_path)
    if m:
        return f"output_blocks.{int(m[1]) * step + int(m[2])}.1.{m[3]}"
    raise WebUIExportError(f"the UNet module {diffusers_path} is outside the attention blocks: the web-UI export maps "
                           "only attention modules (lora.target_modules such as to_k, to_q, to_v, to_out.0, proj_in, "
                           "ff.net.0.proj); use format=diffusers for this LoRA")


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


def convert(path: Path, layers_per_block: int, dtype: str = "fp16",
            alphas: dict[str, float] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The diffusers LoRA file at `path` as a kohya state dict in `dtype`, and the adapter config per part (from the
    file's metadata, or `alphas` {part: lora_alpha} for a file without it)."""
    if dtype not in DTYPES:
        raise WebUIExportError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)} (fp16 is what the UIs load by default)")
    configs = adapter_config(path)
    peft: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if m is None:
                raise WebUIExportError(f"{path}: the key {key} is not a plain LoRA weight (a DoRA magnitude or a "
                                       "LoRA bias?): the web-UI export writes plain LoRA only; use format=diffusers")
            part, module, side = m.groups()
            if part == "unet":
                module = sgm_path(module, layers_per_block)
            elif not module.startswith("text_model."):  # transformers 5 dropped CLIPTextModel's `text_model` level;
                module = f"text_model.{module}"  # kohya's names and the UIs' CLIP keep it
            tensor = f.get_tensor(key)
            if side == "down":
                ranks[f"{part}.{module}"] = tensor.shape[0]
            peft[f"{part}.{module}.lora.{side}.weight"] = tensor.to(DTYPES[dtype])
    for part in {k.split(".", 1)[0] for k in ranks}:
        if part not in configs:
            if not alphas or part not in alphas:
                raise WebUIExportError(f"{path} does not record its adapter's alpha (no lora_adapter_metadata) and "
                                       f"none was given for {part}: export from the checkpoint's trial folder")
            configs[part] = {"r": None, "lora_alpha": alphas[part]}
    kohya = convert_state_dict_to_kohya(convert_unet_state_dict_to_peft(peft))
    for name, rank in ranks.items():  # convert_state_dict_to_kohya wrote alpha = rank: the adapter's real alpha
        part, module = name.split(".", 1)
        cfg = configs[part] if configs[part].get("r") else {**configs[part], "r": rank}
        alpha_key = kohya_name(part, module) + ".alpha"
        if alpha_key not in kohya:
            raise WebUIExportError(f"internal: {alpha_key} missing from diffusers' kohya conversion")
        kohya[alpha_key] = torch.tensor(kohya_alpha(cfg, rank), dtype=DTYPES[dtype])
    return kohya, configs


def kohya_name(part: str, module: str) -> str:
    """lora_unet_<SGM path> / lora_te1_<path> / lora_te2_<path>, dots as underscores (kohya's rule)."""
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[part]
    return f"{prefix}_{module.replace('.', '_')}"
