"""The champion's LoRA in the MLflow model registry (the mlflow.diffusers flavour's layout, read back as data, never
through MLflow's loaders: tracking/weights.py): one registered model per subject, named for its token and class
(`sdxl-lora-sks-woman`, or tracking.registered_model), the photos' fingerprint on the model and each version. Alias
`champion` is the rule's pick until a person promotes a version (sweep.promote); from then on only a person moves
it, and a later sweep's best that beats it under the rule gets alias `challenger` instead. A later best takes
`champion` (when no person picked it) only if the selection rule, applied to its raw metrics and to the champion's
(stored as JSON tags on the champion's version), prefers it, on the same evaluation protocol; a best that does not
win is not registered at all (its LoRA stays in its MLflow run's best_checkpoint artifact). Registering is
idempotent: a LoRA (its sha256 and strength) already registered under the model is that version, never a new one; a
version is created with all its tags at once, before any alias moves to it."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import faults
from common.device import resolve_device
from common.errors import UserError
from common.lorafile import EXPORT_RECORD, CheckpointRecord
from common.metrics import CLIP_T
from evaluation.config import SPEED_ONLY
from trainer import instance_photos
from trainer.config import stable_hash
from trainer.models import resolve_source

from ..config import SweepConfig, TrackingConfig, resolve_path
from ..markdown import text
from ..metrics import metrics_from_json, metrics_json
from ..selection import Candidate, SelectionConfig, checkpoint_score, objective_name, select
from . import permitted

log = logging.getLogger(__name__)
ALIAS, CHALLENGER = "champion", "challenger"
SUBJECT_TAG, PHOTOS_TAG = "subject", "subject.photos_sha256"  # on the registered model and on each version
PREFIX = "sdxl-lora-"
MODEL_VERSIONS = "mlflow.modelVersions"  # on a LoggedModel: the registered versions made from it


# Bumped whenever an objective's definition changes, so that champions scored under the old one count as another
# protocol. 2: objectives are pool-independent (weighted_score on fixed metric units, selection.METRICS); before,
# the weighted rule min-max normalised each sweep's pool and its stored objectives do not compare. 3: the photos
# are their bytes' fingerprint, not their folder's path.
PROTOCOL_VERSION = 3
METRICS_TAG, BASELINE_TAG = "metrics", "baseline"  # JSON on each registered version: what the rule is applied to


@dataclass(frozen=True)
class Subject:
    """Who a sweep trained on: the phrase prompts use for it ("sks woman") and its photos' fingerprint."""

    phrase: str
    photos: str  # sha256 over the sorted sha256 of each instance photo's bytes; "" when they cannot be read

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.phrase.lower()).strip("-") or "subject"


def photos_fingerprint(conf: SweepConfig) -> str:
    """A hash of the instance photos' bytes (order and file names do not matter); "" when they cannot be read."""
    try:
        shas = sorted(p.sha256 for p in instance_photos(conf.data))
    except (UserError, OSError):
        return ""
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()


def subject_of(conf: SweepConfig) -> Subject:
    token = conf.eval.subject_token or conf.data.subject_token
    return Subject(" ".join(w for w in (token, conf.eval.class_noun) if w), photos_fingerprint(conf))


def model_name(conf: SweepConfig, client, subject: Subject) -> str:
    """The subject's registered model: tracking.registered_model when set; else <family>-lora-<token>-<class>
    (sdxl-lora-sks-woman, flux-lora-sks-woman: a FLUX LoRA never competes for an SDXL champion's alias), unless
    that name holds another set of photos (same token and class, other photos' fingerprint): then
    <family>-lora-<token>-<class>-<first 8 hex digits of the fingerprint>, another subject's model. Never touches
    the store."""
    if conf.tracking.registered_model:
        return conf.tracking.registered_model
    name = f"{conf.model.family}-lora-{subject.slug}"  # PREFIX + slug for SDXL, as before
    try:
        held = client.get_registered_model(name).tags.get(PHOTOS_TAG, "")
    except Exception:  # no such model yet
        return name
    return f"{name}-{subject.photos[:8]}" if held and subject.photos and held != subject.photos else name


def protocol(conf: SweepConfig, photos: str | None = None) -> str:
    """What makes two objectives comparable: prompts, seeds, steps, scorers, the subject's photos (their bytes), the
    base, the rule and the objective's definition (PROTOCOL_VERSION)."""
    ev = {k: v for k, v in asdict(conf.eval).items() if k not in ("device", "batch_size", "enabled", *SPEED_ONLY)}
    return stable_hash({"protocol_version": PROTOCOL_VERSION, "eval": ev,
                        "photos": photos if photos is not None else photos_fingerprint(conf),
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


def alias_version(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # no model or no alias yet
        return None


def find_version(client, name: str, lora_sha: str, scale: float):
    """The version of `name` that holds this LoRA at this strength, if one was registered (by this sweep before it
    was interrupted, or by another sweep of the same checkpoint): registering again reuses it."""
    try:
        versions = client.search_model_versions(f"name='{_quoted(name)}'")
    except Exception:
        return None
    same = [v for v in versions if v.tags.get("lora_sha256") == lora_sha
            and float(v.tags.get("lora_scale", 1.0)) == float(scale)]
    return min(same, key=lambda v: int(v.version)) if same else None


def _quoted(name: str) -> str:
    return name.replace("'", "\\'")


def _ensure_model(client, name: str, subject: Subject) -> None:
    """The registered model with its subject and photos' fingerprint (created once; tags kept as first set)."""
    try:
        model = client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, tags={SUBJECT_TAG: subject.phrase, PHOTOS_TAG: subject.photos},
                                       description="SDXL DreamBooth LoRA champions of "
                                                   + text(subject.phrase or "a subject"))
        return
    if not model.tags.get(PHOTOS_TAG) and subject.photos:  # registered before fingerprints were recorded
        client.set_registered_model_tag(name, SUBJECT_TAG, subject.phrase)
        client.set_registered_model_tag(name, PHOTOS_TAG, subject.photos)


def register_champion(tracker, conf: SweepConfig, parent_run_id: str, champion: Candidate, baseline: dict,
                      exported: Path | None = None, review: dict | None = None, name: str | None = None,
                      model_id: str | None = None) -> dict:
    """Register the sweep's best under its subject's model and move an alias to it as the rules in the module's
    docstring say; returns the tags for the sweep's parent run, with what was done: registry.model,
    registry.alias (champion, challenger or ""), registry.version, registry.decision, registry.champion_version.
    `exported`: its export folder (sweep/export/: the web-UI file, the model card, the grids), registered with it.
    `review`: a person's pick being applied now (sweep.promote: {"by", "reason", ...}), which takes `champion`
    whatever the rule says; its version carries who and why (tags review.*). Safe to repeat: the same LoRA is the
    same version, an alias already there is not moved again. A user the server does not let change the model gets
    AccessDenied, naming the permission to ask for. `model_id`: the champion checkpoint's LoggedModel
    (tracking/models.py), which a new version is registered from; None: a LoggedModel of its own on the parent run."""
    subject = subject_of(conf)
    name = name or model_name(conf, tracker.client, subject)
    with permitted(tracker.uri, f"register versions of model {name} nor move its aliases ({ALIAS}, {CHALLENGER})",
                   f"EDIT on registered model {name}"):
        return _register(tracker.client, conf, parent_run_id, champion, baseline, exported, review, name, subject,
                         model_id)


def _register(client, conf: SweepConfig, parent_run_id: str, champion: Candidate, baseline: dict,
              exported: Path | None, review: dict | None, name: str, subject: Subject, model_id: str | None) -> dict:
    proto = protocol(conf, subject.photos)
    _ensure_model(client, name, subject)
    current = alias_version(client, name, ALIAS)
    lora_sha = CheckpointRecord.read(Path(champion.checkpoint)).lora_sha256
    existing = find_version(client, name, lora_sha, champion.scale)
    decision = judge(current.tags if current else None, current.version if current else None, champion, lora_sha,
                     baseline, conf.selection, proto)
    pinned = current is not None and bool(current.tags.get("review.by"))
    is_champion = current is not None and existing is not None and existing.version == current.version
    if review is not None:
        alias, reason = ALIAS, f"promoted by {review['by']}: {review['reason']}"
    elif is_champion:
        alias, reason = ALIAS, f"it is the champion already (version {current.version})"
    elif pinned and decision.replace:
        alias = CHALLENGER
        reason = (decision.reason.replace(", so the new best takes the alias", "")
                  + f"; version {current.version} is a person's pick ({current.tags['review.by']}), which only a "
                    "person replaces: registered with alias `challenger`")
    else:
        alias, reason = (ALIAS if decision.replace else ""), decision.reason
    tags = {"registry.model": name, "selection.objective": objective_name(conf.selection), **decision.tags,
            "registry.decision": reason, "registry.alias": alias}
    if decision.tags.get("registry.protocol_changed") and not is_champion:
        log.warning("registry %s: %s", name, reason)
    if not alias:
        log.info("registry %s: the sweep's best %s is not registered: %s", name, champion.key, reason)
        return {**tags, "champion_replaced": False,
                "registry.champion_version": str(current.version) if current else ""}
    version = existing.version if existing is not None else _create_version(
        client, conf, name, parent_run_id, champion, baseline, exported, lora_sha, proto, subject,
        decision.tags["challenger_objective"], model_id)
    version = str(version)
    faults.hit("registry_version")  # the version exists with its tags; no alias on it yet (tests/test_promote.py)
    if review is not None:
        _set_review(client, name, version, review)
    moved = (alias_version(client, name, alias) or _NoVersion).version != version
    if moved:
        client.set_registered_model_alias(name, alias, version)
    if alias == ALIAS and (alias_version(client, name, CHALLENGER) or _NoVersion).version == version:
        client.delete_registered_model_alias(name, CHALLENGER)  # the challenger became the champion
    faults.hit("registry_alias")  # the alias is on it (tests/test_promote.py)
    champion_version = version if alias == ALIAS else str(current.version)
    if moved:
        log.info("registry %s: version %s (%s) has alias %s: %s", name, version, champion.key, alias, reason)
    return {**tags, "registry.version": version, "champion_replaced": alias == ALIAS and moved,
            "registry.champion_version": champion_version}


class _NoVersion:
    version = None


def _create_version(client, conf: SweepConfig, name: str, parent_run_id: str, champion: Candidate, baseline: dict,
                    exported: Path | None, lora_sha: str, proto: str, subject: Subject, objective: float,
                    model_id: str | None = None) -> str:
    """Log the LoRA (and its export) as a diffusers model and register it as a new version of `name`, every tag set
    in the same request that creates it (no version without its tags). With `model_id` (the champion checkpoint's
    LoggedModel), the flavour's files go into that model, so that the version's model_id is the checkpoint's; else
    into a new LoggedModel of the sweep's parent run."""
    import mlflow

    ckpt = Path(champion.checkpoint)
    base = resolve_source(conf.model, resolve_path(conf.paths, conf.paths.cache_dir))
    webui = {}
    with tempfile.TemporaryDirectory() as tmp:  # the LoRA and its record, not the optimizer state; its export
        if exported is not None and (exported / EXPORT_RECORD).is_file():
            record = json.loads((exported / EXPORT_RECORD).read_text())
            for f in [*record.get("files", {}), EXPORT_RECORD]:  # what the export wrote, never a person's file
                if (exported / f).is_file() and not (exported / f).is_symlink():
                    (Path(tmp) / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(exported / f, Path(tmp) / f)
            if record.get("webui_file"):
                webui = {"webui_file": record["webui_file"], "webui_sha256": record["files"][record["webui_file"]]}
        for f in ("pytorch_lora_weights.safetensors", "checkpoint.json"):
            shutil.copy2(ckpt / f, Path(tmp) / f)
        gen = generation_settings(conf, champion, base)  # served and `sweep.generate` defaults (issue 18)
        flavour = {"adapter_path": tmp, "base_model": base, "adapter_type": "lora",
                   "signature": serving_signature(gen), "metadata": {"generation": gen}}
        if model_id:  # no active run: the checkpoint's metrics stay its own (log_model copies a run's into it)
            info = mlflow.diffusers.log_model(**flavour, model_id=model_id)
        else:
            with mlflow.start_run(run_id=parent_run_id):
                info = mlflow.diffusers.log_model(**flavour, name="champion_lora")
    tags = {GENERATION_TAG: json.dumps(gen, sort_keys=True), "objective": objective,
            "objective_name": objective_name(conf.selection), "protocol": proto, "protocol_version": PROTOCOL_VERSION,
            "checkpoint": str(ckpt), "trial": champion.trial, "step": champion.step, "lora_scale": champion.scale,
            "lora_sha256": lora_sha, METRICS_TAG: metrics_json(champion.metrics), BASELINE_TAG: metrics_json(baseline),
            SUBJECT_TAG: subject.phrase, PHOTOS_TAG: subject.photos, **webui}
    # the version's run is the sweep's (where its registration is recorded), its model the checkpoint's: its source
    # is models:/<model id> (MLflow's SQL store keeps no model_id column on versions), and the model's tag
    # mlflow.modelVersions names the version (the Models tab's "Registered models"), as mlflow.register_model does
    mv = client.create_model_version(name, info.model_uri, run_id=parent_run_id, model_id=info.model_id,
                                     tags={k: str(v) for k, v in tags.items()})
    held = json.loads(client.get_logged_model(info.model_id).tags.get(MODEL_VERSIONS, "[]"))
    client.set_logged_model_tags(info.model_id, {MODEL_VERSIONS: json.dumps(
        [*held, {"name": name, "version": mv.version}])})
    return str(mv.version)


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
    """The flavour's signature with the evaluation's settings as the request defaults, for MLflow's own tools
    (their defaults otherwise: 512 px, 30 steps); sweep.generate and sweep.serve read the `generation` tag."""
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


class WhichSubject(UserError):
    """Several subjects have a champion in the store and the command did not say which one."""


def subjects(store: str) -> list[tuple[str, str, str]]:
    """(registered model, subject phrase, champion version) for every model in the store with a `champion` alias."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    out = []
    for m in client.search_registered_models(max_results=1000):
        if ALIAS in (m.aliases or {}):
            out.append((m.name, m.tags.get(SUBJECT_TAG, ""), str(m.aliases[ALIAS])))
    return sorted(out)


def champion_uri(store: str, subject: str | None = None, model: str | None = None) -> str:
    """The registered champion to use: `model` (a models:/ URI or a registered model's name) as given; else the one
    whose subject phrase, model name or its slug matches `subject`; else the store's only one. Several and none
    named: WhichSubject listing them, with how to name one."""
    if model:
        return model if model.startswith("models:/") else f"models:/{model}@{ALIAS}"
    found = subjects(store)
    if subject:
        slug = Subject(subject, "").slug
        found = [f for f in found if subject in (f[0], f[1]) or f[0] in (PREFIX + slug, slug)]
        if not found:
            raise WhichSubject(f"subject={subject!r}: no registered champion of that subject in {store}; the store "
                               f"holds: {_listing(subjects(store)) or 'none'}")
    if len(found) == 1:
        return f"models:/{found[0][0]}@{ALIAS}"
    if not found:
        raise SystemExit(f"no registered champion in the store {store}. Run a sweep in this folder first (python -m "
                         "sweep -m lr=1e-4,1e-5,5e-4 registers its champion), or pass tracking_uri=<the sweep's store> "
                         "/ model=models:/<name>/<version>")
    raise WhichSubject(f"{len(found)} subjects have a champion in {store}: {_listing(found)}. Say which one: "
                       f"subject=\"{found[0][1] or found[0][0]}\" or model={found[0][0]}")


def _listing(found: list[tuple[str, str, str]]) -> str:
    return "; ".join(f"{name} ({phrase or 'subject not recorded'}, version {v})" for name, phrase, v in found)


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
