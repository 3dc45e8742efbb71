"""Use a LoRA anywhere: ComfyUI, Automatic1111 and Forge (kohya's format) and diffusers, with a model card.

    python -m sweep.export                                   the registered champion (models:/sdxl-lora-<token>-<class>@champion)
    python -m sweep.export outputs/sweeps/<sweep>            a sweep's champion
    python -m sweep.export <trial>/checkpoints/step-000300   any checkpoint
    python -m sweep.export models:/sdxl-lora-sks-woman/3 format=webui dtype=bf16 out=my_lora    (__main__.py)
    python -m sweep.export out=~/ComfyUI/models/loras/sdxl format=webui     beside the LoRAs there

writes into a folder (default outputs/exports/<name>/), beside what is there (folder.py: it replaces only its own
earlier export of the same checkpoint, or with overwrite=true; never a link, never a folder):

    <name>.safetensors                  ComfyUI (models/loras, "Load LoRA"), A1111 / Forge (models/Lora, <lora:name:1>)
    pytorch_lora_weights.safetensors    diffusers (pipe.load_lora_weights(folder))
    README.md                           model card: trigger phrase, strength, metrics against the base, how it was chosen
    grid.png, baseline.png              the evaluation prompts with and without the LoRA
    export.json                         what was exported from where, and each file's sha256

Every file is the same bytes for the same checkpoint (sorted safetensors headers), so its sha256 can be checked
against the registry's. A sweep exports its champion this way into <sweep>/champion/ by itself (own=True: the
folder holds its latest export only), and the registered version carries it."""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import hf_hub_download

import families
from common.lorafile import EXPORT_RECORD, LORA_FILE, CheckpointRecord, safetensors_bytes, sha256_file
from evaluation.config import entry_name
from evaluation.generate import EvalInputError, check_lora_file
from families.kohya import WebUIExportError, adapter_config
from trainer.models import resolve_source

from .. import stored
from ..config import resolve_path, to_typed
from ..markdown import code, text
from ..metrics import fmt as fmt_value
from ..metrics import metrics_json
from ..redaction import redact_text, redact_tree
from ..results import display_name, read_result, read_scores
from ..selection import describe_rule
from .folder import sha256_of, write_export

log = logging.getLogger(__name__)

FORMATS = ("both", "webui", "diffusers")
TOOL = "sdxl_lora_sweep"  # prefix of this tool's own metadata keys


@dataclass
class Source:
    """A LoRA to export and what is known about it."""

    lora: Path  # the diffusers file (its hash verified)
    trial: str
    step: int
    metrics: dict = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)
    conf: object = None  # the trial's SweepConfig, when its folder is at hand
    created: float | None = None  # when the checkpoint was written
    config_hash: str = ""
    chosen: str = ""  # how it was chosen (a sweep's champion, a registered version), Markdown
    origin: str = ""  # what the user named: the folder or models:/ URI
    base: str = ""  # the base model id or folder
    grids: dict = field(default_factory=dict)  # {"grid.png": path, "baseline.png": path}
    strength: float = 1.0  # the LoRA strength it was scored and chosen at (eval.lora_scales): the card recommends it


# ---- sources -------------------------------------------------------------------------------------------------


def from_checkpoint(folder: Path, origin: str = "", strength: float = 1.0) -> Source:
    """A checkpoint folder (<trial>/checkpoints/step-NNNNNN): its LoRA (hash checked against checkpoint.json), and,
    from its trial folder, the config, metrics, baseline and grids, those of its scoring at `strength`."""
    folder = Path(folder).expanduser().resolve()
    try:
        lora = check_lora_file(folder)
    except EvalInputError as exc:
        raise SystemExit(str(exc)) from None
    rec = CheckpointRecord.read(folder) if (folder / "checkpoint.json").is_file() else None
    step = rec.step if rec else int(folder.name.rpartition("-")[2]) if folder.name.startswith("step-") else 0
    src = Source(lora=lora, trial=rec.trial if rec else folder.name, step=step, origin=origin or str(folder),
                 created=rec.created if rec else None, config_hash=rec.config_hash if rec else "", strength=strength)
    entry = entry_name(folder.name, strength)
    trial = folder.parent.parent
    config = trial / ".hydra" / "config.yaml"
    if config.is_file():
        src.conf = to_typed(stored.load(config))  # as data: no resolver runs, no variable is read
        src.base = base_name(src.conf)
    if (trial / "result.json").is_file():
        metrics = read_result(trial).get("metrics") or {}
        scored = read_scores(trial)  # a raced checkpoint's later rounds are there, not in result.json
        src.metrics = scored[entry][0] if entry in scored else metrics.get(entry) or {}
        src.baseline = metrics.get("baseline") or {}
    # the checkpoint's grid in its trial; the no-LoRA grid where the sweep's baseline was scored (one trial made it)
    for name, pattern in (("grid.png", f"eval/grids/{entry}_base.png"), ("baseline.png", "eval/grids/baseline_*.png")):
        found = sorted(trial.glob(pattern)) or sorted(trial.parent.glob(f"*/{pattern}"))
        if found:
            src.grids[name] = found[0]
    return src


def from_sweep(folder: Path) -> Source:
    """A sweep folder: its champion, as its report chose it."""
    folder = Path(folder).expanduser().resolve()
    sel_file = folder / "report" / "selection.json"
    if not sel_file.is_file():
        raise SystemExit(f"{folder} has no report/selection.json: the sweep has not chosen a champion yet. Rebuild "
                         f"it with `python -m sweep.report {folder}`, or export a checkpoint folder directly")
    sel = json.loads(sel_file.read_text())
    if not sel.get("champion"):
        raise SystemExit(f"{folder}: no checkpoint qualified as champion ({sel.get('explanation', '')}); export a "
                         "checkpoint folder directly: python -m sweep.export <trial>/checkpoints/step-NNNNNN")
    src = from_checkpoint(Path(sel["champion"]["checkpoint"]), origin=str(folder),
                          strength=sel["champion"].get("scale", 1.0))
    src.chosen = f"The champion of sweep {code(folder.name)}: {text(sel.get('explanation', ''))}."
    return src


def family_of(src: Source) -> families.Family:
    """The LoRA's model family: its trial's model.family, else the one its file's parts name."""
    if src.conf is not None:
        return families.get(src.conf.model.family)
    return families.for_parts(adapter_config(src.lora))


def base_name(conf) -> str:
    m = conf.model
    name = families.get(m.family).display_name
    return m.pretrained or f"{m.name} (an {name} architecture with random weights, built locally)"


# ---- what the file says about itself -----------------------------------------------------------------------------


def trigger_phrase(conf) -> str:
    """What prompts must say for the subject: the token and the class noun evaluation prompted with ("sks man")."""
    if conf is None:
        return ""
    return " ".join(w for w in (conf.eval.subject_token or conf.data.subject_token, conf.eval.class_noun) if w)


def output_name(src: Source) -> str:
    """sks_man_lr_0.0001_step300: the name the UIs list the LoRA by (kohya's ss_output_name)."""
    slug = lambda s: re.sub(r"[^A-Za-z0-9.-]+", "_", s).strip("_")
    parts = [trigger_phrase(src.conf), display_name(src.trial), f"step{src.step}"]
    return "_".join(slug(p) for p in parts if slug(p)) or "lora"


def metadata(src: Source, name: str, configs: dict) -> dict[str, str]:
    """kohya's ss_* keys and Stability's modelspec.* keys (what A1111's and ComfyUI's LoRA browsers show), and this
    tool's own: the trial, its config hash, the checkpoint's metrics and the selection rule."""
    family = family_of(src)
    conf = src.conf
    res = conf.data.resolution if conf else family.eval_defaults.resolution
    meta = {
        **family.webui_metadata(configs, res, base_config(src, family)), "ss_output_name": name, "ss_steps": src.step,
        "ss_sd_model_name": src.base, "ss_training_comment": f"trained by {TOOL} (trial {src.trial}, step {src.step})",
        "modelspec.title": name,
        f"{TOOL}.trial": src.trial, f"{TOOL}.step": src.step, f"{TOOL}.config_hash": src.config_hash,
        f"{TOOL}.metrics": metrics_json(src.metrics), f"{TOOL}.baseline": metrics_json(src.baseline),
    }
    if src.created:  # when the checkpoint was written (never the export's time: the same LoRA, the same bytes)
        meta["modelspec.date"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(src.created))
    if conf is not None:
        phrase = trigger_phrase(conf)
        meta.update({
            "ss_learning_rate": conf.train.lr, "ss_unet_lr": conf.train.lr,
            "ss_text_encoder_lr": conf.train.text_encoder_lr or conf.train.lr if conf.lora.train_text_encoder else 0,
            "ss_max_train_steps": conf.train.max_steps, "ss_resolution": f"({res}, {res})",
            "ss_seed": conf.train.seed, "ss_network_dropout": conf.lora.dropout, "ss_batch_size_per_device":
            conf.train.batch_size, "modelspec.trigger_phrase": phrase,
            "modelspec.description": f"DreamBooth LoRA of {phrase} on {family.display_name}, step {src.step} of trial {src.trial}",
            f"{TOOL}.selection_rule": conf.selection.rule, f"{TOOL}.lora_scale": src.strength})
        meta[f"{TOOL}.selection"] = describe_rule(conf.selection)
    return {k: str(v) for k, v in meta.items()}


def licence(base: str, known: tuple[str, str] | None = None) -> tuple[str | None, str]:
    """(licence id, the card's line): from the base model's own model card (README.md front matter), local or in the
    Hugging Face cache, else `known` (its family's (licence, link) for a base it knows by name: a gated model's card
    may not be in the cache)."""
    card = None
    try:
        folder = Path(base)
        if (folder / "README.md").is_file():
            card = (folder / "README.md").read_text()
        elif base and not folder.exists():
            card = Path(hf_hub_download(base, "README.md", local_files_only=True)).read_text()
    except Exception:
        card = None
    m = re.match(r"^---\s*\n(.*?)\n---", card or "", re.DOTALL)
    if m:
        front = yaml.safe_load(m[1]) or {}
        lic = front.get("license")
        if lic:
            link = front.get("license_link")
            return str(lic), (f"This LoRA is derived from {code(base)} and is under its licence: **{text(lic)}**"
                              + (f" ({text(link)})." if link else " (see the base model's card)."))
    if known:
        return known[0], (f"This LoRA is derived from {code(base)} and is under its licence: **{text(known[0])}** "
                          f"({text(known[1])}).")
    return None, (f"This LoRA is derived from {code(base or 'its base model')}, whose licence applies; its model card "
                  "was not found here, so check the licence there before sharing.")


def model_card(src: Source, name: str, files: dict[str, str], meta: dict[str, str], configs: dict,
               note: str = "") -> str:
    """README.md in the Hugging Face model-card style. Every string from a config, a folder or a store is escaped
    (sweep/markdown.py): a prompt or a trial name is text there, never markup; `src.chosen` comes escaped."""
    conf = src.conf
    family = family_of(src)
    phrase = trigger_phrase(conf)
    lic, lic_line = licence(src.base, family.licence_of(src.base))
    strength = src.strength
    front = {"base_model": src.base if src.base and not src.base.startswith("/") and "(" not in src.base else None,
             "license": lic, "instance_prompt": conf.data.instance_prompt if conf else None,
             "library_name": "diffusers",
             "tags": ["text-to-image", *family.card_tags, "lora", "dreambooth", TOOL]}
    lines = ["---", yaml.safe_dump({k: v for k, v in front.items() if v is not None}, sort_keys=False).strip(), "---",
             "", f"# {text(name)}", "",
             f"An {family.display_name} DreamBooth LoRA of **{text(phrase or 'the subject')}**: step {src.step} of trial "
             f"{code(src.trial)}, "
             f"exported by {TOOL}.", ""]
    if phrase:
        example = next((p for p in (conf.eval.prompts or []) if phrase in p), f"a photo of {phrase}")
        lines += [f"- trigger phrase: **{code(phrase)}** (e.g. \"{text(example)}\")"]
    lines += [f"- recommended LoRA strength: **{strength:g}** (what it was scored and chosen at)",
              f"- base model: {code(src.base or '?')}", ""]
    if note:
        lines += [f"> {text(note)}", ""]
    lines += ["## Files", "", "| file | load it in | sha256 |", "|---|---|---|"]
    for f, sha in files.items():
        where = {"pytorch_lora_weights.safetensors": "diffusers: `pipe.load_lora_weights(\"<this folder>\")`"}.get(
            f, f"ComfyUI (`models/loras/`, Load LoRA node, strength {strength:g}); Automatic1111 / Forge "
               f"(`models/Lora/`, prompt `<lora:{Path(f).stem}:{strength:g}>`)")
        lines.append(f"| {code(f)} | {where} | `{sha[:16]}...` |")
    unet = configs.get(family.denoiser_part, {})
    if any(f.endswith(".safetensors") and f != "pytorch_lora_weights.safetensors" for f in files):
        lines += ["", f"The web-UI file names modules as kohya's {family.display_name} trainer does and carries the adapter's own "
                      f"alpha ({meta.get('ss_network_alpha')}, rank {meta.get('ss_network_dim')}: the UIs apply "
                      f"alpha / rank = {float(unet.get('lora_alpha') or 1) / float(unet.get('r') or 1):g}), so "
                      "a strength in the UIs is the strength evaluation applied (1: the LoRA as trained)."]
    if src.metrics:
        lines += ["", "## Metrics against the base model", "",
                  "Scored on the evaluation prompts at fixed seeds; the base model is the same pipeline without the "
                  "LoRA.", "", "| metric | this LoRA | base model |", "|---|---|---|"]
        lines += [f"| {text(k)} | {text(fmt_value(v))} | {text(fmt_value(src.baseline.get(k, math.nan)))} |"
                  for k, v in src.metrics.items()]
    if src.grids:
        lines += ["", "## Images", ""]
        lines += [f"![{label}]({f})" for f, label in (("grid.png", "with the LoRA"), ("baseline.png", "base model"))
                  if f in src.grids]
    if src.chosen or conf is not None:
        lines += ["", "## How it was chosen", ""]
        if src.chosen:
            lines += [src.chosen, ""]
        if conf is not None:
            lines += [f"Rule `{conf.selection.rule}`: {describe_rule(conf.selection)}"]
    if conf is not None:
        t, lo = conf.train, conf.lora
        settings = {"learning rate": t.lr, "steps (this checkpoint / the trial's)": f"{src.step} / {t.max_steps}",
                    "LoRA rank / alpha": f"{lo.rank} / {lo.lora_alpha:g}", "target modules": ", ".join(lo.target_modules),
                    "text encoders trained": lo.train_text_encoder, "resolution": conf.data.resolution,
                    "batch size": t.batch_size, "optimizer": t.optimizer, "LR schedule": t.lr_scheduler,
                    "prior preservation": conf.data.with_prior_preservation, "seed": t.seed,
                    "instance prompt": conf.data.instance_prompt, "config hash": src.config_hash}
        lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {text(v)} |" for k, v in settings.items()]
    lines += ["", "## Licence", "", lic_line, ""]
    return "\n".join(lines)


# ---- writing -----------------------------------------------------------------------------------------------------


def base_config(src: Source, family: families.Family) -> dict | None:
    """The base's denoiser config (<base>/<unet or transformer>/config.json: the web-UI names may depend on it), from
    its folder or the Hugging Face cache; None when the base is not at hand."""
    part = f"{family.denoiser_part}/config.json"
    try:
        if src.conf is not None:
            folder = Path(resolve_source(src.conf.model, resolve_path(src.conf.paths, src.conf.paths.cache_dir)))
        else:
            folder = Path(src.base)
        cfg = folder / part
        if not cfg.is_file():
            cfg = Path(hf_hub_download(src.base, part, local_files_only=True))
        return json.loads(cfg.read_text())
    except Exception:
        return None


def export(src: Source, out: Path, fmt: str = "both", dtype: str = "fp16", strict: bool = True,
           overwrite: bool = False, own: bool = False) -> dict:
    """Write the export into the folder `out`, beside what is there (sweep/export/folder.py says what it may
    replace: `overwrite`, and `own` for a sweep's champion/). strict=False: a LoRA the web-UI format cannot hold
    (DoRA, modules outside attention) is exported for diffusers only, with a note in the card. Raises ExportError
    (a UserError) when it may not write there. Returns export.json's content, with the folder as "out"."""
    out = Path(out).expanduser().absolute()
    name = output_name(src)
    contents, configs, note = lora_files(src, name, fmt, dtype, strict)
    contents.update(src.grids)
    files = {f: sha256_of(data) for f, data in contents.items()}
    weights = {f: sha for f, sha in files.items() if f.endswith(".safetensors")}
    card = model_card(src, name, weights, metadata(src, name, configs), configs, note)
    contents["README.md"] = redact_text(card).encode()  # a shared file: no secret of the sweep's config in it
    files["README.md"] = sha256_of(contents["README.md"])
    lora_sha = sha256_file(src.lora)
    record = {"name": name, "source": src.origin, "trial": src.trial, "step": src.step, "format": fmt,
              "dtype": dtype, "tool": TOOL, "lora_sha256": lora_sha, "files": files,
              "webui_file": f"{name}.safetensors" if f"{name}.safetensors" in files else None}
    contents[EXPORT_RECORD] = (json.dumps(redact_tree(record), indent=2) + "\n").encode()
    write_export(out, contents, lora_sha, overwrite=overwrite, own=own)
    return {**record, "out": str(out)}


def lora_files(src: Source, name: str, fmt: str, dtype: str, strict: bool) -> tuple[dict, dict, str]:
    """({file name: bytes or the file to copy}, the adapter configs, the card's note): the web-UI file, built here
    (byte-identical for the same checkpoint), and the diffusers file, the checkpoint's own bytes."""
    configs = adapter_config(src.lora)
    contents: dict[str, bytes | Path] = {}
    note = ""
    if fmt in ("both", "webui"):
        family = family_of(src)
        alphas = {family.denoiser_part: src.conf.lora.lora_alpha} if src.conf is not None else None
        if alphas and src.conf.lora.train_text_encoder:
            alphas.update({part: src.conf.lora.lora_alpha for part in family.text_encoder_parts})
        try:
            tensors, configs = family.to_webui(src.lora, base_config(src, family), dtype, alphas)
            contents[f"{name}.safetensors"] = safetensors_bytes(tensors, redact_tree(metadata(src, name, configs)))
        except WebUIExportError as exc:
            if strict:
                raise SystemExit(f"cannot export {src.origin} for the web UIs: {exc}") from None
            note = f"No web-UI file: {exc}."
            log.warning("%s: %s", src.origin, note)
    if fmt in ("both", "diffusers"):
        contents[LORA_FILE] = src.lora
    return contents, configs, note
