"""The interface every model family implements: what the trainer, evaluation and export need to know of a base model
and nothing more. One subclass of `Family` per family (families/sdxl.py, families/flux.py, ...), chosen by
`model.family`; trainer/, evaluation/ and sweep/ call these methods and never branch on the family.

The split follows the work a sweep does, in its order:

1. the base: `check_source` / `build` (a random-weight architecture for tests and the demo) / `load` -> a `Base`
   holding the frozen modules (text encoders, VAE, the trained denoiser: SDXL's UNet, a DiT's transformer);
2. caches, computed once per sweep: `tokenize` + `encode_tokens` (the prompt's tensors: SDXL two CLIPs' hidden
   states and pooled; FLUX T5 hidden states and CLIP pooled), `encode_pixels` (the VAE's latent distribution) and
   `image_conditioning` (per-image tensors besides the latents: SDXL's size/crop time ids);
3. one training step: `noised` (the sample -> the family's latent space, noise, timesteps or sigmas, the model input
   and the target: SDXL epsilon with DDPM noising; FLUX flow matching with its density sampling), `predict` (the
   denoiser's call with all its conditioning: SDXL time ids and pooled text; FLUX guidance, txt/img ids, the 2x2
   packing and unpacking), `loss_per_sample` (the family's loss and weighting: min-SNR; SD3/FLUX weighting);
4. LoRA: `denoiser_part` (the name of the trained module in LoRA files, optimizer groups and pipelines),
   `text_encoder_parts`, `default_targets` (which Linear layers peft and the packed kernels wrap: every nn.Linear
   whose name ends in a target), `save_lora_weights` (the diffusers file through the family's own pipeline class);
5. generation: `Base.pipeline()` over the loaded modules, `load_pipeline` from a folder or hub id
   (`pipeline_classes` says which saved pipelines are the family's), the prompt embeddings a pipeline call takes
   (`generation_text_encoders`, `encode_for_generation`), `latents_for_decoder`, `eval_defaults` and
   `generation_defaults`;
6. the web-UI file (kohya's names): `to_webui` and `webui_metadata`, the model card's `card_tags`; speed and memory:
   `compile_for_training`, `compiled_for_generation`, `low_memory` (what the low-memory preset relies on, stated).

Generic code finds a family by name (`families.get(cfg.model.family)`), from a pipeline object
(`families.of_pipeline`: its class is in `pipeline_classes`), from a saved pipeline (`families.for_source`: its
model_index.json's _class_name) or from a LoRA file's parts (`families.for_parts`).

Types from trainer/ (ModelConfig, TrainConfig, LoraSettings) are passed in, never imported: families/ sits below
trainer/ and evaluation/ and imports only common/ (pyproject's import contracts)."""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from common.compiling import COMPILE_TRIAL_STEPS


class Noised(NamedTuple):
    """One micro-batch made ready for the denoiser: `noisy` its input, `target` what it is to predict, in the same
    layout as `predict`'s output; `timesteps` what `predict` and `loss_per_sample` read (SDXL: DDPM step indices;
    flow matching: the timesteps the transformer takes, sigma x 1000). All batch-first: a pack concatenates its
    trials' micro-batches along dim 0 and splits the prediction back the same way."""

    noisy: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor


@dataclass(frozen=True)
class EvalDefaults:
    """What the family's pipeline is made for: the resolution, steps and guidance evaluation uses unless eval.* sets
    them, and the pipeline's own call defaults (sweep.generate fills in what a user did not ask for)."""

    resolution: int
    num_inference_steps: int
    guidance_scale: float


class Base(ABC):
    """The frozen base a process loads once (trainer/models.py keeps it), as the family built it. Generic code reads
    only what is declared here, plus one attribute per LoRA part: `getattr(base, family.denoiser_part)` is the
    denoiser and `getattr(base, part)` each text encoder part (a checkpoint hook puts the trained parts in eval mode by
    these names). A family's own methods read its own fields (SDXL's `unet`, `text_encoder_2`, ...)."""

    family: Family
    source: str  # the folder or hub id it was loaded from
    fingerprint: str  # keys every cache derived from this base (latents, embeddings, class images)
    device: torch.device
    weight_dtype: torch.dtype  # of the frozen denoiser and text encoders (the LoRA trains in fp32)
    vae: nn.Module

    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The module the LoRA trains: SDXL's UNet, a DiT's transformer."""

    @abstractmethod
    def text_encoders(self) -> dict[str, nn.Module]:
        """{part: text encoder}, in `Family.text_encoder_parts` order (the parts a text-encoder LoRA trains)."""

    @abstractmethod
    def encoders_to(self, device: torch.device | str, text: bool = True, vae: bool = True) -> None:
        """Move the text encoders and/or the VAE: they only fill caches, and between fills wait in CPU memory."""

    @abstractmethod
    def pipeline(self) -> Any:
        """The family's diffusers pipeline over these very modules (no copy, no reload), all on the device: what the
        trainer scores checkpoints with and generates class images with."""


class Family(ABC):
    """One model family. Stateless: one instance per process (families.get), every method takes what it needs."""

    name: ClassVar[str]  # model.family
    display_name: ClassVar[str]  # in messages, model cards: "SDXL", "FLUX.1"
    denoiser_part: ClassVar[str]  # the trained module's name in LoRA files and optimizer groups: "unet", "transformer"
    text_encoder_parts: ClassVar[tuple[str, ...]]  # parts a text-encoder LoRA trains (may be empty)
    default_targets: ClassVar[tuple[str, ...]]  # lora.target_modules the family is made for (peft names)
    default_text_targets: ClassVar[tuple[str, ...]]
    resolution_multiple: ClassVar[int]  # data.resolution must be a multiple (SDXL 8; FLUX 16: VAE 8 x 2x2 packing)
    prompt_tokens: ClassVar[int]  # tokens the (first) text encoder reads; longer prompts are cut (a warning says so)
    eval_defaults: ClassVar[EvalDefaults]
    pipeline_classes: ClassVar[tuple[str, ...]]  # diffusers pipeline class names that are this family's
    card_tags: ClassVar[tuple[str, ...]]  # the model card's Hugging Face tags ("stable-diffusion-xl", ...)
    low_memory: ClassVar[str]  # what preset=low_memory relies on for this family, in words (docs, the preset's note)
    quantizable: ClassVar[bool] = False  # whether `load` honours model.quantize (families/quantize.py)
    compile_pays_at: ClassVar[int] = COMPILE_TRIAL_STEPS  # trial-steps of a pack that repay a cold training compile

    # ---- 1. the base ---------------------------------------------------------------------------------------------

    @abstractmethod
    def check_source(self, cfg: Any) -> str:
        """model.pretrained (cfg: trainer.config.ModelConfig) as from_pretrained will read it, checked without
        loading or downloading weights; "" for a model built from model.architecture. Raises ModelSourceError
        naming the fix."""

    @abstractmethod
    def build(self, cfg: Any, out: Path) -> None:
        """Build the family's pipeline with random weights from cfg.architecture and save_pretrained it into the new
        folder `out` (the caller publishes it atomically and marks it as random weights). Tests and the demo train
        on it (conf/model/*_tiny.yaml); GPU benchmarks use the full architecture."""

    @abstractmethod
    def load(self, cfg: Any, source: str, device: torch.device, weight_dtype: torch.dtype, fingerprint: str) -> Base:
        """The frozen base from `source` (a folder or hub id): every module requires_grad False, eval mode, on
        `device`, the denoiser and text encoders in `weight_dtype` (the VAE in what the family needs); a family that is
        `quantizable` stores the denoiser's Linear weights in 8 bits when cfg.quantize says so (families/quantize.py),
        before it moves to `device`."""

    # ---- 2. caches -----------------------------------------------------------------------------------------------

    @abstractmethod
    def tokenize(self, base: Base, prompt: str) -> tuple[torch.Tensor, ...]:
        """The prompt's token ids, one tensor (1 x tokens) per text encoder; warns when the prompt is cut."""

    @abstractmethod
    def encode_tokens(self, base: Base, ids: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The conditioning tensors of `ids` (batch-first; cached in fp32 once per prompt, or recomputed with
        gradients at every step when the text encoders train). Keys are the family's own (SDXL: prompt_embeds,
        pooled); `predict` receives the same keys, each concatenated over the micro-batch."""

    @abstractmethod
    def encode_pixels(self, base: Base, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) of a batch of images in [-1, 1] (N x 3 x H x W), unscaled: the
        trainer caches them and draws a sample per step; `noised` maps the sample to the family's latent space."""

    @abstractmethod
    def image_conditioning(self, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                           resolution: int) -> list[float]:
        """Per-image conditioning besides the latents, as numbers (cached beside them): SDXL's six time ids. A
        family without any returns []."""

    # ---- 3. a training step --------------------------------------------------------------------------------------

    @abstractmethod
    def noised(self, base: Base, sample: torch.Tensor, t: Any, gen: torch.Generator) -> Noised:
        """The micro-batch's VAE samples (N x C x h x w, unscaled) -> model input, target and timesteps, every random
        number from `gen` in a fixed order (a trial draws the same numbers alone or in a pack). t:
        trainer.config.TrainConfig (noise_offset, snr_gamma, ... or the family's own fields)."""

    @abstractmethod
    def predict(self, base: Base, noisy: torch.Tensor, timesteps: torch.Tensor, image_cond: torch.Tensor,
                text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output for the micro-batch, in `Noised.target`'s layout (the caller holds autocast).
        image_cond: `image_conditioning` per sample (N x k, k may be 0); text: `encode_tokens`' tensors, per sample.
        Constants of the base (e.g. the guidance a guidance-distilled DiT trains with) live on the Base that `load`
        built from the model config: a pack's trials share one call."""

    @abstractmethod
    def loss_per_sample(self, base: Base, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                        t: Any) -> torch.Tensor:
        """One loss per sample (N), weighted as the family trains (the caller averages, splits instance and class
        samples for prior preservation and sums a pack's trials)."""

    # ---- 4. LoRA files -------------------------------------------------------------------------------------------

    @abstractmethod
    def save_lora_weights(self, folder: Path, layers: dict[str, dict[str, torch.Tensor]],
                          metadata: dict[str, dict]) -> None:
        """Write the diffusers LoRA file into `folder`: layers {part: state dict in diffusers' names}, metadata
        {part: peft LoraConfig.to_dict()} (through the family's pipeline class's save_lora_weights)."""

    # ---- 5. generation -------------------------------------------------------------------------------------------

    @abstractmethod
    def load_pipeline(self, pretrained: str, device: torch.device, dtype: torch.dtype,
                      refiner: str | None = None) -> tuple[Any, Any]:
        """(pipeline, refiner or None) from a folder or hub id, for evaluation without a trainer's base. A family
        without refiners raises EvalInputError when one is asked for."""

    @abstractmethod
    def generation_text_encoders(self, pipe: Any) -> list[nn.Module]:
        """The pipeline's text encoders that `encode_for_generation` runs (they come to the device only for it)."""

    @abstractmethod
    def encode_for_generation(self, pipe: Any, prompts: list[str], guidance: bool) -> dict[str, torch.Tensor | None]:
        """The pipeline call's prompt keyword arguments for `prompts`, one row per prompt (evaluation caches rows per
        prompt and concatenates them): SDXL prompt_embeds, negative_..., pooled_...; guidance: classifier-free."""

    @abstractmethod
    def latents_for_decoder(self, pipe: Any, latents: torch.Tensor, height: int | None,
                            width: int | None) -> torch.Tensor:
        """The pipeline's output_type="latent" images -> what the VAE's decoder takes (unscaled, unshifted,
        unpacked; already in the decoder's dtype): evaluation decodes itself (in chunks, through a bf16 decoder on
        CUDA). height, width: of the images (None from callers that decode SDXL-layout latents only)."""

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The pipeline call's own defaults (num_inference_steps, guidance_scale, height, width)."""
        d = self.eval_defaults
        return {"num_inference_steps": d.num_inference_steps, "guidance_scale": d.guidance_scale,
                "height": d.resolution, "width": d.resolution}

    # ---- 6. web UIs, speed ---------------------------------------------------------------------------------------

    @abstractmethod
    def to_webui(self, path: Path, base_config: dict | None, dtype: str,
                 alphas: dict[str, float] | None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """The diffusers LoRA file at `path` as the web UIs (ComfyUI, A1111, Forge) load it: (kohya-named state dict
        in `dtype`, {part: adapter config}; families/kohya.py has the shared pieces). base_config: the base's
        <denoiser_part>/config.json when at hand, else None (SDXL's SGM block numbers depend on it); alphas: {part:
        lora_alpha} for a file whose metadata lacks them. Raises families.kohya.WebUIExportError, naming why and the
        way out, for what the format cannot hold."""

    @abstractmethod
    def webui_metadata(self, configs: dict[str, dict], resolution: int,
                       base_config: dict | None = None) -> dict[str, Any]:
        """The family's own kohya ss_* / modelspec.* keys (base model version, architecture, prediction type,
        network dim and alpha from `configs`); the exporter adds the trial's. base_config: as in `to_webui` (which
        base of the family it is may decide the architecture: FLUX.1-dev or schnell)."""

    def problems(self, model: Any, lora: Any, train: Any) -> list[str]:
        """Settings this family cannot honour (each naming the value and the fix), for trainer.config.validate to
        report with every other bad value before anything loads; [] when all apply."""
        return []

    def licence_of(self, base: str | None) -> tuple[str, str] | None:
        """(licence id, link) of a base the family knows by its hub id, for the model card when the base's own card
        is not at hand (a gated model's); None: the card must be found."""
        return None

    def enable_gradient_checkpointing(self, denoiser: nn.Module) -> None:
        """Gradient checkpointing on (train.gradient_checkpointing): diffusers' own, unless the family's step needs
        its recomputation under a context of its own."""
        denoiser.enable_gradient_checkpointing()

    @abstractmethod
    def compile_for_training(self, denoiser: nn.Module) -> list:
        """Regional torch.compile of the denoiser's repeated blocks for training; returns what `uncompile` undoes."""

    @abstractmethod
    def compiled_for_generation(self, denoiser: nn.Module, on: bool,
                                warm_key: str | None = None) -> contextlib.AbstractContextManager:
        """Context: inside, with `on`, the denoiser's generation regions compiled (common/compiling.py); `warm_key`
        is marked warm in the persistent compile cache when the code inside ran without error."""
