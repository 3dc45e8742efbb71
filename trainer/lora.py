"""LoRA adapters through peft on the shared base, saved and restored in the diffusers LoRA format."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.training_utils import _set_state_dict_into_text_encoder, cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from common.lorafile import LORA_FILE

from .config import LoraSettings
from .models import BaseModel

ADAPTER = "default"  # the name diffusers' helpers expect; one trial's adapter is on the base at a time


def _common(cfg: LoraSettings) -> dict:
    return dict(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, use_dora=cfg.use_dora,
                init_lora_weights="gaussian")


def unet_config(cfg: LoraSettings) -> LoraConfig:
    return LoraConfig(target_modules=list(cfg.target_modules), **_common(cfg))


def add_lora(base: BaseModel, cfg: LoraSettings) -> dict[str, list[torch.nn.Parameter]]:
    """Add fresh LoRA layers (fp32) to the UNet and, if asked, both text encoders. Returns trainable params."""
    common = _common(cfg)
    base.unet.add_adapter(unet_config(cfg), adapter_name=ADAPTER)
    modules = {"unet": base.unet}
    if cfg.train_text_encoder:
        for name in ("text_encoder", "text_encoder_2"):
            enc = getattr(base, name)
            # peft directly, not transformers' add_adapter, which demands a newer peft than diffusers needs
            conf = LoraConfig(target_modules=list(cfg.text_target_modules), **common)
            inject_adapter_in_model(conf, enc, adapter_name=ADAPTER)
            enc.peft_config = {ADAPTER: conf}
            modules[name] = enc
    cast_training_params(list(modules.values()), dtype=torch.float32)  # frozen base in bf16, LoRA in fp32
    return {n: [p for p in m.parameters() if p.requires_grad] for n, m in modules.items()}


def remove_lora(base: BaseModel) -> None:
    """Restore the plain base modules (the next trial starts from the untouched base)."""
    base.unet.unload_lora() if getattr(base.unet, "_hf_peft_config_loaded", False) else None
    for enc in (base.text_encoder, base.text_encoder_2):
        if hasattr(enc, "peft_config"):
            recurse_remove_peft_layers(enc)
            del enc.peft_config


def save_unet_lora(folder: Path, peft_state: dict[str, torch.Tensor], config: LoraConfig) -> None:
    """A UNet LoRA given as peft's state dict ("<module>.lora_A.weight", ...) written in the diffusers format."""
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(peft_state),
                                                unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)


def save_lora(base: BaseModel, folder: Path, train_text_encoder: bool) -> None:
    if not train_text_encoder:
        return save_unet_lora(folder, get_peft_model_state_dict(base.unet, adapter_name=ADAPTER),
                              base.unet.peft_config[ADAPTER])
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet, adapter_name=ADAPTER))}
    meta = {"unet_lora_adapter_metadata": base.unet.peft_config[ADAPTER].to_dict()}
    if train_text_encoder:
        for name in ("text_encoder", "text_encoder_2"):
            enc = getattr(base, name)
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(enc, adapter_name=ADAPTER))
            meta[f"{name}_lora_adapter_metadata"] = enc.peft_config[ADAPTER].to_dict()
    StableDiffusionXLPipeline.save_lora_weights(folder, **layers, **meta, safe_serialization=True)


def load_lora_into(base: BaseModel, folder: Path, train_text_encoder: bool) -> None:
    """Put a checkpoint's weights into the adapters that `add_lora` created (resume)."""
    sd = load_file(Path(folder) / LORA_FILE)
    unet_sd = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")})
    result = set_peft_model_state_dict(base.unet, unet_sd, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{folder / LORA_FILE} does not match this LoRA config (unexpected keys such as {unexpected[:3]})")
    if train_text_encoder:
        _set_state_dict_into_text_encoder(sd, prefix="text_encoder.", text_encoder=base.text_encoder)
        _set_state_dict_into_text_encoder(sd, prefix="text_encoder_2.", text_encoder=base.text_encoder_2)
