"""Packed training: several trials that share model, data and resolution train in one pass of the frozen base.

Every targeted projection of the UNet carries K LoRA adapters stacked along a leading trial axis
(A: K x r x in, B: K x out x r, zero-padded to the largest rank). The batch is trial-major: trial k's
samples pass only through adapter k (PackedLoRALinear), so no trial's gradient reaches another's
weights. Each trial keeps its own initial weights (peft's, drawn as if it trained alone), learning rate and
schedule, weight decay, gradient clipping, AdamW state, noise stream and checkpoints; padding stays exactly
zero (its gradient is zero, so AdamW never moves it). Checkpoints are ordinary per-trial diffusers LoRA files
with an optimizer state a lone trial can resume from."""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import torch
from torch import nn

from common import lorafile
from common.errors import ConfigError

from . import lora
from .config import TrainConfig

log = logging.getLogger(__name__)


class PackedLoRALinear(nn.Module):
    """A frozen Linear plus one LoRA per trial, each applied to its own block of the (trial-major) batch.

    Two kernels give the same result. "dense" (the default) runs every trial's A on every sample as one plain
    GEMM (N x in @ in x K*r), zeroes the other trials' columns with a per-trial mask, and applies every
    (scaled) B at once (N x K*r @ K*r x out). The K-fold extra arithmetic is negligible at rank 4,
    while the GPU's GEMM kernels serve these shapes much better than batched matmuls with an inner size of 4
    (docs/speed.md). The masked zeros keep
    trials apart exactly while their numbers are finite; but 0 x inf is NaN, so a trial that overflows reaches
    its pack mates' gradients in that step: the trainer then undoes the step and redoes it with "bmm", which
    multiplies each trial's block by its own adapter only (see `per_trial`)."""

    kernel = "dense"

    def __init__(self, base: nn.Linear, ranks: list[int], scales: list[float]):
        super().__init__()
        k, r = len(ranks), max(ranks)
        self.base, self.k = base, k
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(k, r, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(k, base.out_features, r, device=dev))
        self.register_buffer("scale", torch.tensor(scales, device=dev).view(k, 1, 1), persistent=False)
        # trial i's samples keep only columns i*r..(i+1)*r; bool, so multiplying needs no cast per call
        mask = torch.eye(k, dtype=torch.bool, device=dev).repeat_interleave(r, dim=1).unsqueeze(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        # under autocast the matmuls run in its dtype (as peft's LoRA layers do): cast the small weights,
        # never the activations; without autocast everything stays in the LoRA's fp32
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = self.lora_A.dtype
        k, r = self.lora_A.shape[:2]
        if self.kernel == "bmm":
            xs = x.reshape(k, -1, x.shape[-1]).to(dtype)
            h = torch.bmm(xs, self.lora_A.to(dtype).transpose(1, 2))
            delta = torch.bmm(h, (self.lora_B * self.scale).to(dtype).transpose(1, 2))
        else:
            a = self.lora_A.to(dtype).reshape(k * r, -1)  # every trial's A: (K*r, in)
            h = nn.functional.linear(x.reshape(-1, x.shape[-1]).to(dtype), a).view(k, -1, k * r)
            h = h * self.mask  # a multiply (not a select): 0 x inf stays NaN, see above
            # every trial's B, scaled in fp32 as "bmm" (and peft) scale it: (out, K*r)
            b = (self.lora_B * self.scale).to(dtype).permute(1, 0, 2).reshape(-1, k * r)
            delta = nn.functional.linear(h.view(-1, k * r), b)
        return out + delta.reshape(out.shape).to(out.dtype)


@contextlib.contextmanager
def per_trial():
    """Inside: every PackedLoRALinear multiplies each trial's samples by that trial's adapter only ("bmm")."""
    kernel = PackedLoRALinear.kernel
    PackedLoRALinear.kernel = "bmm"
    try:
        yield
    finally:
        PackedLoRALinear.kernel = kernel


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
        for name, parent, attr in _targets(base.denoiser, list(settings[0].target_modules)):
            packed = PackedLoRALinear(getattr(parent, attr), self.ranks, [s.lora_alpha / s.rank for s in settings])
            setattr(parent, attr, packed)
            self.layers.append((name, parent, attr, packed))
        if not self.layers:
            raise ConfigError([f"lora.target_modules={settings[0].target_modules} matches no Linear layer of the "
                               f"{base.family.display_name} {base.family.denoiser_part}"])

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

    def use(self, k: int):
        """Inside: trial k's adapter applies to every sample (scoring that trial's checkpoint with a pipeline):
        merged into the base weights, the packed wrappers out of the UNet (`lorafile.merged_into_base`), so the
        UNet is the plain base's, and generation compiled for the baseline serves every checkpoint unchanged."""
        r = self.ranks[k]
        return lorafile.merged_into_base([
            (parent, attr, m, m.base,
             lambda m=m: (m.lora_B[k, :, :r].float() * m.scale[k].float(), m.lora_A[k, :r].float()))
            for _, parent, attr, m in self.layers])

    def save(self, k: int, folder: Path) -> None:
        lora.save_unet_lora(folder, self.peft_state(k), lora.unet_config(self.settings[k]), self.base.family)

    def remove(self) -> None:
        for _, parent, attr, m in self.layers:
            setattr(parent, attr, m.base)
        self.layers = []


class PackedAdamW:
    """AdamW over packed tensors (trial axis first), torch.optim.AdamW's update per trial with that trial's
    learning rate and weight decay; gradient norms are clipped per trial.

    The update reads its step-dependent numbers (learning rates, bias corrections) from one device tensor that
    `set_hyper` fills without a host sync, so `clip` and `apply` can be captured in a CUDA graph."""

    def __init__(self, params: list[nn.Parameter], trains: list[TrainConfig], ranks: list[int], undo: bool = False):
        firsts = {(t.adam_beta1, t.adam_beta2, t.adam_epsilon) for t in trains}
        if len(firsts) > 1:
            raise ConfigError([f"trials of one pack must share adam_beta1/adam_beta2/adam_epsilon, got {sorted(firsts)}"])
        self.params, self.ranks = params, ranks
        (self.b1, self.b2, self.eps), = firsts
        dev = params[0].device
        k = len(trains)
        self.wd = torch.tensor([t.adam_weight_decay for t in trains], device=dev).view(-1, 1, 1)
        self.max_norm = torch.tensor([t.max_grad_norm for t in trains], device=dev)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = 0
        # rows: lr, lr / bias correction 1, 1 / sqrt(bias correction 2); per trial
        self.hyper = torch.zeros(3, k, 1, 1, device=dev)
        self._host = torch.zeros(3, k, 1, 1, pin_memory=dev.type == "cuda")
        self.norms = torch.zeros(k, device=dev)  # each trial's gradient norm before clipping (the last `clip`)
        # undo: every update first keeps the weights and moments it changes, for `undo` (the dense LoRA kernel
        # mixes all trials' rows in one GEMM, so one trial's non-finite numbers can reach the others' update)
        self._before = [torch.zeros_like(t) for t in (*self.params, *self.m, *self.v)] if undo else None

    @torch.no_grad()
    def clip(self) -> None:
        """torch.nn.utils.clip_grad_norm_ for each trial's own parameters."""
        grads = [p.grad for p in self.params]
        self.norms = norms = torch.stack([torch.linalg.vector_norm(g, dim=(1, 2)) for g in grads]).norm(dim=0)
        coef = torch.clamp(self.max_norm / (norms + 1e-6), max=1.0).view(-1, 1, 1)
        torch._foreach_mul_(grads, [coef] * len(grads))

    def set_hyper(self, lrs: list[float]) -> None:
        """The next step's numbers, copied to the device asynchronously (the pinned buffer is reused only
        after the caller's per-step sync)."""
        self.steps += 1
        bc1, bc2 = 1 - self.b1 ** self.steps, math.sqrt(1 - self.b2 ** self.steps)
        for i, lr in enumerate(lrs):
            self._host[0, i] = lr
            self._host[1, i] = lr / bc1
            self._host[2, i] = 1 / bc2
        self.hyper.copy_(self._host, non_blocking=True)

    @torch.no_grad()
    def apply(self, clear_grads: bool = True) -> None:
        """One AdamW step for every parameter at once (foreach kernels, the trial's numbers broadcast per slice)."""
        n, ps = len(self.params), self.params
        grads = [p.grad for p in ps]
        lr, step_size, inv_bc2 = self.hyper
        if self._before is not None:
            torch._foreach_copy_(self._before, [*ps, *self.m, *self.v])
        torch._foreach_mul_(ps, [1 - lr * self.wd] * n)  # decoupled weight decay
        torch._foreach_lerp_(self.m, grads, 1 - self.b1)
        torch._foreach_mul_(self.v, self.b2)
        torch._foreach_addcmul_(self.v, grads, grads, 1 - self.b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_mul_(denom, [inv_bc2] * n)
        torch._foreach_add_(denom, self.eps)
        update = torch._foreach_div(self.m, denom)
        torch._foreach_mul_(update, [step_size] * n)
        torch._foreach_sub_(ps, update)
        if clear_grads:
            for p in ps:
                p.grad = None

    @torch.no_grad()
    def undo(self) -> None:
        """Back to before the last update (weights, moments, step count); needs `undo=True`."""
        torch._foreach_copy_([*self.params, *self.m, *self.v], self._before)
        self.steps -= 1

    @torch.no_grad()
    def drop(self, k: int) -> None:
        """Trial k out of the pack for good: its adapter and moments zeroed (at learning rate 0 it stays so)."""
        for t in (*self.params, *self.m, *self.v):
            t[k].zero_()

    def step(self, lrs: list[float]) -> None:
        self.set_hyper(lrs)
        self.apply()

    def load_trial(self, k: int, state: dict) -> None:
        """Trial k's moments from a lone trial's AdamW state_dict (the inverse of `trial_state`)."""
        r = self.ranks[k]
        with torch.no_grad():
            for i, (m, v) in enumerate(zip(self.m, self.v)):
                sl = (k, slice(0, r)) if i % 2 == 0 else (k, slice(None), slice(0, r))
                m[sl].copy_(state["state"][i]["exp_avg"])
                v[sl].copy_(state["state"][i]["exp_avg_sq"])

    def trial_state(self, k: int, template: dict) -> dict:
        """Trial k's state in torch.optim.AdamW's state_dict layout (`template`: a lone trial's param group)."""
        r = self.ranks[k]
        state = {}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            sl = (k, slice(0, r)) if i % 2 == 0 else (k, slice(None), slice(0, r))  # A rows / B columns
            state[i] = {"step": torch.tensor(float(self.steps)), "exp_avg": m[sl].clone(), "exp_avg_sq": v[sl].clone()}
        group = {**template, "params": list(range(len(self.params)))}
        return {"state": state, "param_groups": [group]}


def alone_reason(t) -> str | None:
    """Why this trial cannot train through packed adapters at all (None if it can)."""
    checks = [
        (not (t.lora.use_dora or t.lora.train_text_encoder), "DoRA or text-encoder LoRA"),
        (t.train.optimizer == "adamw", "optimizer is not adamw"),
        (t.train.mixed_precision != "fp16", "fp16 needs a loss scaler (bf16 or fp32 packs)"),
        (not t.lora.dropout, "LoRA dropout (its random draws would differ in a pack)"),
    ]
    return next((why for ok, why in checks if not ok), None)


def pack_key(t, resume_step: int) -> tuple:
    """Trials with equal keys can share a pass of the base: same batch shape, LoRA targets, and the same step to
    start from. Lengths and checkpoint intervals may differ: each trial checkpoints on its own schedule and leaves
    the pack at its own last step (recipe.py)."""
    tc = t.train
    return (tc.batch_size, tc.gradient_accumulation, tc.device, tc.mixed_precision, tc.gradient_checkpointing,
            tuple(t.lora.target_modules), resume_step)


def plan(trainings: list[list], resume_step, max_pack: int) -> tuple[list[list[list]], list[tuple[object, str]]]:
    """Split trainings (trainer/planner.py: each a list of the trials it serves, the one it trains first) into
    packs (each at most `max_pack` trainings, order kept) and trials that train alone through peft, each with the
    reason (each such trial trains for itself). `resume_step(trial)` is the step it would resume from (0: a fresh
    start)."""
    packs: dict[tuple, list] = {}
    alone = []
    for group in trainings:
        t = group[0]
        why = alone_reason(t)
        if why is not None:
            alone += [(s, why) for s in group]
        else:
            packs.setdefault(pack_key(t, resume_step(t)), []).append(group)
    chunks = [group[i:i + max_pack] for group in packs.values() for i in range(0, len(group), max_pack)]
    return chunks, alone


def dummy_optimizer(t: TrainConfig) -> torch.optim.Optimizer:
    """Drives a trial's LR schedule (diffusers' schedulers wrap an optimizer) and gives the param-group layout
    a lone trial's AdamW would save."""
    return torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                             weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)



class StepGraph:
    """A whole training step (forward, backward, clipping, AdamW) captured once as a CUDA graph and replayed:
    the inputs are copied into static tensors, the per-trial losses come back in a static tensor.

    At batch sizes like these a step is bound by the CPU launching thousands of small kernels; a replay
    launches them all at once. Shapes never change within a pack, so one capture serves every step."""

    def __init__(self, graph, static_in: list[torch.Tensor], static_out: torch.Tensor):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        for s, x in zip(self.static_in, inputs):
            s.copy_(x)
        self.graph.replay()
        return self.static_out

    @classmethod
    def capture(cls, step, warm, inputs: list[torch.Tensor], params: list[nn.Parameter], warmup: int = 2):
        """(graph, True), or (None, False) with a warning when this model cannot be captured: the caller then
        trains eagerly. `warm` (forward and backward only, no update) runs first, as capture requires."""
        static_in = [x.clone() for x in inputs]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    warm(*static_in)
            torch.cuda.current_stream().wait_stream(side)
            for p in params:
                p.grad = None
            torch.cuda.empty_cache()  # the warm-up's blocks, before the graph takes its own pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step(*static_in)
            return cls(graph, static_in, out), True
        except Exception as exc:  # noqa: BLE001 - any capture failure means: train eagerly
            log.warning("CUDA graph capture failed (%s: %s); this pack trains without graphs "
                        "(train.cuda_graphs=false silences this)", type(exc).__name__, str(exc)[:300])
            for p in params:
                p.grad = None
            torch.cuda.synchronize()
            return None, False
