"""The trainer on the tiny SDXL-architecture model, CPU: loss, checkpoints, reload, resume, caches, divergence."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from trainer import TrialSpec, cache, checkpoint, lora, train
from trainer.models import load_base_model, resolve_source

from .conftest import typed


def run(conf, out: Path, cache_dir: Path, name="t", pack=True, **train_changes):
    spec = TrialSpec(name, conf.lora, replace(conf.train, **train_changes), out)
    [result] = train([spec], conf.model, conf.data, cache_dir, progress=False, pack=pack)
    return result


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_loss_is_finite_and_decreases_on_average(tmp_path, cache_dir):
    conf = typed("lr=3e-2", "rank=8", "steps=60", "train.batch_size=2", "train.checkpoint_every=60",
                 "data.resolution=64", root=tmp_path)
    r = run(conf, tmp_path / "trial", cache_dir)
    ls = losses(tmp_path / "trial")
    assert r.status == "finished" and r.steps == 60 and len(ls) == 60
    assert all(torch.isfinite(torch.tensor(ls)))
    q = len(ls) // 4
    assert sum(ls[-q:]) / q < sum(ls[:q]) / q - 0.03, ls


def test_checkpoints_are_complete_and_verified(demo, tmp_path, cache_dir):
    r = run(demo, tmp_path / "trial", cache_dir)
    assert [c.name for c in r.checkpoints] == ["step-000003", "step-000006"]
    for c in r.checkpoints:
        rec = checkpoint.verify(c)
        assert rec is not None and rec.step == int(c.name[5:]) and rec.loss > 0 and len(rec.config_hash) == 16
        keys = load_file(c / checkpoint.LORA_FILE).keys()
        assert keys and all(k.startswith("unet.") for k in keys)
    assert not list((tmp_path / "trial" / "checkpoints").glob(".*tmp*"))  # no temporary leftovers
    (r.checkpoints[-1] / checkpoint.LORA_FILE).write_bytes(b"damaged")
    assert checkpoint.verify(r.checkpoints[-1]) is None
    assert checkpoint.latest_valid(tmp_path / "trial")[0] == r.checkpoints[0]  # falls back to the intact one


@pytest.mark.parametrize("alpha, text_encoder", [(8.0, False), (None, True)])
def test_lora_file_reproduces_the_trained_model_in_a_fresh_pipeline(demo, cache_dir, tmp_path, alpha, text_encoder):
    """What we save is what any diffusers user gets back with load_lora_weights (alpha/scale included)."""
    demo.lora.alpha, demo.lora.train_text_encoder = alpha, text_encoder
    base = load_base_model(demo.model, torch.device("cpu"), torch.float32, cache_dir)
    torch.manual_seed(1)
    params = lora.add_lora(base, demo.lora)
    try:
        with torch.no_grad():  # stand in for training: every LoRA weight non-zero and distinct
            for ps in params.values():
                for p in ps:
                    p.copy_(torch.randn_like(p) * 0.1)
        x, t, emb, added = _unet_inputs(base)
        expected = base.unet(x, t, emb, added_cond_kwargs=added).sample
        te_expected = base.text_encoder(torch.tensor([[512, 70, 513]])).last_hidden_state
        lora.save_lora(base, tmp_path, text_encoder)
    finally:
        lora.remove_lora(base)
    plain = base.unet(x, t, emb, added_cond_kwargs=added).sample
    assert not torch.allclose(plain, expected, atol=1e-4)  # the LoRA changes the output

    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_source(demo.model, cache_dir))
    pipe.load_lora_weights(tmp_path)
    got = pipe.unet(x, t, emb, added_cond_kwargs=added).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    if text_encoder:
        torch.testing.assert_close(pipe.text_encoder(torch.tensor([[512, 70, 513]])).last_hidden_state, te_expected,
                                   atol=1e-5, rtol=1e-4)


def _unet_inputs(base):
    g = torch.Generator().manual_seed(0)
    cross = base.unet.config.cross_attention_dim
    pooled = base.unet.config.projection_class_embeddings_input_dim - 6 * base.unet.config.addition_time_embed_dim
    x = torch.randn(1, 4, 16, 16, generator=g)
    added = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return x, torch.tensor([500]), torch.randn(1, 77, cross, generator=g), added


def test_checkpoint_loads_into_a_pipeline_that_generates(demo, tmp_path, cache_dir):
    r = run(demo, tmp_path / "trial", cache_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_source(demo.model, cache_dir))
    pipe.load_lora_weights(r.checkpoints[-1])
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks woman", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_interrupted_and_resumed_run_ends_with_the_same_weights(demo, tmp_path, cache_dir):
    demo.lora.dropout = 0.1  # resume must restore the global RNG too, not only the noise generator
    full = run(demo, tmp_path / "full", cache_dir)
    first = run(demo, tmp_path / "split", cache_dir, max_steps=3)  # "killed" after the step-3 checkpoint
    assert first.steps == 3 and [c.name for c in first.checkpoints] == ["step-000003"]
    resumed = run(demo, tmp_path / "split", cache_dir)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    a = load_file(full.checkpoints[-1] / checkpoint.LORA_FILE)
    b = load_file(resumed.checkpoints[-1] / checkpoint.LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "full") == losses(tmp_path / "split")  # the log is continuous too


def test_lora_dropout_is_active_while_training(demo, tmp_path, cache_dir):
    plain = run(demo, tmp_path / "plain", cache_dir)
    demo.lora.dropout = 0.5
    dropped = run(demo, tmp_path / "dropout", cache_dir)
    a = load_file(plain.checkpoints[-1] / checkpoint.LORA_FILE)
    b = load_file(dropped.checkpoints[-1] / checkpoint.LORA_FILE)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # dropout changed the gradients


def test_resume_refuses_a_folder_of_another_configuration(demo, tmp_path, cache_dir):
    from trainer import ConfigError

    run(demo, tmp_path / "trial", cache_dir, max_steps=3)
    with pytest.raises(ConfigError, match="another configuration"):
        run(demo, tmp_path / "trial", cache_dir, lr=5e-4)
    with pytest.raises(ConfigError, match="resume=false"):
        run(demo, tmp_path / "trial", cache_dir, resume=False)


def test_second_trial_reuses_cached_latents_and_embeddings(demo, tmp_path, cache_dir):
    demo.data.random_flip = True
    demo.data.crop_seed = 7  # a cache key no other test uses, so the first trial must compute
    before = dict(cache.STATS)
    specs = [TrialSpec(n, demo.lora, replace(demo.train, lr=lr), tmp_path / n) for n, lr in (("a", 1e-4), ("b", 5e-4))]
    results = train(specs, demo.model, demo.data, cache_dir, progress=False)
    assert [r.status for r in results] == ["finished", "finished"]
    assert cache.STATS["latents"] == before.get("latents", 0) + 1  # once for both trials, both flip variants
    cache.clear_memory_cache()  # a new process: the disk cache answers
    run(demo, tmp_path / "c", cache_dir)
    assert cache.STATS["latents"] == before.get("latents", 0) + 1
    assert cache.STATS["embeddings"] == before.get("embeddings", 0) + (0 if before.get("embeddings") else 1)


def test_two_trials_in_one_list_match_two_separate_runs(demo, tmp_path, cache_dir):
    """The base is shared, never modified: the second trial of a list starts from the untouched base.
    (One after another, bit for bit; packs are compared in test_packed.py.)"""
    specs = [TrialSpec(n, demo.lora, replace(demo.train, lr=lr), tmp_path / n) for n, lr in (("a", 5e-3), ("b", 1e-3))]
    train(specs, demo.model, demo.data, cache_dir, progress=False, pack=False)
    alone = run(demo, tmp_path / "alone", cache_dir, lr=1e-3, pack=False)
    a = load_file(tmp_path / "b" / "checkpoints" / "step-000006" / checkpoint.LORA_FILE)
    b = load_file(alone.checkpoints[-1] / checkpoint.LORA_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_the_trial_and_keeps_the_last_good_checkpoint(demo, tmp_path, cache_dir):
    r = run(demo, tmp_path / "trial", cache_dir, lr=1e8, checkpoint_every=1)
    assert r.status == "diverged" and r.steps == 2
    assert "at step 2" in r.error and "step-000001" in r.error and "lower learning rate" in r.error
    assert [c.name for c in r.checkpoints] == ["step-000001"] and checkpoint.verify(r.checkpoints[0])


def test_prior_preservation_generates_class_images_once(demo, tmp_path, cache_dir):
    demo.data.with_prior_preservation = True
    demo.data.num_class_images = 2
    r = run(demo, tmp_path / "trial", cache_dir)
    assert r.status == "finished"
    folders = list((cache_dir / "class_images").iterdir())
    [folder] = [f for f in folders if len(list(f.glob("*.png"))) == 2]
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    cache.clear_memory_cache()
    demo.data.num_class_images = 3  # a top-up generates only the missing image
    run(demo, tmp_path / "trial2", cache_dir)
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.png") if p in stamps} == stamps
    assert len(list(folder.glob("*.png"))) == 3
