"""Racing evaluation on simulated sweeps shaped like the original study: 3 learning rates x 5 checkpoints
(steps 100-500), 5 prompts x 4 seeds plus the prior-drift prompt per checkpoint, the default rule (face
similarity among checkpoints within 2 CLIP-T points of the baseline, face detection >= 0.5).

What a cell scores is drawn as real scores behave: a checkpoint's true mean; a prompt effect shared by every
checkpoint (some prompts are harder); a prompt x checkpoint effect; a seed effect shared by the checkpoints (the
same seed gives a similar composition); per-image heavy-tailed noise (Student t, 5 degrees of freedom); an image
without a face about one time in ten (more for checkpoints that barely learned). Per-image spreads: face
similarity 0.06, CLIP-T 2 points. The full protocol is every cell; racing reveals the same cells round by round,
so both see identical numbers for what both scored."""
import math

import numpy as np
import pytest

from common.metrics import aggregate
from sweep import racing
from sweep.selection import Candidate, SelectionConfig, select

PROMPTS, SEEDS = 5, [0, 1, 2, 3]
RULE = SelectionConfig()
STEPS = [100, 200, 300, 400, 500]
# true face similarity and CLIP-T of each checkpoint: 1e-5 barely learns; 1e-4 learns and peaks late; 5e-4 learns
# fast, then overfits (its prompts suffer: CLIP-T falls out of the budget)
CLEAR = {
    "lr=1e-5": ([0.10, 0.14, 0.18, 0.22, 0.25], [30.5, 30.4, 30.3, 30.2, 30.1]),
    "lr=1e-4": ([0.30, 0.45, 0.54, 0.62, 0.63], [30.2, 29.8, 29.4, 29.1, 28.9]),
    "lr=5e-4": ([0.52, 0.57, 0.56, 0.58, 0.60], [29.0, 28.3, 27.4, 26.5, 25.8]),
}  # the winner, lr=1e-4@500 (0.63), is 0.01 above lr=1e-4@400 but 0.05 above every other checkpoint
TIE = {
    "lr=1e-5": CLEAR["lr=1e-5"],
    "lr=1e-4": ([0.30, 0.45, 0.54, 0.600, 0.605], [30.2, 29.8, 29.4, 29.1, 28.9]),
    "lr=5e-4": ([0.52, 0.57, 0.600, 0.58, 0.56], [29.5, 29.0, 28.6, 26.5, 25.8]),
}  # three checkpoints within 0.005 of each other


def simulate(truth: dict, rng) -> tuple[list[Candidate], dict]:
    """Every checkpoint's full table of cells, and the baseline's metrics (scored on the same prompts: their
    effects are in its CLIP-T too)."""
    prompt_face, prompt_clip = rng.normal(0, 0.05, PROMPTS), rng.normal(0, 3.0, PROMPTS)
    seed_face = rng.normal(0, 0.03, (PROMPTS, len(SEEDS)))
    out = []
    for trial, (faces, clips) in truth.items():
        for step, f, c in zip(STEPS, faces, clips):
            inter = rng.normal(0, 0.02, PROMPTS)
            no_face = 0.1 + 0.2 * max(0.0, 0.3 - f)
            cells = {}
            for p in range(PROMPTS):
                for j, s in enumerate(SEEDS):
                    t = rng.standard_t(5, 2) / math.sqrt(5 / 3)
                    face = f + prompt_face[p] + inter[p] + seed_face[p, j] + 0.05 * t[0]
                    face = math.nan if rng.random() < no_face else face
                    cells[f"p{p}_s{s}"] = {"clip_t": c + prompt_clip[p] + 2.0 * t[1], "face_similarity": face,
                                           "face_detection_rate": 0.0 if math.isnan(face) else 1.0}
                prior = rng.normal(0.1, 0.05)
                cells.update({f"prior_s{s}": {"prior_face_similarity": prior} for s in SEEDS})
            out.append(Candidate(trial, step, aggregate(cells.values()), cells=cells))
    return out, {"clip_t": 30.0 + float(np.mean(prompt_clip)) + rng.normal(0, 2.0 / math.sqrt(20))}


def partial(c: Candidate, seeds: list[int], prior: set[int] = frozenset()) -> Candidate:
    """The checkpoint scored on these seeds' prompt cells, and on the prior-drift image of `prior` seeds."""
    cells = {k: v for k, v in c.cells.items()
             if int(k.rsplit("_s", 1)[1]) in (prior if k.startswith("prior_") else seeds)}
    return Candidate(c.trial, c.step, aggregate(cells.values()), cells=cells)


def complete(c: Candidate) -> set[int]:
    """Seeds with every prompt's image and the prior-drift one (the full protocol's cells)."""
    return {s for s in SEEDS if f"prior_s{s}" in c.cells and all(f"p{p}_s{s}" in c.cells for p in range(PROMPTS))}


def scorer(truth: dict, images: list):
    """Racing's `score` over the simulated table: a racing round makes the prompts' images, the full protocol
    also the prior-drift image; `images` counts what was made."""
    def score(todo, seeds, final):
        out = []
        for c in todo:
            have = racing.seeds_of(c)
            prior = {int(k.rsplit("_s", 1)[1]) for k in c.cells if k.startswith("prior_")}
            images.append(sum((0 if s in have else PROMPTS) + (final and s not in prior) for s in seeds))
            out.append(partial(truth[c.key], sorted(have | set(seeds)), prior | (set(seeds) if final else set())))
        return out
    return score


def race_one(full: list[Candidate], baseline: dict, alpha: float = racing.ALPHA):
    """(racing's champion, the full protocol's, images racing generated, images the full protocol generated)."""
    truth = {c.key: c for c in full}
    images = [PROMPTS] * len(full)  # round 1, scored live as checkpoints arrive: the prompts' images only
    start = [partial(c, SEEDS[:1]) for c in full]
    done, race = racing.run(start, SEEDS, baseline, RULE, scorer(truth, images), alpha, complete)
    key = lambda c: c.key if c else None  # noqa: E731
    return key(select(done, baseline, RULE).champion), key(select(full, baseline, RULE).champion), sum(images), \
        len(full) * len(SEEDS) * (PROMPTS + 1), race


@pytest.mark.parametrize("truth, name", [(CLEAR, "one clear winner"), (TIE, "a near tie")])
def test_racing_picks_the_full_protocols_champion_with_at_most_half_the_images(truth, name):
    rng = np.random.default_rng(0 if truth is CLEAR else 1)
    same, images, full_images = 0, 0, 0
    sweeps = 1000
    for _ in range(sweeps):
        raced, full, n, total, _ = race_one(*simulate(truth, rng))
        same += raced == full
        images += n
        full_images += total
    agreement, share = same / sweeps, images / full_images
    print(f"{name}: racing agrees with the full protocol in {agreement:.1%} of {sweeps} sweeps, "
          f"generating {share:.1%} of its checkpoint images")
    assert agreement >= 0.95, agreement
    assert share <= 0.5, share


def test_the_champion_and_runner_up_get_every_seed_and_drops_are_recorded():
    full, baseline = simulate(CLEAR, np.random.default_rng(7))
    truth = {c.key: c for c in full}
    done, race = racing.run([partial(c, SEEDS[:1]) for c in full], SEEDS, baseline, RULE, scorer(truth, []),
                            complete=complete)
    sel = select(done, baseline, RULE)
    for c in (sel.champion, sel.runner_up):
        assert racing.rounds_of(c, SEEDS) == len(SEEDS)
        assert c.metrics == pytest.approx(truth[c.key].metrics, nan_ok=True)  # the full protocol's numbers
    assert race.dropped and all(d.rounds >= 1 and d.why for d in race.dropped)
    assert any("worse than" in d.why for d in race.dropped)
    assert {d.key for d in race.dropped}.isdisjoint({sel.champion.key})
    assert any("lr=1e-5" in d.key for d in race.dropped if d.rounds == 1)  # hopeless ones go after one round


@pytest.mark.parametrize("name", ["clear", "tie"])
def test_a_race_run_again_on_its_own_cells_scores_nothing_more(name):
    """Run again after it ended (a rebuilt report, a promotion): each round is judged on the cells it had then, so
    the same decisions come out and no image is made twice (judged on every cell at once, the leader and the
    spread moved and later-dropped checkpoints came back for more seeds)."""
    for seed in range(25):
        full, baseline = simulate(CLEAR if name == "clear" else TIE, np.random.default_rng(seed))
        score = scorer({c.key: c for c in full}, [])
        done, first = racing.run([partial(c, SEEDS[:1]) for c in full], SEEDS, baseline, RULE, score,
                                 complete=complete)
        again, second = racing.run(done, SEEDS, baseline, RULE, score, complete=complete)
        assert second.scored == 0, seed
        assert [(d.key, d.rounds) for d in second.dropped] == [(d.key, d.rounds) for d in first.dropped], seed


def test_the_paired_t_test_levels_split_alpha_over_rounds_and_kinds():
    a = Candidate("a", 1, {}, cells={f"p{p}_s0": {"face_similarity": 0.6, "face_detection_rate": 1.0}
                                     for p in range(5)})
    b = Candidate("b", 1, {}, cells={f"p{p}_s0": {"face_similarity": 0.6 - 0.01 * (p % 2 + 1),
                                                  "face_detection_rate": 1.0} for p in range(5)})
    for c in (a, b):
        c.metrics = aggregate(c.cells.values())
    # differences 0.01/0.02: t = 6.3 with 4 degrees of freedom; one-sided level alpha/(2 x rounds)
    assert [d.key for d in racing.eliminate([a, b], {}, RULE, rounds=4, alpha=0.05)] == ["b@1"]
    assert racing.eliminate([a, b], {}, RULE, rounds=4, alpha=1e-4) == []
