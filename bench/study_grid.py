"""The original study's whole grid, end to end on one GPU, through the command line a user types.

3 learning rates x 500 steps at 1024 px, a checkpoint every 100 steps, every checkpoint scored with the study's
5 prompts x 4 images (30 steps, CFG) plus the prior-drift images, CLIP and dlib face scores, selection and report;
SDXL-base architecture with random weights and a CLIP-L-sized CLIP with random weights (no downloads here).
The timed span starts with `python -m sweep` and ends when it exits, model loading included (building the random
models and saving them to folders beforehand is not timed: the sweep loads them as it loads downloaded ones). Writes bench/results/study_grid_<gpu>.json.

    python bench/study_grid.py
    python bench/study_grid.py --tiny --out /tmp/bench   # a check of the script on the CPU (tests/test_bench.py)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from bench.single_trial import model_preset  # noqa: E402
from sweep.offline_models import build_clip  # noqa: E402
from sweep.phases import read_phases  # noqa: E402
from trainer.models import resolve_source  # noqa: E402

CLIP_L = {"seed": 0, "projection_dim": 768,  # CLIP ViT-L/14's sizes (the default eval.clip_model), random weights
          "text_config": {"vocab_size": 1000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "max_position_embeddings": 77},
          "vision_config": {"image_size": 224, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                            "num_hidden_layers": 24, "num_attention_heads": 16}}


def clip_architecture(model: str) -> dict:
    """CLIP-L's sizes (the default eval.clip_model) with random weights; for the tiny check the offline demo's tiny
    CLIP (conf/eval/demo.yaml), which scores in milliseconds on a CPU instead of seconds."""
    if model != "tiny":
        return CLIP_L
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "eval" / "demo.yaml").clip_architecture)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--images", type=int, default=4, help="images per prompt and checkpoint")
    ap.add_argument("--work", type=Path, default=None, help="default: <tmp>/sdxl-grid (--tiny: a new temporary one)")
    ap.add_argument("--model", default="sdxl_base_random", help="model preset")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    record.add_options(ap)
    args = ap.parse_args()
    if args.tiny:  # 3 trials x 2 steps, one checkpoint each, 1 seed, 2 denoising steps at 64 px, on the CPU
        args.model, args.resolution, args.steps, args.every, args.images = "tiny", 64, 2, 2, 1
        args.overrides = ["eval.num_inference_steps=2", "train.device=cpu", *args.overrides]
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("bench/study_grid.py needs a CUDA GPU (--tiny: a check of the script on the CPU)")
    out = record.out_folder(args, "study_grid")
    if args.work is None:
        args.work = Path(tempfile.mkdtemp(prefix="grid-")) if args.tiny else Path(tempfile.gettempdir()) / "sdxl-grid"
    args.work.mkdir(parents=True, exist_ok=True)
    cache = (args.cache or args.work / ".cache").resolve()
    resolve_source(model_preset(args.model), cache)  # built (not timed) where the sweep will look
    clip = build_clip(clip_architecture(args.model), cache)  # the sweep loads it from its folder, as the hub's
    seeds = "[" + ",".join(str(i) for i in range(args.images)) + "]"
    cmd = [sys.executable, "-m", "sweep", "-m", "experiment=none", f"model={args.model}", "data=photos", "eval=default",
           f"data.resolution={args.resolution}",
           f"data.instance_dir={ROOT / 'assets' / 'demo_subject'}", "data.allow_upscale=true", "data.min_images=3",
           "lr=1e-4,1e-5,5e-4", f"steps={args.steps}", f"train.checkpoint_every={args.every}", f"eval.seeds={seeds}",
           f"eval.clip_model={clip}", "tracking.enabled=false",
           f"paths.root={args.work}", f"paths.cache_dir={cache}", "progress=false", *args.overrides]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    (args.work / "sweep.log").write_text(proc.stdout + proc.stderr)  # timestamped: where the rest of the time went
    log_tail = (proc.stdout + proc.stderr)[-6000:]
    if proc.returncode != 0:
        print(log_tail)
        sys.exit(f"the sweep failed with exit status {proc.returncode}")
    sweep = max((args.work / "outputs" / "sweeps").iterdir())
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    checkpoints = sum(len(t["checkpoints"]) for t in trials)
    # where the time went, as the sweep's end reports it (sweep/phases.py)
    phases = read_phases(sweep)
    eval_split = {"images": phases["images"], "generate_s": phases["generating_s"], "score_s": phases["scoring_s"],
                  "s_per_image_generated": phases["generating_s"] / max(phases["images"], 1)}
    n_prompts = 5
    images = (checkpoints + 1) * (n_prompts + 1) * args.images  # + baseline; + prior-drift prompt
    gpu = record.device_name("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    import diffusers

    report = {
        "diffusers": diffusers.__version__, "tiny": args.tiny, "command": " ".join(cmd[1:]),
        "wall_s": wall, "wall_min": wall / 60, "trials": len(trials), "checkpoints_scored": checkpoints,
        "images_generated": images, "evaluation": eval_split, "phases": phases,
        "per_trial": [{k: t.get(k) for k in ("name", "status", "steps", "ms_per_step", "pack_size", "setup_seconds",
                                               "seconds", "peak_memory_gib", "objective")} for t in trials],
        "target_min": 8,
        "reference_way_estimate_min": {"note": "anchors (H200): 3 x 500 x 0.592 s training + 300 images x 2.16 s",
                                       "value": (3 * 500 * 0.592 + 300 * 2.16) / 60},
    }
    path = record.write(out, "study_grid", gpu, report)
    print(log_tail[-2500:])
    print(f"evaluation: {eval_split}")
    print(f"\nwhole grid: {wall / 60:.2f} min ({len(trials)} trials, {checkpoints} checkpoints, {images} images) "
          f"on {gpu}; written {path}")


if __name__ == "__main__":
    main()
