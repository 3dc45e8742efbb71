"""Generation's compiled code made in the background, for this sweep's later images and the next sweep's.

A raced sweep generates too few images to repay compiling generation in its own process (~45 s per batch shape on
an H100 or H200, while its GPU waits), so with a cold compile cache it generates eagerly (common/compiling.py).
Its GPU is busy training meanwhile and its CPUs are not: this module compiles generation's regions in a second
process at the same time, at the shapes the sweep's calls use (one seed's prompts, with and without the
prior-drift prompt, sweep/racing.py), into the same persistent cache. When it is done it marks the cache warm
(`compiling.mark_warm`); each later evaluate call of the sweep sees that and generates compiled, loading the
kernels instead of compiling them, and so does every later sweep on the machine.

    python -m sweep.precompile <trial folder>/.hydra/config.yaml     # what `start` runs

The second process loads the same base (its own copy: ~7 GB of GPU memory for SDXL, so only on GPUs with
MIN_GPU_GIB or more), denoises 2 steps per shape, and is stopped if the sweep ends first (nothing is marked warm
then)."""
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
_STARTED: dict[str, subprocess.Popen] = {}


def wanted(compile_setting: bool | None, device, work: int, key: str | None) -> bool:
    """Whether to compile generation in the background: eval.compile=auto on CUDA, a cache cold for this key,
    `work` (the images the trial's scoring generates) too few to repay a cold compile but enough for a warm one,
    a GPU with room for a second copy of the base, and torch.compile working here."""
    if compile_setting is not None or device.type != "cuda" or not key or compiling.is_warm(key):
        return False
    cold = compiling.want_compile(None, device, work, compiling.COMPILE_IMAGES, warm=False)
    warm = compiling.want_compile(None, device, work, compiling.COMPILE_IMAGES, warm=True)
    if cold or not warm:
        return False
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return total >= MIN_GPU_GIB and compiling.compile_works()


def start(config_file: Path, key: str) -> subprocess.Popen | None:
    """`python -m sweep.precompile config_file` started once per process and key (its log in the compile cache
    folder), stopped when this process exits if it is still running. None if one runs already."""
    if key in _STARTED and _STARTED[key].poll() is None:
        return None
    folder = compiling.cache_folder() / LOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    out = open(folder / f"{key}.log", "w")  # noqa: SIM115 - the child writes it; closed when this process ends
    proc = subprocess.Popen([sys.executable, "-m", "sweep.precompile", str(config_file)], cwd=os.getcwd(),
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _STARTED[key] = proc
    atexit.register(_stop, proc)
    log.info("eval.compile: compiling generation's code in the background (pid %d, log %s); images are generated "
             "eagerly until it is done, compiled after, and the next sweep on this machine starts compiled",
             proc.pid, out.name)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


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
    compile_generation(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
