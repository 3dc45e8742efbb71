"""evaluate(checkpoints, config) -> metrics per checkpoint, plus the no-LoRA baseline and image grids."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from common import compiling, faults
from common.device import resolve_device

from . import generate as gen
from . import grid
from .clip import ClipScorer
from .config import SPEED_ONLY, EvalConfig, EvalInputError, validate_eval
from .face import FaceBackend, FaceSimilarity, Identity, make_backend

log = logging.getLogger(__name__)

BASELINE = "baseline"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
_SCORERS: dict[tuple, ClipScorer] = {}
_BACKENDS: dict[str, FaceBackend] = {}
_IDENTITIES: dict[tuple, Identity] = {}
_NOTED: set[str] = set()


def evaluate(checkpoints: Sequence[Path | str], cfg: EvalConfig, *, instance_dir: Path | str, out_dir: Path | str,
             pretrained: str | None = None, pipeline=None, baseline: bool = True,
             baseline_cache: Path | None = None, applied: bool = False) -> dict[str, dict[str, float]]:
    """Score every checkpoint (a folder with pytorch_lora_weights.safetensors) with the same prompts and seeds.

    The base pipeline is `pipeline` or loaded once from `pretrained`; checkpoints are swapped in and out of
    it. With `applied=True` the one checkpoint given is already on `pipeline`'s UNet (a trainer scoring its
    adapter live) and is not loaded again. Returns {checkpoint folder name (or "baseline"): {metric: value}};
    metrics.json in `out_dir` gathers the results of every call, images and grids are saved beside it. With
    `baseline_cache`, the no-LoRA baseline is computed once and reused by later calls."""
    if pipeline is None and not pretrained:
        raise EvalInputError("evaluate() needs `pipeline` or `pretrained` (a hub id or local SDXL folder)")
    ckpts = [Path(c) for c in checkpoints]
    if applied and (pipeline is None or len(ckpts) != 1 or baseline):
        raise EvalInputError("evaluate(applied=True) scores the one checkpoint already on `pipeline`, without baseline")
    refs, face = preflight(cfg, instance_dir, ckpts)
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device, "eval.device")
    clip = _scorer(cfg.clip_model, device)
    if pipeline is None:
        pipe, refiner = gen.load_pipeline(pretrained, device, cfg.refiner)
    else:
        pipe, refiner = pipeline, None
        pipe.set_progress_bar_config(disable=True)
        if cfg.refiner:
            raise EvalInputError("eval.refiner needs evaluate(pretrained=...) so that the refiner shares its VAE")
    notes = _notes(clip, pretrained)
    ref_tensor = _to_tensor([im.resize((224, 224)) for im in refs])
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, dict[str, float]] = {}  # where the time went, per entry (metrics.json)
    cached = _read_baseline(baseline_cache, cfg, pretrained) if baseline else None
    entries = ([] if (not baseline or cached) else [(BASELINE, None)]) + [(c.name, c) for c in ckpts]
    planned = len(entries) * cfg.images_per_checkpoint()
    fast = compiling.want_compile(cfg.compile, device, planned, compiling.COMPILE_IMAGES)
    with grid.Writer() as writer, compiling.compiled_for_generation(pipe.unet, fast):
        for name, ckpt in entries:
            tic = time.perf_counter()
            with gen.LoraSwap(pipe, None if applied else ckpt, cfg.lora_scale):
                images, prior = _generate(pipe, refiner, cfg, name, cfg.prior_prompt if face is not None else None)
            generated = time.perf_counter()
            if ckpt is not None:
                faults.hit("evaluate", str(out_dir))  # images generated, not yet scored (tests/test_faults.py)
            for arm, ims in images.items():  # written while the next images are scored and generated
                labels = [cfg.scoring_prompt(p) for p in cfg.prompts]
                writer.save(grid.grid(ims, len(cfg.prompts), len(cfg.seeds), labels),
                            out_dir / "grids" / f"{name}_{arm}.png")
                for k, im in enumerate(ims):  # every image, for people who want to look closer (fast PNG level)
                    p, s = divmod(k, len(cfg.seeds))
                    writer.save(im, out_dir / "images" / name / f"{arm}_p{p}_s{cfg.seeds[s]}.png", compress_level=1)
            results[name] = _score(images, prior, cfg, clip, face, ref_tensor)
            done = time.perf_counter()
            count = sum(map(len, images.values())) + len(prior or [])
            seconds[name] = {"images": count, "generate_s": generated - tic, "score_s": done - generated}
            log.info("eval %s: %s (%d images generated in %.1f s, scored in %.1f s)", name,
                     {k: round(v, 4) for k, v in results[name].items()}, count, generated - tic, done - generated)
    if cached:
        results = {BASELINE: cached, **results}
    elif baseline and baseline_cache:
        _write_json(baseline_cache, {"key": _baseline_key(cfg, pretrained), "metrics": results[BASELINE]})
    gathered = _gather(out_dir, cfg, results)
    seconds = {**_read_json(out_dir / "metrics.json").get("seconds", {}), **seconds}
    _write_json(out_dir / "metrics.json", {"metrics": gathered, "notes": notes, "config": _settings(cfg),
                                           "seconds": seconds})
    _checkpoint_grid(out_dir, cfg, list(gathered))
    return results


def _generate(pipe, refiner, cfg: EvalConfig, name: str, prior_prompt: str | None):
    """The prompts' images ({"base": [...]}, with a refiner also {"refined": [...]}) and the prior-drift images
    (None without a prior prompt). Without a refiner the prior prompt rides in the same batches as the others
    (a batch of its own ran at two-thirds the speed)."""
    if prior_prompt and refiner is None:
        both = gen.generate(pipe, None, [*cfg.prompts, prior_prompt], cfg, desc=f"eval {name}")["base"]
        n = len(cfg.prompts) * len(cfg.seeds)
        return {"base": both[:n]}, both[n:]
    images = gen.generate(pipe, refiner, cfg.prompts, cfg, desc=f"eval {name}")
    prior = gen.generate(pipe, None, [prior_prompt], cfg, desc=f"prior {name}")["base"] if prior_prompt else None
    return images, prior


def earlier_results(out_dir: Path | str, cfg: EvalConfig) -> dict[str, dict[str, float]]:
    """What earlier calls with the same settings wrote to `out_dir`/metrics.json (a resumed trial's scores)."""
    rec = _read_json(Path(out_dir) / "metrics.json")
    return rec.get("metrics", {}) if rec.get("config") == json.loads(json.dumps(_settings(cfg), default=str)) else {}


def _settings(cfg: EvalConfig) -> dict:
    """What decides the scores: the settings without the speed-only ones."""
    return {k: v for k, v in asdict(cfg).items() if k not in SPEED_ONLY}


def _gather(out_dir: Path, cfg: EvalConfig, new: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Earlier results (same settings only) updated with this call's, baseline first, then by step."""
    merged = {**earlier_results(out_dir, cfg), **new}
    return dict(sorted(merged.items(), key=lambda kv: (kv[0] != BASELINE, kv[0])))


def _checkpoint_grid(out_dir: Path, cfg: EvalConfig, names: list[str]) -> None:
    """First prompt x seeds for every checkpoint scored so far (rows), from the saved images."""
    rows = [n for n in names if (out_dir / "images" / n / f"base_p0_s{cfg.seeds[0]}.png").is_file()]
    if len(rows) < 2:
        return
    ims = []
    for n in rows:
        for s in cfg.seeds:
            with Image.open(out_dir / "images" / n / f"base_p0_s{s}.png") as im:
                ims.append(im.convert("RGB"))
    grid.save(grid.grid(ims, len(rows), len(cfg.seeds), rows), out_dir / "grids" / "checkpoints_prompt0.png")


def preflight(cfg: EvalConfig, instance_dir: Path | str, checkpoints: Sequence[Path] = ()):
    """Every check that needs no image generation: settings, LoRA files, reference photos and their faces,
    the face backend. Run it before training too, so bad input never costs GPU time."""
    problems = validate_eval(cfg)
    if problems:
        raise EvalInputError("; ".join(problems))
    for c in checkpoints:
        try:
            gen.check_lora_file(c)
        except gen.LoraFileError as exc:
            raise EvalInputError(str(exc)) from None
    folder = Path(instance_dir).expanduser()  # data.instance_dir="~/photos/me": as the trainer reads it
    refs, names = load_references(folder)
    return refs, _face_metric(cfg, folder, refs, names)


def load_references(folder: Path) -> tuple[list[Image.Image], list[str]]:
    if not folder.is_dir():
        raise EvalInputError(f"instance photos folder {folder} does not exist")
    refs, names = [], []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(p) as im:
                refs.append(ImageOps.exif_transpose(im).convert("RGB"))
            names.append(p.name)
        except OSError as exc:
            log.warning("reference photo %s skipped: %s", p, exc)
    if not refs:
        raise EvalInputError(f"no readable photos in {folder}: CLIP-I and face identity need the instance photos")
    return refs, names


def _face_metric(cfg: EvalConfig, folder: Path, refs, names) -> FaceSimilarity | None:
    if cfg.face_backend == "none":
        return None
    if cfg.face_backend not in _BACKENDS:
        try:
            _BACKENDS[cfg.face_backend] = make_backend(cfg.face_backend)
        except ImportError as exc:
            raise EvalInputError(str(exc)) from None
    backend = _BACKENDS[cfg.face_backend]
    # the identity is embedded once per set of photos (preflight before training, then every evaluate call)
    key = (cfg.face_backend, str(folder.resolve()),
           tuple((n, (folder / n).stat().st_mtime_ns, (folder / n).stat().st_size) for n in names))
    if key not in _IDENTITIES:
        try:
            _IDENTITIES[key] = Identity(backend, refs, names)
        except ValueError as exc:
            raise EvalInputError(str(exc)) from None
    return FaceSimilarity(backend, _IDENTITIES[key])


def _scorer(name: str, device: torch.device) -> ClipScorer:
    key = (name, str(device))
    if key not in _SCORERS:
        _SCORERS.clear()
        _SCORERS[key] = ClipScorer(name, device)
    return _SCORERS[key]


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def _score(images, prior, cfg: EvalConfig, clip: ClipScorer, face: FaceSimilarity | None, refs) -> dict[str, float]:
    scoring = [cfg.scoring_prompt(p) for p in cfg.prompts for _ in cfg.seeds]
    m: dict[str, float] = {}
    for arm, ims in images.items():
        suffix = "" if arm == "base" else f"_{arm}"
        t = _to_tensor(ims)
        m["clip_t" + suffix] = clip.text(t, scoring)
        m["clip_i" + suffix] = clip.image_to_refs(t, refs)
        m["pairwise_clip_i" + suffix] = clip.pairwise(t)
        if face is not None:
            face.reset()
            face.update(ims)
            f = face.compute()
            m["face_similarity" + suffix] = float(f["similarity"])
            m["face_detection_rate" + suffix] = float(f["detection_rate"])
            if face.reason:
                log.warning("face similarity is NaN: %s", face.reason)
    if prior is not None:
        face.reset()
        face.update(prior)
        m["prior_face_similarity"] = float(face.compute()["similarity"])
    return m


def _notes(clip: ClipScorer, pretrained: str | None) -> list[str]:
    notes = []
    if clip.random_weights:
        notes.append("CLIP has random weights (a tiny test model): CLIP-T and CLIP-I carry no meaning here")
    if pretrained and (Path(pretrained) / "RANDOM_WEIGHTS").is_file():
        notes.append("the base model has random weights: its images are noise")
    for n in notes:
        if n not in _NOTED:  # once per process, not once per checkpoint
            log.warning(n)
            _NOTED.add(n)
    return notes


def _baseline_key(cfg: EvalConfig, pretrained: str | None) -> str:
    return hashlib.sha256(json.dumps([_settings(cfg), pretrained], sort_keys=True).encode()).hexdigest()[:16]


def _read_baseline(path: Path | None, cfg: EvalConfig, pretrained: str | None) -> dict[str, float] | None:
    if path is None or not Path(path).is_file():
        return None
    rec = json.loads(Path(path).read_text())
    return rec["metrics"] if rec.get("key") == _baseline_key(cfg, pretrained) else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
