"""Intervals and the champion's paired comparison, on synthetic per-cell tables with known true means.

Cells are drawn as a sweep's images score: per prompt a true mean (the protocol's prompts are fixed), per image
heavy-tailed noise (Student t, 5 degrees of freedom), and about one image in ten without a face (its face
similarity NaN, its detection 0). Scales are those of real SDXL scores: face similarity spread ~0.06 per image,
CLIP-T ~2 points."""
import math

import numpy as np
import pytest

from common.metrics import aggregate
from sweep import confidence
from sweep.selection import Candidate, SelectionConfig, select

PROMPTS, SEEDS = 5, 4
FACE_SD, CLIP_SD, NO_FACE = 0.06, 2.0, 0.1
RULE = SelectionConfig()  # identity_within_prompt_budget: face similarity, CLIP-T within 2 of the baseline
BASELINE = {"clip_t": 30.0}


def draw(rng, face_means, clip_means, seeds=SEEDS, name="t", step=100) -> Candidate:
    cells = {}
    for p, (f, c) in enumerate(zip(face_means, clip_means)):
        for s in range(seeds):
            face = math.nan if rng.random() < NO_FACE else f + FACE_SD * rng.standard_t(5) / math.sqrt(5 / 3)
            cells[f"p{p}_s{s}"] = {"clip_t": c + CLIP_SD * rng.standard_t(5) / math.sqrt(5 / 3),
                                   "face_similarity": face, "face_detection_rate": 0.0 if math.isnan(face) else 1.0}
    return Candidate(name, step, aggregate(cells.values()), cells=cells)


def test_95_percent_intervals_cover_the_true_means_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    face_means = [0.45, 0.55, 0.60, 0.50, 0.40]  # prompts differ: fixed, as the protocol's prompts are
    clip_means = [31.0, 29.0, 33.0, 30.0, 32.0]
    hits = {"face_similarity": 0, "clip_t": 0}
    draws = 400
    for i in range(draws):
        c = draw(rng, face_means, clip_means)
        got = confidence.intervals(c, BASELINE, RULE, seed=i, resamples=1000)
        for name, truth in (("face_similarity", np.mean(face_means)), ("clip_t", np.mean(clip_means))):
            hits[name] += got[name].low <= truth <= got[name].high
    coverage = {k: v / draws for k, v in hits.items()}
    assert 0.92 <= coverage["face_similarity"] <= 0.975, coverage
    assert 0.92 <= coverage["clip_t"] <= 0.975, coverage


def test_a_clear_winner_is_decisive_and_a_tie_is_too_close_to_call_with_advice():
    rng = np.random.default_rng(1)
    clip = [31.0] * PROMPTS
    strong = draw(rng, [0.60] * PROMPTS, clip, name="lr=1e-4", step=300)
    weak = draw(rng, [0.45] * PROMPTS, clip, name="lr=1e-5", step=500)
    cmp = confidence.compare(strong, weak, BASELINE, RULE)
    assert cmp.decisive and cmp.p_better > 0.99 and cmp.margin.low > 0
    assert cmp.verdict.startswith("decisive: lr=1e-4@300 beats lr=1e-5@500 in 100% of resamples")
    a = draw(rng, [0.55] * PROMPTS, clip, name="a")
    b = draw(rng, [0.55] * PROMPTS, clip, name="b")
    first, second = (a, b) if a.metrics["face_similarity"] >= b.metrics["face_similarity"] else (b, a)
    tie = confidence.compare(first, second, BASELINE, RULE)
    assert not tie.decisive and tie.margin.low < 0 < tie.margin.high and 0.3 < tie.p_better < 1.0
    assert "too close to call" in tie.verdict and "includes 0" in tie.verdict


def test_the_chance_of_being_better_agrees_with_the_margins_interval():
    """The verdict's "beats it in N% of resamples" and the margin's interval come from the same widened spread:
    an interval that includes 0 never comes with ~100%, one above 0 never with less than ~97.5%."""
    rng = np.random.default_rng(5)
    clip = [31.0] * PROMPTS
    for i in range(40):
        a = draw(rng, [0.55 + 0.01 * (i % 5)] * PROMPTS, clip, seeds=1 + i % 3, name="a")
        b = draw(rng, [0.55] * PROMPTS, clip, seeds=1 + i % 3, name="b")
        cmp = confidence.compare(a, b, BASELINE, RULE, seed=i)
        if cmp is None or not math.isfinite(cmp.margin.low):
            continue
        if cmp.margin.low > 0:
            assert cmp.p_better >= 0.97, (i, cmp.verdict)
        if cmp.margin.low < 0 < cmp.margin.high:
            assert cmp.p_better <= 0.98, (i, cmp.verdict)


def test_the_advice_names_the_seeds_that_settle_a_real_but_small_difference():
    """0.03 apart (half the per-image spread): 4 seeds per prompt rarely separate them; the advised number of
    seeds does in most draws."""
    rng = np.random.default_rng(2)
    clip = [31.0] * PROMPTS
    settled, advised = 0, []
    for i in range(60):
        a, b = draw(rng, [0.58] * PROMPTS, clip, name="a"), draw(rng, [0.55] * PROMPTS, clip, name="b")
        if a.metrics["face_similarity"] < b.metrics["face_similarity"]:
            continue
        cmp = confidence.compare(a, b, BASELINE, RULE, seed=i, resamples=500)
        if cmp.decisive or not cmp.more_seeds or cmp.more_seeds > confidence.MAX_SEEDS:
            continue
        advised.append(cmp.more_seeds)
        more = SEEDS + cmp.more_seeds
        a2, b2 = draw(rng, [0.58] * PROMPTS, clip, more, "a"), draw(rng, [0.55] * PROMPTS, clip, more, "b")
        settled += confidence.compare(a2, b2, BASELINE, RULE, seed=i, resamples=500).decisive
    assert len(advised) >= 10
    assert settled / len(advised) >= 0.4, (settled, advised)  # the advice aims at an interval as wide as the margin


def test_equal_checkpoints_are_rarely_called_decisive():
    """The false-decisive rate: two checkpoints with the same true means, 300 sweeps."""
    rng = np.random.default_rng(3)
    clip = [31.0] * PROMPTS
    wrong = 0
    for i in range(300):
        a, b = draw(rng, [0.55] * PROMPTS, clip, name="a"), draw(rng, [0.55] * PROMPTS, clip, name="b")
        first, second = (a, b) if a.metrics["face_similarity"] >= b.metrics["face_similarity"] else (b, a)
        wrong += confidence.compare(first, second, BASELINE, RULE, seed=i, resamples=500).decisive
    assert wrong / 300 <= 0.08, wrong  # a 95% two-sided interval above 0 by chance: ~2.5%, a little more at n=20


def test_the_rule_judges_each_resample_eligibility_included():
    """A checkpoint whose CLIP-T sits at the edge of the prompt budget is ineligible in some resamples: the
    champion beats it there by rule, which the probability counts."""
    rng = np.random.default_rng(4)
    champ = draw(rng, [0.55] * PROMPTS, [31.0] * PROMPTS, name="champ")
    edge = draw(rng, [0.54] * PROMPTS, [28.1] * PROMPTS, name="edge")  # baseline 30, tolerance 2: edge at 28
    sel = select([champ, edge], BASELINE, RULE)
    assert sel.champion.key == "champ@100"
    got = confidence.intervals(edge, BASELINE, RULE, resamples=500)
    assert set(got) == {"clip_t", "face_similarity", "face_detection_rate"}
    cmp = confidence.compare(champ, edge, BASELINE, RULE, resamples=500)
    assert cmp.p_better > 0.5


def test_one_seed_per_prompt_resamples_across_prompts_and_without_cells_there_is_nothing_to_say():
    rng = np.random.default_rng(5)
    raced_out = draw(rng, [0.4, 0.5, 0.45, 0.42, 0.48], [30.0] * PROMPTS, seeds=1)
    got = confidence.intervals(raced_out, BASELINE, RULE, resamples=500)
    assert got["face_similarity"].low < raced_out.metrics["face_similarity"] < got["face_similarity"].high
    assert confidence._strata(sorted(raced_out.cells)) == [list(range(PROMPTS))]
    bare = Candidate("x", 1, {"face_similarity": 0.5})
    assert confidence.intervals(bare, BASELINE, RULE) == {}
    assert confidence.compare(bare, raced_out, BASELINE, RULE) is None


def test_resampled_metrics_are_the_scores_own_aggregation():
    rng = np.random.default_rng(6)
    c = draw(rng, [0.5] * PROMPTS, [0.3] * PROMPTS)  # CLIP-T near 0: the floor matters
    keys = sorted(c.cells)
    rows = np.random.default_rng(0).integers(0, len(keys), size=(50, len(keys)))
    fast = confidence._metrics_of(c.cells, keys, rows)
    for row, got in zip(rows, fast):
        want = aggregate(c.cells[keys[i]] for i in row)
        assert got == pytest.approx(want, nan_ok=True)
