"""What to generate and how to score it. Plain dataclasses; `sweep` fills them from Hydra configs."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

# The five prompts of the original study, with the subject token in place of the person's name.
STUDY_PROMPTS = [
    "a picture of sks man showing the thumbs up gesture on top of a hill",
    "a picture of sks man showing the thumbs up gesture while holding an orange juice box in his right hand",
    "a picture of sks man showing the thumbs up gesture while swimming",
    "a picture of sks man showing the thumbs up gesture in a press conference",
    "a picture of sks man showing the thumbs up gesture on the moon",
]
FACE_BACKENDS = ("dlib", "insightface", "facenet", "none")
SPEED_ONLY = ("compile", "overlap")  # settings that change how fast images come, not what is scored


class EvalInputError(ValueError):
    """Bad evaluation input (settings, LoRA file, reference photos); raised before any image is generated."""


@dataclass
class EvalConfig:
    prompts: List[str] = field(default_factory=lambda: list(STUDY_PROMPTS))
    subject_token: str = "sks"
    class_noun: str = "man"  # CLIP-T scores "a picture of man ..." : the subject token is not a word CLIP knows
    seeds: List[int] = field(default_factory=lambda: [0, 1])  # images per prompt; the same for every checkpoint
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    resolution: int = 1024
    batch_size: int = 10  # images per pipeline call; on a 16 GB card 2 (preset=low_memory)
    # LoRA strengths each checkpoint is scored at (users generate at 0.6-1.0): the LoRA merged at that scale, so the
    # same compiled code; each (checkpoint, strength) is a candidate of its own (`entry_name`)
    lora_scales: List[float] = field(default_factory=lambda: [1.0])
    clip_model: str = "openai/clip-vit-large-patch14"  # hub id or local folder
    face_backend: str = "dlib"  # dlib (offline, default) | insightface | facenet | none
    prior_prompt: Optional[str] = "a picture of a man"  # drift: faces of the class prompt should not be the subject
    refiner: Optional[str] = None  # e.g. stabilityai/stable-diffusion-xl-refiner-1.0; scored with and without
    refiner_split: float = 0.8  # the base denoises the first 80%, the refiner the rest
    device: str = "auto"
    # torch.compile the UNet's transformer blocks while generating; None: auto, on CUDA when a call (or a sweep's
    # trial) generates enough images to repay compiling (common/compiling.py). Not part of what scores mean.
    compile: Optional[bool] = None
    # score a checkpoint's images on a worker thread while the next checkpoint's generate (evaluation/overlap.py);
    # the same scores either way. Not part of what scores mean.
    overlap: bool = True

    def images_per_checkpoint(self) -> int:
        """Images one (checkpoint, strength)'s scoring generates: prompts x seeds, plus the prior-drift prompt's when
        faces are scored."""
        return (len(self.prompts) + bool(self.prior_prompt and self.face_backend != "none")) * len(self.seeds)

    def scoring_prompt(self, prompt: str) -> str:
        """'a picture of sks man ...' -> 'a picture of man ...' for CLIP-T."""
        tok, noun = re.escape(self.subject_token), self.class_noun
        out = re.sub(rf"\b{tok}\s+{re.escape(noun)}\b", noun, prompt)
        return re.sub(rf"\b{tok}\b", noun, out)


def entry_name(checkpoint: str, scale: float = 1.0) -> str:
    """What a checkpoint scored at a LoRA strength is called in metrics.json, grids and images: the checkpoint folder's
    name at full strength ("step-000100"), with the strength after it otherwise ("step-000100_x0.7")."""
    return checkpoint + strength_suffix(scale)


def strength_suffix(scale: float) -> str:
    """"" at full strength, else "_x0.7": what entry names, MLflow metric keys and grid keys end in."""
    return "" if scale == 1.0 else f"_x{scale:g}"


def parse_entry(name: str) -> tuple[str, int, float]:
    """entry_name's inverse: "step-000100_x0.7" -> ("step-000100", 100, 0.7)."""
    m = _ENTRY.fullmatch(name)
    if not m:
        raise ValueError(f"{name!r} is not a scored checkpoint's name (step-000100 or step-000100_x0.7)")
    return m["folder"], int(m["step"]), float(m["scale"] or 1.0)


def is_entry(name: str) -> bool:
    return _ENTRY.fullmatch(name) is not None


_ENTRY = re.compile(r"(?P<folder>step-(?P<step>\d+))(?:_x(?P<scale>[0-9.]+(?:e-?\d+)?))?")


def validate_eval(cfg: EvalConfig) -> list[str]:
    errors = []
    if not cfg.prompts:
        errors.append("eval.prompts is empty: give at least one prompt with the subject token")
    missing = [p for p in cfg.prompts if cfg.subject_token not in p.split()]
    if missing:
        errors.append(f"eval.prompts without the subject token {cfg.subject_token!r}: {missing[:3]}; the LoRA is "
                      "only asked for the subject when its token is in the prompt")
    if not cfg.seeds:
        errors.append("eval.seeds is empty: give at least one seed, e.g. [0, 1]")
    if cfg.num_inference_steps < 1:
        errors.append(f"eval.num_inference_steps={cfg.num_inference_steps} must be >= 1")
    if cfg.resolution <= 0 or cfg.resolution % 8:
        errors.append(f"eval.resolution={cfg.resolution} must be a positive multiple of 8")
    if cfg.batch_size < 1:
        errors.append(f"eval.batch_size={cfg.batch_size} must be >= 1")
    if cfg.face_backend not in FACE_BACKENDS:
        errors.append(f"eval.face_backend={cfg.face_backend!r} is not one of {FACE_BACKENDS}")
    scales = list(cfg.lora_scales or [])
    if not scales or any(not isinstance(x, (int, float)) or isinstance(x, bool) or not 0.0 < x <= 2.0 for x in scales):
        errors.append(f"eval.lora_scales={scales} must be LoRA strengths in (0, 2], e.g. [1.0] or [0.7,1.0]")
    elif len(set(scales)) < len(scales):
        errors.append(f"eval.lora_scales={scales} lists a strength twice: give each once, e.g. [0.7,1.0]")
    if not 0.0 < cfg.refiner_split < 1.0:
        errors.append(f"eval.refiner_split={cfg.refiner_split} must be between 0 and 1")
    return errors
