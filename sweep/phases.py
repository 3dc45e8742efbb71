"""Where a sweep's time went: training, generating, scoring, waiting, and the rest (overhead), from its own records.

The trainer times its optimizer steps (result.json `train_seconds`) and evaluation each entry's generation and
scoring (eval/metrics.json `seconds`, added up over every call: live scoring, the race's later rounds). The sweep's
end adds them up and sets them against the command's wall clock (from its process's start to the end of racing);
what no phase covers is overhead: start-up and imports, loading models, caching latents, writing checkpoints,
MLflow, selection. Scoring runs on a worker thread beside generating and training (eval.overlap), so the clock
counts only waiting: the time generation or training was held up by scoring (eval/metrics.json `waited_s`; all of
the scoring without the overlap). Training, generating, waiting and overhead make up the wall clock; scoring is
reported beside them. Trials that ran side by side (several GPUs or processes) add their seconds up, so the
phases may then exceed the wall clock and overhead is floored at 0. A resumed sweep's phases include the work of
the commands before it; its wall clock is this command's."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import timeline

from .results import EVAL_DIR, EVAL_FILE, RESULT, read_json, trial_dirs, write_json

PHASES_FILE = "phases.json"  # in the sweep's report/ folder
EVAL_KEYS = {"generate_s": "generating_s", "score_s": "scoring_s", "wait_s": "waiting_s"}
WAITED = "waited_s"  # metrics.json: the seconds callers waited for scoring, over all calls


def process_started() -> float:
    """When this process started (epoch seconds): the wall clock of a sweep includes its imports and start-up."""
    import psutil

    return psutil.Process().create_time()


def evaluation_seconds(trial_dir: Path) -> dict[str, float]:
    """A trial's evaluation seconds over every evaluate call of its folder: generating_s, scoring_s, waiting_s, and
    the images generated."""
    path = Path(trial_dir) / EVAL_DIR / EVAL_FILE
    rec = json.loads(path.read_text()) if path.is_file() else {}
    spent = rec.get("seconds", {}).values()
    out = {name: sum(e.get(key, 0.0) for e in spent) for key, name in EVAL_KEYS.items()}
    out["waiting_s"] += float(rec.get(WAITED, 0.0))  # the calls' own record of it (evaluation/evaluate.py)
    out["images"] = sum(e.get("images", 0) for e in spent)
    return out


def training_seconds(result: dict) -> float:
    """A trial's share of optimizer-step time: a pack's steps are shared by its trials (each result.json holds the
    pack's), a trial whose checkpoints another trial's training wrote (result.json `training`) trained nothing."""
    if result.get("training") not in (None, result.get("name")):
        return 0.0
    return float(result.get("train_seconds") or 0.0) / max(int(result.get("pack_size") or 1), 1)


def trial_phases(result: dict, trial_dir: Path) -> dict[str, float]:
    """The phases of one trial's job as its result.json records them (`phases`)."""
    spent = evaluation_seconds(trial_dir)
    return {"training_s": training_seconds(result), **{k: v for k, v in spent.items() if k != "images"}}


@dataclass(frozen=True)
class Phases:
    """A sweep's seconds by phase, summed over its trials; `wall_s`: its command's wall clock (None: not known, a
    report rebuilt by another command that had no record of it)."""

    training_s: float
    generating_s: float
    scoring_s: float
    waiting_s: float
    wall_s: float | None
    images: int
    trials: int
    # what the overhead is made of, as this process timed it (common/timeline.py): {part: {"seconds", "count"}};
    # "starting up" runs from the process's start to its first job and holds the "starting up: ..." parts
    overhead_parts: dict | None = None

    @property
    def overhead_s(self) -> float | None:
        """The wall clock's rest. Scoring runs beside generating and training (eval.overlap): only the part that
        held them up (waiting; all of it without the overlap) is on the clock."""
        busy = self.training_s + self.generating_s + self.waiting_s
        return None if self.wall_s is None else max(0.0, self.wall_s - busy)

    def named(self) -> dict[str, float | None]:
        """Each phase by name, overhead included, in the order a person reads them."""
        return {"training": self.training_s, "generating": self.generating_s, "scoring": self.scoring_s,
                "waiting": self.waiting_s, "overhead": self.overhead_s}

    def metrics(self) -> list[tuple[str, float, int]]:
        """The parent MLflow run's metrics: time_<phase>_s and time_wall_s (what is known)."""
        rows = [(f"time_{k}_s", v, 0) for k, v in self.named().items() if v is not None]
        return rows + ([("time_wall_s", self.wall_s, 0)] if self.wall_s is not None else [])

    def text(self) -> str:
        """One line for the console: the wall clock, each phase on it with its share, then scoring beside them."""
        def part(name: str, s: float | None) -> str:
            share = f" ({s / self.wall_s:.0%})" if self.wall_s and s is not None else ""
            return f"{name} {s:.1f} s{share}" if s is not None else f"{name} unknown"

        head = f"time: {self.wall_s / 60:.2f} min" if self.wall_s is not None else "time (wall clock not recorded)"
        parts = sorted((self.overhead_parts or {}).items(), key=lambda kv: -kv[1]["seconds"])[:3]
        made_of = ("; overhead's largest parts: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in parts)
                   if parts else "")
        return (head + ": " + ", ".join(part(k, v) for k, v in self.named().items() if k != "scoring") +
                f"; scoring {self.scoring_s:.1f} s beside generating and training" + made_of)

    def markdown(self) -> list[str]:
        """report.md's section."""
        wall = f"{self.wall_s:.1f} s ({self.wall_s / 60:.2f} min)" if self.wall_s is not None else "not recorded"
        lines = ["", "## Where the time went", "",
                 f"Wall clock {wall}, {self.trials} trial(s), {self.images} image(s) generated. Training is the "
                 "optimizer steps, generating every evaluation's images (the race's rounds included), waiting the "
                 "time generation or training was held up by scoring, which runs beside them; overhead is the rest "
                 "(start-up, loading, caching, checkpoints, MLflow, selection). Trials that ran side by side add up.",
                 "", "| phase | seconds | share |", "|---|---|---|"]
        for name, s in self.named().items():
            share = "beside" if name == "scoring" else f"{s / self.wall_s:.0%}" if self.wall_s and s is not None else ""
            lines.append(f"| {name} | {'' if s is None else f'{s:.1f}'} | {share} |")
        if self.overhead_parts:
            lines += ["", "Parts of the overhead this process timed (\"starting up\" runs from the process's start to "
                      "its first job and holds the \"starting up: ...\" parts; what no part names is the rest):", "",
                      "| part | seconds | times |", "|---|---|---|"]
            lines += [f"| {k} | {v['seconds']:.1f} | {v['count']} |" for k, v in self.overhead_parts.items()]
        return lines

    def to_json(self) -> dict:
        return {**asdict(self), "overhead_s": self.overhead_s}


def sweep_phases(sweep_dir: Path, started_at: float | None) -> Phases:
    """The sweep's phases from its trials' records, its wall clock from `started_at` (epoch seconds) to now; None:
    the wall clock recorded earlier in report/phases.json, if any (a rebuilt report)."""
    training, spent, trials = 0.0, {v: 0.0 for v in EVAL_KEYS.values()}, 0
    images = 0
    for d in trial_dirs(sweep_dir):
        result = read_json(d / RESULT, {}) or {}
        training += training_seconds(result)
        trials += 1
        seconds = evaluation_seconds(d)
        images += int(seconds.pop("images"))
        for k, v in seconds.items():
            spent[k] += v
    if started_at is not None:  # the live sweep's end: its process timed the parts of its overhead
        wall, parts = time.time() - started_at, timeline.parts()
    else:  # a report rebuilt later keeps what the sweep's end recorded
        recorded = read_phases(sweep_dir) or {}
        wall, parts = recorded.get("wall_s"), recorded.get("overhead_parts")
    return Phases(training, spent["generating_s"], spent["scoring_s"], spent["waiting_s"], wall, images, trials,
                  parts or None)


def write_phases(sweep_dir: Path, phases: Phases) -> Path:
    path = Path(sweep_dir) / "report" / PHASES_FILE
    write_json(path, phases.to_json())
    return path


def record_phases(sweep_dir: Path, started_at: float | None) -> Phases:
    """sweep_phases, written to report/phases.json."""
    phases = sweep_phases(sweep_dir, started_at)
    write_phases(sweep_dir, phases)
    return phases


def read_phases(sweep_dir: Path) -> dict | None:
    """report/phases.json as the sweep's end wrote it (benches read it: bench/racing.py, bench/study_grid.py)."""
    return read_json(Path(sweep_dir) / "report" / PHASES_FILE)
