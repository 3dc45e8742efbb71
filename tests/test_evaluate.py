"""Evaluation of tiny-model checkpoints: CLIP with a tiny random CLIP, dlib faces, grids, one pipeline load."""
import importlib
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from evaluation import BASELINE, EvalConfig, EvalInputError, evaluate
from evaluation import generate as gen
from evaluation.clip import ClipScorer
from sweep.offline_models import build_clip
from trainer import TrialSpec, train
from trainer.models import resolve_source

from .conftest import DEMO_DIR, typed

PROMPTS = ["a picture of sks woman on the moon", "a picture of sks woman in a press conference"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cache_dir):
    """A 4-step tiny trial with checkpoints at steps 2 and 4, a tiny CLIP and the tiny pipeline folder."""
    conf = typed("steps=4", "train.checkpoint_every=2", "data.resolution=64", root=tmp_path_factory.mktemp("r"))
    out = tmp_path_factory.mktemp("trial")
    [r] = train([TrialSpec("t", conf.lora, conf.train, out)], conf.model, conf.data, cache_dir, progress=False)
    clip = build_clip(conf.eval.clip_architecture, cache_dir)
    cfg = EvalConfig(prompts=PROMPTS, class_noun="woman", prior_prompt="a picture of a woman", seeds=[0, 1],
                     num_inference_steps=2, resolution=64, batch_size=3, clip_model=clip)
    return {"checkpoints": r.checkpoints, "cfg": cfg, "pretrained": resolve_source(conf.model, cache_dir), "clip": clip}


def test_clip_scores_self_above_unrelated_and_repeats_exactly(tiny):
    scorer = ClipScorer(tiny["clip"], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 3, 64, 64), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 3, 64, 64), generator=g, dtype=torch.uint8).flip(-1) // 4
    assert scorer.score(a, a) == pytest.approx(100.0, abs=1e-3)
    assert scorer.score(a, a) > scorer.score(a, b)
    assert scorer.text(a, PROMPTS[:1] * 3) == scorer.text(a, PROMPTS[:1] * 3)
    assert scorer.random_weights  # the output must say that these numbers carry no meaning


def test_two_checkpoints_scored_with_one_pipeline_load(tiny, tmp_path, caplog):
    gen._PIPES.clear()
    loads = gen.STATS["pipeline_loads"]
    out = tmp_path / "eval"
    with caplog.at_level("WARNING", logger="evaluation"):
        m = evaluate(tiny["checkpoints"], tiny["cfg"], instance_dir=DEMO_DIR, out_dir=out, pretrained=tiny["pretrained"],
                     baseline_cache=tmp_path / "baseline.json")
    assert list(m) == [BASELINE, "step-000002", "step-000004"]
    for metrics in m.values():
        assert set(metrics) == {"clip_t", "clip_i", "pairwise_clip_i", "face_similarity", "face_detection_rate",
                                "prior_face_similarity"}
        assert 0.0 <= metrics["face_detection_rate"] <= 1.0 and -100 <= metrics["clip_t"] <= 100
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"].keys() == m.keys() and any("carry no meaning" in n for n in saved["notes"])
    # noise from a random base model has no face: said once as a note, not as a warning at every checkpoint
    assert any("no face in them" in n for n in saved["notes"]) and math.isnan(m["step-000002"]["face_similarity"])
    assert not [r for r in caplog.records if "face similarity is NaN" in r.getMessage()]
    # where the time went, per checkpoint: 2 prompts x 2 seeds + 2 prior-drift images each
    assert saved["seconds"].keys() == m.keys()
    assert all(e["images"] == 6 and e["generate_s"] > 0 and e["score_s"] > 0 for e in saved["seconds"].values())
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert grids == ["baseline_base.png", "checkpoints_prompt0.png", "step-000002_base.png", "step-000004_base.png"]
    assert Image.open(out / "grids" / "step-000002_base.png").size[1] == 2 * 256  # prompts x seeds
    # a second call (the next trial of a sweep): same pipeline, baseline read back, identical paired results
    again = evaluate(tiny["checkpoints"][:1], tiny["cfg"], instance_dir=DEMO_DIR, out_dir=tmp_path / "eval2",
                     pretrained=tiny["pretrained"], baseline_cache=tmp_path / "baseline.json")
    assert gen.STATS["pipeline_loads"] == loads + 1
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-aware
    assert same(again[BASELINE], m[BASELINE]) and same(again["step-000002"], m["step-000002"])
    assert not (tmp_path / "eval2" / "grids" / "baseline_base.png").exists()  # not generated again


def test_a_trial_scoring_the_very_lora_file_another_trial_scored_borrows_its_cells(tiny, tmp_path):
    """Two trials of a sweep hold the same checkpoint file (one training serves both, trainer/planner.py): the
    second's scoring copies the first's cells, metrics, images and grids instead of generating them; where it
    asks for more seeds than the first scored, it generates only those."""
    import shutil

    src = tiny["checkpoints"][-1]
    for trial in ("long", "short"):
        shutil.copytree(src, tmp_path / trial / "checkpoints" / src.name)
    cfg, kw = tiny["cfg"], dict(instance_dir=DEMO_DIR, pretrained=tiny["pretrained"], baseline=False)
    first = evaluate([tmp_path / "long" / "checkpoints" / src.name], cfg, out_dir=tmp_path / "long" / "eval",
                     seeds=[0], **kw)
    second = evaluate([tmp_path / "short" / "checkpoints" / src.name], cfg, out_dir=tmp_path / "short" / "eval",
                      seeds=[0], **kw)
    assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)
    rec = json.loads((tmp_path / "short" / "eval" / "metrics.json").read_text())
    assert rec["borrowed"] == {src.name: f"long/{src.name}"} and src.name not in rec.get("seconds", {})
    assert sorted(p.name for p in (tmp_path / "short" / "eval" / "images" / src.name).iterdir()) == \
        sorted(p.name for p in (tmp_path / "long" / "eval" / "images" / src.name).iterdir())
    assert (tmp_path / "short" / "eval" / "grids" / f"{src.name}_base.png").is_file()
    evaluate([tmp_path / "short" / "checkpoints" / src.name], cfg, out_dir=tmp_path / "short" / "eval", **kw)
    rec = json.loads((tmp_path / "short" / "eval" / "metrics.json").read_text())
    assert rec["seconds"][src.name]["images"] == len(cfg.prompts) + 1  # seed 1's images (and its prior image) only


def test_checkpoints_change_the_images(tiny, tmp_path):
    """The LoRA is really applied (and removed again): checkpoint images differ from the baseline's."""
    pipe, _ = gen.load_pipeline(tiny["pretrained"], torch.device("cpu"))
    cfg = replace(tiny["cfg"], prompts=PROMPTS[:1], seeds=[0])
    plain = gen.generate(pipe, None, cfg.prompts, cfg, "t")["base"][0]
    with gen.LoraSwap(pipe, tiny["checkpoints"][-1], scale=50.0):  # the tiny LoRA barely moves the output at 1.0
        tuned = gen.generate(pipe, None, cfg.prompts, cfg, "t")["base"][0]
    after = gen.generate(pipe, None, cfg.prompts, cfg, "t")["base"][0]
    diff = lambda x, y: (torch.tensor(list(x.getdata())) - torch.tensor(list(y.getdata()))).abs().float().mean()
    assert diff(plain, tuned) > 0 and diff(plain, after) == 0


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    emb = torch.randn(2, 77, c.cross_attention_dim, generator=g)
    pooled = torch.randn(2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), emb, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}).sample


def test_a_checkpoint_generates_merged_and_the_base_comes_back_bit_for_bit(tiny):
    """Inside LoraSwap the UNet holds no adapter layers (the LoRA is merged into its weights: generating costs what
    the base costs) and computes what peft's adapter layers compute; outside, every weight is the base's again,
    bit for bit."""
    from peft.tuners.lora import LoraLayer

    pipe, _ = gen.load_pipeline(tiny["pretrained"], torch.device("cpu"))
    ckpt = tiny["checkpoints"][-1]
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = _unet_out(pipe.unet)
    pipe.load_lora_weights(str(ckpt), weight_name=gen.LORA_FILE, adapter_name="x")  # peft's own adapter layers
    pipe.set_adapters(["x"], adapter_weights=[50.0])
    layers = sum(isinstance(m, LoraLayer) for m in pipe.unet.modules())
    unmerged = _unet_out(pipe.unet)
    pipe.unload_lora_weights()
    assert layers > 0 and (unmerged - plain).abs().max() > 1e-3  # the adapter changes the output
    with gen.LoraSwap(pipe, ckpt, scale=50.0):
        assert not any(isinstance(m, LoraLayer) for m in pipe.unet.modules())
        torch.testing.assert_close(_unet_out(pipe.unet), unmerged, rtol=1e-4, atol=1e-5)
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(_unet_out(pipe.unet), plain)


def test_a_training_checkpoint_merges_from_its_tensors_and_any_other_file_through_peft(tiny, tmp_path):
    """A file as training writes it merges straight from its tensors (no adapter layer is built: a racing round
    swaps checkpoints in often); the same tensors without their LoraConfig metadata go through peft's
    load_lora_weights, and both give the UNet the same weights."""
    from safetensors.torch import load_file
    from torch import nn

    from common.lorafile import file_sites

    pipe, _ = gen.load_pipeline(tiny["pretrained"], torch.device("cpu"))
    path = tiny["checkpoints"][-1] / gen.LORA_FILE
    tensors = load_file(path)
    sites = file_sites(pipe.unet, path)
    assert sites is not None and len(sites) == len(tensors) // 2
    assert all(type(layer) is nn.Linear and wrapper is layer for _, _, wrapper, layer, _ in sites)
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(tensors, bare / gen.LORA_FILE)  # no metadata: what a hand-made or older file may look like
    assert file_sites(pipe.unet, bare / gen.LORA_FILE) is None
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    weights = []
    for folder in (path.parent, bare):
        with gen.LoraSwap(pipe, folder, scale=50.0):
            weights.append({k: v.clone() for k, v in pipe.unet.state_dict().items()})
        assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())
    assert weights[0].keys() == weights[1].keys() == before.keys()
    moved = [k for k, v in before.items() if not torch.equal(weights[0][k], v)]
    assert len(moved) == len(sites)
    for k in moved:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-6)


def test_a_merged_checkpoint_rescaled_computes_peft_at_that_strength_and_comes_back_bit_for_bit(tiny):
    """eval.lora_scales: the LoRA merged once, then rescaled in place (the same modules, so the same compiled code)
    computes what peft computes at that adapter weight; leaving the strength gives back the merge at full strength
    bit for bit, and leaving the swap the base."""
    from common.lorafile import rescaled

    pipe, _ = gen.load_pipeline(tiny["pretrained"], torch.device("cpu"))
    ckpt = tiny["checkpoints"][-1]
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(ckpt), weight_name=gen.LORA_FILE, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[2.0])
    peft_at_2 = _unet_out(pipe.unet)
    pipe.unload_lora_weights()
    with gen.LoraSwap(pipe, ckpt):
        full = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        with rescaled(2.0):
            torch.testing.assert_close(_unet_out(pipe.unet), peft_at_2, rtol=1e-4, atol=1e-5)
        assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in full.items())
        assert any(not torch.equal(full[k], v) for k, v in before.items())  # merged: some weights moved
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(RuntimeError, match="no merged adapter"):
        with rescaled(0.5):
            pass


def test_each_lora_strength_is_an_entry_of_its_own(tiny, tmp_path):
    """eval.lora_scales=[0.7,1.0]: every checkpoint is scored at both, each (checkpoint, strength) with its own
    cells, images, grid and times; the full-strength entry keeps the plain checkpoint name."""
    cfg = replace(tiny["cfg"], seeds=[0], lora_scales=[0.7, 1.0])
    m = evaluate(tiny["checkpoints"][-1:], cfg, instance_dir=DEMO_DIR, out_dir=tmp_path, pretrained=tiny["pretrained"],
                 baseline=False)
    assert set(m) == {"step-000004", "step-000004_x0.7"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for e in m:
        assert set(saved["cells"][e]) == {"p0_s0", "p1_s0", "prior_s0"} and saved["seconds"][e]["images"] == 3
        assert (tmp_path / "grids" / f"{e}_base.png").is_file()
        assert (tmp_path / "images" / e / "base_p1_s0.png").is_file()
    with pytest.raises(EvalInputError, match=r"scales=\[0.5\]\): give some of eval.lora_scales=\[0.7, 1.0\]"):
        evaluate(tiny["checkpoints"][-1:], cfg, instance_dir=DEMO_DIR, out_dir=tmp_path, pretrained=tiny["pretrained"],
                 baseline=False, scales=[0.5])


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters on one model: intended
def test_adapters_that_do_not_merge_into_a_weight_update_apply_themselves():
    """DoRA rescales the merged weight's columns, so `merged` leaves such a layer as it is (it still applies
    its adapter) and merges the plain LoRA layers beside it."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    from common.lorafile import merged

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(8, 8))
    model.add_module("to_k", torch.nn.Linear(8, 8))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"], use_dora=True, init_lora_weights=False), model)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_k"], init_lora_weights=False), model, adapter_name="b")
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
        with merged(model):
            assert isinstance(model.to_q, LoraLayer) and type(model.to_k) is torch.nn.Linear
            got = model(x)
    torch.testing.assert_close(got, want)
    assert isinstance(model.to_k, LoraLayer)


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_bytes(b""), "not a readable safetensors LoRA file"),
    (lambda p: torch.save({"unet.a.lora.down.weight": torch.zeros(1)}, p), "not a readable safetensors LoRA file"),
    (lambda p: save_file({"foo": torch.zeros(2)}, p), "holds no LoRA weights"),
    (lambda p: save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight":
                          torch.zeros(4, 7), "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight":
                          torch.zeros(5, 4)}, p), "does not fit this base model"),
])
def test_bad_lora_files_are_named(tiny, tmp_path, make, needle):
    bad = tmp_path / "step-000009"
    bad.mkdir()
    make(bad / "pytorch_lora_weights.safetensors")
    with pytest.raises(EvalInputError) as err:
        evaluate([tiny["checkpoints"][0], bad], tiny["cfg"], instance_dir=DEMO_DIR, out_dir=tmp_path / "e",
                 pretrained=tiny["pretrained"], baseline=False)
    assert needle in str(err.value) and "step-000009" in str(err.value)


def test_bad_settings_are_refused_before_generation(tiny, tmp_path):
    cfg = replace(tiny["cfg"], prompts=["a picture of a woman"], seeds=[])
    with pytest.raises(EvalInputError, match="without the subject token 'sks'.*eval.seeds is empty"):
        evaluate(tiny["checkpoints"], cfg, instance_dir=DEMO_DIR, out_dir=tmp_path, pretrained=tiny["pretrained"])
    with pytest.raises(EvalInputError, match="no face found in 1 instance photo"):
        faces = tmp_path / "photos"
        faces.mkdir()
        Image.new("RGB", (128, 128), "gray").save(faces / "wall.png")
        evaluate(tiny["checkpoints"], tiny["cfg"], instance_dir=faces, out_dir=tmp_path, pretrained=tiny["pretrained"])


def test_scoring_prompt_replaces_the_subject_token():
    cfg = EvalConfig()
    assert cfg.scoring_prompt("a picture of sks man showing the thumbs up gesture on the moon") == \
        "a picture of man showing the thumbs up gesture on the moon"
    assert cfg.scoring_prompt("sks in a press conference") == "man in a press conference"


def test_refiner_is_scored_with_and_without(tiny, tmp_path):
    refiner = build_tiny_refiner(tiny["pretrained"], tmp_path / "refiner")
    cfg = replace(tiny["cfg"], refiner=str(refiner), prompts=PROMPTS[:1], face_backend="none")
    m = evaluate(tiny["checkpoints"][-1:], cfg, instance_dir=DEMO_DIR, out_dir=tmp_path / "e",
                 pretrained=tiny["pretrained"], baseline=False)
    assert {"clip_t", "clip_t_refined", "clip_i_refined", "pairwise_clip_i_refined"} <= set(m["step-000004"])
    assert (tmp_path / "e" / "grids" / "step-000004_refined.png").is_file()
    gen._PIPES.clear()


def build_tiny_refiner(base_dir: str, out: Path) -> Path:
    """A tiny SDXL-refiner-architecture img2img pipeline (second text encoder only, aesthetic-score
    conditioning), random weights, sharing the tiny base's VAE and text encoder 2."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), norm_num_groups=32,
        projection_class_embeddings_input_dim=5 * 8 + 32,  # 5 time ids (aesthetic score instead of target size)
        cross_attention_dim=32)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=AutoencoderKL.from_pretrained(base_dir, subfolder="vae"), text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base_dir, subfolder="text_encoder_2"),
        tokenizer=None, tokenizer_2=CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer_2"), unet=unet,
        scheduler=EulerDiscreteScheduler.from_pretrained(base_dir, subfolder="scheduler"),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(out)
    return out


def test_image_scores_embed_each_image_once_and_equal_clipscore_over_every_pair(tiny):
    """CLIP-I and pairwise CLIP-I from one embedding per image are torchmetrics' CLIPScore over the pairs."""
    scorer = ClipScorer(tiny["clip"], torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    ims = torch.randint(0, 256, (4, 3, 64, 64), generator=g, dtype=torch.uint8)
    refs = torch.randint(0, 256, (3, 3, 48, 48), generator=g, dtype=torch.uint8)
    calls = []
    model = scorer.metric.model
    original = model.get_image_features
    model.get_image_features = lambda pixel_values: calls.append(len(pixel_values)) or original(pixel_values)
    try:
        to_refs, pairwise = scorer.image_to_refs(ims, refs), scorer.pairwise(ims)
    finally:
        model.get_image_features = original
    assert calls == [4, 3, 4]  # each image once per score, not once per pair (was 2 x 12 and 2 x 6)
    every = scorer.score(ims.repeat_interleave(3, dim=0), refs.repeat(4, 1, 1, 1))
    i, j = torch.triu_indices(4, 4, offset=1)
    assert to_refs == pytest.approx(every, rel=1e-5, abs=1e-4)
    assert pairwise == pytest.approx(scorer.score(ims[i], ims[j]), rel=1e-5, abs=1e-4)
    assert math.isnan(scorer.pairwise(ims[:1]))


def test_prior_prompt_rides_in_equal_batches_with_the_prompts(tiny, tmp_path, monkeypatch):
    """6 images (2 prompts x 2 seeds + the prior prompt's 2) at eval.batch_size=4 go as 3 + 3, not 4 + 2 or
    2 + 2 + 2 (a batch of the prior prompt alone, as before)."""
    batches = []
    embed = gen.prompt_embeddings  # each pipeline call's prompts
    monkeypatch.setattr(gen, "prompt_embeddings", lambda pipe, prompts, *a: batches.append(list(prompts)) or
                        embed(pipe, prompts, *a))
    m = evaluate([tiny["checkpoints"][0]], replace(tiny["cfg"], batch_size=4), instance_dir=DEMO_DIR,
                 out_dir=tmp_path / "eval", pretrained=tiny["pretrained"], baseline=False)
    assert [len(b) for b in batches] == [3, 3]
    assert [p for b in batches for p in b] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 + ["a picture of a woman"] * 2
    assert "prior_face_similarity" in m["step-000002"]


def test_compiled_generation_goes_one_seed_per_batch_so_every_call_shares_one_graph(tiny, tmp_path, monkeypatch):
    """Compiled (static shapes), each batch size is a graph compiled once: a race's calls (the baseline's seeds, a
    round's one seed, the champion's missing seeds) all generate one seed's images per batch, the prompts and
    the prior-drift prompt together; eager generation keeps the fewest equal batches."""
    import contextlib

    from common import compiling

    batches = []
    embed = gen.prompt_embeddings
    monkeypatch.setattr(gen, "prompt_embeddings", lambda pipe, prompts, *a: batches.append(len(prompts)) or
                        embed(pipe, prompts, *a))
    # the CPU has no compiler to spare: the regions stay eager, the batching is what is under test
    monkeypatch.setattr(compiling, "compiled_for_generation", lambda *a, **k: contextlib.nullcontext())
    cfg = replace(tiny["cfg"], batch_size=10)
    per_seed = len(cfg.prompts) + 1
    for compiled, seeds, want in ((False, [0, 1], [2 * per_seed]), (True, [0, 1], [per_seed] * 2),
                                  (True, [1], [per_seed])):
        batches.clear()
        evaluate([tiny["checkpoints"][0]], replace(cfg, compile=compiled), instance_dir=DEMO_DIR, seeds=seeds,
                 out_dir=tmp_path / f"{compiled}{seeds}", pretrained=tiny["pretrained"], baseline=False)
        assert batches == want, (compiled, seeds)


def test_auto_compile_weighs_the_callers_whole_scoring_against_the_cache_at_each_call(tiny, tmp_path, monkeypatch):
    """eval.compile=auto at each evaluate call: the images the caller's whole scoring makes (`compile_work`, a raced
    trial's ~84) when more than the call's own, and whether the compile cache is warm at that moment, so a sweep's
    calls turn compiled once a background compile (sweep/precompile.py) has marked it warm."""
    from common import compiling

    asked = []
    monkeypatch.setattr(compiling, "want_compile", lambda setting, device, work, at, warm: asked.append((work, warm)))
    warm = {"now": False}
    monkeypatch.setattr(compiling, "is_warm", lambda key: warm["now"])
    cfg = replace(tiny["cfg"], seeds=[0])
    kw = dict(instance_dir=DEMO_DIR, pretrained=tiny["pretrained"], baseline=False, seeds=[0], prior=False)
    evaluate([tiny["checkpoints"][0]], cfg, out_dir=tmp_path / "a", **kw)
    evaluate([tiny["checkpoints"][0]], cfg, out_dir=tmp_path / "b", compile_work=84, **kw)
    warm["now"] = True
    evaluate([tiny["checkpoints"][0]], cfg, out_dir=tmp_path / "c", compile_work=84, **kw)
    assert asked == [(len(PROMPTS), False), (84, False), (84, True)]


def test_generation_is_compiled_at_the_shapes_a_race_calls_with_and_marks_the_cache_warm(tiny, tmp_path, monkeypatch):
    """compile_generation (what sweep/precompile.py runs beside a training sweep): one batch of one seed's prompts
    with the prior-drift prompt and one without, as compiled evaluate calls batch them, then the key is warm; an
    error leaves it cold."""
    from common import compiling
    from evaluation.evaluate import compile_generation

    batches = []
    embed = gen.prompt_embeddings
    monkeypatch.setattr(gen, "prompt_embeddings", lambda pipe, prompts, *a: batches.append(len(prompts)) or
                        embed(pipe, prompts, *a))
    monkeypatch.setattr(compiling, "compile_blocks", lambda *a, **k: [])  # the CPU has no time to compile
    monkeypatch.delenv(compiling.CACHE_ENV, raising=False)
    compiling.use_cache(tmp_path / "cache")
    pipe, _ = gen.load_pipeline(tiny["pretrained"], torch.device("cpu"))
    key = compiling.generation_key(tiny["pretrained"], tiny["cfg"].resolution, torch.device("cpu"))
    assert compile_generation(pipe, tiny["cfg"], key) == batches == [len(PROMPTS) + 1, len(PROMPTS)]
    assert compiling.is_warm(key)
    monkeypatch.setattr(gen, "prompt_embeddings", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        compile_generation(pipe, tiny["cfg"], "another")
    assert not compiling.is_warm("another")


def test_compiled_generation_runs_a_batch_it_has_no_graph_for_eagerly(tiny, tmp_path, monkeypatch):
    """A champion's full protocol after racing: every prompt seed scored in the rounds, the prior-drift images of all
    seeds missing. Alone they make a batch (the study's: 4) that compiled generation has no graph for (compiling one
    cost ~60 s on an H100, for 4 images), so that batch runs eagerly; one seed's prompts run compiled."""
    import contextlib

    import torch._dynamo.eval_frame as eval_frame

    from common import compiling

    seen = []
    embed = gen.prompt_embeddings
    monkeypatch.setattr(gen, "prompt_embeddings", lambda pipe, prompts, *a: seen.append(
        (len(prompts), eval_frame._stance.stance)) or embed(pipe, prompts, *a))
    monkeypatch.setattr(compiling, "compiled_for_generation", lambda *a, **k: contextlib.nullcontext())
    prompts = [*PROMPTS, "a picture of sks woman swimming", "a picture of sks woman on a hill"]
    cfg = replace(tiny["cfg"], prompts=prompts, seeds=[0, 1, 2], batch_size=10, compile=True)  # graphs: 4, 5 images
    ckpt, kw = tiny["checkpoints"][0], dict(instance_dir=DEMO_DIR, pretrained=tiny["pretrained"], baseline=False)
    for seed in cfg.seeds:  # the rounds: one seed's prompts each
        evaluate([ckpt], cfg, out_dir=tmp_path / "e", seeds=[seed], prior=False, **kw)
    assert seen == [(4, "default")] * 3
    seen.clear()
    evaluate([ckpt], cfg, out_dir=tmp_path / "e", **kw)  # the full protocol: only the prior-drift images are missing
    assert seen == [(3, "force_eager")]


def test_images_leave_the_decoder_as_diffusers_postprocess_makes_them(tiny):
    """to_pil (arithmetic on the decoder's device, uint8 copied out) gives diffusers' PIL images pixel for pixel,
    values outside [-1, 1] and halfway roundings included."""
    pipe, _ = gen.load_pipeline(tiny["pretrained"], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 17, 19, generator=g) * 2.4 - 1.2
    x[0, 0, 0, :5] = torch.tensor([-1.0, 1.0, 0.0, 1 / 255 - 1, 2 * (0.5 / 255) - 1])  # edges and a rounding tie
    ours, theirs = gen.to_pil(x), pipe.image_processor.postprocess(x, output_type="pil")
    assert [im.size for im in ours] == [(19, 17)] * 3
    assert all(a.tobytes() == b.tobytes() and a.mode == b.mode == "RGB" for a, b in zip(ours, theirs))


def test_bf16_decoder_copy_is_made_once_and_the_vae_stays_fp32(tiny):
    """An fp32 VAE (a sweep's, for exact training latents) decodes on CUDA through a bf16 copy of its decoding half:
    made once per VAE, the VAE itself untouched, decoding what the VAE decodes to bf16 precision."""
    pipe, _ = gen.load_pipeline(tiny["pretrained"], torch.device("cpu"))
    vae = pipe.vae
    assert vae.dtype == torch.float32
    post, decoder = gen.bf16_decoder(vae)
    assert gen.bf16_decoder(vae)[1] is decoder and next(decoder.parameters()).dtype == torch.bfloat16
    assert vae.dtype == torch.float32 and all(p.dtype == torch.float32 for p in vae.decoder.parameters())
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = vae.decode(z).sample
        got = decoder(post(z.bfloat16()) if post is not None else z.bfloat16()).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert gen._decoder(vae, torch.device("cpu"))[1] is vae.decoder  # on the CPU the VAE decodes as it is


def test_speed_only_settings_do_not_change_what_earlier_results_mean(tiny, tmp_path):
    """eval.compile changes how fast images come, not the scores: results written with it off are read back (a
    resumed trial, the cached baseline) with it on, and metrics.json does not record it."""
    from evaluation.evaluate import earlier_results

    cfg = replace(tiny["cfg"], prompts=PROMPTS[:1], seeds=[0], compile=False)
    m = evaluate(tiny["checkpoints"][:1], cfg, instance_dir=DEMO_DIR, out_dir=tmp_path / "e",
                 pretrained=tiny["pretrained"], baseline_cache=tmp_path / "baseline.json")
    assert "compile" not in json.loads((tmp_path / "e" / "metrics.json").read_text())["config"]
    for setting in (True, None):
        assert earlier_results(tmp_path / "e", replace(cfg, compile=setting)).keys() == m.keys()
    assert earlier_results(tmp_path / "e", replace(cfg, seeds=[1])) == {}  # a setting that matters still does
    again = evaluate([], replace(cfg, compile=None), instance_dir=DEMO_DIR, out_dir=tmp_path / "e2",
                     pretrained=tiny["pretrained"], baseline_cache=tmp_path / "baseline.json")
    assert not (tmp_path / "e2" / "grids" / "baseline_base.png").exists()  # the cached baseline was used
    assert json.dumps(again[BASELINE], sort_keys=True) == json.dumps(m[BASELINE], sort_keys=True)


def test_prompts_are_encoded_once_per_text_encoders_and_give_the_same_images(tiny, monkeypatch):
    """A sweep scores the same prompts at every checkpoint: each prompt goes through the text encoders once, and
    the cached embeddings make the images the pipeline makes from the prompt itself."""
    pipe, _ = gen.load_pipeline(tiny["pretrained"], torch.device("cpu"))
    gen._EMBEDS.clear()
    encoded = []
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda prompt, *a, **kw: encoded.append(prompt) or encode(prompt, *a, **kw))
    first = gen.prompt_embeddings(pipe, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], True)
    again = gen.prompt_embeddings(pipe, [PROMPTS[1], PROMPTS[0]], True)
    assert encoded == [[PROMPTS[0], PROMPTS[1]]]  # once, each prompt once
    assert first["prompt_embeds"].shape[0] == 3 and torch.equal(again["prompt_embeds"][1], first["prompt_embeds"][0])
    monkeypatch.undo()
    kw = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "latent"}
    direct = pipe(prompt=[PROMPTS[1]], generator=torch.Generator().manual_seed(0), **kw).images
    cached = pipe(**gen.prompt_embeddings(pipe, [PROMPTS[1]], True), generator=torch.Generator().manual_seed(0), **kw).images
    # the cache encoded the prompt in a batch with another, the pipeline alone: float32 rounding of a batched matmul
    torch.testing.assert_close(cached, direct, atol=1e-4, rtol=1e-3)
    pipe.text_encoder.peft_config = {"checkpoint": object()}  # a text-encoder LoRA loaded: encode every time
    try:
        monkeypatch.setattr(pipe, "encode_prompt", lambda prompt, *a, **kw: encoded.append(prompt) or encode(prompt, *a, **kw))
        gen.prompt_embeddings(pipe, [PROMPTS[0]], True)
        assert encoded[-1] == [PROMPTS[0]] and len(encoded) == 2
    finally:
        del pipe.text_encoder.peft_config


def test_each_image_is_a_cell_whose_scores_average_to_the_torchmetrics_scores(tiny, tmp_path):
    """metrics.json keeps every (prompt, seed) image's scores; a checkpoint's metrics are their means, which are
    torchmetrics' CLIPScore and the face metric over the same images."""
    from evaluation.evaluate import _to_tensor
    from evaluation.face import FaceSimilarity

    out = tmp_path / "eval"
    m = evaluate(tiny["checkpoints"][:1], tiny["cfg"], instance_dir=DEMO_DIR, out_dir=out,
                 pretrained=tiny["pretrained"], baseline=False)["step-000002"]
    cells = json.loads((out / "metrics.json").read_text())["cells"]["step-000002"]
    assert sorted(cells) == ["p0_s0", "p0_s1", "p1_s0", "p1_s1", "prior_s0", "prior_s1"]
    assert set(cells["p0_s0"]) == {"clip_t", "clip_i", "face_similarity", "face_detection_rate"}
    ims = [Image.open(out / "images" / "step-000002" / f"base_p{p}_s{s}.png").convert("RGB")
           for p in range(2) for s in (0, 1)]
    scorer = ClipScorer(tiny["clip"], torch.device("cpu"))
    texts = [tiny["cfg"].scoring_prompt(p) for p in PROMPTS for _ in (0, 1)]
    assert [cells[f"p{p}_s{s}"]["clip_t"] for p in range(2) for s in (0, 1)] == pytest.approx(
        scorer.text_cells(_to_tensor(ims), texts), abs=1e-9)
    assert m["clip_t"] == pytest.approx(max(scorer.text(_to_tensor(ims), texts), 0.0), rel=1e-5, abs=1e-4)
    face = FaceSimilarity(gen_face_backend(), _identity())
    face.update(ims)
    want = face.compute()
    assert m["face_detection_rate"] == pytest.approx(float(want["detection_rate"]))
    assert json.dumps(m["face_similarity"]) == json.dumps(float(want["similarity"])) or \
        m["face_similarity"] == pytest.approx(float(want["similarity"]), abs=1e-9)
    assert [math.isnan(cells[f"p{p}_s{s}"]["face_similarity"]) for p in range(2) for s in (0, 1)] == \
        [math.isnan(v) for v in face.per_image()]


def test_a_checkpoint_scored_one_seed_at_a_time_gets_the_metrics_of_one_call_and_nothing_twice(tiny, tmp_path,
                                                                                               monkeypatch):
    """Racing rounds: seeds=[0] then seeds=[1] give the metrics of one call over both seeds; asking again for a
    seed already scored (a resumed round) generates nothing."""
    ckpt, cfg = tiny["checkpoints"][:1], tiny["cfg"]
    whole = evaluate(ckpt, cfg, instance_dir=DEMO_DIR, out_dir=tmp_path / "whole", pretrained=tiny["pretrained"],
                     baseline=False)["step-000002"]
    made = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda pipe, ref, prompts, c, desc: made.append(list(c.seeds)) or
                        real(pipe, ref, prompts, c, desc))
    kw = dict(instance_dir=DEMO_DIR, out_dir=tmp_path / "race", pretrained=tiny["pretrained"], baseline=False)
    first = evaluate(ckpt, cfg, seeds=[0], **kw)["step-000002"]
    both = evaluate(ckpt, cfg, seeds=[0, 1], **kw)["step-000002"]
    again = evaluate(ckpt, cfg, seeds=[1], **kw)["step-000002"]
    assert made == [[0], [1]]  # seed 0 once, seed 1 once, the third call nothing
    assert set(first) == set(whole)
    for k in whole:
        assert both[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-4, nan_ok=True), k
        assert json.dumps(again[k]) == json.dumps(both[k])
    saved = json.loads((tmp_path / "race" / "metrics.json").read_text())
    assert saved["seconds"]["step-000002"]["images"] == 6  # 3 + 3: the times of both rounds add up
    assert Image.open(tmp_path / "race" / "grids" / "step-000002_base.png").size[0] == 180 + 2 * 256
    with pytest.raises(EvalInputError, match=r"seeds=\[7\]\): give some of eval.seeds=\[0, 1\]"):
        evaluate(ckpt, cfg, seeds=[7], **kw)


def gen_face_backend():
    from evaluation.evaluate import _BACKENDS

    return _BACKENDS["dlib"]


def _identity():
    from evaluation.evaluate import _IDENTITIES

    return next(iter(_IDENTITIES.values()))


def test_scoring_overlapped_with_generating_gives_todays_results_in_todays_order(tiny, tmp_path, monkeypatch):
    """eval.overlap: each entry is scored on a worker thread while the next one generates; the metrics, every
    cell and metrics.json's order are those of scoring each entry in turn (eval.overlap=false)."""
    import threading

    ev = importlib.import_module("evaluation.evaluate")  # the module, not the package's function

    import time

    from sweep.phases import evaluation_seconds

    threads = []
    real = ev._Scorer.cells

    def slow(self, *a):  # scoring slower than the tiny model's generating: the caller must wait for the last one
        threads.append(threading.current_thread().name)
        time.sleep(0.3)
        return real(self, *a)

    monkeypatch.setattr(ev._Scorer, "cells", slow)
    runs = {}
    for on in (False, True):
        waited = ev.TIMES["wait_s"]
        m = evaluate(tiny["checkpoints"], replace(tiny["cfg"], overlap=on), instance_dir=DEMO_DIR,
                     out_dir=tmp_path / str(on) / "eval", pretrained=tiny["pretrained"])
        saved = json.loads((tmp_path / str(on) / "eval" / "metrics.json").read_text())
        runs[on] = (json.dumps(m), json.dumps(saved["metrics"]), json.dumps(saved["cells"]))
        # the waiting is recorded where the sweep's phases read it: the process's counter and metrics.json agree
        assert math.isclose(saved.get("waited_s", 0.0), ev.TIMES["wait_s"] - waited, abs_tol=1e-9)
        # overlapped: at least the last entry's scoring; without the overlap all three entries' (run in line)
        assert saved["waited_s"] >= (0.3 if on else 0.9)
        assert evaluation_seconds(tmp_path / str(on))["waiting_s"] == saved.get("waited_s", 0.0)
    assert runs[True] == runs[False]
    assert list(json.loads(runs[True][0])) == [BASELINE, "step-000002", "step-000004"]
    assert threads == ["MainThread"] * 3 + ["scoring"] * 3


def test_a_scoring_error_surfaces_in_the_generating_thread_and_earlier_entries_keep_their_scores(tiny, tmp_path,
                                                                                               monkeypatch):
    ev = importlib.import_module("evaluation.evaluate")  # the module, not the package's function

    real, calls = ev._Scorer.cells, []

    def cells(self, *a):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("dlib could not read image 3 (injected)")
        return real(self, *a)

    monkeypatch.setattr(ev._Scorer, "cells", cells)
    with pytest.raises(ValueError, match=r"dlib could not read image 3 \(injected\)"):
        evaluate(tiny["checkpoints"], tiny["cfg"], instance_dir=DEMO_DIR, out_dir=tmp_path / "e",
                 pretrained=tiny["pretrained"], baseline=False)
    assert list(json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics"]) == ["step-000002"]
    assert len(calls) == 2  # nothing scored after the failure


def test_a_stop_during_generating_still_scores_the_entries_generated_before_it(tiny, tmp_path, monkeypatch):
    from common import stop

    real, made = gen.generate, []

    def generate(*a, **kw):
        made.append(1)
        if len(made) == 1:
            stop.request()  # Ctrl-C while the first checkpoint generates: it is scored, the second not generated
        return real(*a, **kw)

    monkeypatch.setattr(gen, "generate", generate)
    try:
        with pytest.raises(stop.Stopped):
            evaluate(tiny["checkpoints"], tiny["cfg"], instance_dir=DEMO_DIR, out_dir=tmp_path / "e",
                     pretrained=tiny["pretrained"], baseline=False)
    finally:
        stop.reset()
    assert made == [1] and list(json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics"]) == \
        ["step-000002"]


def test_the_scoring_worker_keeps_order_bounds_what_waits_and_hands_back_its_error():
    import threading
    import time

    from evaluation.overlap import Overlap

    done, gate = [], threading.Event()
    with Overlap(depth=1) as work:
        work.submit(lambda: gate.wait(5) and done.append(0))  # runs, held at the gate
        work.submit(lambda: done.append(1))  # waits in the queue
        blocked = threading.Thread(target=work.submit, args=(lambda: done.append(2),))
        blocked.start()
        time.sleep(0.2)
        assert blocked.is_alive() and done == []  # a third piece waits for room: at most one waits
        gate.set()
        blocked.join(5)
    assert done == [0, 1, 2] and work.waited_s > 0
    inline = []
    with Overlap(on=False) as work:
        work.submit(lambda: inline.append(threading.current_thread().name))
    assert inline == [threading.current_thread().name]
    work = Overlap()
    work.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        work.wait()


def test_a_call_scored_later_returns_once_generated_and_a_twin_waits_to_borrow_its_scores(tiny, tmp_path,
                                                                                        monkeypatch):
    """evaluate(later=True), as a trainer scores a live checkpoint: it returns once the images are generated (the
    trainer goes on) and its result() is what an ordinary call returns; a call for the very same LoRA file (a
    trial the same training serves) waits for those scores and borrows them instead of generating again."""
    import shutil
    import threading

    ev = importlib.import_module("evaluation.evaluate")
    src, cfg = tiny["checkpoints"][-1], replace(tiny["cfg"], seeds=[0])
    for trial in ("own", "twin", "plain"):
        shutil.copytree(src, tmp_path / trial / "checkpoints" / src.name)
    kw = dict(instance_dir=DEMO_DIR, pretrained=tiny["pretrained"], baseline=False)
    plain = evaluate([tmp_path / "plain" / "checkpoints" / src.name], cfg, out_dir=tmp_path / "plain" / "eval", **kw)
    gate, real = threading.Event(), ev._Scorer.cells
    monkeypatch.setattr(ev._Scorer, "cells", lambda self, *a: gate.wait(60) and real(self, *a))
    shutil.rmtree(tmp_path / "plain")  # not a donor for the others
    pending = evaluate([tmp_path / "own" / "checkpoints" / src.name], cfg, out_dir=tmp_path / "own" / "eval",
                       later=True, **kw)
    assert isinstance(pending, ev.Later) and not (tmp_path / "own" / "eval" / "metrics.json").exists()
    twin = []
    waiting = threading.Thread(target=lambda: twin.append(evaluate(
        [tmp_path / "twin" / "checkpoints" / src.name], cfg, out_dir=tmp_path / "twin" / "eval", **kw)))
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive()  # waits for the scores it will borrow
    gate.set()
    waiting.join(60)
    assert json.dumps(pending.result()) == json.dumps(plain) == json.dumps(twin[0])
    assert json.loads((tmp_path / "twin" / "eval" / "metrics.json").read_text())["borrowed"] == \
        {src.name: f"own/{src.name}"}


def test_metrics_json_updates_from_two_threads_all_land(tmp_path):
    """A racing round's calls of one trial overlap: the scoring thread stores a checkpoint's scores while the caller
    adds the previous call's waiting time to the same metrics.json (once a FileNotFoundError from a shared temporary
    name ended a sweep; unlocked, one update overwrites the other)."""
    import threading

    ev = importlib.import_module("evaluation.evaluate")
    cfg = EvalConfig()
    ev._store(tmp_path, cfg, [], {"baseline": {"clip_t": 1.0}}, {}, {})
    n = 40

    def store():
        for i in range(n):
            ev._store(tmp_path, cfg, [], {f"step-{i:06d}": {"clip_t": float(i)}}, {f"step-{i:06d}": {}},
                      {f"step-{i:06d}": {"images": 1, "generate_s": 0.5, "score_s": 0.25}})

    def wait():
        for _ in range(n):
            ev._add_waited(tmp_path, cfg, 1.0)

    threads = [threading.Thread(target=store), threading.Thread(target=wait)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec = json.loads((tmp_path / "metrics.json").read_text())
    assert set(rec["metrics"]) == {"baseline", *(f"step-{i:06d}" for i in range(n))}
    assert rec[ev.WAITED] == n and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
