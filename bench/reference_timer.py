"""Run a training script (a diffusers DreamBooth-LoRA example) unchanged and time its optimizer steps.

python bench/reference_timer.py OUT.json SCRIPT.py [script args...]
A global optimizer post-step hook stamps every step; the script already syncs the GPU each step
(it logs loss.item()), so the gaps between stamps are its step times. OUT.json is rewritten at every step (a run
killed at a time limit still reports the steps it made) and when the script exits, with the peak CUDA allocator
memory so far. With REFERENCE_TIMER_STOP_AFTER=N set, the process exits right after its N-th step: what the script
does after training (saving, reloading the pipeline) is not timed and need not be waited for."""
import atexit
import itertools
import json
import os
import runpy
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

out, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
stop_after = int(os.environ.get("REFERENCE_TIMER_STOP_AFTER") or 0)
stamps: list[float] = []


@atexit.register
def _report() -> None:
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    with open(out + ".tmp", "w") as f:
        json.dump({"steps": len(stamps), "step_seconds": gaps,
                   "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}, f)
    os.replace(out + ".tmp", out)


def _stamp(*_) -> None:
    stamps.append(time.perf_counter())
    _report()
    if stop_after and len(stamps) >= stop_after:
        os._exit(0)


register_optimizer_step_post_hook(_stamp)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
