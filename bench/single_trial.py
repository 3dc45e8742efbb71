"""LoRA training speed and memory on the SDXL-base architecture (random weights, 1024 px).

Measures, in one run on one GPU: our trainer (one trial, batch 1, rank 4, bf16; with and without gradient
checkpointing), packs of K trials in one pass of the base (--packs; one sample per trial per step, different
learning rates), and, when --reference points at diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py,
that script with the same settings as the reference-equivalent baseline. Writes
bench/results/single_trial_<gpu>.json and prints a table.

    python bench/single_trial.py --reference /path/to/train_dreambooth_lora_sdxl.py --packs 3 8
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import DataConfig, LoraSettings, ModelConfig, TrainConfig, TrialSpec, train  # noqa: E402
from trainer.models import release_models, resolve_source  # noqa: E402

PROMPT = "a photo of sks man"


def model_preset(name: str) -> ModelConfig:
    raw = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


def random_photos(folder: Path, n: int = 5, size: int = 1024) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=95)
    return folder


def ours(model: ModelConfig, photos: Path, work: Path, cache: Path, steps: int, pack: int = 1, **train_kw) -> dict:
    data = DataConfig(instance_dir=str(photos), instance_prompt=PROMPT, resolution=1024, min_images=1)
    specs = [TrialSpec(f"bench{k}", LoraSettings(rank=4),
                       TrainConfig(lr=1e-4 * (k + 1), max_steps=steps, checkpoint_every=steps, mixed_precision="bf16",
                                   device="cuda", resume=False, seed=k, **train_kw), Path(tempfile.mkdtemp(dir=work)))
             for k in range(pack)]
    tic = time.perf_counter()
    results = train(specs, model, data, cache, progress=False)
    assert all(r.status == "finished" for r in results), [r.error for r in results]
    r = results[0]
    return {"trials": pack, "ms_per_step": r.ms_per_step, "samples_per_s": pack * 1000 / r.ms_per_step,
            "peak_memory_gib": r.peak_memory_gib, "peak_memory_gib_per_trial": r.peak_memory_gib / pack,
            "steps": steps, "wall_s_incl_setup": time.perf_counter() - tic}


def reference(script: Path, model_dir: str, photos: Path, work: Path, steps: int) -> dict:
    out_json = work / "reference.json"
    cmd = [sys.executable, str(ROOT / "bench" / "reference_timer.py"), str(out_json), str(script),
           f"--pretrained_model_name_or_path={model_dir}", f"--instance_data_dir={photos}",
           f"--instance_prompt={PROMPT}", f"--output_dir={work / 'reference_out'}", "--resolution=1024",
           "--train_batch_size=1", "--gradient_accumulation_steps=1", "--learning_rate=1e-4",
           "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--max_train_steps={steps}",
           "--mixed_precision=bf16", "--rank=4", "--seed=0", "--report_to=all", f"--checkpointing_steps={steps * 10}"]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rec = json.loads(out_json.read_text())
    ms = 1000 * statistics.median(rec["step_seconds"][2:])
    return {"ms_per_step": ms, "samples_per_s": 1000 / ms, "peak_memory_gib": rec["peak_memory_gib"], "steps": rec["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reference", type=Path, help="diffusers' train_dreambooth_lora_sdxl.py (same version as installed)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdxl-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--packs", type=int, nargs="*", default=[], help="also train packs of these many trials")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/single_trial.py needs a CUDA GPU: it measures SDXL-size training")
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "cache"
    model = model_preset("sdxl_base_random")
    tic = time.perf_counter()
    model_dir = resolve_source(model, cache)  # build once with random weights, saved in fp16
    build_s = time.perf_counter() - tic
    photos = random_photos(args.work / "photos")

    rows = {"ours": ours(model, photos, args.work, cache, args.steps),
            "ours_gradient_checkpointing": ours(model, photos, args.work, cache, max(10, args.steps // 2),
                                                gradient_checkpointing=True)}
    for k in args.packs:
        rows[f"ours_packed_{k}"] = ours(model, photos, args.work, cache, args.steps, pack=k)
    release_models()
    if args.reference:
        rows["reference_diffusers_script"] = reference(args.reference, model_dir, photos, args.work, args.steps)
    ratios = {}
    if "reference_diffusers_script" in rows:
        ref = rows["reference_diffusers_script"]
        ratios = {"speedup_vs_reference": ref["ms_per_step"] / rows["ours"]["ms_per_step"],
                  "memory_vs_reference": rows["ours"]["peak_memory_gib"] / ref["peak_memory_gib"]}
        for k in args.packs:
            p = rows[f"ours_packed_{k}"]
            ratios[f"packed_{k}_samples_per_s_vs_reference"] = p["samples_per_s"] / ref["samples_per_s"]
            ratios[f"packed_{k}_memory_per_trial_vs_reference"] = p["peak_memory_gib_per_trial"] / ref["peak_memory_gib"]
    import diffusers, peft, transformers  # noqa: E401

    gpu = torch.cuda.get_device_name()
    report = {
        "benchmark": "single_trial", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu, "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "workload": "SDXL-base architecture, random weights (fp16 on disk), 5 photos 1024x1024, batch 1, LoRA rank 4 "
                    "on to_q/to_k/to_v/to_out.0, bf16, constant LR, no prior preservation; ms/step = median, "
                    "first 2 steps excluded; memory = CUDA allocator peak",
        "reference_script": str(args.reference) if args.reference else None,
        "model_build_s": build_s, "results": rows, "ratios": ratios,
        "anchors_h200": {"reference_ms_per_step": 592, "reference_peak_gib_nvidia_smi": 15.2,
                         "lean_eager_ms_per_step": 554, "lean_eager_peak_gib": 12.3},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"single_trial_{gpu.replace(' ', '_')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\n{'run':32s} {'trials':>6s} {'ms/step':>8s} {'samples/s':>9s} {'peak GiB':>8s}")
    for name, r in rows.items():
        print(f"{name:32s} {r.get('trials', 1):6d} {r['ms_per_step']:8.1f} {r['samples_per_s']:9.2f} "
              f"{r['peak_memory_gib']:8.2f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
