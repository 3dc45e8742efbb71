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
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.single_trial import model_preset  # noqa: E402
from bench.study_grid import CLIP_L  # noqa: E402
from sweep.offline_models import build_clip  # noqa: E402
from trainer.models import resolve_source  # noqa: E402

LRS = "1e-4,2e-4,5e-4,1e-5"


def run(gpus: str, pack_size: int, args) -> dict:
    work = args.work / f"gpus_{gpus.replace(',', '-')}_pack_{pack_size}"
    cmd = [sys.executable, "-m", "sweep", "-m", "experiment=none", f"model={args.model}", "data=photos",
           "eval=default", f"data.resolution={args.resolution}", f"data.instance_dir={ROOT / 'assets' / 'demo_subject'}",
           "data.allow_upscale=true", "data.min_images=3", f"lr={LRS}", f"steps={args.steps}",
           f"train.checkpoint_every={args.every}", "eval.seeds=[0]", f"eval.clip_model={args.clip}",
           "tracking.enabled=false", "cluster=gpus", f"hydra.launcher.gpus=[{gpus}]",
           f"hydra.launcher.pack_size={pack_size}", f"paths.root={work}", f"paths.cache_dir={args.work / '.cache'}", "progress=false", *args.overrides]
    tic = time.time()
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used,utilization.gpu", "--format=csv,noheader,nounits",
                            "-lms", "500"], stdout=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - tic
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
    return {"gpus": [int(g) for g in gpus.split(",")], "pack_size": pack_size, "wall_s": wall, "exit_status": proc.returncode,
            "command": " ".join(cmd[1:]),
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
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--model", default="sdxl_base_random")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdxl-multi-gpu")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        resolve_source(model_preset(args.model), args.work / ".cache")
        build_clip(CLIP_L, args.work / ".cache")
        return
    if torch.cuda.device_count() < max(len(g.split(",")) for g in args.gpus):
        sys.exit(f"bench/multi_gpu.py: {torch.cuda.device_count()} CUDA GPU(s) visible, --gpus {args.gpus} needs more")
    # the models, built once (not timed) in a process of their own, so that no memory stays on a GPU
    subprocess.run([sys.executable, __file__, "--build-only", "--model", args.model, "--work", str(args.work)],
                   check=True)
    args.clip = build_clip(CLIP_L, args.work / ".cache")  # built above: its folder, loaded as the hub's CLIP-L would be
    runs = [run(g, n, args) for g in args.gpus for n in args.pack_sizes]
    device = torch.cuda.get_device_name(0)
    import diffusers

    report = {"benchmark": "multi_gpu", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": device, "gpus_on_host": torch.cuda.device_count(), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "trials": len(LRS.split(",")), "steps": args.steps,
              "checkpoint_every": args.every, "runs": runs,
              "speedup": {f"{r['gpus']} pack_size={r['pack_size']}": runs[0]["wall_s"] / r["wall_s"] for r in runs}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"multi_gpu_{device.replace(' ', '_')}.json"
    path.write_text(json.dumps(report, indent=2))
    for r in runs:
        print(f"GPUs {r['gpus']} pack_size={r['pack_size']}: {r['wall_s']:.1f} s ({runs[0]['wall_s'] / r['wall_s']:.2f}x), "
              f"trials on GPUs {[t['gpu'] for t in r['per_trial']]}, side by side on two GPUs: "
              f"{r['trials_on_two_gpus_at_once']}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
