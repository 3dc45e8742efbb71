"""Regional torch.compile of the UNet's transformer blocks, for training and for generating, and when it pays.

Compiling costs seconds once per machine (Inductor's on-disk cache makes a repeat cheap) and saves a little on
every training step and generated image, so `None` ("auto") settings compile only where the saving pays back the
compiling: training when trials x steps of a pack reach COMPILE_TRIAL_STEPS, generating when a process will make
at least COMPILE_IMAGES images. The measurements behind the thresholds and the regions: docs/speed.md."""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

COMPILE_TRIAL_STEPS = 2000  # trial-steps whose saving outweighs a cold compile for training
# images whose saving outweighs compiling the GENERATION regions; counted per trial although a sweep's trials
# share the process and its compiled code, so it errs towards compiling
COMPILE_IMAGES = 120
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
def compiled_for_generation(unet: nn.Module, on: bool):
    """Inside, with `on`: the UNet's GENERATION regions compiled (what a training run compiled inside them is
    traced anew, and gets its own compiled code back on exit); on exit the regions compiled here go back. Without
    `on`: nothing changes."""
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
        fn = torch.compile(lambda x: x * 2 + 1, dynamic=False)
        return bool((fn(torch.ones(8, device="cuda")) == 3).all())
    except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
        log.warning("torch.compile does not work here (%s: %s); running without it (install a C compiler and "
                    "Triton, or set train.compile=false / eval.compile=false to silence this)",
                    type(exc).__name__, str(exc)[:300])
        return False


def want_compile(setting: bool | None, device: torch.device, work: int, pays_at: int) -> bool:
    """An explicit setting as given; "auto" (None): on CUDA, when `work` (trial-steps, or images) reaches
    `pays_at` and torch.compile works here."""
    if setting is not None:
        return setting
    return device.type == "cuda" and work >= pays_at and compile_works()
