"""What a trial learns from and how: the cached samples, which of them each step draws, the noised micro-batch,
the denoiser's prediction and the loss, the last three as the model's family defines them (families/: `noised`,
`predict`, `loss_per_sample`). Shared by the lone and the packed recipe, so that a trial draws the same numbers and
gets the same loss either way."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

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

    noisy: torch.Tensor  # the denoiser's input: latents with noise added at `timesteps`
    target: torch.Tensor  # what the denoiser is to predict
    timesteps: torch.Tensor
    time_ids: torch.Tensor  # the family's per-image conditioning (SDXL: size and crop)
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
    sample = mean + std * torch.randn(mean.shape, generator=gen, device=mean.device)
    return Draw(*base.family.noised(base, sample, t, gen), tids, prompts)


def predict(base: BaseModel, noisy, steps, tids, prompts, train_te: bool, autocast):
    family = base.family
    with autocast():
        if train_te:  # text encoders change every step: encode again, with gradients
            ids = [torch.cat([p.input_ids[i] for p in prompts]) for i in range(len(prompts[0].input_ids))]
            text = family.encode_tokens(base, tuple(ids))
        else:
            text = {k: torch.cat([p.tensors[k] for p in prompts]) for k in prompts[0].tensors}
        return family.predict(base, noisy, steps, tids, text)


def trial_loss(base: BaseModel, pred, target, steps, t: TrainConfig, data: DataConfig, prior: bool):
    """The family's loss of one trial's micro-batch (instance samples, then class samples with prior
    preservation)."""
    per_sample = base.family.loss_per_sample(base, pred, target, steps, t)
    if not prior:
        return per_sample.mean()
    b = t.batch_size
    return per_sample[:b].mean() + data.prior_loss_weight * per_sample[b:].mean()
