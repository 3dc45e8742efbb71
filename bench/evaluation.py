"""Evaluation throughput on the SDXL-base architecture (random weights): seconds per 1024 px image at 30 steps
with CFG, batch 1 vs batch 4, and one full evaluate() of a checkpoint (5 study prompts x 2 seeds, baseline,
prior-drift images, CLIP and dlib scoring). Writes bench/results/evaluation_<gpu>.json.

    python bench/evaluation.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.single_trial import model_preset, random_photos  # noqa: E402
from evaluation import EvalConfig, evaluate  # noqa: E402
from evaluation import generate as gen  # noqa: E402
from sweep.offline_models import build_clip  # noqa: E402
from trainer import DataConfig, LoraSettings, TrainConfig, TrialSpec, train  # noqa: E402
from trainer.models import release_models, resolve_source  # noqa: E402

TINY_CLIP = {"seed": 0, "projection_dim": 16,
             "text_config": {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "max_position_embeddings": 77},
             "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                               "num_hidden_layers": 2, "num_attention_heads": 4}}


def seconds_per_image(pipe, cfg: EvalConfig, batch: int, images: int) -> dict:
    c = replace(cfg, batch_size=batch, seeds=list(range(images)), prompts=cfg.prompts[:1])
    gen.generate(pipe, None, c.prompts, replace(c, seeds=list(range(batch))), "warm-up")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    gen.generate(pipe, None, c.prompts, c, f"batch {batch}")
    torch.cuda.synchronize()
    return {"batch": batch, "images": images, "s_per_image": (time.perf_counter() - tic) / images,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdxl-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/evaluation.py needs a CUDA GPU")
    cache = args.work / "cache"
    model = model_preset("sdxl_base_random")
    pretrained = resolve_source(model, cache)
    photos = random_photos(args.work / "photos")
    trial = Path(tempfile.mkdtemp(dir=args.work))
    [r] = train([TrialSpec("eval-bench", LoraSettings(rank=4), TrainConfig(max_steps=2, checkpoint_every=2, device="cuda",
                                                                           resume=False), trial)],
                model, DataConfig(instance_dir=str(photos), resolution=1024, min_images=1), cache, progress=False)
    release_models()  # evaluation loads its own pipeline here, as it would outside a sweep
    cfg = EvalConfig(clip_model=build_clip(TINY_CLIP, cache), resolution=1024, num_inference_steps=30, device="cuda")
    pipe, _ = gen.load_pipeline(pretrained, torch.device("cuda"))
    rows = [seconds_per_image(pipe, cfg, 1, 4), seconds_per_image(pipe, cfg, 4, 8)]
    torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    # the random training photos hold no face: the demo subject is the identity, so the dlib path runs for real
    refs = ROOT / "assets" / "demo_subject"
    metrics = evaluate(r.checkpoints, replace(cfg, batch_size=4), instance_dir=refs, out_dir=args.work / "eval",
                       pretrained=pretrained)
    full_s = time.perf_counter() - tic
    n_images = 2 * (len(cfg.prompts) * len(cfg.seeds) + len(cfg.seeds))  # baseline + checkpoint, prompts + prior
    gpu = torch.cuda.get_device_name()
    import diffusers

    report = {
        "benchmark": "evaluation", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "workload": "StableDiffusionXLPipeline, SDXL-base architecture with random weights, bf16, 1024x1024, "
                    "30 steps, CFG on, rank-4 LoRA loaded; s/image over a timed run after a warm-up batch",
        "generation": rows,
        "ratios": {"batch4_speedup_vs_batch1": rows[0]["s_per_image"] / rows[1]["s_per_image"]},
        "full_evaluate": {"checkpoints": 1, "images": n_images, "seconds": full_s, "s_per_image": full_s / n_images,
                          "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "metrics": metrics},
        "anchors_h200": {"batch1_s_per_image": 2.16, "batch1_peak_gib": 9.0, "batch4_s_per_image": 1.19,
                         "batch4_peak_gib": 14.6},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"evaluation_{gpu.replace(' ', '_')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    for row in rows:
        print(f"batch {row['batch']}: {row['s_per_image']:.2f} s/image, peak {row['peak_memory_gib']:.1f} GiB")
    print(f"full evaluate: {full_s:.1f} s for {n_images} images ({full_s / n_images:.2f} s/image incl. scoring)")
    print(f"written {path}")


if __name__ == "__main__":
    main()
