"""One Hydra job = one trial: typed config -> checks -> trainer -> result.json in the job folder."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from evaluation import EvalInputError, evaluate, preflight
from trainer import TrialResult, TrialSpec, UserError, instance_photos, train
from trainer.models import resolve_device, resolve_source, shared_pipeline

from .config import SweepConfig, resolve_path, to_typed
from .offline_models import build_clip

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig) -> float:
    """Train the trial this job describes. Returns its final loss (NaN when it failed).

    Input errors end a single run with exit status 2 and a one-paragraph message; in a multirun they
    fail this trial only (result.json says why) and the next trial starts."""
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    name = hc.job.override_dirname or "default"
    # the no-LoRA baseline is generated once per sweep and reused by every trial
    baseline = Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else out) / "baseline_metrics.json"
    try:
        conf = to_typed(cfg)
        result, metrics = run_trial(conf, name, out, baseline)
    except (UserError, EvalInputError) as exc:
        log.error("trial %s failed: %s", name, exc)
        _write_result(out, {"name": name, "status": "failed", "error": str(exc)})
        if hc.mode == RunMode.MULTIRUN:
            return math.nan
        sys.exit(2)
    _write_result(out, {**result.to_json(), "metrics": metrics})
    _summary(result)
    return result.final_loss if result.final_loss is not None else math.nan


def run_trial(conf: SweepConfig, name: str, out: Path, baseline: Path) -> tuple[TrialResult, dict]:
    """Train, then score every checkpoint. Returns the training result and {checkpoint: metrics}."""
    cache_dir = resolve_path(conf.paths, conf.paths.cache_dir)
    # cheap checks first: photos, device, model source, evaluation inputs; all before any model is loaded
    instance_photos(conf.data)
    resolve_device(conf.train.device)
    pretrained = resolve_source(conf.model, cache_dir)
    settings = None
    if conf.eval.enabled:
        clip = build_clip(conf.eval.clip_architecture, cache_dir) if conf.eval.clip_architecture else conf.eval.clip_model
        settings = conf.eval.settings(clip)
        preflight(settings, conf.data.instance_dir)
    spec = TrialSpec(name=name, lora=conf.lora, train=conf.train, output_dir=out)
    [result] = train([spec], conf.model, conf.data, cache_dir, progress=conf.progress)
    if settings is None or not result.checkpoints:
        return result, {}
    # the trainer's loaded base serves generation too (no second copy); the refiner needs the model folder
    pipe = None if settings.refiner else shared_pipeline(conf.model, conf.train.device, conf.train.mixed_precision,
                                                         cache_dir)
    metrics = evaluate(result.checkpoints, settings, instance_dir=conf.data.instance_dir, out_dir=out / "eval",
                       pretrained=pretrained, pipeline=pipe, baseline_cache=baseline)
    return result, metrics


def _write_result(out: Path, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(out / "result.json")


def _summary(r: TrialResult) -> None:
    speed = f", {r.ms_per_step:.0f} ms/step" if r.ms_per_step else ""
    mem = f", peak {r.peak_memory_gib:.1f} GiB" if r.peak_memory_gib else ""
    loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "n/a"
    log.info("trial %s %s after %d steps (final loss %s%s%s); %d checkpoint(s) in %s", r.name, r.status, r.steps,
             loss, speed, mem, len(r.checkpoints), r.output_dir / "checkpoints")
    if r.error:
        log.error("%s", r.error)
