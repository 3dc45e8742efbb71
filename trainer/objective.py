"""What a trial learns from and how: the cached samples, which of them each step draws, the noised micro-batch,
the UNet's prediction and the epsilon-prediction loss. Shared by the lone and the packed recipe, so that a trial
draws the same numbers and gets the same loss either way."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from . import cache
from .config import DataConfig, TrainConfig
from .data import Photo, scan_photos
from .models import BaseModel
from .prior import class_photos


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


def samplers_for(samples: Samples, seed: int) -> tuple[Sampler, Sampler | None]:
    """A trial's instance sampler and, with prior preservation, its class sampler."""
    variants = samples.instance.mean.shape[1]
    return (Sampler(len(samples.instance), variants, seed, 1),
            Sampler(len(samples.klass), samples.klass.mean.shape[1], seed, 2) if samples.klass else None)


class Draw(NamedTuple):
    """One trial's micro-batch: instance samples first, then class samples with prior preservation."""

    noisy: torch.Tensor  # latents with noise added at `timesteps`
    noise: torch.Tensor  # what the UNet is to predict
    timesteps: torch.Tensor
    time_ids: torch.Tensor  # SDXL's size and crop conditioning
    prompts: list[cache.PromptEmbeds]


def _batch(lat: cache.LatentSet, sampler: Sampler, first: int, size: int):
    idx, var = sampler.on_device(first, size, lat.mean.device)
    return lat.mean[idx, var], lat.std[idx, var], lat.time_ids[idx, var]


def draw(base: BaseModel, samples: Samples, t: TrainConfig, samplers: tuple[Sampler, Sampler | None], k: int,
         gen: torch.Generator) -> Draw:
    """A trial's k-th micro-batch. Every random number comes from the trial's own generator in a fixed order, so a
    trial draws the same numbers whether it trains alone or in a pack."""
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
    return Draw(sched.add_noise(lat, noise, steps), noise, steps, tids, prompts)


def predict(base: BaseModel, noisy, steps, tids, prompts, train_te: bool, autocast):
    with autocast():
        if train_te:  # text encoders change every step: encode again, with gradients
            ids = [torch.cat([p.input_ids[i] for p in prompts]) for i in (0, 1)]
            emb, pooled = cache.encode_tokens(base, (ids[0], ids[1]))
        else:
            emb = torch.cat([p.prompt_embeds for p in prompts])
            pooled = torch.cat([p.pooled for p in prompts])
        return base.unet(noisy.to(base.weight_dtype), steps, emb,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": tids.to(base.weight_dtype)}).sample


def trial_loss(base: BaseModel, pred, noise, steps, t: TrainConfig, data: DataConfig, prior: bool):
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
