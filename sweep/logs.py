"""The console a user reads: each trial's log lines say which trial they belong to (jobs of a multirun run in
threads, sweep/launchers/packing.py), and known third-party noise is silenced where it starts."""
from __future__ import annotations

import contextvars
import functools
import logging
import os
import warnings
from typing import Any, Callable, TypeVar

_TRIAL: contextvars.ContextVar[str] = contextvars.ContextVar("sweep_trial", default="")
F = TypeVar("F", bound=Callable[..., Any])


def set_trial(name: str) -> None:
    """Label this thread's log lines with `name` (each job of a multirun runs in its own thread or process)."""
    _TRIAL.set(name)


def current_trial() -> str:
    """The label this thread's log lines carry now ("" outside a multirun's trial)."""
    return _TRIAL.get()


def for_trial(name: str, fn: F) -> F:
    """`fn` logging as trial `name` wherever it is called: a packed batch calls every trial's checkpoint hook
    from the one thread that trains them all."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        token = _TRIAL.set(name)
        try:
            return fn(*args, **kwargs)
        finally:
            _TRIAL.reset(token)

    return call  # type: ignore[return-value]


class TrialFilter(logging.Filter):
    """Gives every record `trial`: "[lr=0.0001]" in a multirun's trial, "" outside one (conf/hydra/default.yaml
    puts it in the job log format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        label = _TRIAL.get()
        record.trial = f"[{label}]" if label else ""
        return True


class _DropTorchvisionFallback(logging.Filter):
    """transformers says, once per class, that it uses the PIL image processor because torchvision is absent:
    that is the processor this project wants (evaluation/clip.py asks for it by name), and diffusers' imports
    trigger the notice for classes it never uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


class _DropLocalVersionLabel(logging.Filter):
    """MLflow warns, on every registration, that torch's version carries a local label (`2.13.0+cpu`, `+cu128`)
    and records the requirement without it: which is what a served model should install anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "contains a local version label" not in record.getMessage()


def drop_known_notices() -> None:
    """Filters for known noise, installed before anything imports transformers or mlflow (`import sweep` does): the
    torchvision fallback notice, mlflow's per-run "Skip logging GPU metrics" on a machine without a GPU, and its
    torch local-version-label warning at registration. Idempotent; imports nothing."""
    t_log = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionFallback) for f in t_log.filters):
        t_log.addFilter(_DropTorchvisionFallback())
    logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.WARNING)
    req_log = logging.getLogger("mlflow.utils.requirements_utils")
    if not any(isinstance(f, _DropLocalVersionLabel) for f in req_log.filters):
        req_log.addFilter(_DropLocalVersionLabel())


def quiet_third_party() -> None:
    """The known notices dropped (drop_known_notices), and the weight loading/saving bars of transformers and
    diffusers off (the project's own training and scoring bars stay). Idempotent; imports transformers and
    diffusers."""
    drop_known_notices()
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def quiet_for_generation() -> None:
    """One image from a LoRA that trains only the UNet: the libraries' notes about it (no text-encoder LoRA keys,
    mlflow's flavour passing a deprecated `torch_dtype`) are not the user's business."""
    quiet_third_party()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file fetched from the store
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated", category=FutureWarning)
