"""Selection on metric tables shaped like the original study's outcome."""
import math

import pytest

from sweep.selection import Candidate, SelectionConfig, pareto_front, select

BASELINE = {"clip_t": 31.0, "face_similarity": 0.80, "face_detection_rate": 1.0}


def study_table():
    """lr=1e-5 underfits (face barely moves), 5e-4 overfits (face high, prompt fidelity collapses), 1e-4 balances."""
    rows = []
    for trial, faces, clips in [
        ("lr=1e-05", [0.81, 0.82, 0.83, 0.84, 0.85], [31.0, 30.9, 30.8, 30.8, 30.7]),
        ("lr=0.0001", [0.86, 0.89, 0.91, 0.92, 0.92], [30.5, 30.0, 29.6, 29.4, 28.5]),
        ("lr=0.0005", [0.93, 0.95, 0.96, 0.97, 0.97], [27.0, 25.0, 24.0, 23.0, 22.0]),
    ]:
        for i, (f, c) in enumerate(zip(faces, clips)):
            rows.append(Candidate(trial, 100 * (i + 1), {"face_similarity": f, "clip_t": c, "face_detection_rate": 1.0}))
    return rows


def test_the_balanced_learning_rate_wins():
    s = select(study_table(), BASELINE, SelectionConfig())
    assert s.champion.key == "lr=0.0001@400"  # 0.92 at CLIP-T 29.4; step 500 has 0.92 but CLIP-T 28.5 < 29
    assert s.runner_up.key == "lr=0.0001@300" and s.margin == pytest.approx(0.01)
    assert not any(c.trial == "lr=0.0005" for c, _ in s.ranked)
    assert "more than 2.0 below the baseline" in s.rejected["lr=0.0005@500"]
    assert "lr=0.0001@500" in s.rejected and "champion lr=0.0001@400" in s.explain()


def test_nan_and_failed_never_win():
    rows = study_table() + [
        Candidate("lr=nan", 100, {"face_similarity": math.nan, "clip_t": 31.0, "face_detection_rate": 1.0}),
        Candidate("lr=noface", 100, {"face_similarity": 0.99, "clip_t": 31.0, "face_detection_rate": 0.2}),
        Candidate("lr=crashed", 100, {"face_similarity": 0.99, "clip_t": 31.0, "face_detection_rate": 1.0},
                  trial_status="failed"),
    ]
    s = select(rows, BASELINE, SelectionConfig())
    assert s.champion.key == "lr=0.0001@400"
    assert s.rejected["lr=nan@100"].startswith("face_similarity is NaN")
    assert s.rejected["lr=noface@100"].startswith("face detection rate 0.2")
    assert s.rejected["lr=crashed@100"] == "trial failed"
    weighted = select(rows, BASELINE, SelectionConfig(rule="weighted"))
    assert weighted.champion.trial not in ("lr=nan", "lr=noface", "lr=crashed")


def test_ties_are_broken_deterministically():
    a = Candidate("b", 200, {"face_similarity": 0.9, "clip_t": 30.0})
    b = Candidate("a", 200, {"face_similarity": 0.9, "clip_t": 30.0})
    c = Candidate("a", 100, {"face_similarity": 0.9, "clip_t": 30.0})
    for order in ([a, b, c], [c, b, a], [b, a, c]):
        assert select(order, BASELINE, SelectionConfig()).champion.key == "a@100"


def test_no_eligible_checkpoint_names_the_reasons():
    s = select([Candidate("x", 100, {"face_similarity": 0.99, "clip_t": 10.0, "face_detection_rate": 1.0})],
               BASELINE, SelectionConfig())
    assert s.champion is None and "no checkpoint qualifies" in s.explain() and "x@100" in s.explain()


def test_pareto_front_and_weighted_rule():
    rows = study_table()
    front = pareto_front(rows)
    keys = {c.key for c in front}
    assert {"lr=0.0005@400", "lr=1e-05@100", "lr=0.0001@400"} <= keys
    assert not keys & {"lr=0.0001@500", "lr=1e-05@300", "lr=0.0005@500"}  # each dominated by a neighbour
    s = select(rows, BASELINE, SelectionConfig(rule="weighted", weights={"face_similarity": 1.0, "clip_t": 0.0}))
    assert s.champion.trial == "lr=0.0005"  # identity alone: the overfit trial, which is why it is not the default


def test_unknown_rule():
    with pytest.raises(ValueError, match="selection.rule='best' is not one of"):
        select([], BASELINE, SelectionConfig(rule="best"))


# one pool-independent objective per rule (issue 18) -----------------------------------------------------------
from sweep.selection import WEIGHTED_SCORE, checkpoint_score, config_problems, describe_rule, objective_name  # noqa: E402

DEMO = SelectionConfig(rule="weighted", min_detection_rate=0.0,
                       weights={"face_similarity": 0.0, "clip_t": 1.0, "clip_i": 1.0})  # conf/experiment/demo.yaml


def clip(trial: str, step: int, clip_t: float, clip_i: float, **more) -> Candidate:
    return Candidate(trial, step, {"clip_t": clip_t, "clip_i": clip_i, "face_similarity": math.nan,
                                   "face_detection_rate": 0.0, **more})


def minmax_sum(pool: list[Candidate], c: Candidate) -> float:
    """The old weighted objective: each metric min-max normalised over the sweep's pool, summed."""
    total = 0.0
    for name in ("clip_t", "clip_i"):
        vals = [x.metrics[name] for x in pool]
        total += (c.metrics[name] - min(vals)) / (max(vals) - min(vals))
    return total


def test_weighted_score_is_fixed_units_and_the_ranking_uses_exactly_it():
    c = clip("a", 2, 31.0, 62.0)
    assert objective_name(DEMO) == WEIGHTED_SCORE and objective_name(SelectionConfig()) == "face_similarity"
    assert checkpoint_score(c, {}, DEMO) == pytest.approx(0.31 + 0.62)
    rows = [c, clip("b", 2, 25.0, 70.0), clip("c", 4, 33.0, 50.0)]
    s = select(rows, {}, DEMO)
    assert s.objective == WEIGHTED_SCORE and [x.trial for x, _ in s.ranked] == ["b", "a", "c"]
    assert all(v == checkpoint_score(x, {}, DEMO) for x, v in s.ranked)  # the report's number is the console's
    for cfg in (SelectionConfig(), DEMO):  # a trial's objective (console, result.json, MLflow, Optuna) = report's
        table = study_table() if cfg is not DEMO else rows
        sel = select(table, BASELINE, cfg)
        assert all(v == checkpoint_score(x, BASELINE, cfg) for x, v in sel.ranked)
        assert f"{sel.objective} {sel.ranked[0][1]:.4f}" in sel.explain()


def test_adding_a_candidate_never_changes_another_ones_score():
    rows = [clip("a", 2, 31.0, 62.0), clip("b", 2, 25.0, 70.0)]
    before = dict((x.key, v) for x, v in select(rows, {}, DEMO).ranked)
    for extra in (clip("x", 2, 90.0, 1.0), clip("y", 2, 0.0, 99.0), clip("z", 2, math.nan, 50.0)):
        after = dict((x.key, v) for x, v in select(rows + [extra], {}, DEMO).ranked)
        assert {k: after[k] for k in before} == before
    for cfg in (SelectionConfig(), SelectionConfig(rule="weighted")):
        table = study_table()
        alone = {c.key: checkpoint_score(c, BASELINE, cfg) for c in table}
        pooled = dict((x.key, v) for x, v in select(table, BASELINE, cfg).ranked)
        assert pooled == {k: v for k, v in alone.items() if not math.isnan(v)}


def test_a_checkpoint_worse_on_every_metric_never_wins_across_sweeps():
    """The case that used to fail: min-max normalisation within each sweep scores the second sweep's best (worse
    than the first's on both CLIP scores) above the first's; on fixed units it loses, in select and in the
    registry's decision, and is not registered."""
    from sweep.metrics import metrics_json
    from sweep.tracking.registry import judge

    first = [clip("lr=0.0001", 4, 30.0, 60.0), clip("lr=1e-05", 4, 31.0, 40.0), clip("lr=0.0005", 4, 20.0, 65.0)]
    second = [clip("trial_0", 4, 29.0, 59.0), clip("trial_1", 4, 10.0, 10.0)]
    a, b = select(first, {}, DEMO).champion, select(second, {}, DEMO).champion
    assert (a.trial, b.trial) == ("lr=0.0001", "trial_0")
    assert minmax_sum(second, b) > minmax_sum(first, a)  # what the old registry compared: b took the alias
    assert checkpoint_score(b, {}, DEMO) < checkpoint_score(a, {}, DEMO)
    assert select([a, b], {}, DEMO).champion is a and select([b, a], {}, DEMO).champion is a
    current = {"protocol": "P", "trial": a.trial, "step": str(a.step), "lora_sha256": "sha-a",
               "objective": str(checkpoint_score(a, {}, DEMO)), "metrics": metrics_json(a.metrics)}
    d = judge(current, "1", b, "sha-b", {}, DEMO, "P")
    assert not d.replace and "does not beat champion version 1" in d.reason and "not registered" in d.reason
    assert d.tags["challenger_objective"] < d.tags["champion_objective"] == pytest.approx(0.90)
    better = clip("trial_2", 2, 30.5, 61.0)
    assert judge(current, "1", better, "sha-c", {}, DEMO, "P").replace
    # a full tie keeps the champion; the champion's own LoRA is not registered again
    assert not judge(current, "1", clip("again", 4, 30.0, 60.0), "sha-d", {}, DEMO, "P").replace
    assert "champion's LoRA already" in judge(current, "1", better, "sha-a", {}, DEMO, "P").reason
    # another protocol (e.g. a champion scored before PROTOCOL_VERSION 2): the new best takes the alias, said so
    other = judge({**current, "protocol": "OLD"}, "1", b, "sha-b", {}, DEMO, "P")
    assert other.replace and other.tags["registry.protocol_changed"] is True and "another evaluation protocol" in other.reason
    assert judge(None, None, b, "sha-b", {}, DEMO, "P").replace


def test_nan_metrics_are_never_scored_and_survive_the_registry_tags():
    from sweep.metrics import metrics_from_json, metrics_json

    rows = [clip("ok", 2, 30.0, 60.0), clip("nan_i", 2, 99.0, math.nan), clip("no_i", 2, 99.0, 0.0)]
    del rows[2].metrics["clip_i"]
    rows.append(clip("no_rate", 2, 99.0, 99.0, face_detection_rate=math.nan))
    s = select(rows, {}, DEMO)
    assert [x.trial for x, _ in s.ranked] == ["ok"] and s.champion.trial == "ok"
    assert s.rejected["nan_i@2"] == "weighted_score is NaN: clip_i is nan"
    assert s.rejected["no_i@2"] == "weighted_score is NaN: clip_i is missing"
    assert s.rejected["no_rate@2"].startswith("face detection rate nan")
    assert math.isnan(checkpoint_score(rows[1], {}, DEMO))
    assert not math.isnan(checkpoint_score(rows[0], {}, DEMO))  # a NaN face_similarity weighted 0 does not count
    text = metrics_json(rows[1].metrics)
    assert "NaN" not in text and math.isnan(metrics_from_json(text)["clip_i"])


def test_the_rule_is_described_and_bad_configs_name_the_fix():
    text = describe_rule(DEMO)
    assert "`weighted_score` = 1 x clip_t/100 + 1 x clip_i/100" in text and "higher is better" in text
    assert "face detection rate >= 0" in text and "face_similarity" not in text.split(";")[0]
    assert describe_rule(SelectionConfig()).startswith("`face_similarity`, higher is better")
    assert "- 0.5 x pairwise_clip_i/100" in describe_rule(
        SelectionConfig(rule="weighted", weights={"clip_t": 1.0, "pairwise_clip_i": 0.5}))
    with pytest.raises(ValueError, match=r"selection.weights names 'clipt'.*use one of \['clip_i', 'clip_t'"):
        select([], BASELINE, SelectionConfig(rule="weighted", weights={"clipt": 1.0}))
    assert "all zero" in config_problems(SelectionConfig(rule="weighted", weights={"clip_t": 0.0}))[0]
    assert "selection.objective='face'" in config_problems(SelectionConfig(objective="face"))[0]
    assert config_problems(DEMO) == [] and config_problems(SelectionConfig()) == []
