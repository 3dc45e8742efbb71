"""`hydra/launcher=slurm` (and `slurm_local`, its local executor, to try it on one machine): Hydra's submitit
launcher with one Slurm job per batch of the plan, whose trials train together as packs (the work is in
sweep/launchers/submitit.py). Registered only where hydra-submitit-launcher is installed (`pip install -e '.[slurm]'`)."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

from . import DelegatingLauncher

try:
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
except ImportError:  # the [slurm] extra is not installed: no such launcher
    LocalQueueConf = SlurmQueueConf = None

if SlurmQueueConf is not None:
    @dataclass
    class PackedSlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.sdxl_lora_sweep.submitit_launcher.PackedSlurmLauncher"
        pack_size: int = 8  # trainings (with the trials each serves) per Slurm job; 1: a Slurm job per trial

    @dataclass
    class PackedLocalConf(LocalQueueConf):
        _target_: str = "hydra_plugins.sdxl_lora_sweep.submitit_launcher.PackedLocalLauncher"
        pack_size: int = 8

    ConfigStore.instance().store(group="hydra/launcher", name="slurm", node=PackedSlurmConf,
                                 provider="sdxl-lora-sweep")
    ConfigStore.instance().store(group="hydra/launcher", name="slurm_local", node=PackedLocalConf,
                                 provider="sdxl-lora-sweep")


class PackedSlurmLauncher(DelegatingLauncher):
    executor = "slurm"

    def __init__(self, **params: Any) -> None:
        from sweep.launchers.submitit import PackedSubmititLauncher

        self.impl = PackedSubmititLauncher(self.executor, **params)


class PackedLocalLauncher(PackedSlurmLauncher):
    executor = "local"
