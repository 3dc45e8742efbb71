"""FLUX.1 as a model family (families/flux.py): the tiny model is a real FLUX.1 pipeline loaded like a downloaded one,
a training step is train_dreambooth_lora_flux.py's arithmetic, and the web-UI file reads back through diffusers' own
kohya-FLUX converter to the same weight updates."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from mlflow import MlflowClient
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import families
from common.errors import ConfigError
from common.lorafile import LORA_FILE
from families.flux import DEV, SCHNELL, TARGET_MODULES, Flux, to_kohya
from sweep import CONF_DIR
from trainer import TrialSpec, cache, lora, train
from trainer.models import resolve_source

from . import test_faults as faults
from .conftest import typed
from .test_packed import MOVE_FRACTION

FLUX = Flux()
PROMPT = "a photo of sks man"


def _model_cfg(**changes) -> SimpleNamespace:
    raw = yaml.safe_load((CONF_DIR / "model" / "flux_tiny.yaml").read_text())
    return SimpleNamespace(**{**raw, **changes})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flux") / "flux_tiny"
    FLUX.build(_model_cfg(), folder)
    return folder


@pytest.fixture(scope="module")
def base(tiny):
    return FLUX.load(_model_cfg(), str(tiny), torch.device("cpu"), torch.float32, "test")


def test_the_tiny_model_is_a_flux1_pipeline_saved_and_loaded_offline(tiny, base):
    """Its folder is what from_pretrained reads for FLUX.1 (model_index.json names FluxPipeline and its seven parts,
    tokenizers included, built without a download) and the family recognises it as dev (guidance embedding)."""
    index = json.loads((tiny / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert families.get("flux") is families.get("flux") and isinstance(families.get("flux"), Flux)
    assert base.vae.config.latent_channels == 16 and base.vae.config.shift_factor == pytest.approx(0.1159)
    assert base.variant is DEV
    clip, t5 = FLUX.tokenize(base, PROMPT)
    assert clip.shape == (1, 77) and t5.shape == (1, 96)  # T5 padded to the tiny tokenizer's 96 tokens
    assert (t5[0] == 1).sum() == 1 and t5[0, -1] == 0  # one </s>, then <pad>
    pipe = FluxPipeline.from_pretrained(tiny)
    embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=96)
    with torch.no_grad():
        mine = FLUX.encode_tokens(base, (clip, t5))
    torch.testing.assert_close(mine["prompt_embeds"], embeds)  # the same tensors FluxPipeline conditions on
    torch.testing.assert_close(mine["pooled"], pooled)
    assert mine["text_ids"].shape == (1, 96, 3) and not mine["text_ids"].any()


def _script_loss(base, sample, text, gen: torch.Generator) -> torch.Tensor:
    """train_dreambooth_lora_flux.py's step for a batch of VAE samples, transcribed (its names), with its random
    draws taken from `gen` in the family's order (noise, then u)."""
    vae, sched, transformer = base.vae, base.scheduler, base.transformer
    model_input = (sample - vae.config.shift_factor) * vae.config.scaling_factor
    bsz, ch, h, w = model_input.shape
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, "cpu", torch.float32)
    noise = torch.randn(model_input.shape, generator=gen)
    u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=bsz, logit_mean=0.0, logit_std=1.0,
                                              mode_scale=1.29, generator=gen)
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]  # the script's get_sigmas
    sigmas = sched.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, bsz, ch, h, w)
    guidance = torch.tensor([3.5]).expand(bsz)
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=text["pooled"], encoder_hidden_states=text["prompt_embeds"],
                       txt_ids=text["text_ids"][0], img_ids=latent_image_ids, return_dict=False)[0]
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pred = FluxPipeline._unpack_latents(pred, h * vae_scale_factor, w * vae_scale_factor, vae_scale_factor)
    target = noise - model_input
    return torch.mean(((pred.float() - target.float()) ** 2).reshape(bsz, -1), 1)


def test_a_training_step_is_the_diffusers_scripts_flow_matching_step(base):
    """noised -> predict -> loss_per_sample gives the script's per-sample loss for the same draws (its timestep
    sampling, sigma table, packing, guidance 3.5, target noise - x), and the same numbers from the same seed."""
    with torch.no_grad():
        text = FLUX.encode_tokens(base, FLUX.tokenize(base, PROMPT))
        mean, std = FLUX.encode_pixels(base, torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(2))
    text3 = {k: torch.cat([v] * 3) for k, v in text.items()}
    with torch.no_grad():
        n = FLUX.noised(base, sample, None, torch.Generator().manual_seed(3))
        mine = FLUX.loss_per_sample(base, FLUX.predict(base, n.noisy, n.timesteps, torch.zeros(3, 0), text3),
                                    n.target, n.timesteps, None)
        script = _script_loss(base, sample, text3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(mine, script, rtol=1e-5, atol=1e-6)
    assert mine.shape == (3,) and len(set(n.timesteps.tolist())) == 3  # one timestep per sample


def test_a_training_step_never_asks_for_cudnns_fused_attention(base, monkeypatch):
    """cuDNN's fused attention failed FLUX.1's backward on an H100 (families.flux.TRAINING_ATTENTION): every
    attention call of a training step runs with it switched off, and the setting is restored afterwards; with
    gradient checkpointing, the blocks' recomputation in the backward too (else its kernel differs from the
    forward's and torch.utils.checkpoint refuses the step: the low-memory preset failed so on an H100)."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with torch.no_grad():
        text = FLUX.encode_tokens(base, FLUX.tokenize(base, PROMPT))
        noisy = torch.randn(1, base.transformer.config.in_channels // 4, 8, 8)
        seen.clear()  # the text encoders' attention is not the training step's
        FLUX.predict(base, noisy, torch.full((1,), 500.0), torch.zeros(1, 0), text)
    n_layers = base.transformer.config.num_layers + base.transformer.config.num_single_layers
    assert len(seen) == n_layers and set(seen) == {(False, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    # with gradient checkpointing each block runs again in the backward, outside predict's context: its own
    tr = base.transformer
    FLUX.enable_gradient_checkpointing(tr)
    try:
        seen.clear()
        tr.train()
        out = FLUX.predict(base, noisy.requires_grad_(), torch.full((1,), 500.0), torch.zeros(1, 0), text)
        seen_forward = len(seen)
        out.square().mean().backward()
    finally:
        tr.disable_gradient_checkpointing()
        tr.eval()
    assert seen_forward == n_layers and len(seen) == 2 * n_layers and set(seen) == {(False, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled() == before and noisy.grad.abs().sum() > 0


def _random_lora(rank: int, width: int, blocks: int, single_targets=("attn.to_q", "attn.to_k", "attn.to_v")):
    """A LoRA on the script's 12 targets of `blocks` double blocks and the given targets of as many single blocks,
    at FLUX.1's sizes (width 3072, the MLPs 4x; diffusers' converter splits linear1 at those sizes), every weight
    random: {module: (A, B)}."""
    g = torch.Generator().manual_seed(rank)
    mlp = {"ff.net.0.proj": (width, 4 * width), "ff.net.2": (4 * width, width),
           "ff_context.net.0.proj": (width, 4 * width), "ff_context.net.2": (4 * width, width)}
    mods = {}
    for i in range(blocks):
        for t in TARGET_MODULES:
            fan_in, fan_out = mlp.get(t, (width, width))
            mods[f"transformer_blocks.{i}.{t}"] = (torch.randn(rank, fan_in, generator=g) * 0.1,
                                                   torch.randn(fan_out, rank, generator=g) * 0.1)
        for t in single_targets:  # the script's targets in a single block: attn.to_q/k/v (no to_out there)
            fan_out = 4 * width if t == "proj_mlp" else width
            mods[f"single_transformer_blocks.{i}.{t}"] = (torch.randn(rank, width, generator=g) * 0.1,
                                                          torch.randn(fan_out, rank, generator=g) * 0.1)
    return mods


@pytest.mark.parametrize("rank, alpha, single", [(16, 16.0, ("attn.to_q", "attn.to_k", "attn.to_v")),
                                                 (4, 8.0, ("attn.to_q", "attn.to_k", "attn.to_v")),
                                                 (8, 3.0, ("attn.to_q", "attn.to_v", "proj_mlp"))])
def test_webui_file_reads_back_through_diffusers_kohya_flux_converter_to_the_same_delta_w(tmp_path, rank, alpha,
                                                                                          single):
    """The diffusers file (as training writes it) -> the web-UI file -> FluxPipeline.lora_state_dict, which
    recognises kohya's FLUX format and converts it (_convert_kohya_flux_lora_to_diffusers): every module's update
    (scale x B @ A) is the diffusers file's, at FLUX.1's real sizes; qkv and linear1 are fused as kohya fuses
    them, the alpha is the adapter's (alpha / rank = lora_alpha / r), and fused parts without a LoRA get none."""
    mods = _random_lora(rank, 3072, 1, single)
    peft_state = {f"{m}.lora_{s}.weight": t for m, (a, b) in mods.items() for s, t in (("A", a), ("B", b))}
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGET_MODULES))
    lora.save_unet_lora(tmp_path / "ckpt", peft_state, config, FLUX)  # as a FLUX checkpoint is written
    tensors, configs = FLUX.to_webui(tmp_path / "ckpt" / "pytorch_lora_weights.safetensors", None, "fp32", None)
    assert configs["transformer"]["lora_alpha"] == alpha
    names = {k.split(".")[0] for k in tensors}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_mlp_2",
            "lora_unet_single_blocks_0_linear1"} <= names
    assert not any("to_q" in n or "transformer_blocks" in n for n in names)  # kohya's names only
    qkv = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert qkv.shape == (3 * rank, 3072)  # three LoRAs stacked: one fused module
    assert float(tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) / (3 * rank) == pytest.approx(alpha / rank)
    save_file(tensors, tmp_path / "webui.safetensors")
    back = FluxPipeline.lora_state_dict(str(tmp_path), weight_name="webui.safetensors")
    worst = 0.0
    for module, (a, b) in mods.items():
        want = (alpha / rank) * b @ a
        got = back[f"transformer.{module}.lora_B.weight"] @ back[f"transformer.{module}.lora_A.weight"]
        worst = max(worst, float((got - want).abs().max()))
    assert worst < 1e-5, worst  # fp32 rounding of the converter's alpha scaling
    extra = {k.rsplit(".lora_", 1)[0] for k in back} - {f"transformer.{m}" for m in mods}
    for module in extra:  # the fused parts that had no LoRA (proj_mlp, or k): no update
        assert not (back[f"{module}.lora_B.weight"] @ back[f"{module}.lora_A.weight"]).any(), module


def test_web_ui_metadata_and_licence_follow_dev_or_schnell(tiny):
    """dev (guidance embedding) and schnell (none) are told apart by the base's transformer config, whatever the
    folder is called: modelspec's architecture; the card's licence by the official hub ids (dev non-commercial,
    schnell Apache-2.0; dev is gated, so its card may not be in the cache); evaluation as their cards generate."""
    config = json.loads((tiny / "transformer" / "config.json").read_text())
    meta = FLUX.webui_metadata({"transformer": {"r": 16, "lora_alpha": 8.0}}, 1024, config)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_network_dim"] == 16 and meta["ss_network_alpha"] == "8"
    assert "modelspec.prediction_type" not in meta  # kohya writes none for FLUX
    meta = FLUX.webui_metadata({"transformer": {"r": 4}}, 1024, {**config, "guidance_embeds": False})
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora"
    assert FLUX.licence_of("black-forest-labs/FLUX.1-dev")[0] == "flux-1-dev-non-commercial-license"
    assert FLUX.licence_of("black-forest-labs/FLUX.1-schnell")[0] == "apache-2.0"
    assert FLUX.licence_of(str(tiny)) is None  # random weights: no licence is claimed for them
    assert (DEV.steps, DEV.guidance, SCHNELL.steps, SCHNELL.guidance) == (28, 3.5, 4, 0.0)
    assert FLUX.eval_defaults.num_inference_steps == 28 and FLUX.eval_defaults.guidance_scale == 3.5


def test_settings_flux_cannot_honour_are_refused_before_anything_loads():
    """model.options it does not know, an unknown weighting scheme, SDXL's min-SNR weighting and noise offset: all
    named at once with their fixes, by the config's validation."""
    with pytest.raises(ConfigError) as err:
        typed("model=flux_tiny", "model.options.weighting_scheme=uniform", "+model.options.guidance=3.5",
              "train.snr_gamma=5", "train.noise_offset=0.05")
    text = str(err.value)
    assert "model.options.guidance is not a FLUX.1 setting" in text and "guidance_scale" in text
    assert "weighting_scheme='uniform'" in text and "logit_normal" in text
    assert "train.snr_gamma=5.0: min-SNR weighting is for epsilon prediction" in text
    assert "train.noise_offset=0.05 does not apply" in text
    typed("model=flux_tiny", "model.options.weighting_scheme=logit_normal")  # a known one is fine


def test_the_kohya_map_refuses_modules_it_has_no_name_for():
    from families.flux import UnmappedModule

    with pytest.raises(UnmappedModule, match="norm_out.linear"):
        to_kohya({"norm_out.linear": (torch.zeros(1, 2), torch.zeros(2, 1))}, 1.0, torch.float32)
    assert math.isclose(float(to_kohya({"x_embedder": (torch.ones(2, 3), torch.ones(4, 2))}, 0.5,
                                       torch.float32)["lora_unet_img_in.alpha"]), 1.0)


# ---- wired in: the trainer, a sweep, a kill -------------------------------------------------------------------------

PACK_TRIALS = [("a", 1e-4, 2, None, 0), ("b", 5e-4, 4, 8.0, 1), ("c", 2e-3, 8, None, 2)]  # as tests/test_packed.py


def test_a_pack_of_flux_trials_ends_with_the_weights_of_lone_trials(tmp_path, cache_dir, monkeypatch):
    """The packed trainer wraps FLUX's 12 target Linears of the transformer: each trial of a pack of three (LRs,
    ranks, alphas and seeds differ) ends with the weights it gets alone through peft, within tests/test_packed.py's
    tolerance (1% of the most AdamW can move a weight: lr x steps). The prompt is encoded once (T5 and CLIP), for
    the pack; the lone trials read the cache. train.compile=auto weighs the pack's trial-steps against FLUX's own
    break-even (Family.compile_pays_at: a 1024-px step saves far more than SDXL's)."""
    from common import compiling

    asked, want = [], compiling.want_compile
    monkeypatch.setattr(compiling, "want_compile", lambda *a, **k: asked.append(a) or want(*a, **k))
    demo = typed("model=flux_tiny", "steps=6", "train.checkpoint_every=3", "data.resolution=64", root=tmp_path)

    def specs(root):
        return [TrialSpec(n, replace(demo.lora, rank=r, alpha=a), replace(demo.train, lr=lr, seed=seed, device="cpu"),
                          root / n) for n, lr, r, a, seed in PACK_TRIALS]

    before = cache.STATS["embeddings"]
    packed = train(specs(tmp_path / "pack"), demo.model, demo.data, cache_dir, progress=False)
    assert cache.STATS["embeddings"] - before <= 1  # 1, or 0 when an earlier test filled the on-disk cache
    assert asked == [(None, torch.device("cpu"), 3 * 6, FLUX.compile_pays_at)]
    assert FLUX.compile_pays_at < families.get("sdxl").compile_pays_at == compiling.COMPILE_TRIAL_STEPS
    cache.clear_memory_cache()
    alone = [train([s], demo.model, demo.data, cache_dir, progress=False, pack=False)[0]
             for s in specs(tmp_path / "alone")]
    assert cache.STATS["embeddings"] - before <= 1  # the lone trials read it from disk
    assert [r.pack_size for r in packed] == [3, 3, 3] and [r.pack_size for r in alone] == [0, 0, 0]
    assert [r.status for r in packed + alone] == ["finished"] * 6
    for p, a, (_, lr, *_) in zip(packed, alone, PACK_TRIALS):
        wp, wa = (load_file(r.checkpoints[-1] / LORA_FILE) for r in (p, a))
        assert wp.keys() == wa.keys()
        targets = {k.removeprefix("transformer.").split(".", 2)[2].rsplit(".lora", 1)[0] for k in wp}
        assert targets == set(TARGET_MODULES)  # the script's 12 (attn.to_q ... ff_context.net.2)
        worst = max(float((wp[k] - wa[k]).abs().max()) for k in wp) / (lr * 6)
        assert worst < MOVE_FRACTION, worst
        assert p.final_loss == pytest.approx(a.final_loss, rel=1e-4)
        assert any(v.abs().max() > 0 for k, v in wp.items() if ".up." in k)  # trained, not left at its zero init


ARGS = ["-m", "model=flux_tiny", "lr=1e-4,5e-4", "steps=4", "train.checkpoint_every=2", "data.resolution=64",
        "progress=false", "tracking.system_metrics=false"]


@pytest.fixture(scope="module")
def flux_sweep(tmp_path_factory) -> tuple[Path, str, dict]:
    """`python -m sweep -m model=flux_tiny lr=1e-4,5e-4` at demo scale, uninterrupted: (folder, output, outcome)."""
    cwd = tmp_path_factory.mktemp("flux-sweep")
    p = faults.sweep(*ARGS, cwd=cwd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    faults.assert_complete_in_mlflow(cwd)
    return cwd, p.stdout + p.stderr, faults.outcome(cwd)


@pytest.mark.slow
def test_a_flux_sweep_trains_as_a_pack_scores_races_selects_registers_and_exports(flux_sweep):
    cwd, output, _ = flux_sweep
    [folder] = cwd.glob("outputs/sweeps/*")
    results = [json.loads(r.read_text()) for r in sorted(folder.glob("*/result.json"))]
    assert [(r["name"], r["status"], r["pack_size"]) for r in results] == [("lr=0.0001", "finished", 2),
                                                                           ("lr=0.0005", "finished", 2)]
    assert len(list(cwd.glob(".cache/sdxl-lora-sweep/embeddings/*.safetensors"))) == 1  # the prompt, encoded once
    selection = json.loads((folder / "report" / "selection.json").read_text())
    assert selection["champion"]["trial"] in ("lr=0.0001", "lr=0.0005")
    assert (folder / "report" / "race.json").is_file()
    version = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}").get_model_version_by_alias(
        "flux-lora-sks-woman", "champion")  # its own registered model: never an SDXL champion's alias
    assert version.tags["trial"] == selection["champion"]["trial"]
    record = json.loads((folder / "champion" / "export.json").read_text())
    webui = folder / "champion" / record["webui_file"]
    with safe_open(str(webui), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_0_linear1.alpha" in keys
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    card = (folder / "champion" / "README.md").read_text()
    assert "FLUX.1 DreamBooth LoRA" in card and "- flux" in card
    assert "Traceback" not in output


@pytest.mark.slow
def test_a_flux_sweep_killed_mid_pack_resumes_to_the_same_outcome(flux_sweep, tmp_path):
    """SIGKILL at the pack's third step (no handler runs), then the same command with resume=true: the same
    checkpoints, weights (within 1% of an AdamW step), scores and champion as the uninterrupted sweep, and one
    FINISHED run per trial in MLflow with every step once."""
    p = faults.sweep(*ARGS, cwd=tmp_path, faults="train_step:*:3=kill")
    assert p.returncode == -9, p.stdout[-3000:] + p.stderr[-3000:]
    p = faults.sweep(*ARGS, "resume=true", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    faults.assert_same(flux_sweep[2], faults.outcome(tmp_path))
    faults.assert_complete_in_mlflow(tmp_path)


def test_the_24gb_preset_and_schnell_train(tmp_path, cache_dir):
    """preset=flux_24gb sets what it says (the transformer in float8, gradient checkpointing, one trial per pass, 8-bit
    AdamW, one image per pipeline call); its gradient checkpointing recomputes the same numbers. A schnell-architecture model (no
    guidance embedding) trains too, and its web-UI metadata says schnell."""
    small = ("model=flux_tiny", "steps=2", "train.checkpoint_every=2", "data.resolution=64")
    preset = typed(*small, "preset=flux_24gb", root=tmp_path)
    assert (preset.model.quantize, preset.train.gradient_checkpointing, preset.train.max_pack, preset.train.optimizer,
            preset.eval.batch_size) == ("float8", True, 1, "adamw8bit", 1)
    losses = []
    plain_model = replace(preset.model, quantize=None)  # the quantised transformer: test_a_quantised_transformer_...
    for name, t in (("ckpt", replace(preset.train, optimizer="adamw")), ("plain", typed(*small).train)):
        spec = TrialSpec(name, preset.lora, replace(t, device="cpu"), tmp_path / name)
        [r] = train([spec], plain_model, preset.data, cache_dir, progress=False)
        losses.append(r.final_loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    schnell = typed(*small, "model.name=flux_tiny_schnell", "model.architecture.transformer.guidance_embeds=false",
                    root=tmp_path)
    [r] = train([TrialSpec("s", schnell.lora, replace(schnell.train, device="cpu"), tmp_path / "s")], schnell.model,
                schnell.data, cache_dir, progress=False)
    assert r.status == "finished"
    config = json.loads((Path(resolve_source(schnell.model, cache_dir)) / "transformer" / "config.json").read_text())
    assert not config["guidance_embeds"]
    assert FLUX.webui_metadata({}, 64, config)["modelspec.architecture"] == "flux-1-schnell/lora"


# ---- the quantised transformer (model.quantize=float8, preset=flux_24gb) ---------------------------------------------

SMALL_CKPT = ("model=flux_tiny", "steps=2", "train.checkpoint_every=2", "data.resolution=64",
              "train.gradient_checkpointing=true")


@pytest.fixture(scope="module")
def quantised_runs(tmp_path_factory, cache_dir) -> dict:
    """One trial trained on the plain and on the float8 transformer, the same seed and settings: {quantize: (config,
    result)}."""
    root = tmp_path_factory.mktemp("quantised")
    runs = {}
    for q in (None, "float8"):
        c = typed(*SMALL_CKPT, *([f"model.quantize={q}"] if q else []), root=root)
        [r] = train([TrialSpec(str(q), c.lora, replace(c.train, device="cpu"), root / str(q))], c.model, c.data,
                    cache_dir, progress=False)
        runs[q] = (c, r)
    return runs


def test_a_quantised_transformer_stores_its_linears_in_float8_and_trains_like_the_plain_one(tiny, base,
                                                                                            quantised_runs):
    """model.quantize=float8: every Linear of the transformer but those diffusers keeps (the norms' modulation
    Linears, proj_out) stores 1 byte per weight, less than half the plain one's bytes (fp32 here; half of
    bf16's on a GPU); peft's LoRA init on it is the plain base's, in full precision, not rounded to 8 bits. Trained 2
    steps at the same seed, the loss is within 1e-3 (relative) of the plain run's: the float8 weights are ~3% off
    (e4m3 keeps 3 mantissa bits) and at the tiny model's random init the transformer's output is a small part of the
    flow-matching residual (measured: 7e-6); 1e-3 leaves room while a LoRA or base in the wrong dtype would fail to
    run or move far more. The LoRA file has the plain run's keys, shapes, dtypes and metadata."""
    from families.quantize import linear_weight_bytes, quantized_linears

    q = FLUX.load(_model_cfg(quantize="float8"), str(tiny), torch.device("cpu"), torch.float32, "test")
    kept = {n for n, m in q.transformer.named_modules() if isinstance(m, torch.nn.Linear)
            and m.weight.dtype == torch.float32}
    assert kept == {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                    "single_transformer_blocks.0.norm.linear", "norm_out.linear", "proj_out"}
    assert len(quantized_linears(q.transformer)) == 25  # the other 25 Linears, the LoRA's 12 targets among them
    assert all(m.weight.element_size() == 1 for m in quantized_linears(q.transformer))
    assert linear_weight_bytes(q.transformer) < linear_weight_bytes(base.transformer) / 2
    settings = typed(*SMALL_CKPT).lora
    inits = []
    for b in (base, q):
        torch.manual_seed(0)
        try:
            lora.add_lora(b, settings)
            inits.append(lora.get_peft_model_state_dict(b.denoiser, adapter_name=lora.ADAPTER))
        finally:
            lora.remove_lora(b)
    assert all(v.dtype == torch.float32 and torch.equal(v, inits[0][k]) for k, v in inits[1].items())
    assert not quantized_linears(base.transformer)  # the plain base untouched

    (_, plain), (_, quant) = quantised_runs[None], quantised_runs["float8"]
    assert plain.status == quant.status == "finished"
    assert quant.final_loss == pytest.approx(plain.final_loss, rel=1e-3) and quant.final_loss != plain.final_loss
    files = [r.checkpoints[-1] / LORA_FILE for r in (plain, quant)]
    wp, wq = (load_file(f) for f in files)
    assert wp.keys() == wq.keys() and all(wp[k].shape == wq[k].shape and wp[k].dtype == wq[k].dtype for k in wp)
    metas = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            metas.append(h.metadata())
    assert metas[0] == metas[1]


def test_a_checkpoint_generates_through_the_quantised_transformer_with_its_lora_beside_it(quantised_runs, cache_dir):
    """Scoring on a float8 base: the LoRA is applied beside the 8-bit weights (BesideBase), not merged into them,
    where it would vanish (W + update rounded to float8 is W again), and computes what peft's unmerged adapter does;
    strength 0 is the base exactly, and afterwards every weight is back bit for bit."""
    from common.lorafile import BesideBase, file_sites, merged_into_base, rescaled
    from trainer.models import load_base_model

    c, r = quantised_runs["float8"]
    q = load_base_model(c.model, torch.device("cpu"), torch.float32, cache_dir)
    path = r.checkpoints[-1] / LORA_FILE
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        text = FLUX.encode_tokens(q, FLUX.tokenize(q, PROMPT))

        def out() -> torch.Tensor:
            return FLUX.predict(q, noisy, t, torch.zeros(1, 0), text)

        plain = out()
        pipe = q.pipeline()
        pipe.load_lora_weights(str(path.parent), weight_name=LORA_FILE, adapter_name="x")
        peft_out = out()
        pipe.unload_lora_weights()
        before = {k: v.clone() for k, v in q.transformer.state_dict().items()}
        sites = file_sites(q.transformer, path)
        lost = [float(((base.weight.float() + torch.matmul(*update())).to(base.weight.dtype) == base.weight)
                      .float().mean()) for *_, base, update in sites]
        assert min(lost) > 0.99  # merged into float8, the update would be gone
        with merged_into_base(sites):
            assert all(isinstance(getattr(parent, attr), BesideBase) for parent, attr, *_ in sites)
            ours = out()
            with rescaled(0.0):
                zero = out()
    assert torch.equal(zero, plain)
    torch.testing.assert_close(ours, peft_out, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours, plain)
    after = q.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k].view(torch.uint8), v.view(torch.uint8))
                                                 if v.element_size() == 1 else torch.equal(after[k], v)
                                                 for k, v in before.items())


def test_a_bad_quantize_setting_is_refused_before_anything_loads():
    """An unknown storage and float8 for SDXL: each named with its fix. float8 needs no gradient checkpointing
    (a Float8Linear keeps no upcast weight for backward)."""
    with pytest.raises(ConfigError, match=r"model.quantize='int8' is not one of null, float8.*model.quantize=float8"):
        typed("model=flux_tiny", "model.quantize=int8", "train.gradient_checkpointing=true")
    assert typed("model=flux_tiny", "model.quantize=float8").model.quantize == "float8"
    with pytest.raises(ConfigError, match="model.quantize=float8 is not available for SDXL.*model.quantize=null"):
        typed("model=tiny", "preset=flux_24gb", "train.optimizer=adamw")


def test_a_float8_linear_multiplies_in_float8_with_row_scales_forward_and_backward():
    """families.quantize.Float8Linear in bf16 takes torch._scaled_mm's path (the one a GPU with float8 tensor cores
    takes; a CPU runs it too): each weight row's largest magnitude is stored as e4m3's largest (448), the output is
    within float8's rounding of the bf16 Linear's, the input's gradient within float8's rounding of the one through
    the dequantised weight (a float8 GEMM too), and the weight gets none (frozen). In fp32 (no float8 GEMM) forward
    and backward are the dequantised weight's exactly."""
    from families.quantize import FP8_MAX, Float8Linear, scaled_mm_ok

    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 48).to(torch.bfloat16)
    q = Float8Linear(plain, torch.bfloat16)
    assert q.weight.dtype == torch.float8_e4m3fn and not q.weight.requires_grad
    assert torch.equal(q.weight.float().abs().amax(dim=1), torch.full((48,), FP8_MAX))
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    assert scaled_mm_ok(x, q.weight, torch.bfloat16)
    out = q(x)
    ref = torch.nn.functional.linear(x.detach().float(), plain.weight.float(), plain.bias.float())
    assert out.shape == (3, 5, 48) and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.08 * ref.abs().max()  # two e4m3 roundings (x and W), 3 bits each
    grad = torch.randn_like(out)
    out.backward(grad)
    exact = (grad.reshape(-1, 48).float() @ q.dequantised_weight(torch.float32)).view(3, 5, 64)
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == x.shape
    err = (x.grad.float() - exact).abs().max() / exact.abs().max()
    assert 0 < err < 0.06  # float8 too (the gradient rounded to e4m3 per row), not the dequantised weight's bf16 GEMM
    assert q.weight.grad is None
    q32 = Float8Linear(plain.float(), torch.float32)
    x32 = x.detach().float().requires_grad_()
    assert not scaled_mm_ok(x32, q32.weight, torch.float32)
    out32 = q32(x32)
    torch.testing.assert_close(out32, torch.nn.functional.linear(x32, q32.dequantised_weight(), q32.bias))
    out32.backward(grad.float())
    torch.testing.assert_close(x32.grad, exact)  # no float8 GEMM: exactly through the dequantised weight
