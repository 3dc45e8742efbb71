"""`hydra/launcher=processes`: every job in a fresh process, several at a time (the work is in sweep/launcher.py)."""

from dataclasses import dataclass
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher


@dataclass
class ProcessLauncherConf:
    _target_: str = "hydra_plugins.sdxl_lora_sweep.process_launcher.ProcessLauncher"
    n_workers: int = 2   # jobs at a time, for a sweeper that hands over several at once (the grid)


ConfigStore.instance().store(group="hydra/launcher", name="processes", node=ProcessLauncherConf,
                             provider="sdxl-lora-sweep")


class ProcessLauncher(Launcher):
    def __init__(self, n_workers: int = 2) -> None:
        from sweep.launcher import ProcessPoolLauncher

        self.impl = ProcessPoolLauncher(n_workers)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        return self.impl.launch(job_overrides, initial_job_idx)
