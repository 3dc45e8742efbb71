"""Which device a setting means: `auto` (a CUDA GPU when PyTorch sees one, else the CPU), or a torch device name."""
from __future__ import annotations

import torch

from .errors import DeviceError


def resolve_device(requested: str, setting: str = "train.device") -> torch.device:
    """`requested` as a torch device; `cuda` without a visible GPU is refused, naming `setting` and the fix."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{setting}=cuda but no CUDA GPU is visible to PyTorch (torch {torch.__version__}); use "
                          f"{setting}=cpu (tiny/demo models only) or install a CUDA build of torch")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
