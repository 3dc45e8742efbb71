"""`hydra/launcher=packed` (the default): the jobs of a batch train together as packs (work in sweep/launchers/packing.py)."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from . import DelegatingLauncher


@dataclass
class PackingLauncherConf:
    _target_: str = "hydra_plugins.sdxl_lora_sweep.packing_launcher.PackingLauncher"
    pack_size: int = 8  # trainings (with the trials each serves) handed to one training call (see train.max_pack)


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackingLauncherConf,
                             provider="sdxl-lora-sweep")


class PackingLauncher(DelegatingLauncher):
    def __init__(self, pack_size: int = 8) -> None:
        from sweep.launchers.packing import PackingLauncher as Impl

        self.impl = Impl(pack_size)
