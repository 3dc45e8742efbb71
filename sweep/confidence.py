"""How sure a pick is: bootstrap intervals over a checkpoint's (prompt, seed) cells, and the champion against the
runner-up as a paired comparison on the cells both were scored on.

A checkpoint's metrics are means over its images (cells), so the noise of a pick is the noise of those means. The
bootstrap resamples cells with replacement, within each prompt when every prompt has two or more seeds (the
prompts are the protocol's, fixed; seeds are the noise), across all prompt cells otherwise (one seed per prompt:
a raced-out checkpoint). Each resample's metrics are computed as the scores are (common.metrics.aggregate) and
judged by the selection rule itself (`checkpoint_score`: eligibility, weights), so the intervals are those of the
numbers that pick the champion. Resampling n of n values underestimates the spread by a factor sqrt((n-1)/n);
deviations from the point estimate are scaled back up by its inverse (the rescaled bootstrap) and by Student's t
over the normal quantile for the cells' degrees of freedom, which brings the 95% intervals' coverage to ~95% with
2-4 seeds per prompt (tests/test_confidence.py measures it).

The champion is compared with the runner-up on the same resampled cells (paired: a hard prompt is hard for
both): the probability that the champion is better (a resample where only it is eligible counts as better) and
the margin's 95% interval. The pick is decisive when that interval lies above zero; otherwise it is too close to
call, and the advice says how many seeds per prompt would make the interval as narrow as the margin."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t

from common.metrics import floor_of

from .selection import Candidate, SelectionConfig, checkpoint_score, objective_name

LEVEL = 0.95
RESAMPLES = 2000
PRIOR = "prior_"  # cells of the prior-drift prompt: a stratum of their own


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def text(self) -> str:
        if not math.isfinite(self.value):
            return "nan"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.value:.4g}"
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass
class Comparison:
    """The champion against the runner-up on their shared cells."""

    champion: str
    runner_up: str
    cells: int  # shared prompt cells
    seeds_per_prompt: float
    p_better: float  # share of resamples in which the champion is better under the rule (spread widened as the
    # margin's interval is)
    margin: Interval  # champion's objective minus the runner-up's
    decisive: bool
    verdict: str  # one sentence for people
    more_seeds: Optional[int] = None  # seeds per prompt to add so that the interval is as narrow as the margin

    def as_dict(self) -> dict:
        return {"champion": self.champion, "runner_up": self.runner_up, "cells": self.cells,
                "p_champion_better": self.p_better, "margin": self.margin.as_dict(), "decisive": self.decisive,
                "verdict": self.verdict, "more_seeds_per_prompt": self.more_seeds}


@dataclass
class Assessment:
    """Intervals of each assessed checkpoint's metrics and objective, and the champion's comparison."""

    objective: str
    intervals: Dict[str, Dict[str, Interval]] = field(default_factory=dict)  # candidate key -> metric -> interval
    comparison: Optional[Comparison] = None

    def as_dict(self) -> dict:
        return {"level": LEVEL, "resamples": RESAMPLES, "objective": self.objective,
                "intervals": {k: {m: i.as_dict() for m, i in v.items()} for k, v in self.intervals.items()},
                "comparison": self.comparison.as_dict() if self.comparison else None}


def _strata(keys: List[str]) -> List[List[int]]:
    """Indices of the cells resampled together: per prompt when each prompt has >= 2 seeds, else all prompt cells
    as one; the prior-drift cells apart."""
    prompts: Dict[str, List[int]] = {}
    prior = []
    for i, k in enumerate(keys):
        if k.startswith(PRIOR):
            prior.append(i)
        else:
            prompts.setdefault(k.split("_")[0], []).append(i)
    groups = list(prompts.values())
    if groups and min(map(len, groups)) < 2:
        groups = [[i for g in groups for i in g]]
    return [g for g in groups + [prior] if g]


def _resample(keys: List[str], rng: np.random.Generator, n: int) -> tuple[np.ndarray, float]:
    """(n x len(keys) indices into keys, the correction for the deviations): each stratum resampled with
    replacement within itself. The correction undoes the bootstrap's variance shrinkage, sqrt(m / (m - 1)) for
    strata of m cells, and widens the normal quantile to Student's t on the cells' degrees of freedom (the sum of
    m - 1), as a t interval does for a mean of few values."""
    idx = np.empty((n, len(keys)), dtype=np.int64)
    prompt_strata = [g for g in _strata(keys) if not keys[g[0]].startswith(PRIOR)]
    for g in _strata(keys):
        g = np.asarray(g)
        idx[:, g] = g[rng.integers(0, len(g), size=(n, len(g)))]
    df = sum(len(g) - 1 for g in prompt_strata)
    if df < 1:
        return idx, math.nan
    shrink = max(len(g) / (len(g) - 1) for g in prompt_strata if len(g) > 1)
    return idx, math.sqrt(shrink) * _t_over_z(df)


def _t_over_z(df: int) -> float:
    """Student's t quantile over the normal one at LEVEL."""
    q = (1 + LEVEL) / 2
    return float(student_t.ppf(q, df) / norm.ppf(q))


def _metrics_of(cells: Dict[str, Dict[str, float]], keys: List[str], rows: np.ndarray) -> List[Dict[str, float]]:
    """Each resample's metrics (rows: resamples x cell indices), as common.metrics.aggregate computes them: the
    mean of the finite values, at least the metric's floor; NaN where no value is finite."""
    names = list(dict.fromkeys(n for k in keys for n in cells[k]))
    table = np.array([[_float(cells[k].get(n)) for n in names] for k in keys], dtype=float)  # cells x metrics
    picked = table[rows]  # resamples x cells x metrics
    finite = np.isfinite(picked)
    count = finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(finite, picked, 0.0).sum(axis=1) / count
    for j, n in enumerate(names):
        floor = floor_of(n)
        if floor is not None:
            means[:, j] = np.where(count[:, j] > 0, np.maximum(means[:, j], floor), np.nan)
    return [dict(zip(names, row)) for row in means.tolist()]


def _float(v) -> float:
    return math.nan if v is None else float(v)


def _interval(point: float, draws: np.ndarray, scale: float) -> Interval:
    draws = draws[np.isfinite(draws)]
    if not math.isfinite(point) or len(draws) < 20 or not math.isfinite(scale):
        return Interval(point, math.nan, math.nan)
    lo, hi = np.quantile(point + scale * (draws - point), [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Interval(point, float(lo), float(hi))


def intervals(c: Candidate, baseline: Dict[str, float], cfg: SelectionConfig, seed: int = 0,
              resamples: int = RESAMPLES) -> Dict[str, Interval]:
    """95% intervals of a checkpoint's per-cell metrics and of the rule's objective (empty without cells)."""
    if not c.cells:
        return {}
    keys = sorted(c.cells)
    rows, scale = _resample(keys, np.random.default_rng(seed), resamples)
    draws = _metrics_of(c.cells, keys, rows)
    names = [n for n in c.metrics if any(n in cell for cell in c.cells.values())]
    out = {n: _interval(c.metrics[n], np.array([d.get(n, math.nan) for d in draws], dtype=float), scale)
           for n in names}
    name = objective_name(cfg)
    scores = np.array([checkpoint_score(Candidate(c.trial, c.step, {**c.metrics, **d}), baseline, cfg)
                       for d in draws])
    out[name] = _interval(checkpoint_score(c, baseline, cfg), scores, scale)
    return out


def compare(champion: Candidate, runner_up: Candidate, baseline: Dict[str, float], cfg: SelectionConfig,
            seed: int = 0, resamples: int = RESAMPLES) -> Optional[Comparison]:
    """The champion against the runner-up on the cells both have (None when they share fewer than 2)."""
    keys = sorted(set(champion.cells) & set(runner_up.cells))
    prompt_cells = [k for k in keys if not k.startswith(PRIOR)]
    if len(prompt_cells) < 2:
        return None
    rows, scale = _resample(keys, np.random.default_rng(seed), resamples)
    a = _scores(champion, keys, rows, baseline, cfg)
    b = _scores(runner_up, keys, rows, baseline, cfg)
    point_a = checkpoint_score(champion.on(keys), baseline, cfg)
    point_b = checkpoint_score(runner_up.on(keys), baseline, cfg)
    both = np.isfinite(a) & np.isfinite(b)
    margin = _interval(point_a - point_b, (a - b)[both], scale)
    # judged on the margins widened as the interval is: "beats it in 100% of resamples" never comes with an
    # interval that includes 0
    spread = (point_a - point_b) + scale * ((a - b) - (point_a - point_b)) if math.isfinite(scale) else a - b
    better = np.where(np.isfinite(a) & ~np.isfinite(b), 1.0, np.where(both, (spread > 0).astype(float), np.nan))
    p = float(np.nanmean(better)) if np.isfinite(better).any() else math.nan
    prompts = len({k.split("_")[0] for k in prompt_cells})
    per_prompt = len(prompt_cells) / prompts
    decisive = math.isfinite(margin.low) and margin.low > 0
    more, verdict = _verdict(decisive, margin, p, per_prompt, champion.key, runner_up.key, objective_name(cfg))
    return Comparison(champion.key, runner_up.key, len(prompt_cells), per_prompt, p, margin, decisive, verdict, more)


def _scores(c: Candidate, keys: List[str], rows: np.ndarray, baseline, cfg) -> np.ndarray:
    return np.array([checkpoint_score(Candidate(c.trial, c.step, {**c.metrics, **d}), baseline, cfg)
                     for d in _metrics_of(c.cells, keys, rows)])


MAX_SEEDS = 16  # more seeds per prompt than this to separate them: call it a tie


def _verdict(decisive: bool, margin: Interval, p: float, per_prompt: float, champ: str, runner: str,
             objective: str) -> tuple[Optional[int], str]:
    chance = f"{p:.0%}" if math.isfinite(p) else "unknown"
    if decisive:
        return None, (f"decisive: {champ} beats {runner} in {chance} of resamples; the margin in {objective} is "
                      f"{margin.text()} (95%)")
    half = (margin.high - margin.low) / 2 if math.isfinite(margin.low) else math.nan
    more = None
    if math.isfinite(half) and margin.value > 0:
        need = per_prompt * (half / margin.value) ** 2  # the interval narrows as 1/sqrt(cells)
        more = max(1, math.ceil(need - per_prompt))
    settle = (f"{more} more seed(s) per prompt (eval.seeds) would likely settle it" if more and more <= MAX_SEEDS
              else "more seeds would hardly separate them: treat them as equals and choose by eye "
                   "(python -m sweep.review)")
    return more, (f"too close to call: {champ} beats {runner} in {chance} of resamples; the margin in {objective} "
                  f"is {margin.text()} (95%), which includes 0; {settle}")


def assess(candidates: List[Candidate], champion: Optional[Candidate], runner_up: Optional[Candidate],
           baseline: Dict[str, float], cfg: SelectionConfig) -> Assessment:
    """Intervals for these candidates (e.g. each trial's best and the champion) and the champion's comparison."""
    out = Assessment(objective_name(cfg))
    for c in candidates:
        out.intervals[c.key] = intervals(c, baseline, cfg)
    if champion and runner_up:
        out.comparison = compare(champion, runner_up, baseline, cfg)
    return out

