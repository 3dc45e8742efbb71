"""Image generation for evaluation: one pipeline per process, LoRA checkpoints swapped in and out of it."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import weakref
from collections import Counter
from pathlib import Path

import torch
from diffusers.training_utils import offload_models
from PIL import Image
from tqdm.auto import tqdm

import families
from common import timeline
from common.lorafile import LORA_FILE, file_sites, merged, merged_into_base, recorded_sha256, sha256_file

from .config import EvalConfig, EvalInputError

log = logging.getLogger(__name__)

ADAPTER = "checkpoint"  # not "eval": peft sets the adapter name as a module attribute
STATS: Counter = Counter()  # pipeline loads (tests assert one per process)
_PIPES: dict[tuple, object] = {}


class LoraFileError(EvalInputError):
    pass


def load_pipeline(pretrained: str, device: torch.device, refiner: str | None = None):
    """The base pipeline of the model's family (and, for SDXL, the refiner sharing its VAE and second text encoder),
    loaded once per process."""
    key = (pretrained, str(device), refiner)
    if key not in _PIPES:
        family = families.for_source(pretrained)
        _PIPES.clear()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        STATS["pipeline_loads"] += 1
        log.info("loading evaluation pipeline from %s", pretrained)
        base, ref = family.load_pipeline(pretrained, device, dtype, refiner)
        if ref is not None:
            ref.set_progress_bar_config(disable=True)
        base.set_progress_bar_config(disable=True)
        # frozen: generating needs no gradients, and loading a LoRA (peft freezes what it wraps) must not change
        # what the code compiled for the baseline was traced with (every compiled region would compile again)
        for pipe in (base, ref):
            for m in (pipe.components.values() if pipe is not None else ()):
                if isinstance(m, torch.nn.Module):
                    m.requires_grad_(False)
        _PIPES[key] = (base, ref)
    return _PIPES[key]


def check_lora_file(folder: Path) -> Path:
    """The checkpoint's LoRA file, opened as safetensors (never pickle); errors name the file."""
    from safetensors import safe_open

    path = Path(folder) / LORA_FILE if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise LoraFileError(f"{path}: no LoRA file here (expected {LORA_FILE} in the checkpoint folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise LoraFileError(f"{path}: not a readable safetensors LoRA file ({exc}); re-save the checkpoint") from None
    if not any("lora" in k for k in keys):
        raise LoraFileError(f"{path}: holds no LoRA weights (keys such as {keys[:3]})")
    verify_hash(path)
    return path


def verify_hash(path: Path, expected: str | None = None) -> None:
    """The LoRA file against the sha256 recorded beside it when it was written (checkpoint.json for a checkpoint's
    file, export.json for an exported one) and the one the caller recorded: a file changed or damaged since is
    refused, never silently used. The file is hashed once."""
    wanted = [e for e in (expected, recorded_sha256(path)) if e]
    if not wanted:
        return
    actual = sha256_file(path)
    bad = next((e for e in wanted if e != actual), None)
    if bad is not None:
        raise LoraFileError(f"{path}: content hash {actual[:16]}... does not match the recorded {bad[:16]}...: "
            "the file changed or is damaged since it was written; use another checkpoint")


class LoraSwap:
    """Context: inside, the checkpoint's LoRA (with None: the adapter the denoiser already carries, e.g. a trainer's
    live one) merged into the denoiser's weights (`common.lorafile.merged`: generating costs what the base costs and
    reuses its compiled code); outside, the plain base exactly as before. A file as training writes it is merged
    straight from its tensors (`file_sites`: ~10 ms of arithmetic instead of peft building ~560 adapter layers,
    ~6 s on a CPU); any other LoRA file goes through peft's `load_lora_weights`."""

    def __init__(self, pipe, checkpoint: Path | None, scale: float = 1.0):
        self.pipe, self.checkpoint, self.scale = pipe, checkpoint, scale
        self._undo = contextlib.ExitStack()

    def __enter__(self):
        with timeline.span("merging LoRAs"):
            return self._enter()

    def _enter(self):
        denoiser = families.denoiser_of(self.pipe)
        with contextlib.ExitStack() as undo:  # unwound here if anything below fails, else kept for __exit__
            sites = None
            if self.checkpoint is not None:
                path = check_lora_file(self.checkpoint)
                sites = _file_sites(denoiser, path, self.scale)
                if sites is None:  # through peft's adapter layers, then merged
                    self._load(path)
                    undo.callback(self.pipe.unload_lora_weights)
                    self.pipe.set_adapters([ADAPTER], adapter_weights=[self.scale])
            undo.enter_context(merged(denoiser) if sites is None else merged_into_base(sites))
            self._undo = undo.pop_all()
        return self.pipe

    def _load(self, path: Path) -> None:
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # "no LoRA keys for the text encoders" is expected for UNet-only LoRAs
        try:
            self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=ADAPTER)
        except Exception as exc:
            self.pipe.unload_lora_weights()
            raise LoraFileError(f"{path}: does not fit this base model ({type(exc).__name__}: {exc})") from None
        finally:
            dlogging.set_verbosity(level)

    def __exit__(self, *exc):
        with timeline.span("merging LoRAs"):
            self._undo.close()


def _file_sites(denoiser, path: Path, scale: float):
    """`file_sites`, or None (peft's way) when the file cannot be read that way: peft then says what is wrong."""
    try:
        return file_sites(denoiser, path, scale)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: load_lora_weights reports it by name
        log.debug("%s: merged through peft (%s: %s)", path, type(exc).__name__, exc)
        return None


def batch_size(images: int, at_most: int) -> int:
    """The size of `generate`'s batches for `images` images: equal, at most `at_most` (24 images at 10: 8+8+8,
    not 10+10+4); the last one holds the rest."""
    return math.ceil(images / math.ceil(images / at_most)) if images else 1


@torch.no_grad()
def generate(pipe, refiner, prompts: list[str], cfg: EvalConfig, desc: str) -> dict[str, list[Image.Image]]:
    """Every prompt x seed, in batches. Returns {"base": [...]} and, with a refiner, {"refined": [...]} too,
    ordered prompt-major (prompt 0 seed 0, prompt 0 seed 1, ...)."""
    jobs = [(p, s) for p in prompts for s in cfg.seeds]
    size = batch_size(len(jobs), cfg.batch_size)
    out: dict[str, list[Image.Image]] = {"base": []}
    if refiner is not None:
        out["refined"] = []
    device = pipe.device
    for i in tqdm(range(0, len(jobs), size), desc=desc, unit="batch", leave=False):
        chunk = jobs[i:i + size]
        texts = [p for p, _ in chunk]
        gens = [torch.Generator(device=device).manual_seed(s) for _, s in chunk]  # paired across checkpoints
        kw = dict(**prompt_embeddings(pipe, texts, cfg.guidance_scale > 1), num_inference_steps=cfg.num_inference_steps,
                  guidance_scale=cfg.guidance_scale, height=cfg.resolution, width=cfg.resolution, generator=gens)
        out["base"] += decode(pipe, pipe(**kw, output_type="latent").images, size=(cfg.resolution, cfg.resolution))
        if refiner is None:
            continue
        # ensemble of experts: the base denoises the first part, the refiner finishes from its latents
        kw["generator"] = [torch.Generator(device=device).manual_seed(s) for _, s in chunk]
        latents = pipe(**kw, denoising_end=cfg.refiner_split, output_type="latent").images
        gens = [torch.Generator(device=device).manual_seed(s) for _, s in chunk]
        out["refined"] += refiner(prompt=texts, image=latents, num_inference_steps=cfg.num_inference_steps,
                                  denoising_start=cfg.refiner_split, guidance_scale=cfg.guidance_scale,
                                  generator=gens).images
    return out


_EMBEDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prompt_embeddings(pipe, prompts: list[str], guidance: bool) -> dict[str, torch.Tensor | None]:
    """The pipeline's prompt embeddings for `prompts` (its family's encode_for_generation, one row per prompt), as
    keyword arguments for the pipeline call. Each prompt is encoded once per set of text encoders while they carry no
    LoRA: a sweep scores the same prompts at every checkpoint, so the text encoders run once, and between times
    they may wait in CPU memory (they come to the pipeline's device only to encode and go back after)."""
    family = families.of_pipeline(pipe)
    encoders = family.generation_text_encoders(pipe)
    tuned = any(getattr(m, "peft_config", None) for m in encoders)  # text-encoder LoRA: encode every time
    cache = {} if tuned else _EMBEDS.setdefault(encoders[-1], {})
    device = pipe.device
    pair = tuple(id(m) for m in encoders)  # a refiner shares text_encoder_2 but has no first encoder
    missing = [p for p in dict.fromkeys(prompts) if (p, guidance, device, pair) not in cache]
    if missing:
        with offload_models(*encoders, device=device):
            rows = family.encode_for_generation(pipe, missing, guidance)
        for i, p in enumerate(missing):
            cache[(p, guidance, device, pair)] = {k: None if t is None else t[i:i + 1] for k, t in rows.items()}
    got = [cache[(p, guidance, device, pair)] for p in prompts]
    return {k: None if got[0][k] is None else torch.cat([g[k] for g in got]) for k in got[0]}


def decode(pipe, latents: torch.Tensor, chunk: int = 4, size: tuple[int, int] | None = None) -> list[Image.Image]:
    """Latents (the pipeline's output_type="latent", `size` = (height, width) of the images) -> images, a few at a
    time (a 1024 px decode needs GBs per image). On CUDA the decoder runs in bf16 (fp32's range, so no fp16
    overflow, at tensor-core speed): a VAE in fp32 (a sweep keeps SDXL's for exact training latents) or fp16
    decodes through a bf16 copy of its decoder half, made once."""
    vae = pipe.vae
    post, decoder = _decoder(vae, latents.device)
    latents = latents.to(next(decoder.parameters()).dtype)
    height, width = size or (None, None)
    latents = families.of_pipeline(pipe).latents_for_decoder(pipe, latents, height, width)
    images = []
    # the VAE's own decoder comes to the latents' device for the decode (a trainer keeps the VAE in CPU memory
    # between checkpoints); a bf16 copy is there already
    mine = decoder is vae.decoder and next(decoder.parameters()).device != latents.device
    with offload_models(vae, device=latents.device, offload=mine), torch.no_grad():
        for part in latents.split(chunk):
            images += to_pil(decoder(post(part) if post is not None else part))
    return images


_BF16_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _decoder(vae, device: torch.device):
    """(post_quant_conv or None, decoder) to decode with on `device`: the VAE's own on the CPU or when it is bf16,
    else on CUDA its bf16 copy: fp32 weights under bf16 autocast ran the group norms in fp32 (0.12 s per 1024 px
    image), and SDXL's original VAE overflows in fp16."""
    if device.type != "cuda" or vae.dtype == torch.bfloat16:
        return getattr(vae, "post_quant_conv", None), vae.decoder
    post, decoder = bf16_decoder(vae)
    for m in (post, decoder):
        if m is not None:
            m.to(device)
    return post, decoder


def bf16_decoder(vae):
    """The VAE's decoding half (post_quant_conv or None, decoder) copied to bf16 once per VAE (~100 MB for SDXL's);
    the VAE itself stays as it is."""
    if vae not in _BF16_DECODERS:
        own = (getattr(vae, "post_quant_conv", None), vae.decoder)
        _BF16_DECODERS[vae] = tuple(copy.deepcopy(m).to(torch.bfloat16) if m is not None else None for m in own)
    return _BF16_DECODERS[vae]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Decoder output in [-1, 1] -> PIL images, as diffusers' postprocess(output_type="pil") makes them (the same
    fp32 arithmetic and rounding), with the arithmetic on the tensor's device and only uint8 pixels copied out."""
    px = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in px]
