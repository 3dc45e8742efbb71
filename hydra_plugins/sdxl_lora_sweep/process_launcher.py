"""`hydra/launcher=processes`: every job in a fresh process, several at a time (the work is in sweep/launchers/process.py)."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

from . import DelegatingLauncher


@dataclass
class ProcessLauncherConf:
    _target_: str = "hydra_plugins.sdxl_lora_sweep.process_launcher.ProcessLauncher"
    n_workers: int = 2   # jobs at a time, for a sweeper that hands over several at once (the grid)
    gpus: Any = None     # null | auto | [0, 1, ...]: one job per GPU, each pinned to a free one (n_workers ignored)


ConfigStore.instance().store(group="hydra/launcher", name="processes", node=ProcessLauncherConf,
                             provider="sdxl-lora-sweep")


class ProcessLauncher(DelegatingLauncher):
    def __init__(self, n_workers: int = 2, gpus: Any = None) -> None:
        from sweep.launchers.process import ProcessPoolLauncher

        self.impl = ProcessPoolLauncher(n_workers, gpus)
