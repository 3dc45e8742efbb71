"""Generate with the champion (or any registered version, or a checkpoint folder).

    python -m sweep.generate prompt="a picture of sks man showing the thumbs up gesture on the moon"
    python -m sweep.generate prompt="..." model=models:/sdxl-lora-sks-man/3 out=moon.png steps=30 seed=1
    python -m sweep.generate prompt="..." subject="sks woman"       (several subjects registered: say which)
    python -m sweep.generate prompt="..." checkpoint=outputs/sweeps/.../checkpoints/step-000400 base=<model>

Unless steps=, guidance=, size= or seed= say otherwise, it generates as the champion was evaluated (the
`generation` tag its sweep recorded on the registered version; for a checkpoint folder, its trial's
eval/metrics.json), and says what it will do and about how long before it starts. The image goes to out=, else
to a new file under the working folder's outputs/ (git-ignored): outputs/generated/<date>_<time>.png.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from evaluation.generate import EvalInputError, check_lora_file

from .logs import quiet_for_generation
from .tracking.registry import (GENERATION_TAG, WhichSubject, champion_uri, default_store, registered_version,
                                verify_registered)

USAGE = ("usage: python -m sweep.generate prompt=\"...\" [subject=\"sks man\" | model=models:/<name>@champion | "
         "checkpoint=<folder> base=<hub id or folder>] [out=<file>.png] [steps=N] [guidance=G] [size=PX] "
         "[seed=S] [tracking_uri=URI]")
KEYS = {"prompt", "subject", "model", "checkpoint", "base", "out", "steps", "guidance", "size", "seed", "tracking_uri"}
GENERATED = Path("outputs") / "generated"  # where images go without out=


def parse(argv: list[str]) -> dict[str, str]:
    args = {}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"unknown argument {a!r}\n{USAGE}")
        args[key] = value
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
    if "checkpoint" in args:
        _from_checkpoint(args, out)
    else:
        try:
            _from_registry(args, out)
        except WhichSubject as exc:  # several subjects registered: the user names one
            print(exc, file=sys.stderr)
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
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = settings(args, recorded)
    if recorded is None:
        print(f"note: no evaluation record beside {path.parent} (its trial's eval/metrics.json); "
              "using the pipeline's defaults: pass size=, steps=, guidance= to choose", flush=True)
        s.update({k: v for k, v in {"num_inference_steps": 50, "guidance_scale": 5.0, "height": 1024,
                                    "width": 1024}.items() if s[k] is None})  # StableDiffusionXLPipeline's
    print(plan_line(s, f"{path.parent} on {args['base']}", device, recorded), flush=True)
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(args["base"])
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="checkpoint")
    if s["lora_scale"] != 1.0:
        pipe.set_adapters(["checkpoint"], adapter_weights=[s["lora_scale"]])
    pipe.to(device)
    if s["seed"] is not None:
        torch.manual_seed(s["seed"])
    kw = {k: s[k] for k in ("num_inference_steps", "guidance_scale", "height", "width")}
    image = pipe(prompt=args["prompt"], **kw).images[0]
    out.parent.mkdir(parents=True, exist_ok=True)  # only once there is an image to put in it
    image.save(out)


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
    import mlflow

    store = args.get("tracking_uri") or default_store()
    mlflow.set_tracking_uri(store)
    uri = champion_uri(store, args.get("subject"), args.get("model"))
    version = registered_version(uri, store)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:
        raise SystemExit(f"cannot load {uri} from {store} ({type(exc).__name__}: {exc}); "
                         "run a sweep first, or pass model=... / tracking_uri=...") from None
    verify_registered(uri, local, version)
    from mlflow.models import Model

    meta = Model.load(str(local))
    recorded, what = None, uri
    if version is not None:
        what = f"{uri} (version {version.version}: trial {version.tags.get('trial', '?')} step " \
               f"{version.tags.get('step', '?')})"
        if version.tags.get(GENERATION_TAG):
            recorded = json.loads(version.tags[GENERATION_TAG])
    if recorded is None and (meta.metadata or {}).get("generation"):
        recorded = meta.metadata["generation"]
    s = settings(args, recorded)
    schema = meta.get_params_schema()
    own = {p.name: p.default for p in schema.params} if schema else {}
    if recorded is None:
        print(f"note: {uri} has no recorded evaluation settings (registered before they were recorded); using the "
              "model's own defaults: pass size=, steps=, guidance= to choose", flush=True)
    for k in ("num_inference_steps", "guidance_scale", "height", "width"):
        if s[k] is None:
            s[k] = own.get(k)
    from mlflow.diffusers import _detect_device

    print(plan_line(s, what, _detect_device(), recorded), flush=True)
    import pandas as pd
    import torch

    model = mlflow.pyfunc.load_model(str(local))
    if s["lora_scale"] != 1.0:  # the flavour loads the LoRA at full strength
        pipe = model.get_raw_model()
        names = pipe.get_active_adapters()
        pipe.set_adapters(names, adapter_weights=[s["lora_scale"]] * len(names))
    if s["seed"] is not None:
        torch.manual_seed(s["seed"])  # the pipeline draws its noise from the global generator: as eval's seed
    params = {k: s[k] for k in ("num_inference_steps", "guidance_scale", "height", "width") if s[k] is not None}
    [png] = model.predict(pd.DataFrame({"prompt": [args["prompt"]]}), params=params)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)


if __name__ == "__main__":
    raise SystemExit(main())
