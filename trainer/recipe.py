"""The packed recipe: every trial of a pack trains in one pass of the base per step (see packed.py).

Shaped like torchtune's recipes: `setup` puts each trial's adapter, optimizer state and schedule in place, `step`
trains every trial one step, `checkpoint` saves and scores each live trial, `finish` gives the base back as it
was; `run` drives them and returns one TrialResult per trial.

On CUDA the whole step after the draw (forward, backward, clipping, AdamW) is captured once as a CUDA graph and
replayed (train.cuda_graphs): no kernel launch and no host sync left in it. Checkpoints are scored live with that
trial's adapter alone on the UNet (Pack.use); a trial its hook stops (pruned) rides along with a zero learning
rate, a diverged one is dropped; the others never see either."""
from __future__ import annotations

import functools
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from common import compiling, faults, stop, timeline
from common.errors import NonFiniteLossError

from . import checkpoint, lora, packed
from .config import DataConfig, ModelConfig, training_config_hash
from .models import BaseModel
from .objective import Draw, Sampler, Samples, draw, predict, samplers_for, trial_loss
from .record import StepClock, TrialRecord, TrialResult
from .trial import TrialSpec, call_paused, reset_process_state, resumable, save_checkpoint

log = logging.getLogger("trainer.loop")  # the name these lines have always carried (see trial.py)


class StepInputs(NamedTuple):
    """One micro-batch of the whole pack, trial-major: the tensors a captured step copies in."""

    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    time_ids: torch.Tensor


@dataclass(frozen=True)
class Stop:
    """Why and at which step a trial left its pack; from then on it rides along at learning rate 0."""

    status: str  # its result's status: "finished" (its own last step, in a pack of longer trials) | "diverged" |
    # "pruned" | "failed"
    step: int
    value: float | None = None  # diverged: the non-finite loss or gradient norm
    what: str | None = None  # diverged: "loss" or "gradient norm"
    error: str | None = None  # failed: its checkpoint hook's error


@dataclass
class Member:
    """A trial a training serves: the one it trains (the longest), or one whose run is its first steps
    (trainer/planner.py), with its own folder, checkpoints, loss log and result."""

    spec: TrialSpec
    config_hash: str
    found: tuple[Path, checkpoint.CheckpointRecord] | None  # the checkpoint it resumes from
    record: TrialRecord
    stop: Stop | None = None  # None: live

    @property
    def live(self) -> bool:
        return self.stop is None

    def due(self, step: int) -> bool:
        """Whether it writes a checkpoint at this step: its own interval, or its last step."""
        t = self.spec.train
        return step % t.checkpoint_every == 0 or step == t.max_steps


@dataclass
class PackedTrial:
    """One training of a pack: everything it owns besides its slice of the packed adapters and AdamW moments, and
    the trials it serves (`members`, the one it trains first)."""

    index: int  # its slice of the pack's adapters, moments and batch
    members: list[Member]
    dummy: torch.optim.Optimizer | None = None  # drives `scheduler`; its param group is a lone trial's layout
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    gen: torch.Generator | None = None  # its noise and timesteps
    samplers: tuple[Sampler, Sampler | None] | None = None
    step_lr: float = 0.0  # the learning rate of its latest step (0 once it left the pack)

    @property
    def spec(self) -> TrialSpec:
        return self.members[0].spec

    @property
    def found(self) -> tuple[Path, checkpoint.CheckpointRecord] | None:
        return self.members[0].found

    @property
    def live(self) -> bool:
        """Whether any trial it serves still needs steps: it trains on while one does."""
        return any(m.live for m in self.members)

    def next_lr(self) -> float:
        return self.scheduler.get_last_lr()[0] if self.live else 0.0


def _copy_lora(source: Path, folder: Path) -> None:
    shutil.copyfile(source, Path(folder) / checkpoint.LORA_FILE)


class PackedRecipe:
    """The trainings of one pack (packed.plan: same batch shape, LoRA targets and resume step), each serving one
    trial or several (trainer/planner.py: trials that are its first steps). The pack runs to its longest trial's
    end; each trial checkpoints on its own interval and at its own last step, where it leaves; a training whose
    trials have all left rides along at learning rate 0 (its adapter zeroed) like a pruned one."""

    def __init__(self, base: BaseModel, samples: Samples, trainings: list[list[TrialSpec]], model: ModelConfig,
                 data: DataConfig, precision: str, progress: bool):
        self.base, self.samples, self.data, self.precision, self.progress = base, samples, data, precision, progress
        specs = [s for group in trainings for s in group]
        self.t0 = specs[0].train  # what packed.pack_key makes every trial of the pack share
        self.max_steps = max(s.train.max_steps for s in specs)  # the pack's end; each trial's own is its spec's
        self.names = [s.name for s in specs]  # the pack's trials, for the fault points (common/faults.py)
        self.trials: list[PackedTrial] = []
        for k, group in enumerate(trainings):  # refuses folders it would overwrite before the base is touched
            members = []
            for s in group:
                cfg_hash = training_config_hash(model, data, s.lora, s.train)
                members.append(Member(s, cfg_hash, resumable(s, cfg_hash),
                                      TrialRecord(s.name, s.output_dir, pack_size=len(trainings),
                                                  training=group[0].name if len(group) > 1 else None)))
            self.trials.append(PackedTrial(k, members))
        first = self.trials[0].found
        self.start = first[1].step if first else 0
        self.accelerator = Accelerator(mixed_precision=precision, cpu=base.device.type == "cpu")
        self.clock = StepClock(base.device, first_step_setup=True)
        self.pack: packed.Pack | None = None
        self.compiled: list = []
        self.graph: packed.StepGraph | None = None
        self.prompts = None  # every sample's prompt, trial-major: the same at every step

    def run(self) -> list[TrialResult]:
        try:
            with timeline.span("setting up packs"):
                self.setup()
            for step in range(self.start + 1, self.max_steps + 1):
                stop.check()  # a stop asked for (Ctrl-C, SIGTERM): the steps so far are done, checkpoints kept
                self.step(step)
                self.checkpoint(step)
                if not any(t.live for t in self.trials):
                    break
            self.bar.close()
        finally:
            self.finish()
        return [self._result(m) for t in self.trials for m in t.members]

    # -- setup

    def setup(self) -> None:
        """The pack's adapters at each trial's initial weights, the UNet ready to train (compiled if it pays), the
        optimizer, each trial's schedule, noise stream and resumed state, the step's form (graph or eager)."""
        inits = [self._initial_weights(t) for t in self.trials]
        self.pack = packed.Pack(self.base, [t.spec.lora for t in self.trials])
        for k, sd in enumerate(inits):
            self.pack.load_initial(k, sd)
        self._prepare_unet()
        # the dense LoRA kernel mixes the trials' rows: a step where one overflows is undone and redone (`_redo`)
        self.mixes = len(self.trials) > 1 and packed.PackedLoRALinear.kernel == "dense"
        self.opt = packed.PackedAdamW(self.pack.params(), [t.spec.train for t in self.trials], self.pack.ranks,
                                      undo=self.mixes)
        for t in self.trials:
            self._schedule(t)
        self.opt.steps = self.start
        for t in self.trials:
            t.samplers = samplers_for(self.samples, t.spec.train.seed)
            for m in t.members:
                m.record.begin(self.start)
        self._choose_step_form()
        self.bar = tqdm(total=self.max_steps, initial=self.start, desc=f"train pack of {len(self.trials)}",
                        unit="step", disable=not self.progress)

    def _initial_weights(self, trial: PackedTrial) -> dict[str, torch.Tensor]:
        """The weights the trial would start from alone: peft's init under its seed, or its checkpoint's."""
        torch.manual_seed(trial.spec.train.seed)
        try:
            lora.add_lora(self.base, trial.spec.lora)
            if trial.found:
                lora.load_lora_into(self.base, trial.found[0], False)
            return {k: v.detach().clone() for k, v in
                    get_peft_model_state_dict(self.base.denoiser, adapter_name=lora.ADAPTER).items()}
        finally:  # also when out of memory: the base goes back plain for the halves the pack is split into
            lora.remove_lora(self.base)

    def _prepare_unet(self) -> None:
        """Train mode, gradient checkpointing and memory format as asked; compiled when that pays."""
        t0, n, denoiser = self.t0, len(self.trials), self.base.denoiser
        denoiser.train()
        if t0.gradient_checkpointing:
            self.base.family.enable_gradient_checkpointing(denoiser)
        if t0.channels_last:
            denoiser.to(memory_format=torch.channels_last)
        # auto: when the pack's remaining trial-steps repay a cold compile; never with gradient checkpointing
        work = 0 if t0.gradient_checkpointing else sum(t.spec.train.max_steps - self.start for t in self.trials)
        if compiling.want_compile(t0.compile, self.base.device, work, self.base.family.compile_pays_at):
            log.info("compiling the UNet's transformer blocks for %d trial(s), %d trial-steps (train.compile=%s)", n,
                     work, "auto" if t0.compile is None else t0.compile)
            self.compiled = self.base.family.compile_for_training(denoiser)

    def _schedule(self, trial: PackedTrial) -> None:
        """The trial's LR schedule and noise stream, and with a checkpoint to resume from, their state and its
        AdamW moments."""
        t = trial.spec.train
        trial.dummy = packed.dummy_optimizer(t)
        trial.scheduler = get_scheduler(t.lr_scheduler, trial.dummy, num_warmup_steps=t.lr_warmup_steps,
                                        num_training_steps=t.max_steps)
        trial.gen = torch.Generator(device=self.base.device).manual_seed(t.seed)
        if trial.found:
            tensors, meta = checkpoint.read_state(trial.found[0])
            self.opt.load_trial(trial.index, checkpoint.optimizer_state_from_flat(tensors, meta["optimizer"]))
            trial.scheduler.load_state_dict(meta["scheduler"])
            trial.gen.set_state(tensors["rng.noise"])
            log.info("trial %s: resumed from %s", trial.spec.name, trial.found[0])

    def _choose_step_form(self) -> None:
        """A captured CUDA graph (one micro-batch per step, on CUDA, if train.cuda_graphs) or eager steps."""
        self.autocast = self.accelerator.autocast
        self.use_graph = (self.t0.cuda_graphs and self.base.device.type == "cuda" and self.t0.gradient_accumulation == 1)
        if self.use_graph:  # a captured graph must not keep autocast's cast cache alive
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            self.autocast = functools.partial(torch.autocast, "cuda", dtype=dtype, enabled=self.precision == "bf16",
                                              cache_enabled=False)

    # -- step

    def step(self, step: int) -> None:
        """One optimizer step of every trial; a trial whose loss or gradient norm is not finite leaves the pack."""
        self.clock.start_step()
        for t in self.trials:
            t.step_lr = t.next_lr()
        lrs = [t.step_lr for t in self.trials]
        ga = self.t0.gradient_accumulation
        micro_inputs = [self._draw((step - 1) * ga + micro) for micro in range(ga)]
        values = self._losses_and_norms(micro_inputs, lrs)
        for t in self.trials:
            t.dummy.step()  # no gradient: nothing moves; keeps the scheduler's call order
            t.scheduler.step()
        self.clock.end_step()
        faults.hit("train_step", self.names)
        n = len(self.trials)
        for t, loss, norm in zip(self.trials, values[:n], values[n:]):
            if t.live:
                self._account(step, t, loss, norm)
        self.bar.update(1)
        self.bar.set_postfix(loss=" ".join(f"{v:.3f}" for v in values[:n]))

    def _draw(self, k: int) -> StepInputs:
        """The pack's k-th micro-batch: every trial's own draw, concatenated trial-major."""
        draws: list[Draw] = [draw(self.base, self.samples, t.spec.train, t.samplers, k, t.gen) for t in self.trials]
        self.prompts = self.prompts or [p for d in draws for p in d.prompts]
        return StepInputs(*(torch.cat([getattr(d, f) for d in draws]) for f in StepInputs._fields))

    def _losses_and_norms(self, micro_inputs: list[StepInputs], lrs: list[float]) -> list[float]:
        """Runs the step: each trial's loss, then each trial's gradient norm, with one host sync for the pack."""
        if self.use_graph:  # one micro-batch
            self.opt.set_hyper(lrs)
            if self.graph is None:
                self.graph, self.use_graph = packed.StepGraph.capture(self._full_step, self._fwd_bwd, micro_inputs[0],
                                                                      self.pack.params())
            out = self.graph(micro_inputs[0]) if self.graph is not None else self._full_step(*micro_inputs[0])
        else:
            out = self._eager_step(micro_inputs, lrs)
        values = out.tolist()
        live = [t.live for t in self.trials] * 2
        if self.mixes and not all(math.isfinite(v) for v, on in zip(values, live) if on):
            values = self._redo(micro_inputs, lrs).tolist()
        return values

    def _fwd_bwd(self, noisy, target, timesteps, time_ids) -> torch.Tensor:
        """Forward and backward of one micro-batch; each trial's loss (trial k's reaches only adapter k)."""
        n = len(self.trials)
        pred = predict(self.base, noisy, timesteps, time_ids, self.prompts, False, self.autocast)
        per = torch.stack([trial_loss(self.base, p, e, s, t.spec.train, self.data, self.samples.klass is not None)
                           for p, e, s, t in zip(pred.chunk(n), target.chunk(n), timesteps.chunk(n), self.trials)])
        (per.sum() / self.t0.gradient_accumulation).backward()
        return per.detach()

    def _full_step(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The step a CUDA graph captures (the learning rates were set before): losses, then gradient norms."""
        per = self._fwd_bwd(*inputs)
        self.opt.clip()
        self.opt.apply(clear_grads=not self.use_graph)  # a captured step keeps its gradient buffers
        return torch.cat([per, self.opt.norms])

    def _eager_step(self, micro_inputs: list[StepInputs], lrs: list[float]) -> torch.Tensor:
        total = sum(self._fwd_bwd(*inputs) for inputs in micro_inputs)
        self.opt.clip()
        self.opt.step(lrs)
        return torch.cat([total / self.t0.gradient_accumulation, self.opt.norms])

    def _redo(self, micro_inputs: list[StepInputs], lrs: list[float]) -> torch.Tensor:
        """The step again after undoing it, each trial through its own adapter only: a trial's non-finite
        numbers reach no other trial's update (0 x inf in the dense kernel's shared GEMMs would). Eagerly: a
        captured step's graph and its memory pool go first (an eager pack beside them may not fit), and the
        next step captures it again."""
        self.opt.undo()
        self.graph = None
        for p in self.pack.params():
            p.grad = None
        if self.base.device.type == "cuda":
            torch.cuda.empty_cache()
        with packed.per_trial(), compiling.eager_stance(self.compiled):
            return self._eager_step(micro_inputs, lrs)

    def _account(self, step: int, trial: PackedTrial, loss: float, norm: float) -> None:
        """A live training's step: logged for each trial it serves still, or, if its loss or gradient norm is not
        finite, the end of them."""
        live = [m for m in trial.members if m.live]
        if math.isfinite(loss) and math.isfinite(norm):
            for m in live:
                m.record.log_step(step, loss, trial.step_lr)
            return
        # its weights are lost (zeroed, at LR 0 from now on); the others never saw them
        what, bad = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        for m in live:
            m.stop = Stop("diverged", step, value=bad, what=what)
            log.error("trial %s (in a pack): %s %s at step %d", m.spec.name, what, bad, step)
        self.opt.drop(trial.index)

    # -- checkpoint

    def checkpoint(self, step: int) -> None:
        """The checkpoint of each live trial due one at this step (its interval, or its last step), each scored by
        its hook, which may stop that trial there; a trial at its last step then leaves. A training's own trial
        writes its checkpoint after those it serves: on disk, theirs at a step are never behind its own (from which
        it resumes), and scores first (theirs are the same weights)."""
        for t in self.trials:
            due = [m for m in t.members if m.live and m.due(step)]
            if not due:
                continue
            # the dummy's param group is the layout a lone trial's AdamW saves
            state = self.opt.trial_state(t.index, t.dummy.state_dict()["param_groups"][0])
            saved, lora_file = {}, None
            for m in sorted(due, key=lambda m: m is t.members[0]):
                # one LoRA file per step, copied for the others: the same bytes, the same recorded sha256 (which is
                # how evaluation and selection know them for one; safetensors' header order varies between saves)
                write = (functools.partial(self.pack.save, t.index) if lora_file is None
                         else functools.partial(_copy_lora, lora_file))
                saved[id(m)] = save_checkpoint(m.spec, step, m.record.checkpoint_loss(), m.config_hash, t.step_lr,
                                               state, t.scheduler, t.gen, write)
                lora_file = lora_file or saved[id(m)] / checkpoint.LORA_FILE
            for m in due:
                if m.spec.on_checkpoint is not None:
                    self._score(step, t, m, saved[id(m)])
                if m.live and step == m.spec.train.max_steps:
                    m.stop = Stop("finished", step)
            if not t.live and step < self.max_steps:  # its trials have all left: it rides along, zeroed
                self.opt.drop(t.index)

    def _score(self, step: int, trial: PackedTrial, member: Member, saved: Path) -> None:
        name = member.spec.name
        try:
            with self.pack.use(trial.index), compiling.eager_stance(self.compiled):
                stop = call_paused(member.spec.on_checkpoint, step, saved, [self.base.family.denoiser_part], self.base)
        except Exception as exc:  # its scoring failed: this trial stops, its pack mates go on
            log.exception("trial %s (in a pack): its checkpoint hook failed at step %d", name, step)
            member.stop = Stop("failed", step, error=f"{type(exc).__name__}: {exc} (at step {step}; {saved} is intact)")
            return  # its checkpoints are written; from now on it only rides along
        if stop:
            member.stop = Stop("pruned", step)
            log.info("trial %s: stopped at step %d (pruned)", name, step)

    # -- finish

    def finish(self) -> None:
        """The base as train() keeps it between packs: plain modules, eager, eval mode, default layout."""
        if self.pack is not None:
            self.pack.remove()
        compiling.uncompile(self.compiled)
        denoiser = self.base.denoiser
        denoiser.eval()
        if self.t0.channels_last:
            denoiser.to(memory_format=torch.contiguous_format)
        if self.t0.gradient_checkpointing:
            denoiser.disable_gradient_checkpointing()
        self.graph = None  # its memory pool goes back before the next pack
        reset_process_state()

    def _result(self, member: Member) -> TrialResult:
        stop, record = member.stop, member.record
        own = member.spec.train.max_steps
        if stop is None or stop.status == "finished":
            return record.trained("finished", None, own, self.clock)
        if stop.status != "diverged":
            return record.trained(stop.status, stop.step, own, self.clock, error=stop.error)
        ckpts = record.checkpoints()
        err = str(NonFiniteLossError(stop.step, stop.value, str(ckpts[-1]) if ckpts else None, stop.what))
        # untimed, with TrialResult's default pack_size of 1: how a pack's diverged trial has always been reported
        return record.untimed("diverged", stop.step, stop.value, err, pack_size=1)
