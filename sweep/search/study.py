"""The Optuna study a search runs in: its settings (hydra.sweeper, typed), samplers, pruners, the storage (SQLite
beside MLflow's store, or a database server several workers share), trials left by dead workers, the budget. Only
this package imports optuna."""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.metrics import METRICS, WEIGHTED_SCORE, close_matches, metric
from trainer import ConfigError

from ..redaction import redact
from .space import space_signature

log = logging.getLogger(__name__)

SCORE = "score"  # the objective name meaning "the sweep's selection rule applied to one checkpoint"
SAMPLERS = ("tpe", "random", "grid", "cmaes", "nsga2")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "threshold", "none")
DEFAULT_DB = "optuna.db"  # next to MLflow's mlflow.db in <paths.root>/mlruns


@dataclass
class SearchSettings:
    """hydra.sweeper, typed (see hydra_plugins/sdxl_lora_sweep/optuna_sweeper.py for the documented defaults)."""

    n_trials: int = 20
    n_jobs: int = 1
    study_name: str | None = None
    storage: str | None = None
    objectives: list[str] = field(default_factory=lambda: [SCORE])
    directions: list[str] = field(default_factory=lambda: ["maximize"])
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    max_retry: int = 2
    heartbeat_interval: int = 30
    grace_period: int | None = None
    params: dict[str, str] | None = None

    @classmethod
    def from_config(cls, node) -> "SearchSettings":
        from omegaconf import OmegaConf

        d = OmegaConf.to_container(OmegaConf.create(dict(node)), resolve=True)  # plain values all the way down
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


# samplers and pruners -------------------------------------------------------------------------------------
# `name: tpe` is short for `_target_: optuna.samplers.TPESampler`; any other Optuna sampler or pruner (or one of
# your own) is configured by its `_target_` and built by hydra.utils.instantiate with the node's other keys.
SAMPLERS = {"tpe": "optuna.samplers.TPESampler", "random": "optuna.samplers.RandomSampler",
            "grid": "optuna.samplers.GridSampler", "cmaes": "optuna.samplers.CmaEsSampler",
            "nsga2": "optuna.samplers.NSGAIISampler"}
PRUNERS = {"median": "optuna.pruners.MedianPruner", "percentile": "optuna.pruners.PercentilePruner",
           "successive_halving": "optuna.pruners.SuccessiveHalvingPruner",
           "hyperband": "optuna.pruners.HyperbandPruner", "threshold": "optuna.pruners.ThresholdPruner",
           "none": "optuna.pruners.NopPruner"}


def _node(kind: str, given: dict[str, Any], short: dict[str, str], default: str) -> dict[str, Any]:
    """hydra.sweeper.<kind> as an instantiate node: its `_target_` if set (it wins over a `name` merged in from
    the defaults), else the class its short `name` stands for. Raises ConfigError naming the value."""
    d = dict(given)
    name = d.pop("name", default)
    if d.get("_target_"):
        return d
    if name not in short:
        raise ConfigError([f"hydra.sweeper.{kind}.name={name!r} is not one of {tuple(short)}"
                           f"{close_matches(str(name), short)}; or give any Optuna {kind} as "
                           f"hydra.sweeper.{kind}._target_=optuna.{kind}s.<Class>"])
    return {"_target_": short[name], **d}


def _class(kind: str, node: dict[str, Any]) -> type:
    module, _, name = str(node["_target_"]).rpartition(".")
    try:  # not hydra.utils.get_class, which logs its own error before ours
        return getattr(importlib.import_module(module), name)
    except Exception:
        raise ConfigError([f"hydra.sweeper.{kind}._target_={node['_target_']!r} cannot be imported; "
                           f"e.g. optuna.{kind}s.{'TPESampler' if kind == 'sampler' else 'MedianPruner'}"]) from None


def _build(kind: str, node: dict[str, Any], **args):
    from hydra.utils import instantiate

    takes = inspect.signature(_class(kind, node)).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values()):
        extra = [k for k in node if not k.startswith("_") and k not in takes]
        if extra:  # typically a key merged in from the search config, meant for the sampler it replaced
            keys = [k for k, p in takes.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL and k not in args]
            raise ConfigError([f"hydra.sweeper.{kind}: {node['_target_']} takes no {extra} (it takes {keys}); "
                               "drop them with " + " ".join(f"~hydra.sweeper.{kind}.{k}" for k in extra)])
    try:
        return instantiate(node, **args, _convert_="all")
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConfigError([f"hydra.sweeper.{kind} ({node['_target_']}): {type(cause).__name__}: {cause}"]) from None


def check_settings(s: SearchSettings, space: dict[str, Any]) -> None:
    """Every setting the study depends on, checked before any trial starts (the sampler and pruner are built
    once here, so a wrong keyword is refused now rather than when the first trial asks)."""
    problems = []
    if s.n_trials < 1:
        problems.append(f"hydra.sweeper.n_trials={s.n_trials}: needs at least 1")
    if s.n_jobs < 1:
        problems.append(f"hydra.sweeper.n_jobs={s.n_jobs}: needs at least 1")
    if len(s.objectives) != len(s.directions) or not s.objectives:
        problems.append(f"hydra.sweeper.objectives={s.objectives} and directions={s.directions} must pair up one to one")
    for name in s.objectives:  # a name no checkpoint has would make every trial's value NaN
        if name not in (SCORE, WEIGHTED_SCORE):
            try:
                metric(name)
            except ValueError:
                problems.append(f"hydra.sweeper.objectives: {name!r} is neither {SCORE!r} (the selection rule's "
                                f"objective) nor a metric{close_matches(name)}; use one of {[SCORE, *METRICS]}")
    bad = [d for d in s.directions if d not in ("maximize", "minimize")]
    if bad:
        problems.append(f"hydra.sweeper.directions: {bad} is not maximize or minimize")
    classes = {}
    for kind, short, default in (("sampler", SAMPLERS, "tpe"), ("pruner", PRUNERS, "none")):
        try:
            classes[kind] = _class(kind, _node(kind, getattr(s, kind), short, default))
        except ConfigError as exc:
            problems += exc.problems
    problems += _fit(s, space, classes.get("sampler"), classes.get("pruner"))
    if problems:
        raise ConfigError(problems)
    make_sampler(s, space)
    make_pruner(s)


def _fit(s: SearchSettings, space: dict[str, Any], sampler: type | None, pruner: type | None) -> list[str]:
    """What the chosen sampler and pruner cannot do with this search."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    problems = []
    if sampler and issubclass(sampler, optuna.samplers.CmaEsSampler) and s.multi_objective:
        problems.append("hydra.sweeper.sampler.name=cmaes handles one objective: use tpe or nsga2 for several")
    if sampler and issubclass(sampler, optuna.samplers.GridSampler):
        cont = [k for k, d in space.items() if not isinstance(d, CategoricalDistribution) and getattr(d, "step", None) is None]
        if cont:
            problems.append(f"sampler grid needs choice(...) or range(...) values; {cont} are continuous intervals")
    if pruner and not issubclass(pruner, optuna.pruners.NopPruner) and s.multi_objective:
        problems.append("Optuna cannot prune multi-objective studies: set hydra.sweeper.pruner.name=none "
                        f"(objectives {s.objectives})")
    return problems


def make_sampler(s: SearchSettings, space: dict[str, Any], seed_offset: int = 0):
    """The configured sampler. `seed_offset` (the study's trial count when this worker joins) keeps workers that
    join a running study from drawing the same "random" points as the first one; a fresh study starts at 0."""
    import optuna

    node = _node("sampler", s.sampler, SAMPLERS, "tpe")
    if node.get("seed") is not None:
        node["seed"] = int(node["seed"]) + seed_offset
    cls = _class("sampler", node)
    if issubclass(cls, optuna.samplers.CmaEsSampler):
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError(["sampler cmaes needs the cmaes package: pip install cmaes"]) from None
    if issubclass(cls, optuna.samplers.GridSampler):
        grid = {k: (list(d.choices) if hasattr(d, "choices") else _grid_values(d)) for k, d in space.items()}
        return _build("sampler", node, search_space=grid)
    return _build("sampler", node)


def _grid_values(d) -> list:
    n = int(round((d.high - d.low) / d.step))
    return [d.low + i * d.step for i in range(n + 1)]


def make_pruner(s: SearchSettings):
    import optuna

    node = _node("pruner", s.pruner, PRUNERS, "none")
    if issubclass(_class("pruner", node), optuna.pruners.NopPruner):  # a pruner's keys merged from the defaults
        node = {"_target_": node["_target_"]}                          # are moot when nothing prunes
    return _build("pruner", node)


# storage and study ----------------------------------------------------------------------------------------
def coordinates(s: SearchSettings, sweep_dir: Path, root: Path) -> tuple[str, str]:
    """(storage URL, study name): an SQLite file beside the MLflow store and the sweep folder's name by default."""
    url = s.storage or f"sqlite:///{(root / 'mlruns' / DEFAULT_DB).resolve()}"
    return url, s.study_name or Path(sweep_dir).name


def open_storage(url: str, s: SearchSettings):
    import optuna
    from optuna.storages import RDBStorage

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 4-5: the feature we rely on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
            callback = {"heartbeat_stale_trial_callback": retry(max_retry=s.max_retry)} if retry else \
                {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=s.max_retry)}
            return RDBStorage(url, heartbeat_interval=s.heartbeat_interval, grace_period=s.grace_period,
                              engine_kwargs=engine, **callback)
    except (ImportError, ModuleNotFoundError) as exc:
        raise ConfigError([f"hydra.sweeper.storage={redact('storage', url)}: its database driver is missing ({exc}); for "
                           "PostgreSQL: pip install 'sdxl-lora-sweep[postgres]'"]) from None
    except Exception as exc:
        first = str(exc).splitlines()[0][:300]
        raise ConfigError([f"hydra.sweeper.storage={redact('storage', url)} cannot be opened ({type(exc).__name__}: {first}); "
                           "check the URL, that the server runs and the database exists, or leave storage unset "
                           "for an SQLite file next to MLflow's"]) from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_study(storage, name: str, s: SearchSettings, space: dict[str, Any], sampler=None, pruner=None):
    """Create the study, or load it and refuse it if it was made for another search space or direction."""
    import optuna
    from optuna.study import StudyDirection

    sig = space_signature(space)
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    directions=list(s.directions), load_if_exists=True)
        if "search_space" not in study.user_attrs:
            study.set_user_attr("search_space", sig)
            study.set_user_attr("objectives", list(s.objectives))
    have = [d.name.lower() for d in study.directions]
    problems = []
    if have != list(s.directions) or study.user_attrs.get("objectives", list(s.objectives)) != list(s.objectives):
        problems.append(f"study {name!r} exists with objectives {study.user_attrs.get('objectives')} {have}, "
                        f"not {list(s.objectives)} {list(s.directions)}")
    old = study.user_attrs.get("search_space")
    if old is not None and old != sig:
        diff = sorted(k for k in set(old) | set(sig) if old.get(k) != sig.get(k))
        problems.append(f"study {name!r} exists with another search space (differs in {diff})")
    if problems:
        raise ConfigError([p + ": use hydra.sweeper.study_name=<new name> for a new study, or the same search as "
                           "before to continue it" for p in problems])
    assert all(d in (StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE) for d in study.directions)
    return study


def worker_attrs() -> dict[str, Any]:
    return {"worker_host": socket.gethostname(), "worker_pid": os.getpid()}


def recover(study, storage) -> list[int]:
    """Trials left RUNNING by a sweeper that died: failed (and re-queued by the storage's retry callback).

    Those of a dead process on this host are found at once; others by their stale heartbeat."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    sid = storage.get_study_id_from_name(study.study_name)
    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("worker_pid")
        if t.user_attrs.get("worker_host") == host and pid and not _alive(int(pid)):
            tid = storage.get_trial_id_from_study_id_trial_number(sid, t.number)
            storage.set_trial_user_attr(tid, "fail_reason", f"worker process {pid} on {host} died")
            if storage.set_trial_state_values(tid, TrialState.FAIL):
                failed.append(t.number)
                callback = storage.get_heartbeat_stale_trial_callback()
                if callback is not None:
                    callback(study, storage.get_trial(tid))
    if failed:
        log.warning("trials %s were left running by a process that died: failed and re-queued", failed)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def budget(study, n_trials: int) -> tuple[int, int]:
    """(trials that count against the budget, trials waiting to be re-run). A failed trial that was re-queued
    counts once, through its retry."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    counted = [t for t in trials if not (t.state == TrialState.FAIL and t.number in retried)]
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return len(counted), waiting


def pareto_rows(study) -> list[dict[str, Any]]:
    """The Pareto front of a multi-objective study (or the best trial of a single one), as table rows."""
    names = study.user_attrs.get("objectives") or [f"value{i}" for i in range(len(study.directions))]
    best = study.best_trials if len(study.directions) > 1 else ([study.best_trial] if _has_complete(study) else [])
    return [{"trial": t.number, **dict(zip(names, t.values)), **t.params, "best_step": t.user_attrs.get("best_step"),
             "run": t.user_attrs.get("mlflow_run_id")} for t in sorted(best, key=lambda t: t.number)]


def _has_complete(study) -> bool:
    from optuna.trial import TrialState

    return any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
