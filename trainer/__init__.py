"""DreamBooth-LoRA training (diffusers + peft + accelerate) of any model family (families/: SDXL, ...). Knows nothing of
Hydra or MLflow."""
from common.errors import (ConfigError, DataError, DeviceError, DiskFullError, ModelSourceError, NonFiniteLossError,
                           UserError)

from .config import DataConfig, LoraSettings, ModelConfig, TrainConfig, training_config_hash, validate
from .lone import optimizer_problem
from .loop import TrialResult, TrialSpec, instance_photos, train

__all__ = [
    "ConfigError", "DataConfig", "DataError", "DeviceError", "DiskFullError", "LoraSettings", "ModelConfig", "ModelSourceError",
    "NonFiniteLossError", "TrainConfig", "TrialResult", "TrialSpec", "UserError", "instance_photos",
    "optimizer_problem", "train",
    "training_config_hash", "validate",
]
