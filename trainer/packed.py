"""Packed training: several trials that share model, data and resolution train in one pass of the frozen base.

Every targeted projection of the UNet carries K LoRA adapters stacked along a leading trial axis
(A: K x r x in, B: K x out x r, zero-padded to the largest rank). The batch is trial-major: trial k's
samples pass only through adapter k (two batched matmuls per layer), so no trial's gradient reaches another's
weights. Each trial keeps its own initial weights (peft's, drawn as if it trained alone), learning rate and
schedule, weight decay, gradient clipping, AdamW state, noise stream and checkpoints; padding stays exactly
zero (its gradient is zero, so AdamW never moves it). Checkpoints are ordinary per-trial diffusers LoRA files
with an optimizer state a lone trial can resume from."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from . import lora
from .config import TrainConfig
from .errors import ConfigError

log = logging.getLogger(__name__)


class PackedLoRALinear(nn.Module):
    """A frozen Linear plus one LoRA per trial, each applied to its own block of the (trial-major) batch."""

    def __init__(self, base: nn.Linear, ranks: list[int], scales: list[float]):
        super().__init__()
        k, r = len(ranks), max(ranks)
        self.base, self.k = base, k
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(k, r, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(k, base.out_features, r, device=dev))
        self.register_buffer("scale", torch.tensor(scales, device=dev).view(k, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        # under autocast the matmuls run in its dtype (as peft's LoRA layers do): cast the small weights,
        # never the activations; without autocast everything stays in the LoRA's fp32
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.lora_A.dtype
        xs = x.reshape(self.k, -1, x.shape[-1]).to(dtype)
        h = torch.bmm(xs, self.lora_A.to(dtype).transpose(1, 2))
        delta = torch.bmm(h, (self.lora_B * self.scale).to(dtype).transpose(1, 2))
        return out + delta.reshape(out.shape).to(out.dtype)


def _targets(unet: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module, str]]:
    """(full name, parent, attribute) of every Linear peft would wrap: names equal to, or ending in, a target."""
    found = []
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            parent_name, _, attr = name.rpartition(".")
            found.append((name, unet.get_submodule(parent_name) if parent_name else unet, attr))
    return found


class Pack:
    """The packed adapters on the UNet (installed on creation, `remove()` restores the plain base)."""

    def __init__(self, base, settings: list) -> None:
        self.base, self.settings = base, settings
        self.ranks = [s.rank for s in settings]
        self.layers: list[tuple[str, nn.Module, str, PackedLoRALinear]] = []
        for name, parent, attr in _targets(base.unet, list(settings[0].target_modules)):
            packed = PackedLoRALinear(getattr(parent, attr), self.ranks, [s.lora_alpha / s.rank for s in settings])
            setattr(parent, attr, packed)
            self.layers.append((name, parent, attr, packed))
        if not self.layers:
            raise ConfigError([f"lora.target_modules={settings[0].target_modules} matches no Linear layer of the UNet"])

    def params(self) -> list[nn.Parameter]:
        """In peft's order (per layer: A, then B), so that optimizer states line up with a lone trial's."""
        return [p for *_, m in self.layers for p in (m.lora_A, m.lora_B)]

    def load_initial(self, k: int, peft_state: dict[str, torch.Tensor]) -> None:
        r = self.ranks[k]
        with torch.no_grad():
            for name, *_, m in self.layers:
                m.lora_A[k, :r].copy_(peft_state[f"{name}.lora_A.weight"])
                m.lora_B[k, :, :r].copy_(peft_state[f"{name}.lora_B.weight"])

    def peft_state(self, k: int) -> dict[str, torch.Tensor]:
        """Trial k's weights as peft names them (what `get_peft_model_state_dict` gives for a lone trial)."""
        r = self.ranks[k]
        out = {}
        for name, *_, m in self.layers:
            out[f"{name}.lora_A.weight"] = m.lora_A[k, :r].detach().clone()
            out[f"{name}.lora_B.weight"] = m.lora_B[k, :, :r].detach().clone()
        return out

    def save(self, k: int, folder: Path) -> None:
        lora.save_unet_lora(folder, self.peft_state(k), lora.unet_config(self.settings[k]))

    def remove(self) -> None:
        for _, parent, attr, m in self.layers:
            setattr(parent, attr, m.base)
        self.layers = []


class PackedAdamW:
    """AdamW over packed tensors (trial axis first), torch.optim.AdamW's update per trial with that trial's
    learning rate and weight decay; gradient norms are clipped per trial."""

    def __init__(self, params: list[nn.Parameter], trains: list[TrainConfig], ranks: list[int]):
        firsts = {(t.adam_beta1, t.adam_beta2, t.adam_epsilon) for t in trains}
        if len(firsts) > 1:
            raise ConfigError([f"trials of one pack must share adam_beta1/adam_beta2/adam_epsilon, got {sorted(firsts)}"])
        self.params, self.ranks = params, ranks
        (self.b1, self.b2, self.eps), = firsts
        dev = params[0].device
        self.wd = torch.tensor([t.adam_weight_decay for t in trains], device=dev).view(-1, 1, 1)
        self.max_norm = torch.tensor([t.max_grad_norm for t in trains], device=dev)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def clip(self) -> None:
        """torch.nn.utils.clip_grad_norm_ for each trial's own parameters."""
        grads = [p.grad for p in self.params]
        norms = torch.stack([torch.linalg.vector_norm(g, dim=(1, 2)) for g in grads]).norm(dim=0)
        coef = torch.clamp(self.max_norm / (norms + 1e-6), max=1.0).view(-1, 1, 1)
        torch._foreach_mul_(grads, [coef] * len(grads))

    @torch.no_grad()
    def step(self, lrs: list[float]) -> None:
        """One AdamW step for every parameter at once (foreach kernels, the trial's LR broadcast per slice):
        a handful of launches per step instead of a dozen per parameter."""
        self.steps += 1
        n, ps = len(self.params), self.params
        grads = [p.grad for p in ps]
        lr = torch.tensor(lrs, device=ps[0].device).view(-1, 1, 1)
        bc1, bc2 = 1 - self.b1 ** self.steps, math.sqrt(1 - self.b2 ** self.steps)
        torch._foreach_mul_(ps, [1 - lr * self.wd] * n)  # decoupled weight decay
        torch._foreach_lerp_(self.m, grads, 1 - self.b1)
        torch._foreach_mul_(self.v, self.b2)
        torch._foreach_addcmul_(self.v, grads, grads, 1 - self.b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_div(self.m, denom)
        torch._foreach_mul_(update, [lr / bc1] * n)
        torch._foreach_sub_(ps, update)
        for p in ps:
            p.grad = None

    def trial_state(self, k: int, template: dict) -> dict:
        """Trial k's state in torch.optim.AdamW's state_dict layout (`template`: a lone trial's param group)."""
        r = self.ranks[k]
        state = {}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            sl = (k, slice(0, r)) if i % 2 == 0 else (k, slice(None), slice(0, r))  # A rows / B columns
            state[i] = {"step": torch.tensor(float(self.steps)), "exp_avg": m[sl].clone(), "exp_avg_sq": v[sl].clone()}
        group = {**template, "params": list(range(len(self.params)))}
        return {"state": state, "param_groups": [group]}


def packable(trials: list, has_checkpoints) -> str | None:
    """Why these trials cannot train as one pack (None if they can)."""
    if len(trials) < 2:
        return "a single trial"
    first = trials[0]
    same = lambda get: len({repr(get(t)) for t in trials}) == 1  # noqa: E731
    checks = [
        (same(lambda t: (t.train.batch_size, t.train.gradient_accumulation, t.train.max_steps,
                         t.train.checkpoint_every, t.train.device, t.train.mixed_precision,
                         t.train.gradient_checkpointing, t.train.optimizer)),
         "batch size, accumulation, steps, checkpoint interval, device, precision or optimizer differ"),
        (same(lambda t: list(t.lora.target_modules)), "LoRA target modules differ"),
        (not any(t.lora.use_dora or t.lora.train_text_encoder for t in trials), "DoRA or text-encoder LoRA"),
        (first.train.optimizer == "adamw", "optimizer is not adamw"),
        (first.train.mixed_precision != "fp16", "fp16 needs a loss scaler (bf16 or fp32 packs)"),
        (not any(t.lora.dropout for t in trials), "LoRA dropout (its random draws would differ in a pack)"),
        (not any(t.on_checkpoint for t in trials), "checkpoints are scored live (one trial's adapter at a time)"),
        (not any(has_checkpoints(t.output_dir) for t in trials), "a trial resumes from its checkpoints"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    return None


def dummy_optimizer(t: TrainConfig) -> torch.optim.Optimizer:
    """Drives a trial's LR schedule (diffusers' schedulers wrap an optimizer) and gives the param-group layout
    a lone trial's AdamW would save."""
    return torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                             weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)

