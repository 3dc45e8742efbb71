"""The champion's LoRA in the MLflow model registry (mlflow.diffusers flavour: `mlflow models serve` generates
from it), under the alias `champion`. A later sweep moves the alias only if its best beats the current
champion on the same evaluation protocol; both numbers are recorded."""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from evaluation.config import SPEED_ONLY
from trainer.checkpoint import CheckpointRecord
from trainer.config import stable_hash
from trainer.models import resolve_source

from .config import SweepConfig, resolve_path
from .selection import Candidate

log = logging.getLogger(__name__)
ALIAS = "champion"


def protocol(conf: SweepConfig) -> str:
    """What makes two objectives comparable: prompts, seeds, steps, scorers, the subject's photos, the base."""
    ev = {k: v for k, v in asdict(conf.eval).items() if k not in ("device", "batch_size", "enabled", *SPEED_ONLY)}
    return stable_hash({"eval": ev, "instance_dir": str(Path(conf.data.instance_dir).resolve()),
                        "model": asdict(conf.model), "selection": asdict(conf.selection)})


def register_champion(tracker, conf: SweepConfig, parent_run_id: str, champion: Candidate, objective: float) -> dict:
    import mlflow

    client, name = tracker.client, conf.tracking.registered_model
    proto = protocol(conf)
    try:
        current = client.get_model_version_by_alias(name, ALIAS)
    except Exception:  # no model or no alias yet
        current = None
    base = resolve_source(conf.model, resolve_path(conf.paths, conf.paths.cache_dir))
    ckpt = Path(champion.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:  # the LoRA and its record only, not the optimizer state
        for f in ("pytorch_lora_weights.safetensors", "checkpoint.json"):
            shutil.copy2(ckpt / f, Path(tmp) / f)
        with mlflow.start_run(run_id=parent_run_id):
            info = mlflow.diffusers.log_model(adapter_path=tmp, base_model=base, adapter_type="lora",
                                              name="champion_lora", registered_model_name=name)
    version = str(info.registered_model_version)
    lora_sha = CheckpointRecord.read(ckpt).lora_sha256
    for k, v in {"objective": objective, "protocol": proto, "checkpoint": str(ckpt), "trial": champion.trial,
                 "step": champion.step, "lora_sha256": lora_sha}.items():
        client.set_model_version_tag(name, version, k, str(v))
    tags = {"registry.model": name, "registry.version": version, "challenger_objective": objective}
    replace = True
    if current is not None:
        tags["champion_objective"] = current.tags.get("objective", "")
        if current.tags.get("protocol") != proto:
            log.warning("the current champion (version %s) was scored under another evaluation protocol; "
                        "its numbers are not comparable, so the new best takes the alias", current.version)
        else:
            replace = objective > float(current.tags.get("objective", "-inf"))
    if replace:
        client.set_registered_model_alias(name, ALIAS, version)
    tags["champion_replaced"] = replace
    tags["registry.champion_version"] = version if replace else current.version
    log.info("registry %s: version %s %s", name, version,
             "is the new champion" if replace else f"did not beat champion version {current.version}")
    return tags
