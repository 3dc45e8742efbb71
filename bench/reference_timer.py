"""Run a training script (a diffusers DreamBooth-LoRA example) unchanged and time its optimizer steps.

python bench/reference_timer.py OUT.json SCRIPT.py [script args...]
A global optimizer post-step hook stamps every step; the script already syncs the GPU each step
(it logs loss.item()), so the gaps between stamps are its step times. OUT.json is rewritten at every step (a run
killed at a time limit still reports the steps it made) and when the script exits, with the peak CUDA allocator
memory so far; it also names the commit and the device it measured on. With REFERENCE_TIMER_STOP_AFTER=N set, the
process exits right after its N-th step: what the script does after training (saving, reloading the pipeline) is
not timed and need not be waited for. Any script that steps a torch optimizer can be timed, on a CPU too:
tests/test_bench.py times a tiny one it writes."""
import atexit
import itertools
import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import record  # noqa: E402

out, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
stop_after = int(os.environ.get("REFERENCE_TIMER_STOP_AFTER") or 0)
stamps: list[float] = []


@atexit.register
def _report() -> None:
    from common.files import write_atomic

    cuda = torch.cuda.is_available()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    write_atomic(Path(out), json.dumps({
        "benchmark": "reference_timer", "script": str(Path(script).resolve()), **record.commit(),
        "device": record.device_name("cuda" if cuda else "cpu"), "torch": torch.__version__,
        "steps": len(stamps), "step_seconds": gaps,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}))


def _stamp(*_) -> None:
    stamps.append(time.perf_counter())
    _report()
    if stop_after and len(stamps) >= stop_after:
        os._exit(0)


register_optimizer_step_post_hook(_stamp)
if os.environ.get("FLUX_BENCH_CUDNN_SDP") == "0":  # cuDNN's fused attention failed FLUX's backward on torch 2.11
    torch.backends.cuda.enable_cudnn_sdp(False)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
