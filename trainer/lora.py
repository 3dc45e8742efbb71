"""LoRA adapters through peft on the shared base, saved and restored in the diffusers LoRA format (written through
the model family's pipeline class: families/)."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers.training_utils import _set_state_dict_into_text_encoder, cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

import families
from common.lorafile import LORA_FILE
from families import Family

from .config import LoraSettings
from .models import BaseModel

ADAPTER = "default"  # the name diffusers' helpers expect; one trial's adapter is on the base at a time


def _common(cfg: LoraSettings) -> dict:
    return dict(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, use_dora=cfg.use_dora,
                init_lora_weights="gaussian")


def unet_config(cfg: LoraSettings) -> LoraConfig:
    """The denoiser's LoraConfig (SDXL's UNet, a DiT's transformer)."""
    return LoraConfig(target_modules=list(cfg.target_modules), **_common(cfg))


def add_lora(base: BaseModel, cfg: LoraSettings) -> dict[str, list[torch.nn.Parameter]]:
    """Add fresh LoRA layers (fp32) to the denoiser and, if asked, the text encoders. Returns trainable params by
    part (the family's denoiser_part, then its text_encoder_parts)."""
    common = _common(cfg)
    base.denoiser.add_adapter(unet_config(cfg), adapter_name=ADAPTER)
    modules = {base.family.denoiser_part: base.denoiser}
    if cfg.train_text_encoder:
        for name, enc in base.text_encoders().items():
            # peft directly, not transformers' add_adapter, which demands a newer peft than diffusers needs
            conf = LoraConfig(target_modules=list(cfg.text_target_modules), **common)
            inject_adapter_in_model(conf, enc, adapter_name=ADAPTER)
            enc.peft_config = {ADAPTER: conf}
            modules[name] = enc
    cast_training_params(list(modules.values()), dtype=torch.float32)  # frozen base in bf16, LoRA in fp32
    return {n: [p for p in m.parameters() if p.requires_grad] for n, m in modules.items()}


def remove_lora(base: BaseModel) -> None:
    """Restore the plain base modules (the next trial starts from the untouched base), also after an adapter was
    half added (out of memory inside peft's injection: diffusers' flag says loaded, no peft_config yet)."""
    denoiser = base.denoiser
    if getattr(denoiser, "_hf_peft_config_loaded", False):
        if hasattr(denoiser, "peft_config"):
            denoiser.unload_lora()
        else:
            recurse_remove_peft_layers(denoiser)
            denoiser._hf_peft_config_loaded = None
    for enc in base.text_encoders().values():
        if hasattr(enc, "peft_config"):
            recurse_remove_peft_layers(enc)
            del enc.peft_config


def save_unet_lora(folder: Path, peft_state: dict[str, torch.Tensor], config: LoraConfig,
                   family: Family | None = None) -> None:
    """A denoiser LoRA given as peft's state dict ("<module>.lora_A.weight", ...) written in the diffusers format of
    `family` (the base's; model.family's default when not given)."""
    family = family or families.get(families.DEFAULT)
    part = family.denoiser_part
    family.save_lora_weights(folder, {part: convert_state_dict_to_diffusers(peft_state)}, {part: config.to_dict()})


def save_lora(base: BaseModel, folder: Path, train_text_encoder: bool) -> None:
    denoiser, part = base.denoiser, base.family.denoiser_part
    if not train_text_encoder:
        return save_unet_lora(folder, get_peft_model_state_dict(denoiser, adapter_name=ADAPTER),
                              denoiser.peft_config[ADAPTER], base.family)
    layers = {part: convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name=ADAPTER))}
    meta = {part: denoiser.peft_config[ADAPTER].to_dict()}
    for name, enc in base.text_encoders().items():
        layers[name] = convert_state_dict_to_diffusers(get_peft_model_state_dict(enc, adapter_name=ADAPTER))
        meta[name] = enc.peft_config[ADAPTER].to_dict()
    base.family.save_lora_weights(folder, layers, meta)


def load_lora_into(base: BaseModel, folder: Path, train_text_encoder: bool) -> None:
    """Put a checkpoint's weights into the adapters that `add_lora` created (resume)."""
    sd = load_file(Path(folder) / LORA_FILE)
    prefix = base.family.denoiser_part + "."
    denoiser_sd = convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    result = set_peft_model_state_dict(base.denoiser, denoiser_sd, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{folder / LORA_FILE} does not match this LoRA config (unexpected keys such as {unexpected[:3]})")
    if train_text_encoder:
        for name, enc in base.text_encoders().items():
            _set_state_dict_into_text_encoder(sd, prefix=f"{name}.", text_encoder=enc)
