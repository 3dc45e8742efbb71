"""Choosing the champion among all (trial, checkpoint) pairs. Pure functions over metric tables.

Default rule, the original study's judgement made explicit: identity first, within a prompt-fidelity
budget. Among checkpoints whose CLIP-T is at most `clip_t_tolerance` below the no-LoRA baseline and
whose face detection rate is at least `min_detection_rate`, the highest face similarity wins (the
study: 1e-5 underfits the face, 5e-4 overfits and loses the scene, 1e-4 balances). NaN never wins."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

RULES = ("identity_within_prompt_budget", "weighted")


@dataclass
class SelectionConfig:
    rule: str = "identity_within_prompt_budget"
    objective: str = "face_similarity"
    clip_t_tolerance: float = 2.0  # CLIP-T points (0-100 scale) below the baseline still accepted
    min_detection_rate: float = 0.5
    weights: Dict[str, float] = field(default_factory=lambda: {"face_similarity": 1.0, "clip_t": 1.0})


@dataclass
class Candidate:
    trial: str
    step: int
    metrics: Dict[str, float]
    checkpoint: str = ""
    trial_status: str = "finished"  # checkpoints of a trial that failed outright are never candidates
    params: Dict[str, object] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.trial}@{self.step}"


@dataclass
class Selection:
    rule: str
    champion: Optional[Candidate]
    runner_up: Optional[Candidate]
    ranked: List[tuple[Candidate, float]]  # eligible candidates, best first, with their objective
    rejected: Dict[str, str]  # candidate key -> why it could not win
    pareto: List[Candidate]  # not dominated in (objective, clip_t)
    baseline: Dict[str, float]

    @property
    def margin(self) -> float:
        return self.ranked[0][1] - self.ranked[1][1] if len(self.ranked) > 1 else math.nan

    def explain(self) -> str:
        if not self.champion:
            return f"no checkpoint qualifies under {self.rule}: " + "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        c, obj = self.ranked[0]
        text = f"{self.rule}: champion {c.key} with objective {obj:.4f}"
        if self.runner_up:
            text += f"; runner-up {self.runner_up.key} ({self.ranked[1][1]:.4f}, margin {self.margin:.4f})"
        return text + f"; {len(self.ranked)} eligible, {len(self.rejected)} rejected"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def select(candidates: List[Candidate], baseline: Dict[str, float], cfg: SelectionConfig) -> Selection:
    if cfg.rule not in RULES:
        raise ValueError(f"selection.rule={cfg.rule!r} is not one of {RULES}")
    rejected: Dict[str, str] = {}
    pool = []
    for c in candidates:
        why = _reject(c, baseline, cfg)
        if why:
            rejected[c.key] = why
        else:
            pool.append(c)
    scores = _objectives(pool, cfg)
    # ties: higher CLIP-T, then the earlier step (cheaper, less overfit), then the trial name
    ranked = sorted(((c, scores[c.key]) for c in pool if _finite(scores[c.key])),
                    key=lambda cs: (-cs[1], -cs[0].metrics.get("clip_t", -math.inf), cs[0].step, cs[0].trial))
    for c in pool:
        if not _finite(scores[c.key]):
            rejected[c.key] = "objective is NaN"
    return Selection(cfg.rule, ranked[0][0] if ranked else None, ranked[1][0] if len(ranked) > 1 else None,
                     ranked, rejected, pareto_front(candidates, cfg.objective), dict(baseline))


def checkpoint_score(c: Candidate, baseline: Dict[str, float], cfg: SelectionConfig) -> float:
    """One checkpoint's score on its own, for a sweeper that must judge checkpoints as they come (pruning,
    Bayesian search): the rule's objective if the checkpoint is eligible, else NaN. The weighted rule sums the
    raw weighted metrics here, since there is no pool to normalise over."""
    if _reject(c, baseline, cfg):
        return math.nan
    if cfg.rule == "identity_within_prompt_budget":
        return float(c.metrics[cfg.objective])
    vals = [w * c.metrics.get(k, math.nan) for k, w in cfg.weights.items() if w]
    return float(sum(vals)) if vals and all(_finite(v) for v in vals) else math.nan


def _reject(c: Candidate, baseline: Dict[str, float], cfg: SelectionConfig) -> str | None:
    if c.trial_status == "failed":
        return "trial failed"
    obj = c.metrics.get(cfg.objective)
    if cfg.rule == "identity_within_prompt_budget" and not _finite(obj):
        return f"{cfg.objective} is NaN or missing"
    rate = c.metrics.get("face_detection_rate")
    if "face_detection_rate" in c.metrics and not (_finite(rate) and rate >= cfg.min_detection_rate):
        return f"face detection rate {rate} < {cfg.min_detection_rate}"
    clip_t, base = c.metrics.get("clip_t"), baseline.get("clip_t")
    if cfg.rule == "identity_within_prompt_budget" and _finite(base):
        if not _finite(clip_t):
            return "clip_t is NaN or missing"
        if clip_t < base - cfg.clip_t_tolerance:
            return f"clip_t {clip_t:.2f} is more than {cfg.clip_t_tolerance} below the baseline's {base:.2f}"
    return None


def _objectives(pool: List[Candidate], cfg: SelectionConfig) -> Dict[str, float]:
    if cfg.rule == "identity_within_prompt_budget":
        return {c.key: c.metrics[cfg.objective] for c in pool}
    total = {c.key: 0.0 for c in pool}
    for name, w in cfg.weights.items():  # min-max normalised over the candidates, so units do not matter
        if not w:
            continue
        vals = [c.metrics.get(name) for c in pool if _finite(c.metrics.get(name))]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 0.0)
        for c in pool:
            v = c.metrics.get(name)
            total[c.key] += w * ((v - lo) / (hi - lo) if hi > lo else 0.0) if _finite(v) else math.nan
    return total


def pareto_front(candidates: List[Candidate], objective: str = "face_similarity") -> List[Candidate]:
    pts = [c for c in candidates if c.trial_status != "failed"
           and _finite(c.metrics.get(objective)) and _finite(c.metrics.get("clip_t"))]

    def dominated(a: Candidate) -> bool:
        return any(b.metrics[objective] >= a.metrics[objective] and b.metrics["clip_t"] >= a.metrics["clip_t"]
                   and (b.metrics[objective], b.metrics["clip_t"]) != (a.metrics[objective], a.metrics["clip_t"])
                   for b in pts)

    return sorted((c for c in pts if not dominated(c)), key=lambda c: (-c.metrics[objective], c.trial, c.step))
