"""The end of a sweep: gather every trial's checkpoint metrics, select the champion, register it, report.

Ordered so that a process killed at any point (kill -9) and the same command run again end where an uninterrupted
run ends, with nothing left over: the champion's export (champion/), then the registry, journaled in
<sweep>/registry.json (intent, then what the registry holds: run again, it finishes or repeats nothing), then the
records written last from what is recorded (selection.json, report.md: atomic writes), then the MLflow runs."""
from __future__ import annotations

import datetime as dt
import json
import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from common import faults, stop
from common.compiling import use_cache
from evaluation import evaluate
from evaluation.overlap import Later
from trainer.models import resolve_source, shared_pipeline

from . import confidence, racing, report
from .config import TrackingConfig, evaluation_settings, resolve_path
from .export import export, from_checkpoint
from .markdown import code, plain, text
from .metrics import fmt
from .phases import Phases, record_phases
from .redaction import redact, redact_text
from .results import (
    CHAMPION_DIR,
    EVAL_DIR,
    EVAL_FILE,
    PROMOTION_FILE,
    REGISTRY_FILE,
    collect,
    load_config,
    lost_before_start,
    lost_trials,
    read_json,
    read_promotion,
    read_promotions,
    read_scores,
    read_sweep,
    score_notes,
    trial_dirs,
    write_json,
    write_result,
)
from .selection import Candidate, Selection, best_rows, checkpoint_score, describe_rule, objective_name, select
from .tracking import caller_store, folder_store, make_tracker, recorded_store, ui_command
from .tracking.models import EvalDataset, log_checkpoint_models, share_runs_view
from .tracking.registry import CHALLENGER, model_name, register_champion, subject_of

log = logging.getLogger(__name__)



def record_lost(sweep_dir: Path, tracker) -> None:
    """Each lost trial: a failed result.json (its checkpoints stay: `resume=true` continues it; the report and the
    failure count read it from there) and its MLflow run, if it got one, marked FAILED with the reason."""
    sweep = read_sweep(sweep_dir)
    for d in lost_trials(sweep_dir):
        reason = ("its job ended without a result (process killed or machine lost); its checkpoints are kept: "
                  "run the same command with resume=true to continue it")
        log.error("trial %s: %s", d.name, reason)
        write_result(d, {"name": d.name, "status": "failed", "error": reason, "lost": True})
        if not (sweep and sweep["parent_run_id"]) or tracker.waiting():
            continue
        try:
            run_id = tracker.running_child(sweep, d.name)
            if run_id:
                tracker.set_tags(run_id, {"failure_reason": reason})
                tracker.finish(run_id, "FAILED")
        except Exception as exc:  # the record stays in result.json and the report
            log.warning("could not mark the MLflow run of %s failed: %s", d.name, exc)


def opened_store(sweep_dir: Path, given: str | None = None) -> str | None:
    """The MLflow store a command that opens `sweep_dir` writes to: `given` (tracking_uri=) or MLFLOW_TRACKING_URI,
    else the folder's own if it is on this machine (tracking.folder_store: StoreNotNamed otherwise); None: the
    default local store."""
    conf = load_config(sweep_dir)
    if not conf.tracking.enabled:
        return None
    return folder_store(recorded_store(read_sweep(sweep_dir), conf.tracking), caller_store(given), sweep_dir)


def finalize_folder(sweep_dir: Path, register: bool = True, tracking_uri: str | None = None,
                    tracking: TrackingConfig | None = None, start: float | None = None) -> tuple[Selection | None, int]:
    """Select, register, report. Returns the selection and how many trials failed (diverged and lost included).
    `tracking_uri`: the store to write to (a command opening the folder: opened_store); None, the store the sweep
    recorded (its own end, or its folder's default).

    Run again on a sweep whose parent run has ended (`python -m sweep.report`, `sync` after the journal was sent),
    it rewrites the report, its artifacts, tags and description, and logs no metric twice nor ends the run again
    (its end time stays). `tracking`: the launching command's own settings (the sweep's end, in the process that
    ran it): its tracking URI holds the credentials the stored config has hidden; `start`: when it began (phases.py)."""
    sweep_dir = Path(sweep_dir).resolve()
    unstarted = lost_before_start(sweep_dir)
    for job, why in unstarted.items():
        log.error("%s never started a trial: %s; resume=true runs it again", job, why)
    if not trial_dirs(sweep_dir) and not lost_trials(sweep_dir):
        log.error("no finished trial in %s: nothing to select", sweep_dir)
        return None, len(unstarted)
    conf = load_config(sweep_dir)
    root = resolve_path(conf.paths, ".")
    # the live command's settings (its own end: the real credentials), else the store the sweep logged to, wherever
    # this runs from (a rebuilt report), unless the caller named one
    if tracking is None:
        tracking = replace(conf.tracking, uri=tracking_uri or recorded_store(read_sweep(sweep_dir), conf.tracking))
    tracker = make_tracker(tracking, root)
    tracker.use_journal(sweep_dir)
    tracker.flush()
    record_lost(sweep_dir, tracker)
    candidates, baseline, statuses = collect(sweep_dir)
    statuses.update({job: "failed" for job in unstarted})
    candidates, race = run_race(sweep_dir, conf, candidates, baseline)
    stop.check()  # Ctrl-C while racing: nothing selected, registered or reported yet; resume=true does it all
    phases = record_phases(sweep_dir, start)  # the scoring is done: what follows is bookkeeping
    sel = select(candidates, baseline, conf.selection)
    sel.confidence = assess(sel, candidates, baseline, conf.selection)
    sel.race = race
    human_review(sel, sweep_dir, candidates, tracker)
    rule_text = describe_rule(conf.selection)
    notes = score_notes(sweep_dir)
    exported = export_champion(sweep_dir, sel) if sel.chosen else None
    faults.hit("finalize_exported")  # champion/ written; the registry and the records not yet (tests/test_promote.py)
    sweep = read_sweep(sweep_dir)
    failed = sum(s in ("failed", "diverged") for s in statuses.values())
    if tracker.waiting():  # the server is away: the records wait; the registry cannot, it is done by `sync`
        log.error("MLflow at %s did not answer: %d record(s) wait in %s (nothing is lost) and the champion is not "
                  "registered yet. When the server is back: python -m sweep.tracking sync %s", tracker.uri,
                  tracker.waiting(), tracker.pending, sweep_dir)
        register = False
    pid = sweep["parent_run_id"] if sweep and sweep["parent_run_id"] else ""
    ended = bool(pid) and tracker.run_status(pid) not in (None, "RUNNING")  # a rebuild: nothing twice, no new end
    registration = read_json(sweep_dir / REGISTRY_FILE)
    models = checkpoint_models(tracker, conf, sweep, candidates, sel) if pid and not tracker.waiting() else {}
    if pid and sel.chosen and conf.tracking.enabled:
        registration = registry_step(tracker, conf, sweep_dir, pid, sel, baseline, exported, register,
                                     models.get(sel.chosen.key))
    faults.hit("finalize_registered")  # the registry done and journaled; selection.json and the report not yet
    files = report.write(sweep_dir, candidates, sel, statuses, ui_command(tracker.uri), rule_text, exported,
                         registration, notes, phases)
    faults.hit("finalize_reported")  # the records written; the MLflow runs not told yet
    if pid:
        _tell_parent(tracker, pid, conf, sweep_dir, sweep, sel, candidates, statuses, files, rule_text, exported,
                     registration, notes, phases, failed, ended)
    faults.hit("finalize_done")
    pages = links(tracker, redact("uri", tracker.uri), sweep, sel) if pid else {}
    _print(sweep_dir, sel, candidates, statuses, ui_command(tracker.uri), failed, pages, registration, notes, phases)
    return sel, failed



def _tell_parent(tracker, pid: str, conf, sweep_dir: Path, sweep: dict, sel: Selection, candidates, statuses, files,
                 rule_text: str, exported, registration, notes, phases, failed: int, ended: bool) -> None:
    """The sweep's parent run told the outcome: the report's files, the selection's tags and description, the
    trials' final bests, the phases; ended unless it had ended before (a rebuild logs nothing twice)."""
    tracker.reopen(pid)  # a resumed sweep's parent: steps it holds are not logged again
    for f in files:
        tracker.log_artifacts(pid, f, "report")
    tags = {"selection.rule": sel.rule, "selection.objective": sel.objective,
            "selection.explanation": sel.explain()[:4000], "trials.total": len(statuses), "trials.failed": failed,
            "mlflow.note.content": report.mlflow_note(
                sel, rule_text, pid, [f.name for f in files if f.suffix == ".png"], failed, len(statuses),
                sweep_dir / "report", report.table(candidates, sel, statuses), exported,
                registration, notes)[:7900]}
    tags.update(_champion_record(tracker, pid, sel, ended))
    tags.update(run_name(conf, sweep_dir, sel))
    if registration and registration.get("state") == "done":
        tags.update(registration.get("tags", {}))
        if registration.get("switch"):
            tags["registry.switch"] = registration["switch"]
    tracker.set_tags(pid, tags)
    log_final_bests(tracker, sweep, candidates, sel, statuses, conf.selection)
    if not ended:
        tracker.log_metrics(pid, phases.metrics())
        tracker.end_sweep(pid, "FINISHED" if failed == 0 else "FAILED")


def checkpoint_models(tracker, conf, sweep: dict, candidates: list[Candidate], sel: Selection) -> dict[str, str]:
    """Every scored checkpoint as a LoggedModel of its trial's run (tracking/models.py): {candidate key: model id}.
    A failure here costs the Models tab, never the sweep's selection, registration or report."""
    subject = subject_of(conf)
    dataset = EvalDataset(subject.phrase, subject.photos, tuple(conf.eval.prompts), str(conf.data.instance_dir))
    try:
        return log_checkpoint_models(tracker, sweep, candidates, sel, conf.selection, dataset,
                                     conf.tracking.copy_weights)
    except Exception as exc:
        log.warning("the checkpoints were not logged as MLflow models (%s: %s); python -m sweep.report %s tries "
                    "again", type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "", sweep)
        return {}


def run_name(conf, sweep_dir: Path, sel: Selection) -> dict:
    """The parent run named for what it found, `<subject> · <champion>` (its folder's timestamp kept as the tag
    sweep.started)."""
    chosen = sel.chosen.key if sel.chosen else "no champion"
    return {"mlflow.runName": f"{subject_of(conf).phrase or 'subject'} · {chosen}", "sweep.started": sweep_dir.name}


def registry_step(tracker, conf, sweep_dir: Path, pid: str, sel: Selection, baseline: dict, exported: Path | None,
                  register: bool, model_id: str | None = None) -> dict | None:
    """The champion's registration, journaled in <sweep>/registry.json: what is to be registered (intent), then
    what the registry holds (done). Done for this pick already (a resumed finished sweep, a rebuilt report): nothing
    is registered and no alias moves. Interrupted (intent): done again, idempotently (the registry finds the
    version of the same LoRA). A person's pick moves `champion` only when it is new: promoted since the last
    registration. register=False (sweep.report, the server away): the record as it stands."""
    path = sweep_dir / REGISTRY_FILE
    rec = read_json(path)
    c = sel.chosen
    applied = len(read_promotions(sweep_dir)) if sel.review else 0
    want = {"key": c.key, "checkpoint": c.checkpoint, "scale": c.scale, "promotions": applied}
    if rec and rec.get("state") == "done" and all(rec.get(k) == v for k, v in want.items()):
        return rec
    if not register:
        return rec
    fresh = bool(sel.review) and not (rec and rec.get("state") == "done" and rec.get("promotions", 0) >= applied)
    name = (rec or {}).get("model") or model_name(conf, tracker.client, subject_of(conf))
    intent = {**want, "state": "intent", "model": name,
              "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_json(path, intent)
    faults.hit("registry_intent")  # the intent journaled; the registry not touched yet
    tags = register_champion(tracker, conf, pid, c, baseline, exported, sel.review if fresh else None, name,
                             model_id)
    done = {**intent, "state": "done", "alias": tags["registry.alias"], "version": tags.get("registry.version", ""),
            "champion_version": tags.get("registry.champion_version", ""), "decision": tags["registry.decision"],
            "lora_sha256": c.weights, "tags": tags}
    if done["alias"] == CHALLENGER:
        done["switch"] = switch_command(sweep_dir, c)
        log.warning("registry %s: %s. To make it the champion: %s", name, done["decision"], done["switch"])
    write_json(path, done)
    return done


def switch_command(sweep_dir: Path, c: Candidate) -> str:
    """The command that makes a challenger the champion: a person promotes it."""
    return (f"python -m sweep.promote {c.key} sweep={shlex.quote(str(sweep_dir))} "
            "reason=\"why it should replace the champion\"")


def log_final_bests(tracker, sweep: dict, candidates: list[Candidate], sel: Selection, statuses: dict,
                    cfg) -> None:
    """Each trial's best checkpoint as the report has it (after racing), on its MLflow run as best_* metrics and
    tags, so that the runs table and the report tell one truth (a raced trial's own run has its first round's as
    round1_best_*). Logged at the best's step; a rebuilt report logs nothing twice (reopen)."""
    by_key = {c.key: c for c in candidates}
    for row in report.table(candidates, sel, statuses):
        best = by_key.get(row["key"])
        run_id = tracker.find_child(sweep, row["trial"]) if best else None
        if run_id is None:
            continue
        tracker.reopen(run_id)
        tracker.log_metrics(run_id, best_rows(best, checkpoint_score(best, sel.baseline, cfg), objective_name(cfg)))
        if tracker.run_tags(run_id).get("best_lora_sha256") != best.weights:
            tracker.log_artifacts(run_id, Path(best.checkpoint) / "pytorch_lora_weights.safetensors",
                                  "best_checkpoint")
        tracker.set_tags(run_id, {"best_step": best.step, "best_lora_scale": best.scale,
                                  "best_lora_sha256": best.weights})


def run_race(sweep_dir: Path, conf, candidates: list[Candidate], baseline: dict) -> tuple[list[Candidate], dict | None]:
    """Racing evaluation's later rounds (sweep/racing.py): the checkpoints that can still win get more seeds, the
    champion and the runner-up all of them. Runs wherever candidates lack seeds (a raced sweep; one interrupted
    here continues, scoring only what is missing); returns the candidates with their new scores and the race's
    record (None when every checkpoint had every seed already: nothing was raced). Each trial's result.json stays
    what its job wrote (racing's first round); the race's scores are in its eval/metrics.json, which the report,
    selection and registry read."""
    seeds = list(conf.eval.seeds)
    if not conf.eval.enabled or conf.eval.refiner or not baseline or \
            all(racing.rounds_of(c, seeds) == len(seeds) for c in candidates):
        return candidates, None
    settings = evaluation_settings(conf)
    cache_dir = resolve_path(conf.paths, conf.paths.cache_dir)
    pretrained = resolve_source(conf.model, cache_dir)  # its notes (a random base paints no face) as in the trials'
    # compiling for generation is weighed for the race as a whole (each call scores one seed of a few
    # checkpoints), at each call against the compile cache's state then: a cache the trials' scoring, a background
    # compile (sweep/precompile.py) or an earlier sweep left warm is used from the call that finds it so
    use_cache(cache_dir)
    work = len(candidates) * len(settings.prompts)
    pipe = []  # loaded on first use: a race that is over scores nothing

    def score(todo: list[Candidate], wanted: list[int], final: bool) -> list[Candidate]:
        if not pipe:
            pipe.append(shared_pipeline(conf.model, conf.train.device, conf.train.mixed_precision, cache_dir))
        prior = final or racing.uses_prior(conf.selection)
        folders = sorted({Path(c.checkpoint).parent.parent for c in todo})
        scoring = []  # each call's images are scored while the next call's generate; the round waits at its end
        try:
            for folder in folders:
                mine = [c for c in todo if Path(c.checkpoint).parent.parent == folder]
                log.info("racing: %s at seed%s %s%s", ", ".join(c.key for c in mine), "s" * (len(wanted) > 1),
                         ", ".join(map(str, wanted)), " (full protocol)" * final)
                for scale in sorted({c.scale for c in mine}):  # a (checkpoint, strength) still in the race
                    scoring.append(evaluate(sorted({Path(c.checkpoint) for c in mine if c.scale == scale}), settings,
                                            instance_dir=conf.data.instance_dir, out_dir=folder / EVAL_DIR,
                                            pipeline=pipe[0], pretrained=pretrained, baseline=False, seeds=wanted,
                                            prior=prior, scales=[scale], compile_work=work, later=True))
        except BaseException:  # stopped or failed: what the earlier calls generated is still scored and kept
            for got in scoring:
                if isinstance(got, Later):
                    got.work.__exit__(*sys.exc_info())
            raise
        for got in scoring:  # every call scored (its error raised) before the round is judged
            if isinstance(got, Later):
                got.result()
        out = []
        for folder in folders:
            scored = read_scores(folder)
            out += [replace(c, metrics=scored[c.entry][0], cells=scored[c.entry][1])
                    for c in todo if Path(c.checkpoint).parent.parent == folder]
        return out

    def complete(c: Candidate) -> set:
        drift = conf.eval.face_backend != "none" and conf.eval.prior_prompt
        return {s for s in racing.seeds_of(c) if not drift or f"prior_s{s}" in c.cells}

    done, race = racing.run(candidates, seeds, baseline, conf.selection, score, conf.eval.race_alpha, complete)
    images = sum(_images(d) for d in {Path(c.checkpoint).parent.parent for c in done})
    full = len(done) * settings.images_per_checkpoint()
    record = {"alpha": conf.eval.race_alpha, "seeds": seeds, "checkpoints": len(done),
              "dropped": [d.__dict__ for d in race.dropped], "images": images, "full_protocol_images": full}
    write_json(sweep_dir / "report" / "race.json", record)
    log.info("racing: %d checkpoint(s), %d dropped before the last round; %d images generated for them, the full "
             "protocol would have made %d", len(done), len(race.dropped), images, full)
    return done, record


def _images(trial_dir: Path) -> int:
    """Images the trial's checkpoints were generated for, over every call (eval/metrics.json's times)."""
    path = trial_dir / EVAL_DIR / EVAL_FILE
    seconds = json.loads(path.read_text()).get("seconds", {}) if path.is_file() else {}
    return sum(v.get("images", 0) for k, v in seconds.items() if k.startswith("step-"))


def assess(sel: Selection, candidates: list, baseline: dict, cfg) -> confidence.Assessment:
    """Intervals for each trial's best checkpoint (the report's rows), the champion and the runner-up, and the
    champion's paired comparison with the runner-up."""
    keys = {r["key"] for r in report.table(candidates, sel, {})}
    shown = [c for c in candidates if c.key in keys or c in (sel.champion, sel.runner_up)]
    return confidence.assess(shown, sel.champion, sel.runner_up, baseline, cfg)


def _confidence_tags(sel: Selection) -> dict:
    c = getattr(sel.confidence, "comparison", None)
    if c is None:
        return {}
    return {"selection.decisive": str(c.decisive).lower(), "selection.verdict": c.verdict[:4000]}


def _confidence_rows(sel: Selection) -> list[tuple[str, float, int]]:
    """The pick's certainty as parent-run metrics: P(champion better than the runner-up), the margin's interval."""
    c = getattr(sel.confidence, "comparison", None)
    if c is None:
        return []
    return [("selection_p_champion_better", c.p_better, 0), ("selection_margin_low", c.margin.low, 0),
            ("selection_margin_high", c.margin.high, 0)]


def export_champion(sweep_dir: Path, sel: Selection) -> Path | None:
    """The champion for ComfyUI / A1111 / Forge and diffusers, with its model card, in <sweep>/champion/ (what
    `python -m sweep.export <sweep>` writes); a LoRA the web-UI format cannot hold gets the diffusers file only. A
    failure here costs the export, never the sweep's selection or registration."""
    out = sweep_dir / CHAMPION_DIR
    c = sel.chosen
    try:
        src = from_checkpoint(Path(c.checkpoint), origin=str(sweep_dir), strength=c.scale)
        src.chosen = f"The champion of sweep {code(sweep_dir.name)}: {text(sel.explain())}."  # Markdown: escaped
        if sel.review:
            r = sel.review
            src.chosen = (f"Promoted by {text(r['by'])} in sweep {code(sweep_dir.name)} ({text(r['reason'])}); "
                          f"the rule had picked {code(r['rule_pick'] or 'nothing')}: {text(sel.explain())}.")
        export(src, out, strict=False, own=True)  # the sweep's own folder: its latest export, file by file
        return out
    except (Exception, SystemExit) as exc:
        log.warning("the champion was not exported to %s (%s); python -m sweep.export %s tries again", out, exc,
                    sweep_dir)
        return None


def _champion_record(tracker, pid: str, sel: Selection, ended: bool) -> dict:
    """The rule's champion, how sure it is and a person's pick over it on the parent run: returns its tags, logs its
    metrics (not again on a rebuilt report: `ended`)."""
    tags = _review_tags(sel)
    c = sel.champion
    if c is None:
        return tags
    tags.update({"champion.trial": c.trial, "champion.step": c.step, "champion.lora_scale": c.scale,
                 "champion.checkpoint": c.checkpoint, "champion.lora": report.lora_file(c),
                 "champion.lr": c.params.get("lr", ""), "champion.rank": c.params.get("rank", ""),
                 **_confidence_tags(sel)})
    if sel.runner_up:
        tags["runner_up"] = sel.runner_up.key
    if not ended:
        tracker.log_metrics(pid, [("champion_" + k, v, c.step) for k, v in c.metrics.items()]
                            + [(f"champion_{sel.objective}", sel.ranked[0][1], c.step)]
                            * (sel.objective not in c.metrics) + [("selection_margin", sel.margin, 0)]
                            + _confidence_rows(sel))
    return tags


def human_review(sel: Selection, sweep_dir: Path, candidates: list[Candidate], tracker) -> None:
    """A person's pick (python -m sweep.promote, <sweep>/promotion.json) on the selection: `promoted` is handed on
    instead of the rule's champion, `review` says who, why, and across the reviewed sweeps (the tracking store's,
    else the folders beside this one) how often the person kept the rule's pick."""
    pick = read_promotion(sweep_dir)
    if pick is None:
        return
    promoted = next((c for c in candidates if c.key == pick["key"]), None)
    if promoted is None:
        log.warning("%s names %s, which this sweep no longer scores: the rule's pick stands", PROMOTION_FILE,
                    pick["key"])
        return
    verdicts = tracker.reviews() or {str(d): p["agreed"] for d in sweep_dir.parent.iterdir()
                                     if d.is_dir() and (p := read_promotion(d))}
    verdicts[str(sweep_dir)] = pick["agreed"]
    sel.promoted = promoted
    sel.review = {**pick, "agreement": [sum(verdicts.values()), len(verdicts)]}


def _review_tags(sel: Selection) -> dict:
    if not sel.review:
        return {}
    agreed, reviewed = sel.review["agreement"]
    return {"review.promoted": sel.review["key"], "review.by": sel.review["by"],
            "review.reason": sel.review["reason"][:4000], "review.rule_pick": sel.review["rule_pick"] or "",
            "review.agreed": str(sel.review["agreed"]).lower(),
            "review.rule_agreement": f"{agreed} of {reviewed} reviewed sweep(s) kept the rule's pick"}


TRAINING_VIEW = "workflowType=machine_learning"


def run_page(uri: str, sweep: dict) -> str:
    """The sweep's run page in the MLflow UI: the tracking server's own, or `mlflow ui`'s default address. MLflow 3's
    UI opens in its GenAI view (traces, an agent overview), whatever the experiment's kind; `workflowType` in the
    link opens its "Model training" view (runs, metrics, the model registry)."""
    return f"{_host(uri)}/#/experiments/{sweep['experiment_id']}/runs/{sweep['parent_run_id']}?{TRAINING_VIEW}"


def _host(uri: str) -> str:
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def links(tracker, uri: str, sweep: dict, sel: Selection) -> dict[str, str]:
    """The MLflow UI's pages that answer the sweep's questions: {what: link}. The Models tab (every scored checkpoint,
    the champion first), the runs list sorted by the rule's objective with the deciding columns (a shared view the
    sweep stores), the sweep's run page (the champion and why)."""
    exp = f"{_host(uri)}/#/experiments/{sweep['experiment_id']}"
    out = {"checkpoints": f"{exp}/models?{TRAINING_VIEW}"}
    try:
        out["trials"] = f"{exp}/runs?viewStateShareKey={share_runs_view(tracker.client, sweep['experiment_id'], sel.objective)}&{TRAINING_VIEW}"
    except Exception as exc:  # a store that does not answer: the other links stand
        log.warning("the runs list's view was not stored (%s)", exc)
    out["sweep"] = run_page(uri, sweep)
    return out


def _print(sweep_dir, sel, candidates, statuses, ui, failed, pages: dict | None = None,
           registration: dict | None = None, notes: list[str] = (), phases: Phases | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"sweep {sweep_dir.name}: {len(statuses)} trial(s), {failed} failed")
    rows = report.table(candidates, sel, statuses)
    for c in report.headers(sel, rows):
        t.add_column(c)
    for row in rows:
        t.add_row(*(escape(fmt(row[c])) for c in report.columns(rows)))  # a trial's [..] is text, not rich markup
    console = Console(width=200)
    console.print(t)
    print(sel.explain())
    comparison = getattr(sel.confidence, "comparison", None)
    if comparison is not None:
        print(f"how sure: {comparison.verdict}")
    if sel.review:
        r = sel.review
        how = "the rule agreed" if r["agreed"] else f"over the rule: {r['rule_pick']}"
        print(f"promoted by {r['by']}: {r['key']} ({how}); "
              f"across reviewed sweeps the rule's pick was kept {r['agreement'][0]} of {r['agreement'][1]} time(s)")
    compare = "MLflow tracking is off (tracking.enabled=false)" if ui.endswith("disabled") else f"compare the runs: {ui}"
    if pages and not ui.endswith("disabled"):
        said = {"checkpoints": "every checkpoint, the champion first", "trials": "the trials by the rule's objective",
                "sweep": "the champion and why"}
        compare += "".join(f"\n  then open {link}   ({said[what]})" for what, link in pages.items())
    if report.registry_text(registration):
        print(redact_text(plain(report.registry_text(registration))))
    if phases is not None:
        print(phases.text())
    print(redact_text(f"report: {sweep_dir / 'report'}\n{compare}"), flush=True)
    for line in report.meaningless_lines(notes)[:1]:  # the last word: the demo's numbers mean nothing
        print(line.replace("**", ""), flush=True)
