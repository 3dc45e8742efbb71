"""The champion's LoRA in the MLflow model registry (mlflow.diffusers flavour: `mlflow models serve` generates
from it), under the alias `champion`. A later sweep's best takes the alias only if the selection rule, applied to
its raw metrics and to the champion's (stored as JSON tags on the champion's version), prefers it, on the same
evaluation protocol; a best that does not win is not registered at all (its LoRA stays in its MLflow run's
best_checkpoint artifact). Both objectives are recorded on the sweep's parent run."""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.device import resolve_device
from common.lorafile import EXPORT_RECORD, CheckpointRecord
from common.metrics import CLIP_T
from evaluation.config import SPEED_ONLY
from evaluation.generate import EvalInputError, verify_hash
from trainer.config import stable_hash
from trainer.models import resolve_source

from ..config import SweepConfig, TrackingConfig, resolve_path
from ..metrics import metrics_from_json, metrics_json
from ..selection import Candidate, SelectionConfig, checkpoint_score, objective_name, select

log = logging.getLogger(__name__)
ALIAS = "champion"


# Bumped whenever an objective's definition changes, so that champions scored under the old one count as another
# protocol. 2: objectives are pool-independent (weighted_score on fixed metric units, selection.METRICS); before,
# the weighted rule min-max normalised each sweep's pool and its stored objectives do not compare.
PROTOCOL_VERSION = 2
METRICS_TAG, BASELINE_TAG = "metrics", "baseline"  # JSON on each registered version: what the rule is applied to


def protocol(conf: SweepConfig) -> str:
    """What makes two objectives comparable: prompts, seeds, steps, scorers, the subject's photos, the base, the rule
    and the objective's definition (PROTOCOL_VERSION)."""
    ev = {k: v for k, v in asdict(conf.eval).items() if k not in ("device", "batch_size", "enabled", *SPEED_ONLY)}
    return stable_hash({"protocol_version": PROTOCOL_VERSION, "eval": ev,
                        "instance_dir": str(Path(conf.data.instance_dir).resolve()),
                        "model": asdict(conf.model), "selection": asdict(conf.selection)})


@dataclass
class Decision:
    """Whether a sweep's best takes the alias, why, and the tags for the sweep's parent run."""

    replace: bool
    reason: str
    tags: dict = field(default_factory=dict)


def judge(current: dict | None, current_version: str | None, challenger: Candidate, challenger_sha: str,
          baseline: dict, cfg: SelectionConfig, proto: str) -> Decision:
    """Champion (its version's tags, None if there is none) against a sweep's best: the selection rule applied to
    both raw metric sets against this sweep's baseline, never numbers normalised in different pools. A tie on all
    the rule looks at but the trial name keeps the champion."""
    tags = {"challenger_objective": checkpoint_score(challenger, baseline, cfg)}
    if current is None:
        return Decision(True, "there is no champion yet", tags)
    tags["champion_objective"] = current.get("objective", "")
    if current.get("protocol") != proto or METRICS_TAG not in current:
        tags["registry.protocol_changed"] = True
        return Decision(True, f"the champion (version {current_version}) was scored under another evaluation "
                              "protocol (eval settings, photos, base model, selection rule or objective definition): "
                              "its numbers are not comparable, so the new best takes the alias", tags)
    tags["registry.protocol_changed"] = False
    incumbent = Candidate(current.get("trial", "champion"), int(current.get("step", 0)),
                          metrics_from_json(current[METRICS_TAG]), current.get("checkpoint", ""),
                          scale=float(current.get("lora_scale", 1.0)))
    tags["champion_objective"] = checkpoint_score(incumbent, baseline, cfg)  # the same scale, this baseline
    if current.get("lora_sha256") == challenger_sha and incumbent.scale == challenger.scale:
        return Decision(False, f"it is the champion's LoRA already (version {current_version})", tags)
    sel = select([incumbent, challenger], baseline, cfg)
    name = objective_name(cfg)
    same = lambda c: (checkpoint_score(c, baseline, cfg), c.metrics.get(CLIP_T), c.step)
    if sel.champion is challenger and same(challenger) != same(incumbent):  # not on the trial name alone
        return Decision(True, f"it beats champion version {current_version} under {cfg.rule} ({name} "
                              f"{tags['challenger_objective']:.4f} vs {tags['champion_objective']:.4f})", tags)
    return Decision(False, f"it does not beat champion version {current_version} under {cfg.rule} ({name} "
                           f"{tags['challenger_objective']:.4f} vs {tags['champion_objective']:.4f}); "
                           "not registered: its LoRA stays in its run's best_checkpoint artifact", tags)


def register_champion(tracker, conf: SweepConfig, parent_run_id: str, champion: Candidate, baseline: dict,
                      exported: Path | None = None, review: dict | None = None) -> dict:
    """Register the sweep's best and give it the alias if it beats the current champion (see `judge`); returns the
    tags for the sweep's parent run. `exported`: its export folder (sweep/export/: the web-UI file, the model card,
    the grids), registered with it. `review`: a person's pick (sweep.promote: {"by", "reason", ...}), which takes the
    alias whatever the rule says; its version carries who and why (tags review.*)."""
    import mlflow

    client, name = tracker.client, conf.tracking.registered_model
    proto = protocol(conf)
    try:
        current = client.get_model_version_by_alias(name, ALIAS)
    except Exception:  # no model or no alias yet
        current = None
    ckpt = Path(champion.checkpoint)
    lora_sha = CheckpointRecord.read(ckpt).lora_sha256
    decision = judge(current.tags if current else None, current.version if current else None, champion, lora_sha,
                     baseline, conf.selection, proto)
    already = current is not None and current.tags.get("lora_sha256") == lora_sha and \
        float(current.tags.get("lora_scale", 1.0)) == champion.scale
    if review is not None:  # a person's pick takes the alias, unless it holds it already
        decision = Decision(not already, f"promoted by {review['by']}: {review['reason']}", decision.tags)
    objective = decision.tags["challenger_objective"]
    tags = {"registry.model": name, "selection.objective": objective_name(conf.selection), **decision.tags,
            "registry.decision": decision.reason}
    if decision.tags.get("registry.protocol_changed"):
        log.warning("registry %s: %s", name, decision.reason)
    if not decision.replace:
        if review is not None:  # promoted again: its version carries the latest review
            _set_review(client, name, str(current.version), review)
        log.info("registry %s: the sweep's best %s is not registered: %s", name, champion.key, decision.reason)
        return {**tags, "champion_replaced": False, "registry.champion_version": str(current.version)}
    base = resolve_source(conf.model, resolve_path(conf.paths, conf.paths.cache_dir))
    webui = {}
    with tempfile.TemporaryDirectory() as tmp:  # the LoRA and its record, not the optimizer state; its export
        if exported is not None and (exported / EXPORT_RECORD).is_file():
            shutil.copytree(exported, tmp, dirs_exist_ok=True)
            record = json.loads((exported / EXPORT_RECORD).read_text())
            if record.get("webui_file"):
                webui = {"webui_file": record["webui_file"], "webui_sha256": record["files"][record["webui_file"]]}
        for f in ("pytorch_lora_weights.safetensors", "checkpoint.json"):
            shutil.copy2(ckpt / f, Path(tmp) / f)
        with mlflow.start_run(run_id=parent_run_id):
            gen = generation_settings(conf, champion, base)  # served and `sweep.generate` defaults (issue 18)
            info = mlflow.diffusers.log_model(adapter_path=tmp, base_model=base, adapter_type="lora",
                                              name="champion_lora", registered_model_name=name,
                                              signature=serving_signature(gen), metadata={"generation": gen})
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, GENERATION_TAG, json.dumps(gen, sort_keys=True))
    for k, v in {"objective": objective, "objective_name": objective_name(conf.selection), "protocol": proto,
                 "protocol_version": PROTOCOL_VERSION, "checkpoint": str(ckpt), "trial": champion.trial,
                 "step": champion.step, "lora_scale": champion.scale, "lora_sha256": lora_sha,
                 METRICS_TAG: metrics_json(champion.metrics),
                 BASELINE_TAG: metrics_json(baseline), **webui}.items():
        client.set_model_version_tag(name, version, k, str(v))
    if review is not None:
        _set_review(client, name, version, review)
    client.set_registered_model_alias(name, ALIAS, version)
    log.info("registry %s: version %s (%s) is the new champion: %s", name, version, champion.key, decision.reason)
    return {**tags, "registry.version": version, "champion_replaced": True, "registry.champion_version": version}


def _set_review(client, name: str, version: str, review: dict) -> None:
    """A person's pick on its version: who, why, and whether the rule had picked the same."""
    for k in ("by", "reason", "rule_pick", "agreed"):
        client.set_model_version_tag(name, version, f"review.{k}", str(review.get(k, ""))[:4000])


GENERATION_TAG = "generation"  # JSON on each registered version: what the champion was evaluated with


def generation_settings(conf: SweepConfig, champion: Candidate, base: str) -> dict:
    """How the champion's images were made when it was scored (evaluation/generate.py: conf.eval's resolution,
    steps, guidance, LoRA scale and seeds, with the base pipeline's own scheduler), and how long one image took
    there (the trial's eval/metrics.json), so that generating and serving default to the same: the LoRA at the
    strength the champion was chosen at."""
    ev = conf.eval
    gen = {"resolution": int(ev.resolution), "num_inference_steps": int(ev.num_inference_steps),
           "guidance_scale": float(ev.guidance_scale), "lora_scale": float(champion.scale),
           "seed": int(ev.seeds[0]) if ev.seeds else None, "scheduler": _scheduler_name(base),
           "device": resolve_device(ev.device, "eval.device").type, "seconds_per_image": None}
    ckpt = Path(champion.checkpoint)
    try:  # {"seconds": {"step-000030": {"images": 6, "generate_s": 1.9, ...}}} beside the trial's checkpoints
        took = json.loads((ckpt.parent.parent / "eval" / "metrics.json").read_text())["seconds"][champion.entry]
        if took["images"]:
            gen["seconds_per_image"] = round(took["generate_s"] / took["images"], 3)
    except (OSError, KeyError, TypeError, ValueError):
        pass  # not measured (e.g. scored after an interruption elsewhere): generate says it cannot estimate
    return gen


def _scheduler_name(base: str) -> str | None:
    """The scheduler class in the base pipeline's model_index.json (what evaluation generates with)."""
    try:
        index = Path(base) / "model_index.json"
        if not index.is_file():
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(base, "model_index.json", local_files_only=True))
        return json.loads(index.read_text())["scheduler"][1]
    except Exception:
        return None


def serving_signature(gen: dict):
    """The flavour's signature with the evaluation's settings as the request defaults: `mlflow models serve`
    and pyfunc predict fill params a request leaves out from these (the flavour's own: 512 px, 30 steps)."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import ColSpec

    return ModelSignature(
        inputs=Schema([ColSpec(type=DataType.string, name="prompt")]),
        outputs=Schema([ColSpec(type=DataType.binary, name="image")]),
        params=ParamSchema([
            ParamSpec(name="num_inference_steps", dtype=DataType.integer, default=gen["num_inference_steps"]),
            ParamSpec(name="guidance_scale", dtype=DataType.double, default=gen["guidance_scale"]),
            ParamSpec(name="height", dtype=DataType.integer, default=gen["resolution"]),
            ParamSpec(name="width", dtype=DataType.integer, default=gen["resolution"]),
            ParamSpec(name="negative_prompt", dtype=DataType.string, default=""),
        ]))


# reading it back: generate, export -----------------------------------------------------------------------
def default_store() -> str:
    """The project's store, as the sweep writes it (tracking.uri or <paths.root>/mlruns/mlflow.db, root '.'),
    without creating it here."""
    cfg = TrackingConfig()
    if cfg.uri:
        return cfg.uri
    db = Path("mlruns", "mlflow.db").resolve()
    if not db.is_file():
        raise SystemExit(f"no MLflow store here: {db} does not exist (the registered champion is read from the "
                         "store of the folder it runs in): run it from the folder you ran `python -m sweep` in, or pass "
                         f"tracking_uri=sqlite:///<that folder>/mlruns/mlflow.db")
    return f"sqlite:///{db}"


def registered_version(uri: str, store: str):
    """The model version `uri` names (models:/name@alias or models:/name/N), None for other URIs; a clear error
    when the store has no such version."""
    if not uri.startswith("models:/"):
        return None
    from mlflow import MlflowClient

    client = MlflowClient(store)
    name, _, alias = uri[len("models:/"):].partition("@")
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        name, _, number = uri[len("models:/"):].partition("/")
        if number == "latest":
            return max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        return client.get_model_version(name, number)
    except Exception as exc:
        raise SystemExit(f"no registered model version {uri} in the store {store} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}). Run a sweep in this folder first (python -m sweep -m "
                         "lr=1e-4,1e-5,5e-4 registers its champion), or pass tracking_uri=<the sweep's store> / "
                         "model=models:/<name>/<version>") from None


def verify_registered(uri: str, local: Path, version=None) -> None:
    """The downloaded LoRA files against the sha256 recorded on its model version (and beside them, in
    checkpoint.json and export.json): the diffusers file, and the web-UI file when the version has one."""
    tags = version.tags if version is not None else {}
    for name, tag in (("pytorch_lora_weights.safetensors", "lora_sha256"), (tags.get("webui_file"), "webui_sha256")):
        if not name:
            continue
        files = list(local.rglob(name))
        if not files:
            raise SystemExit(f"{uri}: no {name} in the registered model")
        try:
            verify_hash(files[0], tags.get(tag))  # against the version's tag and the record beside the file
        except EvalInputError as exc:
            raise SystemExit(f"{uri}: {exc}") from None
