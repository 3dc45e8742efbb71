"""Several GPUs of one host against one, and packs against one trial per process: the same 4-trial sweep, back to
back on the same machine.

Each run is the command a user types, `python -m sweep -m ... cluster=gpus hydra.launcher.gpus=[...]
hydra.launcher.pack_size=N`: one batch process per GPU, each pinned to a free one, its trials trained as packs of
up to N (1: a process per trial). SDXL-base architecture with random weights (built once beforehand,
not timed), short trials (default 100 steps at 1024 px, a checkpoint every 50, each scored on the study's 5
prompts), CLIP-L-sized random CLIP and dlib. The timed span is the whole command, model loading included.
Which GPU each trial ran on, and when, comes from its result.json. Writes bench/results/multi_gpu_<gpu>.json.

    python bench/multi_gpu.py                 # GPUs [0] then [0,1], a process per trial
    python bench/multi_gpu.py --gpus 0 0,1,2,3
    python bench/multi_gpu.py --gpus 0 --pack-sizes 1 4   # one GPU: a process per trial, then one pack of 4
    python bench/multi_gpu.py --gpus 0 0,1 --pack-sizes 3 --lrs 1e-4,2e-4,5e-4,1e-5,3e-4,5e-5 --steps 500 --every 100
        # 6 trials in packs of 3: one GPU trains both packs in turn, two GPUs one pack each
    python bench/multi_gpu.py --tiny --out /tmp/bench   # a check of the script on the CPU (tests/test_bench.py):
        # 2 tiny trials, hydra/launcher=processes with one CPU process (--gpus cpu), one pack of 2
"""
from __future__ import annotations

import argparse
import json
import shutil
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
from bench.study_grid import clip_architecture  # noqa: E402
from sweep.offline_models import build_clip  # noqa: E402
from trainer.models import resolve_source  # noqa: E402

LRS = "1e-4,2e-4,5e-4,1e-5"


def launcher(gpus: str, pack_size: int) -> list[str]:
    """The overrides that place the sweep: one process per GPU in `gpus` ("0,1"), or ("cpu") one CPU process."""
    if gpus == "cpu":
        return ["hydra/launcher=processes", "hydra.launcher.n_workers=1", f"hydra.launcher.pack_size={pack_size}",
                "train.device=cpu"]
    return ["cluster=gpus", f"hydra.launcher.gpus=[{gpus}]", f"hydra.launcher.pack_size={pack_size}"]


def gpu_samples() -> subprocess.Popen | None:
    """nvidia-smi sampling every 500 ms while a sweep runs (None where there is no nvidia-smi: a CPU check)."""
    if shutil.which("nvidia-smi") is None:
        return None
    return subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used,utilization.gpu",
                             "--format=csv,noheader,nounits", "-lms", "500"], stdout=subprocess.PIPE, text=True)


def run(gpus: str, pack_size: int, args) -> dict:
    work = args.work / f"gpus_{gpus.replace(',', '-')}_pack_{pack_size}"
    cmd = [sys.executable, "-m", "sweep", "-m", "experiment=none", f"model={args.model}", "data=photos",
           "eval=default", f"data.resolution={args.resolution}", f"data.instance_dir={ROOT / 'assets' / 'demo_subject'}",
           "data.allow_upscale=true", "data.min_images=3", f"lr={args.lrs}", f"steps={args.steps}",
           f"train.checkpoint_every={args.every}", "eval.seeds=[0]", f"eval.clip_model={args.clip}",
           "tracking.enabled=false", *launcher(gpus, pack_size), f"paths.root={work}",
           f"paths.cache_dir={args.cache}", "progress=false", *args.overrides]
    tic = time.time()
    smi = gpu_samples()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.time() - tic
    samples = []
    if smi is not None:
        smi.terminate()
        samples = [ln.split(", ") for ln in smi.communicate()[0].splitlines() if ln.count(",") == 2]
    per_gpu = {}
    for i, mem, util in samples:  # what every physical GPU did while the sweep ran
        g = per_gpu.setdefault(int(i), {"peak_memory_mib": 0, "busy_samples": 0, "samples": 0})
        g["peak_memory_mib"] = max(g["peak_memory_mib"], int(mem))
        g["busy_samples"] += int(util) > 50
        g["samples"] += 1
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-3000:])
        print(f"the sweep on GPUs [{gpus}] ended with exit status {proc.returncode}")
    sweep = max((work / "outputs" / "sweeps").iterdir())
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    spans = sorted((t["started_at"] - tic, t["ended_at"] - tic, t["gpu"]) for t in trials if "started_at" in t)
    overlapped = any(b[0] < a[1] and a[2] != b[2] for a, b in zip(spans, spans[1:]))
    used = [] if gpus == "cpu" else [int(g) for g in gpus.split(",")]
    return {"gpus": used, "pack_size": pack_size, "wall_s": wall, "exit_status": proc.returncode,
            "command": " ".join(cmd[1:]), "images": len(list(sweep.glob("*/eval/images/*/*.png"))),
            "gpus_used": max(len(used), 1),
            "nvidia_smi": per_gpu,
            "trials_on_two_gpus_at_once": overlapped,
            "per_trial": [{"name": t["name"], "gpu": t.get("gpu"), "status": t["status"], "error": t.get("error"),
                           "start_s": t.get("started_at", tic) - tic, "end_s": t.get("ended_at", tic) - tic,
                           "ms_per_step": t.get("ms_per_step"), "pack_size_trained": t.get("pack_size"),
                           "seconds_training": t.get("seconds"), "device": t.get("device")} for t in trials]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", nargs="+", default=["0", "0,1"], help="GPU lists to compare, in order")
    ap.add_argument("--pack-sizes", nargs="+", type=int, default=[1],
                    help="hydra.launcher.pack_size values to compare on each GPU list (1: a process per trial)")
    ap.add_argument("--lrs", default=LRS, help="the swept learning rates, comma-separated: one trial each")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--model", default="sdxl_base_random")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=None,
                    help="default: <tmp>/sdxl-multi-gpu (--tiny: a new temporary one)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    record.add_options(ap)
    args = ap.parse_args()
    if args.tiny:  # 2 trials x 2 steps in one CPU process, as one pack of 2, 2 denoising steps at 64 px
        args.model, args.resolution, args.steps, args.every, args.lrs = "tiny", 64, 2, 2, "1e-4,5e-4"
        args.gpus, args.pack_sizes = ["cpu"], [2]
        args.overrides = ["eval.num_inference_steps=2", *args.overrides]
    if args.work is None:
        args.work = Path(tempfile.mkdtemp(prefix="multi-gpu-")) if args.tiny else \
            Path(tempfile.gettempdir()) / "sdxl-multi-gpu"
    args.cache = (args.cache or args.work / ".cache").resolve()
    if args.build_only:
        resolve_source(model_preset(args.model), args.cache)
        build_clip(clip_architecture(args.model), args.cache)
        return
    out = record.out_folder(args, "multi_gpu")
    wanted = max(0 if g == "cpu" else len(g.split(",")) for g in args.gpus)
    if torch.cuda.device_count() < wanted:
        sys.exit(f"bench/multi_gpu.py: {torch.cuda.device_count()} CUDA GPU(s) visible, --gpus {args.gpus} needs more "
                 "(--tiny: a check of the script on the CPU)")
    # the models, built once (not timed) in a process of their own, so that no memory stays on a GPU
    subprocess.run([sys.executable, __file__, "--build-only", "--model", args.model, "--work", str(args.work),
                    "--cache", str(args.cache)], check=True)
    args.clip = build_clip(clip_architecture(args.model), args.cache)  # built above: loaded from its folder
    runs = [run(g, n, args) for g in args.gpus for n in args.pack_sizes]
    device = record.device_name("cuda:0" if wanted else "cpu")
    import diffusers

    report = {"gpus_on_host": torch.cuda.device_count(), "tiny": args.tiny,
              "diffusers": diffusers.__version__, "trials": len(args.lrs.split(",")), "steps": args.steps,
              "checkpoint_every": args.every, "runs": runs,
              "speedup": {f"{r['gpus']} pack_size={r['pack_size']}": runs[0]["wall_s"] / r["wall_s"] for r in runs},
              # the speed-up against the first run divided by the ratio of their GPU counts (>= 0.9: good scaling)
              "speedup_per_gpu": {f"{r['gpus']} pack_size={r['pack_size']}":
                                  runs[0]["wall_s"] / r["wall_s"] * runs[0]["gpus_used"] / r["gpus_used"] for r in runs}}
    path = record.write(out, "multi_gpu", device, report)
    for r in runs:
        print(f"GPUs {r['gpus']} pack_size={r['pack_size']}: {r['wall_s']:.1f} s ({runs[0]['wall_s'] / r['wall_s']:.2f}x), "
              f"{r['images']} images, "
              f"trials on GPUs {[t['gpu'] for t in r['per_trial']]}, side by side on two GPUs: "
              f"{r['trials_on_two_gpus_at_once']}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
