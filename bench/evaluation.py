"""Evaluation throughput on the SDXL-base architecture (random weights): seconds per 1024 px image at 30 steps
with CFG, batch 1 vs batch 4, and one full evaluate() of a checkpoint (5 study prompts x 2 seeds, baseline,
prior-drift images, CLIP and dlib scoring). Writes bench/results/evaluation_<gpu>.json.

    python bench/evaluation.py
    python bench/evaluation.py --tiny --out /tmp/bench   # a check of the script on the CPU (tests/test_bench.py)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
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
    device = pipe.device
    c = replace(cfg, batch_size=batch, seeds=list(range(images)), prompts=cfg.prompts[:1])
    gen.generate(pipe, None, c.prompts, replace(c, seeds=list(range(batch))), "warm-up")
    record.sync(device)
    record.reset_peak(device)
    tic = time.perf_counter()
    gen.generate(pipe, None, c.prompts, c, f"batch {batch}")
    record.sync(device)
    return {"batch": batch, "images": images, "s_per_image": (time.perf_counter() - tic) / images,
            "peak_memory_gib": record.peak_gib(device)}


def settings(tiny: bool) -> dict:
    """The measured setting (SDXL-base architecture, 1024 px, 30 steps, the study's prompts, 2 seeds, on CUDA) or
    the tiny check's (tiny model, 64 px, 2 steps, 2 prompts, 1 seed, on the CPU)."""
    if tiny:
        return {"model": "tiny", "resolution": 64, "steps": 2, "device": "cpu", "prompts": 2, "seeds": [0],
                "batches": ((1, 2), (2, 2))}
    return {"model": "sdxl_base_random", "resolution": 1024, "steps": 30, "device": "cuda", "prompts": None,
            "seeds": [0, 1], "batches": ((1, 4), (4, 8))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdxl-bench")
    record.add_options(ap)
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench/evaluation.py needs a CUDA GPU (or --tiny for a check of the script on the CPU)")
    out = record.out_folder(args, "evaluation")
    s = settings(args.tiny)
    device = torch.device(s["device"])
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.cache or args.work / "cache"
    model = model_preset(s["model"])
    pretrained = resolve_source(model, cache)
    photos = random_photos(args.work / "photos", size=s["resolution"])
    trial = Path(tempfile.mkdtemp(dir=args.work))
    [r] = train([TrialSpec("eval-bench", LoraSettings(rank=4), TrainConfig(max_steps=2, checkpoint_every=2,
                                                                           device=s["device"], resume=False), trial)],
                model, DataConfig(instance_dir=str(photos), resolution=s["resolution"], min_images=1), cache,
                progress=False)
    release_models()  # evaluation loads its own pipeline here, as it would outside a sweep
    cfg = EvalConfig(clip_model=build_clip(TINY_CLIP, cache), resolution=s["resolution"],
                     num_inference_steps=s["steps"], device=s["device"], seeds=s["seeds"])
    cfg = replace(cfg, prompts=cfg.prompts[:s["prompts"]] if s["prompts"] else cfg.prompts)
    pipe, _ = gen.load_pipeline(pretrained, device)
    rows = [seconds_per_image(pipe, cfg, batch, images) for batch, images in s["batches"]]
    record.reset_peak(device)
    tic = time.perf_counter()
    # the random training photos hold no face: the demo subject is the identity, so the dlib path runs for real
    refs = ROOT / "assets" / "demo_subject"
    metrics = evaluate(r.checkpoints, replace(cfg, batch_size=4), instance_dir=refs, out_dir=args.work / "eval",
                       pretrained=pretrained)
    full_s = time.perf_counter() - tic
    n_images = 2 * cfg.images_per_checkpoint()  # baseline + checkpoint, prompts + prior-drift
    import diffusers

    report = {
        "diffusers": diffusers.__version__, "tiny": args.tiny,
        "workload": f"StableDiffusionXLPipeline, model preset {s['model']} with random weights, "
                    f"{s['resolution']}x{s['resolution']}, {s['steps']} steps, CFG on, rank-4 LoRA loaded; s/image "
                    "over a timed run after a warm-up batch",
        "generation": rows,
        "ratios": {"batch_speedup_vs_batch1": rows[0]["s_per_image"] / rows[1]["s_per_image"]},
        "full_evaluate": {"checkpoints": len(r.checkpoints), "images": n_images, "seconds": full_s,
                          "s_per_image": full_s / n_images, "peak_memory_gib": record.peak_gib(device),
                          "metrics": metrics},
        "anchors_h200": {"batch1_s_per_image": 2.16, "batch1_peak_gib": 9.0, "batch4_s_per_image": 1.19,
                         "batch4_peak_gib": 14.6},
    }
    path = record.write(out, "evaluation", record.device_name(device), report)
    for row in rows:
        peak = f", peak {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else ""
        print(f"batch {row['batch']}: {row['s_per_image']:.2f} s/image{peak}")
    print(f"full evaluate: {full_s:.1f} s for {n_images} images ({full_s / n_images:.2f} s/image incl. scoring)")
    print(f"written {path}")


if __name__ == "__main__":
    main()
