"""`hydra/sweeper=optuna`: Optuna search over the sweep's config (the work is in sweep/search/sweeper.py)."""
# no `from __future__ import annotations`: Hydra imports plugin modules outside sys.modules, where dataclasses
# cannot resolve string annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.sdxl_lora_sweep.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False               # sampler/pruner `_target_`s are built by the sweeper (seed, grid)
    n_trials: int = 20                      # the study's budget: trials finished, pruned or failed, across re-runs
    n_jobs: int = 1                         # trials at a time: one pack per round (processes: one process each)
    study_name: Optional[str] = None        # default: the sweep folder's name (the same command continues it)
    storage: Optional[str] = None           # default: sqlite:///<paths.root>/mlruns/optuna.db; any SQLAlchemy URL
    objectives: List[str] = field(default_factory=lambda: ["score"])   # "score" (the selection rule) or metrics
    directions: List[str] = field(default_factory=lambda: ["maximize"])
    sampler: Dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 0})  # or {_target_: ...}
    pruner: Dict[str, Any] = field(default_factory=lambda: {"name": "median", "n_startup_trials": 2,
                                                            "n_warmup_steps": 0})
    max_retry: int = 2                      # re-runs of a trial whose process died
    heartbeat_interval: int = 30            # seconds; a running trial without a beat for grace_period is stale
    grace_period: Optional[int] = None      # default: 2 x heartbeat_interval
    params: Optional[Dict[str, str]] = None  # search space, e.g. {lr: "tag(log, interval(1e-5, 5e-4))"}


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="sdxl-lora-sweep")


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from sweep.search.sweeper import OptunaSweep
        from sweep.search.study import SearchSettings

        self.impl = OptunaSweep(SearchSettings.from_config(settings))

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.impl.sweep(arguments)
