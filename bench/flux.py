"""FLUX.1 LoRA training and generation speed (issue 34): the FLUX.1-dev architecture with random weights, 1024 px,
bf16, on one GPU, against diffusers' `train_dreambooth_lora_flux.py` in the same run.

Parts, most wanted first; each is written to OUT/flux_bench.json the moment it is measured, so a run cut short (a
device's time limit) keeps every part it finished, and a part that fails is recorded with its error:
  ours        this trainer, one trial: LoRA rank 16 on the script's 12 targets, batch 1, 512 T5 tokens, bf16:
              ms/step (median of steps 3-13), peak GiB, TFLOP per step (torch.utils.flop_counter), achieved TFLOP/s
              and its share of the card's dense bf16 peak (H100/H200 SXM: 989) and of a measured bf16 GEMM
  reference   the script, unchanged, through bench/reference_timer.py: the same settings (rank 16, 1024 px, batch 1,
              bf16, 512 T5 tokens, its defaults otherwise: guidance 3.5, uniform timesteps, AdamW, VAE encode every
              step), 15 steps, no validation, no checkpoint; the folder it trains on is the one ours loads
  packs       the largest pack that fits at 1024 px (2, then 3) and a pack at 512 px (1024 image tokens) against one
              trial at 512 px
  low_memory  conf/preset/flux_24gb.yaml's settings (the transformer's weights in float8: model.quantize, gradient
              checkpointing, one trial per pass, 8-bit AdamW where bitsandbytes is installed): peak GiB
  generation  s/image through the family's FluxPipeline (the trainer's loaded base, as a sweep scores): timed at 2
              and 8 steps, extrapolated to the model card's 28
  compiled    one trial with train.compile=true (its compiling reported as setup_s)
  fp8         one trial on the float8 transformer (model.quantize=float8: float8 GEMMs forward) without gradient
              checkpointing: what float8 buys in speed
  fp8_compiled  the same, compiled
  eager       one trial with train.cuda_graphs=false (the "ours" row captures its step as a CUDA graph)
  attention   each SDPA kernel (cuDNN, flash, memory-efficient) on one FLUX.1 attention at 1024 px (24 heads x
              4608 tokens x 128, bf16), forward and backward, eager and replayed from a CUDA graph, each in a process
              of its own (a kernel that faults must not take the bench down): ms, or the error. The trainer's
              families.flux.TRAINING_ATTENTION leaves out a kernel that fails here
  cudnn, cudnn_compiled  one trial (eager steps in a CUDA graph; compiled) with cuDNN's fused attention allowed
              first, which TRAINING_ATTENTION leaves out: whether FLUX trains with it, and what it would buy
Each training row says whether its step ran as a captured CUDA graph (cuda_graph: captured, off, or the failure).

On the device (the project's carried wheels first: diffusers, omegaconf, hydra-core and antlr4-python3-runtime 4.9.3,
built with `pip wheel`, its only release being a source one; BENCH_COMMIT names the commit measured, as a device's
copy of the tree may carry a stale .git; the script is diffusers' examples/dreambooth/train_dreambooth_lora_flux.py,
unchanged since 0.39; FLUX_BENCH_CUDNN_SDP=0 turns cuDNN's fused attention off in both, which the script needs on
an H100 with torch 2.11: with it, its first backward failed with CUBLAS_STATUS_EXECUTION_FAILED):
    python -m pip install -q --no-index --find-links .whl --no-deps .whl/*.whl \\
      && python -m pip install -q --no-deps --no-build-isolation -e . \\
      && BENCH_COMMIT=<git rev-parse HEAD> FLUX_BENCH_CUDNN_SDP=0 PYTHONUNBUFFERED=1 \\
         python bench/flux.py --reference .cache/reference/train_dreambooth_lora_flux.py --out $OUT
(--budget-s, 540 by default, skips the parts that would start too late; every part takes ~9 minutes on an H100
with the model's build, about a 10-minute device call's limit: start it in the background (setsid) and poll for
OUT/flux_bench.json, or pick fewer with --parts.)

Tiny, on the CPU (model=flux_tiny at 64 px, every part a CPU runs; tests/test_bench_flux.py):
    python bench/flux.py --tiny --out /tmp/flux-bench [--reference .cache/reference/train_dreambooth_lora_flux.py]
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as dt
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.nn.attention import SDPBackend

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.files import write_atomic
from families.flux import GUIDANCE_SCALE, TARGET_MODULES
from trainer import DataConfig, LoraSettings, ModelConfig, TrainConfig, TrialSpec, train
from trainer.models import release_models, resolve_source

PROMPT = "a photo of sks man"
RANK = 16
PARTS = ("ours", "reference", "compiled", "low_memory", "fp8", "fp8_compiled", "attention", "eager", "packs",
         "generation", "cudnn", "cudnn_compiled")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM data sheets (no sparsity)
TRIAL_PARTS = ("ours", "compiled", "eager", "fp8", "fp8_compiled")  # one trial at full resolution, different means
STOP_ENV = "REFERENCE_TIMER_STOP_AFTER"  # bench/reference_timer.py: exit once the timed steps are done

@dataclass(frozen=True)
class Scale:
    """What a mode measures: the GPU's FLUX.1-dev at 1024 px, or the tiny model on a CPU."""

    model: ModelConfig
    device: str
    precision: str  # train.mixed_precision (the script's --mixed_precision)
    resolution: int
    small_resolution: int  # the packs part's "512 px" row
    steps: int  # ours: ms/step is the median of steps 3..steps
    reference_steps: int
    packs: tuple[int, ...]  # tried in order at `resolution` while they fit
    small_pack: int
    generation_steps: tuple[int, int]  # timed at both; per step and fixed cost from the difference
    budget_s: float | None
    estimates_s: dict[str, float] = field(default_factory=dict)  # a part starts only with this much time left


def model_config(name: str) -> ModelConfig:
    """conf/model/<name>.yaml as the trainer's ModelConfig (Hydra's defaults list, the LoRA group, left out)."""
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    raw.pop("defaults", None)
    return ModelConfig(**raw)


def gpu_scale(budget_s: float) -> Scale:
    """model=flux_dev_random: FLUX.1-dev's published configs with random weights (families/flux.py builds it on the
    GPU in bf16, offline tokenizers, T5 padded to 512 tokens)."""
    return Scale(model_config("flux_dev_random"), "cuda", "bf16", 1024, 512, 13, 15, (2, 3), 4, (2, 8), budget_s,
                 {"ours": 60, "reference": 120, "packs": 60, "low_memory": 45, "generation": 45, "compiled": 90,
                  "eager": 45, "attention": 30, "fp8": 45, "fp8_compiled": 90, "cudnn": 45, "cudnn_compiled": 90})


def tiny_scale() -> Scale:
    return Scale(model_config("flux_tiny"), "cpu", "no", 64, 32, 4, 5, (2, 3), 4, (1, 3), None)


# ---- the run: its settings, the report it writes as it goes --------------------------------------------------------


class Skip(Exception):
    """A part that cannot run here (the message says why); recorded under "skipped", not "failed"."""


@dataclass
class Bench:
    scale: Scale
    args: argparse.Namespace
    work: Path
    started: float = field(default_factory=time.perf_counter)
    report: dict = field(default_factory=dict)
    photos: Path | None = None
    model_dir: str = ""
    _flops: dict = field(default_factory=dict)

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    @property
    def on_cuda(self) -> bool:
        return self.scale.device == "cuda"

    def remaining(self) -> float:
        budget = self.scale.budget_s
        return float("inf") if budget is None else budget - (time.perf_counter() - self.started)

    def record(self, part: str, row: dict | None = None, failed: str | None = None, skipped: str | None = None) -> None:
        """A part's result (or partial result, as it grows), its failure or why it was skipped, written at once."""
        for key, value in (("results", row), ("failed", failed), ("skipped", skipped)):
            section = self.report.setdefault(key, {})
            if value is None:
                section.pop(part, None)
            else:
                section[part] = value
        self.write()

    def write(self) -> Path:
        self.report["ratios"] = ratios(self.report.get("results", {}))
        self.report["targets"] = targets(self.report.get("results", {}))
        self.report["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.args.out.mkdir(parents=True, exist_ok=True)
        path = self.args.out / "flux_bench.json"
        write_atomic(path, json.dumps(self.report, indent=2, default=str))
        return path

    # ---- arithmetic per step

    def tflop_per_sample(self, resolution: int) -> dict:
        """The transformer's forward and backward for one sample with the trial's LoRA (rank 16, 12 targets),
        counted by torch.utils.flop_counter on the meta device (no memory, no GPU time). The meta device runs
        attention as its math decomposition (2 matmuls forward, 4 backward); a fused kernel's backward also
        recomputes the scores, which torch's counter counts on the GPU (5): `tflop` adds that, so it matches
        issue 34's probe (171.6 TFLOP per 1024-px sample), `tflop_model` leaves it out."""
        if resolution not in self._flops:
            self._flops[resolution] = count_flops(self.scale.model.architecture["transformer"], resolution,
                                                  text_tokens(self.scale))
        return self._flops[resolution]


def text_tokens(scale: Scale) -> int:
    return min(512, int(scale.model.architecture.get("max_sequence_length", 512)))


def count_flops(transformer_cfg: dict, resolution: int, n_text: int) -> dict:
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from families.flux import transformer_from_config

    with torch.device("meta"):
        tr = transformer_from_config(transformer_cfg).to(torch.bfloat16)
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(TARGET_MODULES)))
    n_img = (resolution // 16) ** 2
    meta = {"device": "meta", "dtype": torch.bfloat16}
    inputs = {"hidden_states": torch.zeros(1, n_img, transformer_cfg["in_channels"], **meta),
              "timestep": torch.ones(1, device="meta"), "guidance": torch.ones(1, device="meta"),
              "pooled_projections": torch.zeros(1, transformer_cfg["pooled_projection_dim"], **meta),
              "encoder_hidden_states": torch.zeros(1, n_text, transformer_cfg["joint_attention_dim"], **meta),
              "txt_ids": torch.zeros(n_text, 3, device="meta"), "img_ids": torch.zeros(n_img, 3, device="meta")}
    with FlopCounterMode(display=False) as counter:
        out = tr(**inputs, return_dict=False)[0]
        attention_fwd = counter.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0)
        out.float().square().mean().backward()
    total = counter.get_total_flops()
    return {"tflop": (total + attention_fwd / 2) / 1e12, "tflop_model": total / 1e12,
            "image_tokens": n_img, "text_tokens": n_text}


def gemm_tflops() -> float:
    """The card's bf16 rate on one large GEMM (8192^3), a ceiling real layers reach at best."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - tic) / 1e12


def random_photos(folder: Path, size: int, n: int = 5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=95)
    return folder


def free(base_too: bool) -> None:
    """What a part left on the GPU, and with `base_too` the trainer's loaded base as well (the script's process
    needs the whole card); our parts share the base as a sweep's trainer and evaluation do."""
    from evaluation import generate as gen

    gen._PIPES.clear()
    if base_too:
        release_models()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- parts -----------------------------------------------------------------------------------------------------------


class GraphLog(logging.Handler):
    """The trainer's word on its step's CUDA graph while a part trains (trainer/packed.py warns when a capture
    fails and the pack trains eagerly): a row says which of the two it measured."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.failures: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "CUDA graph capture failed" in record.getMessage():
            self.failures.append(record.getMessage()[:300])

    def __enter__(self) -> GraphLog:
        logging.getLogger("trainer").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("trainer").removeHandler(self)

    def state(self, asked: bool) -> str:
        if not asked:
            return "off"
        return f"capture failed, eager steps: {self.failures[0]}" if self.failures else "captured"


def ours(b: Bench, pack: int = 1, resolution: int | None = None, model: ModelConfig | None = None,
         **train_kw) -> dict:
    """This trainer on `pack` trials (different LRs and seeds) in one pass of the base per step (on the scale's
    model, or `model`)."""
    s = b.scale
    res = resolution or s.resolution
    data = DataConfig(instance_dir=str(b.photos), instance_prompt=PROMPT, resolution=res, min_images=1)
    train_kw.setdefault("compile", False)  # each row says what it measures; "auto" would depend on the step count
    train_kw.setdefault("cuda_graphs", os.environ.get("FLUX_BENCH_CUDA_GRAPHS", "1") == "1")
    if os.environ.get("FLUX_BENCH_CUDNN_SDP") == "0":  # cuDNN's fused attention failed FLUX's backward on torch 2.11
        torch.backends.cuda.enable_cudnn_sdp(False)
    specs = [TrialSpec(f"bench{k}", LoraSettings(rank=RANK, target_modules=list(TARGET_MODULES)),
                       TrainConfig(lr=1e-4 * (k + 1), max_steps=s.steps, checkpoint_every=s.steps,
                                   mixed_precision=s.precision, device=s.device, resume=False, seed=k, **train_kw),
                       Path(tempfile.mkdtemp(dir=b.work)))
             for k in range(pack)]
    tic = time.perf_counter()
    with GraphLog() as graph:
        results = train(specs, model or s.model, data, b.cache, progress=False)
    bad = [f"{r.name}: {r.status} {r.error or ''}" for r in results if r.status != "finished"]
    if bad:
        raise RuntimeError("; ".join(bad))
    r = results[0]
    flops = b.tflop_per_sample(res)
    per_pass = r.pack_size  # a pack that did not fit was split: each step is one pass of pack_size trials
    tflop_step = flops["tflop"] * per_pass
    row = {"trials": pack, "pack_size": r.pack_size, "resolution": res, "image_tokens": flops["image_tokens"],
           "text_tokens": flops["text_tokens"], "ms_per_step": r.ms_per_step,
           "samples_per_s": per_pass * 1000 / r.ms_per_step, "peak_memory_gib": r.peak_memory_gib,
           "peak_memory_gib_per_trial": r.peak_memory_gib / per_pass if r.peak_memory_gib else None,
           "cuda_graph": graph.state(train_kw["cuda_graphs"] and b.on_cuda),
           "steps": s.steps, "setup_s": r.setup_seconds, "wall_s_incl_setup": time.perf_counter() - tic,
           "tflop_per_step": tflop_step, "tflop_per_step_model": flops["tflop_model"] * per_pass,
           "achieved_tflops": tflop_step / (r.ms_per_step / 1000),
           "settings": {"rank": RANK, "lr": [t.train.lr for t in specs], **{k: str(v) for k, v in train_kw.items()}}}
    peak = b.report.get("device_peak_bf16_tflops")
    gemm = b.report.get("measured_bf16_gemm_tflops")
    row["pct_of_peak_bf16"] = 100 * row["achieved_tflops"] / peak if peak else None
    row["pct_of_measured_gemm"] = 100 * row["achieved_tflops"] / gemm if gemm else None
    return row


def part_ours(b: Bench) -> dict:
    return ours(b)


def part_packs(b: Bench) -> dict:
    """The largest pack that fits at full resolution (a pack that does not fit is split by the trainer: its
    pack_size shows it), then one trial and a pack at the small resolution, each row written as it is measured."""
    s, out = b.scale, {}
    fits = 1
    for k in s.packs:
        row = ours(b, pack=k)
        out[f"pack_{k}_{s.resolution}px"] = row
        if row["pack_size"] < k:
            out["note"] = f"a pack of {k} did not fit at {s.resolution} px: the trainer split it (pack_size " \
                          f"{row['pack_size']})"
            break
        fits = k
        out["largest_pack_that_fits"] = fits
        b.record("packs", out)
        if b.remaining() < s.estimates_s.get("packs", 0) / 2:
            out["note"] = "larger packs not tried: the time budget"
            break
    out["largest_pack_that_fits"] = fits
    b.record("packs", out)
    small = s.small_resolution
    one = ours(b, resolution=small)
    out[f"one_trial_{small}px"] = one
    b.record("packs", out)
    many = ours(b, pack=s.small_pack, resolution=small)
    out[f"pack_{s.small_pack}_{small}px"] = many
    out[f"pack_{s.small_pack}_{small}px_samples_per_s_vs_one_trial"] = many["samples_per_s"] / one["samples_per_s"]
    return out


def part_low_memory(b: Bench) -> dict:
    """preset=flux_24gb's model and train settings (the quantised transformer: model.quantize), as the sweep would
    apply them; 8-bit AdamW only where bitsandbytes is installed and on CUDA (the preset's own rule: without it the
    sweep stops and says so), else AdamW, noted."""
    preset = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "preset" / "flux_24gb.yaml"))
    known = {f.name for f in fields(TrainConfig)}
    applied = {k: v for k, v in (preset.get("train") or {}).items() if k in known}
    model = {k: v for k, v in (preset.get("model") or {}).items() if k in {f.name for f in fields(ModelConfig)}}
    note = None
    if applied.get("optimizer") == "adamw8bit" and not (b.on_cuda and importlib.util.find_spec("bitsandbytes")):
        applied["optimizer"] = "adamw"
        note = "bitsandbytes is not installed here (or no CUDA): AdamW instead of the preset's 8-bit AdamW"
    row = ours(b, model=replace(b.scale.model, **model), **applied)
    return {**row, "preset": "flux_24gb", "applied": applied, "model": model, "note": note}


def part_generation(b: Bench) -> dict:
    """s/image through the family's FluxPipeline over the trainer's loaded base (as a sweep scores), batch 1,
    guidance 3.5 (dev's embedded guidance, no CFG pass), VAE decode included, prompt embeddings cached as a sweep
    caches them: a warm-up, then timed at two step counts; per step and the fixed cost from their difference."""
    from evaluation import EvalConfig
    from evaluation import generate as gen
    from trainer.models import shared_pipeline

    s = b.scale
    pipe = shared_pipeline(s.model, s.device, s.precision, b.cache)
    few, many = s.generation_steps

    def timed(steps: int) -> float:
        cfg = EvalConfig(prompts=[PROMPT], seeds=[0], num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE,
                         resolution=s.resolution, batch_size=1, device=s.device, face_backend="none",
                         prior_prompt=None)
        sync()
        tic = time.perf_counter()
        gen.generate(pipe, None, [PROMPT], cfg, f"{steps} steps")
        sync()
        return time.perf_counter() - tic

    warm = timed(few)
    if b.on_cuda:
        torch.cuda.reset_peak_memory_stats()
    t_few, t_many = timed(few), timed(many)
    per_step = (t_many - t_few) / (many - few)
    fixed = max(0.0, t_few - few * per_step)
    return {"resolution": s.resolution, "batch": 1, "guidance_scale": GUIDANCE_SCALE, "warm_up_s": warm,
            f"s_per_image_{few}_steps": t_few, f"s_per_image_{many}_steps": t_many, "s_per_step": per_step,
            "fixed_s_per_image": fixed, "s_per_image_28_steps": fixed + 28 * per_step,
            "scaled": f"28-step time = fixed + 28 x per step, from the {few}- and {many}-step times",
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if b.on_cuda else None}


def cuda_to_compile(b: Bench) -> None:
    if not b.on_cuda:
        raise Skip("compiling on a CPU takes minutes and says nothing of the GPU: measured on CUDA only")


def part_compiled(b: Bench) -> dict:
    cuda_to_compile(b)
    return ours(b, compile=True)


def part_cudnn(b: Bench, compile: bool = False) -> dict:
    """One trial with cuDNN's fused attention allowed first (families.flux.TRAINING_ATTENTION leaves it out: it
    failed FLUX's backward once on an H100): whether it trains, and what it would buy."""
    from families import flux as fam

    if not b.on_cuda:
        raise Skip("cuDNN's attention is a CUDA kernel")
    kept = fam.TRAINING_ATTENTION
    fam.TRAINING_ATTENTION = (SDPBackend.CUDNN_ATTENTION, *kept)
    torch._dynamo.reset()  # a compiled block traced under the other kernels must not be reused
    try:
        return {**ours(b, compile=compile), "attention": [k.name for k in fam.TRAINING_ATTENTION]}
    finally:
        fam.TRAINING_ATTENTION = kept
        torch._dynamo.reset()


def part_fp8(b: Bench, compile: bool = False) -> dict:
    if compile:
        cuda_to_compile(b)
    return {**ours(b, model=replace(b.scale.model, quantize="float8"), compile=compile), "model": {"quantize": "float8"}}


def part_eager(b: Bench) -> dict:
    return ours(b, cuda_graphs=False)


ATTENTION_PROBE = """
import json, sys, time, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
backend, heads, tokens, dim = getattr(SDPBackend, sys.argv[1]), *map(int, sys.argv[2:5])
q, k, v = (torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
grad = torch.randn(1, heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
def step():
    with sdpa_kernel([backend]):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    q.grad = k.grad = v.grad = None
    out.backward(grad)
def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - tic) / n
row = {"eager_ms_fwd_bwd": timed(step)}
stream = torch.cuda.Stream()
stream.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(stream):
    for _ in range(3):
        step()
torch.cuda.current_stream().wait_stream(stream)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    step()
row["graph_ms_fwd_bwd"] = timed(graph.replay)
print("ROW " + json.dumps(row))
"""


def part_attention(b: Bench) -> dict:
    """Each SDPA kernel on one FLUX.1 attention at the bench's resolution, in a process of its own."""
    if not b.on_cuda:
        raise Skip("the SDPA kernels probed here (cuDNN, flash, memory-efficient) are CUDA kernels")
    cfg = b.scale.model.architecture["transformer"]
    heads, dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    tokens = (b.scale.resolution // 16) ** 2 + text_tokens(b.scale)
    out = {"shape": [1, heads, tokens, dim], "dtype": "bfloat16"}
    flops = 4 * tokens * tokens * dim * heads * (1 + 2.5)  # forward 2 matmuls, backward 5
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            proc = subprocess.run([sys.executable, "-c", ATTENTION_PROBE, name, str(heads), str(tokens), str(dim)],
                                  check=False, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            out[name] = {"error": "no answer in 120 s"}
            continue
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if proc.returncode != 0 or line is None:
            out[name] = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}
            continue
        row = json.loads(line[4:])
        row["tflops_eager"] = flops / row["eager_ms_fwd_bwd"] / 1e9
        out[name] = row
        b.record("attention", out)
    from families.flux import TRAINING_ATTENTION
    out["training_uses"] = [k.name for k in TRAINING_ATTENTION]
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- the script --------------------------------------------------------------------------------------------------


def missing_imports(script: Path) -> list[str]:
    """Top-level modules the script imports unconditionally that are not installed (wandb, prodigyopt,
    bitsandbytes and datasets sit behind flags and are not needed here)."""
    tree = ast.parse(script.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def runnable_copy(script: Path, work: Path) -> tuple[Path, str | None]:
    """The script itself, or, where its check_min_version asks for a newer diffusers than the one installed (a dev
    version on main), a copy in `work` with only that line disabled; the note says which."""
    import diffusers
    from packaging.version import Version

    text = script.read_text()
    m = re.search(r'^check_min_version\("([^"]+)"\)', text, re.MULTILINE)
    if not m or Version(m[1]) <= Version(diffusers.__version__):
        return script, None
    copy = work / script.name
    copy.write_text(text.replace(m[0], f"pass  # bench/flux.py: {m[0]} disabled", 1))
    return copy, f"check_min_version({m[1]!r}) > installed {diffusers.__version__}: ran a copy with that line disabled"


def part_reference(b: Bench) -> dict:
    s, script = b.scale, b.args.reference
    if script is None:
        raise Skip("no --reference: pass diffusers' examples/dreambooth/train_dreambooth_lora_flux.py "
                   "(e.g. .cache/reference/train_dreambooth_lora_flux.py)")
    if not script.is_file():
        raise Skip(f"--reference {script} does not exist")
    missing = missing_imports(script)
    if missing:
        raise Skip(f"the script imports {', '.join(missing)}, not installed here")
    run_script, note = runnable_copy(script, b.work)
    out_json = b.work / "reference.json"
    out_json.unlink(missing_ok=True)
    out_dir = b.work / "reference_out"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "bench" / "reference_timer.py"), str(out_json), str(run_script),
           f"--pretrained_model_name_or_path={b.model_dir}", f"--instance_data_dir={b.photos}",
           f"--instance_prompt={PROMPT}", f"--output_dir={out_dir}", f"--resolution={s.resolution}",
           "--train_batch_size=1", "--gradient_accumulation_steps=1", "--learning_rate=1e-4",
           "--lr_scheduler=constant", "--lr_warmup_steps=0", f"--max_train_steps={s.reference_steps}",
           f"--mixed_precision={s.precision}", f"--rank={RANK}", "--seed=0",
           f"--max_sequence_length={text_tokens(s)}", f"--checkpointing_steps={s.reference_steps * 10}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", STOP_ENV: str(s.reference_steps)}
    timeout = None if s.budget_s is None else max(30.0, b.remaining() - 10)
    tic = time.perf_counter()
    cut = None
    try:
        proc = subprocess.run(cmd, check=False, env=env, cwd=b.work, timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the script exited with {proc.returncode}: {proc.stderr[-3000:]}")
    except subprocess.TimeoutExpired:
        cut = f"stopped at the time budget after {timeout:.0f} s"
    rec = json.loads(out_json.read_text()) if out_json.is_file() else {"steps": 0, "step_seconds": []}
    gaps = rec["step_seconds"][2:] or rec["step_seconds"]
    if not gaps:
        raise RuntimeError(f"the script timed no step ({cut or 'no timer output'})")
    ms = 1000 * statistics.median(gaps)
    return {"resolution": s.resolution, "ms_per_step": ms, "samples_per_s": 1000 / ms,
            "peak_memory_gib": rec["peak_memory_gib"],
            "steps": rec["steps"], "wall_s_incl_load": time.perf_counter() - tic, "script": str(script),
            "patched": note, "cut_short": cut, "command": cmd[3:],
            "timed": "median of the gaps between optimizer steps, the first 3 steps excluded (the script syncs "
                     "every step: loss.item()); it stops after the timed steps (its final save and pipeline "
                     "reload are not timed)"}


def ratios(results: dict) -> dict:
    out = {}
    ref, mine = results.get("reference"), results.get("ours")
    if ref and mine:
        out["ours_speedup_vs_script"] = ref["ms_per_step"] / mine["ms_per_step"]
        out["ours_over_script_ms_per_step"] = mine["ms_per_step"] / ref["ms_per_step"]
        if ref.get("peak_memory_gib") and mine.get("peak_memory_gib"):
            out["ours_over_script_peak_memory"] = mine["peak_memory_gib"] / ref["peak_memory_gib"]
    for name in (*TRIAL_PARTS[1:], "low_memory", "cudnn", "cudnn_compiled"):
        if ref and results.get(name):
            out[f"{name}_speedup_vs_script"] = ref["ms_per_step"] / results[name]["ms_per_step"]
    for name, row in (results.get("packs") or {}).items() if ref else ():
        if isinstance(row, dict) and row.get("resolution") == ref["resolution"]:  # packs at the script's resolution
            out[f"{name}_samples_per_s_vs_script"] = row["samples_per_s"] / ref["samples_per_s"]
    return out


def targets(results: dict) -> dict:
    """Issue 34's targets against the fastest single trial measured (TRIAL_PARTS) and the preset's peak."""
    out = {}
    ref = results.get("reference")
    trials = {k: results[k] for k in TRIAL_PARTS if results.get(k)}
    if trials:
        name, best = min(trials.items(), key=lambda kv: kv[1]["ms_per_step"])
        if ref:
            speed = ref["ms_per_step"] / best["ms_per_step"]
            out["speed_vs_script"] = {"target": 1.5, "best": name, "value": speed, "met": speed >= 1.5}
        if best.get("pct_of_peak_bf16") is not None:
            pct = best["pct_of_peak_bf16"]
            out["pct_of_bf16_peak"] = {"target": 55.0, "best": name, "value": pct, "met": pct >= 55.0}
    low = results.get("low_memory")
    if low and low.get("peak_memory_gib") is not None:
        out["low_memory_peak_gib"] = {"target": 24.0, "value": low["peak_memory_gib"],
                                      "met": low["peak_memory_gib"] <= 24.0}
    return out


PART_FUNCS: dict[str, Callable[[Bench], dict]] = {
    "ours": part_ours, "reference": part_reference, "packs": part_packs, "low_memory": part_low_memory,
    "generation": part_generation, "compiled": part_compiled, "eager": part_eager, "attention": part_attention,
    "fp8": part_fp8, "fp8_compiled": lambda b: part_fp8(b, compile=True), "cudnn": part_cudnn,
    "cudnn_compiled": lambda b: part_cudnn(b, compile=True)}


# ---- main ----------------------------------------------------------------------------------------------------------


def commit() -> str:
    """The commit measured: $BENCH_COMMIT where set (a device's copy of the working tree can carry a stale .git),
    else git's HEAD."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   check=False, capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    return "unknown (no .git here and BENCH_COMMIT unset)"


def header(b: Bench) -> dict:
    import diffusers
    import peft
    import transformers

    s = b.scale
    device = torch.cuda.get_device_name() if b.on_cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                             f"{os.cpu_count()} cores)"
    return {
        "benchmark": "flux", "mode": "tiny" if b.args.tiny else "gpu",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": device,
        "device_peak_bf16_tflops": next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
        if b.on_cuda else None,
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "commit": commit(),
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FLUX_BENCH_")},
        "settings": {"model": s.model.name, "architecture": s.model.architecture, "precision": s.precision,
                     "resolution": s.resolution, "small_resolution": s.small_resolution, "batch_per_trial": 1,
                     "lora_rank": RANK, "lora_targets": list(TARGET_MODULES), "text_tokens": text_tokens(s),
                     "guidance_scale": GUIDANCE_SCALE, "steps": s.steps, "reference_steps": s.reference_steps,
                     "packs_tried": list(s.packs), "small_pack": s.small_pack,
                     "generation_steps": list(s.generation_steps), "budget_s": s.budget_s,
                     "parts": b.args.parts, "photos": "5 random 1024x1024 JPEGs" if b.on_cuda else
                     f"5 random {s.resolution}x{s.resolution} JPEGs",
                     "ms_per_step": "median of a run's steps, the first 2 (3 for the script) excluded; ours captures "
                                    "its step as a CUDA graph on the first step (setup_s)",
                     "memory": "CUDA allocator peak (torch.cuda.max_memory_allocated)"},
        "results": {}, "failed": {}, "skipped": {},
    }


def prepare(b: Bench) -> None:
    """The model folder (built once, with random weights) and the photos."""
    s = b.scale
    b.photos = random_photos(b.work / "photos", s.resolution)
    tic = time.perf_counter()
    b.model_dir = resolve_source(s.model, b.cache)  # built once into the cache (on the GPU where there is one)
    b.report["model"] = {"folder": b.model_dir, "build_or_reuse_s": time.perf_counter() - tic}
    if b.on_cuda:
        b.report["measured_bf16_gemm_tflops"] = gemm_tflops()
    b.write()


def run(b: Bench) -> None:
    prepare(b)
    for name in b.args.parts:
        need = b.scale.estimates_s.get(name, 0)
        if b.remaining() < need:
            b.record(name, skipped=f"time budget: {b.remaining():.0f} s left, the part needs ~{need:.0f} s")
            continue
        print(f"[{time.perf_counter() - b.started:6.0f} s] measuring {name}", flush=True)
        free(base_too=name == "reference")
        try:
            b.record(name, PART_FUNCS[name](b))
        except Skip as exc:
            b.record(name, skipped=str(exc))
        except Exception as exc:  # noqa: BLE001 - one failing part must not lose the others
            traceback.print_exc()
            b.record(name, failed=f"{type(exc).__name__}: {exc}"[:3000])
        print(json.dumps({name: b.report["results"].get(name) or b.report["failed"].get(name)
                          or b.report["skipped"].get(name)}, default=str)[:2000], flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for flux_bench.json (written as parts finish)")
    ap.add_argument("--reference", type=Path, help="diffusers' examples/dreambooth/train_dreambooth_lora_flux.py")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts, in this order")
    ap.add_argument("--tiny", action="store_true", help="model=flux_tiny at 64 px on the CPU (tests)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="GPU: parts that would start with less than their usual time left are skipped (540: a "
                         "10-minute device call with the install before it)")
    ap.add_argument("--work", type=Path, help="model folder, photos, caches (default: a folder under /tmp)")
    args = ap.parse_args(argv)
    if args.reference is not None:  # the script runs with the work folder as its current directory
        args.reference = args.reference.resolve()
    if not args.tiny and not torch.cuda.is_available():
        print("bench/flux.py measures FLUX.1-dev on a CUDA GPU; --tiny runs the tiny model on the CPU",
              file=sys.stderr)
        return 2
    scale = tiny_scale() if args.tiny else gpu_scale(args.budget_s)
    work = args.work or Path(tempfile.gettempdir()) / ("flux-bench-tiny" if args.tiny else "flux-bench")
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(scale, args, work)
    b.report = header(b)
    b.write()
    try:
        run(b)
    except Exception as exc:  # noqa: BLE001 - the model build failed: say so in the JSON as well
        traceback.print_exc()
        b.record("prepare", failed=f"{type(exc).__name__}: {exc}"[:3000])
        return 1
    path = b.write()
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
