"""Run a training script (the diffusers DreamBooth-LoRA SDXL example) unchanged and time its optimizer steps.

python bench/reference_timer.py OUT.json SCRIPT.py [script args...]
A global optimizer post-step hook stamps every step; the script already syncs the GPU each step
(it logs loss.item()), so the gaps between stamps are its step times. Peak CUDA allocator memory is
read when the script exits. OUT.json also names the commit and the device it measured on. Any script that
steps a torch optimizer can be timed, on a CPU too: tests/test_bench.py times a tiny one it writes."""
import atexit
import json
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import record  # noqa: E402

out, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
stamps: list[float] = []
register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))


@atexit.register
def _report() -> None:
    from common.files import write_atomic

    cuda = torch.cuda.is_available()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    write_atomic(Path(out), json.dumps({
        "benchmark": "reference_timer", "script": str(Path(script).resolve()), **record.commit(),
        "device": record.device_name("cuda" if cuda else "cpu"), "torch": torch.__version__,
        "steps": len(stamps), "step_seconds": gaps,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}))


sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
