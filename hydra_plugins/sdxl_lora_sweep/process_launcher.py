"""`hydra/launcher=processes`: every batch of the plan in a fresh process, several at a time (the work is in sweep/launchers/process.py)."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

from . import DelegatingLauncher


@dataclass
class ProcessLauncherConf:
    _target_: str = "hydra_plugins.sdxl_lora_sweep.process_launcher.ProcessLauncher"
    n_workers: int = 2   # batches (processes) at a time
    gpus: Any = None     # null | auto | [0, 1, ...]: one batch per GPU, each pinned to a free one (n_workers ignored)
    pack_size: int = 8   # trainings (with the trials each serves) in one batch, trained together; 1: each job alone
    max_retries: int = 1  # new processes for a batch whose process died (its trials resume); 0: they fail


ConfigStore.instance().store(group="hydra/launcher", name="processes", node=ProcessLauncherConf,
                             provider="sdxl-lora-sweep")


class ProcessLauncher(DelegatingLauncher):
    def __init__(self, n_workers: int = 2, gpus: Any = None, pack_size: int = 8, max_retries: int = 1) -> None:
        from sweep.launchers.process import ProcessPoolLauncher

        self.impl = ProcessPoolLauncher(n_workers, gpus, pack_size, max_retries)
