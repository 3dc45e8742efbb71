"""Packed training: a pack of trials ends with the weights each trial gets alone, and no trial's gradient
reaches another's weights."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from trainer import TrialSpec, checkpoint, train
from trainer.packed import PackedLoRALinear

# trials of the original kind of sweep: different learning rates, ranks, alphas and seeds
TRIALS = [("a", 1e-4, 2, None, 0), ("b", 5e-4, 4, 8.0, 1), ("c", 2e-3, 8, None, 2)]
# fp32 on the CPU: batched and per-trial matmuls round differently (~1e-7), and AdamW, which divides by the
# gradient's own running scale, carries that into the weights. Each weight moves by at most lr per step; the
# packed and lone weights must agree to 1% of that (lr x steps / 100). A pack mate's LR, rank or gradient
# leaking in moves them by the full scale.
MOVE_FRACTION = 0.01


def _specs(demo, root, **train_kw):
    """fp32 on the CPU wherever the tests run (bf16 on a GPU rounds too coarsely for this comparison)."""
    return [TrialSpec(n, replace(demo.lora, rank=r, alpha=a),
                      replace(demo.train, lr=lr, seed=seed, device="cpu", **train_kw), root / n)
            for n, lr, r, a, seed in TRIALS]


def _weights(result):
    return load_file(result.checkpoints[-1] / checkpoint.LORA_FILE)


def _assert_same(a: dict, b: dict, lr: float, steps: int = 6) -> float:
    """Returns the largest difference, as a fraction of the largest possible movement."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, k
        worst = max(worst, float((a[k] - b[k]).abs().max()) / (lr * steps))
    assert worst < MOVE_FRACTION, worst
    return worst


def test_a_pack_of_three_ends_with_the_weights_of_three_lone_trials(demo, tmp_path, cache_dir, caplog):
    packed = train(_specs(demo, tmp_path / "pack"), demo.model, demo.data, cache_dir, progress=False)
    alone = [train([s], demo.model, demo.data, cache_dir, progress=False)[0] for s in _specs(demo, tmp_path / "alone")]
    assert [r.status for r in packed] == ["finished"] * 3
    for p, a, (_, lr, *_) in zip(packed, alone, TRIALS):
        assert [c.name for c in p.checkpoints] == [c.name for c in a.checkpoints] == ["step-000003", "step-000006"]
        _assert_same(_weights(p), _weights(a), lr)
        assert p.final_loss == pytest.approx(a.final_loss, rel=1e-4)
        moved = any(v.abs().max() > 0 for k, v in _weights(p).items() if "lora_B" in k or "up" in k)
        assert moved  # the LoRA was trained, not left at its zero init


def test_trials_of_different_lengths_and_intervals_pack_and_each_ends_as_it_would_alone(demo, tmp_path, cache_dir):
    """A decaying schedule (cosine over each trial's own length): 4, 6 and 5 steps, checkpoints every 2, 3 and 5,
    in one pack that runs 6 steps; each trial checkpoints on its own schedule, stops at its own end (its log holds
    its own steps only) and ends with the weights it gets alone."""
    lengths = {"a": (4, 2), "b": (6, 3), "c": (5, 5)}

    def specs(root):
        return [replace(s, train=replace(s.train, lr_scheduler="cosine", max_steps=lengths[s.name][0],
                                         checkpoint_every=lengths[s.name][1]))
                for s in _specs(demo, root)]

    packed = train(specs(tmp_path / "pack"), demo.model, demo.data, cache_dir, progress=False)
    assert [r.pack_size for r in packed] == [3, 3, 3] and [r.status for r in packed] == ["finished"] * 3
    assert [r.steps for r in packed] == [4, 6, 5]
    assert [[c.name for c in r.checkpoints] for r in packed] == [
        ["step-000002", "step-000004"], ["step-000003", "step-000006"], ["step-000005"]]
    for k, (p, (name, *_)) in enumerate(zip(packed, TRIALS)):
        logged = [json.loads(ln)["step"] for ln in (p.output_dir / "train_log.jsonl").read_text().splitlines()]
        assert logged == list(range(1, lengths[name][0] + 1))
        # the pack mates' rows reach a trial only through exact zeros of the masked kernel: its weights are, bit for
        # bit, those of a pack in which every trial is as long as it
        steps = lengths[name][0]
        same = [replace(s, train=replace(s.train, max_steps=steps, checkpoint_every=steps))
                for s in specs(tmp_path / f"uniform{k}")]
        uniform = train(same, demo.model, demo.data, cache_dir, progress=False)[k]
        assert all(torch.equal(_weights(p)[w], v) for w, v in _weights(uniform).items())
        assert p.final_loss == uniform.final_loss  # (and a uniform pack ends as its trials do alone: test above)


def test_shorter_runs_of_a_constant_schedule_are_written_from_the_longest_ones_training(demo, tmp_path, cache_dir):
    """Trial a at 4 and 6 steps, b at 6 (a constant schedule, the default): two trainings, three trials. The 4-step
    trial's checkpoints are its own files at its own steps (every 2), its LoRA is a lone 4-step run's, its log
    holds its own 4 steps, its record names it, and its result names the training it came from."""
    def spec(root, name, steps, every, source):
        s = next(x for x in _specs(demo, root) if x.name == source)
        return replace(s, name=name, output_dir=root / name,
                       train=replace(s.train, max_steps=steps, checkpoint_every=every))

    root = tmp_path / "sweep"
    specs = [spec(root, "a4", 4, 2, "a"), spec(root, "a6", 6, 3, "a"), spec(root, "b6", 6, 3, "b")]
    seen = []
    specs = [replace(s, on_checkpoint=lambda step, folder, name=s.name: seen.append((name, step)) and False)
             for s in specs]
    results = train(specs, demo.model, demo.data, cache_dir, progress=False)
    assert [r.status for r in results] == ["finished"] * 3 and [r.steps for r in results] == [4, 6, 6]
    assert [r.training for r in results] == ["a6", "a6", None] and [r.pack_size for r in results] == [2, 2, 2]
    assert [c.name for c in results[0].checkpoints] == ["step-000002", "step-000004"]
    assert [c.name for c in results[1].checkpoints] == ["step-000003", "step-000006"]
    assert sorted(seen) == sorted([("a4", 2), ("a4", 4), ("a6", 3), ("a6", 6), ("b6", 3), ("b6", 6)])
    for c in results[0].checkpoints:
        assert checkpoint.CheckpointRecord.read(c).trial == "a4" and c.parent.parent == root / "a4"
    logged = [json.loads(ln)["step"] for ln in (root / "a4" / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    # bit for bit what a 4-step trial of its own writes in the same pack (the pack mates reach it through exact
    # zeros only; a trial in a pack ends as it does alone: the tests above)
    twin = [spec(tmp_path / "own", "a4", 4, 2, "a"), spec(tmp_path / "own", "b6", 6, 3, "b")]
    [own, _] = train(twin, demo.model, demo.data, cache_dir, progress=False)
    assert own.training is None and all(torch.equal(_weights(results[0])[w], v) for w, v in _weights(own).items())
    assert results[0].final_loss == own.final_loss
    # under a decaying schedule each length trains for itself (one pack)
    cosine = [replace(s, output_dir=tmp_path / "cos" / s.name, on_checkpoint=None,
                      train=replace(s.train, lr_scheduler="cosine")) for s in specs]
    assert [r.training for r in train(cosine, demo.model, demo.data, cache_dir, progress=False)] == [None] * 3


def test_a_packed_checkpoint_resumes_alone_to_the_same_weights(demo, tmp_path, cache_dir):
    """Packed checkpoints hold a lone trial's optimizer, schedule and RNG state: a trial can finish alone."""
    train(_specs(demo, tmp_path / "t", max_steps=3), demo.model, demo.data, cache_dir, progress=False)
    for resumed, alone in zip(_specs(demo, tmp_path / "t"), _specs(demo, tmp_path / "alone")):
        [r] = train([resumed], demo.model, demo.data, cache_dir, progress=False)
        [a] = train([alone], demo.model, demo.data, cache_dir, progress=False)
        assert r.resumed_from == 3 and r.steps == 6
        _assert_same(_weights(r), _weights(a), resumed.train.lr)


def test_a_diverging_trial_leaves_its_pack_mates_untouched(demo, tmp_path, cache_dir, monkeypatch):
    """The dense kernel mixes the trials' rows (0 x inf = NaN): the step where one overflows is undone and redone
    with each trial on its own adapter, and the diverged trial leaves the pack zeroed."""
    from trainer import packed

    redone = []
    per_trial = packed.per_trial
    monkeypatch.setattr(packed, "per_trial", lambda: redone.append(1) or per_trial())
    specs = _specs(demo, tmp_path / "pack")
    specs[1] = replace(specs[1], train=replace(specs[1].train, lr=1e8, max_grad_norm=1e12))
    a, b, c = train(specs, demo.model, demo.data, cache_dir, progress=False)
    assert b.status == "diverged" and a.status == c.status == "finished"
    assert redone  # the overflow did reach the shared GEMMs; undone and redone
    for p, s in ((a, specs[0]), (c, specs[2])):
        [alone] = train([replace(s, output_dir=tmp_path / "alone" / s.name)], demo.model, demo.data, cache_dir,
                        progress=False)
        _assert_same(_weights(p), _weights(alone), s.train.lr)


def test_no_gradient_crosses_from_one_trial_to_another():
    torch.manual_seed(0)
    layer = PackedLoRALinear(torch.nn.Linear(16, 8), ranks=[2, 4, 3], scales=[1.0, 0.5, 2.0])
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        for k, r in enumerate([2, 4, 3]):  # as in a pack: zero beyond each trial's rank
            layer.lora_A[k, r:] = 0
            layer.lora_B[k, :, r:] = 0
    x = torch.randn(3 * 5, 7, 16)  # trial-major: 5 samples per trial
    out = layer(x)
    for k in range(3):
        layer.zero_grad()
        out[5 * k:5 * (k + 1)].pow(2).sum().backward(retain_graph=True)
        for other in set(range(3)) - {k}:
            assert torch.count_nonzero(layer.lora_A.grad[other]) == 0
            assert torch.count_nonzero(layer.lora_B.grad[other]) == 0
        assert torch.count_nonzero(layer.lora_B.grad[k]) > 0
        # the zero padding of a smaller rank gets no gradient either, so AdamW never moves it
        r = [2, 4, 3][k]
        assert torch.count_nonzero(layer.lora_B.grad[k][:, r:]) == 0


def _layer(ranks=(2, 4, 3), scales=(1.0, 0.5, 2.0)):
    torch.manual_seed(0)
    layer = PackedLoRALinear(torch.nn.Linear(16, 8), ranks=list(ranks), scales=list(scales))
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        for k, r in enumerate(ranks):
            layer.lora_A[k, r:] = 0
            layer.lora_B[k, :, r:] = 0
    return layer


@pytest.mark.parametrize("kernel", ["dense", "bmm"])
def test_both_lora_kernels_apply_each_trials_own_adapter(kernel, monkeypatch):
    """Trial k's rows get base(x) + scale_k B_k A_k x, and gradients equal those of that formula."""
    monkeypatch.setattr(PackedLoRALinear, "kernel", kernel)
    layer = _layer()
    x = torch.randn(3 * 4, 5, 16)
    out = layer(x)
    want = torch.cat([layer.base(xk) + layer.scale[k] * xk @ layer.lora_A[k].T @ layer.lora_B[k].T
                      for k, xk in enumerate(x.chunk(3))])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g_out = torch.autograd.grad(out.square().sum(), [layer.lora_A, layer.lora_B])
    g_want = torch.autograd.grad(want.square().sum(), [layer.lora_A, layer.lora_B])
    for g, w in zip(g_out, g_want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_an_overflowing_trial_reaches_its_mates_through_the_dense_kernel_only():
    """Why the trainer redoes such a step per trial: with trial 1's adapter at inf, the dense kernel's masked
    zeros give NaN (0 x inf) in trial 0's rows; per_trial() keeps trial 0 finite and exact."""
    from trainer.packed import per_trial

    layer = _layer()
    x = torch.randn(3 * 4, 16)
    with torch.no_grad():
        clean = layer(x)
        layer.lora_B[1] = float("inf")
        assert layer(x)[:4].isnan().any()
        with per_trial():
            out = layer(x)
    assert PackedLoRALinear.kernel == "dense"
    assert torch.equal(out[:4].isfinite(), torch.ones_like(out[:4], dtype=torch.bool))
    torch.testing.assert_close(out[:4], clean[:4])
    torch.testing.assert_close(out[8:], clean[8:])


def test_scoring_a_trial_merges_its_adapter_and_puts_the_base_back_bit_for_bit():
    """Pack.use(k) generates with trial k's LoRA merged into the base weights and the packed wrapper out of the
    UNet (the plain base's modules, so generation compiled for the baseline serves it unchanged), and restores
    the bf16 base exactly on exit, however often it is entered."""
    from types import SimpleNamespace

    from trainer.packed import Pack

    torch.manual_seed(0)
    unet = torch.nn.Sequential()
    unet.add_module("to_q", torch.nn.Linear(32, 16))
    unet.to(torch.bfloat16)
    before = unet.to_q.weight.detach().clone()
    settings = [SimpleNamespace(rank=r, lora_alpha=a, target_modules=["to_q"]) for r, a in ((2, 4.0), (4, 4.0))]
    pack = Pack(SimpleNamespace(denoiser=unet), settings)  # the base as the families interface shows it
    layer = unet.to_q
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_(std=0.1)
        layer.lora_A[0, 2:] = 0
        layer.lora_B[0, :, 2:] = 0
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    for k in (1, 0, 1):
        want = x.float() @ (before.float() + layer.scale[k] * layer.lora_B[k] @ layer.lora_A[k]).T + layer.base.bias.float()
        with pack.use(k):
            assert unet.to_q is layer.base and not torch.equal(layer.base.weight, before)
            got = unet.to_q(x)
        torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.05)  # bf16 matmul of the merged weight
        assert unet.to_q is layer and torch.equal(layer.base.weight, before)
    with pack.use(1):
        with pytest.raises(RuntimeError, match="does not nest"):  # trial 0 inside trial 1 would score both at once
            with pack.use(0):
                pass
        assert unet.to_q is layer.base
    assert unet.to_q is layer and torch.equal(layer.base.weight, before)
    pack.remove()
    assert unet.to_q is layer.base


def test_a_pack_scores_each_trial_with_its_own_adapter_and_prunes_one_alone(demo, tmp_path, cache_dir):
    """Checkpoint hooks in a pack: each sees the UNet with its own trial's adapter on every sample (its output
    equals that of the trial's saved LoRA), and a trial its hook stops ends there while the others train on
    to the weights they get alone."""
    from common.device import resolve_device
    from trainer.models import load_base_model

    from trainer import lora

    seen = {}
    base = lambda: load_base_model(demo.model, resolve_device("cpu"), torch.float32, cache_dir)  # noqa: E731 - the loaded one

    def unet_output():
        unet = base().unet
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        cond = {"text_embeds": torch.zeros(2, 32), "time_ids": torch.zeros(2, 6)}
        with torch.no_grad():
            return unet(x, 10, emb, added_cond_kwargs=cond).sample

    def hook(name, stop_at=None):
        def on_checkpoint(step, folder):
            seen[(name, step)] = unet_output()
            return step == stop_at
        return on_checkpoint

    specs = _specs(demo, tmp_path / "pack")
    specs = [replace(specs[0], on_checkpoint=hook("a", stop_at=3)), replace(specs[1], on_checkpoint=hook("b")), specs[2]]
    a, b, c = train(specs, demo.model, demo.data, cache_dir, progress=False)
    assert (a.status, a.steps, [p.name for p in a.checkpoints]) == ("pruned", 3, ["step-000003"])
    assert b.status == c.status == "finished" and b.steps == 6 and a.pack_size == 3
    assert sorted(seen) == [("a", 3), ("b", 3), ("b", 6)]
    assert not torch.allclose(seen[("a", 3)], seen[("b", 3)])  # two adapters, two outputs
    for (name, step), out in seen.items():  # the same output from the checkpoint loaded the ordinary way
        spec = specs["abc".index(name)]
        lora.add_lora(base(), spec.lora)
        try:
            lora.load_lora_into(base(), spec.output_dir / "checkpoints" / f"step-{step:06d}", False)
            torch.testing.assert_close(unet_output(), out, rtol=1e-4, atol=1e-5)
        finally:
            lora.remove_lora(base())
    for r, s in ((b, specs[1]), (c, specs[2])):
        [alone] = train([replace(s, output_dir=tmp_path / "alone" / s.name, on_checkpoint=None)], demo.model,
                        demo.data, cache_dir, progress=False)
        _assert_same(_weights(r), _weights(alone), s.train.lr)


def test_a_pack_too_big_for_memory_is_split_and_every_trial_trains(demo, tmp_path, cache_dir, monkeypatch, caplog):
    """Out of memory for a pack of 3 (simulated: packs above 2 raise it): halves of 2 and 1 train instead, each
    ending with the weights its trials get alone."""
    from trainer import loop

    real = loop._train_packed

    def tight(base, samples, specs, *args):
        if len(specs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(base, samples, specs, *args)

    monkeypatch.setattr(loop, "_train_packed", tight)
    results = train(_specs(demo, tmp_path / "pack"), demo.model, demo.data, cache_dir, progress=False)
    assert [r.status for r in results] == ["finished"] * 3 and [r.pack_size for r in results] == [2, 2, 1]
    assert "does not fit in GPU memory" in caplog.text
    for r, s in zip(results, _specs(demo, tmp_path / "alone")):
        [alone] = train([s], demo.model, demo.data, cache_dir, progress=False)
        _assert_same(_weights(r), _weights(alone), s.train.lr)


def test_out_of_memory_while_an_adapter_is_half_added_leaves_the_base_plain_for_the_halves(demo, tmp_path, cache_dir,
                                                                                          monkeypatch, caplog):
    """Out of memory inside peft's injection of a pack's second trial (as on an H100 after a FLUX pack of 2 did not
    fit: diffusers' flag says an adapter is loaded, its peft_config never came): the base goes back plain, the pack
    is split and every trial finishes (an AttributeError 'peft_config' failed them before)."""
    from trainer import lora

    real, calls = lora.add_lora, []

    def half_added(base, cfg):
        calls.append(1)
        if len(calls) == 2:  # the pack's second trial: the flag set, nothing injected, then out of memory
            base.denoiser._hf_peft_config_loaded = True
            raise torch.OutOfMemoryError("CUDA out of memory (simulated inside peft's injection)")
        return real(base, cfg)

    monkeypatch.setattr(lora, "add_lora", half_added)
    results = train(_specs(demo, tmp_path / "pack")[:2], demo.model, demo.data, cache_dir, progress=False)
    assert [r.status for r in results] == ["finished"] * 2 and [r.pack_size for r in results] == [1, 1]
    assert "does not fit in GPU memory" in caplog.text
    from common.device import resolve_device
    from trainer.models import load_base_model

    denoiser = load_base_model(demo.model, resolve_device("cpu"), torch.float32, cache_dir).denoiser  # the loaded one
    assert not getattr(denoiser, "_hf_peft_config_loaded", False) and not hasattr(denoiser, "peft_config")


def test_a_trial_whose_gradient_overflows_leaves_the_pack_and_its_mates_train_on_as_alone(demo, tmp_path, cache_dir,
                                                                                         monkeypatch):
    """A finite loss with a non-finite gradient (injected into trial b's gradients at step 2) also ends a trial:
    the step is redone per trial, b is reported diverged by its gradient norm, a and c end as they do alone."""
    from trainer import packed

    clip = packed.PackedAdamW.clip

    def overflowing(self):
        if self.steps == 1:  # step 2's clipping (the step count moves after it), in the step and in its redo
            with torch.no_grad():
                self.params[1].grad[1] = float("inf")
        clip(self)

    monkeypatch.setattr(packed.PackedAdamW, "clip", overflowing)
    a, b, c = train(_specs(demo, tmp_path / "pack"), demo.model, demo.data, cache_dir, progress=False)
    assert b.status == "diverged" and b.steps == 2 and "gradient norm became inf at step 2" in b.error
    assert a.status == c.status == "finished"
    monkeypatch.undo()
    for p, s in ((a, _specs(demo, tmp_path / "alone")[0]), (c, _specs(demo, tmp_path / "alone")[2])):
        [alone] = train([s], demo.model, demo.data, cache_dir, progress=False)
        _assert_same(_weights(p), _weights(alone), s.train.lr)
