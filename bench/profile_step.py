"""Where the GPU time of a training step and of a generation step goes (SDXL-base architecture, random weights).

Times, in one process on one GPU: the UNet forward of evaluation (no grad, --eval-batch samples: images x 2 for
CFG) eager, in channels-last memory format, and compiled by regions (the transformer blocks; also the ResNet
blocks and resamplers; or whole Transformer2DModels instead of their blocks), at the sweep's batch sizes too; and
the packed training step (forward + backward of K trials, captured as a CUDA graph as the trainer does) with each
LoRA kernel of PackedLoRALinear ("bmm", "dense") and without LoRA (the floor the adapters add to), eager and with
compiled transformer blocks. A torch.profiler pass sorts the kernels of a step into families (GEMM, attention,
convolution, normalisation, elementwise, ...). Writes bench/results/profile_step_<gpu>.json.

    python bench/profile_step.py --packs 8 --eval-batch 40
    python bench/profile_step.py --tiny --out /tmp/bench   # a check of the script on the CPU (tests/test_bench.py):
        # the tiny model in float32, eager rows only (no CUDA graphs, no Inductor), the CPU profiler's families
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config  # noqa: F401 - patched per row

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from bench.single_trial import model_preset  # noqa: E402
from common import compiling  # noqa: E402
from trainer import LoraSettings, packed  # noqa: E402
from trainer.models import load_base_model, resolve_source  # noqa: E402

FAMILIES = [  # first match wins; kernel names as CUPTI reports them
    ("attention", r"flash|fmha|attention|sdpa|cudnn_generated_fort_native_sdpa|scaled_dot"),
    ("convolution", r"conv|implicit_gemm|xmma_fprop|xmma_dgrad|xmma_wgrad|fprop|dgrad|wgrad|winograd|im2col"),
    ("gemm", r"gemm|sm90_xmma|cutlass|cublas|matmul|nvjet|splitk"),
    ("group/layer norm", r"norm|welford|moments"),
    ("triton (fused)", r"^triton"),
    ("copy/cast", r"copy_kernel|memcpy|memset|fill_kernel|cat_batched|transpose|convert"),  # not "nocast<Gelu..."
    ("elementwise/reduce", r"elementwise|reduce|vectorized|unrolled|foreach|silu|gelu|softmax|index"),
]


def family(name: str) -> str:
    low = name.lower()
    return next((f for f, rx in FAMILIES if re.search(rx, low)), "other")


def sdpa(backend: str):
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]])


def timed(fn, iters: int, graph: bool) -> float:
    """ms per call of `fn` (a CUDA graph replay when `graph`); on a CPU (no CUDA), plain calls after a warm-up."""
    if not torch.cuda.is_available():
        fn()
        tic = time.perf_counter()
        for _ in range(iters):
            fn()
        return 1000 * (time.perf_counter() - tic) / iters
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    run()
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(iters):
        run()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - tic) / iters


def kernel_table(fn, top: int = 25) -> dict:
    """One call of `fn` under torch.profiler: GPU ms per kernel family and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()  # else the CPU's operators (a check of the script: tests/test_bench.py)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    took = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    rows = [(e.key, took(e) / 1000, e.count) for e in prof.key_averages() if took(e) > 0]
    rows = [r for r in rows if not r[0].startswith(("cudaLaunch", "cudaStream", "cudaGraph"))]
    fams: dict[str, float] = {}
    for name, ms, _ in rows:
        fams[family(name)] = fams.get(family(name), 0.0) + ms
    total = sum(fams.values())
    rows.sort(key=lambda r: -r[1])
    return {"gpu_ms": total, "families_ms": dict(sorted(fams.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": n[:160], "ms": ms, "calls": c, "family": family(n)} for n, ms, c in rows[:top]]}


def conditioning(base, n: int, device, size: int | None = None):
    """A step's UNet inputs for `n` samples of `size` latents (default: the model's own resolution)."""
    g = torch.Generator(device=device).manual_seed(0)
    dt_ = base.weight_dtype
    cross = base.unet.config.cross_attention_dim
    pooled_dim = base.unet.config.projection_class_embeddings_input_dim - 6 * base.unet.config.addition_time_embed_dim
    size = size or base.unet.config.sample_size
    return {
        "x": torch.randn(n, 4, size, size, generator=g, device=device, dtype=dt_),
        "t": torch.randint(0, 1000, (n,), generator=g, device=device),
        "emb": torch.randn(n, 77, cross, generator=g, device=device, dtype=dt_),
        "pooled": torch.randn(n, pooled_dim, generator=g, device=device, dtype=dt_),
        "tids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * n, device=device, dtype=dt_),
    }


def unet_call(base, c, x=None):
    return base.unet(c["x"] if x is None else x, c["t"], c["emb"],
                     added_cond_kwargs={"text_embeds": c["pooled"], "time_ids": c["tids"]}).sample


INDUCTOR_TUNED = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                  "coordinate_descent_check_all_directions": True, "epilogue_fusion": False}
INDUCTOR_AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"}
# aten ops FlopCounterMode counts, by kernel family
FLOP_FAMILIES = {"gemm": ("mm", "addmm", "bmm", "baddbmm"), "convolution": ("convolution", "_convolution"),
                 "attention": ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
                               "_scaled_dot_product_efficient_attention", "_flash_attention_forward",
                               "_efficient_attention_forward")}


def flops_by_family(fn) -> dict:
    """TFLOP of one call of `fn` by kernel family (torch.utils.flop_counter), to set against the profile's GPU
    time per family: how close each family runs to the chip's GEMM peak."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    fams: dict[str, float] = {}
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[1] if str(op).startswith("aten.") else str(op)
        fam = next((f for f, ops in FLOP_FAMILIES.items() if name in ops), name)
        fams[fam] = fams.get(fam, 0.0) + n / 1e12
    return {"tflop_by_family": fams, "tflop_total": sum(fams.values())}


def gemm_peak(n: int = 8192, iters: int = 20, device: str = "cuda") -> dict:
    """The chip's bf16 dense GEMM rate as cuBLAS reaches it on a large square product (the ceiling the
    UNet's GEMMs are measured against)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = timed(lambda: a @ b, iters, graph=False)
    return {"n": n, "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


@contextlib.contextmanager
def adapters_out(pack):
    """Inside: each packed wrapper is replaced in the UNet by its plain base Linear (the pack's adapters rest)."""
    for _, parent, attr, m in pack.layers:
        setattr(parent, attr, m.base)
    try:
        yield
    finally:
        for _, parent, attr, m in pack.layers:
            setattr(parent, attr, m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packs", type=int, nargs="*", default=None, help="trials per packed step (default 8; --tiny 2)")
    ap.add_argument("--eval-batch", type=int, default=None,
                    help="UNet samples per evaluation step (images x 2, CFG; default 40, --tiny 2)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per row (default 8; --tiny 2)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sdxl-bench")
    ap.add_argument("--only", nargs="*", help="run only these rows (a name ending in * : every row it begins)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other rows and profiles of this GPU's existing JSON (remeasure some with --only)")
    record.add_options(ap)
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench/profile_step.py needs a CUDA GPU (--tiny: a check of the script on the CPU)")
    args.packs = args.packs if args.packs is not None else ([2] if args.tiny else [8])
    args.eval_batch = args.eval_batch or (2 if args.tiny else 40)
    args.iters = args.iters or (2 if args.tiny else 8)
    args.out = record.out_folder(args, "profile_step")
    dev = torch.device("cpu" if args.tiny else "cuda")
    cuda = dev.type == "cuda"
    cache = args.cache or args.work / "cache"
    model = model_preset("tiny" if args.tiny else "sdxl_base_random")
    resolve_source(model, cache)
    base = load_base_model(model, dev, torch.bfloat16 if cuda else torch.float32, cache)
    base.encoders_to("cpu")
    gpu = record.device_name(dev)
    latent = 8 if args.tiny else None  # the tiny check at 64 px, as the other benches' (the model's own: 512 px)
    report = {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
              "tiny": args.tiny, "rows": {}, "profiles": {}, "failed": {}}
    path = args.out / f"profile_step_{gpu.replace(' ', '_')}.json"
    if args.merge and path.is_file():  # earlier rows keep the date they were measured
        old = json.loads(path.read_text())
        report["rows"] = {k: {**v, "measured": v.get("measured", old["date"])} for k, v in old["rows"].items()}
        report["profiles"] = old.get("profiles", {})
        report["failed"] = old.get("failed", {})
        report.update({k: v for k, v in old.items() if k not in report and k not in record.HEAD})

    def write():
        record.write(args.out, "profile_step", gpu, report)

    # a CPU check runs the eager rows: CUDA graphs, Inductor and FP8 are what the others measure
    tiny_rows = {"gemm_peak_bf16", "eval_default", "eval_flops", "eval_vae_decode",
                 *(f"train_{k}_{v}" for k in args.packs for v in ("bmm", "dense", "no_lora"))}

    def row(name, fn):
        if args.only and not any(name == o or (o.endswith("*") and name.startswith(o[:-1])) for o in args.only):
            return
        if args.tiny and name not in tiny_rows:
            return
        print(f"measuring {name}", flush=True)
        try:
            report["rows"][name] = {**fn(), "measured": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                    "torch": torch.__version__}
            report["failed"].pop(name, None)
            print(f"  {report['rows'][name]}", flush=True)
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            report["rows"].pop(name, None)
            report["profiles"].pop(name, None)
            report["failed"][name] = f"{type(exc).__name__}: {exc}"[:1500]
            print(f"  FAILED {report['failed'][name][:300]}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
        write()

    row("gemm_peak_bf16", (lambda: gemm_peak(256, 2, "cpu")) if args.tiny else gemm_peak)

    # ---- evaluation: the UNet forward at the scoring batch, no grad
    ce = conditioning(base, args.eval_batch, dev, latent)
    base.unet.eval()

    def eval_row(backend: str, compiled: tuple[str, ...] = (), channels_last: bool = False, batch: int = 0,
                 profile: str | None = None, fuse_qkv: bool = False, inductor: dict | None = None):
        c = conditioning(base, batch, dev, latent) if batch else ce
        n = batch or args.eval_batch
        fwd = lambda: unet_call(base, c)
        if channels_last:
            base.unet.to(memory_format=torch.channels_last)
            c["x"] = c["x"].contiguous(memory_format=torch.channels_last)
        if fuse_qkv:  # one projection for q, k, v (self-attention) and for k, v (cross-attention)
            base.unet.fuse_qkv_projections()
        blocks = compiling.compile_blocks(base.unet, compiled) if compiled else []
        try:
            with sdpa(backend), torch.no_grad(), torch._inductor.config.patch(inductor or {}):
                tic = time.perf_counter()
                fwd()
                record.sync(dev)
                first = time.perf_counter() - tic
                ms = timed(fwd, args.iters, graph=False)
                flops = 6.76e12 * n  # UNet forward at 1024 px (FlopCounterMode, anchors)
                out = {"ms_per_forward": ms, "samples": n, "tflops": flops / ms / 1e9,
                       "s_per_image_at_30_steps_cfg": 30 * ms / 1000 / (n / 2), "first_call_s": first}
                if profile:
                    report["profiles"][profile] = kernel_table(fwd)
            return out
        finally:
            compiling.uncompile(blocks)
            torch._dynamo.reset()
            if fuse_qkv:  # diffusers puts the processors back but keeps the fused weights: drop them too
                base.unet.unfuse_qkv_projections()
                for m in base.unet.modules():
                    for name in ("to_qkv", "to_kv"):
                        if hasattr(m, name):
                            delattr(m, name)
                    if getattr(m, "fused_projections", False):
                        m.fused_projections = False
            if channels_last:
                base.unet.to(memory_format=torch.contiguous_format)
                c["x"] = c["x"].contiguous()

    blocks, regions = compiling.BLOCKS, compiling.BLOCKS + ("ResnetBlock2D", "Downsample2D", "Upsample2D")
    outer = compiling.GENERATION
    for name, kw in (("eval_default", {}), ("eval_default_channels_last", dict(channels_last=True)),
                     ("eval_default_compiled", dict(compiled=blocks)),
                     ("eval_default_compiled_regions", dict(compiled=regions)),
                     ("eval_default_compiled_outer", dict(compiled=outer)),  # the GENERATION regions
                     ("eval_default_compiled_regions_channels_last", dict(compiled=regions, channels_last=True)),
                     ("eval_default_compiled_outer_channels_last", dict(compiled=outer, channels_last=True)),
                     # diffusers' fused projections (one GEMM for q, k, v), and Inductor's settings of the
                     # torch.compile tutorials for SDXL (1x1 convolutions as GEMMs, tuned pointwise kernels), then
                     # Triton GEMM templates autotuned against cuBLAS (max-autotune, without CUDA graphs)
                     ("eval_default_compiled_outer_fused_qkv", dict(compiled=outer, fuse_qkv=True)),
                     ("eval_default_compiled_outer_tuned", dict(compiled=outer, inductor=INDUCTOR_TUNED)),
                     ("eval_default_compiled_outer_max_autotune", dict(compiled=outer, inductor=INDUCTOR_AUTOTUNE))):
        row(name, lambda kw=kw, name=name: eval_row("default", profile=name, **kw))

    def fp8_row():
        """For comparison only (the targets are bf16, and FP8 changes the images): torchao's dynamic FP8
        quantization of the UNet's Linear layers (row-wise scales), on a copy, with the GENERATION regions compiled."""
        import copy

        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        plain, base.unet = base.unet, copy.deepcopy(base.unet)
        try:
            quantize_(base.unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            return eval_row("default", compiled=outer, profile="eval_fp8_compiled_outer")
        finally:
            base.unet = plain
            torch.cuda.empty_cache()

    row("eval_fp8_compiled_outer", fp8_row)
    row("eval_default_compiled_batch16", lambda: eval_row("default", blocks, batch=16))
    row("eval_default_compiled_batch24", lambda: eval_row("default", blocks, batch=24))
    row("eval_flops", lambda: flops_by_family(lambda: unet_call(base, ce)))

    # the VAE decode and the conversion to PIL images, per image (a sweep decodes 4 at a time)
    def decode_row(channels_last: bool = False):
        from evaluation.generate import decode

        base.encoders_to(dev, text=False)
        pipe = base.pipeline()
        if channels_last:
            pipe.vae.to(memory_format=torch.channels_last)
        size = latent or base.unet.config.sample_size  # latents of the model's own resolution (1024 px: 128)
        lat = torch.randn(4, 4, size, size, device=dev, dtype=base.weight_dtype)
        tic = time.perf_counter()
        decode(pipe, lat)
        record.sync(dev)
        first = time.perf_counter() - tic
        tic = time.perf_counter()
        for _ in range(2):
            decode(pipe, lat)
        record.sync(dev)
        s = (time.perf_counter() - tic) / 8
        pipe.vae.to(memory_format=torch.contiguous_format)
        base.encoders_to("cpu")
        return {"s_per_image_decode_and_pil": s, "first_call_s": first}

    row("eval_vae_decode", decode_row)
    row("eval_vae_decode_channels_last", lambda: decode_row(channels_last=True))
    ce.clear()  # its GPU tensors go before training

    # ---- training: K trials packed, forward + backward captured as a CUDA graph
    for k in args.packs:
        ct = conditioning(base, k, dev, latent)
        pack = packed.Pack(base, [LoraSettings(rank=4) for _ in range(k)])
        params = pack.params()
        for p in params:
            torch.nn.init.normal_(p, std=0.01)
        base.unet.train()
        autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda, cache_enabled=False)  # noqa: E731

        def step(x_grad: bool = False):
            x = ct["x"].detach().requires_grad_() if x_grad else ct["x"]
            with autocast():
                pred = unet_call(base, ct, x)
            pred.float().pow(2).mean().backward()

        def train_row(compiled: tuple[str, ...], variant: str, io: bool = False, profile: str | None = None):
            blocks = compiling.compile_blocks(base.unet, compiled) if compiled else []
            blocks += compiling.compile_io(base.unet) if io else []
            stack = contextlib.ExitStack()
            if variant == "bmm":
                stack.enter_context(packed.per_trial())
            if variant == "no_lora":  # the base's floor: the wrappers out of the UNet while the pack stays
                stack.enter_context(adapters_out(pack))
            fn = (lambda: step(x_grad=True)) if variant == "no_lora" else step
            try:
                tic = time.perf_counter()
                fn()
                record.sync(dev)
                first = time.perf_counter() - tic
                for p in params:
                    p.grad = None
                ms = timed(fn, args.iters, graph=cuda)
                if profile:
                    report["profiles"][profile] = kernel_table(fn)
                return {"trials": k, "ms_per_step_fwd_bwd": ms, "tflops": 13.5e12 * k / ms / 1e9,
                        "first_call_s": first}
            finally:
                stack.close()
                for p in params:
                    p.grad = None
                compiling.uncompile(blocks)
                torch._dynamo.reset()

        resnets = compiling.BLOCKS + ("ResnetBlock2D", "Downsample2D", "Upsample2D")
        plan = [(f"train_{k}_{v}{'_compiled' if c else ''}", dict(compiled=c, variant=v))
                for c in ((), compiling.BLOCKS) for v in ("bmm", "dense", "no_lora")]
        plan += [(f"train_{k}_dense_compiled_regions", dict(compiled=compiling.GENERATION, variant="dense")),
                 # the frozen base alone with everything compiled that regional compilation reaches: the floor any
                 # LoRA kernel adds to
                 (f"train_{k}_no_lora_compiled_regions", dict(compiled=compiling.GENERATION, variant="no_lora")),
                 (f"train_{k}_dense_compiled_io", dict(compiled=compiling.BLOCKS, variant="dense", io=True)),
                 (f"train_{k}_dense_compiled_resnets_io", dict(compiled=resnets, variant="dense", io=True))]
        for name, kw in plan:
            row(name, lambda kw=kw, name=name: train_row(profile=None if kw["variant"] == "no_lora" else name, **kw))
        pack.remove()
        base.unet.eval()
    write()
    for name, r in report["rows"].items():
        print(f"{name:40s} {r}")
    for name, p in report["profiles"].items():
        print(f"{name}: {p['gpu_ms']:.1f} GPU ms: " + ", ".join(f"{f} {ms:.1f}" for f, ms in p["families_ms"].items()))
    print(f"written {path}")


if __name__ == "__main__":
    main()
