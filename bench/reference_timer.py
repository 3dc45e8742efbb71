"""Run a training script (the diffusers DreamBooth-LoRA SDXL example) unchanged and time its optimizer steps.

python bench/reference_timer.py OUT.json SCRIPT.py [script args...]
A global optimizer post-step hook stamps every step; the script already syncs the GPU each step
(it logs loss.item()), so the gaps between stamps are its step times. Peak CUDA allocator memory is
read when the script exits."""
import atexit
import json
import runpy
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

out, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
stamps: list[float] = []
register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))


@atexit.register
def _report() -> None:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    with open(out, "w") as f:
        json.dump({"steps": len(stamps), "step_seconds": gaps,
                   "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}, f)


sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
