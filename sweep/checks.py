"""A whole sweep checked before anything of it exists: the config of every job, as Hydra will compose it, with the
same typed validation a job runs (sweep/config.py), the photos and the base model each distinct job trains on.

Hydra composes the sweep's own config without its swept values, so `lr=fast,slow` or `lora.rank=-4,8` used to pass
the sweep's checks, the valid trials trained, and the bad ones failed one by one; the sweep's end then failed on
them behind a Hydra warning. Here, first, each value of each swept key is composed alone with the fixed overrides
and its keys and types checked (what a value is worth on its own: `lr=fast` is named even beside `rank=abc`);
then the jobs of the readable values, with every rule (some tie keys together: checkpoint_every <= steps): every
combination up to MAX_JOBS, past that each value with the other keys at their first value. An Optuna search's
trials are not known in advance: its choices and its ranges' ends stand for its values."""
from __future__ import annotations

import itertools
from typing import Any, Callable

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from common.device import resolve_device
from common.errors import ConfigError, UserError
from trainer import instance_photos, optimizer_problem
from trainer.models import check_source

from .config import SweepConfig, typed_job
from .search import SearchSettings
from .search.space import override_value, parse_space

MAX_JOBS = 32  # jobs composed and validated in full (~0.15 s each); past it, each value once
Axis = list[tuple[str, str]]  # a swept key's values: (override, how the user knows it)


def check_sweep(config: DictConfig, loader: Any, optuna: bool) -> SweepConfig:
    """The sweep's typed config; raises ConfigError listing every problem of every job (each named by the swept
    values that cause it), the photos and the base model included. `loader`: Hydra's config loader."""
    problems: dict[str, list[frozenset]] = {}  # problem -> for each job it was found in, the job's swept values
    conf = _check(lambda: typed_job(config), frozenset(), problems)
    fixed = set(problems)
    axes, rest = _search(config, problems) if optuna else _grid(config, loader)
    compose = _composer(config, loader, rest)
    axes = _readable(axes, compose, problems, fixed)
    jobs = _jobs(axes) if all(axes) else []  # without a value of each swept key, no job of the sweep: no rule
    confs = [conf] if conf else []
    for job in jobs:  # every rule, on the jobs the sweep will run
        typed = _check(lambda: typed_job(compose([o for o, _ in job])), _labels(job), problems, fixed)
        confs += [typed] if typed else []
    problems.update({p: [] for p in _inputs(confs, _sweeps_data(config)) + _machine(confs) if p not in problems})
    if problems:
        everywhere = frozenset.intersection(*map(_labels, jobs)) if jobs else frozenset()
        raise ConfigError([_named(p, [j - everywhere for j in found]) for p, found in problems.items()])
    return conf


def _readable(axes: list[Axis], compose, problems: dict, fixed: set) -> list[Axis]:
    """Each value composed on its own with the fixed overrides, its key and type checked: the axes of the values
    that pass."""
    bad = {override for axis in axes for override, label in axis
           if not _check(lambda: typed_job(compose([override]), values=False), frozenset([label]), problems, fixed)}
    return [[v for v in axis if v[0] not in bad] for axis in axes]


def _labels(job: tuple[tuple[str, str], ...]) -> frozenset:
    return frozenset(label for _, label in job)


def _check(make: Callable[[], SweepConfig], labels: frozenset, problems: dict, known=()) -> SweepConfig | None:
    """make() or None, its problems recorded for the job `labels` names (those of the fixed overrides once)."""
    try:
        return make()
    except ConfigError as exc:
        found = exc.problems
    except HydraException as exc:  # a config group option that does not exist (model=tiny,tinyy)
        found = [str(exc).split("Config search path:")[0].strip().splitlines()[0]]
    for p in found:
        if p not in known:
            problems.setdefault(p, []).append(labels)
    return None


def _named(problem: str, jobs: list[frozenset]) -> str:
    """"steps=4: train.checkpoint_every=6 is larger ...": a problem named by the swept values every job it was
    found in shares (values in every job left out: they tell nothing), else by its first job; a value the problem
    starts with is not said twice; a problem of the fixed overrides as it is."""
    if not jobs or not any(jobs):
        return problem
    shared = sorted(frozenset.intersection(*jobs)) or sorted(jobs[0])
    more = f" (and {len(jobs) - 1} other job(s))" if not frozenset.intersection(*jobs) and len(jobs) > 1 else ""
    shown = [x for x in shared if not problem.replace("'", "").startswith(x)]
    return f"{' '.join(shown)}{more}: {problem}" if shown or more else problem


def _composer(config: DictConfig, loader: Any, rest: list[str]) -> Callable[[list[str]], DictConfig]:
    """A job's config as Hydra composes it (the sweep's hydra overrides, the fixed ones, the job's values), each
    composed once."""
    done: dict[tuple, DictConfig] = {}

    def compose(swept: list[str]) -> DictConfig:
        key = (*rest, *swept)
        if key not in done:
            done[key] = loader.load_sweep_config(config, list(key))
        return done[key]
    return compose


def _grid(config: DictConfig, loader: Any) -> tuple[list[Axis], list[str]]:
    """The swept keys' values, and the fixed overrides, as Hydra's basic sweeper reads them (its `params`, then the
    command line)."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    items = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in config.hydra.overrides.task]
    axes, rest = [], []
    for o in OverridesParser.create(config_loader=loader).parse_overrides(items):
        if o.is_sweep_override() and o.is_discrete_sweep():
            axes.append([(f"{o.get_key_element()}={v}",) * 2 for v in o.sweep_string_iterator()])
        elif not o.is_sweep_override():  # an interval in a grid: Hydra refuses it itself
            rest.append(o.input_line)
    return axes, rest


def _search(config: DictConfig, problems: dict) -> tuple[list[Axis], list[str]]:
    """An Optuna search's values known in advance (each choice, each range's two ends), and its fixed overrides."""
    try:
        space, fixed = parse_space(SearchSettings.from_config(config.hydra.sweeper).params,
                                   [str(o) for o in config.hydra.overrides.task])
    except ConfigError as exc:
        problems.update({p: [] for p in exc.problems})
        return [], []
    axes = []
    for key, dist in space.items():
        ends = list(dist.choices) if hasattr(dist, "choices") else [dist.low, dist.high]
        what = "one of its choices" if hasattr(dist, "choices") else "an end of its search range"
        axes.append([(f"{key}={override_value(v)}", f"{key}={override_value(v)} ({what})")
                     for v in dict.fromkeys(ends)])
    return axes, fixed


def _jobs(axes: list[Axis]) -> list[tuple[tuple[str, str], ...]]:
    """Every combination of the swept values, when at most MAX_JOBS; else each value once, the other keys at their
    first value (real jobs all: a problem found is a problem of the sweep)."""
    if not axes:
        return []
    if len(list(itertools.product(*axes))) <= MAX_JOBS:
        return list(itertools.product(*axes))
    firsts = [a[0] for a in axes]
    return list(dict.fromkeys(tuple(v if j == i else f for j, f in enumerate(firsts))
                              for i, axis in enumerate(axes) for v in axis))


def _sweeps_data(config: DictConfig) -> bool:
    """Whether the sweep varies a `data.*` key (then the photos are checked for each value, not once)."""
    parsed = OverridesParser.create().parse_overrides([str(o) for o in config.hydra.overrides.task])
    return any(o.is_sweep_override() and o.key_or_group.lstrip("+~").startswith("data") for o in parsed)


def _machine(confs: list[SweepConfig]) -> list[str]:
    """What this machine cannot run, of every distinct device and optimizer the jobs ask for: a CUDA device where
    torch sees none, 8-bit AdamW off CUDA or without bitsandbytes (preset=flux_24gb asks for it). Said before any
    model loads; the trainer raises the same at the start of a trial."""
    problems = []
    for device, optimizer in dict.fromkeys((c.train.device, c.train.optimizer) for c in confs):
        try:
            problem = optimizer_problem(optimizer, resolve_device(device))
        except UserError as exc:
            problem = str(exc)
        problems += [problem] if problem else []
    return problems


def _inputs(confs: list[SweepConfig], sweeps_data: bool) -> list[str]:
    """The photos and the base model of every distinct job, each checked once: a missing folder, a model not in the
    cache while offline. Cheap: photos are opened, no model is loaded."""
    problems = []
    photos = {(d.instance_dir, d.resolution, d.min_images, d.allow_upscale): d
              for d in (c.data for c in (confs if sweeps_data else confs[:1]))}
    models = {(m.pretrained, m.revision): m for m in (c.model for c in confs) if not m.architecture}
    for check, arg in [*((instance_photos, d) for d in photos.values()), *((check_source, m) for m in models.values())]:
        try:
            check(arg)
        except UserError as exc:
            problems.append(str(exc))
    return list(dict.fromkeys(problems))
