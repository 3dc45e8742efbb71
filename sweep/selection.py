"""Choosing the champion among all (trial, checkpoint) pairs. Pure functions over metric tables.

Default rule, the original study's judgement made explicit: identity first, within a prompt-fidelity
budget. Among checkpoints whose CLIP-T is at most `clip_t_tolerance` below the no-LoRA baseline and
whose face detection rate is at least `min_detection_rate`, the highest face similarity wins (the
study: 1e-5 underfits the face, 5e-4 overfits and loses the scene, 1e-4 balances). NaN never wins.

Each rule has ONE named objective (`objective_name`), computed from a checkpoint's own metrics and the
baseline only (`checkpoint_score`): adding or removing other candidates never changes a checkpoint's score, so
the number in the console, result.json, MLflow, Optuna, the report and the registry is the same number, and
checkpoints of different sweeps (same protocol) compare directly. The weighted rule puts every metric on a
fixed unit (METRICS) instead of normalising over the pool."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

from common.metrics import (CLIP_T, FACE_DETECTION_RATE, FACE_SIMILARITY, METRICS, WEIGHTED_SCORE, aggregate,
                            close_matches, metric)
from evaluation.config import entry_name

RULES = ("identity_within_prompt_budget", "weighted")


@dataclass
class SelectionConfig:
    rule: str = "identity_within_prompt_budget"
    objective: str = FACE_SIMILARITY
    clip_t_tolerance: float = 2.0  # CLIP-T points (0-100 scale) below the baseline still accepted
    min_detection_rate: float = 0.5
    # rule=weighted: weighted_score = sum of weight x metric / its METRICS unit (sign by its direction)
    weights: Dict[str, float] = field(default_factory=lambda: {FACE_SIMILARITY: 1.0, CLIP_T: 1.0})


@dataclass
class Candidate:
    trial: str
    step: int
    metrics: Dict[str, float]
    checkpoint: str = ""
    trial_status: str = "finished"  # checkpoints of a trial that failed outright are never candidates
    params: Dict[str, object] = field(default_factory=dict)
    cells: Dict[str, Dict[str, float]] = field(default_factory=dict)  # each image's scores: {"p0_s1": {metric: v}}
    scale: float = 1.0  # the LoRA strength it was scored at (eval.lora_scales): a candidate is (checkpoint, strength)
    weights: str = ""  # its LoRA file's recorded sha256: trials one training serves (trainer/planner.py) share files

    @property
    def key(self) -> str:
        """"lr=0.0001@300", at a strength other than full "lr=0.0001@300x0.7" (what sweep.promote takes)."""
        return f"{self.trial}@{self.step}" + (f"x{self.scale:g}" if self.scale != 1.0 else "")

    def on(self, keys) -> "Candidate":
        """The candidate with its cells limited to `keys` and its metrics their means (set metrics such as pairwise
        kept)."""
        keys = list(keys)
        return replace(self, metrics={**self.metrics, **aggregate(self.cells[k] for k in keys)},
                       cells={k: self.cells[k] for k in keys})

    @property
    def entry(self) -> str:
        """Its name in the trial's eval/metrics.json, grids and images ("step-000300", "step-000300_x0.7")."""
        return entry_name(Path(self.checkpoint).name or f"step-{self.step:06d}", self.scale)


@dataclass
class Selection:
    rule: str
    champion: Optional[Candidate]
    runner_up: Optional[Candidate]
    ranked: List[tuple[Candidate, float]]  # eligible candidates, best first, with checkpoint_score
    rejected: Dict[str, str]  # candidate key -> why it could not win
    pareto: List[Candidate]  # not dominated in (objective, clip_t)
    baseline: Dict[str, float]
    objective: str = "objective"  # objective_name(cfg): what the numbers in `ranked` are
    confidence: Optional[object] = None  # sweep.confidence.Assessment, when the sweep's end has assessed the pick
    race: Optional[dict] = None  # racing evaluation's record (report/race.json), when checkpoints were raced
    review: Optional[dict] = None  # a person's pick over the rule's (sweep.promote): by, reason, agreed, agreement
    promoted: Optional[Candidate] = None  # the candidate that person promoted

    @property
    def chosen(self) -> Optional[Candidate]:
        """What the sweep hands on (exported, registered): a person's promoted pick, else the rule's champion."""
        return self.promoted or self.champion

    @property
    def margin(self) -> float:
        return self.ranked[0][1] - self.ranked[1][1] if len(self.ranked) > 1 else math.nan

    def explain(self) -> str:
        if not self.champion and not self.rejected:
            return "no checkpoint was scored: every trial failed before its first checkpoint (see the errors above)"
        if not self.champion:
            return f"no checkpoint qualifies under {self.rule}: " + "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        c, obj = self.ranked[0]
        text = f"{self.rule}: champion {c.key} with {self.objective} {obj:.4f}"
        if self.runner_up:
            text += f"; runner-up {self.runner_up.key} ({self.ranked[1][1]:.4f}, margin {self.margin:.4f})"
        return text + f"; {len(self.ranked)} eligible, {len(self.rejected)} rejected"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def config_problems(cfg: SelectionConfig) -> List[str]:
    """What is wrong with a selection config, each naming the bad value and the fix (empty when it is usable)."""
    if cfg.rule not in RULES:
        return [f"selection.rule={cfg.rule!r} is not one of {RULES}"]
    problems = []
    if cfg.rule == "identity_within_prompt_budget":
        try:
            metric(cfg.objective)
        except ValueError:
            problems.append(f"selection.objective={cfg.objective!r} is not a known metric: use one of {sorted(METRICS)}"
                            + close_matches(cfg.objective))
    else:
        for name, w in cfg.weights.items():
            try:
                metric(name)
            except ValueError as exc:
                problems.append(str(exc))
            if not _finite(w):
                problems.append(f"selection.weights.{name}={w!r} is not a finite number: give e.g. 1.0 (0 ignores it)")
        if not problems and not any(cfg.weights.values()):
            problems.append(f"selection.weights={dict(cfg.weights)} are all zero under rule=weighted: give at least one "
                            "metric a non-zero weight, e.g. {clip_t: 1.0, clip_i: 1.0}")
    return problems


def _check(cfg: SelectionConfig) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))


def objective_name(cfg: SelectionConfig) -> str:
    """The name of the number the rule ranks by: `weighted_score` for the weighted rule, else cfg.objective."""
    _check(cfg)
    return WEIGHTED_SCORE if cfg.rule == "weighted" else cfg.objective


def trial_best(candidates: List[Candidate], baseline: Dict[str, float], cfg: SelectionConfig,
               or_last: bool = False) -> tuple[float, Optional[Candidate]]:
    """A trial's best eligible checkpoint under the rule and its objective: the value a trial reports (console,
    result.json, MLflow, a sweeper). None qualifies: (NaN, None), or with `or_last` (NaN, its last checkpoint),
    whose raw metrics a multi-objective study still takes."""
    sel = select(candidates, baseline, cfg)
    if sel.champion:
        return checkpoint_score(sel.champion, baseline, cfg), sel.champion
    return math.nan, (max(candidates, key=lambda c: c.step) if or_last and candidates else None)


ROUND1 = "round1_"  # racing's first-round best of a trial, on its MLflow run, before the sweep's end raced on


def best_rows(best: Candidate, objective: float, objective_key: str, prefix: str = "") -> list[tuple[str, float, int]]:
    """A trial's best checkpoint as summary metrics (columns of the runs table, rows of the compare view):
    best_<metric>, best_step, best_lora_scale (its strength) and best_<objective name>, logged at the best step;
    `prefix` before each name (round1_: racing's first round, which the sweep's end may overturn)."""
    rows = [(f"best_{k}", v, best.step) for k, v in best.metrics.items()]
    rows += [("best_step", best.step, best.step), ("best_lora_scale", best.scale, best.step)]
    if objective_key not in best.metrics:
        rows += [(f"best_{objective_key}", objective, best.step)]
    return [(prefix + k, v, s) for k, v, s in rows]


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def _formula(cfg: SelectionConfig) -> str:
    """'1 x clip_t/100 + 1 x clip_i/100': the weighted score's terms, a lower-is-better metric's with a minus."""
    text = ""
    for name, w in cfg.weights.items():
        if not w:
            continue
        m = metric(name)
        negative = (w < 0) == m.higher_is_better
        term = f"{_fmt_num(abs(w))} x {name}" + (f"/{_fmt_num(m.unit)}" if m.unit != 1.0 else "")
        text += (" - " if negative else " + ") + term if text else ("-" if negative else "") + term
    return text


def describe_rule(cfg: SelectionConfig) -> str:
    """The rule in plain Markdown, for the report: what the objective is, its direction, what makes a checkpoint
    eligible."""
    _check(cfg)
    if cfg.rule == "weighted":
        formula = _formula(cfg)
        scaled = sorted({n for n, w in cfg.weights.items() if w and metric(n).unit == 100.0})
        note = f" ({', '.join(scaled)} as cosines: CLIP scores are 100 x cosine)" if scaled else ""
        lower = sorted(n for n, w in cfg.weights.items() if w and not metric(n).higher_is_better)
        note += f"; {', '.join(lower)} lower is better, hence the minus sign" if lower else ""
        return (f"`{WEIGHTED_SCORE}` = {formula}{note}; higher is better, computed from each checkpoint's own "
                f"metrics on fixed units (comparable across sweeps). A checkpoint needs a face detection rate "
                f">= {_fmt_num(cfg.min_detection_rate)} (where measured); NaN in a weighted metric disqualifies it.")
    return (f"`{cfg.objective}`, higher is better, among checkpoints whose CLIP-T is at most "
            f"{_fmt_num(cfg.clip_t_tolerance)} points below the no-LoRA baseline's and whose face detection rate is "
            f">= {_fmt_num(cfg.min_detection_rate)}. Ties: higher CLIP-T, then the earlier step.")


def select(candidates: List[Candidate], baseline: Dict[str, float], cfg: SelectionConfig) -> Selection:
    """Rank the eligible candidates by checkpoint_score, best first. Ties: higher CLIP-T, then the earlier step
    (cheaper, less overfit), then the trial name; a full tie keeps the input order."""
    _check(cfg)
    rejected: Dict[str, str] = {}
    scored = []
    for c in candidates:
        score, why = _score(c, baseline, cfg)
        if why:
            rejected[c.key] = why
        else:
            scored.append((c, score))
    ranked = sorted(scored, key=lambda cs: (-cs[1], -_clip_t(cs[0]), cs[0].step, cs[0].trial))
    ranked = _distinct(ranked, rejected)
    return Selection(cfg.rule, ranked[0][0] if ranked else None, ranked[1][0] if len(ranked) > 1 else None,
                     ranked, rejected, pareto_front(candidates, cfg.objective), dict(baseline), objective_name(cfg))


def _distinct(ranked: list, rejected: Dict[str, str]) -> list:
    """One candidate per set of identical weights (the same LoRA file at the same strength: a 300-step trial's
    checkpoints are its 1000-step twin's, trainer/planner.py), the best-ranked; the others are rejected as its
    twins, so that the runner-up is another LoRA and the champion's comparison means something."""
    first: Dict[tuple, Candidate] = {}
    out = []
    for c, score in ranked:
        twin = first.get((c.weights, c.scale)) if c.weights else None
        if twin is not None:
            rejected[c.key] = f"the same weights as {twin.key} (one training wrote both)"
            continue
        first.setdefault((c.weights, c.scale), c)
        out.append((c, score))
    return out


def _clip_t(c: Candidate) -> float:
    v = c.metrics.get(CLIP_T)
    return v if _finite(v) else -math.inf


def checkpoint_score(c: Candidate, baseline: Dict[str, float], cfg: SelectionConfig) -> float:
    """One checkpoint's objective (objective_name(cfg)) from its own metrics and the baseline alone, NaN if it is
    not eligible. `select` ranks by exactly this number, so a trial's objective (console, result.json, MLflow,
    Optuna) and the report's are the same, and scores of different sweeps compare directly."""
    _check(cfg)
    return _score(c, baseline, cfg)[0]


def _score(c: Candidate, baseline: Dict[str, float], cfg: SelectionConfig) -> tuple[float, Optional[str]]:
    """(score, None) for an eligible checkpoint, else (NaN, why not)."""
    why = _reject(c, baseline, cfg)
    if why:
        return math.nan, why
    if cfg.rule == "identity_within_prompt_budget":
        return float(c.metrics[cfg.objective]), None
    return weighted_score(c.metrics, cfg)


def weighted_score(values: Dict[str, float], cfg: SelectionConfig) -> tuple[float, Optional[str]]:
    """(the weighted rule's sum over `values`, None), or (NaN, why) when a weighted metric is missing or NaN: each
    weight x metric / its unit, a lower-is-better metric's subtracted. For a checkpoint's metrics or one image's."""
    total = 0.0
    for name, w in cfg.weights.items():
        if not w:
            continue
        v = values.get(name)
        if not _finite(v):
            return math.nan, f"{WEIGHTED_SCORE} is NaN: {name} is {'missing' if v is None else v}"
        m = metric(name)
        total += (1.0 if m.higher_is_better else -1.0) * w * v / m.unit
    return float(total), None


def _reject(c: Candidate, baseline: Dict[str, float], cfg: SelectionConfig) -> str | None:
    if c.trial_status == "failed":
        return "trial failed"
    obj = c.metrics.get(cfg.objective)
    if cfg.rule == "identity_within_prompt_budget" and not _finite(obj):
        return f"{cfg.objective} is NaN or missing"
    rate = c.metrics.get(FACE_DETECTION_RATE)
    if FACE_DETECTION_RATE in c.metrics and not (_finite(rate) and rate >= cfg.min_detection_rate):
        return f"face detection rate {rate} < {cfg.min_detection_rate}"
    clip_t, base = c.metrics.get(CLIP_T), baseline.get(CLIP_T)
    if cfg.rule == "identity_within_prompt_budget" and _finite(base):
        if not _finite(clip_t):
            return "clip_t is NaN or missing"
        if clip_t < base - cfg.clip_t_tolerance:
            return f"clip_t {clip_t:.2f} is more than {cfg.clip_t_tolerance} below the baseline's {base:.2f}"
    return None


def pareto_front(candidates: List[Candidate], objective: str = FACE_SIMILARITY) -> List[Candidate]:
    pts = [c for c in candidates if c.trial_status != "failed"
           and _finite(c.metrics.get(objective)) and _finite(c.metrics.get(CLIP_T))]

    def dominated(a: Candidate) -> bool:
        return any(b.metrics[objective] >= a.metrics[objective] and b.metrics[CLIP_T] >= a.metrics[CLIP_T]
                   and (b.metrics[objective], b.metrics[CLIP_T]) != (a.metrics[objective], a.metrics[CLIP_T])
                   for b in pts)

    return sorted((c for c in pts if not dominated(c)), key=lambda c: (-c.metrics[objective], c.trial, c.step))
