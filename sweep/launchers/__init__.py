"""How a sweep's jobs run: processes (one per GPU), packs in one process, a Ray cluster; and finding a sweep's
folder again to resume it."""
from __future__ import annotations

from omegaconf import DictConfig

from common.errors import ConfigError, UserError


def check_launcher(config: DictConfig) -> None:
    """The sweep's launcher built from its settings, as Hydra will build it: a bad setting (`pack_size=0`,
    `gpus=auto` on a machine without a GPU) is refused here, before the sweep's folder and MLflow run exist. Hydra
    builds the launcher only after the callbacks' `on_multirun_start`, and wraps its error in its own."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if str(config.hydra.launcher.get("_target_", "")).startswith("hydra._internal."):
        return  # Hydra's own (basic) launcher: no setting to check, and hydra-core >= 1.3.8 refuses to build it here
    try:
        instantiate(config.hydra.launcher)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, (ValueError, UserError)):
            raise ConfigError([str(exc.__cause__)]) from None
        raise
