"""`hydra/launcher=ray`: every batch of the plan a Ray task, on a cluster or a local Ray instance (the work is in
sweep/launchers/ray.py; Ray is imported only when this launcher is used)."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore

from . import DelegatingLauncher


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.sdxl_lora_sweep.ray_launcher.RayLauncher"
    address: Optional[str] = None      # null: RAY_ADDRESS if set, else a Ray instance in this process; auto | host:port
    num_gpus: Optional[float] = None   # per task (one batch); null: 1 if the cluster has GPUs, else 0
    num_cpus: float = 1                # per task (also its torch threads)
    max_retries: int = 1               # re-runs of a task whose worker died (its trials resume); 0: they fail
    pack_size: int = 8                 # trainings (with the trials each serves) per task; 1: a task per job
    runtime_env: Dict[str, Any] = field(default_factory=dict)  # Ray's runtime_env for the tasks (env_vars, pip, ...)
    init: Dict[str, Any] = field(default_factory=dict)  # more ray.init arguments: +hydra.launcher.init.num_cpus=8
    require_token: bool = True         # joining a cluster (an address) needs a Ray token here (docs/scaling.md)


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=RayLauncherConf, provider="sdxl-lora-sweep")


class RayLauncher(DelegatingLauncher):
    def __init__(self, address: Optional[str] = None, num_gpus: Optional[float] = None, num_cpus: float = 1,
                 max_retries: int = 1, runtime_env: Any = None, init: Any = None, pack_size: int = 8,
                 require_token: bool = True) -> None:
        from sweep.launchers.ray import RayLauncher as Impl

        self.impl = Impl(address, num_gpus, num_cpus, max_retries, runtime_env, init, pack_size, require_token)
