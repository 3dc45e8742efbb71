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

from trainer import TrialResult, TrialSpec, UserError, instance_photos, train
from trainer.models import resolve_device, resolve_source

from .config import SweepConfig, resolve_path, to_typed

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig) -> float:
    """Train the trial this job describes. Returns its final loss (NaN when it failed).

    Input errors end a single run with exit status 2 and a one-paragraph message; in a multirun they
    fail this trial only (result.json says why) and the next trial starts."""
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    name = hc.job.override_dirname or "default"
    try:
        conf = to_typed(cfg)
        result = run_trial(conf, name, out)
    except UserError as exc:
        log.error("trial %s failed: %s", name, exc)
        _write_result(out, {"name": name, "status": "failed", "error": str(exc)})
        if hc.mode == RunMode.MULTIRUN:
            return math.nan
        sys.exit(2)
    _write_result(out, result.to_json())
    _summary(result)
    return result.final_loss if result.final_loss is not None else math.nan


def run_trial(conf: SweepConfig, name: str, out: Path) -> TrialResult:
    cache_dir = resolve_path(conf.paths, conf.paths.cache_dir)
    # cheap checks first: photos, device, model source; all before any model is loaded
    instance_photos(conf.data)
    resolve_device(conf.train.device)
    resolve_source(conf.model, cache_dir)
    spec = TrialSpec(name=name, lora=conf.lora, train=conf.train, output_dir=out)
    [result] = train([spec], conf.model, conf.data, cache_dir, progress=conf.progress)
    return result


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
