"""The lone recipe: one trial through peft on the shared base, for what packed adapters cannot express (DoRA,
text-encoder LoRA, LoRA dropout, fp16, 8-bit AdamW) or when packing is off.

The same shape as the packed recipe (recipe.py): `setup` / `step` / `checkpoint` / `finish`, driven by `run`. A
non-finite loss raises NonFiniteLossError (train() reports the trial diverged)."""
from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from common import faults, stop
from common.errors import ConfigError, NonFiniteLossError

from . import checkpoint, lora
from .config import DataConfig, ModelConfig, TrainConfig, training_config_hash
from .models import BaseModel
from .objective import Samples, draw, predict, samplers_for, trial_loss
from .record import StepClock, TrialRecord, TrialResult
from .trial import TrialSpec, call_paused, reset_process_state, resumable, save_checkpoint, set_rng_state

log = logging.getLogger("trainer.loop")  # the name these lines have always carried (see trial.py)


def optimizer_problem(optimizer: str, device: torch.device) -> str | None:
    """Why this machine cannot run `optimizer` on `device`, or None: 8-bit AdamW needs CUDA and bitsandbytes. The
    sweep's check says it before anything loads; `train` raises it before the base loads."""
    if optimizer != "adamw8bit":
        return None
    if device.type != "cuda":
        return (f"train.optimizer=adamw8bit runs on CUDA only (bitsandbytes) and this sweep trains on {device.type}: "
                "use train.optimizer=adamw")
    if importlib.util.find_spec("bitsandbytes") is None:
        return ("train.optimizer=adamw8bit needs bitsandbytes: pip install 'sdxl-lora-sweep[cuda]' "
                "(or train.optimizer=adamw)")
    return None


def make_optimizer(t: TrainConfig, params: dict[str, list[torch.nn.Parameter]],
                   denoiser: str) -> torch.optim.Optimizer:
    """AdamW over the trial's LoRA parameters: the denoiser's part at train.lr, the text encoders' at their own."""
    groups = [{"params": ps, "lr": t.lr if name == denoiser else t.te_lr} for name, ps in params.items()]
    kw = {"betas": (t.adam_beta1, t.adam_beta2), "weight_decay": t.adam_weight_decay, "eps": t.adam_epsilon}
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional, CUDA only: imported only when asked for
        except ImportError:
            raise ConfigError(["train.optimizer=adamw8bit needs bitsandbytes: pip install 'sdxl-lora-sweep[cuda]'"]) from None
        return bnb.optim.AdamW8bit(groups, **kw)
    fused = all(p.is_cuda for ps in params.values() for p in ps)
    return torch.optim.AdamW(groups, fused=fused or None, **kw)


class LoneRecipe:
    """One trial alone: its LoRA through peft on the base, optimizer and schedule through accelerate."""

    def __init__(self, base: BaseModel, samples: Samples, spec: TrialSpec, model: ModelConfig, data: DataConfig,
                 precision: str, progress: bool):
        self.base, self.samples, self.spec, self.data, self.progress = base, samples, spec, data, progress
        self.t = spec.train
        self.record = TrialRecord(spec.name, spec.output_dir, pack_size=0)
        self.record.output_dir.mkdir(parents=True, exist_ok=True)
        self.cfg_hash = training_config_hash(model, data, spec.lora, self.t)
        self.accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=self.t.gradient_accumulation,
                                       cpu=base.device.type == "cpu")
        self.clock = StepClock(base.device, first_step_setup=False)
        self.last_checkpoint: str | None = None  # named by a NonFiniteLossError: where to go back to
        self.stopped_at: int | None = None  # the step its hook stopped it at (pruned)

    def run(self) -> TrialResult:
        try:
            self.setup()
            for step in range(self.record.start + 1, self.t.max_steps + 1):
                stop.check()  # a stop asked for (Ctrl-C, SIGTERM): the steps so far are done, checkpoints kept
                self.step(step)
                if step % self.t.checkpoint_every == 0 or step == self.t.max_steps:
                    self.checkpoint(step)
                if self.stopped_at:
                    break
            self.bar.close()
        finally:
            self.finish()
        return self.record.trained("pruned" if self.stopped_at else "finished", self.stopped_at, self.t.max_steps,
                                   self.clock)

    def setup(self) -> None:
        """The trial's LoRA on the base (peft's init under its seed), optimizer, schedule and noise stream, resumed
        from its latest checkpoint if there is one."""
        t, base = self.t, self.base
        torch.manual_seed(t.seed)  # LoRA init and dropout draw from the global generator
        self.params = lora.add_lora(base, self.spec.lora)
        for name in self.params:  # training mode, so that LoRA dropout is active
            getattr(base, name).train()
        if t.gradient_checkpointing:
            base.family.enable_gradient_checkpointing(base.denoiser)
        optimizer = make_optimizer(t, self.params, base.family.denoiser_part)
        scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                  num_training_steps=t.max_steps)
        self.optimizer, self.scheduler = self.accelerator.prepare(optimizer, scheduler)
        self.gen = torch.Generator(device=base.device).manual_seed(t.seed)  # noise and timesteps
        start = 0
        found = resumable(self.spec, self.cfg_hash)
        if found:
            start = self._restore(found[0])
            log.info("trial %s: resumed from %s", self.spec.name, found[0])
        self.flat_params = [p for ps in self.params.values() for p in ps]
        self.samplers = samplers_for(self.samples, t.seed)
        self.record.begin(start)
        self.last_checkpoint = str(self.record.checkpoints()[-1]) if start else None
        self.bar = tqdm(total=t.max_steps, initial=start, desc=f"train {self.spec.name}", unit="step",
                        disable=not self.progress)

    def _restore(self, folder: Path) -> int:
        lora.load_lora_into(self.base, folder, self.spec.lora.train_text_encoder)
        tensors, meta = checkpoint.read_state(folder)
        self.optimizer.load_state_dict(checkpoint.optimizer_state_from_flat(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        set_rng_state(self.gen, tensors)
        return int(meta["step"])

    def step(self, step: int) -> None:
        """One optimizer step (train.gradient_accumulation micro-batches, through accelerate)."""
        t = self.t
        self.clock.start_step()
        total = 0.0
        for micro in range(t.gradient_accumulation):
            with self.accelerator.accumulate(self.base.denoiser):
                loss = self._loss((step - 1) * t.gradient_accumulation + micro)
                self.accelerator.backward(loss)  # accelerate divides by the accumulation steps
                if self.accelerator.sync_gradients:
                    self.accelerator.clip_grad_norm_(self.flat_params, t.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        value = float(total) / t.gradient_accumulation  # one host sync per step: also the NaN check
        self.clock.end_step()
        faults.hit("train_step", self.spec.name)
        if not math.isfinite(value):
            raise NonFiniteLossError(step, value, self.last_checkpoint)
        lr = self.scheduler.get_last_lr()[0]
        self.record.log_step(step, value, lr)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")

    def _loss(self, k: int) -> torch.Tensor:
        """Loss of the trial's k-th micro-batch."""
        noisy, target, steps, tids, prompts = draw(self.base, self.samples, self.t, self.samplers, k, self.gen)
        pred = predict(self.base, noisy, steps, tids, prompts, self.spec.lora.train_text_encoder,
                       self.accelerator.autocast)
        return trial_loss(self.base, pred, target, steps, self.t, self.data, self.samples.klass is not None)

    def checkpoint(self, step: int) -> None:
        """The trial's checkpoint, scored by its hook, which may stop the trial there."""
        saved = save_checkpoint(self.spec, step, self.record.checkpoint_loss(), self.cfg_hash,
                                self.scheduler.get_last_lr()[0], self.optimizer.state_dict(), self.scheduler, self.gen,
                                self._save_lora)
        self.last_checkpoint = str(saved)
        hook = self.spec.on_checkpoint
        if hook is not None and call_paused(hook, step, saved, self.params, self.base):
            self.stopped_at = step
            log.info("trial %s: stopped at step %d (pruned)", self.spec.name, step)

    def _save_lora(self, folder: Path) -> None:
        lora.save_lora(self.base, folder, self.spec.lora.train_text_encoder)

    def finish(self) -> None:
        """The base as train() keeps it between trials: no LoRA, eval mode."""
        lora.remove_lora(self.base)
        for m in (self.base.denoiser, *self.base.text_encoders().values()):
            m.eval()
        if self.t.gradient_checkpointing:
            self.base.denoiser.disable_gradient_checkpointing()
        reset_process_state()
