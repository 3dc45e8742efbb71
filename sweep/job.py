"""One Hydra job = one trial: typed config -> checks -> train -> score -> MLflow child run -> result.json."""
from __future__ import annotations

import json
import logging
import math
import sys
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from evaluation import EvalInputError, evaluate, preflight
from trainer import TrialResult, TrialSpec, UserError, instance_photos, train, training_config_hash
from trainer.models import resolve_device, resolve_source, shared_pipeline

from .config import SweepConfig, resolve_path, to_typed
from .finalize import BASELINE, RESULT, trial_best
from .offline_models import build_clip
from .selection import Candidate
from .tracking import device_name, flatten, git_commit, make_tracker, read_sweep

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig) -> float:
    """Train and score the trial this job describes; record it. Returns its objective (NaN when it failed).

    In a multirun a failing trial (bad input, exception, NaN loss, out of memory) is recorded as FAILED and
    the sweep goes on; a single run ends with exit status 2 on bad input."""
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = Path(hc.sweep.dir).resolve() if multirun else out
    name = trial_name(hc, sweep_dir) if multirun else (hc.job.override_dirname or "default")
    try:
        conf = to_typed(cfg)
    except UserError as exc:
        return _fail(out, name, exc, multirun)
    root = resolve_path(conf.paths, ".")
    tracker = make_tracker(conf.tracking, root)
    sweep = read_sweep(sweep_dir) or tracker.start_sweep(sweep_dir, sweep_dir.name, {"git_commit": git_commit()})
    cfg_hash = training_config_hash(conf.model, conf.data, conf.lora, conf.train)
    done = _finished(out, cfg_hash, conf.train.max_steps)
    if done is not None:
        log.info("trial %s already finished in %s: skipped", name, out)
        return done
    run_id = tracker.child_run(sweep, name, {"sweep": sweep_dir.name, "trial_key": name, "git_commit": git_commit(),
                                             "device": device_name(), "config_hash": cfg_hash})
    tracker.log_params(run_id, flatten(OmegaConf.to_container(cfg, resolve=True)))
    try:
        with tracker.active(run_id):
            result, metrics = run_trial(conf, name, out, sweep_dir / BASELINE)
    except (UserError, EvalInputError) as exc:
        tracker.set_tags(run_id, {"failure_reason": str(exc)[:4000]})
        tracker.finish(run_id, "FAILED")
        if not multirun:  # a single run is its own sweep: no callback will close the parent
            tracker.end_sweep(sweep["parent_run_id"], "FAILED")
        return _fail(out, name, exc, multirun)
    except Exception as exc:  # a bug or out of memory: this trial fails, the sweep goes on
        tracker.set_tags(run_id, {"failure_reason": f"{type(exc).__name__}: {exc}"[:4000]})
        tracker.finish(run_id, "FAILED")
        if not multirun:
            tracker.end_sweep(sweep["parent_run_id"], "FAILED")
            raise
        log.error("trial %s failed:\n%s", name, traceback.format_exc())
        return _fail(out, name, exc, multirun)
    params = {"lr": conf.train.lr, "rank": conf.lora.rank, "steps": conf.train.max_steps}
    payload = {**result.to_json(), "metrics": metrics, "params": params, "config_hash": cfg_hash}
    cands = [Candidate(name, int(k[5:]), v, str(out / "checkpoints" / k), result.status, params)
             for k, v in metrics.items() if k.startswith("step-")]
    baseline = metrics.get("baseline", {})
    objective, best = trial_best(cands, baseline, conf.selection)
    payload["objective"] = objective
    _write_result(out, payload)
    _record(tracker, run_id, out, result, metrics, best, objective)
    _summary(result, objective)
    return objective


def trial_name(hc, sweep_dir: Path) -> str:
    """The trial's key: only the values the sweep varies ("lr=0.0001"), not every fixed override."""
    mr = sweep_dir / "multirun.yaml"
    swept = set()
    if mr.is_file():
        for o in OmegaConf.load(mr).hydra.overrides.task:
            key, _, value = o.partition("=")
            if "," in value or "(" in value:
                swept.add(key.lstrip("+~"))
    mine = [o for o in hc.overrides.task if o.partition("=")[0].lstrip("+~") in swept]
    return ",".join(mine) or hc.job.override_dirname or f"job{hc.job.num}"


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


def _record(tracker, run_id, out, result, metrics, best: Candidate | None, objective: float) -> None:
    rows = [(k, v, int(ck[5:])) for ck, m in metrics.items() if ck.startswith("step-") for k, v in m.items()]
    rows += [(f"baseline_{k}", v, 0) for k, v in metrics.get("baseline", {}).items()]
    log_path = out / "train_log.jsonl"
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            rows += [("train_loss", rec["loss"], rec["step"]), ("lr", rec["lr"], rec["step"])]
    rows += [("objective", objective, 0)]
    if result.ms_per_step:
        rows += [("ms_per_step", result.ms_per_step, 0)]
    if result.peak_memory_gib:
        rows += [("peak_memory_gib", result.peak_memory_gib, 0)]
    tracker.log_metrics(run_id, rows)
    tracker.log_artifacts(run_id, out / "eval" / "grids", "grids")
    tracker.log_artifacts(run_id, out / RESULT)
    if best is not None:  # the trial's best checkpoint under the sweep's rule: the LoRA people will want
        tracker.log_artifacts(run_id, Path(best.checkpoint) / "pytorch_lora_weights.safetensors", "best_checkpoint")
        tracker.set_tags(run_id, {"best_step": best.step})
    tracker.set_tags(run_id, {"status": result.status})
    if result.error:
        tracker.set_tags(run_id, {"failure_reason": result.error[:4000]})
    tracker.finish(run_id, "FAILED" if result.status != "finished" else "FINISHED")


def _finished(out: Path, cfg_hash: str, steps: int) -> float | None:
    """The stored objective of a trial that already finished with this configuration (resume skips it)."""
    p = out / RESULT
    if not p.is_file():
        return None
    res = json.loads(p.read_text())
    if res.get("status") == "finished" and res.get("config_hash") == cfg_hash and res.get("steps") == steps \
            and "objective" in res:
        return res["objective"]
    return None


def _fail(out: Path, name: str, exc: BaseException, multirun: bool) -> float:
    log.error("trial %s failed: %s", name, exc)
    _write_result(out, {"name": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
    if multirun:
        return math.nan
    sys.exit(2)


def _write_result(out: Path, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(out / RESULT)


def _summary(r: TrialResult, objective: float) -> None:
    speed = f", {r.ms_per_step:.0f} ms/step" if r.ms_per_step else ""
    mem = f", peak {r.peak_memory_gib:.1f} GiB" if r.peak_memory_gib else ""
    loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "n/a"
    log.info("trial %s %s after %d steps (final loss %s%s%s, objective %.4f); %d checkpoint(s) in %s", r.name,
             r.status, r.steps, loss, speed, mem, objective, len(r.checkpoints), r.output_dir / "checkpoints")
    if r.error:
        log.error("%s", r.error)
