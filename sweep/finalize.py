"""The end of a sweep: gather every trial's checkpoint metrics, select the champion, register it, report."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from omegaconf import OmegaConf

from . import report
from .config import SweepConfig, resolve_path
from .selection import Candidate, Selection, SelectionConfig, checkpoint_score, select
from .tracking import make_tracker, read_sweep, ui_command

log = logging.getLogger(__name__)
RESULT = "result.json"
BASELINE = "baseline_metrics.json"


def trial_dirs(sweep_dir: Path) -> list[Path]:
    """Folders of the sweep's trials (the sweep folder itself for a single run)."""
    if (sweep_dir / RESULT).is_file():
        return [sweep_dir]
    return sorted(d for d in sweep_dir.iterdir() if d.is_dir() and (d / RESULT).is_file())


def collect(sweep_dir: Path) -> tuple[list[Candidate], dict[str, float], dict[str, str]]:
    candidates, statuses = [], {}
    for d in trial_dirs(sweep_dir):
        res = json.loads((d / RESULT).read_text())
        statuses[res["name"]] = res["status"]
        for ckpt, metrics in (res.get("metrics") or {}).items():
            if ckpt.startswith("step-"):
                candidates.append(Candidate(res["name"], int(ckpt[5:]), metrics, str(d / "checkpoints" / ckpt),
                                            "failed" if res["status"] == "failed" else res["status"],
                                            res.get("params", {})))
    base_file = sweep_dir / BASELINE
    baseline = json.loads(base_file.read_text())["metrics"] if base_file.is_file() else {}
    return candidates, baseline, statuses


def trial_best(candidates: list[Candidate], baseline: dict[str, float],
               cfg: SelectionConfig) -> tuple[float, Candidate | None]:
    """A trial's best eligible checkpoint under the sweep's rule and its objective (NaN, None if none qualifies):
    the value a trial reports to a sweeper."""
    sel = select(candidates, baseline, cfg)
    return (checkpoint_score(sel.champion, baseline, cfg), sel.champion) if sel.champion else (math.nan, None)


def load_config(sweep_dir: Path) -> SweepConfig:
    """The sweep's typed config, as its first trial saw it."""
    from .config import to_typed

    first = trial_dirs(sweep_dir)[0]
    return to_typed(OmegaConf.load(first / ".hydra" / "config.yaml"))


def finalize_folder(sweep_dir: Path, register: bool = True) -> tuple[Selection | None, int]:
    """Select, register, report. Returns the selection and how many trials failed (diverged ones included)."""
    sweep_dir = Path(sweep_dir).resolve()
    if not trial_dirs(sweep_dir):
        log.error("no finished trial in %s: nothing to select", sweep_dir)
        return None, 0
    conf = load_config(sweep_dir)
    candidates, baseline, statuses = collect(sweep_dir)
    sel = select(candidates, baseline, conf.selection)
    root = resolve_path(conf.paths, ".")
    tracker = make_tracker(conf.tracking, root)
    files = report.write(sweep_dir, candidates, sel, statuses, ui_command(tracker.uri))
    sweep = read_sweep(sweep_dir)
    failed = sum(s in ("failed", "diverged") for s in statuses.values())
    if sweep and sweep["parent_run_id"]:
        pid = sweep["parent_run_id"]
        for f in files:
            tracker.log_artifacts(pid, f, "report")
        tags = {"selection.rule": sel.rule, "selection.explanation": sel.explain()[:4000],
                "trials.total": len(statuses), "trials.failed": failed}
        if sel.champion:
            c = sel.champion
            tags.update({"champion.trial": c.trial, "champion.step": c.step, "champion.checkpoint": c.checkpoint,
                         "champion.lr": c.params.get("lr", ""), "champion.rank": c.params.get("rank", "")})
            tracker.log_metrics(pid, [("champion_" + k, v, c.step) for k, v in c.metrics.items()]
                                + [("selection_margin", sel.margin, 0)])
            if sel.runner_up:
                tags["runner_up"] = sel.runner_up.key
            if register and conf.tracking.enabled:
                from .registry import register_champion

                tags.update(register_champion(tracker, conf, pid, c, sel.ranked[0][1]))
        tracker.set_tags(pid, tags)
        tracker.end_sweep(pid, "FINISHED" if failed == 0 else "FAILED")
    _print(sweep_dir, sel, candidates, statuses, ui_command(tracker.uri), failed)
    return sel, failed


def _print(sweep_dir, sel, candidates, statuses, ui, failed) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sweep {sweep_dir.name}: {len(statuses)} trial(s), {failed} failed")
    for c in report.COLUMNS:
        t.add_column(c)
    for row in report.table(candidates, sel, statuses):
        t.add_row(*(report._fmt(row[c]) for c in report.COLUMNS))
    console = Console(width=200)
    console.print(t)
    print(sel.explain())
    compare = "MLflow tracking is off (tracking.enabled=false)" if ui.endswith("disabled") else f"compare the runs: {ui}"
    print(f"report: {sweep_dir / 'report'}\n{compare}", flush=True)


def folder_of_run(run_id: str) -> Path | None:
    """The local sweep folder recorded on a parent run of the default store."""
    try:
        from mlflow import MlflowClient

        from .tracking import TrackingConfig, store_uri

        uri, _ = store_uri(TrackingConfig(), Path("."))
        folder = MlflowClient(uri).get_run(run_id).data.tags.get("sweep_dir")
        return Path(folder) if folder and Path(folder).is_dir() else None
    except Exception:
        return None
