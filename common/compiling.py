"""Regional torch.compile of the UNet's transformer blocks, for training and for generating, and when it pays.

Compiling costs seconds once per machine (Inductor's on-disk cache makes a repeat cheap) and saves a little on
every training step and generated image, so `None` ("auto") settings compile only where the saving pays back the
compiling: training when trials x steps of a pack reach COMPILE_TRIAL_STEPS, generating when a process will make
at least COMPILE_IMAGES images, or WARM_COMPILE_IMAGES once this machine's compile cache holds generation's code
for the model (`use_cache`, `is_warm`). The measurements behind the thresholds and the regions: docs/speed.md."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from common import timeline

log = logging.getLogger(__name__)

COMPILE_TRIAL_STEPS = 2000  # trial-steps whose saving outweighs a cold compile for training
# images whose saving outweighs compiling the GENERATION regions; counted per trial although a sweep's trials
# share the process and its compiled code, so it errs towards compiling
COMPILE_IMAGES = 120
# with a warm cache compiling costs Dynamo's tracing and loading the cached kernels (seconds, not ~45 s), so a
# smaller count pays: one checkpoint's full protocol, or a racing sweep's first rounds
WARM_COMPILE_IMAGES = 24
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # Inductor's and AOTAutograd's on-disk caches (Triton's kernels inside it)
_SET_HERE: list[str] = []  # the folder use_cache put in CACHE_ENV (a user's own setting is left alone)
RECOMPILE_LIMIT = 64  # graphs per block kind: training and generating shapes, block widths, pack sizes


BLOCKS = ("BasicTransformerBlock",)
# generating: whole Transformer2DModels (their norm, projections and layout changes fused too) and the ResNet
# blocks and resamplers between them; the fastest of the regions measured for their compile time (docs/speed.md)
GENERATION = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def blocks_of(unet: nn.Module, kinds: tuple[str, ...] = BLOCKS) -> list[nn.Module]:
    return [m for m in unet.modules() if type(m).__name__ in kinds]


def compile_blocks(unet: nn.Module, kinds: tuple[str, ...] = BLOCKS) -> list[nn.Module]:
    """Every module of the UNet of these kinds (default: the transformer blocks) not compiled yet, compiled in
    place with static shapes (each batch shape gets its own graph instead of one dynamic graph for all); returns
    those, for `uncompile`. The ~70 blocks share a handful of shapes, so a few compilations serve them all."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
    mine = [b for b in blocks_of(unet, kinds) if getattr(b, "_compiled_call_impl", None) is None]
    for b in mine:
        b.compile(dynamic=False)
    return mine


# around each Transformer2DModel's blocks, diffusers' methods for the group norm, layout change and input
# projection, and for the output projection, layout change and residual
IO_METHODS = ("_operate_on_continuous_inputs", "_get_output_for_continuous_inputs")


def compile_io(unet: nn.Module) -> list[tuple[nn.Module, str]]:
    """Each Transformer2DModel's IO_METHODS compiled (small graphs, unlike whole Transformer2DModels); returns
    them for `uncompile`."""
    mine = []
    for m in blocks_of(unet, ("Transformer2DModel",)):
        for name in IO_METHODS:
            if name not in vars(m) and hasattr(m, name):
                setattr(m, name, torch.compile(getattr(m, name), dynamic=False))
                mine.append((m, name))
    return mine


def compile_for_training(unet: nn.Module) -> list:
    """The transformer blocks and each Transformer2DModel's IO_METHODS. Compiling the ResNet blocks and resamplers
    too is faster per step but triples the compile time, which a sweep's usual step counts do not pay back
    (docs/speed.md)."""
    return compile_blocks(unet) + compile_io(unet)


def uncompile(compiled: list) -> None:
    for b in compiled:
        if isinstance(b, tuple):  # a compiled method (compile_io)
            delattr(*b)
        else:
            b._compiled_call_impl = None


def eager_stance(compiled: list[nn.Module]):
    """Inside: compiled blocks run eagerly (generating at other batch shapes must not trigger recompiles)."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


@contextlib.contextmanager
def compiled_for_generation(unet: nn.Module, on: bool, warm_key: str | None = None):
    """Inside, with `on`: the UNet's GENERATION regions compiled (what a training run compiled inside them is
    traced anew, and gets its own compiled code back on exit); on exit the regions compiled here go back, and
    `warm_key` is marked warm (`is_warm`) when the code inside ran without error. Without `on`: nothing changes."""
    if not on:
        yield
        return
    trained = [(b, b._compiled_call_impl) for b in blocks_of(unet) if getattr(b, "_compiled_call_impl", None)]
    methods = [(m, name, vars(m)[name]) for m in blocks_of(unet, ("Transformer2DModel",)) for name in IO_METHODS
               if name in vars(m)]
    uncompile([b for b, _ in trained] + [(m, name) for m, name, _ in methods])
    mine = compile_blocks(unet, GENERATION)
    try:
        with torch.compiler.set_stance("default"):
            yield
        mark_warm(warm_key)
    finally:
        uncompile(mine)
        for b, impl in trained:
            b._compiled_call_impl = impl
        for m, name, fn in methods:
            setattr(m, name, fn)


@functools.cache
def compile_works() -> bool:
    """torch.compile needs Triton and a C compiler on this machine: tried once on a one-line function, so that
    an "auto" setting falls back to eager with a warning instead of failing a trial."""
    try:
        with timeline.span("checking torch.compile works"):
            fn = torch.compile(lambda x: x * 2 + 1, dynamic=False)
            return bool((fn(torch.ones(8, device="cuda")) == 3).all())
    except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
        log.warning("torch.compile does not work here (%s: %s); running without it (install a C compiler and "
                    "Triton, or set train.compile=false / eval.compile=false to silence this)",
                    type(exc).__name__, str(exc)[:300])
        return False


def want_compile(setting: bool | None, device: torch.device, work: int, pays_at: int, warm: bool = False) -> bool:
    """An explicit setting as given; "auto" (None): on CUDA, when `work` (trial-steps, or images) reaches
    `pays_at`, or with `warm` (this machine's compile cache holds the code, `is_warm`) WARM_COMPILE_IMAGES, and
    torch.compile works here (a warm cache says so: its code compiled and ran on this machine; else
    `compile_works` tries, ~5-8 s on an H100 the first time)."""
    if setting is not None:
        return setting
    enough = work >= (min(pays_at, WARM_COMPILE_IMAGES) if warm else pays_at)
    return device.type == "cuda" and enough and (warm or compile_works())


def use_cache(cache_dir: Path | str) -> Path:
    """Inductor's FX-graph cache and AOTAutograd's cache (and Triton's kernels) on disk under the project's cache
    folder (`<paths.cache_dir>/compile`) instead of the temporary folder: a second sweep on a machine loads
    compiled code instead of compiling it (~45 s cold for generation). A TORCHINDUCTOR_CACHE_DIR the user set is
    kept; torch's default, which importing diffusers writes there (Inductor's `cache_dir()` sets the variable
    when it first runs), is not the user's. Returns the folder in use."""
    own = cache_folder_for(cache_dir)
    if os.environ.get(CACHE_ENV) != str(own):
        os.environ[CACHE_ENV] = str(own)
        _SET_HERE.append(str(own))
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # the defaults of torch >= 2.6, said here because the warm rule needs them
    functorch_config.enable_autograd_cache = True
    return Path(own)


def cache_folder_for(cache_dir: Path | str) -> Path:
    """The folder `use_cache(cache_dir)` caches compiled code in: <cache_dir>/compile, unless the user set
    TORCHINDUCTOR_CACHE_DIR (to anything but torch's default, which importing diffusers puts there)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    own = os.environ.get(CACHE_ENV)
    if own is None or own in _SET_HERE or os.path.abspath(own) == os.path.abspath(default_cache_dir()):
        return (Path(cache_dir) / "compile").resolve()
    return Path(own)


def cache_folder() -> Path:
    """Where compiled code is cached now (`use_cache`'s folder, the user's, or Inductor's default)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return Path(os.environ.get(CACHE_ENV) or default_cache_dir()).resolve()


def generation_key(source: str, resolution: int, device: torch.device) -> str:
    """What generation's compiled code depends on beyond the code itself: the model, the image size, torch and
    the accelerator (the cache is keyed finely by Inductor; this key only says whether to expect hits)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    what = {"source": str(source), "resolution": int(resolution), "torch": torch.__version__, "device": name,
            "regions": GENERATION}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def is_warm(key: str | None) -> bool:
    """Whether generation compiled for `key` (`generation_key`) on this machine into the cache folder in use."""
    return bool(key) and (cache_folder() / "warm" / f"{key}.json").is_file()


def mark_warm(key: str | None) -> None:
    """Generation compiled and ran for `key`: its code is in the cache folder now (a marker file beside it, so
    deleting the cache forgets it too)."""
    if not key:
        return
    path = cache_folder() / "warm" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "torch": torch.__version__}))
