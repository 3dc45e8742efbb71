"""What a trial leaves besides its checkpoints: its loss log, step times, memory peak, and its result.

One TrialRecord per trial and one StepClock per pass of the base (a lone trial's or a whole pack's), used alike by
the lone and the packed recipe; `TrialRecord` is the one place a TrialResult is made."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint


@dataclass
class TrialResult:
    name: str
    output_dir: Path
    status: str  # "finished" | "diverged" | "pruned" (stopped by on_checkpoint) | "failed" (error: why)
    steps: int
    final_loss: float | None
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: int | None = None
    error: str | None = None
    seconds: float = 0.0
    ms_per_step: float | None = None  # median wall time of an optimizer step, first steps excluded
    peak_memory_gib: float | None = None  # CUDA allocator peak during the trial (of the whole pack when packed)
    pack_size: int = 1  # trainings that shared a pass of the base with this one's (0: alone through peft)
    setup_seconds: float = 0.0  # first step's extra cost: CUDA graph capture and, with train.compile, compiling
    train_seconds: float = 0.0  # wall time of its optimizer steps (the pack's, when packed): the sweep's training phase
    training: str | None = None  # where one training served several trials (trainer/planner.py): the trial it
    # trained (this one's own name for that one); None: it trained for itself alone

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["output_dir"] = str(self.output_dir)
        d["checkpoints"] = [str(c) for c in self.checkpoints]
        return d


class StepClock:
    """Wall time of each optimizer step, and the CUDA allocator's peak from construction on.

    `first_step_setup`: the first step also captures a CUDA graph or compiles (packs); its time beyond an
    ordinary step's is reported as setup."""

    def __init__(self, device: torch.device, first_step_setup: bool):
        self.on_cuda, self.first_step_setup = device.type == "cuda", first_step_setup
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats()
        self.started = time.perf_counter()
        self.times: list[float] = []
        self._tic = self.started

    def start_step(self) -> None:
        self._tic = time.perf_counter()

    def end_step(self) -> None:
        self.times.append(time.perf_counter() - self._tic)

    def ms_per_step(self) -> float | None:
        """Median step time; the first two steps (warm-up, capture, compiling) count only if there are no others."""
        return 1000 * statistics.median(self.times[2:] or self.times) if self.times else None

    def setup_seconds(self) -> float:
        if not (self.first_step_setup and self.times):
            return 0.0
        return max(0.0, self.times[0] - self.ms_per_step() / 1000)

    def peak_memory_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.on_cuda else None


class TrialRecord:
    """One trial's bookkeeping: `train_log.jsonl` in its folder, its losses by step, the losses since the last
    checkpoint (a checkpoint records their mean), and its TrialResult.

    `pack_size`: trainings that share its pass of the base (0: alone through peft); `training`: the trial whose
    training serves this one (trainer/planner.py), where it serves several."""

    def __init__(self, name: str, output_dir: Path, pack_size: int, training: str | None = None):
        self.name, self.output_dir, self.pack_size, self.training = name, Path(output_dir), pack_size, training
        self.log_path = self.output_dir / "train_log.jsonl"
        self.start = 0
        self.losses: dict[int, float] = {}
        self._window: list[float] = []

    def begin(self, start: int) -> None:
        """Training goes on after step `start` (0: a fresh start): the folder exists, the log ends at `start`."""
        self.start = start
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(self.log_path, start)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        self.losses[step] = loss
        self._window.append(loss)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")

    def checkpoint_loss(self) -> float:
        """The mean loss since the last checkpoint, for the one being written now; the next one starts afresh."""
        window, self._window = self._window, []
        return sum(window) / max(len(window), 1)

    def checkpoints(self) -> list[Path]:
        return checkpoint.list_checkpoints(self.output_dir)

    def trained(self, status: str, stopped_at: int | None, max_steps: int, clock: StepClock,
                error: str | None = None) -> TrialResult:
        """The result of a trial that trained: `status` "finished", "pruned" or "failed" (its hook's error), ending
        at `stopped_at`, or at `max_steps` if it trained any step."""
        last = stopped_at or (max_steps if self.losses else self.start)
        timing = {"seconds": time.perf_counter() - clock.started, "ms_per_step": clock.ms_per_step(),
                  "peak_memory_gib": clock.peak_memory_gib(), "setup_seconds": clock.setup_seconds(),
                  "train_seconds": sum(clock.times)}
        return self._result(status, last, self.losses.get(last), error, self.pack_size, self.start or None, timing)

    def untimed(self, status: str, steps: int, final_loss: float | None, error: str,
                pack_size: int | None = None) -> TrialResult:
        """The result of a trial that diverged, or failed on an error of its own: no timing, no resume step."""
        return self._result(status, steps, final_loss, error, self.pack_size if pack_size is None else pack_size)

    def _result(self, status: str, steps: int, final_loss: float | None, error: str | None, pack_size: int,
                resumed_from: int | None = None, timing: dict | None = None) -> TrialResult:
        return TrialResult(self.name, self.output_dir, status, steps, final_loss, self.checkpoints(), resumed_from,
                           error, pack_size=pack_size, training=self.training, **(timing or {}))


def _truncate_log(path: Path, step: int) -> None:
    """Keep the loss log consistent with the checkpoint we resume from (drop steps after it)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))
