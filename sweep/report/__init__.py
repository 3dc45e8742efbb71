"""The sweep's report: a table, metric-vs-step plots and an image grid, in the sweep folder and on the parent run.

    python -m sweep.report <sweep folder or parent run id>    rebuilds it"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageDraw

from common.metrics import FACE_SIMILARITY, REPORTED

from ..markdown import code, text
from ..metrics import fmt
from ..phases import PHASES_FILE, Phases
from ..results import lora_file, write_json, write_text
from ..selection import Candidate, Selection

COLUMNS = ["trial", "lr", "rank", "best_step", "strength", *REPORTED, "objective", "low", "high", "status",
           "champion"]


def columns(rows: list[dict]) -> list[str]:
    """COLUMNS, without `strength` (the LoRA strength of each trial's best) when every one is full strength."""
    return [c for c in COLUMNS if c != "strength" or any(r["strength"] not in (1.0, "") for r in rows)]


def headers(sel: Selection, rows: list[dict]) -> list[str]:
    """The columns as shown: the objective column named by the rule's objective (weighted_score,
    face_similarity...), its 95% interval's ends (sweep/confidence.py) beside it."""
    names = {"objective": f"best {sel.objective}", "low": "95% low", "high": "95% high"}
    return [names.get(c, c) for c in columns(rows)]


def interval(sel: Selection, key: str, name: str):
    """The 95% interval of a candidate's metric or objective, if the sweep's end assessed it (else None)."""
    return getattr(sel.confidence, "intervals", {}).get(key, {}).get(name)


def markdown_table(rows: list[dict], sel: Selection) -> list[str]:
    shown = columns(rows)
    return (["| " + " | ".join(headers(sel, rows)) + " |", "|" + "---|" * len(shown)]
            + ["| " + " | ".join(text(fmt(r[c])) for c in shown) + " |" for r in rows])


def table(candidates: list[Candidate], sel: Selection, statuses: dict[str, str]) -> list[dict]:
    """One row per trial: its best eligible checkpoint (or, if none qualifies, its best by the objective); `key`
    names that candidate (trial@step, with its strength)."""
    rank = {c.key: obj for c, obj in sel.ranked}
    rows = []
    for trial in sorted({c.trial for c in candidates} | set(statuses)):
        mine = [c for c in candidates if c.trial == trial]
        eligible = [c for c in mine if c.key in rank]
        best = min(eligible, key=lambda c: [x.key for x, _ in sel.ranked].index(c.key)) if eligible else \
            max(mine, key=lambda c: _num(c.metrics.get(FACE_SIMILARITY)), default=None)
        m = best.metrics if best else {}
        p = best.params if best else {}
        ival = interval(sel, best.key, sel.objective) if best else None
        rows.append({"trial": trial, "lr": p.get("lr", ""), "rank": p.get("rank", ""),
                     "best_step": best.step if best else "", "strength": best.scale if best else "",
                     "key": best.key if best else "", **{name: m.get(name) for name in REPORTED},
                     "objective": rank.get(best.key) if best else None,
                     "low": ival.low if ival and best.key in rank else None,
                     "high": ival.high if ival and best.key in rank else None, "status": statuses.get(trial, ""),
                     "champion": "*" if sel.champion and best and best.key == sel.champion.key else ""})
    return rows


def _num(v) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf


IMAGES = {"metrics_vs_step.png": "metrics vs step", "champion_vs_baseline.png": "champion vs baseline",
          "optuna_intermediate.png": "checkpoint scores reported to Optuna"}


def _metrics_text(m: dict, sel: Selection | None = None, key: str = "") -> str:
    """'clip_t 31.2 [30.1, 32.3], ...': each metric, with its 95% interval where the sweep's end assessed it."""
    shown = []
    for k, v in m.items():
        ival = interval(sel, key, k) if sel is not None else None
        shown.append(f"{text(k)} {text(ival.text()) if ival else fmt(v)}")  # [a, b]: text, not a link
    return ", ".join(shown)


def export_lines(exported: Path | None) -> list[str]:
    """Where the champion's web-UI file and model card are (sweep/export/ wrote them), as Markdown list items."""
    try:
        record = json.loads((Path(exported) / "export.json").read_text())
    except (OSError, TypeError, ValueError):
        return []
    lines = [f"- ComfyUI / A1111 / Forge file: {code(Path(exported) / record['webui_file'])}"] \
        if record.get("webui_file") else []
    return lines + [f"- model card: {code(Path(exported) / 'README.md')}"]


def champion_lines(sel: Selection, rule_text: str = "", exported: Path | None = None) -> list[str]:
    """The champion and why, in Markdown: its trial, step, metrics, checkpoint folder and LoRA files; the rule;
    the runner-up and the margin. Shared by report.md and the parent run's description in MLflow."""
    lines = []
    if sel.champion:
        c, obj = sel.ranked[0]
        ival = interval(sel, c.key, sel.objective)
        at = f"step {c.step}" + (f", LoRA strength {c.scale:g}" if c.scale != 1.0 else "")
        lines += [f"**Champion: {code(c.trial)} at {at}** ({sel.objective} {text(ival.text()) if ival else fmt(obj)})",
                  "", f"- checkpoint folder: {code(c.checkpoint)}", f"- LoRA file (diffusers): {code(lora_file(c))}",
                  *export_lines(exported), f"- metrics: {_metrics_text(c.metrics, sel, c.key)}"]
        if c.params:
            lines += ["- settings: " + ", ".join(f"{text(k)} {text(v)}" for k, v in c.params.items())]
    else:
        lines += ["**No champion**: no checkpoint qualifies under the rule."]
    lines += ["", "### Why", "", f"Rule `{sel.rule}`" + (f": {rule_text}" if rule_text else ".")]
    if sel.champion and sel.runner_up:
        lines += ["", f"Runner-up {code(sel.runner_up.key)} ({sel.objective} {fmt(sel.ranked[1][1])}): the champion "
                      f"leads by {fmt(sel.margin)}."]
    elif sel.champion:
        lines += ["", "No runner-up: the champion is the only eligible checkpoint."]
    verdict = getattr(getattr(sel.confidence, "comparison", None), "verdict", None)
    if verdict:
        lines += ["", f"**How sure:** {text(verdict)}. Intervals are 95%, from a bootstrap over each checkpoint's "
                      "(prompt, seed) images; the comparison is paired on the images both were scored on."]
    lines += ["", text(sel.explain()), *review_lines(sel)]
    return lines


def meaningless_lines(notes: list[str]) -> list[str]:
    """A plain warning first thing when evaluation said its numbers mean nothing (the demo's random-weight models)."""
    if not notes:
        return []
    return [f"**These scores carry no meaning**: {text('; '.join(notes))}. The sweep shows how the tool works; the "
            "champion it names is no better a LoRA than any other.", ""]


def registry_text(reg: dict | None) -> str:
    """One paragraph: where the champion is registered, under which alias and why, and (for a challenger) the
    command that makes it the champion. Empty when nothing was recorded (tracking off, or not attempted)."""
    if not reg:
        return ""
    if reg.get("state") != "done":
        return (f"Registry: **not registered yet**: registering {code(reg.get('key'))} in {code(reg.get('model'))} was "
                "interrupted; run the command that ended the sweep again (python -m sweep ... resume=true, or the "
                "same python -m sweep.promote) to finish it.")
    where = f"{code(reg['model'])} version {text(reg['version'])}" if reg.get("version") else code(reg.get("model"))
    if reg.get("alias") == "challenger":
        return (f"Registry: {where} with alias **`challenger`**: {text(reg['decision'])}. Version "
                f"{text(reg.get('champion_version'))} is a person's pick and keeps `champion`; to make this one the "
                f"champion: {code(reg['switch'])}")
    if reg.get("alias") == "champion":
        return f"Registry: {where}, alias `champion` ({text(reg['decision'])})."
    return f"Registry: not registered in {code(reg.get('model'))}: {text(reg.get('decision'))}."


def registry_lines(reg: dict | None) -> list[str]:
    said = registry_text(reg)
    return ["", "### Registry", "", said] if said else []


def review_lines(sel: Selection) -> list[str]:
    """A person's pick over the rule's (python -m sweep.promote), and how often, across reviewed sweeps, people kept
    the rule's pick."""
    r = sel.review
    if not r:
        return []
    agreed, reviewed = r["agreement"]
    what = (f"kept the rule's pick {code(r['key'])}" if r["agreed"] else
            f"**overrode the rule**: promoted {code(r['key'])} over the rule's {code(r['rule_pick'] or 'nothing')}")
    at = text(str(r["at"])[:16].replace("T", " "))
    return ["", "### Human review", "", f"Reviewed by {text(r['by'])}, who {what} on {at} UTC: "
            f"\"{text(r['reason'])}\". The exported and registered champion is {code(r['key'])}.", "",
            f"Across {reviewed} reviewed sweep(s), people kept the rule's pick in {agreed} ({agreed / reviewed:.0%})."]


def mlflow_note(sel: Selection, rule_text: str, run_id: str, images: list[str], failed: int, total: int,
                report_dir: Path, rows: list[dict] = (), exported: Path | None = None, registry: dict | None = None,
                notes: list[str] = ()) -> str:
    """The parent run's description (the tag `mlflow.note.content`, Markdown, shown on its run page): the champion,
    every trial's best checkpoint side by side (no clicking through the runs), why, and the report's images inline.
    The MLflow UI serves a run's artifacts at get-artifact?path=<artifact path>&run_uuid=<run id>, relative to the
    page (its own host and prefix)."""
    lines = [*meaningless_lines(notes), *champion_lines(sel, rule_text, exported), *registry_lines(registry)]
    trials = ["", *markdown_table(list(rows), sel)] if rows else []
    at = len(meaningless_lines(notes)) + 1  # after the champion's line
    lines[at:at] = [*trials, "", f"Sweep of {total} trial(s), {failed} failed; report: {code(report_dir)} "
                  "(artifacts: `report/`)."]
    for name in images:
        url = f"get-artifact?path=report/{quote(name)}&run_uuid={quote(run_id)}"
        lines += ["", f"[{IMAGES.get(name, name)}]({url})", "", f"![{IMAGES.get(name, name)}]({url})"]
    return "\n".join(lines) + "\n"


def write(sweep_dir: Path, candidates: list[Candidate], sel: Selection, statuses: dict[str, str],
          ui: str, rule_text: str = "", exported: Path | None = None, registry: dict | None = None,
          notes: list[str] = (), phases: Phases | None = None) -> list[Path]:
    """report.md (champion, rule, table, images inline), report.csv, selection.json (strict JSON), the plots; each
    written atomically. `registry`: the sweep's registration as recorded (finalize.py's registry.json), `notes`:
    evaluation's notes on its own numbers (random weights: the scores carry no meaning); `phases`: where the
    sweep's time went (report/phases.json, written by the sweep's end)."""
    out = Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics_vs_step.png", "champion_vs_baseline.png"):  # a rebuilt report shows what it made
        (out / stale).unlink(missing_ok=True)
    rows = table(candidates, sel, statuses)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(headers(sel, rows))
    w.writerows([[r[c] for c in columns(rows)] for r in rows])
    write_text(out / "report.csv", buf.getvalue())
    plots = _plots(out, candidates, sel)
    grid = _grid(Path(sweep_dir), out, candidates, sel)
    lines = [f"# Sweep report: {text(Path(sweep_dir).name)}", "", *meaningless_lines(notes),
             *champion_lines(sel, rule_text, exported), *registry_lines(registry), "", "## Trials", "",
             f"Each trial's best eligible checkpoint; `best {sel.objective}` is the rule's objective there (empty: "
             "none qualifies).", "", *markdown_table(rows, sel)]
    if sel.baseline:
        lines += ["", "Baseline (no LoRA): " + ", ".join(f"{k} {fmt(v)}" for k, v in sorted(sel.baseline.items()))]
    if sel.pareto:
        lines += ["", "Pareto front (identity metric vs CLIP-T: no other checkpoint is better in both): "
                  + ", ".join(code(c.key) for c in sel.pareto)]
    if sel.rejected:
        lines += ["", f"{len(sel.rejected)} checkpoint(s) could not win:", ""]
        lines += [f"- {code(k)}: {text(v)}" for k, v in sel.rejected.items()]
    lines += race_lines(sel.race)
    lines += phases.markdown() if phases is not None else []
    lines += ["", "## Images", "", f"![{IMAGES[plots.name]}]({plots.name})"]
    if grid:
        lines += ["", f"![{IMAGES[grid.name]}]({grid.name})"]
    lines += ["", f"Compare the runs: {code(ui)}", ""]
    optuna = _optuna_section(out) if (out / "optuna_study.json").is_file() else ([], [])  # the sweeper wrote it
    lines += optuna[0]
    write_json(out / "selection.json", {
        "rule": sel.rule, "objective": sel.objective, "objective_meaning": rule_text, "explanation": sel.explain(),
        "champion": _plain(sel.champion), "chosen": _plain(sel.chosen),  # the rule's pick; what was handed on
        "champion_lora": lora_file(sel.champion) if sel.champion else None,
        "champion_export": str(exported) if exported else None,
        "runner_up": _plain(sel.runner_up), "margin": sel.margin,
        "confidence": sel.confidence.as_dict() if sel.confidence is not None else None,
        "rejected": sel.rejected, "pareto": [c.key for c in sel.pareto], "baseline": sel.baseline,
        "registry": registry or None, "scores_meaningless": list(notes)})
    write_text(out / "report.md", "\n".join(lines) + "\n")  # last: it claims only what is recorded
    files = [out / "report.md", out / "report.csv", out / "selection.json", plots, *optuna[1]]
    files += [out / PHASES_FILE] if (out / PHASES_FILE).is_file() else []
    return files + ([grid] if grid else [])


def race_lines(race: dict | None) -> list[str]:
    """Racing evaluation in the report: what it saved and which checkpoints it dropped, when and why."""
    if not race:
        return []
    share = race["images"] / race["full_protocol_images"] if race["full_protocol_images"] else float("nan")
    lines = ["", "## Racing evaluation", "",
             f"{race['checkpoints']} checkpoint(s) got one seed per prompt as they were written; those that could "
             f"still win got more, up to all {len(race['seeds'])} seeds, and the champion and runner-up all of them "
             f"with the prior-drift images (`eval.budget=race`; the best checkpoint is dropped with probability at "
             f"most {race['alpha']:g}). Images generated for checkpoints: {race['images']}, {share:.0%} of the "
             f"{race['full_protocol_images']} the full protocol makes (`eval.budget=full`)."]
    if race["dropped"]:
        lines += ["", f"{len(race['dropped'])} checkpoint(s) dropped (their scores are from the seeds they got; "
                      "their grids show only those):", ""]
        lines += [f"- {code(d['key'])} after {d['rounds']} seed(s): {text(d['why'])}" for d in race["dropped"]]
    return lines


def _plain(c: Candidate | None) -> dict | None:
    """A candidate for selection.json: its fields without the per-image cells (those stay in eval/metrics.json)."""
    return {k: v for k, v in c.__dict__.items() if k != "cells"} if c else None


def _optuna_section(out: Path) -> tuple[list[str], list[Path]]:
    """The study in the report: trial states, the best trial (or the Pareto front), and a plot of every trial's
    checkpoint scores, pruned trials ending where they were stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = json.loads((out / "optuna_study.json").read_text())
    front = study.get("pareto_front") or study.get("best") or []
    title = "Pareto front" if "pareto_front" in study else "Best trial"
    lines = ["", f"## Optuna study {code(study['study'])}", "",
             "Trials: " + text(", ".join(f"{k} {v}" for k, v in study["counts"].items())), "",
             f"Objectives: {text(', '.join(f'{o} ({d})' for o, d in zip(study['objectives'], study['directions'])))}"]
    if front:
        lines += ["", f"{title}:", ""]
    lines += [f"- trial {text(r['trial'])}: " + text(", ".join(f"{k} {fmt(v)}" for k, v in r.items() if k != "trial"))
              for r in front]
    lines += ["", f"![{IMAGES['optuna_intermediate.png']}](optuna_intermediate.png)"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in study["trials"]:
        pts = sorted((int(k), v) for k, v in t["intermediate"].items())
        if pts:
            ax.plot([p[0] for p in pts], [math.nan if p[1] is None else p[1] for p in pts], "--" if t["state"] == "PRUNED" else "-", marker="o",
                    label=f"{t['number']} {t['state'].lower()}")
    ax.set_xlabel("step")
    ax.set_ylabel(study["objectives"][0])
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title("checkpoint scores reported to Optuna (dashed: pruned)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "optuna_intermediate.png", dpi=110)
    plt.close(fig)
    return lines, [out / "optuna_study.json", out / "optuna_intermediate.png"]


def _plots(out: Path, candidates: list[Candidate], sel: Selection) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(math.ceil(len(REPORTED) / 2), 2, figsize=(11, 3.5 * math.ceil(len(REPORTED) / 2)),
                             squeeze=False)
    for ax in axes.flat[len(REPORTED):]:
        ax.set_visible(False)
    steps = sorted({c.step for c in candidates})
    for ax, name in zip(axes.flat, REPORTED):
        for trial, scale in sorted({(c.trial, c.scale) for c in candidates}):  # a line per trial and strength
            pts = sorted((c.step, c.metrics.get(name)) for c in candidates if (c.trial, c.scale) == (trial, scale))
            ax.plot([s for s, _ in pts], [v if v is not None else math.nan for _, v in pts], marker="o",
                    label=trial + (f" x{scale:g}" if scale != 1.0 else ""))
        if isinstance(sel.baseline.get(name), float) and math.isfinite(sel.baseline[name]):
            ax.axhline(sel.baseline[name], color="gray", linestyle="--", label="baseline (no LoRA)")
        if sel.champion:
            ax.plot([sel.champion.step], [sel.champion.metrics.get(name, math.nan)], marker="*", markersize=16,
                    color="gold", markeredgecolor="black", linestyle="none", label="champion")
        if all(not (isinstance(c.metrics.get(name), float) and math.isfinite(c.metrics[name])) for c in candidates):
            ax.text(0.5, 0.5, "no value (no face detected?)", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])  # no scale to read
            ax.set_yticks([])
        elif len(steps) <= 12:
            ax.set_xticks(steps)  # the checkpoints' own steps
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if name.endswith("_rate"):  # a fraction: its whole range, not a zoom on (say) all zeros
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(name)
        ax.set_xlabel("training step")
    if axes.flat[0].get_legend_handles_labels()[0]:  # no trial scored anything: no legend to draw
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "metrics_vs_step.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def grid_file(c: Candidate) -> Path:
    """The candidate's prompts x seeds grid (evaluation writes it beside the trial's scores)."""
    return Path(c.checkpoint).parent.parent / "eval" / "grids" / f"{c.entry}_base.png"


def _grid(sweep_dir: Path, out: Path, candidates: list[Candidate], sel: Selection) -> Path | None:
    """Champion, baseline and each trial's best, stacked: each row is that checkpoint's prompts x seeds grid."""
    entries = []
    if sel.champion:
        entries.append((f"CHAMPION {sel.champion.key}", grid_file(sel.champion)))
    base = next(iter(sorted(sweep_dir.glob("**/eval/grids/baseline_base.png"))), None)
    if base:
        entries.append(("baseline (no LoRA)", base))
    for row in table(candidates, sel, {}):
        c = next((c for c in candidates if c.key == row["key"]), None)
        if c and not (sel.champion and c.key == sel.champion.key):
            entries.append((f"best of {c.key}", grid_file(c)))
    images = [(label, Image.open(p)) for label, p in entries if p.is_file()]
    if not images:
        return None
    w = max(im.width for _, im in images)
    sheet = Image.new("RGB", (w, sum(im.height + 24 for _, im in images)), "white")
    y = 0
    draw = ImageDraw.Draw(sheet)
    for label, im in images:
        draw.text((6, y + 5), label, fill="black")
        sheet.paste(im, (0, y + 24))
        y += im.height + 24
    path = out / "champion_vs_baseline.png"
    sheet.save(path)
    return path
