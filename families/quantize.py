"""A quantised frozen denoiser (model.quantize): its Linear weights stored in 8 bits and upcast one layer at a time
when it runs, through diffusers' layerwise casting (`ModelMixin.enable_layerwise_casting`: no extra dependency).
What a 24 GB card needs for FLUX.1-dev, whose transformer alone is 23.8 GB in bf16 (docs/speed.md).

"float8": weights stored as float8_e4m3fn (no scale: a plain cast, as diffusers does it), each layer cast to the
compute dtype (the base's weight dtype) for its forward and back after it; the layers diffusers keeps by default
(names matching its skip patterns and the model's `_skip_layerwise_casting_patterns`: FLUX's norms' modulation
Linears and proj_out) stay in the weight dtype. The LoRA is never quantised: peft and the packed wrappers add their
adapters beside the 8-bit Linears, in the compute dtype or fp32.

Backward through a layer needs its weight: autograd keeps the upcast copy of every layer it went through, so the
saving holds in training only with gradient checkpointing (a block recomputed in backward holds its own layers'
copies, one block at a time); trainer.config.validate asks for it."""
from __future__ import annotations

import torch
from torch import nn

STORAGE = {"float8": torch.float8_e4m3fn}  # model.quantize -> the dtype the weights are stored in


def quantize(denoiser: nn.Module, how: str, compute_dtype: torch.dtype) -> None:
    """Store `denoiser`'s Linear weights as `how` says (STORAGE), computed in `compute_dtype`, in place (before it
    moves to the GPU: the bf16 copy never needs to fit there). Each quantised Linear carries `compute_dtype` as the
    attribute peft reads for a quantised base layer (bitsandbytes' convention), so that a LoRA added later is made
    in the compute dtype, as on the unquantised base, and not rounded to 8 bits."""
    storage = STORAGE[how]
    denoiser.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute_dtype)
    for layer in quantized_linears(denoiser):
        layer.compute_dtype = compute_dtype


def quantized_linears(module: nn.Module) -> list[nn.Linear]:
    """The Linear layers of `module` whose weights are stored in 8 bits."""
    return [m for m in module.modules()
            if isinstance(m, nn.Linear) and m.weight.dtype in STORAGE.values()]


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` holds 8-bit weights (the family then leaves it uncompiled: torch.compile over diffusers'
    casting hooks, which change the layers' parameters inside forward, is not measured yet)."""
    return bool(quantized_linears(module))


def linear_weight_bytes(module: nn.Module) -> int:
    """Bytes of the Linear weights of `module` as stored (what quantising halves from bf16)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if isinstance(m, nn.Linear))
