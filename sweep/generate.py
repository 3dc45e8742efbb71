"""Generate with the champion (or any registered version, or a checkpoint folder).

    python -m sweep.generate prompt="a picture of sks man showing the thumbs up gesture on the moon"
    python -m sweep.generate prompt="..." model=models:/sdxl-lora-champion/3 out=moon.png steps=30 seed=1
    python -m sweep.generate prompt="..." checkpoint=outputs/sweeps/.../checkpoints/step-000400 base=<model>
"""
from __future__ import annotations

import sys
from pathlib import Path

USAGE = ("usage: python -m sweep.generate prompt=\"...\" [model=models:/sdxl-lora-champion@champion | "
         "checkpoint=<folder> base=<hub id or folder>] [out=generated.png] [steps=N] [guidance=G] [size=PX] "
         "[seed=S] [tracking_uri=URI]")
KEYS = {"prompt", "model", "checkpoint", "base", "out", "steps", "guidance", "size", "seed", "tracking_uri"}


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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    gen_kwargs = {}
    if "steps" in args:
        gen_kwargs["num_inference_steps"] = int(args["steps"])
    if "guidance" in args:
        gen_kwargs["guidance_scale"] = float(args["guidance"])
    if "size" in args:
        gen_kwargs["height"] = gen_kwargs["width"] = int(args["size"])
    out = Path(args.get("out", "generated.png"))
    import torch

    if "seed" in args:
        torch.manual_seed(int(args["seed"]))
    if "checkpoint" in args:
        from diffusers import StableDiffusionXLPipeline

        from evaluation.generate import EvalInputError, check_lora_file

        try:
            path = check_lora_file(Path(args["checkpoint"]))  # safetensors only, its recorded hash verified
        except EvalInputError as exc:
            raise SystemExit(str(exc)) from None
        pipe = StableDiffusionXLPipeline.from_pretrained(args["base"])
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        pipe.to("cuda" if torch.cuda.is_available() else "cpu")
        pipe(prompt=args["prompt"], **gen_kwargs).images[0].save(out)
    else:
        import mlflow
        import pandas as pd

        from .tracking import TrackingConfig, store_uri

        mlflow.set_tracking_uri(args.get("tracking_uri") or store_uri(TrackingConfig(), Path("."))[0])
        uri = args.get("model", "models:/sdxl-lora-champion@champion")
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except Exception as exc:
            raise SystemExit(f"cannot load {uri} from {mlflow.get_tracking_uri()} ({type(exc).__name__}: {exc}); "
                             "run a sweep first, or pass model=... / tracking_uri=...") from None
        verify_registered(uri, local)
        model = mlflow.pyfunc.load_model(str(local))
        [png] = model.predict(pd.DataFrame({"prompt": [args["prompt"]]}), params=gen_kwargs or None)
        out.write_bytes(png)
    print(f"written {out}")
    return 0


def verify_registered(uri: str, local: Path) -> None:
    """The downloaded LoRA against the sha256 recorded on its model version (and in its checkpoint.json)."""
    from mlflow import MlflowClient

    from evaluation.generate import EvalInputError, verify_hash

    files = list(local.rglob("pytorch_lora_weights.safetensors"))
    if not files:
        raise SystemExit(f"{uri}: no pytorch_lora_weights.safetensors in the registered model")
    expected = None
    if uri.startswith("models:/"):
        name, _, ref = uri[len("models:/"):].partition("@")
        client = MlflowClient()
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = uri[len("models:/"):].partition("/")
            version = client.get_model_version(name, number)
        expected = version.tags.get("lora_sha256")
    try:
        verify_hash(files[0], expected)  # against the version's tag and the checkpoint.json beside the file
    except EvalInputError as exc:
        raise SystemExit(f"{uri}: {exc}") from None


if __name__ == "__main__":
    raise SystemExit(main())
