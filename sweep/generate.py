"""Generate with the champion (or any registered version, or a checkpoint folder).

    python -m sweep.generate prompt="a picture of sks man showing the thumbs up gesture on the moon"
    python -m sweep.generate prompt="..." model=models:/sdxl-lora-sks-man/3 out=moon.png steps=30 seed=1
    python -m sweep.generate prompt="..." subject="sks woman"       (several subjects registered: say which)
    python -m sweep.generate prompt="..." checkpoint=outputs/sweeps/.../checkpoints/step-000400 base=<model>

Unless steps=, guidance=, size= or seed= say otherwise, it generates as the champion was evaluated (the
`generation` tag its sweep recorded on the registered version; for a checkpoint folder, its trial's
eval/metrics.json), and says what it will do and about how long before it starts. The image goes to out=, else
to a new file under the working folder's outputs/ (git-ignored): outputs/generated/<date>_<time>.png.

A registered version is read as data (sweep/tracking/weights.py): its LoRA safetensors file, checked against the
sha256 its version and its checkpoint.json record, merged into the base its flavour names (or base=); a version
that is not this project's LoRA is refused (exit 2) before anything of it is loaded (docs/security.md).
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import families
from common.device import resolve_device
from common.errors import ModelSourceError, UserError
from evaluation.generate import EvalInputError, LoraSwap, check_lora_file, load_pipeline

from .cli import key_values
from .logs import quiet_for_generation
from .tracking.registry import champion_uri, default_store
from .tracking.weights import fetch_lora

USAGE = ("usage: python -m sweep.generate prompt=\"...\" [subject=\"sks man\" | model=models:/<name>@champion | "
         "checkpoint=<folder>] [base=<hub id or folder>] [out=<file>.png] [steps=N] [guidance=G] [size=PX] "
         "[seed=S] [tracking_uri=URI]")
KEYS = {"prompt", "subject", "model", "checkpoint", "base", "out", "steps", "guidance", "size", "seed", "tracking_uri"}
GENERATED = Path("outputs") / "generated"  # where images go without out=


def parse(argv: list[str]) -> dict[str, str]:
    args = key_values(argv, KEYS, USAGE)
    if not args.get("prompt"):
        raise SystemExit(f"prompt is required\n{USAGE}")
    if "checkpoint" in args and "base" not in args:
        raise SystemExit("checkpoint=... needs base=<hub id or local SDXL folder> (the model it was trained on)")
    for key, kind in (("steps", int), ("guidance", float), ("size", int), ("seed", int)):
        if key in args:
            try:
                kind(args[key])
            except ValueError:
                raise SystemExit(f"{key}={args[key]!r} is not a{'n integer' if kind is int else ' number'}, "
                                 f"e.g. {key}={'4' if kind is int else '5.0'}") from None
    if "size" in args and (int(args["size"]) <= 0 or int(args["size"]) % 8):
        raise SystemExit(f"size={args['size']} must be a positive multiple of 8, e.g. size=128")
    return args


def settings(args: dict[str, str], recorded: dict | None) -> dict:
    """What to generate with: the user's overrides, else the recorded evaluation settings (None: the model's
    own defaults apply)."""
    rec = recorded or {}
    size = int(args["size"]) if "size" in args else rec.get("resolution")
    return {"num_inference_steps": int(args["steps"]) if "steps" in args else rec.get("num_inference_steps"),
            "guidance_scale": float(args["guidance"]) if "guidance" in args else rec.get("guidance_scale"),
            "height": size, "width": size,
            "seed": int(args["seed"]) if "seed" in args else rec.get("seed"),
            "lora_scale": rec.get("lora_scale", 1.0)}


def plan_line(s: dict, what: str, device: str, recorded: dict | None, images: int = 1) -> str:
    """'generating 1 image, 128x128 px, 4 steps, guidance 5.0, ... with <what> on cpu; about 3 s ...'"""
    parts = [f"generating {images} image{'s' * (images != 1)}", f"{s['width']}x{s['height']} px",
             f"{s['num_inference_steps']} steps", f"guidance {s['guidance_scale']}"]
    if s.get("seed") is not None:
        parts.append(f"seed {s['seed']}")
    if recorded and recorded.get("scheduler"):
        parts.append(f"scheduler {recorded['scheduler']}")
    if s.get("lora_scale", 1.0) != 1.0:
        parts.append(f"LoRA scale {s['lora_scale']}")
    return ", ".join(parts) + f", with {what} on {device}; {estimate(s, device, recorded, images)}"


def estimate(s: dict, device: str, recorded: dict | None, images: int) -> str:
    """From the seconds per image measured while the champion was evaluated, scaled by pixels and steps."""
    per = (recorded or {}).get("seconds_per_image")
    if not per:
        return "cannot estimate how long (no evaluation time recorded for it)"
    if recorded.get("device") != device:
        return f"cannot estimate how long (its evaluation time was measured on {recorded.get('device')}, not {device})"
    cfg = lambda g: 2.0 if g > 1 else 1.0  # classifier-free guidance runs the UNet twice per step
    scale = (s["height"] * s["width"] / recorded["resolution"] ** 2 * s["num_inference_steps"]
             / recorded["num_inference_steps"] * cfg(s["guidance_scale"]) / cfg(recorded["guidance_scale"]))
    secs = per * scale * images
    took = f"{secs:.0f}" if secs >= 1 else f"{secs:.1f}"
    return f"about {took} s to generate (as timed in its evaluation), plus loading the model"


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    out = Path(args["out"]) if "out" in args else default_out()
    quiet_for_generation()
    try:
        if "checkpoint" in args:
            _from_checkpoint(args, out)
        else:
            _from_registry(args, out)
    except (UserError, EvalInputError) as exc:
        # several subjects and none named; a version that is not this project's LoRA, or not the bytes recorded; a
        # base model that cannot be loaded; a LoRA that does not fit it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"written {out}")
    return 0


def default_out() -> Path:
    """outputs/generated/<date>_<time>.png: a new file each run, never one already there."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out, n = GENERATED / f"{stamp}.png", 1
    while out.exists():
        n += 1
        out = GENERATED / f"{stamp}_{n}.png"
    return out


def _from_checkpoint(args: dict[str, str], out: Path) -> None:
    try:
        path = check_lora_file(Path(args["checkpoint"]))  # safetensors only, its recorded hash verified
    except EvalInputError as exc:
        raise SystemExit(str(exc)) from None
    recorded = _trial_eval_record(path.parent)
    device = resolve_device("auto").type
    s = settings(args, recorded)
    if recorded is None:
        print(f"note: no evaluation record beside {path.parent} (its trial's eval/metrics.json); "
              "using the pipeline's defaults: pass size=, steps=, guidance= to choose", flush=True)
    s = with_defaults(s)
    print(plan_line(s, f"{path.parent} on {args['base']}", device, recorded), flush=True)
    with generator(args["base"], path, s["lora_scale"]) as pipe:
        [png] = render(pipe, [args["prompt"]], s)
    out.parent.mkdir(parents=True, exist_ok=True)  # only once there is an image to put in it
    out.write_bytes(png)


def with_defaults(s: dict, family: families.Family | None = None) -> dict:
    """The settings with the family's pipeline defaults (families/: generation_defaults; model.family's default
    family when the base's is not known) where nothing was recorded or asked for."""
    defaults = (family or families.get(families.DEFAULT)).generation_defaults
    return {**s, **{k: v for k, v in defaults.items() if s.get(k) is None}}


@contextlib.contextmanager
def generator(base: str, lora: Path, scale: float = 1.0) -> Iterator:
    """The base pipeline with the LoRA file merged in at `scale`, as evaluation scored it (evaluation.generate: the
    same loading, dtype and merge), the file read as safetensors (never pickle) and checked against the sha256
    recorded beside it. The base is loaded by diffusers' from_pretrained: weights only (no remote code)."""
    if not base:
        raise ModelSourceError("no base model named (the version's flavour records none): pass base=<hub id or "
                               "local SDXL folder>")
    try:
        pipe, _ = load_pipeline(base, resolve_device("auto", "device"))
    except (OSError, ValueError) as exc:  # no such folder or hub id, not in the hub's cache offline, not a pipeline
        raise ModelSourceError(f"cannot load the base model {base!r} ({(str(exc).splitlines() or [''])[0][:300]}); "
                               "pass base=<hub id or local SDXL folder>") from None
    with LoraSwap(pipe, lora, scale) as merged:
        yield merged


def render(pipe, prompts: list[str], s: dict, negative_prompt: str | None = None) -> list[bytes]:
    """PNG bytes of one image per prompt, at the settings `s` (seed: the global generator, as evaluation seeds it)."""
    import torch

    if s.get("seed") is not None:
        torch.manual_seed(s["seed"])
    kw = {k: s[k] for k in ("num_inference_steps", "guidance_scale", "height", "width") if s.get(k) is not None}
    if negative_prompt:
        kw["negative_prompt"] = [negative_prompt] * len(prompts)
    out = []
    for image in pipe(prompt=prompts, **kw).images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _trial_eval_record(ckpt: Path) -> dict | None:
    """The settings a checkpoint was scored with and its seconds per image, from <trial>/eval/metrics.json."""
    try:
        rec = json.loads((ckpt.parent.parent / "eval" / "metrics.json").read_text())
        cfg = rec["config"]
    except (OSError, KeyError, ValueError):
        return None
    took = rec.get("seconds", {}).get(ckpt.name) or {}
    return {"resolution": cfg["resolution"], "num_inference_steps": cfg["num_inference_steps"],
            "guidance_scale": cfg["guidance_scale"], "lora_scale": cfg.get("lora_scale", 1.0),
            "seed": (cfg.get("seeds") or [None])[0], "scheduler": None,
            "device": None if cfg.get("device") in (None, "auto") else str(cfg["device"]).split(":")[0],
            "seconds_per_image": took["generate_s"] / took["images"] if took.get("images") else None}


def _from_registry(args: dict[str, str], out: Path) -> None:
    """The registered version's LoRA file, fetched as data and checked (tracking/weights.py), never the version
    loaded through MLflow (that would run whatever code a version brings)."""
    store = args.get("tracking_uri") or default_store()
    uri = champion_uri(store, args.get("subject"), args.get("model"))
    with tempfile.TemporaryDirectory(prefix="sweep-generate-") as tmp:
        reg = fetch_lora(uri, store, Path(tmp))
        base = args.get("base") or reg.base
        if reg.generation is None:
            print(f"note: {uri} has no recorded evaluation settings (registered before they were recorded); using "
                  "the pipeline's defaults: pass size=, steps=, guidance= to choose", flush=True)
        s = with_defaults(settings(args, reg.generation))
        print(plan_line(s, reg.described, resolve_device("auto", "device").type, reg.generation), flush=True)
        with generator(base, reg.lora, s["lora_scale"]) as pipe:
            [png] = render(pipe, [args["prompt"]], s)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)


if __name__ == "__main__":
    raise SystemExit(main())
