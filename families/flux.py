"""FLUX.1 (dev and schnell): a rectified-flow DiT (FluxTransformer2DModel) conditioned on T5 hidden states and CLIP's
pooled output, trained on 2x2-packed latents of a 16-channel VAE.

Training mirrors diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py` (0.42): its timestep sampling
(`compute_density_for_timestep_sampling`, weighting_scheme "none" by default: uniform), sigmas from the
FlowMatchEulerDiscreteScheduler's own table, noisy = (1 - sigma) x + sigma noise, target = noise - x, per-sample
weights from `compute_loss_weighting_for_sd3`, guidance embedding at 3.5 for dev (a guidance-distilled model;
schnell has none), latents (x - shift_factor) x scaling_factor then `FluxPipeline._pack_latents`, image ids from
`FluxPipeline._prepare_latent_image_ids`, text as `FluxPipeline.encode_prompt` gives it (CLIP pooled, T5 hidden
states up to max_sequence_length, zero text ids), and the script's 12 default LoRA targets."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from safetensors import safe_open
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from common import compiling
from common.errors import ConfigError

from .base import Base, EvalDefaults, Family, Noised
from .kohya import DTYPES, WebUIExportError, adapter_config, kohya_alpha
from .quantize import quantize
from .sdxl import check_source
from .tiny import byte_level_tokenizers, clip_kwargs

log = logging.getLogger(__name__)

# train_dreambooth_lora_flux.py's default --lora_layers (peft matches a name equal to, or ending in, each)
TARGET_MODULES = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2")
GUIDANCE_SCALE = 3.5  # the script's --guidance_scale: what FLUX.1-dev's guidance embedding is trained with
MAX_SEQUENCE_LENGTH = 512  # the script's --max_sequence_length (T5 tokens); schnell was trained with 256
# the script's --weighting_scheme and its parameters (SD3's schemes; "none" samples t uniformly, weights 1)
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
LOGIT_MEAN, LOGIT_STD, MODE_SCALE = 0.0, 1.0, 1.29
LATENT_MULTIPLE = 16  # pixels per packed token side: the VAE's 8x, then 2x2 packing
# The attention kernels a training step may use, in this order: torch's SDPA without cuDNN's fused attention, whose
# backward failed at FLUX.1's shapes on an H100 with torch 2.11 ("mha_graph.execute ... is_good()", then an illegal
# memory access; diffusers' own script failed so too, its first backward ending in CUBLAS_STATUS_EXECUTION_FAILED,
# while bench/flux.py's attention part, the kernel alone at the same shape, passed). The forward picks the kernel;
# its backward follows it.
TRAINING_ATTENTION = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def training_attention():
    """SDPA restricted to TRAINING_ATTENTION's kernels, tried in its order (read when called: bench/flux.py's cudnn
    parts put cuDNN first; a torch without `set_priority` keeps its own order, flash first as here)."""
    try:
        return sdpa_kernel(list(TRAINING_ATTENTION), set_priority=True)
    except TypeError:
        return sdpa_kernel(list(TRAINING_ATTENTION))


@dataclass(frozen=True)
class Variant:
    """What differs between FLUX.1 models: evaluation defaults as their model cards use them, the web-UI
    architecture name (kohya's sai_model_spec), the licence."""

    steps: int
    guidance: float
    resolution: int
    architecture: str
    licence: str
    licence_link: str


DEV = Variant(28, 3.5, 1024, "flux-1-dev/lora", "flux-1-dev-non-commercial-license",
              "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md")
SCHNELL = Variant(4, 0.0, 1024, "flux-1-schnell/lora", "apache-2.0",
                  "https://huggingface.co/black-forest-labs/FLUX.1-schnell")


OFFICIAL = {"black-forest-labs/FLUX.1-dev": DEV, "black-forest-labs/FLUX.1-schnell": SCHNELL}


def variant(guidance_embeds: bool) -> Variant:
    """dev is guidance-distilled (the transformer embeds a guidance value); schnell is timestep-distilled, no
    guidance embedding: the transformer's config tells them apart, whatever folder or hub id it came from."""
    return DEV if guidance_embeds else SCHNELL


# ---- the base ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The family's own training settings (model.options; defaults: the script's)."""

    guidance_scale: float = GUIDANCE_SCALE
    weighting_scheme: str = "none"
    logit_mean: float = LOGIT_MEAN
    logit_std: float = LOGIT_STD
    mode_scale: float = MODE_SCALE


def settings(cfg: Any) -> Settings:
    """model.options as Settings; an unknown key or scheme is refused naming the known ones."""
    options = dict(getattr(cfg, "options", None) or {})
    known = Settings.__dataclass_fields__
    problems = [f"model.options.{k} is not a FLUX.1 setting; use one of {', '.join(known)}" for k in options
                if k not in known]
    s = Settings(**{k: v for k, v in options.items() if k in known})
    if s.weighting_scheme not in WEIGHTING_SCHEMES:
        problems.append(f"model.options.weighting_scheme={s.weighting_scheme!r} is not one of "
                        f"{', '.join(WEIGHTING_SCHEMES)} (train_dreambooth_lora_flux.py's choices; none: uniform)")
    if problems:
        raise ConfigError(problems)
    return s


@dataclass
class FluxBase(Base):
    """The frozen FLUX.1 modules and the settings a step reads."""

    family: Flux
    source: str
    fingerprint: str
    device: torch.device
    weight_dtype: torch.dtype
    tokenizer: Any  # CLIP
    tokenizer_2: Any  # T5
    text_encoder: nn.Module  # CLIPTextModel: its pooled output
    text_encoder_2: nn.Module  # T5EncoderModel: its hidden states
    vae: nn.Module
    transformer: nn.Module
    scheduler: Any  # FlowMatchEulerDiscreteScheduler: its sigma table is the training schedule
    settings: Settings
    steady: dict = field(default_factory=dict, repr=False)  # `on_device`'s tensors

    def on_device(self, key: tuple, make: Any) -> torch.Tensor:
        """`make()` once per key (the scheduler's tables on the device, a latent size's image ids): a training step
        copies nothing from the host, which a CUDA graph's capture refuses (a pageable tensor's copy)."""
        if key not in self.steady:
            self.steady[key] = make()
        return self.steady[key]

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def variant(self) -> Variant:
        return variant(self.transformer.config.guidance_embeds)

    def text_encoders(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}

    def encoders_to(self, device: torch.device | str, text: bool = True, vae: bool = True) -> None:
        """T5-XXL alone is ~9.5 GB in bf16: it waits in CPU memory between cache fills."""
        for m in ([self.text_encoder, self.text_encoder_2] if text else []) + ([self.vae] if vae else []):
            m.to(device)

    def pipeline(self):
        self.encoders_to(self.device)
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
                            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                            transformer=self.transformer)


def t5_tokens(tokenizer) -> int:
    """T5 tokens a prompt is padded or cut to, in training and in generation alike: the script's
    --max_sequence_length (512), or fewer where the tokenizer says so (a tiny model's)."""
    return min(MAX_SEQUENCE_LENGTH, int(tokenizer.model_max_length))


def t5_tokenizer(max_length: int):
    """A T5 (Unigram, SentencePiece-style) tokenizer over the printable ASCII characters, each alone and after a
    word boundary: an offline stand-in for T5's 32k pieces. Every prompt tokenizes; ids 0, 1, 2 are <pad>, </s>,
    <unk> as in T5."""
    chars = sorted(set(string.printable.strip()))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


class Flux(Family):
    """FLUX.1 dev and schnell (which one: the transformer's guidance embedding, see `variant`)."""

    name = "flux"
    display_name = "FLUX.1"
    denoiser_part = "transformer"
    text_encoder_parts = ("text_encoder",)  # the script trains CLIP's LoRA only (T5 stays frozen)
    default_targets = TARGET_MODULES
    default_text_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    resolution_multiple = LATENT_MULTIPLE
    prompt_tokens = 77  # CLIP's; T5 reads `t5_tokens`
    # an H100 compiled the blocks in 31-40 s and then stepped in 444 ms instead of 603 at 1024 px (bench/flux.py):
    # ~250 steps repay it; one 1000-step trial of experiment=flux does, where SDXL's break-even would refuse it
    compile_pays_at = 250
    eval_defaults = EvalDefaults(DEV.resolution, DEV.steps, DEV.guidance)
    pipeline_classes = ("FluxPipeline",)
    card_tags = ("flux", "flux-diffusers", "template:sd-lora")
    low_memory = ("the transformer's Linear weights stored in float8 (model.quantize=float8: 14.1 GiB instead of 22.2), "
                  "gradient checkpointing of its blocks, one trial per pass, the text encoders (T5-XXL: ~9.5 GB) and "
                  "the VAE in CPU memory once their outputs are cached, 8-bit AdamW when bitsandbytes is installed")
    quantizable = True

    # ---- 1. the base

    def problems(self, model: Any, lora: Any, train: Any) -> list[str]:
        """model.options it does not know, and the epsilon-prediction tools flow matching has no use for."""
        try:
            settings(model)
            found = []
        except ConfigError as exc:
            found = list(exc.problems)
        if train.snr_gamma is not None:
            found.append(f"train.snr_gamma={train.snr_gamma}: min-SNR weighting is for epsilon prediction; FLUX.1 "
                         "trains by flow matching: remove it (model.options.weighting_scheme weights timesteps)")
        if train.noise_offset:
            found.append(f"train.noise_offset={train.noise_offset} does not apply to FLUX.1's flow matching: "
                         "remove it")
        return found

    def check_source(self, cfg: Any) -> str:
        return check_source(cfg)

    def build(self, cfg: Any, out: Path) -> None:
        """FluxPipeline with random weights from cfg.architecture (transformer, vae, text_encoder (CLIP),
        text_encoder_2 (T5), scheduler: each class's keyword arguments), the tokenizers built offline. Initialised
        on the GPU when there is one and in the build dtype: FLUX.1-dev's 16.8B parameters would take 67 GB in fp32
        and minutes on a CPU."""
        arch = cfg.architecture
        torch.manual_seed(int(arch.get("seed", 0)))
        t5_tok = t5_tokenizer(int(arch.get("max_sequence_length", MAX_SEQUENCE_LENGTH)))
        t5 = {"vocab_size": len(t5_tok), "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
              **arch["text_encoder_2"]}
        dtype, previous = getattr(torch, cfg.build_dtype), torch.get_default_dtype()
        init_device = "cuda" if torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory() as tok_dir, torch.device(init_device):
            torch.set_default_dtype(dtype)
            try:
                pipe = FluxPipeline(
                    scheduler=FlowMatchEulerDiscreteScheduler(**arch["scheduler"]), vae=AutoencoderKL(**arch["vae"]),
                    text_encoder=CLIPTextModel(CLIPTextConfig(**clip_kwargs(arch["text_encoder"]))),
                    tokenizer=byte_level_tokenizers(Path(tok_dir))[0],
                    text_encoder_2=T5EncoderModel(T5Config(**t5)), tokenizer_2=t5_tok,
                    transformer=FluxTransformer2DModel(**arch["transformer"]))
            finally:
                torch.set_default_dtype(previous)
            pipe.save_pretrained(out, safe_serialization=True)

    def load(self, cfg: Any, source: str, device: torch.device, weight_dtype: torch.dtype,
             fingerprint: str) -> FluxBase:
        """Every component from a diffusers FLUX.1 folder or hub id. The VAE in `weight_dtype` too: FLUX's is
        shipped and used in bf16 (SDXL's overflows in fp16 and stays fp32). With model.quantize the transformer's
        Linear weights are stored in 8 bits while still in CPU memory (families/quantize.py)."""
        kw = {"revision": cfg.revision}
        w = {"variant": cfg.variant, **kw}
        log.info("loading FLUX.1 base model from %s", source)
        vae_src = (cfg.vae, {}) if cfg.vae else (source, {"subfolder": "vae", **w})
        base = FluxBase(
            self, source, fingerprint, device, weight_dtype,
            AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
            AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw),
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=weight_dtype, **w),
            T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", dtype=weight_dtype, **w),
            AutoencoderKL.from_pretrained(vae_src[0], torch_dtype=weight_dtype, **vae_src[1]),
            FluxTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=weight_dtype, **w),
            FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **kw), settings(cfg))
        if getattr(cfg, "quantize", None):
            quantize(base.transformer, cfg.quantize, weight_dtype)
            log.info("FLUX.1 transformer: Linear weights stored as %s, computed in %s", cfg.quantize, weight_dtype)
        for m in (base.text_encoder, base.text_encoder_2, base.vae, base.transformer):
            m.requires_grad_(False)
            m.eval()
            m.to(device)
        return base

    # ---- 2. caches

    def tokenize(self, base: FluxBase, prompt: str) -> tuple[torch.Tensor, ...]:
        """CLIP's 77 ids and T5's `t5_tokens` ids, padded to their lengths (the script's tokenize_prompt)."""
        ids = []
        for tok, n in ((base.tokenizer, 77), (base.tokenizer_2, t5_tokens(base.tokenizer_2))):
            have = len(tok(prompt).input_ids)
            if have > n:
                log.warning("prompt %r is %d tokens; FLUX.1's %s reads only the first %d", prompt, have,
                            type(tok).__name__, n)
            ids.append(tok(prompt, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids)
        return tuple(ids)

    def encode_tokens(self, base: FluxBase, ids: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """CLIP's pooled output, T5's last hidden states and zero text ids (1 x L x 3): the script's encode_prompt
        (and FluxPipeline.encode_prompt's)."""
        pooled = base.text_encoder(ids[0].to(base.device), output_hidden_states=False).pooler_output
        embeds = base.text_encoder_2(ids[1].to(base.device))[0]
        text_ids = torch.zeros(1, embeds.shape[1], 3, device=base.device)
        return {"prompt_embeds": embeds, "pooled": pooled, "text_ids": text_ids}

    def encode_pixels(self, base: FluxBase, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = base.vae.encode(pixels.to(base.device, base.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def image_conditioning(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                           resolution: int) -> list[float]:
        return []  # positions are the image ids, made from the latents' size in `predict`

    # ---- 3. a training step

    def noised(self, base: FluxBase, sample: torch.Tensor, t: Any, gen: torch.Generator) -> Noised:
        """Flow matching as the script does it: x = (sample - shift_factor) x scaling_factor, noise, then u from
        `compute_density_for_timestep_sampling` (every draw from `gen`), timesteps and sigmas at index u x 1000 of
        the scheduler's own tables (the script finds the sigma by its timestep: the same index, without a host
        sync), noisy = (1 - sigma) x + sigma noise, target = noise - x. Unpacked: `predict` packs."""
        s, sched = base.settings, base.scheduler
        x = (sample - base.vae.config.shift_factor) * base.vae.config.scaling_factor
        noise = torch.randn(x.shape, generator=gen, device=x.device)
        u = compute_density_for_timestep_sampling(weighting_scheme=s.weighting_scheme, batch_size=x.shape[0],
                                                  logit_mean=s.logit_mean, logit_std=s.logit_std,
                                                  mode_scale=s.mode_scale, device=x.device, generator=gen)
        idx = (u * sched.config.num_train_timesteps).long()
        timesteps = base.on_device(("timesteps", x.device), lambda: sched.timesteps.to(x.device))[idx]
        sigmas = base.on_device(("sigmas", x.device, x.dtype), lambda: sched.sigmas.to(x.device, x.dtype))[idx]
        sigmas = sigmas.view(-1, 1, 1, 1)
        return Noised((1.0 - sigmas) * x + sigmas * noise, noise - x, timesteps)

    def predict(self, base: FluxBase, noisy: torch.Tensor, timesteps: torch.Tensor, image_cond: torch.Tensor,
                text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's velocity: latents packed 2x2 (FluxPipeline._pack_latents), image ids of their grid,
        timestep / 1000, the guidance embedding at model.options.guidance_scale when the model has one (dev);
        unpacked back to the latents' layout. Attention through TRAINING_ATTENTION's kernels."""
        n, ch, h, w = noisy.shape
        tr, dtype = base.transformer, base.weight_dtype
        guidance = torch.full((n,), base.settings.guidance_scale, device=noisy.device) if tr.config.guidance_embeds \
            else None
        img_ids = base.on_device(("img_ids", h, w, noisy.device, dtype),
                                 lambda: FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, dtype))
        with training_attention():
            out = tr(hidden_states=FluxPipeline._pack_latents(noisy.to(dtype), n, ch, h, w),
                     timestep=timesteps / 1000, guidance=guidance, pooled_projections=text["pooled"].to(dtype),
                     encoder_hidden_states=text["prompt_embeds"].to(dtype), txt_ids=text["text_ids"][0].to(dtype),
                     img_ids=img_ids, return_dict=False)[0]
        return out.view(n, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, ch, h, w)

    def loss_per_sample(self, base: FluxBase, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                        t: Any) -> torch.Tensor:
        """The script's loss before its batch mean: each sample's mean of weighting x (pred - target)^2, weighting
        from `compute_loss_weighting_for_sd3` at sigma = timestep / 1000 (1 for the default scheme)."""
        sigmas = (timesteps / base.scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=base.settings.weighting_scheme, sigmas=sigmas)
        return (weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(1)

    # ---- 4. LoRA files

    def save_lora_weights(self, folder: Path, layers: dict[str, dict[str, torch.Tensor]],
                          metadata: dict[str, dict]) -> None:
        FluxPipeline.save_lora_weights(
            folder, transformer_lora_layers=layers.get("transformer"),
            text_encoder_lora_layers=layers.get("text_encoder"),
            transformer_lora_adapter_metadata=metadata.get("transformer"),
            text_encoder_lora_adapter_metadata=metadata.get("text_encoder"), safe_serialization=True)

    # ---- 5. generation

    def load_pipeline(self, pretrained: str, device: torch.device, dtype: torch.dtype,
                      refiner: str | None = None) -> tuple[Any, Any]:
        if refiner:
            raise ConfigError([f"eval.refiner={refiner!r}: FLUX.1 has no refiner; set eval.refiner=null"])
        pipe = FluxPipeline.from_pretrained(pretrained, torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe, None

    def generation_text_encoders(self, pipe: Any) -> list[nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def encode_for_generation(self, pipe: Any, prompts: list[str], guidance: bool) -> dict[str, torch.Tensor | None]:
        """FluxPipeline's prompt_embeds and pooled_prompt_embeds. `guidance` (classifier-free) does not apply: dev
        embeds its guidance value, schnell takes none, so no negative prompt is encoded."""
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=pipe.device,
                                               max_sequence_length=t5_tokens(pipe.tokenizer_2))
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def latents_for_decoder(self, pipe: Any, latents: torch.Tensor, height: int | None,
                            width: int | None) -> torch.Tensor:
        """output_type="latent" gives packed, scaled and shifted latents: unpacked (FluxPipeline._unpack_latents; a
        square image when its size is not given), then / scaling_factor + shift_factor, as the pipeline decodes."""
        cfg, f = pipe.vae.config, pipe.vae_scale_factor
        if height is None or width is None:
            height = width = 2 * f * math.isqrt(latents.shape[1])
        x = FluxPipeline._unpack_latents(latents, height, width, f)
        return x / cfg.scaling_factor + cfg.shift_factor

    # ---- 6. web UIs, speed

    def to_webui(self, path: Path, base_config: dict | None, dtype: str,
                 alphas: dict[str, float] | None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """kohya's FLUX names (`to_kohya`) at the adapter's scale, from the file's own adapter metadata (or
        `alphas` {"transformer": lora_alpha} for a file without it). The transformer's LoRA only: the script's
        CLIP LoRA (lora.train_text_encoder) is exported for diffusers."""
        if dtype not in DTYPES:
            raise WebUIExportError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)} (fp16 is what the UIs load "
                                   "by default)")
        weights = _read_lora(path)
        rank = next(iter(weights.values()))[0].shape[0]
        conf = adapter_config(path).get("transformer")
        if conf is None:
            if not alphas or "transformer" not in alphas:
                raise WebUIExportError(f"{path} does not record its adapter's alpha (no lora_adapter_metadata) "
                                       "and none was given: export from the checkpoint's trial folder")
            conf = {"r": rank, "lora_alpha": alphas["transformer"]}
        if conf.get("use_dora"):
            raise WebUIExportError("this LoRA is a DoRA, which the web-UI export does not map; use format=diffusers")
        try:
            tensors = to_kohya(weights, kohya_alpha(conf, 1), DTYPES[dtype])
        except UnmappedModule as exc:
            raise WebUIExportError(f"the transformer module {exc} has no name in kohya's FLUX format; use "
                                   "format=diffusers for this LoRA") from None
        return tensors, {"transformer": conf}

    def webui_metadata(self, configs: dict[str, dict], resolution: int,
                       base_config: dict | None = None) -> dict[str, Any]:
        """kohya's FLUX keys and modelspec's (sd-scripts library/sai_model_spec.py: architecture flux-1-dev/lora or
        flux-1-schnell/lora, BFL's implementation, no prediction type for FLUX); dev or schnell by the base's
        transformer config (its guidance embedding), dev when it is not at hand."""
        conf = configs.get("transformer", {})
        rank = int(conf.get("r") or 0)
        v = variant(base_config.get("guidance_embeds", True)) if base_config else DEV
        return {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                "ss_network_dim": rank, "ss_network_alpha": f"{float(conf.get('lora_alpha') or rank):g}",
                "ss_network_train_unet_only": "text_encoder" not in configs, "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": v.architecture,
                "modelspec.implementation": "https://github.com/black-forest-labs/flux",
                "modelspec.resolution": f"{resolution}x{resolution}"}

    def licence_of(self, base: str | None) -> tuple[str, str] | None:
        """FLUX.1-dev's and schnell's licences by their hub ids, for a card written where their model card is not
        in the cache (dev is gated)."""
        v = OFFICIAL.get(base or "")
        return (v.licence, v.licence_link) if v else None

    def enable_gradient_checkpointing(self, denoiser: nn.Module) -> None:
        """Each block's recomputation in the backward runs under TRAINING_ATTENTION too: outside `predict`'s
        context SDPA would pick another kernel (cuDNN's on Hopper), whose saved tensors differ from the forward's
        (torch.utils.checkpoint refuses them)."""
        run = functools.partial(checkpoint, use_reentrant=False,
                                context_fn=lambda: (training_attention(), training_attention()))
        denoiser.enable_gradient_checkpointing(lambda module, *args: run(module.__call__, *args))

    def compile_for_training(self, denoiser: nn.Module) -> list:
        """The blocks compiled (a quantised transformer's Float8Linears too: plain tensors, no hooks)."""
        return compiling.compile_blocks(denoiser, BLOCKS)

    @contextlib.contextmanager
    def compiled_for_generation(self, denoiser: nn.Module, on: bool, warm_key: str | None = None):
        mine = compiling.compile_blocks(denoiser, BLOCKS) if on else []
        try:
            yield
            if on:
                compiling.mark_warm(warm_key)
        finally:
            compiling.uncompile(mine)



def transformer_from_config(config: dict) -> nn.Module:
    """FLUX.1's transformer built from its config (on whatever device and dtype are current: bench/flux.py counts
    its FLOPs on the meta device), so that only families/ names diffusers' model classes."""
    return FluxTransformer2DModel(**config)


BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")  # regions torch.compile takes one at a time


# ---- the web-UI file (kohya's FLUX format) ----------------------------------------------------------------------------
# A FLUX.1 LoRA in the format ComfyUI and Forge load: kohya's (sd-scripts `networks/lora_flux.py`) names, fused
# projections as that format fuses them, the adapter's real alpha. kohya names modules by Black Forest Labs' original
# ones, where some of diffusers' Linears are one:
#     lora_unet_double_blocks_<i>_img_attn_qkv       attn.to_q, to_k, to_v (fused along the output)
#     lora_unet_double_blocks_<i>_txt_attn_qkv       attn.add_q_proj, add_k_proj, add_v_proj
#     lora_unet_single_blocks_<i>_linear1            attn.to_q, to_k, to_v, proj_mlp
#     lora_unet_double_blocks_<i>_img_attn_proj      attn.to_out.0 (one to one, as the rest below)
# A fused module gets one LoRA whose down is the parts' downs stacked and whose up is block-diagonal (each part's up
# in its own rows and columns, zeros elsewhere; a part without a LoRA is zero rows), so up @ down is each part's
# update exactly; its rank is the parts' ranks summed and its alpha makes alpha / rank the adapter's scale. The map
# is the inverse of diffusers' `_convert_kohya_flux_lora_to_diffusers` (loaders/lora_conversion_utils.py).

DOUBLE = {"attn.to_out.0": "img_attn_proj", "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2",
          "norm1.linear": "img_mod_lin", "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp_0",
          "ff_context.net.2": "txt_mlp_2", "norm1_context.linear": "txt_mod_lin"}
DOUBLE_FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer_linear",
       "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
       "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
       "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
       "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
       "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
       "time_text_embed.text_embedder.linear_2": "vector_in_out_layer"}


_LORA_KEY = re.compile(r"^transformer\.(.+)\.lora(_A|_B|\.down|\.up)\.weight$")


def _read_lora(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{transformer module: (lora_A, lora_B)} of a diffusers FLUX LoRA file (`transformer.<module>.lora.down.weight`
    as training writes it, or peft's lora_A / lora_B); anything else (a text encoder's LoRA, DoRA magnitudes, LoRA
    biases) is refused, naming the key."""
    weights: dict[str, list] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            m = _LORA_KEY.match(key)
            if m is None:
                raise WebUIExportError(f"{path}: the key {key} is not a plain transformer LoRA weight (a text-encoder "
                                       "LoRA, DoRA or a LoRA bias?): the FLUX web-UI export writes the transformer's "
                                       "plain LoRA only; use format=diffusers")
            weights.setdefault(m[1], [None, None])[m[2] in ("_B", ".up")] = f.get_tensor(key)
    return {m: (a, b) for m, (a, b) in weights.items()}


class UnmappedModule(ValueError):
    """A module kohya's FLUX format has no name for (the message names it)."""


def kohya_site(module: str) -> tuple[str, tuple[str, ...] | None, int]:
    """diffusers' module path in the transformer -> (kohya's module name, the parts it fuses or None, this module's
    index among them)."""
    kind, _, rest = module.partition(".")
    i, _, inner = rest.partition(".")
    if kind not in ("transformer_blocks", "single_transformer_blocks") or not i.isdigit():
        if module in TOP:
            return f"lora_unet_{TOP[module]}", None, 0
        raise UnmappedModule(module)
    one, fused, prefix = ((DOUBLE, DOUBLE_FUSED, f"lora_unet_double_blocks_{i}") if kind == "transformer_blocks"
                          else (SINGLE, SINGLE_FUSED, f"lora_unet_single_blocks_{i}"))
    if inner in one:
        return f"{prefix}_{one[inner]}", None, 0
    for name, parts in fused.items():
        if inner in parts:
            return f"{prefix}_{name}", parts, parts.index(inner)
    raise UnmappedModule(module)


def to_kohya(weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
             dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{module: (lora_A r x in, lora_B out x r)} at one scale (lora_alpha / r, or / sqrt(r) with rsLoRA) -> kohya's
    `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha` (= scale x its rank) per kohya module."""
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    fused: dict[str, tuple[str, ...]] = {}
    for module, (a, b) in weights.items():
        name, parts, index = kohya_site(module)
        groups.setdefault(name, {})[index] = (a.float(), b.float())
        if parts is not None:
            fused[name] = parts
    out: dict[str, torch.Tensor] = {}
    for name, members in groups.items():
        down, up = _fuse(members, fused[name]) if name in fused else members[0]
        out[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(scale * down.shape[0], dtype=dtype)
    return out


def _fuse(members: dict[int, tuple[torch.Tensor, torch.Tensor]],
          parts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """down: the present parts' downs stacked; up: block-diagonal over (every part's rows, present parts' ranks)."""
    sizes = _part_sizes(members, parts)
    down = torch.cat([members[i][0] for i in sorted(members)])
    up = torch.zeros(sum(sizes), down.shape[0], dtype=down.dtype)
    row, col = 0, 0
    for i, size in enumerate(sizes):
        if i in members:
            b = members[i][1]
            up[row:row + size, col:col + b.shape[1]] = b
            col += b.shape[1]
        row += size
    return down, up


def _part_sizes(members: dict[int, tuple[torch.Tensor, torch.Tensor]], parts: tuple[str, ...]) -> list[int]:
    """Every fused part's output size, those without a LoRA included: q, k and v are the model's width, proj_mlp
    4 times it (diffusers' FluxSingleTransformerBlock, mlp_ratio 4), so any part present gives them all."""
    i, (_, b) = next(iter(members.items()))
    width = b.shape[0] // 4 if parts[i] == "proj_mlp" else b.shape[0]
    return [members[j][1].shape[0] if j in members else 4 * width if p == "proj_mlp" else width
            for j, p in enumerate(parts)]
