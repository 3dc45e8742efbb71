"""Generation's compiled code made in the background, for this sweep's later images and the next sweep's.

A raced sweep generates too few images to repay compiling generation in its own process (~45 s per batch shape on
an H100 or H200, while its GPU waits), so with a cold compile cache it generates eagerly (common/compiling.py).
Its GPU is busy training meanwhile, and compiling is mostly CPU work: this module compiles generation's regions in
a second process at the same time, at the shapes the sweep's calls use (one seed's prompts, with and without the
prior-drift prompt, sweep/racing.py), into the same persistent cache. When it is done it marks the cache warm
(`compiling.mark_warm`); each later evaluate call of the sweep sees that and generates compiled, loading the
kernels instead of compiling them, and so does every later sweep on the machine.

    python -m sweep.precompile <trial folder>/.hydra/config.yaml     # what `start` runs

The second process loads the same base (its own copy: ~7 GB of GPU memory for SDXL, so only on GPUs with
MIN_GPU_GIB or more) and denoises 2 steps per shape. A sweep that ends first leaves it to finish and says so
(on an H100 the first one, compiling from an empty cache beside the race's scoring, had not marked the cache warm
when its 8-minute race ended, and stopping it lost the mark). One runs per key and machine (a pid file beside its
log)."""
from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from common import compiling
from evaluation.evaluate import compile_generation as compile_for
from trainer.models import resolve_source, shared_pipeline

from . import stored
from .config import evaluation_settings, resolve_path, to_typed
from .logs import quiet_third_party

log = logging.getLogger(__name__)

MIN_GPU_GIB = 60  # a second copy of the base and a batch's activations beside a training pack
LOG_DIR = "precompile"  # under the compile cache folder: one log per generation key


def wanted(compile_setting: bool | None, device, work: int, key: str | None) -> bool:
    """Whether to compile generation in the background: eval.compile=auto on CUDA, a cache cold for this key,
    `work` (the images the trial's scoring generates) too few to repay a cold compile but enough for a warm one,
    and a GPU with room for a second copy of the base. Whether torch.compile works here is the second process's
    to find out (off this sweep's clock): where it does not, it says so in its log and marks nothing warm."""
    if compile_setting is not None or device.type != "cuda" or not key or compiling.is_warm(key):
        return False
    if work >= compiling.COMPILE_IMAGES or work < compiling.WARM_COMPILE_IMAGES:
        return False  # a cold compile pays in this process (a full protocol), or a warm one would never be used
    return torch.cuda.get_device_properties(device).total_memory / 2**30 >= MIN_GPU_GIB


def start(config_file: Path, key: str) -> subprocess.Popen | None:
    """`python -m sweep.precompile config_file` started (its log and pid file in the compile cache folder), unless
    one runs for this key already, on this machine: then None."""
    folder = compiling.cache_folder() / LOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pid_file = folder / f"{key}.pid"
    if running(pid_file):
        log.info("eval.compile: generation's code is being compiled in the background already (pid %s)",
                 pid_file.read_text().strip())
        return None
    out = open(folder / f"{key}.log", "a")  # noqa: SIM115 - the child writes it; closed when this process ends
    proc = subprocess.Popen([sys.executable, "-m", "sweep.precompile", str(config_file)], cwd=os.getcwd(),
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    atexit.register(_left_running, proc, out.name)
    log.info("eval.compile: compiling generation's code in the background (pid %d, log %s); images are generated "
             "eagerly until it is done, compiled after, and the next sweep on this machine starts compiled",
             proc.pid, out.name)
    return proc


def running(pid_file: Path) -> bool:
    """Whether the process the pid file names is alive."""
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _left_running(proc: subprocess.Popen, log_name: str) -> None:
    if proc.poll() is None:
        log.info("eval.compile: generation's code is still compiling in the background (pid %d, log %s): the next "
                 "sweep on this machine finds it warm once that is done", proc.pid, log_name)


def compile_generation(config_file: Path) -> bool:
    """Load the trial's base as its sweep does and compile generation's regions at the shapes its evaluate calls
    use (evaluation.evaluate.compile_generation), marking the cache warm. False when it was warm already."""
    conf = to_typed(stored.load(Path(config_file)))
    cache_dir = resolve_path(conf.paths, conf.paths.cache_dir)
    compiling.use_cache(cache_dir)
    settings = evaluation_settings(conf)
    source = resolve_source(conf.model, cache_dir)
    pipe = shared_pipeline(conf.model, conf.train.device, conf.train.mixed_precision, cache_dir)
    key = compiling.generation_key(source, settings.resolution, pipe.device)
    if compiling.is_warm(key):
        return False
    compile_for(pipe, settings, key)
    log.info("generation's compiled code is in %s (key %s)", compiling.cache_folder(), key)
    return True


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    quiet_third_party()
    try:
        compile_generation(Path(sys.argv[1]))
    finally:  # the pid file its sweep wrote for it, if it is its own
        for pid_file in (compiling.cache_folder() / LOG_DIR).glob("*.pid"):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
