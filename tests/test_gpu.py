"""CUDA path of the trainer (bf16 base, fp32 LoRA, fused AdamW). Skipped on machines without a GPU."""
from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from trainer import TrialSpec, checkpoint, train
from trainer.models import resolve_source

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_on_cuda_writes_fp32_lora_that_loads(demo, tmp_path, cache_dir):
    spec = TrialSpec("gpu", demo.lora, replace(demo.train, device="cuda", mixed_precision="auto"), tmp_path / "t")
    [r] = train([spec], demo.model, demo.data, cache_dir, progress=False)
    assert r.status == "finished" and r.peak_memory_gib > 0 and r.ms_per_step > 0
    weights = load_file(r.checkpoints[-1] / checkpoint.LORA_FILE)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_source(demo.model, cache_dir)).to("cuda")
    pipe.load_lora_weights(r.checkpoints[-1])
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a photo of sks woman", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)


def test_gpu_resume_continues_from_the_checkpoint(demo, tmp_path, cache_dir):
    t = replace(demo.train, device="cuda")
    train([TrialSpec("a", demo.lora, replace(t, max_steps=3), tmp_path / "t")], demo.model, demo.data, cache_dir,
          progress=False)
    [r] = train([TrialSpec("a", demo.lora, t, tmp_path / "t")], demo.model, demo.data, cache_dir, progress=False)
    assert r.resumed_from == 3 and [c.name for c in r.checkpoints] == ["step-000003", "step-000006"]


def test_evaluation_on_cuda_scores_checkpoints(demo, tmp_path, cache_dir):
    from evaluation import EvalConfig, evaluate
    from sweep.offline_models import build_clip

    from .conftest import DEMO_DIR

    spec = TrialSpec("gpu", demo.lora, replace(demo.train, device="cuda", max_steps=2, checkpoint_every=2), tmp_path / "t")
    [r] = train([spec], demo.model, demo.data, cache_dir, progress=False)
    cfg = EvalConfig(prompts=["a picture of sks woman"], class_noun="woman", seeds=[0, 1], num_inference_steps=2,
                     resolution=64, clip_model=build_clip(demo.eval.clip_architecture, cache_dir), device="cuda")
    m = evaluate(r.checkpoints, cfg, instance_dir=DEMO_DIR, out_dir=tmp_path / "e",
                 pretrained=resolve_source(demo.model, cache_dir))
    assert set(m) == {"baseline", "step-000002"} and m["step-000002"]["face_detection_rate"] == 0.0


def test_sweep_scores_with_the_trainers_own_pipeline_on_cuda(demo, tmp_path, cache_dir):
    """In a sweep the trainer's loaded base (bf16 UNet, fp32 VAE) generates: mixed dtypes must decode."""
    from evaluation import EvalConfig, evaluate
    from sweep.offline_models import build_clip
    from trainer.models import shared_pipeline

    from .conftest import DEMO_DIR

    t = replace(demo.train, device="cuda", max_steps=2, checkpoint_every=2)
    [r] = train([TrialSpec("gpu", demo.lora, t, tmp_path / "t")], demo.model, demo.data, cache_dir, progress=False)
    cfg = EvalConfig(prompts=["a picture of sks woman"], class_noun="woman", seeds=[0], num_inference_steps=2,
                     resolution=64, clip_model=build_clip(demo.eval.clip_architecture, cache_dir), device="cuda")
    pipe = shared_pipeline(demo.model, "cuda", t.mixed_precision, cache_dir)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    m = evaluate(r.checkpoints, cfg, instance_dir=DEMO_DIR, out_dir=tmp_path / "e", pipeline=pipe)
    assert set(m) == {"baseline", "step-000002"}


def test_live_scoring_and_pruning_during_cuda_training(demo, tmp_path, cache_dir):
    """Checkpoints scored mid-training by the trainer's own pipeline (bf16 base, fp32 LoRA in place), then a
    hook that answers True stops the trial: the path an Optuna pruner takes on a GPU."""
    import math

    from evaluation import EvalConfig, evaluate
    from sweep.offline_models import build_clip
    from trainer.models import shared_pipeline

    from .conftest import DEMO_DIR

    t = replace(demo.train, device="cuda", max_steps=6, checkpoint_every=2)
    cfg = EvalConfig(prompts=["a picture of sks woman"], class_noun="woman", seeds=[0, 1], num_inference_steps=2,
                     resolution=64, clip_model=build_clip(demo.eval.clip_architecture, cache_dir), device="cuda")
    pipe = shared_pipeline(demo.model, "cuda", t.mixed_precision, cache_dir)
    kw = dict(instance_dir=DEMO_DIR, out_dir=tmp_path / "e", pipeline=pipe)
    assert set(evaluate([], cfg, **kw)) == {"baseline"}
    scores = []

    def hook(step, folder):
        scores.append(evaluate([folder], cfg, baseline=False, applied=True, **kw)[folder.name])
        return step == 4

    [r] = train([TrialSpec("gpu", demo.lora, t, tmp_path / "t", on_checkpoint=hook)], demo.model, demo.data,
                cache_dir, progress=False)
    assert r.status == "pruned" and r.steps == 4 and len(scores) == 2
    assert all(math.isfinite(s["clip_t"]) for s in scores)


def test_sweep_trial_scores_live_and_catches_up_on_cuda(demo, tmp_path, cache_dir):
    from .test_search import check_trial_scores_live_and_catches_up

    check_trial_scores_live_and_catches_up(demo, cache_dir, tmp_path, "cuda")


def test_a_pack_trains_on_cuda_and_each_checkpoint_loads(demo, tmp_path, cache_dir):
    """bf16 base, fp32 packed LoRA, one pass for three trials of different ranks; ordinary LoRA files out."""
    specs = [TrialSpec(n, replace(demo.lora, rank=r), replace(demo.train, device="cuda", lr=lr), tmp_path / n)
             for n, r, lr in (("a", 2, 1e-4), ("b", 4, 5e-4), ("c", 8, 1e-3))]
    results = train(specs, demo.model, demo.data, cache_dir, progress=False)
    assert [r.status for r in results] == ["finished"] * 3 and results[0].peak_memory_gib > 0
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_source(demo.model, cache_dir)).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    for r, (_, rank, _) in zip(results, (("a", 2, 1e-4), ("b", 4, 5e-4), ("c", 8, 1e-3))):
        weights = load_file(r.checkpoints[-1] / checkpoint.LORA_FILE)
        assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in weights.values())
        assert {min(v.shape) for v in weights.values()} == {rank}
        pipe.load_lora_weights(r.checkpoints[-1], adapter_name=r.name)
    assert pipe("a photo of sks woman", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)


def test_a_cuda_graph_step_trains_the_same_weights_as_eager_steps(demo, tmp_path, cache_dir):
    """The captured step (forward, backward, clipping, AdamW replayed as one graph) against the same pack stepped
    eagerly: the same kernels on the same numbers, so the weights agree to bf16 rounding (1% of lr x steps)."""
    from .test_packed import _assert_same, _weights

    def run(root, graphs):
        specs = [TrialSpec(n, replace(demo.lora, rank=r), replace(demo.train, device="cuda", lr=lr, cuda_graphs=graphs,
                                                                   lr_scheduler="linear", lr_warmup_steps=2),
                           root / n) for n, r, lr in (("a", 2, 1e-4), ("b", 4, 5e-4))]
        return train(specs, demo.model, demo.data, cache_dir, progress=False)

    graphed, eager = run(tmp_path / "g", True), run(tmp_path / "e", False)
    assert [r.pack_size for r in graphed] == [2, 2] and graphed[0].setup_seconds > 0
    for g, e, lr in zip(graphed, eager, (1e-4, 5e-4)):
        assert g.final_loss == pytest.approx(e.final_loss, rel=0.02)
        _assert_same(_weights(g), _weights(e), lr, demo.train.max_steps)


def test_a_lone_trial_trains_as_a_pack_of_one_and_its_hook_sees_its_adapter(demo, tmp_path, cache_dir):
    """A single trial takes the packed path; during its checkpoint hook the UNet carries exactly that trial's
    adapter (a generation then differs from the plain base's)."""
    from trainer.models import shared_pipeline

    seen = []

    def hook(step, folder):
        pipe = shared_pipeline(demo.model, "cuda", "auto", cache_dir)
        g = torch.Generator("cuda").manual_seed(0)
        seen.append(pipe("a photo of sks woman", num_inference_steps=2, height=64, width=64, generator=g,
                         output_type="latent").images.float().cpu())
        return False

    t = replace(demo.train, device="cuda", max_steps=4, checkpoint_every=2)
    [r] = train([TrialSpec("one", demo.lora, t, tmp_path / "t", on_checkpoint=hook)], demo.model, demo.data,
                cache_dir, progress=False)
    assert r.status == "finished" and r.pack_size == 1 and len(seen) == 2
    pipe = shared_pipeline(demo.model, "cuda", "auto", cache_dir)
    plain = pipe("a photo of sks woman", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator("cuda").manual_seed(0), output_type="latent").images.float().cpu()
    assert not torch.equal(seen[-1], plain) and not torch.equal(seen[0], seen[1])


def test_compiled_generation_agrees_with_eager_and_puts_the_blocks_back(demo, cache_dir):
    """eval.compile: the UNet's regions compiled while generating (same images to bf16 rounding) and uncompiled
    after, so that training and later eager calls see the plain modules, and blocks a training run compiled get
    their compiled code back."""
    from evaluation import generate as gen
    from common.compiling import GENERATION, blocks_of, compile_for_training, compiled_for_generation, uncompile

    pipe, _ = gen.load_pipeline(resolve_source(demo.model, cache_dir), torch.device("cuda"))

    def latents():
        g = [torch.Generator("cuda").manual_seed(s) for s in (0, 1)]
        return pipe(["a photo of sks woman"] * 2, num_inference_steps=3, height=64, width=64, generator=g,
                    output_type="latent").images.float()

    eager = latents()
    with compiled_for_generation(pipe.unet, True):
        assert all(b._compiled_call_impl is not None for b in blocks_of(pipe.unet, GENERATION))
        fast = latents()
    assert all(b._compiled_call_impl is None for b in blocks_of(pipe.unet, GENERATION) + blocks_of(pipe.unet))
    assert 0 < (fast - eager).abs().max() < 0.05 * eager.abs().max()  # compiled kernels round differently
    trained = compile_for_training(pipe.unet)  # as a compiled training run leaves them while it scores a checkpoint

    def impls():
        return [vars(b[0]).get(b[1]) if isinstance(b, tuple) else b._compiled_call_impl for b in trained]

    before = impls()
    assert all(before) and any(isinstance(b, tuple) for b in trained)
    with compiled_for_generation(pipe.unet, True):
        assert not any(impls())  # traced inside their compiled Transformer2DModel
        again = latents()
    assert impls() == before
    uncompile(trained)
    assert not any(impls())
    assert (again - fast).abs().max() < 0.05 * eager.abs().max()
    gen._PIPES.clear()


def test_checkpoints_generate_through_the_baselines_compiled_code(demo, tmp_path, cache_dir):
    """A checkpoint's LoRA, from its file (peft) or a pack's live adapter, is merged into the weights while it
    generates: the UNet is the plain base's, so the code compiled for the baseline serves it without a single
    recompilation, and its images still differ from the baseline's."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from evaluation import generate as gen
    from trainer import LoraSettings
    from common.compiling import compiled_for_generation
    from trainer.packed import Pack

    spec = TrialSpec("gpu", demo.lora, replace(demo.train, device="cuda", max_steps=2, checkpoint_every=2), tmp_path / "t")
    [r] = train([spec], demo.model, demo.data, cache_dir, progress=False)
    pipe, _ = gen.load_pipeline(resolve_source(demo.model, cache_dir), torch.device("cuda"))

    def latents():
        g = [torch.Generator("cuda").manual_seed(s) for s in (0, 1)]
        return pipe(["a photo of sks woman"] * 2, num_inference_steps=2, height=64, width=64, generator=g,
                    output_type="latent").images.float()

    with compiled_for_generation(pipe.unet, True):
        plain = latents()  # compiles every graph the plain base needs
        graphs = counters["stats"]["unique_graphs"]
        pack = Pack(SimpleNamespace(unet=pipe.unet), [LoraSettings(rank=4), LoraSettings(rank=2)])
        try:
            with torch.no_grad():
                for p in pack.params():
                    p.normal_(std=0.5)
            with pack.use(1):
                packed_trial = latents()
        finally:
            pack.remove()
        with gen.LoraSwap(pipe, r.checkpoints[-1], scale=50.0):
            from_file = latents()
        assert counters["stats"]["unique_graphs"] == graphs
    assert not torch.equal(packed_trial, plain) and not torch.equal(from_file, plain)
    gen._PIPES.clear()


def test_a_compiled_pack_trains_like_an_eager_one(demo, tmp_path, cache_dir):
    """train.compile=true (auto's choice for big packs): the same losses and LoRA updates as eager blocks, to
    bf16 rounding (fused kernels round differently, so not bit for bit: the up weights start at zero, so they are
    the whole update, compared as a norm)."""
    def run(root, compile):
        specs = [TrialSpec(n, replace(demo.lora, rank=r), replace(demo.train, device="cuda", lr=lr, compile=compile),
                           root / n) for n, r, lr in (("a", 2, 1e-4), ("b", 4, 5e-4))]
        return train(specs, demo.model, demo.data, cache_dir, progress=False)

    fast, eager = run(tmp_path / "c", True), run(tmp_path / "e", False)
    for f, e in zip(fast, eager):
        assert f.status == e.status == "finished" and f.final_loss == pytest.approx(e.final_loss, rel=0.02)
        wf, we = load_file(f.checkpoints[-1] / checkpoint.LORA_FILE), load_file(e.checkpoints[-1] / checkpoint.LORA_FILE)
        up = [k for k in we if k.endswith("lora.up.weight")]
        diff = sum(float((wf[k] - we[k]).norm()) ** 2 for k in up) ** 0.5
        assert 0 < diff < 0.1 * sum(float(we[k].norm()) ** 2 for k in up) ** 0.5


def test_a_diverging_trial_in_a_captured_pack_leaves_its_mates_as_eager_steps_train_them(demo, tmp_path, cache_dir,
                                                                                          monkeypatch):
    """On the CUDA-graph path too, the step where one trial overflows is undone and redone per trial (outside the
    graph, whose gradient buffers stay its own): its mates end with the weights an eager pack gives them."""
    from trainer import packed

    from .test_packed import _assert_same, _weights

    redone = []
    per_trial = packed.per_trial
    monkeypatch.setattr(packed, "per_trial", lambda: redone.append(1) or per_trial())

    def run(root, graphs):
        specs = [TrialSpec(n, replace(demo.lora, rank=r), replace(demo.train, device="cuda", lr=lr, cuda_graphs=graphs,
                                                                   max_grad_norm=norm), root / n)
                 for n, r, lr, norm in (("a", 2, 1e-4, 1.0), ("b", 4, 1e8, 1e12), ("c", 4, 5e-4, 1.0))]
        return train(specs, demo.model, demo.data, cache_dir, progress=False)

    graphed = run(tmp_path / "g", True)
    assert redone and graphed[0].setup_seconds > 0
    eager = run(tmp_path / "e", False)
    assert [r.status for r in graphed] == [r.status for r in eager] == ["finished", "diverged", "finished"]
    assert graphed[1].steps == eager[1].steps
    for i, lr in ((0, 1e-4), (2, 5e-4)):
        assert graphed[i].final_loss == pytest.approx(eager[i].final_loss, rel=0.02)
        _assert_same(_weights(graphed[i]), _weights(eager[i]), lr, demo.train.max_steps)


def test_a_float8_linear_on_cuda_matches_its_dequantised_weight_eagerly_in_a_graph_and_compiled():
    """families.quantize.Float8Linear on the GPU: torch._scaled_mm on Hopper and later (9.0+),
    else the dequantised weight; either way within float8's rounding of the bf16 Linear, and the same numbers when
    replayed from a CUDA graph and when compiled."""
    from families.quantize import Float8Linear, scaled_mm_ok

    torch.manual_seed(0)
    plain = torch.nn.Linear(3072, 1024, device="cuda", dtype=torch.bfloat16)
    q = Float8Linear(plain, torch.bfloat16)
    x = torch.randn(2, 300, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert scaled_mm_ok(x, q.weight, torch.bfloat16) == (torch.cuda.get_device_capability() >= (9, 0))
    out = q(x)
    ref = torch.nn.functional.linear(x.detach().float(), plain.weight.float(), plain.bias.float())
    assert (out.float() - ref).abs().max() < 0.08 * ref.abs().max()
    out.sum().backward()
    exact = (torch.ones(600, 1024, device="cuda") @ q.dequantised_weight(torch.float32)).view(2, 300, 3072)
    assert (x.grad.float() - exact).abs().max() < 0.06 * exact.abs().max()  # float8 backward on 9.0+
    graph, static = torch.cuda.CUDAGraph(), x.detach().clone()
    q(static)  # warm-up outside capture
    with torch.cuda.graph(graph):
        replayed = q(static)
    graph.replay()
    assert torch.equal(replayed, out.detach())
    compiled = torch.compile(q)(x.detach())  # the input's scaling fused: the same within a rounding or two
    assert (compiled.float() - out.detach().float()).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("preset", [(), ("preset=flux_24gb", "train.optimizer=adamw")], ids=["plain", "flux_24gb"])
def test_a_flux_step_is_captured_as_a_cuda_graph(tmp_path, cache_dir, caplog, preset):
    """FLUX.1 on CUDA: the step is captured (no host-to-device copy inside it: the scheduler's tables and the image
    ids live on the device), also on the float8 transformer with gradient checkpointing (whose recomputation runs
    under the same attention kernels as the forward, else torch.utils.checkpoint refuses the step)."""
    from .conftest import typed

    c = typed("model=flux_tiny", "steps=4", "train.checkpoint_every=4", "data.resolution=64", *preset, root=tmp_path)
    specs = [TrialSpec(n, c.lora, replace(c.train, device="cuda", lr=lr), tmp_path / n)
             for n, lr in (("a", 1e-4), ("b", 5e-4))]
    with caplog.at_level("WARNING", logger="trainer"):
        results = train(specs, c.model, c.data, cache_dir, progress=False)
    assert [r.status for r in results] == ["finished", "finished"]
    assert not [r.getMessage() for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert all(torch.isfinite(torch.tensor(r.final_loss)) for r in results)
