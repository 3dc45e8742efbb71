"""The sweep's plan, before any training: which trials one training serves (trainer/planner.py), which trainings
share a pack (trainer/packed.py), in which launcher batch, and what the training will cost where a step time has
been measured. Printed when a multirun starts and written to <sweep>/plan.json; `plan_only=true` stops there.

The plan is computed with the very functions the trainer groups its trials with, on the jobs' composed configs,
for trials starting from scratch (a resumed trial continues from its own step and may pack differently); trials
that already finished in the sweep folder (a re-run with resume=true) are listed as skipped, not planned."""
from __future__ import annotations

import json
import logging
import os
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

from trainer import TrialSpec
from trainer import packed, planner

from . import stored
from .config import SweepConfig, resolve_path
from .redaction import redact_tree

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
MEASURED = 160  # newest trial results read for measured step times


@dataclass
class Training:
    trial: str  # the trial it trains
    steps: int
    serves: list[tuple[str, int]] = field(default_factory=list)  # other trials (name, steps): its first steps


@dataclass
class Pack:
    batch: int  # the launcher batch (one trainer call)
    trainings: list[Training]
    steps: int  # the pack runs to its longest training's end
    ms_per_step: float | None = None  # measured (or scaled from a measured pack size); None: not measured yet
    source: str = ""

    @property
    def seconds(self) -> float | None:
        return None if self.ms_per_step is None else self.steps * self.ms_per_step / 1000


@dataclass
class Plan:
    trials: int
    packs: list[Pack]
    alone: list[tuple[str, str]]  # trials trained one by one through peft, and why
    batches: list[list[int]] = field(default_factory=list)  # the launcher's batches: positions in the job list
    where: dict[int, str] = field(default_factory=dict)  # batch number (from 1) -> the worker that runs it
    placement: str = ""  # how batches are given to workers
    wall: float | None = None  # estimated seconds of training from start to end, batches running side by side
    finished: list[str] = field(default_factory=list)  # trials already finished in the sweep folder: skipped

    def batch_seconds(self, number: int) -> float | None:
        known = [p.seconds for p in self.packs if p.batch == number]
        return None if any(s is None for s in known) else sum(known)

    def place_on(self, workers: list[str]) -> None:
        """Batches handed in order to whichever of these workers frees up first (a GPU, a job process), as the
        launcher does: where each is expected to run, from the estimated training times (equal where unknown)."""
        free_at = [0.0] * len(workers)
        for number in range(1, len(self.batches) + 1):
            k = min(range(len(workers)), key=lambda w: (free_at[w], w))
            self.where[number] = workers[k]
            free_at[k] += self.batch_seconds(number) or 1.0
        self.wall = max(free_at) if self.seconds() is not None and len(workers) > 1 else None
        self.placement = (f"{len(workers)} at a time ({', '.join(workers)}); a batch goes to the first to free up, so "
                          "the placement shown is the expected one" if len(workers) > 1 else "")

    def label(self, name) -> None:
        """Every batch its own worker, named by `name(batch number)` (a Ray task, a Slurm job)."""
        self.where = {b: name(b) for b in range(1, len(self.batches) + 1)}
        self.placement, self.wall = "", None

    @property
    def trainings(self) -> int:
        return sum(len(p.trainings) for p in self.packs) + len(self.alone)

    def seconds(self) -> float | None:
        known = [p.seconds for p in self.packs]
        return None if not known or any(s is None for s in known) else sum(known)

    def text(self) -> str:
        lines = [f"plan: {self.trials} trial(s) in {self.trainings} training(s), {len(self.packs)} pack(s)"
                 + (f" and {len(self.alone)} trained alone" if self.alone else "")
                 + (f"; {len(self.finished)} already finished" if self.finished else "")]
        if self.finished:
            lines.append(f"  already finished in this sweep folder (skipped): {', '.join(self.finished)}")
        for k, p in enumerate(self.packs, 1):
            cost = (f", ~{_duration(p.seconds)} of training at {p.ms_per_step:.0f} ms/step ({p.source})"
                    if p.seconds is not None else "")
            on = f", {self.where[p.batch]}" if p.batch in self.where else ""
            lines.append(f"  pack {k} (batch {p.batch}{on}): {len(p.trainings)} training(s), {p.steps} steps{cost}")
            for t in p.trainings:
                also = "; ".join(f"{n} (its first {s} steps)" for n, s in t.serves)
                lines.append(f"    {t.trial}: {t.steps} steps" + (f", also writes {also}" if also else ""))
        for name, why in self.alone:
            lines.append(f"  {name}: trains alone through peft ({why})")
        if len(self.batches) > 1:
            how = self.placement or ("each its own worker" if self.where else "one after another")
            lines.append(f"{len(self.batches)} batches, {how}")
        total = self.seconds()
        if total is not None:
            side = f", ~{_duration(self.wall)} from start to end side by side" if self.wall else ""
            lines.append(f"estimated training time: {_duration(total)}{side} (scoring comes on top)")
        elif self.packs:
            lines.append("estimated training time: unknown until a step time is measured for this model, resolution "
                         "and pack size (any finished trial of it under outputs/ counts)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"trials": self.trials, "trainings": self.trainings, "finished": self.finished,
                "estimated_training_seconds": self.seconds(),
                "estimated_wall_seconds": self.wall or self.seconds(), "placement": self.placement,
                "packs": [{"batch": p.batch, "where": self.where.get(p.batch), "steps": p.steps,
                           "ms_per_step": p.ms_per_step, "source": p.source, "estimated_seconds": p.seconds,
                           "trainings": [{"trial": t.trial, "steps": t.steps,
                                          "serves": [{"trial": n, "steps": s} for n, s in t.serves]}
                                         for t in p.trainings]} for p in self.packs],
                "alone": [{"trial": n, "why": w} for n, w in self.alone]}

    def write(self, sweep_dir: Path) -> Path:
        path = Path(sweep_dir) / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # launches may write at once
        tmp.write_text(json.dumps(redact_tree(self.as_dict()), indent=2))
        tmp.replace(path)
        return path


def trial_key(overrides: list[str], sweep_dir: Path) -> str:
    """The job's overrides of the keys the sweep varies ("lr=0.0001"; empty when it varies none)."""
    mr = sweep_dir / "multirun.yaml"
    swept = set()
    if mr.is_file():
        parsed = OverridesParser.create().parse_overrides(list(stored.load(mr).hydra.overrides.task))
        swept = {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}
    return ",".join(o for o in overrides if o.partition("=")[0].lstrip("+~") in swept)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def make_plan(jobs: list[tuple[str, SweepConfig | None]], batch_size: int,
              finished: frozenset[int] = frozenset()) -> Plan:
    """The plan for these jobs ((trial name, typed config; None for a config that cannot be used, which fails on
    its own), in launch order): their trainings (a training's trials always in one batch), the launcher's batches
    of at most `batch_size` trainings (each batch one trainer call: trials of one model and data set train in it
    together), the packs the trainer will form in each. Jobs at the `finished` positions (their trial finished in
    an earlier run) train nothing: they go with the first batch, where they report their results and leave."""
    fresh = lambda spec: 0  # noqa: E731 - planned as from scratch
    specs = [TrialSpec(name=name, lora=conf.lora, train=conf.train, output_dir=Path(name)) if conf else None
             for name, conf in jobs]
    live = [i for i in range(len(jobs)) if i not in finished]
    units = [[i] for i in live if jobs[i][1] is None]
    for positions in _by_base(jobs, live).values():
        conf = jobs[positions[0]][1]
        where = {id(specs[i]): i for i in positions}
        units += [[where[id(s)] for s in g]
                  for g in planner.trainings([specs[i] for i in positions], conf.model, conf.data, fresh)]
    units.sort(key=min)
    batches = [sorted(i for u in units[k:k + batch_size] for i in u) for k in range(0, len(units), batch_size)]
    if finished:
        batches = [sorted([*(batches[0] if batches else []), *finished]), *batches[1:]]
    packs, alone, times = [], [], {}
    for b, batch in enumerate(batches, 1):
        for positions in _by_base(jobs, [i for i in batch if i not in finished]).values():
            conf = jobs[positions[0]][1]
            groups = planner.trainings([specs[i] for i in positions], conf.model, conf.data, fresh)
            chunks, lone = packed.plan(groups, fresh, conf.train.max_pack)
            alone += [(s.name, why) for s, why in lone]
            for chunk in chunks:
                pack = Pack(b, [Training(g[0].name, g[0].train.max_steps, [(s.name, s.train.max_steps) for s in g[1:]])
                                for g in chunk], max(g[0].train.max_steps for g in chunk))
                pack.ms_per_step, pack.source = _measured(conf, len(chunk), times)
                packs.append(pack)
    return Plan(len(jobs), packs, alone, batches, finished=[jobs[i][0] for i in sorted(finished)])


def _by_base(jobs: list[tuple[str, SweepConfig | None]], positions) -> dict[tuple, list[int]]:
    """The usable jobs at these positions by base model and data set (one trainer call each)."""
    out: dict[tuple, list[int]] = {}
    for i in positions:
        conf = jobs[i][1]
        if conf is not None:
            out.setdefault((repr(conf.model), repr(conf.data)), []).append(i)
    return out


def _measured(conf: SweepConfig, size: int, cache: dict) -> tuple[float | None, str]:
    """A step's time for a pack of `size` trainings of this model at this resolution and batch, from the newest
    finished trials under the output folder: the median of those of this pack size, else scaled from the nearest
    measured size (a step's time grows about in proportion to the trials it trains). The folder is read once per
    plan and kind of trial (`cache`)."""
    key = (conf.paths.root, conf.paths.output_dir, conf.model.name, conf.data.resolution, conf.train.batch_size,
           conf.train.device)
    if key not in cache:
        cache[key] = _step_times(conf)
    by_size = cache[key]
    if not by_size:
        return None, ""
    near = min(by_size, key=lambda k: (abs(k - size), k))
    ms = statistics.median(by_size[near])
    where = f"{conf.model.name} at {conf.data.resolution} px"
    if near == size:
        return ms, f"measured: packs of {size} of {where}"
    return ms * size / near, f"scaled from packs of {near} of {where}"


def _step_times(conf: SweepConfig) -> dict[int, list[float]]:
    """{pack size: ms per step} of the newest finished trials (sweep and single-run folders) like `conf`'s."""
    root = resolve_path(conf.paths, conf.paths.output_dir)
    results = sorted([*root.glob("*/*/result.json"), *root.glob("*/*/*/result.json")], key=_mtime,
                     reverse=True)[:MEASURED]
    by_size: dict[int, list[float]] = {}
    for path in results:
        try:
            res = json.loads(path.read_text())
            if res.get("status") != "finished" or not res.get("ms_per_step") or not res.get("pack_size"):
                continue
            cfg = stored.load(path.parent / ".hydra" / "config.yaml")
            same = (cfg.model.name == conf.model.name and cfg.data.resolution == conf.data.resolution
                    and cfg.train.batch_size == conf.train.batch_size and cfg.train.device == conf.train.device)
        except (OSError, ValueError, AttributeError, KeyError):
            continue
        if same:
            by_size.setdefault(int(res["pack_size"]), []).append(float(res["ms_per_step"]))
    return by_size


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0
