"""Optuna search: the search space from Hydra's override syntax, samplers, pruners, the study storage, and the
link through which a trial (in whatever process runs it) reports checkpoint scores and is pruned.

The sweeper (optuna_sweep.py) asks the study for trials and launches them as Hydra jobs with
`optuna_trial=<number>`; the job opens the trial from the storage by number, reports every checkpoint's score
(`report` / `should_prune`) and tells the study how it ended. Only this module and optuna_sweep.py import optuna."""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer import ConfigError

from .selection import WEIGHTED_SCORE, Candidate, SelectionConfig, checkpoint_score, select

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

        d = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else dict(node)
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


# search space --------------------------------------------------------------------------------------------
def parse_space(params: dict[str, str] | None, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Distributions by parameter name, and the fixed overrides every trial gets.

    Accepts Hydra's sweep syntax: choice(4,8,16) (categorical), range(4,33,4) (stepped int/float, end excluded),
    interval(1e-5,5e-4) (uniform float), int(interval(1,64)) (integers), tag(log, interval(...)) (log scale).
    Command-line overrides win over `params` from a search config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    items = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    try:
        overrides = parser.parse_overrides(items)
    except Exception as exc:
        raise ConfigError([f"search space: {exc}".splitlines()[0] + " (write e.g. 'lr=tag(log, interval(1e-5, 5e-4))' "
                           "or 'lora.rank=choice(4,8,16)')"]) from None
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    problems = []
    for o in overrides:
        key = o.get_key_element()
        if o.is_sweep_override():
            try:
                space[key] = _distribution(key, o)
                fixed.pop(key, None)
            except ValueError as exc:
                problems.append(str(exc))
        else:
            fixed[key] = o.input_line
            space.pop(key, None)
    if problems:
        raise ConfigError(problems)
    if not space:
        raise ConfigError(["the Optuna sweeper got no search space: give one, e.g. 'lr=tag(log, interval(1e-5, 5e-4))' "
                           "'lora.rank=choice(4,8,16)', or search=rank_lr"])
    return space, list(fixed.values())


def _distribution(key: str, o) -> Any:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    v = o.value()
    tags = set(getattr(v, "tags", set()) or set())
    log_scale = "log" in tags
    if isinstance(v, ChoiceSweep):
        choices = list(o.sweep_iterator())
        if not choices:
            raise ValueError(f"{key}=choice(): no values to choose from; list at least one")
        if log_scale:
            raise ValueError(f"{key}: tag(log, ...) applies to interval(...), not to choice(...)")
        return CategoricalDistribution(choices)
    if isinstance(v, RangeSweep):
        start, stop, step = v.start, v.stop, v.step
        if step is None or step <= 0 or start is None or stop is None or start >= stop:
            raise ValueError(f"{key}=range({start}, {stop}, {step}) is empty or inverted: range(start, end, step) "
                             "needs start < end and step > 0 (the end is excluded)")
        if all(isinstance(x, int) for x in (start, stop, step)):
            last = start + (stop - 1 - start) // step * step
            return IntDistribution(start, last, step=step, log=False)
        n = int(math.floor((stop - start) / step - 1e-9))
        return FloatDistribution(start, start + n * step, step=step)
    if isinstance(v, IntervalSweep):
        lo, hi = v.start, v.end
        if lo is None or hi is None or not lo < hi:
            raise ValueError(f"{key}=interval({lo}, {hi}) is empty or inverted: write interval(low, high) with low < high")
        if log_scale and lo <= 0:
            raise ValueError(f"{key}=tag(log, interval({lo}, {hi})): a log scale needs bounds > 0; raise the low bound "
                             f"(e.g. interval({hi / 100:g}, {hi}))")
        if isinstance(lo, int) and isinstance(hi, int):
            return IntDistribution(lo, hi, log=log_scale)
        return FloatDistribution(float(lo), float(hi), log=log_scale)
    raise ValueError(f"{key}: {o.input_line!r} is not a search space the Optuna sweeper knows "
                     "(choice, range, interval, tag(log, interval))")


def check_keys(space: dict[str, Any], config) -> None:
    """Every searched parameter must exist in the composed config; misspellings get the close matches."""
    from omegaconf import OmegaConf

    from .tracking import flatten

    cfg = OmegaConf.to_container(config, resolve=False)
    cfg.pop("hydra", None)
    known = set(flatten(cfg))  # a searched parameter is a value, so the leaf keys are the ones to match
    problems = []
    for key in space:
        k = key.lstrip("+~")
        if k not in known and not key.startswith("+"):
            close = difflib.get_close_matches(k, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            problems.append(f"search parameter {k!r} is not in the config{hint} (prefix it with + to add a new key)")
    if problems:
        raise ConfigError(problems)


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    out = {}
    for k, d in space.items():
        if isinstance(d, CategoricalDistribution):
            out[k] = trial.suggest_categorical(k, d.choices)
        elif isinstance(d, IntDistribution):
            out[k] = trial.suggest_int(k, d.low, d.high, step=d.step, log=d.log)
        else:
            out[k] = trial.suggest_float(k, d.low, d.high, step=d.step, log=d.log)
    return out


def override_value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


# samplers and pruners -------------------------------------------------------------------------------------
def check_settings(s: SearchSettings, space: dict[str, Any]) -> None:
    """Every setting the study depends on, checked before any trial starts."""
    problems = []
    if s.n_trials < 1:
        problems.append(f"hydra.sweeper.n_trials={s.n_trials}: needs at least 1")
    if s.n_jobs < 1:
        problems.append(f"hydra.sweeper.n_jobs={s.n_jobs}: needs at least 1")
    if len(s.objectives) != len(s.directions) or not s.objectives:
        problems.append(f"hydra.sweeper.objectives={s.objectives} and directions={s.directions} must pair up one to one")
    bad = [d for d in s.directions if d not in ("maximize", "minimize")]
    if bad:
        problems.append(f"hydra.sweeper.directions: {bad} is not maximize or minimize")
    name = s.sampler.get("name", "tpe")
    if name not in SAMPLERS:
        problems.append(f"hydra.sweeper.sampler.name={name!r} is not one of {SAMPLERS}")
    if name == "cmaes" and s.multi_objective:
        problems.append("hydra.sweeper.sampler.name=cmaes handles one objective: use tpe or nsga2 for several")
    if name == "grid":
        from optuna.distributions import CategoricalDistribution

        cont = [k for k, d in space.items() if not isinstance(d, CategoricalDistribution) and getattr(d, "step", None) is None]
        if cont:
            problems.append(f"sampler grid needs choice(...) or range(...) values; {cont} are continuous intervals")
    pname = s.pruner.get("name", "none")
    if pname not in PRUNERS:
        problems.append(f"hydra.sweeper.pruner.name={pname!r} is not one of {PRUNERS}")
    if pname != "none" and s.multi_objective:
        problems.append("Optuna cannot prune multi-objective studies: set hydra.sweeper.pruner.name=none "
                        f"(objectives {s.objectives})")
    if problems:
        raise ConfigError(problems)


def make_sampler(s: SearchSettings, space: dict[str, Any], seed_offset: int = 0):
    """The configured sampler. `seed_offset` (the study's trial count when this worker joins) keeps workers that
    join a running study from drawing the same "random" points as the first one; a fresh study starts at 0."""
    import optuna

    kw = {k: v for k, v in s.sampler.items() if k != "name"}
    if kw.get("seed") is not None:
        kw["seed"] = int(kw["seed"]) + seed_offset
    name = s.sampler.get("name", "tpe")
    if name == "tpe":
        return optuna.samplers.TPESampler(**kw)
    if name == "random":
        return optuna.samplers.RandomSampler(**kw)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(**kw)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError(["sampler cmaes needs the cmaes package: pip install cmaes"]) from None
        return optuna.samplers.CmaEsSampler(**kw)
    grid = {k: (list(d.choices) if hasattr(d, "choices") else _grid_values(d)) for k, d in space.items()}
    return optuna.samplers.GridSampler(grid, **kw)


def _grid_values(d) -> list:
    n = int(round((d.high - d.low) / d.step))
    return [d.low + i * d.step for i in range(n + 1)]


def make_pruner(s: SearchSettings):
    import optuna

    name = s.pruner.get("name", "none")
    kw = {k: v for k, v in s.pruner.items() if k != "name" and name != "none"}  # none: other keys are moot
    p = optuna.pruners
    try:
        return {"median": p.MedianPruner, "percentile": p.PercentilePruner, "hyperband": p.HyperbandPruner,
                "successive_halving": p.SuccessiveHalvingPruner, "threshold": p.ThresholdPruner,
                "none": p.NopPruner}[name](**kw)
    except TypeError as exc:
        raise ConfigError([f"hydra.sweeper.pruner ({name}): {exc}"]) from None


# storage and study ----------------------------------------------------------------------------------------
def coordinates(s: SearchSettings, sweep_dir: Path, root: Path) -> tuple[str, str]:
    """(storage URL, study name): an SQLite file beside the MLflow store and the sweep folder's name by default."""
    url = s.storage or f"sqlite:///{(root / 'mlruns' / DEFAULT_DB).resolve()}"
    return url, s.study_name or Path(sweep_dir).name


def mask(url: str) -> str:
    """The URL with any password hidden (for messages, logs and tags)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


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
        raise ConfigError([f"hydra.sweeper.storage={mask(url)}: its database driver is missing ({exc}); for "
                           "PostgreSQL: pip install 'sdxl-lora-sweep[postgres]'"]) from None
    except Exception as exc:
        first = str(exc).splitlines()[0][:300]
        raise ConfigError([f"hydra.sweeper.storage={mask(url)} cannot be opened ({type(exc).__name__}: {first}); "
                           "check the URL, that the server runs and the database exists, or leave storage unset "
                           "for an SQLite file next to MLflow's"]) from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def space_signature(space: dict[str, Any]) -> dict[str, str]:
    from optuna.distributions import distribution_to_json

    return {k: distribution_to_json(d) for k, d in sorted(space.items())}


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

    def report(self, c: Candidate, baseline: dict[str, float]) -> bool:
        """Report a checkpoint's score; True when the pruner says stop. Multi-objective studies never prune."""
        if self.s.multi_objective:
            return False
        value = objective_value(self.s.objectives[0], c, baseline, self.selection)
        self.trial.report(value, c.step)  # NaN (no eligible checkpoint) is pruned by Optuna's pruners
        return self.trial.should_prune()

    def replay(self, candidates: list[Candidate], baseline: dict[str, float]) -> None:
        """Report a finished trial's checkpoint scores, in step order, to a trial the study has not heard from: the
        re-run of one that died after its work was done but before the study was told keeps the intermediate
        values that later trials are pruned against (and a pruned trial's stop step among them)."""
        from optuna.trial import TrialState

        if self.s.multi_objective or self._state() != TrialState.RUNNING:
            return
        for c in sorted(candidates, key=lambda c: c.step):
            self.trial.report(objective_value(self.s.objectives[0], c, baseline, self.selection), c.step)

    def finish(self, status: str, candidates: list[Candidate], baseline: dict[str, float]) -> list[float] | None:
        """Tell the study how the trial ended. Returns the values told (None when pruned or failed)."""
        from optuna.trial import TrialState

        if self._state() != TrialState.RUNNING:
            return None  # told already (a job run twice, e.g. a resumed sweep)
        if status == "pruned":
            self.study.tell(self.trial, state=TrialState.PRUNED)
            return None
        best = _best(candidates, baseline, self.selection)
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


def _best(candidates: list[Candidate], baseline: dict[str, float], sel: SelectionConfig) -> Candidate | None:
    """The trial's best checkpoint under the sweep's rule; its last one when none is eligible."""
    if not candidates:
        return None
    chosen = select(candidates, baseline, sel).champion
    return chosen or max(candidates, key=lambda c: c.step)


def pareto_rows(study) -> list[dict[str, Any]]:
    """The Pareto front of a multi-objective study (or the best trial of a single one), as table rows."""
    names = study.user_attrs.get("objectives") or [f"value{i}" for i in range(len(study.directions))]
    best = study.best_trials if len(study.directions) > 1 else ([study.best_trial] if _has_complete(study) else [])
    return [{"trial": t.number, **dict(zip(names, t.values)), **t.params, "best_step": t.user_attrs.get("best_step"),
             "run": t.user_attrs.get("mlflow_run_id")} for t in sorted(best, key=lambda t: t.number)]


def _has_complete(study) -> bool:
    from optuna.trial import TrialState

    return any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
