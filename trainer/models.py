"""Loading the SDXL base (hub id, local folder, or an architecture built with random weights) once per process."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.device import resolve_device
from common.errors import DeviceError, ModelSourceError

from .config import ModelConfig, stable_hash

log = logging.getLogger(__name__)

_LOADED: dict[str, "BaseModel"] = {}
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"  # in folders built from config; evaluation notes that their scores mean nothing


@dataclass
class BaseModel:
    """The frozen SDXL components a trial needs, plus a fingerprint that keys every cache derived from them."""

    source: str
    fingerprint: str
    tokenizer: Any
    tokenizer_2: Any
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any
    device: torch.device
    weight_dtype: torch.dtype

    def encoders_to(self, device: torch.device | str, text: bool = True, vae: bool = True) -> None:
        """Text encoders and VAE only fill caches; between fills they wait in CPU memory (~2 GB of GPU for SDXL)."""
        for m in ([self.text_encoder, self.text_encoder_2] if text else []) + ([self.vae] if vae else []):
            m.to(device)

    def pipeline(self):
        """A StableDiffusionXLPipeline over these very modules (no copy, no reload), all on the device."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        self.encoders_to(self.device)
        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
            scheduler=EulerDiscreteScheduler.from_config(self.noise_scheduler.config),
        )


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if requested == "fp16" and device.type != "cuda":
        raise DeviceError("train.mixed_precision=fp16 needs a CUDA GPU; use mixed_precision=no on CPU")
    return requested


def weight_dtype_for(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def resolve_source(cfg: ModelConfig, cache_dir: Path) -> str:
    """A local folder holding the pipeline, or a hub id already in the local cache or reachable.

    Raises ModelSourceError before anything heavy is loaded."""
    if cfg.architecture:
        return str(build_from_architecture(cfg, cache_dir))
    return check_source(cfg)


def check_source(cfg: ModelConfig) -> str:
    """model.pretrained as from_pretrained will read it, checked without loading or downloading weights (a sweep
    checks its base model with this before anything of it exists): a folder with model_index.json, or a hub id
    whose model_index.json is in the local cache (the only way offline: HF_HUB_OFFLINE=1) or that the hub knows.
    A model built from model.architecture has nothing to check. Raises ModelSourceError naming the fix."""
    if cfg.architecture:
        return ""
    src = os.path.expanduser(cfg.pretrained or "")
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "model_index.json")):
            raise ModelSourceError(f"model.pretrained={cfg.pretrained!r} is a folder without model_index.json: "
                                   "point it at a diffusers SDXL folder (saved with save_pretrained)")
        return src
    if src.startswith((".", "/", "~")) or src.count("/") > 1:  # hub ids are "owner/name"
        raise ModelSourceError(f"model.pretrained={cfg.pretrained!r}: no such folder. Pass an existing local "
                               "folder or a hub id such as stabilityai/stable-diffusion-xl-base-1.0")
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(src, revision=cfg.revision, local_files_only=True, allow_patterns=["model_index.json"])
        return src
    except Exception:
        pass  # not cached: ask the hub below
    try:
        from huggingface_hub import model_info

        model_info(src, revision=cfg.revision, timeout=10)
        return src
    except Exception as exc:  # offline, unknown repo, gated repo without a token
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ModelSourceError(
                f"model.pretrained={cfg.pretrained!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                f"set, so it cannot be downloaded. Pass a local folder (model.pretrained=/path/to/sdxl), download "
                f"it once online (hf download {src}), or use the offline demo (model=tiny)") from None
        raise ModelSourceError(
            f"model.pretrained={cfg.pretrained!r} is not in the local Hugging Face cache and the hub could not "
            f"be reached or does not know it ({type(exc).__name__}). Pass a local folder "
            "(model.pretrained=/path/to/sdxl), log in with `hf auth login` for gated models, or use the offline "
            "demo (model=tiny)") from None


def build_from_architecture(cfg: ModelConfig, cache_dir: Path) -> Path:
    """Build a StableDiffusionXLPipeline with random weights from `cfg.architecture`, save it once, return the folder.

    The saved folder is then loaded through from_pretrained like a downloaded model."""
    arch = cfg.architecture or {}
    out = Path(cache_dir) / "models" / f"{cfg.name}-{stable_hash(arch)}-{cfg.build_dtype}"
    if (out / "model_index.json").is_file():
        return out
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    log.info("building %s with random weights into %s", cfg.name, out)
    torch.manual_seed(int(arch.get("seed", 0)))
    dtype = getattr(torch, cfg.build_dtype)
    init_device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 2.6B params is slow on CPU
    with torch.device(init_device):
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        te = CLIPTextModel(CLIPTextConfig(**_clip_kwargs(arch["text_encoder"])))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_clip_kwargs(arch["text_encoder_2"])))
    sched = EulerDiscreteScheduler(**{k: v for k, v in arch["scheduler"].items() if k != "class"})
    tok_dir = Path(tempfile.mkdtemp())
    try:
        tok, tok2 = byte_level_tokenizers(tok_dir)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=unet, scheduler=sched)
        if dtype != torch.float32:
            from diffusers.utils import logging as dlogging

            level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # diffusers warns about fp32-only modules, of which SDXL has none
            pipe.to(dtype=dtype)
            dlogging.set_verbosity(level)
        tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else _mk(out.parent)))
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / RANDOM_WEIGHTS_MARKER).write_text("built from config with random weights: its images are noise\n")
        publish(tmp, out)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    return out


def publish(tmp: Path, out: Path) -> None:
    """Rename a finished folder into place: a half-written one is never picked up. If another process (a
    parallel trial) published the same folder first, ours is dropped: both hold the same content."""
    try:
        os.replace(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _clip_kwargs(spec: dict) -> dict:
    kw = {k: v for k, v in spec.items() if k != "class"}
    # ids of the byte-level tokenizer below: <|startoftext|>=512, <|endoftext|>=513
    kw.setdefault("bos_token_id", 512)
    kw.setdefault("eos_token_id", 513)
    kw.setdefault("pad_token_id", 513)
    return kw


def byte_level_tokenizers(folder: Path):
    """CLIP tokenizers over a byte-level vocabulary (no merges): offline stand-ins for the real BPE files.

    Each character is a token, so every prompt tokenizes; only the vocabulary differs from SDXL's."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tok2 = CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!")
    return tok, tok2


def load_base_model(cfg: ModelConfig, device: torch.device, weight_dtype: torch.dtype, cache_dir: Path) -> BaseModel:
    """Load (or reuse, within this process) the frozen base. Same config, device and dtype: same objects."""
    source = resolve_source(cfg, cache_dir)
    key = stable_hash({"model": cfg.__dict__, "device": str(device), "dtype": str(weight_dtype)})
    if key in _LOADED:
        return _LOADED[key]
    _LOADED.clear()  # one base at a time: a different model replaces the old one instead of doubling memory
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"revision": cfg.revision}
    log.info("loading base model from %s", source)
    tok = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    tok2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw)
    # SDXL's VAE overflows in fp16 (force_upcast): it stays fp32 unless it is a replacement such as the fp16-fix VAE
    vae_dtype = weight_dtype if cfg.vae else torch.float32
    te = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=cfg.variant, dtype=weight_dtype, **kw)
    te2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", variant=cfg.variant,
                                                      dtype=weight_dtype, **kw)
    if cfg.vae:
        vae = AutoencoderKL.from_pretrained(cfg.vae, torch_dtype=vae_dtype, **kw)
    else:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=cfg.variant, torch_dtype=vae_dtype, **kw)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=cfg.variant, torch_dtype=weight_dtype,
                                                **kw)
    sched = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    for m in (te, te2, vae, unet):
        m.requires_grad_(False)
        m.eval()
        m.to(device)
    fingerprint = stable_hash(cfg.__dict__)  # keys every cache derived from this model
    base = BaseModel(source, fingerprint, tok, tok2, te, te2, vae, unet, sched, device, weight_dtype)
    _LOADED[key] = base
    return base


def shared_pipeline(cfg: ModelConfig, device_name: str, precision: str, cache_dir: Path):
    """A pipeline over the base the trainer holds (loaded once per process), for generating with checkpoints."""
    device = resolve_device(device_name)
    base = load_base_model(cfg, device, weight_dtype_for(resolve_precision(precision, device)), cache_dir)
    return base.pipeline()


def release_models() -> None:
    """Forget the loaded base (between sweeps, or before loading another model) and free its memory."""
    from diffusers.training_utils import free_memory

    _LOADED.clear()
    free_memory()
