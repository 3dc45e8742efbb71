"""Photos on disk -> checked, oriented, RGB, resized and cropped tensors with SDXL's size/crop conditioning."""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
Image.MAX_IMAGE_PIXELS = 80_000_000  # larger than any camera photo; refuses decompression bombs


@dataclass(frozen=True)
class Photo:
    path: Path
    width: int  # after EXIF orientation
    height: int
    sha256: str


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and float greyscale (scans, some PNG/TIFF exports) scaled to 8 bits: Pillow's own conversion clips
    them, turning a 16-bit photo almost white."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
        a = a / 257.0 if a.max(initial=0) <= 65535 else a * (255.0 / a.max())
    elif im.mode == "F":
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a * (255.0 / a.max())
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def open_photo(path: Path) -> Image.Image:
    """Decode fully (so truncated files fail here), apply EXIF orientation, convert to RGB (16-bit scaled down,
    CMYK and palette converted, transparency on white)."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I") or im.mode == "F":
            im = _to_8bit(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            bg = Image.new("RGB", im.size, (255, 255, 255))  # transparent pixels become white, not black
            bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
            return bg
        return im.convert("RGB")


def scan_photos(folder: str, *, key: str, resolution: int, min_images: int, allow_upscale: bool) -> list[Photo]:
    """Check a folder of photos before any model is loaded.

    Unreadable files are skipped with a warning; too few usable photos, or photos smaller than the
    training resolution (unless upscaling is allowed), are errors that name the files and the fix."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"{key}={folder!r} does not exist: point it at a folder with 3-20 photos of the subject")
    if not root.is_dir():
        raise DataError(f"{key}={folder!r} is not a folder: point it at a folder of photos")
    files = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    if not files:
        raise DataError(f"{key}={folder!r} is empty: put 3-20 photos of the subject (jpg/png) in it")
    photos, small = [], []
    for p in files:
        if p.is_dir():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            log.warning("skipping %s: not an image file (expected one of %s)", p, sorted(IMAGE_SUFFIXES))
            continue
        try:
            im = open_photo(p)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("skipping %s: cannot be read as an image (%s)", p, exc)
            continue
        if min(im.size) < resolution:
            small.append(f"{p.name} ({im.width}x{im.height})")
        photos.append(Photo(p, im.width, im.height, hashlib.sha256(p.read_bytes()).hexdigest()))
    if small and not allow_upscale:
        raise DataError(f"{len(small)} photo(s) in {key}={folder!r} are smaller than data.resolution={resolution} "
                        f"on their short side: {', '.join(small)}. Use larger photos, lower data.resolution, "
                        "or set data.allow_upscale=true to upscale them (softer results)")
    if small:
        log.warning("upscaling %d photo(s) smaller than %d px: %s", len(small), resolution, ", ".join(small))
    if len(photos) < min_images:
        raise DataError(f"{key}={folder!r} has {len(photos)} usable photo(s), fewer than data.min_images="
                        f"{min_images}: add photos, or lower data.min_images")
    return photos


@dataclass
class Prepared:
    pixels: torch.Tensor  # 3 x R x R in [-1, 1]
    original_size: tuple[int, int]  # (h, w) before resizing, as SDXL was trained
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def prepare(photo: Photo, resolution: int, center_crop: bool, rng: random.Random, flip: bool = False) -> Prepared:
    """Resize the short side to `resolution`, crop a square, optionally mirror; conditioning as SDXL expects."""
    im = open_photo(photo.path)
    original = (im.height, im.width)
    scale = resolution / min(im.size)
    w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BICUBIC)
    if center_crop:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    else:
        top, left = rng.randint(0, h - resolution), rng.randint(0, w - resolution)
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = ImageOps.mirror(im)
        left = w - left - resolution  # the crop's left edge in the mirrored image
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return Prepared(arr, original, (top, left))
