"""One Hydra job = one trial: typed config -> checks -> train -> score -> MLflow child run -> result.json."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from common import compiling, faults, lorafile, stop, timeline
from common.device import resolve_device
from evaluation import EvalConfig, EvalInputError, evaluate, grid, preflight
from evaluation.config import entry_name, is_entry, parse_entry, strength_suffix
from evaluation.evaluate import BASELINE as BASELINE_KEY
from evaluation.evaluate import earlier_results
from evaluation.overlap import Later
from trainer import TrialResult, TrialSpec, UserError, instance_photos, training_config_hash
from trainer.models import resolve_source, shared_pipeline

from . import precompile, racing
from .config import SweepConfig, evaluation_settings, flatten, resolve_path, to_typed
from .launchers.packing import BATCH_ENV, train
from .launchers.process import GPU_ENV
from .launchers.resume import note_run_dir
from .logs import current_trial, for_trial, quiet_third_party, set_trial
from .phases import process_started, trial_phases
from .plan import make_plan, trial_key
from .results import (BASELINE, RESULT, candidate, candidates, finished_objective, read_result, read_sweep,
                      write_result)
from .search import SearchSettings, TrialLink, coordinates
from .selection import ROUND1, Candidate, best_rows, checkpoint_score, objective_name, trial_best
from .tracking import device_name, git_commit, make_tracker, worker

log = logging.getLogger(__name__)


@dataclass
class Job:
    """What a trial's job knows once its config is read: where it writes, which sweep it belongs to, its tracker."""

    conf: SweepConfig
    name: str
    out: Path
    sweep_dir: Path
    multirun: bool
    link: TrialLink | None  # its Optuna trial, in a search
    tracker: object
    sweep: dict  # the sweep's MLflow coordinates (sweep.json)
    cfg_hash: str
    tags: dict


def run_job(cfg: DictConfig) -> float:
    """Train and score the trial this job describes; record it. Returns its objective (NaN when it failed).

    In a multirun a failing trial (bad input, exception, NaN loss, out of memory) is recorded as FAILED and
    the sweep goes on; a single run ends with exit status 2 on bad input. A job of an Optuna search reports
    every checkpoint's score to its study trial as it is scored and stops when the pruner says so."""
    quiet_third_party()  # also in a launcher's worker process
    timeline.once("starting up", time.time() - process_started())  # imports, config, checks, plan: to the 1st job
    stop.check()  # a job whose turn comes after a stop was asked for starts nothing
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = Path(hc.sweep.dir).resolve() if multirun else out
    name = trial_name(hc, sweep_dir) if multirun else (hc.job.override_dirname or "default")
    try:
        conf = to_typed(cfg)
    except UserError as exc:
        return _fail(out, name, exc, multirun)
    if conf.plan_only:  # a single run, or a launcher that runs each job (the packed one plans them all at once)
        log.info("%s\nplan_only=true: nothing trained", make_plan([(name, conf)], 1).text())
        return math.nan
    root = resolve_path(conf.paths, ".")
    try:
        link = _optuna_link(conf, hc, sweep_dir, root) if multirun and conf.optuna_trial is not None else None
    except UserError as exc:  # the study's storage went away: this trial cannot report, so it does not train
        return _fail(out, name, exc, multirun)
    if link is not None:
        name = out.name  # "3_lora.rank=8,lr=0.00012": the trial folder, which a re-run of a dead trial reuses
    set_trial(name if multirun else "")  # this thread's log lines say which trial they belong to
    tracker = make_tracker(conf.tracking, root)
    sweep = read_sweep(sweep_dir)
    if sweep is None or not multirun:  # a single run is its own sweep (reopened when resumed)
        note_run_dir(out)
        try:
            tracker.check()
        except UserError as exc:
            return _fail(out, name, exc, multirun)
        sweep = tracker.start_sweep(sweep_dir, sweep_dir.name, {"git_commit": git_commit()})
    tracker.use_journal(sweep_dir)
    cfg_hash = training_config_hash(conf.model, conf.data, conf.lora, conf.train)
    tags = {"sweep": sweep_dir.name, "trial_key": name, "trial_folder": out.name, "git_commit": git_commit(),
            "device": device_name(), "config_hash": cfg_hash, "worker": worker()}  # worker: the process running it
    job = Job(conf, name, out, sweep_dir, multirun, link, tracker, sweep, cfg_hash, tags)
    done = finished_objective(out, cfg_hash, conf.train.max_steps)
    if done is not None:
        log.info("trial %s already finished in %s: skipped", name, out)
        _catch_up(job)
        return done
    return _train_and_record(job, cfg)


def _catch_up(job: Job) -> None:
    """A trial that finished before: whatever its study or MLflow run has not heard yet (it was killed after the
    trial ended but before they were told), told now, nothing twice."""
    res = read_result(job.out)  # NaN written as null (strict JSON) read back as NaN
    cands = candidates(res["metrics"], job.out, job.name, res["status"], res["params"])
    baseline = res["metrics"].get("baseline", {})
    if job.link is not None:
        job.link.replay(cands, baseline)  # its re-run trial has heard nothing yet
        if res["status"] == "pruned":
            job.link.set_attrs({"pruned_step": res["steps"]})
        job.link.finish(res["status"], cands, baseline)
    if not res.get("tracked", True):  # killed while recording it: MLflow gets the rest now, nothing twice
        run_id = job.tracker.child_run(job.sweep, job.name, job.tags)
        _, best = trial_best(cands, baseline, job.conf.selection)
        _record(job.tracker, run_id, job.out, res, res["metrics"], best, res["objective"],
                selection=job.conf.selection, raced=job.conf.eval.races(job.multirun))
        write_result(job.out, {**res, "tracked": True})
        job.tracker.flush()


def _train_and_record(job: Job, cfg: DictConfig) -> float:
    """The trial trained and scored under its MLflow run; result.json written before and after recording it."""
    conf, out, name, link, tracker, tags = job.conf, job.out, job.name, job.link, job.tracker, job.tags
    if os.environ.get(GPU_ENV):  # pinned by hydra/launcher=processes with hydra.launcher.gpus
        tags["gpu"] = os.environ[GPU_ENV]
    if os.environ.get(BATCH_ENV):  # the plan's batch it trained in (sweep/launchers/packing.py)
        tags["batch"] = os.environ[BATCH_ENV]
    if link is not None:
        tags.update({"optuna.study": link.study.study_name, "optuna.trial": conf.optuna_trial})
    run_id = tracker.child_run(job.sweep, name, tags)
    tracker.log_params(run_id, flatten(OmegaConf.to_container(cfg, resolve=True)))
    params = {"lr": conf.train.lr, "rank": conf.lora.rank, "steps": conf.train.max_steps}
    if link is not None:
        link.set_attrs({"mlflow_run_id": run_id, "trial_folder": str(out)})
    live = LiveScores(tracker, run_id, name, out, params, link, conf.train.max_steps, conf.selection)
    started_at = time.time()
    try:
        with tracker.active(run_id):
            result, metrics = run_trial(conf, name, out, job.sweep_dir / BASELINE, live, conf.eval.races(job.multirun),
                                        prunes=link is not None)
    except stop.Stopped as exc:  # Ctrl-C or SIGTERM: KILLED, not FAILED; resume=true continues it
        _record_stop(tracker, run_id, out, name, exc)
        raise
    except (UserError, EvalInputError) as exc:
        _record_failure(tracker, run_id, job.sweep, exc, job.multirun, link)
        return _fail(out, name, exc, job.multirun)
    except Exception as exc:  # a bug or out of memory: this trial fails, the sweep goes on
        _record_failure(tracker, run_id, job.sweep, exc, job.multirun, link, f"{type(exc).__name__}: {exc}")
        if not job.multirun:
            raise
        log.error("trial %s failed:\n%s", name, traceback.format_exc())
        return _fail(out, name, exc, job.multirun)
    with timeline.span("recording trials"):
        return _recorded(job, result, metrics, run_id, started_at, live)


def _recorded(job: Job, result: TrialResult, metrics: dict, run_id: str, started_at: float,
              live: LiveScores) -> float:
    """The trained trial's result.json, its study trial's outcome and its MLflow run; returns its objective."""
    conf, out, name, link, tracker = job.conf, job.out, job.name, job.link, job.tracker
    params = {"lr": conf.train.lr, "rank": conf.lora.rank, "steps": conf.train.max_steps}
    payload = {**result.to_json(), "metrics": metrics, "params": params, "config_hash": job.cfg_hash,
               "gpu": os.environ.get(GPU_ENV), "device": job.tags["device"], "started_at": started_at,
               "ended_at": time.time()}
    payload["phases"] = trial_phases(payload, out)  # where its job's time went (sweep/phases.py adds them up)
    cands = candidates(metrics, out, name, result.status, params)
    baseline = metrics.get("baseline", {})
    objective, best = trial_best(cands, baseline, conf.selection)
    payload["objective"] = objective
    write_result(out, {**payload, "tracked": False})  # the trial's work is safe; recording it in MLflow is next
    if link is not None:
        if result.status == "pruned":
            link.set_attrs({"pruned_step": result.steps})
            tracker.set_tags(run_id, {"optuna.state": "PRUNED", "pruned_at_step": result.steps})
        values = link.finish(result.status, cands, baseline)
        if values is not None:
            tracker.set_tags(run_id, {"optuna.state": "COMPLETE", "optuna.values": values})
    _record(tracker, run_id, out, payload, metrics, best, objective, live.logged, conf.selection,
            conf.eval.races(job.multirun))
    write_result(out, {**payload, "tracked": True})  # recorded, or waiting in the journal for the server
    tracker.flush()
    _summary(result, objective)
    if result.status == "failed" and not job.multirun:
        sys.exit(1)
    return objective


def _optuna_link(conf: SweepConfig, hc, sweep_dir: Path, root: Path):
    s = SearchSettings.from_config(hc.sweeper)
    url, study = coordinates(s, sweep_dir, root)
    return TrialLink(s, url, study, conf.optuna_trial, conf.selection)


def _record_stop(tracker, run_id: str, out: Path, name: str, exc: stop.Stopped) -> None:
    """A trial stopped by a signal: its run KILLED with the reason, its result.json "stopped" (not finished, not
    failed: the same command with resume=true continues it from its last checkpoint)."""
    reason = f"{exc}; its finished checkpoints are kept: run the same command with resume=true to continue it"
    log.warning("trial %s %s", name, reason)
    write_result(out, {"name": name, "status": "stopped", "reason": reason})
    tracker.set_tags(run_id, {"stop_reason": reason})
    tracker.finish(run_id, "KILLED")


def _record_failure(tracker, run_id, sweep, exc, multirun, link, reason: str | None = None) -> None:
    reason = reason or str(exc)
    tracker.set_tags(run_id, {"failure_reason": reason[:4000]})
    tracker.finish(run_id, "FAILED")
    if link is not None:
        link.fail(reason)
    if not multirun:  # a single run is its own sweep: no callback will close the parent
        tracker.end_sweep(sweep["parent_run_id"], "FAILED")


class LiveScores:
    """What happens when a checkpoint has been scored during training: its metrics (and the rule's objective)
    go to MLflow at its step, with its image grid as a step-indexed image (the UI shows them while the trial
    runs), and, in an Optuna search, to the study trial, whose pruner may stop the trial there."""

    def __init__(self, tracker, run_id, name, out, params, link, max_steps: int, selection=None):
        self.tracker, self.run_id, self.name, self.out = tracker, run_id, name, out
        self.params, self.link, self.max_steps, self.selection = params, link, max_steps, selection
        self.logged: set[str] = set()

    def __call__(self, scored: dict[str, dict[str, float]], baseline: dict[str, float]) -> bool:
        """`scored`: one checkpoint's entries ({"step-000100": metrics, "step-000100_x0.7": ...}, one per strength)."""
        fresh = [e for e in scored if e not in self.logged]
        if fresh:
            self.tracker.log_metrics(self.run_id, [r for e in fresh for r in _entry_rows(e, scored[e], baseline,
                                                                                         self.selection)])
            for e in fresh:
                _log_grids(self.tracker, self.run_id, self.out, e)
            self.logged.update(fresh)
        if self.link is None or not scored:
            return False
        cands = [candidate(self.name, e, m, self.out, "running", self.params) for e, m in scored.items()]
        prune = self.link.report(cands, baseline)
        return prune and cands[0].step < self.max_steps  # the last checkpoint ends the trial anyway: it completes


def trial_name(hc, sweep_dir: Path) -> str:
    """The trial's key: only the values the sweep varies ("lr=0.0001"), not every fixed override."""
    return trial_key(list(hc.overrides.task), sweep_dir) or hc.job.override_dirname or f"job{hc.job.num}"


def run_trial(conf: SweepConfig, name: str, out: Path, baseline: Path,
              on_scored=None, race: bool = False, prunes: bool = False) -> tuple[TrialResult, dict]:
    """Train, scoring every checkpoint as it is written (the trainer's loaded base generates; nothing is loaded
    twice). Returns the training result and {checkpoint: metrics} (with "baseline"). With `race`, a checkpoint's
    scoring here is racing's first round (one seed per prompt); the sweep's end scores more where it decides.

    `on_scored({entry: metrics}, baseline metrics) -> stop?` hears each checkpoint's scores (an entry per LoRA
    strength) as they come; True stops the trial there (an Optuna pruner). Unless `prunes` (its answer can stop
    the trial), a checkpoint's images are scored while training goes on (eval.overlap) and `on_scored` hears them
    at the next checkpoint or when training ends. With a refiner, checkpoints are scored after training instead
    (the refiner needs the model folder, not the trainer's modules) and nothing is pruned."""
    cache_dir = resolve_path(conf.paths, conf.paths.cache_dir)
    # cheap checks first: photos, device, model source, evaluation inputs; all before any model is loaded
    instance_photos(conf.data)
    resolve_device(conf.train.device)
    pretrained = resolve_source(conf.model, cache_dir)
    compiling.use_cache(cache_dir)  # compiled code from an earlier sweep on this machine is loaded, not compiled
    settings, work = None, 0
    if conf.eval.enabled:
        settings = evaluation_settings(conf)
        work = _compile_work(settings, conf, race)
        preflight(settings, conf.data.instance_dir)
        _compile_in_background(settings, out, pretrained, work)
    spec = TrialSpec(name=name, lora=conf.lora, train=conf.train, output_dir=out)
    if settings is None:
        [result] = train([spec], conf.model, conf.data, cache_dir, progress=conf.progress)
        return result, {}
    kw = dict(instance_dir=conf.data.instance_dir, out_dir=out / "eval", pretrained=pretrained, compile_work=work)
    first = dict(seeds=settings.seeds[:1], prior=racing.uses_prior(conf.selection)) if race else {}
    metrics: dict[str, dict[str, float]] = {}
    pipe = None
    if not settings.refiner:
        pipe = shared_pipeline(conf.model, conf.train.device, conf.train.mixed_precision, cache_dir)
        # the no-LoRA baseline first (once per sweep, cached): live scores are judged against it
        metrics.update(evaluate([], settings, pipeline=pipe, baseline_cache=baseline, **kw))
        metrics.update({k: v for k, v in earlier_results(out / "eval", settings).items() if is_entry(k)})
        if on_scored is not None:  # a resumed trial: its study hears them again
            for scored in _by_checkpoint(metrics):
                on_scored(scored, metrics[BASELINE_KEY])

        def hear(m: dict[str, dict[str, float]]) -> bool:
            metrics.update(m)
            return bool(on_scored and on_scored(m, metrics.get(BASELINE_KEY, {})))

        def score(step: int, folder: Path) -> bool:
            heard = [hear(p.result()) for p in _taken(scoring)]  # the last checkpoint's, scored meanwhile
            got = evaluate([folder], settings, pipeline=pipe, baseline=False, applied=True, **kw, **first,
                           later=not prunes)
            if isinstance(got, Later):  # scored while training goes on: nothing waits for its answer
                scoring.append(got)
                return any(heard)
            return hear(got)

        spec.on_checkpoint = for_trial(current_trial(), score)  # called from the thread training a batch
    scoring: list[Later] = []
    try:
        [result] = train([spec], conf.model, conf.data, cache_dir, progress=conf.progress)
    except BaseException:  # failed or stopped: the checkpoints generated so far are scored (metrics.json) first
        for p in _taken(scoring):
            p.work.__exit__(*sys.exc_info())
        raise
    for p in _taken(scoring):
        hear(p.result())
    # checkpoints not scored live: written before an interruption, or all of them with a refiner
    entries = {c.name: [entry_name(c.name, x) for x in settings.lora_scales] for c in result.checkpoints}
    missing = [c for c in result.checkpoints if any(e not in metrics for e in entries[c.name])]
    if missing:
        if pipe is not None:  # again: the trainer keeps the VAE and text encoders off the GPU between uses
            pipe = shared_pipeline(conf.model, conf.train.device, conf.train.mixed_precision, cache_dir)
        new = evaluate(missing, settings, pipeline=pipe, baseline=pipe is None or BASELINE_KEY not in metrics,
                       baseline_cache=baseline, **kw, **first)
        metrics.update(new)
        if on_scored is not None:
            for scored in _by_checkpoint(new):
                on_scored(scored, metrics.get(BASELINE_KEY, {}))
    kept = {e for c in result.checkpoints for e in entries[c.name]}
    return result, {k: v for k, v in metrics.items() if k == BASELINE_KEY or k in kept}


def _taken(pending: list) -> list:
    """The items of `pending`, which is left empty."""
    out, pending[:] = list(pending), []
    return out


def _by_checkpoint(metrics: dict[str, dict[str, float]]) -> list[dict[str, dict[str, float]]]:
    """The scored entries grouped by checkpoint, in step order: [{"step-000100": m, "step-000100_x0.7": m}, ...]."""
    groups: dict[str, dict] = {}
    for e in sorted(k for k in metrics if is_entry(k)):
        groups.setdefault(parse_entry(e)[0], {})[e] = metrics[e]
    return list(groups.values())


def _compile_work(settings: EvalConfig, conf: SweepConfig, race: bool = False) -> int:
    """The images the trial's whole scoring generates (baseline and every checkpoint), which eval.compile=auto
    weighs at each of its evaluate calls instead of the call's own few (`evaluate(compile_work=...)`), against the
    compile cache's state at that call (common/compiling.py). A raced trial counts racing's usual share of the full
    protocol (racing.IMAGE_SHARE): too few to repay a cold compile, enough once the cache is warm. (On an H100 a
    cold race that compiled took 10.4 minutes, ~2.8 of them compiling generation's two batch shapes:
    bench/results/racing_NVIDIA_H100_80GB_HBM3.json, earlier_run.)"""
    checkpoints = -(-conf.train.max_steps // conf.train.checkpoint_every)
    per_checkpoint = settings.images_per_checkpoint() * (racing.IMAGE_SHARE if race else 1)
    per_checkpoint *= len(settings.lora_scales)
    return int(checkpoints * per_checkpoint + settings.images_per_checkpoint())


def _compile_in_background(settings: EvalConfig, out: Path, source: str, work: int) -> None:
    """With a cold compile cache and too few images to repay compiling in this process (a race), generation's code
    compiled by a second process meanwhile (sweep/precompile.py): this sweep's later calls and the next sweep's
    find the cache warm."""
    device = resolve_device(settings.device, "eval.device")
    key = compiling.generation_key(source, settings.resolution, device) if device.type == "cuda" else None
    if precompile.wanted(settings.compile, device, work, key):
        precompile.start(out / ".hydra" / "config.yaml", key)


def _entry_rows(entry: str, metrics: dict, baseline: dict, selection) -> list[tuple[str, float, int]]:
    """One scored entry's metrics at its checkpoint's step, and the rule's objective under its name (weighted_score)
    when it is not one of the scored metrics already (face_similarity). At a strength other than full, each name
    ends in it: clip_t_x0.7."""
    _, step, scale = parse_entry(entry)
    suffix = strength_suffix(scale)
    rows = [(k + suffix, v, step) for k, v in metrics.items()]
    if selection is not None and objective_name(selection) not in metrics:
        rows.append((objective_name(selection) + suffix, checkpoint_score(Candidate("", step, metrics), baseline,
                                                                          selection), step))
    return rows


def _log_grids(tracker, run_id, out: Path, entry: str) -> None:
    """A scored entry's images at its step, one image per prompt slot (key `p0`, `p1`, ...; the refined arm's
    `p0_refined`; at a strength other than full with it after: `p0_x0.7`), so that the run's and the compare view's
    image panels line them up by step. Each holds the seeds generated for that prompt, labelled; seeds racing never
    scored are left out, never grey."""
    _, step, scale = parse_entry(entry)
    suffix = strength_suffix(scale)
    for arm in ("base", "refined"):
        for slot, png in prompt_rows(out / "eval", entry, arm).items():
            tracker.log_image(run_id, png, f"p{slot}" + ("" if arm == "base" else f"_{arm}") + suffix, step)


def _log_baseline_images(tracker, run_id, out: Path) -> None:
    """The base model's images (no LoRA) at step 0 under the same keys: where each image panel opens (the UI's
    image cards start at step 0), before the first checkpoint. Generated once per sweep, by whichever trial
    scored first: read from that trial's folder."""
    made = sorted(out.parent.glob(f"*/eval/images/{BASELINE_KEY}"))
    for slot, png in (prompt_rows(made[0].parent.parent, BASELINE_KEY, "base") if made else {}).items():
        tracker.log_image(run_id, png, f"p{slot}", 0)


def prompt_rows(eval_dir: Path, entry: str, arm: str) -> dict[int, Path]:
    """{prompt slot: a PNG of the seeds generated for it at `entry`}, written once beside the grids
    (eval/prompt_rows/, which the run does not log as files: the images are its step-indexed ones)."""
    found: dict[int, dict[int, Path]] = {}
    for f in (eval_dir / "images" / entry).glob(f"{arm}_p*_s*.png"):
        p, _, s = f.stem[len(arm) + 2:].partition("_s")
        if p.isdigit() and s.isdigit():
            found.setdefault(int(p), {})[int(s)] = f
    out = {}
    for slot, by_seed in sorted(found.items()):
        png = eval_dir / "prompt_rows" / f"{entry}_{arm}_p{slot}_s{'-'.join(map(str, sorted(by_seed)))}.png"
        if not png.is_file():
            ims = [Image.open(by_seed[s]).convert("RGB") for s in sorted(by_seed)]
            label = f"prompt {slot}, seed{'s' * (len(ims) > 1)} {', '.join(map(str, sorted(by_seed)))}"
            grid.save(grid.grid(ims, 1, len(ims), [label], cell=min(256, max(im.width for im in ims))), png)
        out[slot] = png
    return out


def _record(tracker, run_id, out, result: dict, metrics, best: Candidate | None, objective: float,
            logged: set[str] = frozenset(), selection=None, raced: bool = False) -> None:
    """The trial in its MLflow run: metrics (and the rule's objective) at their steps, its best checkpoint's as
    best_* summary metrics, the loss curve, grids (files, and step-indexed images), result.json, LoRA hashes, the
    best checkpoint's LoRA, status. `result` is the payload of result.json. Safe to repeat (a reopened run keeps
    what it holds). `raced`: its scores are racing's first round, so its best is logged as round1_best_* and the
    sweep's end logs the final best_* (sweep/finalize.py: one truth with the report)."""
    baseline = metrics.get("baseline", {})
    fresh = sorted(e for e in metrics if is_entry(e) and e not in logged)
    rows = [r for e in fresh for r in _entry_rows(e, metrics[e], baseline, selection)]
    if best is not None:
        rows += best_rows(best, objective, objective_name(selection) if selection is not None else "objective",
                          ROUND1 if raced else "")
    rows += [(f"baseline_{k}", v, 0) for k, v in baseline.items()]
    log_path = out / "train_log.jsonl"
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            rows += [("train_loss", rec["loss"], rec["step"]), ("lr", rec["lr"], rec["step"])]
    rows += [("objective", objective, 0)]
    if result.get("ms_per_step"):
        rows += [("ms_per_step", result["ms_per_step"], 0)]
    if result.get("peak_memory_gib"):
        rows += [("peak_memory_gib", result["peak_memory_gib"], 0)]
    tracker.log_metrics(run_id, rows)
    faults.hit("mlflow_log", out.name)  # between two MLflow requests (tests/test_faults.py)
    tracker.log_artifacts(run_id, out / "eval" / "grids", "grids")
    _log_baseline_images(tracker, run_id, out)
    for ck in fresh:
        _log_grids(tracker, run_id, out, ck)
    tracker.log_artifacts(run_id, out / RESULT)
    ckpts = [Path(c) for c in result.get("checkpoints", [])]
    hashes = {f"lora_sha256.{c.name}": _lora_hash(c) for c in ckpts}
    tracker.set_tags(run_id, {k: v for k, v in hashes.items() if v})  # what each checkpoint's LoRA must hash to
    if best is not None and not raced:  # the trial's best checkpoint under the sweep's rule: the LoRA people want
        tracker.log_artifacts(run_id, Path(best.checkpoint) / "pytorch_lora_weights.safetensors", "best_checkpoint")
        tracker.set_tags(run_id, {"best_step": best.step, "best_lora_scale": best.scale,
                                  "best_lora_sha256": hashes.get(f"lora_sha256.{Path(best.checkpoint).name}", "")})
    tracker.set_tags(run_id, {"status": result["status"]})
    if result.get("training"):  # its checkpoints were written by another trial's training (trainer/planner.py)
        tracker.set_tags(run_id, {"training": result["training"]})
    if result.get("error"):
        tracker.set_tags(run_id, {"failure_reason": result["error"][:4000]})
    tracker.finish(run_id, "FINISHED" if result["status"] in ("finished", "pruned") else "FAILED")


def _lora_hash(folder: Path) -> str | None:
    rec = Path(folder) / lorafile.RECORD_FILE
    return lorafile.CheckpointRecord.read(Path(folder)).lora_sha256 if rec.is_file() else None


def _fail(out: Path, name: str, exc: BaseException, multirun: bool) -> float:
    log.error("trial %s failed: %s", name, exc)
    write_result(out, {"name": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
    if multirun:
        return math.nan
    sys.exit(2)


def _summary(r: TrialResult, objective: float) -> None:
    speed = f", {r.ms_per_step:.0f} ms/step" if r.ms_per_step else ""
    mem = f", peak {r.peak_memory_gib:.1f} GiB" if r.peak_memory_gib else ""
    loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "n/a"
    shared = f", written from trial {r.training}'s training" if r.training and r.training != r.name else ""
    log.info("trial %s %s after %d steps (final loss %s%s%s, objective %.4f); %d checkpoint(s) in %s%s", r.name,
             r.status, r.steps, loss, speed, mem, objective, len(r.checkpoints), r.output_dir / "checkpoints", shared)
    if r.error:
        log.error("%s", r.error)
