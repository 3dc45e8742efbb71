"""VAE latents and prompt embeddings (as the model's family computes them), computed once and cached on disk and in memory.

Keys hold everything the tensors depend on (model, photos' bytes, resolution, crop, flip, prompt), so
every trial of a sweep, and every later sweep on the same photos, reuses them."""
from __future__ import annotations

import logging
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import timeline

from .config import stable_hash
from .data import Photo, prepare
from .models import BaseModel

log = logging.getLogger(__name__)

STATS: Counter = Counter()  # how often latents/embeddings were really computed (tests and logs read it)
_MEMORY: dict[str, dict[str, torch.Tensor]] = {}


@dataclass
class LatentSet:
    """Latent distributions of N images in V variants (V=2 with flip: original and mirrored)."""

    mean: torch.Tensor  # N x V x C x h x w
    std: torch.Tensor
    time_ids: torch.Tensor  # N x V x k: the family's per-image conditioning (SDXL: original size, crop, target size)

    def __len__(self) -> int:
        return self.mean.shape[0]


@dataclass
class PromptEmbeds:
    tensors: dict[str, torch.Tensor]  # the family's encode_tokens (SDXL: prompt_embeds 1 x 77 x 2048, pooled 1 x 1280)
    input_ids: tuple[torch.Tensor, ...]  # for text-encoder training, which re-encodes every step


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _cached(kind: str, key: str, cache_dir: Path, compute) -> dict[str, torch.Tensor]:
    mem_key = f"{kind}/{key}"
    if mem_key in _MEMORY:
        return _MEMORY[mem_key]
    path = Path(cache_dir) / kind / f"{key}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(path)
        except Exception as exc:  # a damaged cache file is recomputed, never trusted
            log.warning("recomputing %s: cache file %s unreadable (%s)", kind, path, exc)
            tensors = None
    else:
        tensors = None
    if tensors is None:
        STATS[kind] += 1
        with timeline.span(f"caching {kind}"):
            tensors = compute()
        _atomic_save(tensors, path)
    _MEMORY[mem_key] = tensors
    return tensors


def prompt_embeddings(base: BaseModel, prompt: str, cache_dir: Path) -> PromptEmbeds:
    family = base.family
    ids = family.tokenize(base, prompt)

    @torch.no_grad()
    def compute():
        base.encoders_to(base.device, vae=False)
        return {k: v.float() for k, v in family.encode_tokens(base, ids).items()}

    t = _cached("embeddings", stable_hash({"model": base.fingerprint, "prompt": prompt}), cache_dir, compute)
    dt = base.weight_dtype
    return PromptEmbeds({k: v.to(base.device, dt) for k, v in t.items()}, ids)


def latents(base: BaseModel, photos: list[Photo], resolution: int, center_crop: bool, crop_seed: int,
            flip: bool, cache_dir: Path, batch: int = 4) -> LatentSet:
    key = stable_hash({"model": base.fingerprint, "photos": [p.sha256 for p in photos], "res": resolution,
                       "center": center_crop, "crop_seed": crop_seed, "flip": flip})

    @torch.no_grad()
    def compute():
        variants = (False, True) if flip else (False,)
        items = []
        for i, ph in enumerate(photos):
            for v in variants:  # same crop for both variants: one rng per photo
                items.append(prepare(ph, resolution, center_crop, random.Random(crop_seed * 100_003 + i), flip=v))
        means, stds = [], []
        base.encoders_to(base.device, text=False)
        for s in range(0, len(items), batch):
            m, sd = base.family.encode_pixels(base, torch.stack([it.pixels for it in items[s:s + batch]]))
            means.append(m.float().cpu())
            stds.append(sd.float().cpu())
        n, v = len(photos), len(variants)
        mean = torch.cat(means).reshape(n, v, *means[0].shape[1:])
        std = torch.cat(stds).reshape(n, v, *stds[0].shape[1:])
        cond = [base.family.image_conditioning(it.original_size, it.crop_top_left, resolution) for it in items]
        tids = torch.tensor(cond, dtype=torch.float32).reshape(n, v, len(cond[0]) if cond else 0)
        return {"mean": mean, "std": std, "time_ids": tids}

    t = _cached("latents", key, cache_dir, compute)
    return LatentSet(t["mean"].to(base.device), t["std"].to(base.device), t["time_ids"].to(base.device))


def clear_memory_cache() -> None:
    _MEMORY.clear()
