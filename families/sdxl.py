"""SDXL (stabilityai/stable-diffusion-xl-base-1.0 and its architecture): two CLIP text encoders, a UNet with size and
crop conditioning (time ids), epsilon prediction with DDPM noising and min-SNR weighting, kohya's SGM names for the
web UIs. Everything here moved from trainer/, evaluation/, common/ and sweep/ without a change of behaviour
(tests/test_families.py: the demo's checkpoints and selection byte for byte as before)."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from safetensors import safe_open
from torch import nn

from common import compiling
from common.errors import ModelSourceError

from .base import Base, EvalDefaults, Family, Noised
from .kohya import DTYPES, WebUIExportError, adapter_config, kohya_alpha
from .tiny import byte_level_tokenizers, clip_kwargs

log = logging.getLogger("trainer.cache")  # the name the prompt-length warning has always carried

ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"  # modelspec.architecture of the web-UI file


@dataclass
class SDXLBase(Base):
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
    family: SDXL = None  # set by SDXL.load

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    def text_encoders(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def encoders_to(self, device: torch.device | str, text: bool = True, vae: bool = True) -> None:
        """Text encoders and VAE only fill caches; between fills they wait in CPU memory (~2 GB of GPU for SDXL)."""
        for m in ([self.text_encoder, self.text_encoder_2] if text else []) + ([self.vae] if vae else []):
            m.to(device)

    def pipeline(self):
        """A StableDiffusionXLPipeline over these very modules (no copy, no reload), all on the device."""
        self.encoders_to(self.device)
        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
            scheduler=EulerDiscreteScheduler.from_config(self.noise_scheduler.config),
        )


class SDXL(Family):
    name = "sdxl"
    display_name = "SDXL"
    denoiser_part = "unet"
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    default_targets = ("to_k", "to_q", "to_v", "to_out.0")
    default_text_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    resolution_multiple = 8
    prompt_tokens = 77
    eval_defaults = EvalDefaults(resolution=1024, num_inference_steps=50, guidance_scale=5.0)  # the pipeline's own
    low_memory = ("gradient checkpointing and one trial per pass of the UNet (max_pack=1); the VAE and text encoders "
                  "leave the GPU once their outputs are cached, always (6.7 GiB peak at 1024 px with prior "
                  "preservation)")
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    card_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")

    # ---- 1. the base ---------------------------------------------------------------------------------------------

    def check_source(self, cfg) -> str:
        return check_source(cfg)

    def build(self, cfg, out: Path) -> None:
        build(cfg, out)

    def load(self, cfg, source: str, device: torch.device, weight_dtype: torch.dtype, fingerprint: str) -> SDXLBase:
        base = load(cfg, source, device, weight_dtype, fingerprint)
        base.family = self
        return base

    # ---- 2. caches -----------------------------------------------------------------------------------------------

    def tokenize(self, base: SDXLBase, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = []
        for tok in (base.tokenizer, base.tokenizer_2):
            n = len(tok(prompt).input_ids)
            if n > tok.model_max_length:
                log.warning("prompt %r is %d tokens; SDXL reads only the first %d", prompt, n, tok.model_max_length)
            ids.append(tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids)
        return ids[0], ids[1]

    def encode_tokens(self, base: SDXLBase, ids) -> dict[str, torch.Tensor]:
        """SDXL text conditioning: penultimate hidden states of both encoders side by side, pooled from the second."""
        hidden = []
        pooled = None
        for enc, tid in zip((base.text_encoder, base.text_encoder_2), ids):
            out = enc(tid.to(base.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled}

    def encode_pixels(self, base: SDXLBase, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = base.vae.encode(pixels.to(base.device, base.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def image_conditioning(self, original_size, crop_top_left, resolution: int) -> list[float]:
        """SDXL's micro-conditioning: original size, crop top-left, target size."""
        return [*original_size, *crop_top_left, resolution, resolution]

    # ---- 3. a training step --------------------------------------------------------------------------------------

    def noised(self, base: SDXLBase, sample: torch.Tensor, t, gen: torch.Generator) -> Noised:
        """Epsilon prediction: DDPM noise at a uniform timestep, with train.noise_offset's per-channel offset."""
        lat = sample * base.vae.config.scaling_factor
        n, dev = lat.shape[0], lat.device
        noise = torch.randn(lat.shape, generator=gen, device=dev)
        if t.noise_offset:
            noise = noise + t.noise_offset * torch.randn((n, lat.shape[1], 1, 1), generator=gen, device=dev)
        sched = base.noise_scheduler
        steps = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen, device=dev)
        return Noised(sched.add_noise(lat, noise, steps), noise, steps)

    def predict(self, base: SDXLBase, noisy, timesteps, image_cond, text) -> torch.Tensor:
        return base.unet(noisy.to(base.weight_dtype), timesteps, text["prompt_embeds"],
                         added_cond_kwargs={"text_embeds": text["pooled"],
                                            "time_ids": image_cond.to(base.weight_dtype)}).sample

    def loss_per_sample(self, base: SDXLBase, pred, target, timesteps, t) -> torch.Tensor:
        """MSE per sample, min-SNR weighted (Hang et al. 2023) for epsilon prediction if train.snr_gamma is set."""
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if t.snr_gamma is not None:
            snr = compute_snr(base.noise_scheduler, timesteps)
            per_sample = per_sample * torch.clamp(snr, max=t.snr_gamma) / snr
        return per_sample

    # ---- 4. LoRA files -------------------------------------------------------------------------------------------

    def save_lora_weights(self, folder: Path, layers: dict, metadata: dict) -> None:
        StableDiffusionXLPipeline.save_lora_weights(
            folder, **{f"{part}_lora_layers": sd for part, sd in layers.items()},
            **{f"{part}_lora_adapter_metadata": m for part, m in metadata.items()}, safe_serialization=True)

    # ---- 5. generation -------------------------------------------------------------------------------------------

    def load_pipeline(self, pretrained: str, device: torch.device, dtype: torch.dtype, refiner: str | None = None):
        """The base SDXL pipeline (and the refiner sharing its VAE and second text encoder)."""
        base = StableDiffusionXLPipeline.from_pretrained(pretrained, torch_dtype=dtype).to(device)
        ref = None
        if refiner:
            ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                refiner, text_encoder_2=base.text_encoder_2, vae=base.vae, torch_dtype=dtype).to(device)
        return base, ref

    def generation_text_encoders(self, pipe) -> list[nn.Module]:
        return [m for m in (pipe.text_encoder, pipe.text_encoder_2) if m is not None]

    def encode_for_generation(self, pipe, prompts: list[str], guidance: bool) -> dict[str, torch.Tensor | None]:
        rows = pipe.encode_prompt(prompts, device=pipe.device, do_classifier_free_guidance=guidance)
        keys = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return dict(zip(keys, rows))

    def latents_for_decoder(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        cfg = pipe.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            return latents * std / cfg.scaling_factor + mean
        return latents / cfg.scaling_factor

    # ---- 6. web UIs, speed ---------------------------------------------------------------------------------------

    def to_webui(self, path: Path, base_config: dict | None, dtype: str, alphas):
        """kohya's SDXL names: the UNet's SGM block numbering depends on its layers_per_block (the base's
        unet/config.json; SDXL's 2 when the base is not at hand)."""
        try:
            lpb = int(base_config["layers_per_block"])
        except Exception:
            lpb = 2
        return convert(path, lpb, dtype, alphas)

    def webui_metadata(self, configs: dict[str, dict], resolution: int,
                       base_config: dict | None = None) -> dict[str, Any]:
        unet = configs.get("unet", {})
        rank = int(unet.get("r") or 0)
        alpha = float(unet.get("lora_alpha") or rank)
        return {"ss_network_module": "networks.lora", "ss_network_dim": rank, "ss_network_alpha": f"{alpha:g}",
                "ss_base_model_version": "sdxl_base_v1-0", "ss_network_train_unet_only": "text_encoder" not in configs,
                "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ARCHITECTURE,
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                "modelspec.resolution": f"{resolution}x{resolution}", "modelspec.prediction_type": "epsilon"}

    def compile_for_training(self, denoiser: nn.Module) -> list:
        return compiling.compile_for_training(denoiser)

    def compiled_for_generation(self, denoiser: nn.Module, on: bool,
                                warm_key: str | None = None) -> contextlib.AbstractContextManager:
        return compiling.compiled_for_generation(denoiser, on, warm_key)


# ---- the base: checked, built, loaded --------------------------------------------------------------------------


def check_source(cfg) -> str:
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


def build(cfg, out: Path) -> None:
    """A StableDiffusionXLPipeline with random weights from `cfg.architecture`, saved into the folder `out`."""
    arch = cfg.architecture or {}
    torch.manual_seed(int(arch.get("seed", 0)))
    dtype = getattr(torch, cfg.build_dtype)
    init_device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 2.6B params is slow on CPU
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(init_device):
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        te = CLIPTextModel(CLIPTextConfig(**clip_kwargs(arch["text_encoder"])))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_kwargs(arch["text_encoder_2"])))
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
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)


def load(cfg, source: str, device: torch.device, weight_dtype: torch.dtype, fingerprint: str) -> SDXLBase:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"revision": cfg.revision}
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
    return SDXLBase(source, fingerprint, tok, tok2, te, te2, vae, unet, sched, device, weight_dtype)


# ---- the web-UI file: kohya's SDXL names -----------------------------------------------------------------------
# The diffusers file names modules by diffusers' paths (`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.
# to_k.lora.down.weight`), which the UIs skip key by key without a word. kohya's SDXL trainer writes
#
#     lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k.lora_down.weight   the UNet, by the original (SGM) paths
#     lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight         text encoders 1 and 2, by HF's paths
#     <name>.alpha                                                                  one scalar per module
#
# and a UI applies `up @ down * alpha / rank`. diffusers' `convert_state_dict_to_kohya` is right about the text
# encoders and the lora_down/lora_up names, and is used for them; it is wrong for this tool in two places, fixed here:
# it writes alpha = rank whatever the adapter's alpha was (rank and alpha are what a sweep varies), and it keeps the
# UNet's diffusers paths (`lora_unet_down_blocks_1_attentions_0_...`), which kohya's SDXL files never use.

PARTS = ("unet", "text_encoder", "text_encoder_2")
# diffusers writes text-encoder LoRA weights as `lora_linear_layer.down` (its older name), the UNet's as `lora.down`
_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora(?:_linear_layer)?\.(down|up)\.weight$")


def sgm_path(diffusers_path: str, layers_per_block: int) -> str:
    """A module path of the SDXL UNet in diffusers' naming -> the original (SGM/LDM) path that kohya names keys by.

    Input block n holds, per level i, `layers_per_block` (resnet, attention) pairs after the stem and then the
    downsampler: down_blocks.i.attentions.j is input_blocks.(1 + i (L+1) + j).1; up blocks have one layer more,
    so up_blocks.i.attentions.j is output_blocks.(i (L+1) + j).1; the mid block's attention is middle_block.1.
    Inside an attention (Transformer2DModel / SpatialTransformer) both use the same names."""
    step = layers_per_block + 1
    m = re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", diffusers_path)
    if m:
        return f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.1.{m[3]}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", diffusers_path)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", diffusers_path)
    if m:
        return f"output_blocks.{int(m[1]) * step + int(m[2])}.1.{m[3]}"
    raise WebUIExportError(f"the UNet module {diffusers_path} is outside the attention blocks: the web-UI export maps "
                           "only attention modules (lora.target_modules such as to_k, to_q, to_v, to_out.0, proj_in, "
                           "ff.net.0.proj); use format=diffusers for this LoRA")


def convert(path: Path, layers_per_block: int, dtype: str = "fp16",
            alphas: dict[str, float] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The diffusers LoRA file at `path` as a kohya state dict in `dtype`, and the adapter config per part (from the
    file's metadata, or `alphas` {part: lora_alpha} for a file without it)."""
    if dtype not in DTYPES:
        raise WebUIExportError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)} (fp16 is what the UIs load by default)")
    configs = adapter_config(path)
    peft: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if m is None:
                raise WebUIExportError(f"{path}: the key {key} is not a plain LoRA weight (a DoRA magnitude or a "
                                       "LoRA bias?): the web-UI export writes plain LoRA only; use format=diffusers")
            part, module, side = m.groups()
            if part == "unet":
                module = sgm_path(module, layers_per_block)
            elif not module.startswith("text_model."):  # transformers 5 dropped CLIPTextModel's `text_model` level;
                module = f"text_model.{module}"  # kohya's names and the UIs' CLIP keep it
            tensor = f.get_tensor(key)
            if side == "down":
                ranks[f"{part}.{module}"] = tensor.shape[0]
            peft[f"{part}.{module}.lora.{side}.weight"] = tensor.to(DTYPES[dtype])
    for part in {k.split(".", 1)[0] for k in ranks}:
        if part not in configs:
            if not alphas or part not in alphas:
                raise WebUIExportError(f"{path} does not record its adapter's alpha (no lora_adapter_metadata) and "
                                       f"none was given for {part}: export from the checkpoint's trial folder")
            configs[part] = {"r": None, "lora_alpha": alphas[part]}
    kohya = convert_state_dict_to_kohya(convert_unet_state_dict_to_peft(peft))
    for name, rank in ranks.items():  # convert_state_dict_to_kohya wrote alpha = rank: the adapter's real alpha
        part, module = name.split(".", 1)
        cfg = configs[part] if configs[part].get("r") else {**configs[part], "r": rank}
        alpha_key = kohya_name(part, module) + ".alpha"
        if alpha_key not in kohya:
            raise WebUIExportError(f"internal: {alpha_key} missing from diffusers' kohya conversion")
        kohya[alpha_key] = torch.tensor(kohya_alpha(cfg, rank), dtype=DTYPES[dtype])
    return kohya, configs


def kohya_name(part: str, module: str) -> str:
    """lora_unet_<SGM path> / lora_te1_<path> / lora_te2_<path>, dots as underscores (kohya's rule)."""
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[part]
    return f"{prefix}_{module.replace('.', '_')}"

