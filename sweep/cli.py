"""Checks of the command line before Hydra sees it: an override Hydra cannot read (`~/photos`, a non-ASCII letter)
or a misspelt key is refused at once with the form to type instead, exit status 2, and nothing created (no sweep
folder, no MLflow run). Without them Hydra prints a lexer error, or a multirun opens its MLflow parent run and
sweep folder before any job finds out that `lrr` is not a key."""
from __future__ import annotations

import difflib
import shlex
import sys
from typing import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from . import CONF_DIR

_MULTIRUN = ("-m", "--multirun")
# flags after which Hydra does not compose this project's config as usual: leave the command to Hydra
_HANDS_OFF = ("help", "hydra_help", "info", "shell_completion", "experimental_rerun", "config_path", "config_name",
              "config_dir")


class CommandLineError(Exception):
    """A command line refused before Hydra runs it; the message says what to type instead."""


def preflight(argv: Sequence[str]) -> None:
    """Refuse, with exit status 2 and a message on stderr, a command line Hydra would reject late or unclearly."""
    try:
        check_command_line(list(argv))
    except CommandLineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def check_command_line(argv: list[str]) -> None:
    """Raises CommandLineError for: -m between overrides, several values without -m, an override Hydra cannot
    parse, a key not in the config, a config group option that does not exist."""
    from hydra._internal.utils import get_args_parser

    _check_multirun_flag(argv)
    args, _ = get_args_parser().parse_known_args(argv)  # Hydra's own parser reports its own usage errors later
    if any(getattr(args, a, None) for a in _HANDS_OFF):
        return
    overrides = list(args.overrides or [])
    parsed = _parse(overrides)
    if not args.multirun:
        _check_single_values(overrides, parsed)
    _check_keys(parsed)


def _check_single_values(overrides: list[str], parsed: list[Override]) -> None:
    """`lr=1e-4,1e-5` without -m: Hydra says "Ambiguous value" and offers a list or a string; a user meant a sweep."""
    swept = [raw for raw, o in zip(overrides, parsed) if o.is_sweep_override()]
    if swept:
        fixed = " ".join(shlex.quote(x) for x in ["-m", *overrides])
        raise CommandLineError(f"{', '.join(swept)} gives several values, which is a sweep: add -m first: "
                               f"python -m sweep {fixed}")


def _check_multirun_flag(argv: list[str]) -> None:
    """`a=1 -m b=2`: Hydra's argument parser stops reading overrides at -m and fails on `b=2`."""
    for i, a in enumerate(argv):
        if a in _MULTIRUN and any("=" in x for x in argv[:i]) and any("=" in x for x in argv[i + 1:]):
            fixed = " ".join(shlex.quote(x) for x in [a] + argv[:i] + argv[i + 1:])
            raise CommandLineError(f"{a} stands between overrides; put it first: python -m sweep {fixed}")


def quoted_form(key: str, value: str) -> str:
    """`key=value` as typed in a shell so that Hydra reads `value` as one quoted string."""
    inner = f'{key}="{value}"' if '"' not in value else f"{key}='{value}'"
    return shlex.quote(inner)


def _parse(overrides: list[str]) -> list[Override]:
    parser = OverridesParser.create()
    problems, parsed = [], []
    for o in overrides:
        try:
            parsed += parser.parse_overrides([o])
        except OverrideParseException:
            problems.append(_unreadable(o))
    if problems:
        raise CommandLineError("\n".join(problems))
    return parsed


def _unreadable(override: str) -> str:
    key, eq, value = override.partition("=")
    if not eq:
        return f"{override!r}: Hydra cannot read this override; overrides are key=value (e.g. lr=1e-4)"
    odd = sorted({c for c in value if c == "~" or ord(c) > 127})
    why = f" (unquoted, Hydra does not accept {' '.join(odd)} in a value)" if odd else ""
    msg = f"{override}: Hydra cannot read this override{why}.\n  type it quoted: {quoted_form(key, value)}"
    if value.startswith("~/"):
        msg += f"  or use $HOME: {key}=$HOME/{value[2:]}"
    return msg


def _first_value(o: Override) -> str | None:
    """A sweep override as a plain one, with its first value: the config each job composes has the same keys."""
    if isinstance(o.value(), ChoiceSweep) and not o.is_hydra_override():
        first = next(iter(o.sweep_string_iterator()), None)
        return None if first is None else f"{o.get_key_element()}={first}"
    return None


def _check_keys(parsed: list[Override]) -> None:
    """Compose the config as a job will (sweep overrides at their first value) and translate Hydra's composition
    errors: an unknown key gets its close matches, not Hydra's advice to add it with `+`."""
    from hydra import compose, initialize_config_dir

    plain, unchecked = [], []  # overrides to compose with; sweep keys only checked against the composed config
    for o in parsed:
        if o.is_hydra_override() or o.key_or_group.startswith("hydra"):
            continue  # Hydra's own settings: Hydra checks them
        if o.is_sweep_override():
            first = _first_value(o)
            if first is None:
                unchecked.append(o)
            else:
                plain.append(first)
        else:
            plain.append(o.input_line)
    unknown: list[str] = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="sweep"):
        for _ in range(len(plain) + 1):
            try:
                cfg = compose(config_name="config", overrides=plain)
                break
            except ConfigCompositionException as exc:
                bad = _unknown_override(exc, plain)
                if bad is None:
                    raise CommandLineError(_hydra_message(exc)) from None
                unknown.append(bad.partition("=")[0].lstrip("+~"))
                plain.remove(bad)
            except (MissingConfigException, OverrideParseException) as exc:
                raise CommandLineError(_hydra_message(exc)) from None
        else:  # pragma: no cover - every pass removes one override
            return
    keys = flat_keys(cfg)
    for o in unchecked:
        k = o.key_or_group
        if not o.get_key_element().startswith("+") and k not in keys and not (CONF_DIR / k).is_dir():
            unknown.append(k)
    unknown += _new_top_level_keys(parsed)
    if unknown:
        raise CommandLineError("\n".join(_no_such_key(k, keys) for k in unknown))


def _new_top_level_keys(parsed: list[Override]) -> list[str]:
    """`+learning_rate=1e-4`: `+` adds a key, but the config's top level is a fixed schema (sweep/config.py), so a
    new top-level key is always a mistake (a nested one may be fine: model.architecture holds any keys)."""
    top = set(OmegaConf.load(CONF_DIR / "config.yaml")) - {"defaults"}
    out = []
    for o in parsed:
        root = o.key_or_group.split(".")[0]
        if o.get_key_element().startswith("+") and not o.is_hydra_override() and root not in top \
                and not (CONF_DIR / root).is_dir():
            out.append(o.get_key_element())
    return out


def _unknown_override(exc: ConfigCompositionException, plain: list[str]) -> str | None:
    """The override that named a key the config does not have, if that is what Hydra complains of."""
    text = str(exc)
    if "Could not override '" not in text or "not in struct" not in str(exc.__cause__ or text):
        return None
    key = text.split("Could not override '", 1)[1].split("'", 1)[0]
    return next((p for p in plain if p.partition("=")[0].lstrip("+~") == key), None)


def _hydra_message(exc: Exception) -> str:
    text = str(exc).split("Config search path:")[0].strip()  # where Hydra looked: noise for a typo
    return "\n  ".join(line for line in text.splitlines() if line.strip())


def flat_keys(cfg: DictConfig) -> set[str]:
    """Every key of the config, dotted ("train.lr"), without resolving interpolations."""
    out: set[str] = set()

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                out.add(f"{prefix}{k}")
                walk(v, f"{prefix}{k}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


# what other trainers (diffusers' train_dreambooth_lora_sdxl.py, kohya's sd-scripts, common habit) call this
# config's keys: `learning_rate=1e-4` is answered "did you mean lr", not only with the keys spelt alike
SYNONYMS = {
    "lr": ("learning_rate", "learningrate", "unet_lr", "lr_unet", "base_lr"),
    "steps": ("max_train_steps", "num_steps", "train_steps", "num_train_steps", "max_steps", "iterations", "iters"),
    "rank": ("lora_rank", "network_dim", "lora_dim", "dim", "r", "lora_r"),
    "lora.alpha": ("alpha", "network_alpha", "lora_alpha"),
    "lora.dropout": ("dropout", "network_dropout", "lora_dropout"),
    "lora.train_text_encoder": ("train_text_encoder",),
    "data.resolution": ("resolution", "res", "image_size", "size"),
    "data.instance_dir": ("instance_data_dir", "train_data_dir", "image_dir", "images", "photos", "dataset"),
    "data.class_dir": ("class_data_dir", "reg_data_dir"),
    "data.instance_prompt": ("prompt",),
    "data.repeats": ("num_repeats", "dataset_repeats"),
    "train.seed": ("seed", "random_seed"),
    "train.batch_size": ("batch_size", "train_batch_size", "bs"),
    "train.gradient_accumulation": ("gradient_accumulation_steps", "grad_accum", "accumulation_steps"),
    "train.checkpoint_every": ("checkpointing_steps", "save_steps", "save_every_n_steps", "save_every",
                               "checkpoint_steps"),
    "train.lr_scheduler": ("scheduler", "lr_schedule"),
    "train.lr_warmup_steps": ("warmup_steps", "warmup"),
    "train.optimizer": ("optimizer_type", "optim"),
    "train.snr_gamma": ("min_snr_gamma",),
    "train.text_encoder_lr": ("te_lr", "text_encoder_learning_rate"),
    "model.pretrained": ("pretrained_model_name_or_path", "pretrained_model", "base_model", "model_id",
                         "model_name_or_path"),
    "model.vae": ("pretrained_vae_model_name_or_path", "vae_path"),
    "eval.prompts": ("validation_prompt", "validation_prompts", "sample_prompts"),
    "eval.seeds": ("seeds", "validation_seeds"),
    "paths.output_dir": ("output_dir", "out_dir", "output"),
}
_SYNONYM_OF = {alias: key for key, aliases in SYNONYMS.items() for alias in aliases}
_SHORTHAND_OF = {"rank": ("lora.rank",), "lr": (), "steps": ()}  # rank=8 and lora.rank=8 both set the LoRA rank


def did_you_mean(key: str, keys: set[str]) -> list[str]:
    """Known keys a user may have meant by `key`: its synonym from another trainer, keys with the same last part
    elsewhere (`resolution` -> data.resolution), else the keys spelt alike (siblings first)."""
    key = key.lstrip("+~")
    keys = keys - {key}  # a `+key` is in the config it was composed into
    parent, _, leaf = key.rpartition(".")
    target = _SYNONYM_OF.get(key.lower()) or _SYNONYM_OF.get(leaf.lower().replace("-", "_"))
    near = [k for k in (target, *(_SHORTHAND_OF.get(target, ()))) if k and k in keys]
    near += sorted(k for k in keys if k.rpartition(".")[2] == leaf and k.count(".") <= 1)
    if not near:
        siblings = sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent)
        near = [f"{parent}.{m}" if parent else m for m in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)]
    if not near:
        near = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.6)
    return list(dict.fromkeys(near))[:3]


def _no_such_key(key: str, keys: set[str]) -> str:
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"}
    near = did_you_mean(key, keys | groups)
    if near:
        return f"{key}: no such key in the config; did you mean {' or '.join(near)}?"
    return f"{key}: no such key in the config (`python -m sweep --cfg job` lists them)"


def key_values(argv: Sequence[str], keys: set[str], usage: str) -> dict[str, str]:
    """The `key=value` arguments of a command that is no Hydra app (sweep.generate, sweep.serve); an unknown one is
    refused with the command's usage."""
    args = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in keys:
            raise SystemExit(f"unknown argument {a!r}\n{usage}")
        args[key] = value
    return args
