"""A job's handle on its Optuna trial (opened from the storage by number, in whatever process runs the job): it
reports every checkpoint's score, hears the pruner, and tells the study how the trial ended."""
from __future__ import annotations

import math
from typing import Any

from common.metrics import WEIGHTED_SCORE

from ..selection import Candidate, SelectionConfig, checkpoint_score, trial_best
from .study import SCORE, SearchSettings, make_pruner, open_storage


# the trial's side -----------------------------------------------------------------------------------------
def objective_value(name: str, c: Candidate, baseline: dict[str, float], sel: SelectionConfig) -> float:
    """`score` (or the weighted rule's own name for it, weighted_score): the rule's objective, the very number the
    sweep's selection ranks by; any other name: that raw metric."""
    if name == SCORE or (name == WEIGHTED_SCORE and sel.rule == "weighted"):
        return checkpoint_score(c, baseline, sel)
    v = c.metrics.get(name)
    return float(v) if isinstance(v, (int, float)) else math.nan


class TrialLink:
    """A job's handle on its Optuna trial, opened from the storage by number: works in any process."""

    def __init__(self, s: SearchSettings, url: str, study_name: str, number: int, selection: SelectionConfig):
        import optuna

        self.s, self.selection, self.number = s, selection, number
        storage = open_storage(url, s)
        self.study = optuna.load_study(study_name=study_name, storage=storage, pruner=make_pruner(s))
        sid = storage.get_study_id_from_name(study_name)
        self.storage, self.trial_id = storage, storage.get_trial_id_from_study_id_trial_number(sid, number)
        self.trial = optuna.trial.Trial(self.study, self.trial_id)

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        for k, v in attrs.items():
            self.trial.set_user_attr(k, v)

    def report(self, scored: list[Candidate], baseline: dict[str, float]) -> bool:
        """Report a checkpoint's score (scored at several LoRA strengths: the best of them); True when the pruner
        says stop. Multi-objective studies never prune."""
        if self.s.multi_objective:
            return False
        self.trial.report(self._value(scored, baseline), scored[0].step)  # NaN (nothing eligible) is pruned
        return self.trial.should_prune()

    def _value(self, scored: list[Candidate], baseline: dict[str, float]) -> float:
        values = [v for v in (objective_value(self.s.objectives[0], c, baseline, self.selection) for c in scored)
                  if math.isfinite(v)]
        return (max if self.s.directions[0] == "maximize" else min)(values) if values else math.nan

    def replay(self, candidates: list[Candidate], baseline: dict[str, float]) -> None:
        """Report a finished trial's checkpoint scores, in step order, to a trial the study has not heard from: the
        re-run of one that died after its work was done but before the study was told keeps the intermediate
        values that later trials are pruned against (and a pruned trial's stop step among them)."""
        from optuna.trial import TrialState

        if self.s.multi_objective or self._state() != TrialState.RUNNING:
            return
        for step in sorted({c.step for c in candidates}):
            self.trial.report(self._value([c for c in candidates if c.step == step], baseline), step)

    def finish(self, status: str, candidates: list[Candidate], baseline: dict[str, float]) -> list[float] | None:
        """Tell the study how the trial ended. Returns the values told (None when pruned or failed)."""
        from optuna.trial import TrialState

        if self._state() != TrialState.RUNNING:
            return None  # told already (a job run twice, e.g. a resumed sweep)
        if status == "pruned":
            self.study.tell(self.trial, state=TrialState.PRUNED)
            return None
        _, best = trial_best(candidates, baseline, self.selection, or_last=True)
        if status != "finished" or best is None:
            self.trial.set_user_attr("fail_reason", status if status != "finished" else "no checkpoint was scored")
            self.study.tell(self.trial, state=TrialState.FAIL)
            return None
        values = [objective_value(n, best, baseline, self.selection) for n in self.s.objectives]
        self.trial.set_user_attr("best_step", best.step)
        if not all(math.isfinite(v) for v in values):
            self.trial.set_user_attr("fail_reason", f"no eligible checkpoint (values {values})")
            self.study.tell(self.trial, state=TrialState.FAIL)
            return None
        self.study.tell(self.trial, values if self.s.multi_objective else values[0])
        return values

    def fail(self, reason: str) -> None:
        from optuna.trial import TrialState

        if self._state() == TrialState.RUNNING:
            self.trial.set_user_attr("fail_reason", reason[:500])
            self.study.tell(self.trial, state=TrialState.FAIL)

    def _state(self):
        return self.storage.get_trial(self.trial_id).state
