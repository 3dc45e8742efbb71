"""Class images for prior preservation: generated once by the base model, cached, shared by every trial."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import DataConfig, stable_hash
from .data import Photo, scan_photos
from .models import BaseModel

log = logging.getLogger(__name__)


def class_photos(base: BaseModel, data: DataConfig, cache_dir: Path, batch: int = 4) -> list[Photo]:
    """The user's class images if `data.class_dir` is set, else images generated from `data.class_prompt`.

    Generated images live in a folder keyed by model, prompt, resolution and steps; a larger
    `num_class_images` later only generates the missing ones. Each file is written atomically."""
    if data.class_dir:
        photos = scan_photos(data.class_dir, key="data.class_dir", resolution=data.resolution, min_images=1,
                             allow_upscale=True)
        if len(photos) < data.num_class_images:
            log.warning("data.class_dir has %d images, fewer than data.num_class_images=%d; using those",
                        len(photos), data.num_class_images)
        return photos[: data.num_class_images]
    folder = Path(cache_dir) / "class_images" / stable_hash(
        {"model": base.fingerprint, "prompt": data.class_prompt, "res": data.resolution,
         "steps": data.class_inference_steps})
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(data.num_class_images) if not (folder / f"{i:05d}.png").is_file()]
    if missing:
        _generate(base, data, folder, missing, batch)
    return scan_photos(str(folder), key="class image cache", resolution=data.resolution,
                       min_images=data.num_class_images, allow_upscale=True)[: data.num_class_images]


@torch.no_grad()
def _generate(base: BaseModel, data: DataConfig, folder: Path, indices: list[int], batch: int) -> None:
    pipe = base.pipeline()
    pipe.set_progress_bar_config(disable=True)
    for s in tqdm(range(0, len(indices), batch), desc=f"class images ({data.class_prompt!r})", unit="batch"):
        chunk = indices[s:s + batch]
        # one seed per image index: the same image whether it is generated in this call or a later top-up
        gens = [torch.Generator(device=base.device).manual_seed(i) for i in chunk]
        images = pipe(prompt=[data.class_prompt] * len(chunk), num_inference_steps=data.class_inference_steps,
                      height=data.resolution, width=data.resolution, generator=gens).images
        for i, im in zip(chunk, images):
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png.tmp")
            os.close(fd)
            im.save(tmp, format="PNG")
            os.replace(tmp, folder / f"{i:05d}.png")
