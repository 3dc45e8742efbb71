"""The training core: a list of trials that share one base model and data, trained on it one pack at a time.

Trials of a list that can share a pass of the base train as one pack (recipe.py, packed.py); others train one
after another through peft (lone.py), on the same loaded base and cached tensors."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from common import stop
from common.errors import ConfigError, DeviceError, NonFiniteLossError, UserError

from . import packed, planner
from .config import DataConfig, ModelConfig
from .lone import LoneRecipe, optimizer_problem
from .models import BaseModel, load_base_model, resolve_device, resolve_precision, weight_dtype_for
from .objective import Sampler, Samples, instance_photos, prepare_samples
from .recipe import PackedRecipe
from .record import TrialRecord, TrialResult
from .trial import TrialSpec, reset_process_state, resume_step

__all__ = ["Sampler", "Samples", "TrialResult", "TrialSpec", "instance_photos", "prepare_samples", "train"]

log = logging.getLogger(__name__)


def train(trials: list[TrialSpec], model: ModelConfig, data: DataConfig, cache_dir: Path,
          progress: bool = True, pack: bool = True) -> list[TrialResult]:
    """Train every trial on one shared base. A diverging trial is reported in its result, not raised.

    With `pack` (default), trials that can share a pass of the base (same batch shape, LoRA targets and resume
    step; lengths and checkpoint intervals may differ; see packed.plan) train together in packs of at most
    train.max_pack, a lone trial as a pack of one; trials packed adapters cannot express (DoRA, text-encoder
    LoRA, dropout, fp16, 8-bit AdamW) train one after another through peft."""
    if not trials:
        return []
    devices = {(t.train.device, t.train.mixed_precision) for t in trials}
    if len(devices) > 1:
        raise ConfigError([f"trials of one list must share train.device and train.mixed_precision, got {sorted(devices)}"])
    device = resolve_device(trials[0].train.device)
    precision = resolve_precision(trials[0].train.mixed_precision, device)
    problems = sorted({p for t in trials if (p := optimizer_problem(t.train.optimizer, device))})
    if problems:
        raise DeviceError("; ".join(problems))
    photos = instance_photos(data)
    stop.check()  # asked while this call waited for its batch: nothing is loaded for it
    base = load_base_model(model, device, weight_dtype_for(precision), Path(cache_dir))
    samples = prepare_samples(base, data, photos, Path(cache_dir))
    # caches are full: only the UNet (and the text encoders, if a trial trains them) must stay on the GPU
    train_te = any(t.lora.train_text_encoder for t in trials)
    base.encoders_to("cpu", text=not train_te)
    base.encoders_to(base.device, text=train_te, vae=False)
    if pack:
        groups = planner.trainings(trials, model, data, resume_step)
        for g in groups:
            if len(g) > 1:
                log.info("trial(s) %s: the first steps of trial %s (a constant learning-rate schedule), written from "
                         "its training", ", ".join(s.name for s in g[1:]), g[0].name)
        packs, alone = packed.plan(groups, resume_step, trials[0].train.max_pack)
    else:
        packs, alone = [], [(spec, "packing is off") for spec in trials]
    results: dict[int, TrialResult] = {}
    for group in packs:
        specs = [s for training in group for s in training]
        for spec, r in zip(specs, _train_fitting(base, samples, group, model, data, precision, progress)):
            results[id(spec)] = r
    for spec, why in alone:
        log.info("trial %s trains alone through peft: %s", spec.name, why)
        results[id(spec)] = _train_alone(base, samples, spec, model, data, precision, progress, len(trials))
    return [results[id(spec)] for spec in trials]


def _train_alone(base: BaseModel, samples: Samples, spec: TrialSpec, model: ModelConfig, data: DataConfig,
                 precision: str, progress: bool, n_trials: int) -> TrialResult:
    """A lone trial's result; its divergence, or its error when other trials share the list, is reported in it."""
    try:
        return LoneRecipe(base, samples, spec, model, data, precision, progress).run()
    except NonFiniteLossError as exc:
        log.error("trial %s: %s", spec.name, exc)
        return TrialRecord(spec.name, spec.output_dir, pack_size=0).untimed("diverged", exc.step, exc.loss, str(exc))
    except Exception as exc:  # this trial's error (a bad input, out of memory, a bug): the others go on
        if n_trials == 1:
            raise
        log.error("trial %s failed: %s", spec.name, exc, exc_info=not isinstance(exc, UserError))
        return _failed(spec, f"{type(exc).__name__}: {exc}", pack_size=0)


def _failed(spec: TrialSpec, why: str, pack_size: int) -> TrialResult:
    """The result of a trial that stopped on an error of its own; its finished checkpoints stay (resume)."""
    return TrialRecord(spec.name, spec.output_dir, pack_size).untimed("failed", resume_step(spec), None, why)


def _train_fitting(base, samples, group: list[list[TrialSpec]], model, data, precision,
                   progress) -> list[TrialResult]:
    """A pack of trainings (each the trials it serves), or, if it does not fit in GPU memory, its halves (each
    resuming from any checkpoints the pack wrote; they are all at one step), down to single trainings; a training
    that does not fit alone fails its trials, and the others go on. One result per trial, in order."""
    try:
        return _train_packed(base, samples, group, model, data, precision, progress)
    except torch.OutOfMemoryError as exc:
        why = str(exc)
    # outside the handler: the exception's frames held the failed pack's tensors (its activations, optimizer state)
    # until here; trying the halves inside it ran them out of memory again on a GPU
    reset_process_state()
    if len(group) == 1:
        return [_failed(s, f"out of GPU memory even alone ({why}). Lower lora.rank or data.resolution, "
                           "or use preset=low_memory; finished checkpoints are kept", pack_size=1)
                for s in group[0]]
    half = (len(group) + 1) // 2
    log.warning("a pack of %d trials does not fit in GPU memory: packs of %d and %d instead "
                "(train.max_pack=%d avoids trying)", len(group), half, len(group) - half, half)
    return (_train_fitting(base, samples, group[:half], model, data, precision, progress)
            + _train_fitting(base, samples, group[half:], model, data, precision, progress))


def _train_packed(base: BaseModel, samples: Samples, trainings: list[list[TrialSpec]], model: ModelConfig,
                  data: DataConfig, precision: str, progress: bool) -> list[TrialResult]:
    """All trainings in one pass of the base per step; one result per trial they serve. (A function of its own so
    that a test can stand in for it: tests/test_packed.py simulates a pack too big for memory.)"""
    return PackedRecipe(base, samples, trainings, model, data, precision, progress).run()
