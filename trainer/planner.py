"""Which trainings a list of trials needs: trials whose runs are the first steps of a longer trial's are served by
that trial's training instead of training again.

Under a learning-rate schedule that does not depend on the run's length (constant, constant with warmup: the
default), a 300-step trial is exactly the first 300 steps of the same trial run to 1000: same initial weights,
same noise, same learning rate at every step. `steps=300,500,1000` then needs one training, not three. The trials
that differ only in `train.max_steps` and `train.checkpoint_every` form one training to the longest count; each
shorter trial's checkpoints are written into its own folder at its own steps from that training's adapter, with
its own loss log, result and record (trainer/recipe.py). Under a decaying schedule (cosine, linear, ...) the
learning rate at step t depends on the length, so every trial trains, although trials of different lengths still
share a pack (a pass of the base per step)."""
from __future__ import annotations

from typing import Callable

from .config import DataConfig, ModelConfig, training_config_hash
from .trial import TrialSpec

LENGTH_FREE = ("constant", "constant_with_warmup")  # schedules whose step t does not depend on the run's length


def trainings(specs: list[TrialSpec], model: ModelConfig, data: DataConfig,
              resume_step: Callable[[TrialSpec], int]) -> list[list[TrialSpec]]:
    """The trials grouped into trainings, in the order their first trial comes: each group's first trial is the
    one that trains (the longest; the earliest listed of equal ones), the others follow it. Trials follow only
    where the schedule does not depend on the length, everything else that shapes training is equal (the
    checkpoint hash: model, data, LoRA, learning rate, seed, ...) and they start from the same step."""
    groups: dict[tuple, list[TrialSpec]] = {}
    out: list[list[TrialSpec]] = []
    for s in specs:
        if s.train.lr_scheduler not in LENGTH_FREE:
            out.append([s])
            continue
        key = (training_config_hash(model, data, s.lora, s.train), resume_step(s))
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(s)
    return [sorted(g, key=lambda s: -s.train.max_steps) for g in out]
