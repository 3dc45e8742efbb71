"""LoRA training speed and memory on the SDXL-base architecture (random weights, 1024 px).

Measures, in one run on one GPU: our trainer (one trial, batch 1, rank 4, bf16; with and without gradient
checkpointing), packs of K trials in one pass of the base (--packs; one sample per trial per step, different
learning rates), and, when --reference points at diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py,
that script with the same settings as the reference-equivalent baseline. Writes
bench/results/single_trial_<gpu>.json and prints a table.

    python bench/single_trial.py --reference /path/to/train_dreambooth_lora_sdxl.py --packs 3 8
    python bench/single_trial.py --tiny --out /tmp/bench   # a check of the script on the CPU (tests/test_bench.py)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from trainer import DataConfig, LoraSettings, ModelConfig, TrainConfig, TrialSpec, train  # noqa: E402
from trainer.models import release_models, resolve_source  # noqa: E402

PROMPT = "a photo of sks man"
# the measured setting, and the tiny check's (the tiny model on the CPU at 64 px: tests/test_bench.py)
FULL = {"model": "sdxl_base_random", "device": "cuda", "resolution": 1024, "eval_steps": 30}
TINY = {"model": "tiny", "device": "cpu", "resolution": 64, "eval_steps": 2}


def model_preset(name: str) -> ModelConfig:
    raw = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


def random_photos(folder: Path, n: int = 5, size: int = 1024, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=95)
    return folder


def ours(model: ModelConfig, photos: Path, work: Path, cache: Path, steps: int, pack: int = 1, peft: bool = False,
         class_dir: Path | None = None, setting: dict = FULL, **train_kw) -> dict:
    """Our trainer on `pack` trials (different LRs and seeds) in one call; `peft`: the lone-trial path instead."""
    res = setting["resolution"]
    data = DataConfig(instance_dir=str(photos), instance_prompt=PROMPT, resolution=res, min_images=1)
    if class_dir is not None:  # prior preservation with given class images (generating them is not what we time)
        data = DataConfig(instance_dir=str(photos), instance_prompt=PROMPT, resolution=res, min_images=1,
                          with_prior_preservation=True, class_dir=str(class_dir), class_prompt="a photo of a man",
                          num_class_images=5)
    train_kw.setdefault("compile", False)  # rows say what they measure; "auto" would depend on --steps
    specs = [TrialSpec(f"bench{k}", LoraSettings(rank=4),
                       TrainConfig(lr=1e-4 * (k + 1), max_steps=steps, checkpoint_every=steps, mixed_precision="bf16",
                                   device=setting["device"], resume=False, seed=k, **train_kw), Path(tempfile.mkdtemp(dir=work)))
             for k in range(pack)]
    tic = time.perf_counter()
    results = train(specs, model, data, cache, progress=False, pack=not peft)
    assert all(r.status == "finished" for r in results), [r.error for r in results]
    r = results[0]
    per_sample = 2 if class_dir is not None else 1
    return {"trials": pack, "ms_per_step": r.ms_per_step, "samples_per_s": pack * per_sample * 1000 / r.ms_per_step,
            "peak_memory_gib": r.peak_memory_gib,
            "peak_memory_gib_per_trial": r.peak_memory_gib / pack if r.peak_memory_gib is not None else None,
            "steps": steps, "setup_s": r.setup_seconds, "pack_size": r.pack_size,
            "wall_s_incl_setup": time.perf_counter() - tic, "settings": {k: str(v) for k, v in train_kw.items()}}


def eval_speed(model_dir: str, batch: int, compiled: bool, lora: str = "", setting: dict = FULL) -> dict:
    """Seconds per 1024 px image (30 steps, CFG) at `batch` images per pipeline call, the way a sweep scores:
    the study's prompts, VAE decode included. `compiled`: the UNet's regions under torch.compile as a sweep
    compiles them for generating (common/compiling.py), whose cost (the warm-up's extra time) is reported.
    `lora`: a rank-4 LoRA on the UNet's attention projections (as a checkpoint carries), applied by peft's adapter
    layers ("peft") or merged into the weights as evaluation scores checkpoints ("merged", common.lorafile.merged)."""
    from evaluation import EvalConfig
    from evaluation import generate as gen
    from common import lorafile as lora_mod
    from trainer.lora import unet_config  # where the trainer's LoRA settings become peft's (it moved from common)
    from common.compiling import compiled_for_generation

    device = torch.device(setting["device"])
    pipe, _ = gen.load_pipeline(model_dir, device)
    if lora:
        pipe.unet.add_adapter(unet_config(LoraSettings(rank=4)), adapter_name="bench")
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
    applied = lora_mod.merged(pipe.unet) if lora == "merged" else contextlib.nullcontext()
    cfg = EvalConfig(clip_model="unused", resolution=setting["resolution"], num_inference_steps=setting["eval_steps"],
                     device=setting["device"], batch_size=batch, seeds=list(range(max(batch, 2))))
    reps = 2 if batch < 8 else 1
    prompts = EvalConfig.__dataclass_fields__["prompts"].default_factory()[:1]
    try:
        with applied, compiled_for_generation(pipe.unet, compiled):
            tic = time.perf_counter()  # a 2-step warm-up at the timed batch shape (compiles, if compiling)
            gen.generate(pipe, None, prompts, replace(cfg, num_inference_steps=2, seeds=cfg.seeds[:batch]), "warm-up")
            record.sync(device)
            warm = time.perf_counter() - tic
            record.reset_peak(device)
            tic = time.perf_counter()
            for _ in range(reps):
                gen.generate(pipe, None, prompts, replace(cfg, seeds=cfg.seeds[:batch]), f"batch {batch}")
            record.sync(device)
            s_img = (time.perf_counter() - tic) / (reps * batch)
    finally:
        gen._PIPES.clear()  # later rows measure training memory without this pipeline held
    return {"batch": batch, "lora": lora or None, "s_per_image": s_img, "images_per_s": 1 / s_img, "ms_per_step": 1000 * s_img,
            "samples_per_s": 1 / s_img, "peak_memory_gib": record.peak_gib(device),
            "setup_s": max(0.0, warm - s_img * batch * 2 / setting["eval_steps"]), "compiled": compiled}


def reference(script: Path, model_dir: str, photos: Path, work: Path, steps: int, setting: dict = FULL) -> dict:
    out_json = work / "reference.json"
    cmd = [sys.executable, str(ROOT / "bench" / "reference_timer.py"), str(out_json), str(script),
           f"--pretrained_model_name_or_path={model_dir}", f"--instance_data_dir={photos}",
           f"--instance_prompt={PROMPT}", f"--output_dir={work / 'reference_out'}",
           f"--resolution={setting['resolution']}", "--train_batch_size=1", "--gradient_accumulation_steps=1",
           "--learning_rate=1e-4", "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--max_train_steps={steps}",
           f"--mixed_precision={'bf16' if setting['device'] == 'cuda' else 'no'}", "--rank=4", "--seed=0",
           "--report_to=all", f"--checkpointing_steps={steps * 10}"]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rec = json.loads(out_json.read_text())
    ms = 1000 * statistics.median(rec["step_seconds"][2:])
    return {"ms_per_step": ms, "samples_per_s": 1000 / ms, "peak_memory_gib": rec["peak_memory_gib"], "steps": rec["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per row (default 60; --tiny 4)")
    ap.add_argument("--reference", type=Path, help="diffusers' train_dreambooth_lora_sdxl.py (same version as installed)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdxl-bench")
    ap.add_argument("--packs", type=int, nargs="*", default=None,
                    help="also train packs of these many trials (--tiny: 2)")
    ap.add_argument("--eval-batches", type=int, nargs="*", default=None,
                    help="time generation at these batch sizes (--tiny: 1 2)")
    ap.add_argument("--only", nargs="*", help="run only these rows (names as in the table)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other rows of this GPU's existing JSON (remeasure some rows with --only)")
    record.add_options(ap)
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench/single_trial.py needs a CUDA GPU: it measures SDXL-size training (--tiny: a check of the "
                 "script on the CPU)")
    setting = TINY if args.tiny else FULL
    args.steps = args.steps or (4 if args.tiny else 60)
    args.packs = args.packs if args.packs is not None else ([2] if args.tiny else [])
    args.eval_batches = args.eval_batches if args.eval_batches is not None else ([1, 2] if args.tiny else [])
    args.out = record.out_folder(args, "single_trial")
    args.device = record.device_name(setting["device"])
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.cache or args.work / "cache"
    model = model_preset(setting["model"])
    tic = time.perf_counter()
    model_dir = resolve_source(model, cache)  # build once with random weights, saved in fp16
    build_s = time.perf_counter() - tic
    photos = random_photos(args.work / "photos", size=setting["resolution"])

    class_photos = random_photos(args.work / "class_photos", size=setting["resolution"], seed=1)
    train_row = lambda **kw: lambda: ours(model, photos, args.work, cache, args.steps, setting=setting, **kw)  # noqa: E731
    speed = lambda b, compiled, lora="": lambda: eval_speed(model_dir, b, compiled, lora, setting)  # noqa: E731
    # most wanted first: each row is written as soon as it is measured, so a run cut short still reports
    plan: list[tuple[str, object]] = [
        *([("reference_diffusers_script",
            lambda: reference(args.reference, model_dir, photos, args.work, args.steps, setting))]
           if args.reference else []),
        ("ours", train_row()),  # the default: a lone trial as a pack of one, CUDA graph on
        *[(f"ours_packed_{k}", train_row(pack=k)) for k in args.packs],
        # the low-memory preset: prior preservation on (a class image beside every instance image), gradient
        # checkpointing, VAE and text encoders off the GPU after caching (the trainer always does that)
        ("low_memory_prior_preservation", train_row(class_dir=class_photos, gradient_checkpointing=True)),
        *[(f"eval_batch_{b}", speed(b, False)) for b in args.eval_batches],
        # scoring a checkpoint: its LoRA merged into the weights (what evaluation does) against peft's adapter layers
        *[(f"eval_batch_{b}_lora_{how}", speed(b, False, how)) for b in args.eval_batches[-1:]
          for how in ("merged", "peft")],
        ("ours_eager", train_row(cuda_graphs=False)),
        ("ours_peft", train_row(peft=True)),
        *[(f"ours_packed_{k}_eager", train_row(pack=k, cuda_graphs=False)) for k in args.packs[-1:]],
        *[(f"ours_packed_{k}_compiled", train_row(pack=k, compile=True)) for k in args.packs],
        *[(f"eval_batch_{b}_compiled", speed(b, True)) for b in args.eval_batches[-1:]],
        ("ours_compiled", train_row(compile=True)),
    ]
    if args.tiny:  # CUDA graphs and Inductor are what those rows measure: a CPU has neither worth timing
        plan = [(name, m) for name, m in plan if not name.endswith(("_eager", "_compiled"))]
    rows: dict[str, dict] = {}
    failures: dict[str, str] = {}
    earlier = args.out / f"single_trial_{args.device.replace(' ', '_')}.json"
    if args.merge and earlier.is_file():
        old = json.loads(earlier.read_text())
        rows = {k: {**v, "measured": v.get("measured", old["date"])} for k, v in old["results"].items()}
        failures = old.get("failed", {})
        args.reference = args.reference or old.get("reference_script")
    for name, measure in plan:
        if args.only is None or name in args.only:
            print(f"measuring {name}", flush=True)
            try:
                rows[name] = {**measure(), "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
                failures.pop(name, None)
            except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
                rows.pop(name, None)  # an earlier result of a row that now fails is not kept (--merge)
                failures[name] = f"{type(exc).__name__}: {exc}"[:2000]
            release_models()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            path = write_report(args, rows, build_s, failures)
    path = write_report(args, rows, build_s, failures)
    print_table(rows, json.loads(path.read_text())["ratios"])
    for name, why in failures.items():
        print(f"{name}: FAILED {why[:300]}")
    print(f"written {path}")


def write_report(args, rows: dict, build_s: float, failures: dict) -> Path:
    ratios = {}
    if "reference_diffusers_script" in rows:
        ref = rows["reference_diffusers_script"]
        ratios = {f"{name}_samples_per_s_vs_reference": r["samples_per_s"] / ref["samples_per_s"]
                  for name, r in rows.items() if name.startswith(("ours", "low_memory"))}
        ratios.update({f"{name}_peak_memory_per_trial_vs_reference": r["peak_memory_gib_per_trial"] / ref["peak_memory_gib"]
                       for name, r in rows.items() if name.startswith(("ours", "low_memory"))})
    if "eval_batch_1" in rows:  # the reference way of generating: one image per pipeline call
        ratios.update({f"{name}_images_per_s_vs_batch_1": r["images_per_s"] / rows["eval_batch_1"]["images_per_s"]
                       for name, r in rows.items() if name.startswith("eval_")})
    import diffusers, peft, transformers  # noqa: E401

    report = {
        "python": platform.python_version(), "cuda": torch.version.cuda, "tiny": args.tiny,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "workload": "SDXL-base architecture, random weights (fp16 on disk), 5 photos 1024x1024, batch 1 per trial, "
                    "LoRA rank 4 on to_q/to_k/to_v/to_out.0, bf16, constant LR (packs: one LR per trial); ms/step = "
                    "median, first 2 steps excluded; memory = CUDA allocator peak (of the whole pack); setup_s = "
                    "first step's extra cost (graph capture, compilation); eval rows: s per 1024 px image at 30 "
                    "steps with CFG and VAE decode, the study's first prompt",
        "reference_script": str(args.reference) if args.reference else None,
        "model_build_s": build_s, "results": rows, "ratios": ratios, "failed": failures,
        "anchors_h200": {"reference_ms_per_step": 592, "reference_peak_gib_nvidia_smi": 15.2,
                         "lean_eager_ms_per_step": 554, "lean_eager_peak_gib": 12.3,
                         "eval_batch_1_s_per_image": 2.16, "eval_batch_4_s_per_image": 1.19},
    }
    if args.tiny:
        report["workload"] = f"a check of the script ({TINY}), not a measurement"
    return record.write(args.out, "single_trial", args.device, report)


def print_table(rows: dict, ratios: dict) -> None:
    print(f"\n{'run':32s} {'trials':>6s} {'ms/step':>8s} {'samples/s':>9s} {'peak GiB':>8s} {'setup s':>7s}")
    for name, r in rows.items():
        if not name.startswith("eval_"):
            print(f"{name:32s} {r.get('trials', 1):6d} {r['ms_per_step']:8.1f} {r['samples_per_s']:9.2f} "
                  f"{r['peak_memory_gib'] or 0:8.2f} {r.get('setup_s') or 0:7.1f}")
    for name, r in rows.items():
        if name.startswith("eval_"):
            print(f"{name:32s} batch {r['batch']:3d}: {r['s_per_image']:.3f} s/image, peak {r['peak_memory_gib'] or 0:.1f} GiB, "
                  f"setup {r['setup_s']:.1f} s")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")


if __name__ == "__main__":
    main()
