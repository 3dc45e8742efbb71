"""One trial's spec and what both recipes do with its folder and state: where it resumes from, writing its
checkpoints (a lone trial's layout, packed or not), calling its scoring hook with training paused."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers.training_utils import free_memory

from common import timeline
from common.errors import ConfigError

from . import checkpoint
from .config import LoraSettings, TrainConfig
from .models import BaseModel

# the training modules log as "trainer.loop", the name their lines have always carried (conf/hydra: %(name)s)
log = logging.getLogger("trainer.loop")


@dataclass
class TrialSpec:
    """One fine-tune: its own LoRA shape, optimisation settings and output folder."""

    name: str
    lora: LoraSettings
    train: TrainConfig
    output_dir: Path
    # called after each checkpoint is written, with (step, folder) and the trial's LoRA still on the base (eval
    # mode, training RNG set aside): score it live; True stops the trial there (status "pruned")
    on_checkpoint: Callable[[int, Path], bool] | None = None


def resume_step(spec: TrialSpec) -> int:
    found = checkpoint.latest_valid(spec.output_dir) if spec.train.resume else None
    return found[1].step if found else 0


def resumable(spec: TrialSpec, cfg_hash: str) -> tuple[Path, checkpoint.CheckpointRecord] | None:
    """The checkpoint a trial resumes from (None: a fresh start); refuses folders that would be overwritten."""
    out = Path(spec.output_dir)
    checkpoint.clean_partial(out)
    found = checkpoint.latest_valid(out) if spec.train.resume else None
    if found and found[1].config_hash != cfg_hash:
        raise ConfigError([(f"{out} holds checkpoints of another configuration (hash {found[1].config_hash}, "
                            f"now {cfg_hash}): use a new output folder, or train.resume=false to start over")])
    if not spec.train.resume and checkpoint.list_checkpoints(out):
        raise ConfigError([(f"{out} already holds checkpoints and train.resume=false: choose a new output folder "
                            "(hydra.run.dir=...) so that finished work is not overwritten")])
    return found


def rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    st = {"rng.noise": gen.get_state(), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["rng.cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(gen: torch.Generator, st: dict[str, torch.Tensor]) -> None:
    gen.set_state(st["rng.noise"])
    torch.set_rng_state(st["rng.torch"])
    if "rng.cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["rng.cuda"])


def save_checkpoint(spec: TrialSpec, step: int, loss: float, cfg_hash: str, lr: float, optim_state: dict, scheduler,
                    gen: torch.Generator, save_lora: Callable[[Path], None]) -> Path:
    """A checkpoint: the LoRA (written by `save_lora(folder)`), its record, and optimizer/schedule/RNG state in a
    lone trial's layout, whether the trial trained alone or in a pack."""
    tensors, optim_meta = checkpoint.optimizer_state_to_flat(optim_state)
    tensors.update(rng_state(gen))
    with timeline.span("writing checkpoints"):
        return checkpoint.write_checkpoint(
            spec.output_dir, step, save_lora=save_lora,
            record={"loss": loss, "config_hash": cfg_hash, "trial": spec.name, "lr": lr},
            state_tensors=tensors,
            state_json={"step": step, "optimizer": optim_meta, "scheduler": scheduler.state_dict()},
        )


def call_paused(hook: Callable[[int, Path], bool], step: int, folder: Path, trained: Iterable[str],
                base: BaseModel) -> bool:
    """The hook with training paused: the modules named in `trained` in eval mode (no LoRA dropout) and the RNG
    streams that drive training set aside, so that scoring a checkpoint never changes what the trial trains next."""
    modules = [getattr(base, name) for name in trained]
    devices = [base.device] if base.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for m in modules:
            m.eval()
        # the pipeline computes on its accelerator modules' device (diffusers >= 0.40); the text encoders come only
        # to encode prompts not seen before (evaluation.generate.prompt_embeddings), so a sweep's fixed prompts move
        # them once, not per checkpoint; the VAE stays in CPU memory (evaluation decodes through a bf16 copy of its
        # decoder on the GPU, or brings the VAE for the decode: evaluation.generate.decode)
        tic = time.perf_counter()
        try:
            return bool(hook(step, folder))
        finally:
            for m in modules:
                m.train()
            log.info("checkpoint %s scored in %.1f s", folder.name, time.perf_counter() - tic)


def reset_process_state() -> None:
    """accelerate's state is process-wide and CUDA memory stays cached: reset both after every trial or pack."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    free_memory()
