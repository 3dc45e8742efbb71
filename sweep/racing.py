"""Racing evaluation: images go to the checkpoints that can still win.

Every checkpoint is first scored on one round: one seed per prompt (and the prior-drift prompt's image at that
seed). Rounds are the eval seeds in order, so a round's cells are the same for every checkpoint and comparisons
are paired. After each round, among the checkpoints still in the race (the alive ones):

- the leader is the best eligible one under the selection rule, on the cells it has;
- a checkpoint is dropped when, on the cells it shares with the leader, a one-sided paired t-test says it is
  worse in the rule's per-image objective (face similarity, or the weighted sum of the weighted metrics), or when
  a one-sided t-test says its CLIP-T or face detection rate is below what the rule requires (it cannot be
  eligible).

This is successive elimination in the manner of F-race (Birattari et al. 2002) with paired t-tests instead of
Friedman's ("t-race"), and of Hoeffding races (Maron & Moore 1994) with a t bound instead of Hoeffding's, whose
range-based bound needs far more images than a sweep has. Error rate: a checkpoint meets at most one test of each
kind per round, so each test runs at level alpha / (2 x rounds) and, by the union bound, the best checkpoint is
dropped with probability at most alpha (eval.race_alpha, default 0.05), as far as the t-test's normal
approximation holds for a few images (tests/test_racing.py measures the whole procedure on simulated sweeps).

Dropped checkpoints keep their partial scores and grids and are marked. Survivors get the next round; the race
ends when one is left or all rounds are done; the champion and the runner-up, as the rule ranks everything scored,
always get every round (the full protocol), so the champion's numbers are those the full protocol gives."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from scipy.stats import t as student_t

from common.metrics import CLIP_T, FACE_DETECTION_RATE, PRIOR_FACE_SIMILARITY

from .selection import Candidate, SelectionConfig, checkpoint_score, select, weighted_score

ALPHA = 0.05
# the share of the full protocol's checkpoint images a race usually makes: 173 of 360 (48%) on the study's grid
# (docs/speed.md, bench/racing.py); what eval.compile=auto expects a raced sweep to generate (sweep/job.py)
IMAGE_SHARE = 0.5


@dataclass
class Drop:
    key: str
    rounds: int  # rounds (seeds) it had been scored on when it was dropped
    why: str


def uses_prior(cfg: SelectionConfig) -> bool:
    """Whether the rule decides on the prior-drift images (else racing rounds skip them; the champion and the
    runner-up get them with the full protocol)."""
    names = [cfg.objective] if cfg.rule != "weighted" else [n for n, w in cfg.weights.items() if w]
    return PRIOR_FACE_SIMILARITY in names


def rounds_of(c: Candidate, seeds: List[int]) -> int:
    """How many leading rounds (seeds, in order) the checkpoint's cells cover completely."""
    n = 0
    for s in seeds:
        if not any(k.endswith(f"_s{s}") and not k.startswith("prior_") for k in c.cells):
            break
        n += 1
    return n


def cell_objective(c: Candidate, cfg: SelectionConfig) -> Dict[str, float]:
    """The rule's objective per prompt cell: the identity metric, or the weighted sum of the weighted metrics
    (NaN where a weighted metric is NaN, e.g. no face in that image)."""
    out = {}
    for key, cell in c.cells.items():
        if key.startswith("prior_"):
            continue
        if cfg.rule == "weighted":
            out[key] = weighted_score(cell, cfg)[0]
        else:
            out[key] = cell.get(cfg.objective, math.nan)
    return out


def _mean_sd(values: List[float]) -> tuple[float, float, int]:
    v = [x for x in values if math.isfinite(x)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    mean = math.fsum(v) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else math.nan
    return mean, sd, n


def _confidently_positive(values: List[float], level: float) -> bool:
    """A one-sided t-test at `level` says the mean of these values is above 0."""
    mean, sd, n = _mean_sd(values)
    if n < 2 or not mean > 0:
        return False
    if sd == 0:
        return True
    return mean / (sd / math.sqrt(n)) > student_t.isf(level, n - 1)


def _ineligible(c: Candidate, baseline: Dict[str, float], cfg: SelectionConfig, level: float) -> Optional[str]:
    """Why the checkpoint confidently cannot meet the rule's requirements, or None."""
    cells = [cell for k, cell in c.cells.items() if not k.startswith("prior_")]
    rates = [cell[FACE_DETECTION_RATE] for cell in cells if FACE_DETECTION_RATE in cell]
    if rates and _confidently_positive([cfg.min_detection_rate - r for r in rates], level):
        return f"face detection rate below {cfg.min_detection_rate} (t-test, level {level:.3g})"
    base = baseline.get(CLIP_T)
    if cfg.rule == "identity_within_prompt_budget" and base is not None and math.isfinite(base):
        floor = base - cfg.clip_t_tolerance
        clips = [cell[CLIP_T] for cell in cells if CLIP_T in cell]
        if clips and _confidently_positive([floor - v for v in clips], level):
            return f"clip_t below the baseline's budget {floor:.2f} (t-test, level {level:.3g})"
    return None


def eliminate(alive: List[Candidate], baseline: Dict[str, float], cfg: SelectionConfig, rounds: int,
              alpha: float = ALPHA) -> List[Drop]:
    """Which alive checkpoints to drop after a round (see the module's docstring); `rounds` is the race's number
    of rounds (the eval seeds), which sets each test's level."""
    level = alpha / (2 * max(rounds, 1))
    drops = []
    for c in alive:
        why = _ineligible(c, baseline, cfg, level)
        if why:
            drops.append(Drop(c.key, 0, why))
    gone = {d.key for d in drops}
    scored = [(checkpoint_score(c, baseline, cfg), c) for c in alive if c.key not in gone]
    eligible = [(s, c) for s, c in scored if math.isfinite(s)]
    if not eligible:
        return drops
    _, leader = max(eligible, key=lambda sc: sc[0])
    lead = cell_objective(leader, cfg)
    pairs = {}
    for _, c in scored:
        if c is not leader:
            mine = cell_objective(c, cfg)
            d = [lead[k] - mine[k] for k in sorted(set(lead) & set(mine))]
            pairs[c.key] = [x for x in d if math.isfinite(x)]
    # the spread of a paired difference is much the same for every pair (the same images' noise): pooled over the
    # pairs, as a block design's residual variance is, it is known far better than from one pair's few images
    stats = [_mean_sd(d) for d in pairs.values()]
    df = sum(n - 1 for _, sd, n in stats if n > 1 and math.isfinite(sd))
    pooled = math.sqrt(sum((n - 1) * sd ** 2 for _, sd, n in stats if n > 1 and math.isfinite(sd)) / df) if df else 0
    for key, d in pairs.items():
        mean, sd, n = _mean_sd(d)
        if n < 2 or not mean > 0:
            continue
        if pooled == 0 or mean / (pooled / math.sqrt(n)) > student_t.isf(level, df):
            drops.append(Drop(key, 0, f"worse than {leader.key} on {n} shared images (paired t-test, pooled "
                                      f"spread, level {level:.3g})"))
    return drops




@dataclass
class Race:
    """How a race went: who was dropped (in order) and how many (checkpoint, seed) rounds were scored."""

    dropped: List[Drop]
    scored: int  # (checkpoint, seed) pairs the race itself scored


def run(candidates: List[Candidate], seeds: List[int], baseline: Dict[str, float], cfg: SelectionConfig,
        score: Callable[[List[Candidate], int, bool], List[Candidate]], alpha: float = ALPHA,
        complete: Callable[[Candidate], set] | None = None) -> tuple[List[Candidate], Race]:
    """Race the checkpoints to the end: eliminate, score the alive ones that are behind on the next seed, repeat;
    then give the champion and the runner-up every seed of the full protocol.

    `score(checkpoints, seeds, final)` scores those checkpoints at those seeds and returns them with the new cells
    (the sweep's end: evaluation on the GPU; a test: a table); `final` is True for the full protocol's cells (the
    champion and runner-up: with the prior-drift image; every seed one lacks in one call, as few LoRA swaps and as
    full batches as can be), False for a racing round (one seed, only what the rule decides on). `complete(c)` is the set of seeds whose full-protocol cells c has (default: its prompt cells').
    Deterministic given the cells, so a race interrupted and run again continues where it stood. Returns every
    candidate (updated) and the race's record."""
    complete = complete or seeds_of
    by_key = {c.key: c for c in candidates}
    dropped: Dict[str, Drop] = {}
    scored, r = 0, 0
    while True:
        alive = [c for c in by_key.values() if c.key not in dropped and c.trial_status != "failed"]
        while alive and min(rounds_of(c, seeds) for c in alive) <= r < len(seeds):  # every one to round r + 1
            behind = min(rounds_of(c, seeds) for c in alive)
            todo = [c for c in alive if rounds_of(c, seeds) == behind]
            for c in score(todo, [seeds[behind]], False):
                by_key[c.key] = c
            scored += len(todo)
            alive = [by_key[c.key] for c in alive]
        r += 1
        # judged on the first r rounds only, as they stood then: a race run again replays the same decisions
        for d in eliminate([_as_of(c, seeds[:r]) for c in alive], baseline, cfg, len(seeds), alpha):
            dropped[d.key] = Drop(d.key, r, d.why)
        alive = [c for c in alive if c.key not in dropped]
        if len(alive) <= 1 or r >= len(seeds):
            break
    while True:  # the champion and the runner-up get the full protocol
        sel = select(list(by_key.values()), baseline, cfg)
        top = [c for c in (sel.champion, sel.runner_up) if c is not None]
        missing = {c.key: tuple(s for s in seeds if s not in complete(c)) for c in top}
        if not any(missing.values()):
            break
        wanted = next(m for m in missing.values() if m)
        todo = [c for c in top if missing[c.key] == wanted]
        for c in score(todo, list(wanted), True):
            by_key[c.key] = c
        scored += len(todo) * len(wanted)
    return list(by_key.values()), Race(list(dropped.values()), scored)


def _as_of(c: Candidate, seeds: List[int]) -> Candidate:
    """The checkpoint as it stood after these rounds: its cells of these seeds (Candidate.on)."""
    keys = [k for k in c.cells if int(k.rsplit("_s", 1)[1]) in seeds]
    return c if len(keys) == len(c.cells) else c.on(keys)


def seeds_of(c: Candidate) -> set[int]:
    return {int(k.rsplit("_s", 1)[1]) for k in c.cells if not k.startswith("prior_")}
