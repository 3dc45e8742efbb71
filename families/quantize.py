"""A quantised frozen denoiser (model.quantize): its Linear weights stored in 8 bits, what a 24 GB card needs for
FLUX.1-dev, whose transformer alone is 23.8 GB in bf16 (docs/speed.md), and, on GPUs with rowwise-scaled float8
GEMMs (compute capability 9.0 and up: H100, H200), a faster forward.

"float8": each quantised Linear (`Float8Linear`) keeps its weight as float8_e4m3fn with one fp32 scale per output
row (the row's largest magnitude maps to e4m3's largest, 448: no row under- or overflows, unlike a plain cast).
Forward, on such a GPU and with bf16 compute, the input is scaled per row to float8 as well and multiplied by
`torch._scaled_mm` (rowwise scales, bf16 out); elsewhere (an RTX 4090 included) the weight is dequantised for the
call and `F.linear` runs in the compute dtype. Backward needs only the input's gradient (the weight is frozen): where
the forward multiplied in float8, so does the backward (the gradient times the weight's row scales, scaled per row
to float8: the rowwise recipe of torchao's float8 training, e4m3 throughout); elsewhere through the weight
dequantised for the call, in the gradient's dtype. Nothing per layer outlives its
call, so autograd keeps no upcast weights and gradient checkpointing is a memory choice, not a need; no hooks swap
parameters in Python, so CUDA graphs and torch.compile see plain tensors.

The layers diffusers keeps in full precision when it casts layerwise (names matching its default skip patterns and
the model's `_skip_layerwise_casting_patterns`: FLUX's norms' modulation Linears and proj_out) stay in the weight
dtype. The LoRA is never quantised: peft and the packed wrappers add their adapters beside the 8-bit Linears, in
the compute dtype or fp32 (each Float8Linear carries `compute_dtype`, the attribute peft reads for a quantised base,
bitsandbytes' convention)."""
from __future__ import annotations

import re

import torch
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
STORAGE = {"float8": FP8}  # model.quantize -> the dtype the weights are stored in


def _rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (rows x cols) as float8 and one fp32 scale per row: t ~ q * scale."""
    scale = t.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_mm_ok(x: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether the float8 GEMM serves this call: bf16 compute, rowwise-scaled float8 GEMMs (CUDA 9.0+: Ada's 8.9
    cards have float8 tensor cores, but torch's rowwise scaling is documented for Hopper on; a CPU runs it too,
    which the tests use), and the inner and outer sizes multiples of 16 (cuBLASLt's rule)."""
    if compute_dtype != torch.bfloat16 or weight.shape[0] % 16 or weight.shape[1] % 16:
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu"


class _Float8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias, compute_dtype):
        ctx.save_for_backward(weight, scale)
        ctx.x_dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ctx.float8 = scaled_mm_ok(x, weight, compute_dtype)
        if ctx.float8:
            xq, xs = _rowwise(x2)
            out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.view(1, -1), out_dtype=compute_dtype)
        else:
            out = nn.functional.linear(x2.to(compute_dtype), dequantised(weight, scale, compute_dtype))
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        if ctx.float8 and g.dtype == torch.bfloat16:
            # dx = g @ (scale * W8) = (g * scale^T) @ W8: the weight's row scales (along the contraction) fold into
            # the gradient, which is scaled per row to float8; W8 goes in column-major (a transposed copy, 1 byte
            # an element, for the call)
            gq, gs = _rowwise(g * scale.view(1, -1))
            ones = torch.ones(1, weight.shape[1], device=g.device, dtype=torch.float32)
            dx = torch._scaled_mm(gq, weight.t().contiguous().t(), scale_a=gs, scale_b=ones, out_dtype=g.dtype)
        else:
            dx = g @ dequantised(weight, scale, g.dtype)
        return dx.view(*grad.shape[:-1], weight.shape[1]).to(ctx.x_dtype), None, None, None, None


def dequantised(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float8 weight times its row scales, in `dtype`."""
    return weight.to(dtype) * scale.to(dtype)


class Float8Linear(nn.Linear):
    """A frozen Linear stored as float8_e4m3fn with one fp32 scale per output row (module docstring)."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = _rowwise(linear.weight.detach())
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(compute_dtype),
                                                                  requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float8Matmul.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)

    def dequantised_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W as the forward uses it (scale x float8), in `dtype` (the compute dtype by default)."""
        return dequantised(self.weight, self.weight_scale, dtype or self.compute_dtype)


def quantize(denoiser: nn.Module, how: str, compute_dtype: torch.dtype) -> None:
    """Replace `denoiser`'s Linear layers by `Float8Linear`s as `how` says (STORAGE), computed in `compute_dtype`,
    in place (before it moves to the GPU: the bf16 copy never needs to fit there); the layers diffusers keeps in
    full precision (module docstring) stay as they are."""
    if STORAGE[how] != FP8:
        raise ValueError(f"model.quantize={how!r}: no such storage")
    skip = tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(getattr(denoiser, "_skip_layerwise_casting_patterns", None) or ())
    for name, module in list(denoiser.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not any(re.search(p, full) for p in skip):
                setattr(module, child_name, Float8Linear(child, compute_dtype))


def quantized_linears(module: nn.Module) -> list[nn.Linear]:
    """The Linear layers of `module` whose weights are stored in 8 bits."""
    return [m for m in module.modules() if isinstance(m, nn.Linear) and m.weight.dtype in STORAGE.values()]


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` holds 8-bit weights."""
    return bool(quantized_linears(module))


def linear_weight_bytes(module: nn.Module) -> int:
    """Bytes of the Linear weights of `module` as stored (what quantising halves from bf16)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if isinstance(m, nn.Linear))
