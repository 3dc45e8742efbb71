"""Fault points: named places where the fault-injection tests (tests/test_faults.py) make a real process fail.

    SDXL_SWEEP_FAULTS="checkpoint_write:*:2=kill"           SIGKILL this process at the 2nd checkpoint write
    SDXL_SWEEP_FAULTS="train_step:lr=0.0005:1=oom"          the pack holding trial lr=0.0005 runs out of memory
    SDXL_SWEEP_FAULTS="evaluate:lr=1e-05:1=raise,mlflow_log:*:3=kill"

Each entry is `point:trial:hit=action`: at the hit-th time (`2+`: from the 2nd time on; counted in this process)
`point` is reached for a trial whose name contains `trial` (`*`: any), do `action`: `kill` (SIGKILL, as the OOM killer or a lost node
would), `raise` (an exception, as a bug would), `oom` (torch.OutOfMemoryError, as a too-large trial would) or
`pause` (write the point's name to the file $SDXL_SWEEP_PAUSED, then wait, at most PAUSE_S, until a stop is asked
for: a test sends its signal at a known place, common/stop.py) or `hold` (the same, but waits on after the stop is
asked for, as a step that takes long would: a second signal then stops at once).
Points: train_step (after a step's loss is known), checkpoint_write (the checkpoint's files written, not yet
renamed into place), evaluate (images generated, not yet scored), mlflow_log (between two MLflow requests); at a
sweep's end and a promotion, in order (sweep/finalize.py, sweep/promote.py, sweep/tracking/registry.py):
promote_recorded (the pick in promotion.json), finalize_exported (champion/ written), registry_intent (registry.json
says what is to be registered), registry_version (the model version exists, with its tags), registry_alias (the
alias is on it), finalize_registered (registry.json says done), finalize_reported (selection.json and report.md
written), finalize_done (the MLflow runs told).
Unset (always, outside tests), a point costs one dictionary lookup."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from . import stop

ENV = "SDXL_SWEEP_FAULTS"
PAUSED_ENV = "SDXL_SWEEP_PAUSED"
PAUSE_S = 120.0
_hits: Counter = Counter()
_lock = threading.Lock()


class InjectedFault(RuntimeError):
    pass


def _plan() -> list[tuple[str, str, int, bool, str]]:
    out = []
    for entry in filter(None, (e.strip() for e in os.environ.get(ENV, "").split(","))):
        where, _, action = entry.rpartition("=")
        point, trial, hit = where.split(":")
        out.append((point, trial, int(hit.rstrip("+")), hit.endswith("+"), action))
    return out


def hit(point: str, trials: str | list[str] = "*") -> None:
    """Reached `point` for `trials` (a name, or the names of a pack): fail here if the plan says so."""
    if ENV not in os.environ:
        return
    names = [trials] if isinstance(trials, str) else list(trials)
    for p, trial, n, onwards, action in _plan():
        if p != point or not (trial == "*" or any(trial in name for name in names)):
            continue
        with _lock:
            _hits[(p, trial)] += 1
            due = _hits[(p, trial)] >= n if onwards else _hits[(p, trial)] == n
        if not due:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action in ("pause", "hold"):
            _pause(point, until_stop=action == "pause")
            continue
        if action == "oom":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {point} for {trial})")
        raise InjectedFault(f"injected fault at {point} for {trial}")


def _pause(point: str, until_stop: bool) -> None:
    Path(os.environ.get(PAUSED_ENV, "paused")).write_text(point)
    until = time.monotonic() + PAUSE_S
    while not (until_stop and stop.requested()) and time.monotonic() < until:
        time.sleep(0.05)
