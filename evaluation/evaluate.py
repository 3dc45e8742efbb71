"""evaluate(checkpoints, config) -> metrics per checkpoint, plus the no-LoRA baseline and image grids."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import time
import math
import os
import shutil
import threading
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

import families
from common import compiling, faults, files, stop, timeline
from common.lorafile import LORA_FILE, recorded_sha256, rescaled
from common.device import resolve_device
from common.metrics import (CLIP_I, CLIP_T, FACE_DETECTION_RATE, FACE_SIMILARITY, PAIRWISE_CLIP_I,
                            PRIOR_FACE_SIMILARITY, aggregate)

from . import generate as gen
from . import grid
from .clip import ClipScorer
from .config import SPEED_ONLY, EvalConfig, EvalInputError, entry_name, parse_entry, validate_eval
from .face import FaceBackend, FaceSimilarity, Identity, make_backend
from .overlap import Later, Overlap

log = logging.getLogger(__name__)

BASELINE = "baseline"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
_SCORERS: dict[tuple, ClipScorer] = {}
_BACKENDS: dict[str, FaceBackend] = {}
_IDENTITIES: dict[tuple, Identity] = {}
_NOTED: set = set()  # notes and log lines said once a process
# seconds this process spent generating, scoring, and waiting for scoring that overlap did not hide (the
# generating thread held up by the scoring worker); scoring overlapped with generating is not waiting
TIMES: Counter = Counter()
WAITED = "waited_s"  # metrics.json: seconds callers waited for scoring, over every call (`_add_waited`)
# metrics.json is read, updated and rewritten by a call's scoring thread (`_store`) and by the caller once a call's
# scoring ended (`_add_waited`); a racing round's calls of one trial overlap, so each update holds this
_METRICS_JSON = threading.Lock()
_PENDING: list[Later] = []  # calls whose scoring goes on after they returned (`later`)


def evaluate(checkpoints: Sequence[Path | str], cfg: EvalConfig, *, instance_dir: Path | str, out_dir: Path | str,
             pretrained: str | None = None, pipeline=None, baseline: bool = True, baseline_cache: Path | None = None,
             applied: bool = False, seeds: Sequence[int] | None = None, prior: bool = True, later: bool = False,
             scales: Sequence[float] | None = None, compile_work: int = 0) -> dict[str, dict[str, float]] | Later:
    """Score every checkpoint (a folder with pytorch_lora_weights.safetensors) with the same prompts and seeds.

    The base pipeline is `pipeline` or loaded once from `pretrained`; checkpoints are swapped in and out of it.
    With `applied=True` the one checkpoint given is already on `pipeline`'s UNet (a trainer scoring its adapter
    live) and is not loaded again. Each checkpoint is scored at every LoRA strength of cfg.lora_scales (or
    `scales`, some of them): merged at that strength (`common.lorafile.rescaled`), each (checkpoint, strength) an
    entry of its own. Returns {entry name (`entry_name`: "step-000100", "step-000100_x0.7") or "baseline":
    {metric: value}}; metrics.json in `out_dir` gathers the results of every call, images and grids beside it. With
    `baseline_cache`, the no-LoRA baseline is computed once and reused by later calls.

    Every image is a cell (prompt, seed) whose scores metrics.json keeps; a checkpoint's metrics are those of all
    its cells scored so far (common.metrics.aggregate). `seeds` (a subset of cfg.seeds, default all) are the cells
    this call asks for: a racing round asks for one more seed per prompt, and with `prior=False` not for the
    prior-drift prompt's images (the champion's and runner-up's full protocol does). Cells scored before with the
    same settings are not generated again, so a call after an interruption only makes what is missing.

    With `later` (and eval.overlap) it returns once the images are generated: a `Later` whose `result()` is the
    dict above, scored meanwhile on a worker thread (a trainer trains on); a call borrowing those scores waits.
    eval.compile=auto weighs `compile_work` (the caller's images over all its calls) if more than this call's."""
    if pipeline is None and not pretrained:
        raise EvalInputError("evaluate() needs `pipeline` or `pretrained` (a hub id or local diffusers folder)")
    ckpts = [Path(c) for c in checkpoints]
    if applied and (pipeline is None or len(ckpts) != 1 or baseline):
        raise EvalInputError("evaluate(applied=True) scores the one checkpoint already on `pipeline`, without baseline")
    refs, face = preflight(cfg, instance_dir, ckpts)
    wanted = list(cfg.seeds if seeds is None else seeds)
    if not wanted or any(s not in cfg.seeds for s in wanted):
        raise EvalInputError(f"evaluate(seeds={wanted}): give some of eval.seeds={list(cfg.seeds)}")
    strengths = list(cfg.lora_scales if scales is None else scales)
    if not strengths or any(x not in cfg.lora_scales for x in strengths):
        raise EvalInputError(f"evaluate(scales={strengths}): give some of eval.lora_scales={list(cfg.lora_scales)}")
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device, "eval.device")
    clip = _scorer(cfg.clip_model, device)
    cached = _read_baseline(baseline_cache, cfg, pretrained) if baseline else None
    entries = ([] if (not baseline or cached) else [(BASELINE, None, 1.0)]) + [
        (entry_name(c.name, x), c, x) for c in ckpts for x in strengths]
    weights = {name: sha for name, c, _ in entries if c is not None and (sha := recorded_sha256(c / LORA_FILE))}
    _settle_pending(set(weights.values()))
    rec = _borrow(out_dir, cfg, weights, _earlier(out_dir, cfg))
    stored = rec.get("cells", {})
    drift = face is not None and bool(cfg.prior_prompt)  # the prior-drift prompt is scored at all
    prior = prior and drift
    todo = {name: _missing(stored.get(name, {}), cfg, wanted, prior or (drift and name == BASELINE))
            for name, *_ in entries}
    earlier = rec.get("metrics", {})  # a checkpoint with nothing left to score: its stored metrics
    results: dict[str, dict[str, float]] = {name: earlier[name] for name, *_ in entries if not any(todo[name])}
    todo = {name: s for name, s in todo.items() if any(s)}
    work, fresh, writer = Overlap(cfg.overlap, times=TIMES), {}, None
    if todo:
        pipe, refiner = _pipelines(pipeline, pretrained, device, cfg)
        scorer = _Scorer(cfg, clip, face, _to_tensor([im.resize((224, 224)) for im in refs]), _notes(clip, pretrained))
        writer = grid.Writer()
        try:
            _generate_and_score(pipe, refiner, cfg, scorer, writer, out_dir, applied,
                                [e for e in entries if e[0] in todo], todo, stored, earlier, weights, work, fresh,
                                pretrained, compile_work)
        except BaseException as exc:
            work.__exit__(type(exc), exc, exc.__traceback__)  # what was generated is scored; this error is raised
            writer.__exit__(None, None, None)
            raise

    out: list = []

    def finish() -> None:
        if writer is not None:
            writer.__exit__(None, None, None)  # the PNGs on disk before the checkpoints' grid reads them
        out.append(_conclude({**results, **fresh}, cached, baseline_cache if baseline else None, cfg, pretrained,
                             out_dir))

    work.submit(finish)
    pending = Later(work, out, frozenset(weights.values()), functools.partial(_add_waited, out_dir, cfg))
    if later and work.on:
        _PENDING.append(pending)
        return pending
    return pending.result()


def _pipelines(pipeline, pretrained: str | None, device: torch.device, cfg: EvalConfig):
    """(the base pipeline, the refiner or None): the one given, or loaded once from `pretrained`."""
    if pipeline is None:
        return gen.load_pipeline(pretrained, device, cfg.refiner)
    pipeline.set_progress_bar_config(disable=True)
    if cfg.refiner:
        raise EvalInputError("eval.refiner needs evaluate(pretrained=...) so that the refiner shares its VAE")
    return pipeline, None


def _conclude(results: dict[str, dict[str, float]], cached: dict | None, baseline_cache: Path | None,
              cfg: EvalConfig, pretrained: str | None, out_dir: Path) -> dict[str, dict[str, float]]:
    """After the entries' scores: the cached baseline in front (or the fresh one cached), the checkpoints' grid
    redrawn."""
    if cached:
        results = {BASELINE: cached, **results}
    elif baseline_cache and BASELINE in results:
        _write_json(baseline_cache, {"key": _baseline_key(cfg, pretrained), "metrics": results[BASELINE]})
    _checkpoint_grid(out_dir, cfg, list(_ordered(earlier_results(out_dir, cfg))))
    return results


def _settle_pending(shas: set[str]) -> None:
    """Calls still scoring LoRA files with these sha256 (a trial the same training serves) finish first: their
    scores are borrowed (`_borrow`) instead of generated again."""
    _PENDING[:] = [p for p in _PENDING if p.work.busy()]
    for p in _PENDING:
        if p.keys & shas:
            p.settle()


def _missing(cells: dict, cfg: EvalConfig, seeds: list[int], prior: bool) -> tuple[list[int], list[int]]:
    """(seeds whose prompt images are not all scored, seeds whose prior-drift image is not, if it is asked for)."""
    prompts = [s for s in seeds if not all(cell_key(p, s) in cells for p in range(len(cfg.prompts)))]
    return prompts, [s for s in seeds if prior and f"prior_s{s}" not in cells]


def _generate_and_score(pipe, refiner, cfg: EvalConfig, scorer: _Scorer, writer, out_dir: Path, applied: bool,
                        entries, todo: dict[str, tuple[list[int], list[int]]], stored: dict[str, dict],
                        earlier: dict[str, dict[str, float]], weights: dict[str, str], work: Overlap,
                        results: dict[str, dict[str, float]], source: str | None = None,
                        compile_work: int = 0) -> None:
    """Each entry's missing cells generated (its LoRA merged in) and handed to `work` to be scored, its images and
    grids written, its metrics put in `results` and metrics.json (updated after each entry, so an interruption
    loses at most the entries in progress). With eval.overlap, an entry is scored on a worker thread while the
    next one generates (evaluation/overlap.py). `source`: the base model's hub id or folder, which says whether
    the compile cache is warm for it; `compile_work`: see evaluate."""
    planned = max(compile_work, sum(len(a) * len(cfg.prompts) + len(b) for a, b in todo.values()))
    key = compiling.generation_key(source, cfg.resolution, pipe.device) if source else None
    warm = compiling.is_warm(key)
    fast = compiling.want_compile(cfg.compile, pipe.device, planned, compiling.COMPILE_IMAGES, warm)
    if fast and (key, warm) not in _NOTED:  # once a process: whether the sweep pays for compiling or loads it
        _NOTED.add((key, warm))
        log.info("eval.compile: generating with compiled regions (compile cache %s: %s)",
                 "warm" if warm else "cold", compiling.cache_folder())
    family = families.of_pipeline(pipe)
    with family.compiled_for_generation(families.denoiser_of(pipe), fast, key):
        for ckpt, group in itertools.groupby(entries, key=lambda e: e[1]):  # a checkpoint loaded once, all strengths
            with gen.LoraSwap(pipe, None if applied else ckpt):
                for name, _, scale in group:
                    stop.check()  # a stop asked for: the entries scored so far are in metrics.json
                    with rescaled(scale):
                        made = _generate_entry(pipe, refiner, _compiled_batches(cfg) if fast else cfg, writer,
                                               out_dir, name, ckpt, todo[name], _compiled_shapes(cfg) if fast else None)
                    work.submit(functools.partial(_score_and_store, made, cfg, scorer, writer, out_dir, stored,
                                                  earlier, weights, results))
    if fast and ("cache", key) not in _NOTED:  # once: whether the compiled code came from the cache or was compiled
        _NOTED.add(("cache", key))
        from torch._dynamo.utils import counters

        counts = counters["inductor"]
        log.info("eval.compile: %d compiled graph(s) loaded from the cache, %d compiled now",
                 counts["fxgraph_cache_hit"], counts["fxgraph_cache_miss"])


def _compiled_batches(cfg: EvalConfig) -> EvalConfig:
    """Compiled generation has one graph per batch shape (static shapes), each compiled once, so every call of a
    sweep generates in batches of one size: one seed's images (its prompts and the prior-drift prompt), where that
    fits eval.batch_size. A race's calls (a round: one seed; the champion's missing seeds; the baseline's four)
    then share graphs: one per kind of call (with or without the prior-drift prompt) instead of one for each of 6, 8
    and 9 images."""
    per_seed = len(cfg.prompts) + bool(cfg.prior_prompt)
    return replace(cfg, batch_size=per_seed) if per_seed <= cfg.batch_size else cfg


def _drifts(cfg: EvalConfig) -> bool:
    """Whether compiled calls generate the prior-drift prompt (faces are scored and it is set)."""
    return bool(cfg.prior_prompt) and cfg.face_backend != "none"


def _compiled_shapes(cfg: EvalConfig) -> frozenset[int] | None:
    """The batch sizes compiled generation has graphs for (`compile_generation` makes them): one seed's prompts,
    and with the prior-drift prompt when faces are scored; None (any) where one seed's images exceed
    eval.batch_size (`_compiled_batches` leaves the batches as they are)."""
    if len(cfg.prompts) + bool(cfg.prior_prompt) > cfg.batch_size:
        return None
    return frozenset({len(cfg.prompts), len(cfg.prompts) + _drifts(cfg)})


def _batch_sizes(images: int, at_most: int) -> set[int]:
    """The sizes of the batches `generate.generate` splits `images` into: `generate.batch_size`, and the rest."""
    if images == 0:
        return set()
    size = gen.batch_size(images, at_most)
    return {size, images - size * (math.ceil(images / size) - 1)}


def _shaped(shapes: frozenset[int] | None, images: int, batch_size: int):
    """Inside: compiled regions run eagerly where a call would make a batch they have no graph for (`shapes`;
    None: not compiled), e.g. a champion's prior-drift images alone: a graph for their batch of 4 cost ~60 s of
    compiling on an H100, for 4 images."""
    if shapes is None or _batch_sizes(images, batch_size) <= shapes:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def compile_generation(pipe, cfg: EvalConfig, key: str | None) -> list[int]:
    """The pipeline's generation regions compiled at the batch shapes compiled evaluate calls use
    (`_compiled_batches`: one seed's prompts with the prior-drift prompt, when faces are scored, and without it),
    each run for 2 denoising steps; `key` (common.compiling.generation_key) marked warm after. Returns the batch
    sizes run. What sweep/precompile.py runs in a second process while a sweep trains."""
    cfg = replace(_compiled_batches(cfg), num_inference_steps=2)
    cfg = replace(cfg, seeds=cfg.seeds[:1])
    sizes = []
    with families.of_pipeline(pipe).compiled_for_generation(families.denoiser_of(pipe), True, key):
        for prior in ([True] if _drifts(cfg) else []) + [False]:
            sizes.append(len(cfg.prompts) + prior)
            log.info("compiling generation: %d image(s) per batch", sizes[-1])
            _generate(pipe, None, cfg, "precompile", cfg.prior_prompt, cfg.seeds if prior else [])
    return sizes


@dataclass(frozen=True)
class _Made:
    """One entry's freshly generated images, waiting to be scored."""
    name: str
    sub: EvalConfig  # cfg at the prompt seeds generated
    images: dict[str, list[Image.Image]]
    prior: list[Image.Image]
    prior_seeds: list[int]
    generate_s: float


def _generate_entry(pipe, refiner, cfg: EvalConfig, writer, out_dir: Path, name: str, ckpt, todo,
                    shapes: frozenset[int] | None = None) -> _Made:
    """One entry's missing cells generated with what is on the UNet now (compiled for batches of `shapes`), their
    PNGs handed to the writer."""
    tic = time.perf_counter()
    prompt_seeds, prior_seeds = todo
    sub = replace(cfg, seeds=prompt_seeds)
    images, prior = _generate(pipe, refiner, sub, name, cfg.prior_prompt, prior_seeds, shapes)
    made = _Made(name, sub, images, prior, list(prior_seeds), time.perf_counter() - tic)
    TIMES["generate_s"] += made.generate_s
    if ckpt is not None:
        faults.hit("evaluate", str(out_dir))  # images generated, not yet scored (tests/test_faults.py)
    for arm, ims in images.items():  # written while the next images are scored and generated
        for k, im in enumerate(ims):  # every image, for people who want to look closer (fast PNG level)
            p, s = divmod(k, len(sub.seeds))
            writer.save(im, out_dir / "images" / name / f"{arm}_p{p}_s{sub.seeds[s]}.png", compress_level=1)
    return made


def _score_and_store(made: _Made, cfg: EvalConfig, scorer: _Scorer, writer, out_dir: Path,
                     stored: dict[str, dict], earlier: dict[str, dict[str, float]], weights: dict[str, str],
                     results: dict[str, dict[str, float]]) -> None:
    """One entry's images scored (`_score_entry`), its metrics put in `results` and metrics.json."""
    name = made.name
    results[name], cells, seconds = _score_entry(made, cfg, scorer, writer, out_dir, name, stored, earlier)
    _store(out_dir, cfg, scorer.notes, {name: results[name]}, {name: cells}, {name: seconds},
           {name: weights[name]} if name in weights else {})


def _score_entry(made: _Made, cfg: EvalConfig, scorer: _Scorer, writer, out_dir: Path, name: str,
                 stored: dict[str, dict], earlier: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict, dict]:
    """One entry's fresh images scored, its grids written: (its metrics over every cell it has, those cells, the
    time it took)."""
    tic = time.perf_counter()
    images, prior, sub = made.images, made.prior, made.sub
    cells = {**stored.get(name, {}), **scorer.cells(images, prior, sub, made.prior_seeds)}
    fresh = {(arm, p, s): im for arm, ims in images.items()
             for k, im in enumerate(ims) for p, s in [(k // len(sub.seeds), sub.seeds[k % len(sub.seeds)])]}
    metrics = {**earlier.get(name, {}), **aggregate(cells.values()),
               **_set_metrics(scorer, cfg, out_dir, name, [a for a, ims in images.items() if ims], cells, fresh,
                              writer)}
    score_s = time.perf_counter() - tic
    TIMES["score_s"] += score_s
    count = sum(map(len, images.values())) + len(prior or [])
    log.info("eval %s: %s (%d images generated in %.1f s, scored in %.1f s)", name,
             {k: round(v, 4) for k, v in metrics.items()}, count, made.generate_s, score_s)
    return metrics, cells, {"images": count, "generate_s": made.generate_s, "score_s": score_s}


def _store(out_dir: Path, cfg: EvalConfig, notes: list[str], results: dict, cells: dict, seconds: dict,
           weights: dict | None = None, borrowed: dict | None = None) -> None:
    """metrics.json: earlier entries (same settings only) updated with these; times add up over calls. `weights`:
    each entry's LoRA sha256 (what another trial scoring the same file borrows, `_borrow`); `borrowed`: the
    entries whose cells came from another trial's folder, and from where."""
    with _METRICS_JSON:  # read, updated and written whole: another thread may update the same file
        old = _earlier(out_dir, cfg)
        before = old.get("seconds", {})
        for name, s in seconds.items():
            if name in before:
                s = {k: before[name].get(k, 0) + v for k, v in s.items()}
            before[name] = s
        extra = {k: {**old.get(k, {}), **(v or {})} for k, v in (("weights", weights), ("borrowed", borrowed))}
        _write_json(out_dir / "metrics.json", {"metrics": _ordered({**old.get("metrics", {}), **results}),
                                               "notes": notes, "config": _settings(cfg), "seconds": before,
                                               "cells": {**old.get("cells", {}), **cells},
                                               **{k: v for k, v in extra.items() if v},
                                               **({WAITED: old[WAITED]} if WAITED in old else {})})


def _add_waited(out_dir: Path, cfg: EvalConfig, seconds: float) -> None:
    """metrics.json's `waited_s`: the seconds the calls' callers (the generating thread, or training between
    checkpoints) were held up by scoring the overlap did not hide, added up over calls (sweep/phases.py reads it as
    the sweep's waiting). Called once a call's scoring ended; a racing round's next call of the same trial may be
    storing its scores at that moment (on the scoring thread), hence the lock."""
    with _METRICS_JSON:
        rec = _earlier(out_dir, cfg)
        if rec and seconds > 0:
            _write_json(Path(out_dir) / "metrics.json", {**rec, WAITED: rec.get(WAITED, 0.0) + seconds})


def _borrow(out_dir: Path, cfg: EvalConfig, weights: dict[str, str], rec: dict) -> dict:
    """Entries whose very LoRA file (by sha256) another trial of the sweep scored with the same settings, at the
    same strength, on every cell this one has and more: its cells, metrics, images and grids copied here instead
    of generated again (trials one training serves share their checkpoints' files, trainer/planner.py). Returns
    this folder's record with them."""
    mine = rec.get("cells", {})
    wanted = {name: sha for name, sha in weights.items() if name != BASELINE}
    if not wanted:
        return rec
    for donor in sorted(out_dir.parent.parent.glob(f"*/{out_dir.name}")):
        if donor.resolve() == out_dir.resolve() or not (donor / "metrics.json").is_file():
            continue
        # twins hold the same file under the same step folder: its record (a few bytes) says, before the donor's
        # metrics.json (every cell of every checkpoint) is read; most siblings are no twins (every live scoring)
        if not any(recorded_sha256(donor.parent / "checkpoints" / parse_entry(n)[0] / LORA_FILE) == sha
                   for n, sha in wanted.items()):
            continue
        theirs = _earlier(donor, cfg)
        by_sha = {(sha, parse_entry(e)[2]): e for e, sha in theirs.get("weights", {}).items()}
        for name, sha in list(wanted.items()):
            e = by_sha.get((sha, parse_entry(name)[2]))
            cells = theirs.get("cells", {}).get(e or "", {})
            if not e or e not in theirs.get("metrics", {}) or len(cells) <= len(mine.get(name, {})) \
                    or not set(mine.get(name, {})) <= set(cells):
                continue
            _copy_tree(donor / "images" / e, out_dir / "images" / name)
            for grid_file in (donor / "grids").glob(f"{e}_*.png"):
                _copy_file(grid_file, out_dir / "grids" / f"{name}{grid_file.name[len(e):]}")
            _store(out_dir, cfg, rec.get("notes", []), {name: theirs["metrics"][e]}, {name: cells}, {},
                   {name: sha}, {name: f"{donor.parent.name}/{e}"})
            log.info("eval %s: the same LoRA file as %s of %s, scored on %d cell(s): borrowed, not generated again",
                     name, e, donor.parent.name, len(cells))
            del wanted[name]
            rec = _earlier(out_dir, cfg)
            mine = rec.get("cells", {})
    return rec


def _copy_tree(src: Path, dest: Path) -> None:
    for f in sorted(src.glob("*.png")) if src.is_dir() else []:
        _copy_file(f, dest / f.name)


def _copy_file(src: Path, dest: Path) -> None:
    """A hard link where the file system allows it (the same bytes, no space), else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _generate(pipe, refiner, cfg: EvalConfig, name: str, prior_prompt: str | None, prior_seeds: list[int],
              shapes: frozenset[int] | None = None):
    """The prompts' images at cfg.seeds ({"base": [...]}, with a refiner also {"refined": [...]}) and the
    prior-drift prompt's at `prior_seeds` (a list, empty when none is asked for). Without a refiner, when both
    are asked for the same seeds, the prior prompt rides in the same batches as the others (a batch of its own ran
    at two-thirds the speed). Compiled for batches of `shapes` (None: eager), other batches run eagerly."""
    prior_seeds = list(prior_seeds) if prior_prompt else []
    n, size = len(cfg.prompts) * len(cfg.seeds), cfg.batch_size
    if prior_seeds and prior_seeds == list(cfg.seeds) and refiner is None:
        with _shaped(shapes, n + len(prior_seeds), size):
            both = gen.generate(pipe, None, [*cfg.prompts, prior_prompt], cfg, desc=f"eval {name}")["base"]
        return {"base": both[:n]}, both[n:]
    with _shaped(shapes, n, size):
        images = gen.generate(pipe, refiner, cfg.prompts, cfg, desc=f"eval {name}") if cfg.seeds else {"base": []}
    with _shaped(shapes, len(prior_seeds), size):
        prior = gen.generate(pipe, None, [prior_prompt], replace(cfg, seeds=prior_seeds),
                             desc=f"prior {name}")["base"] if prior_seeds else []
    return images, prior


def earlier_results(out_dir: Path | str, cfg: EvalConfig) -> dict[str, dict[str, float]]:
    """What earlier calls with the same settings wrote to `out_dir`/metrics.json (a resumed trial's scores)."""
    return _earlier(out_dir, cfg).get("metrics", {})


def _earlier(out_dir: Path | str, cfg: EvalConfig) -> dict:
    """`out_dir`/metrics.json as earlier calls wrote it (metrics, cells, seconds), if they had the same settings."""
    rec = _read_json(Path(out_dir) / "metrics.json")
    return rec if rec.get("config") == json.loads(json.dumps(_settings(cfg), default=str)) else {}


def _settings(cfg: EvalConfig) -> dict:
    """What decides the scores: the settings without the speed-only ones."""
    return {k: v for k, v in asdict(cfg).items() if k not in SPEED_ONLY}


def _ordered(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Baseline first, then by step."""
    return dict(sorted(results.items(), key=lambda kv: (kv[0] != BASELINE, kv[0])))


def _checkpoint_grid(out_dir: Path, cfg: EvalConfig, names: list[str]) -> None:
    """First prompt x seeds for every checkpoint scored so far (rows), from the saved images (a raced-out
    checkpoint's seeds it was not generated at are left gray)."""
    rows = [n for n in names if any((out_dir / "images" / n / f"base_p0_s{s}.png").is_file() for s in cfg.seeds)]
    if len(rows) < 2:
        return
    ims = [_load(out_dir / "images" / n / f"base_p0_s{s}.png") for n in rows for s in cfg.seeds]
    ims = [_blank() if im is None else im for im in ims]
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
            with timeline.span("embedding the subject's faces"):
                _IDENTITIES[key] = Identity(backend, refs, names)
        except ValueError as exc:
            raise EvalInputError(str(exc)) from None
    return FaceSimilarity(backend, _IDENTITIES[key])


def _scorer(name: str, device: torch.device) -> ClipScorer:
    key = (name, str(device))
    if key not in _SCORERS:
        _SCORERS.clear()
        with timeline.span("loading CLIP"):
            _SCORERS[key] = ClipScorer(name, device)
    return _SCORERS[key]


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


class _Scorer:
    """What scores a call's images: CLIP, the face metric (None when off) and the reference photos."""

    def __init__(self, cfg: EvalConfig, clip: ClipScorer, face: FaceSimilarity | None, refs: torch.Tensor,
                 notes: list[str]):
        self.clip, self.face, self.refs, self.notes = clip, face, refs, notes
        self.scoring = {p: cfg.scoring_prompt(p) for p in cfg.prompts}

    def cells(self, images: dict[str, list[Image.Image]], prior, cfg: EvalConfig,
              prior_seeds: list[int]) -> dict[str, dict[str, float]]:
        """{"p<prompt>_s<seed>": {metric: value}, "prior_s<seed>": {...}} for the images of `cfg.seeds` and the
        prior-drift images of `prior_seeds`: each image's CLIP-T, CLIP-I, face similarity (NaN without a face)
        and detection (1 or 0), per arm."""
        keys = [cell_key(p, s) for p in range(len(cfg.prompts)) for s in cfg.seeds]
        out: dict[str, dict[str, float]] = {k: {} for k in keys}
        for arm, ims in images.items():
            if not ims:
                continue
            suffix = "" if arm == "base" else f"_{arm}"
            t = _to_tensor(ims)
            texts = [self.scoring[p] for p in cfg.prompts for _ in cfg.seeds]
            columns = {CLIP_T: self.clip.text_cells(t, texts), CLIP_I: self.clip.ref_cells(t, self.refs)}
            if self.face is not None:
                sims = self._faces(ims)
                columns[FACE_SIMILARITY] = sims
                columns[FACE_DETECTION_RATE] = [0.0 if math.isnan(v) else 1.0 for v in sims]
            for name, values in columns.items():
                for k, v in zip(keys, values):
                    out[k][name + suffix] = v
        if prior:
            for s, v in zip(prior_seeds, self._faces(prior)):
                out[f"prior_s{s}"] = {PRIOR_FACE_SIMILARITY: v}
        return out

    def _faces(self, images) -> list[float]:
        self.face.reset()
        self.face.update(images)
        if not self.face.compute()["detection_rate"] and images:  # news, unless the images are known noise
            (log.debug if NOISE_NOTE in self.notes else log.warning)("face similarity is NaN: %s", self.face.reason)
        return self.face.per_image()


def cell_key(prompt: int, seed: int) -> str:
    return f"p{prompt}_s{seed}"


def _set_metrics(scorer: _Scorer, cfg: EvalConfig, out_dir: Path, name: str, arms: list[str], cells: dict,
                 fresh: dict, writer) -> dict[str, float]:
    """What needs the images together: each arm's pairwise CLIP-I and its prompts x seeds grid, over every cell
    scored so far (earlier ones read back from their PNGs)."""
    seeds = [s for s in cfg.seeds if cell_key(0, s) in cells]
    out = {}
    for arm in arms:
        ims = [fresh[(arm, p, s)] if (arm, p, s) in fresh else _load(out_dir / "images" / name / f"{arm}_p{p}_s{s}.png")
               for p in range(len(cfg.prompts)) for s in seeds]
        present = [im for im in ims if im is not None]
        out[PAIRWISE_CLIP_I + ("" if arm == "base" else f"_{arm}")] = scorer.clip.pairwise(_to_tensor(present))
        labels = [cfg.scoring_prompt(p) for p in cfg.prompts]
        writer.save(grid.grid([_blank() if im is None else im for im in ims], len(cfg.prompts), len(seeds), labels),
                    out_dir / "grids" / f"{name}_{arm}.png")
    return out


def _load(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        return None


def _blank() -> Image.Image:
    """A cell whose image was never generated (a seed racing did not score for this prompt): said, not left grey."""
    im = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(im).multiline_text((8, 48), "not generated\n(racing did not\nscore this seed)", fill="gray")
    return im


NOISE_NOTE = "the base model has random weights: its images are noise, with no face in them (face similarity NaN)"


def _notes(clip: ClipScorer, pretrained: str | None) -> list[str]:
    notes = []
    if clip.random_weights:
        notes.append("CLIP has random weights (a tiny test model): CLIP-T and CLIP-I carry no meaning here")
    if pretrained and (Path(pretrained) / "RANDOM_WEIGHTS").is_file():
        notes.append(NOISE_NOTE)
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
    files.write_atomic(path, json.dumps(payload, indent=2, default=str))
