"""LoRA adapters through peft on the shared base, saved and restored in the diffusers LoRA format."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from diffusers import StableDiffusionXLPipeline
from diffusers.training_utils import _set_state_dict_into_text_encoder, cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from .checkpoint import LORA_FILE
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


# (parent module, attribute, adapter wrapper, its base Linear, the wrapper's weight update W' - W in fp32)
MergeSite = tuple[nn.Module, str, nn.Module, nn.Linear, Callable[[], torch.Tensor]]


@contextlib.contextmanager
def merged_into_base(sites: list[MergeSite]):
    """Inside: each adapter wrapper is replaced, in its parent, by its own base Linear carrying W + update (summed
    in fp32, rounded once to W's dtype, as diffusers' fuse_lora does). Generating then costs what the plain base
    costs (through peft's adapter layers a 1024 px image took 1.270 s against 1.098, H200, batch 20) and runs the
    very modules, so the very compiled code, that the base runs. On exit the wrappers are back and every base
    weight is restored bit for bit from a copy (subtracting the update again would not give bf16 weights back
    exactly); the copy waits in CPU memory when the GPU has no room for it. Merging does not nest."""
    if len({id(base) for *_, base, _ in sites}) < len(sites):
        raise ValueError("merged_into_base: a base Linear is listed twice (its restore would not be exact)")
    if any(getattr(parent, attr) is not wrapper for parent, attr, wrapper, *_ in sites):
        raise RuntimeError("merged_into_base: an adapter is not in its place (already merged?): merging does not nest")
    if not sites:
        yield
        return
    weights = [base.weight for *_, base, _ in sites]
    device = weights[0].device
    need = sum(w.numel() * w.element_size() for w in weights)
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 2 * need:
        device = torch.device("cpu")
    done: list[tuple[MergeSite, torch.Tensor]] = []
    try:
        with torch.no_grad(), torch.autocast(weights[0].device.type, enabled=False):  # the update in fp32, always
            for site in sites:
                parent, attr, _, base, update = site
                done.append((site, base.weight.to(device, copy=True)))
                base.weight.copy_(base.weight.float() + update())
                setattr(parent, attr, base)
        yield
    finally:
        with torch.no_grad():
            for (parent, attr, wrapper, base, _), orig in reversed(done):
                base.weight.copy_(orig)
                setattr(parent, attr, wrapper)


def peft_sites(module: nn.Module) -> list[MergeSite]:
    """Every peft LoRA Linear in `module` whose active adapters merge into a plain weight update W + scale B A (no
    variant such as DoRA, no LoRA bias, not merged already); any other adapter layer stays as it is and applies
    itself."""
    from peft.tuners.lora import Linear as LoraLinear

    sites = []
    for name, layer in module.named_modules():
        if type(layer) is not LoraLinear or layer.merged or layer.disable_adapters:
            continue
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if (not active or not isinstance(layer.base_layer, nn.Linear)
                or any(a in getattr(layer, "lora_variant", {}) or layer.use_dora.get(a) or layer.lora_bias.get(a)
                       for a in active)):
            continue

        def update(layer=layer, active=active) -> torch.Tensor:
            d = sum((layer.lora_B[a].weight.float() * layer.scaling[a]) @ layer.lora_A[a].weight.float() for a in active)
            return d.T if layer.fan_in_fan_out else d

        parent_name, _, attr = name.rpartition(".")
        sites.append((module.get_submodule(parent_name), attr, layer, layer.base_layer, update))
    return sites


def merged(module: nn.Module):
    """Inside: the peft LoRA adapters active on `module` (a UNet) merged into its weights (`merged_into_base`)."""
    return merged_into_base(peft_sites(module))
