"""The training core: setup / train / save / cleanup for a list of trials that share one base model and data.

Trials of a list that can share a pass of the base train as one pack (packed.py); others run one after
another on the same loaded base and cached tensors."""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr, free_memory
from tqdm.auto import tqdm

from . import cache, checkpoint, compiling, faults, lora, packed
from .config import DataConfig, LoraSettings, ModelConfig, TrainConfig, training_config_hash
from .data import Photo, scan_photos
from .errors import ConfigError, DeviceError, NonFiniteLossError, UserError
from .models import BaseModel, load_base_model, resolve_device, resolve_precision, weight_dtype_for
from .prior import class_photos

log = logging.getLogger(__name__)


@dataclass
class TrialSpec:
    """One fine-tune: its own LoRA shape, optimisation settings and output folder."""

    name: str
    lora: LoraSettings
    train: TrainConfig
    output_dir: Path
    # called after each checkpoint is written, with (step, folder) and the trial's LoRA still on the base (eval
    # mode, training RNG set aside): score it live; True stops the trial there (status "pruned")
    on_checkpoint: Optional[Callable[[int, Path], bool]] = None


@dataclass
class TrialResult:
    name: str
    output_dir: Path
    status: str  # "finished" | "diverged" | "pruned" (stopped by on_checkpoint) | "failed" (error: why)
    steps: int
    final_loss: float | None
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: int | None = None
    error: str | None = None
    seconds: float = 0.0
    ms_per_step: float | None = None  # median wall time of an optimizer step, first steps excluded
    peak_memory_gib: float | None = None  # CUDA allocator peak during the trial (of the whole pack when packed)
    pack_size: int = 1  # trials that trained in one pass of the base with this one (0: alone through peft)
    setup_seconds: float = 0.0  # first step's extra cost: CUDA graph capture and, with train.compile, compiling

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["output_dir"] = str(self.output_dir)
        d["checkpoints"] = [str(c) for c in self.checkpoints]
        return d


@dataclass
class Samples:
    instance: cache.LatentSet
    instance_prompt: cache.PromptEmbeds
    klass: cache.LatentSet | None = None
    class_prompt: cache.PromptEmbeds | None = None


def instance_photos(data: DataConfig) -> list[Photo]:
    return scan_photos(data.instance_dir, key="data.instance_dir", resolution=data.resolution,
                       min_images=data.min_images, allow_upscale=data.allow_upscale)


def prepare_samples(base: BaseModel, data: DataConfig, photos: list[Photo], cache_dir: Path) -> Samples:
    """Everything that does not change between trials, computed once (or read from the cache)."""
    lat = lambda ph: cache.latents(base, ph, data.resolution, data.center_crop, data.crop_seed, data.random_flip, cache_dir)
    s = Samples(lat(photos), cache.prompt_embeddings(base, data.instance_prompt, cache_dir))
    if data.with_prior_preservation:
        s.klass = lat(class_photos(base, data, cache_dir))
        s.class_prompt = cache.prompt_embeddings(base, data.class_prompt, cache_dir)
    return s


def train(trials: list[TrialSpec], model: ModelConfig, data: DataConfig, cache_dir: Path,
          progress: bool = True, pack: bool = True) -> list[TrialResult]:
    """Train every trial on one shared base. A diverging trial is reported in its result, not raised.

    With `pack` (default), trials that can share a pass of the base (same batch shape, schedule length,
    LoRA targets and resume step; see packed.plan) train together in packs of at most train.max_pack, a lone
    trial as a pack of one; trials packed adapters cannot express (DoRA, text-encoder LoRA, dropout, fp16,
    8-bit AdamW) train one after another through peft."""
    if not trials:
        return []
    devices = {(t.train.device, t.train.mixed_precision) for t in trials}
    if len(devices) > 1:
        raise ConfigError([f"trials of one list must share train.device and train.mixed_precision, got {sorted(devices)}"])
    device = resolve_device(trials[0].train.device)
    precision = resolve_precision(trials[0].train.mixed_precision, device)
    if device.type != "cuda" and any(t.train.optimizer == "adamw8bit" for t in trials):
        raise DeviceError("train.optimizer=adamw8bit runs on CUDA only (bitsandbytes); use train.optimizer=adamw "
                          f"on {device.type}")
    photos = instance_photos(data)
    base = load_base_model(model, device, weight_dtype_for(precision), Path(cache_dir))
    samples = prepare_samples(base, data, photos, Path(cache_dir))
    # caches are full: only the UNet (and the text encoders, if a trial trains them) must stay on the GPU
    train_te = any(t.lora.train_text_encoder for t in trials)
    base.encoders_to("cpu", text=not train_te)
    base.encoders_to(base.device, text=train_te, vae=False)
    t0 = trials[0].train
    if pack:
        packs, alone = packed.plan(trials, _resume_step, t0.max_pack)
    else:
        packs, alone = [], [(spec, "packing is off") for spec in trials]
    results: dict[int, TrialResult] = {}
    for group in packs:
        for spec, r in zip(group, _train_fitting(base, samples, group, model, data, precision, progress)):
            results[id(spec)] = r
    for spec, why in alone:
        log.info("trial %s trains alone through peft: %s", spec.name, why)
        try:
            results[id(spec)] = _train_one(base, samples, spec, model, data, precision, progress)
        except NonFiniteLossError as exc:
            log.error("trial %s: %s", spec.name, exc)
            results[id(spec)] = TrialResult(spec.name, spec.output_dir, "diverged", exc.step, exc.loss,
                                            checkpoint.list_checkpoints(spec.output_dir), error=str(exc), pack_size=0)
        except Exception as exc:  # this trial's error (a bad input, out of memory, a bug): the others go on
            if len(trials) == 1:
                raise
            log.error("trial %s failed: %s", spec.name, exc, exc_info=not isinstance(exc, UserError))
            results[id(spec)] = _failed(spec, f"{type(exc).__name__}: {exc}", pack_size=0)
    return [results[id(spec)] for spec in trials]


def _failed(spec: TrialSpec, why: str, pack_size: int) -> TrialResult:
    """The result of a trial that stopped on an error of its own; its finished checkpoints stay (resume)."""
    ckpts = checkpoint.list_checkpoints(spec.output_dir)
    return TrialResult(spec.name, Path(spec.output_dir), "failed", _resume_step(spec), None, ckpts, error=why,
                       pack_size=pack_size)


def _train_fitting(base, samples, group: list[TrialSpec], model, data, precision, progress) -> list[TrialResult]:
    """A pack, or, if it does not fit in GPU memory, its halves (each resuming from any checkpoints the pack wrote;
    they are all at one step), down to single trials; a trial that does not fit alone fails, and the others go on."""
    try:
        return _train_packed(base, samples, group, model, data, precision, progress)
    except torch.OutOfMemoryError as exc:
        if len(group) == 1:
            _reset_process_state()
            return [_failed(group[0], f"out of GPU memory even alone ({exc}). Lower lora.rank or data.resolution, "
                                      "or use preset=low_memory; finished checkpoints are kept", pack_size=1)]
        half = (len(group) + 1) // 2
        log.warning("a pack of %d trials does not fit in GPU memory: packs of %d and %d instead "
                    "(train.max_pack=%d avoids trying)", len(group), half, len(group) - half, half)
        _reset_process_state()
        return (_train_fitting(base, samples, group[:half], model, data, precision, progress)
                + _train_fitting(base, samples, group[half:], model, data, precision, progress))


def _resume_step(spec: TrialSpec) -> int:
    found = checkpoint.latest_valid(spec.output_dir) if spec.train.resume else None
    return found[1].step if found else 0


class Sampler:
    """Which cached image (and flip variant) the k-th sample of a trial is: a pure function of (seed, k).

    Every epoch is a fresh permutation, so resuming needs no sampler state: the step number is enough."""

    def __init__(self, n: int, variants: int, seed: int, salt: int):
        self.n, self.variants, self.seed, self.salt = n, variants, seed, salt
        self._epoch, self._perm, self._flip = -1, None, None

    def __call__(self, k: int) -> tuple[int, int]:
        epoch, pos = divmod(k, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.salt) * 100_019 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._flip = torch.randint(self.variants, (self.n,), generator=g).tolist()
            self._epoch = epoch
        return self._perm[pos], self._flip[pos]

    def on_device(self, first: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Picks first..first+size-1 as index tensors on `device`, from a table copied there a thousand picks at
        a time: a step indexes the cached latents without a host-to-device copy (each would wait for the GPU)."""
        table = getattr(self, "_table", None)
        if table is None or table[0] > first or table[0] + table[1].shape[1] < first + size:
            lo = first - first % 1000
            picks = torch.tensor([self(k) for k in range(lo, lo + max(1000, size + first % 1000))]).T
            self._table = table = (lo, picks.to(device))
        sl = table[1][:, first - table[0]:first - table[0] + size]
        return sl[0], sl[1]


def _batch(lat: cache.LatentSet, sampler: Sampler, first: int, size: int):
    idx, var = sampler.on_device(first, size, lat.mean.device)
    return lat.mean[idx, var], lat.std[idx, var], lat.time_ids[idx, var]


def _draw(base: BaseModel, samples: Samples, t: TrainConfig, samplers: tuple[Sampler, Sampler | None], k: int,
          gen: torch.Generator):
    """A trial's k-th micro-batch: noisy latents, the noise to predict, timesteps, size conditioning, prompts.
    Every random number comes from the trial's own generator in a fixed order, so a trial draws the same
    numbers whether it trains alone or in a pack."""
    b = t.batch_size
    mean, std, tids = _batch(samples.instance, samplers[0], k * b, b)
    prompts = [samples.instance_prompt] * b
    if samples.klass is not None:
        cm, cs, ct = _batch(samples.klass, samplers[1], k * b, b)
        mean, std, tids = torch.cat([mean, cm]), torch.cat([std, cs]), torch.cat([tids, ct])
        prompts += [samples.class_prompt] * b
    n = mean.shape[0]
    dev = mean.device
    lat = (mean + std * torch.randn(mean.shape, generator=gen, device=dev)) * base.vae.config.scaling_factor
    noise = torch.randn(lat.shape, generator=gen, device=dev)
    if t.noise_offset:
        noise = noise + t.noise_offset * torch.randn((n, lat.shape[1], 1, 1), generator=gen, device=dev)
    sched = base.noise_scheduler
    steps = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen, device=dev)
    return sched.add_noise(lat, noise, steps), noise, steps, tids, prompts


def _predict(base: BaseModel, noisy, steps, tids, prompts, train_te: bool, autocast):
    with autocast():
        if train_te:  # text encoders change every step: encode again, with gradients
            ids = [torch.cat([p.input_ids[i] for p in prompts]) for i in (0, 1)]
            emb, pooled = cache.encode_tokens(base, (ids[0], ids[1]))
        else:
            emb = torch.cat([p.prompt_embeds for p in prompts])
            pooled = torch.cat([p.pooled for p in prompts])
        return base.unet(noisy.to(base.weight_dtype), steps, emb,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": tids.to(base.weight_dtype)}).sample


def _trial_loss(base: BaseModel, pred, noise, steps, t: TrainConfig, data: DataConfig, prior: bool):
    """Epsilon-prediction loss of one trial's micro-batch (instance samples, then class samples with prior
    preservation), min-SNR weighted if asked."""
    per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    if t.snr_gamma is not None:  # min-SNR weighting (Hang et al. 2023) for epsilon prediction
        snr = compute_snr(base.noise_scheduler, steps)
        per_sample = per_sample * torch.clamp(snr, max=t.snr_gamma) / snr
    if not prior:
        return per_sample.mean()
    b = t.batch_size
    return per_sample[:b].mean() + data.prior_loss_weight * per_sample[b:].mean()


def _loss(base: BaseModel, samples: Samples, t: TrainConfig, data: DataConfig, train_te: bool,
          samplers: tuple[Sampler, Sampler | None], k: int, gen: torch.Generator, accelerator: Accelerator):
    """Loss of one micro-batch of one trial."""
    noisy, noise, steps, tids, prompts = _draw(base, samples, t, samplers, k, gen)
    pred = _predict(base, noisy, steps, tids, prompts, train_te, accelerator.autocast)
    return _trial_loss(base, pred, noise, steps, t, data, samples.klass is not None)


def _make_optimizer(t: TrainConfig, params: dict[str, list[torch.nn.Parameter]]):
    groups = [{"params": ps, "lr": t.lr if name == "unet" else t.te_lr} for name, ps in params.items()]
    kw = dict(betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(["train.optimizer=adamw8bit needs bitsandbytes: pip install 'sdxl-lora-sweep[cuda]'"]) from None
        return bnb.optim.AdamW8bit(groups, **kw)
    fused = all(p.is_cuda for ps in params.values() for p in ps)
    return torch.optim.AdamW(groups, fused=fused or None, **kw)


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    st = {"rng.noise": gen.get_state(), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["rng.cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(gen: torch.Generator, st: dict[str, torch.Tensor]) -> None:
    gen.set_state(st["rng.noise"])
    torch.set_rng_state(st["rng.torch"])
    if "rng.cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["rng.cuda"])


def _train_one(base: BaseModel, samples: Samples, spec: TrialSpec, model: ModelConfig, data: DataConfig,
               precision: str, progress: bool) -> TrialResult:
    t, out = spec.train, Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_hash = training_config_hash(model, data, spec.lora, t)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=t.gradient_accumulation,
                              cpu=base.device.type == "cpu")
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        torch.manual_seed(t.seed)  # LoRA init and dropout draw from the global generator
        params = lora.add_lora(base, spec.lora)
        for name in params:  # training mode, so that LoRA dropout is active
            getattr(base, name).train()
        if t.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
        optimizer = _make_optimizer(t, params)
        scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                  num_training_steps=t.max_steps)
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        gen = torch.Generator(device=base.device).manual_seed(t.seed)  # noise and timesteps
        start, resumed = 0, None
        found = _resumable(spec, cfg_hash)
        if found:
            start = resumed = _restore(base, found[0], spec, optimizer, scheduler, gen)
            log.info("trial %s: resumed from %s", spec.name, found[0])
        losses = _loop(base, samples, spec, data, params, optimizer, scheduler, gen, accelerator, start, cfg_hash, progress)
    finally:
        lora.remove_lora(base)
        for m in (base.unet, base.text_encoder, base.text_encoder_2):
            m.eval()
        if t.gradient_checkpointing:
            base.unet.disable_gradient_checkpointing()
        _reset_process_state()
    times = losses.pop("_step_seconds")
    stopped = losses.pop("_stopped_at", None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if base.device.type == "cuda" else None
    last = stopped or (t.max_steps if losses else start)
    return TrialResult(spec.name, out, "pruned" if stopped else "finished", last, losses.get(last),
                       checkpoint.list_checkpoints(out), resumed, None, time.perf_counter() - started,
                       1000 * statistics.median(times[2:] or times) if times else None, peak, pack_size=0)


def _reset_process_state() -> None:
    """accelerate's state is process-wide and CUDA memory stays cached: reset both after every trial or pack."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    free_memory()


def _restore(base, folder, spec, optimizer, scheduler, gen) -> int:
    lora.load_lora_into(base, folder, spec.lora.train_text_encoder)
    tensors, meta = checkpoint.read_state(folder)
    optimizer.load_state_dict(checkpoint.optimizer_state_from_flat(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(gen, tensors)
    return int(meta["step"])


def _loop(base, samples, spec, data, params, optimizer, scheduler, gen, accelerator, start, cfg_hash, progress):
    t, out = spec.train, Path(spec.output_dir)
    flat_params = [p for ps in params.values() for p in ps]
    variants = samples.instance.mean.shape[1]
    samplers = (Sampler(len(samples.instance), variants, t.seed, 1),
                Sampler(len(samples.klass), samples.klass.mean.shape[1], t.seed, 2) if samples.klass else None)
    log_path = out / "train_log.jsonl"
    _truncate_log(log_path, start)
    last_ckpt = str(checkpoint.list_checkpoints(out)[-1]) if start else None
    losses: dict = {"_step_seconds": []}
    window: list[float] = []
    bar = tqdm(total=t.max_steps, initial=start, desc=f"train {spec.name}", unit="step", disable=not progress)
    for step in range(start + 1, t.max_steps + 1):
        tic = time.perf_counter()
        total = 0.0
        for micro in range(t.gradient_accumulation):
            with accelerator.accumulate(base.unet):
                loss = _loss(base, samples, t, data, spec.lora.train_text_encoder, samplers,
                             (step - 1) * t.gradient_accumulation + micro, gen, accelerator)
                accelerator.backward(loss)  # accelerate divides by the accumulation steps
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(flat_params, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
        value = float(total) / t.gradient_accumulation  # one host sync per step: also the NaN check
        losses["_step_seconds"].append(time.perf_counter() - tic)
        faults.hit("train_step", spec.name)
        if not math.isfinite(value):
            raise NonFiniteLossError(step, value, last_ckpt)
        losses[step] = value
        window.append(value)
        lr = scheduler.get_last_lr()[0]
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, "loss": value, "lr": lr}) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            saved = _save(spec, step, sum(window) / len(window), cfg_hash, lr, optimizer.state_dict(), scheduler, gen,
                          lambda folder: lora.save_lora(base, folder, spec.lora.train_text_encoder))
            last_ckpt, window = str(saved), []
            if spec.on_checkpoint is not None and _call_paused(spec.on_checkpoint, step, saved, params, base):
                losses["_stopped_at"] = step
                log.info("trial %s: stopped at step %d (pruned)", spec.name, step)
                break
    bar.close()
    return losses


def _call_paused(hook, step: int, folder: Path, params, base: BaseModel) -> bool:
    """The hook with training paused: modules in eval mode (no LoRA dropout) and the RNG streams that drive
    training set aside, so that scoring a checkpoint never changes what the trial trains next."""
    modules = [getattr(base, name) for name in params]
    devices = [base.device] if base.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for m in modules:
            m.eval()
        # the pipeline computes on its accelerator modules' device (diffusers >= 0.40); the text encoders come only
        # to encode prompts not seen before (evaluation.generate.prompt_embeddings), so a sweep's fixed prompts move
        # them once, not per checkpoint
        tic = time.perf_counter()
        base.encoders_to(base.device, text=False)
        try:
            return bool(hook(step, folder))
        finally:
            base.encoders_to("cpu", text=False)  # where train() keeps it
            for m in modules:
                m.train()
            log.info("checkpoint %s scored in %.1f s", folder.name, time.perf_counter() - tic)


def _save(spec: TrialSpec, step: int, loss: float, cfg_hash: str, lr: float, optim_state: dict, scheduler, gen,
          save_lora) -> Path:
    """A checkpoint: the LoRA (written by `save_lora(folder)`), its record, and optimizer/schedule/RNG state in a
    lone trial's layout, whether the trial trained alone or in a pack."""
    tensors, optim_meta = checkpoint.optimizer_state_to_flat(optim_state)
    tensors.update(_rng_state(gen))
    return checkpoint.write_checkpoint(
        spec.output_dir, step, save_lora=save_lora,
        record={"loss": loss, "config_hash": cfg_hash, "trial": spec.name, "lr": lr},
        state_tensors=tensors,
        state_json={"step": step, "optimizer": optim_meta, "scheduler": scheduler.state_dict()},
    )


def _truncate_log(path: Path, step: int) -> None:
    """Keep the loss log consistent with the checkpoint we resume from (drop steps after it)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def _train_packed(base: BaseModel, samples: Samples, specs: list[TrialSpec], model: ModelConfig, data: DataConfig,
                  precision: str, progress: bool) -> list[TrialResult]:
    """All trials of `specs` in one pass of the base per step (see packed.py); one result per trial.

    On CUDA the whole step after the draw (forward, backward, clipping, AdamW) is captured once as a CUDA graph
    and replayed (train.cuda_graphs): no kernel launch and no host sync left in it. Checkpoints are scored live
    with that trial's adapter alone on the UNet (Pack.use); a trial its hook stops (pruned) rides along with a
    zero learning rate, a diverged one is dropped; the others never see either."""
    from peft.utils import get_peft_model_state_dict

    ts = [s.train for s in specs]
    t0, n_trials = ts[0], len(specs)
    outs = [Path(s.output_dir) for s in specs]
    hashes = [training_config_hash(model, data, s.lora, s.train) for s in specs]
    found = [_resumable(s, h) for s, h in zip(specs, hashes)]
    start = found[0][1].step if found[0] else 0
    accelerator = Accelerator(mixed_precision=precision, cpu=base.device.type == "cpu")
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started, pack, compiled, graph = time.perf_counter(), None, [], None
    try:
        inits = []
        for s, f in zip(specs, found):  # each trial starts from the weights it would get alone: peft's init under
            torch.manual_seed(s.train.seed)  # its seed, or its checkpoint's weights
            lora.add_lora(base, s.lora)
            if f:
                lora.load_lora_into(base, f[0], False)
            inits.append({k: v.detach().clone() for k, v in
                          get_peft_model_state_dict(base.unet, adapter_name=lora.ADAPTER).items()})
            lora.remove_lora(base)
        pack = packed.Pack(base, [s.lora for s in specs])
        for k, sd in enumerate(inits):
            pack.load_initial(k, sd)
        base.unet.train()
        if t0.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
        if t0.channels_last:
            base.unet.to(memory_format=torch.channels_last)
        # auto: when the pack's remaining trial-steps repay a cold compile; never with gradient checkpointing
        work = 0 if t0.gradient_checkpointing else n_trials * (t0.max_steps - start)
        if compiling.want_compile(t0.compile, base.device, work, compiling.COMPILE_TRIAL_STEPS):
            log.info("compiling the UNet's transformer blocks for %d trial(s) x %d steps (train.compile=%s)", n_trials,
                     t0.max_steps - start, "auto" if t0.compile is None else t0.compile)
            compiled = compiling.compile_for_training(base.unet)
        # the dense LoRA kernel mixes the trials' rows: a step where one overflows is undone and redone (below)
        mixes = n_trials > 1 and packed.PackedLoRALinear.kernel == "dense"
        opt = packed.PackedAdamW(pack.params(), ts, pack.ranks, undo=mixes)
        dummies = [packed.dummy_optimizer(t) for t in ts]
        scheds = [get_scheduler(t.lr_scheduler, d, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_steps)
                  for t, d in zip(ts, dummies)]
        gens = [torch.Generator(device=base.device).manual_seed(t.seed) for t in ts]
        for k, f in enumerate(found):
            if f:
                tensors, meta = checkpoint.read_state(f[0])
                opt.load_trial(k, checkpoint.optimizer_state_from_flat(tensors, meta["optimizer"]))
                scheds[k].load_state_dict(meta["scheduler"])
                gens[k].set_state(tensors["rng.noise"])
                log.info("trial %s: resumed from %s", specs[k].name, f[0])
        opt.steps = start
        variants = samples.instance.mean.shape[1]
        samplers = [(Sampler(len(samples.instance), variants, t.seed, 1),
                     Sampler(len(samples.klass), samples.klass.mean.shape[1], t.seed, 2) if samples.klass else None)
                    for t in ts]
        for o in outs:
            o.mkdir(parents=True, exist_ok=True)
            _truncate_log(o / "train_log.jsonl", start)
        losses: list[dict[int, float]] = [{} for _ in specs]
        names = [s.name for s in specs]  # the pack's trials, for the fault points (trainer/faults.py)
        windows: list[list[float]] = [[] for _ in specs]
        diverged: dict[int, tuple[int, float]] = {}
        stopped: dict[int, int] = {}  # pruned, or failed: rides along at LR 0
        failed: dict[int, str] = {}
        times: list[float] = []
        ga, prior = t0.gradient_accumulation, samples.klass is not None
        on_cuda = base.device.type == "cuda"
        autocast = accelerator.autocast
        use_graph = t0.cuda_graphs and on_cuda and ga == 1
        if use_graph:  # a captured graph must not keep autocast's cast cache alive
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            autocast = lambda: torch.autocast("cuda", dtype=dtype, enabled=precision == "bf16", cache_enabled=False)  # noqa: E731
        prompts = None

        def fwd_bwd(noisy, noise, steps, tids):
            pred = _predict(base, noisy, steps, tids, prompts, False, autocast)
            per = torch.stack([_trial_loss(base, p, n, st, t, data, prior)
                               for p, n, st, t in zip(pred.chunk(n_trials), noise.chunk(n_trials),
                                                      steps.chunk(n_trials), ts)])
            (per.sum() / ga).backward()  # trial k's loss reaches only adapter k
            return per.detach()

        def full_step(*inputs):
            per = fwd_bwd(*inputs)
            opt.clip()
            opt.apply(clear_grads=not use_graph)  # a captured step keeps its gradient buffers
            return torch.cat([per, opt.norms])

        def eager_step(micro_inputs, lrs):
            total = sum(fwd_bwd(*inputs) for inputs in micro_inputs)
            opt.clip()
            opt.step(lrs)
            return torch.cat([total / ga, opt.norms])

        def redo(micro_inputs, lrs):
            """The step again after undoing it, each trial through its own adapter only: a trial's non-finite
            numbers reach no other trial's update (0 x inf in the dense kernel's shared GEMMs would). Eagerly: a
            captured step's graph and its memory pool go first (an eager pack beside them may not fit), and the
            next step captures it again."""
            nonlocal graph
            opt.undo()
            graph = None
            for p in pack.params():
                p.grad = None
            if on_cuda:
                torch.cuda.empty_cache()
            with packed.per_trial(), compiling.eager_stance(compiled):
                return eager_step(micro_inputs, lrs)

        bar = tqdm(total=t0.max_steps, initial=start, desc=f"train pack of {n_trials}", unit="step",
                   disable=not progress)
        for step in range(start + 1, t0.max_steps + 1):
            tic = time.perf_counter()
            lrs = [0.0 if i in stopped or i in diverged else s.get_last_lr()[0] for i, s in enumerate(scheds)]
            micro_inputs = []
            for micro in range(ga):
                draws = [_draw(base, samples, t, samplers[i], (step - 1) * ga + micro, gens[i]) for i, t in enumerate(ts)]
                prompts = prompts or [p for d in draws for p in d[4]]
                micro_inputs.append([torch.cat([d[j] for d in draws]) for j in range(4)])  # noisy, noise, t, size ids
            if use_graph:  # one micro-batch
                opt.set_hyper(lrs)
                if graph is None:
                    graph, use_graph = packed.StepGraph.capture(full_step, fwd_bwd, micro_inputs[0], pack.params())
                out = graph(micro_inputs[0]) if graph is not None else full_step(*micro_inputs[0])
            else:
                out = eager_step(micro_inputs, lrs)
            values = out.tolist()  # one host sync per step, for the whole pack: losses, then gradient norms
            live = [i % n_trials not in diverged and i % n_trials not in stopped for i in range(2 * n_trials)]
            if mixes and not all(math.isfinite(v) for v, on in zip(values, live) if on):
                values = redo(micro_inputs, lrs).tolist()
            values, norms = values[:n_trials], values[n_trials:]
            for d, s in zip(dummies, scheds):
                d.step()  # no gradient: nothing moves; keeps the scheduler's call order
                s.step()
            times.append(time.perf_counter() - tic)
            faults.hit("train_step", names)
            for i, v in enumerate(values):
                if i in diverged or i in stopped:
                    continue
                if not (math.isfinite(v) and math.isfinite(norms[i])):
                    # its weights are lost (zeroed, at LR 0 from now on); the others never saw them
                    what, bad = ("loss", v) if not math.isfinite(v) else ("gradient norm", norms[i])
                    diverged[i] = (step, bad, what)
                    opt.drop(i)
                    log.error("trial %s (in a pack): %s %s at step %d", specs[i].name, what, bad, step)
                    continue
                losses[i][step] = v
                windows[i].append(v)
                with open(outs[i] / "train_log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "loss": v, "lr": lrs[i]}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=" ".join(f"{v:.3f}" for v in values))
            if step % t0.checkpoint_every == 0 or step == t0.max_steps:
                for i in range(n_trials):
                    if i in diverged or i in stopped:
                        continue
                    # the dummy's param group is the layout a lone trial's AdamW saves
                    state = opt.trial_state(i, dummies[i].state_dict()["param_groups"][0])
                    saved = _save(specs[i], step, sum(windows[i]) / max(len(windows[i]), 1), hashes[i], lrs[i],
                                  state, scheds[i], gens[i], lambda folder, k=i: pack.save(k, folder))
                    windows[i] = []
                    if specs[i].on_checkpoint is not None:
                        try:
                            with pack.use(i), compiling.eager_stance(compiled):
                                stop = _call_paused(specs[i].on_checkpoint, step, saved, {"unet": None}, base)
                        except Exception as exc:  # its scoring failed: this trial stops, its pack mates go on
                            log.exception("trial %s (in a pack): its checkpoint hook failed at step %d", specs[i].name,
                                          step)
                            failed[i] = f"{type(exc).__name__}: {exc} (at step {step}; {saved} is intact)"
                            stopped[i] = step
                            opt.drop(i)  # its checkpoints are written; from now on it only rides along
                            continue
                        if stop:
                            stopped[i] = step
                            opt.drop(i)
                            log.info("trial %s: stopped at step %d (pruned)", specs[i].name, step)
            if len(stopped) + len(diverged) == n_trials:
                break
        bar.close()
    finally:
        if pack is not None:
            pack.remove()
        compiling.uncompile(compiled)
        base.unet.eval()
        if t0.channels_last:
            base.unet.to(memory_format=torch.contiguous_format)
        if t0.gradient_checkpointing:
            base.unet.disable_gradient_checkpointing()
        graph = None  # its memory pool goes back before the next pack
        _reset_process_state()
    peak = torch.cuda.max_memory_allocated() / 2**30 if base.device.type == "cuda" else None
    ms = 1000 * statistics.median(times[2:] or times) if times else None
    setup_s = max(0.0, times[0] - ms / 1000) if times else 0.0  # the first step's extra: capture, compilation
    results = []
    for i, s in enumerate(specs):
        ckpts = checkpoint.list_checkpoints(outs[i])
        if i in diverged:
            at, v, what = diverged[i]
            err = str(NonFiniteLossError(at, v, str(ckpts[-1]) if ckpts else None, what))
            results.append(TrialResult(s.name, outs[i], "diverged", at, v, ckpts, error=err))
            continue
        last = stopped.get(i, t0.max_steps if losses[i] else start)
        status = "failed" if i in failed else "pruned" if i in stopped else "finished"
        results.append(TrialResult(s.name, outs[i], status, last, losses[i].get(last), ckpts, start or None,
                                   failed.get(i), time.perf_counter() - started, ms, peak, n_trials, setup_s))
    return results


def _resumable(spec: TrialSpec, cfg_hash: str):
    """The checkpoint a trial resumes from (None: a fresh start); refuses folders that would be overwritten."""
    out = Path(spec.output_dir)
    checkpoint.clean_partial(out)
    found = checkpoint.latest_valid(out) if spec.train.resume else None
    if found and found[1].config_hash != cfg_hash:
        raise ConfigError([f"{out} holds checkpoints of another configuration (hash {found[1].config_hash}, "
                           f"now {cfg_hash}): use a new output folder, or train.resume=false to start over"])
    if not spec.train.resume and checkpoint.list_checkpoints(out):
        raise ConfigError([f"{out} already holds checkpoints and train.resume=false: choose a new output folder "
                           "(hydra.run.dir=...) so that finished work is not overwritten"])
    return found
