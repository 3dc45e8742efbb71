"""What every benchmark's JSON says about itself, and the tiny mode every bench script has.

A results file names the commit it measured (`git rev-parse HEAD`, and whether the tree had uncommitted changes)
and the device, so a published number can be traced to the code that made it. `--tiny` runs a script on the CPU
with the tiny model (conf/model/tiny.yaml), a few steps at 64 px: tests/test_bench.py runs every script that way,
so an API change breaks a test instead of a published number. A tiny run never writes into bench/results/."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
HEAD = {"benchmark", "date", "commit", "dirty", "device", "torch"}  # what write() puts first in every file
TINY_HELP = ("a check of the script, not a measurement: the tiny model on the CPU, a few steps at 64 px; the JSON "
             "goes to --out (default: a new temporary folder), never to bench/results/")


def add_options(ap: argparse.ArgumentParser) -> None:
    """--out, --tiny and --cache, alike in every bench script."""
    ap.add_argument("--out", type=Path, default=None, help=f"folder for the JSON (default {RESULTS})")
    ap.add_argument("--tiny", action="store_true", help=TINY_HELP)
    ap.add_argument("--cache", type=Path, default=None,
                    help="model cache folder (default: under --work); tests share one tiny model through it")


def out_folder(args: argparse.Namespace, benchmark: str) -> Path:
    """Where the JSON goes: --out, else bench/results/ (a tiny run: a new temporary folder; never bench/results/,
    whose files are measurements)."""
    if not args.tiny:
        return args.out or RESULTS
    if args.out is None:
        return Path(tempfile.mkdtemp(prefix=f"bench-{benchmark}-"))
    if args.out.resolve().is_relative_to(RESULTS):
        sys.exit(f"--out {args.out}: a --tiny run checks the script, it measures nothing; give a folder outside "
                 f"{RESULTS} (or leave --out out: a temporary folder)")
    return args.out


def commit() -> dict:
    """The commit this checkout is at and whether tracked files differ from it (what was measured is then not
    exactly that commit); $BENCH_COMMIT where the copier names it (a copy on a GPU machine, whose .git may be
    older than its files), else "unknown" outside a git checkout."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True).stdout

    if os.environ.get("BENCH_COMMIT"):
        return {"commit": os.environ["BENCH_COMMIT"], "dirty": None}
    try:
        return {"commit": git("rev-parse", "HEAD").strip(),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def device_name(device: torch.device | str) -> str:
    """The accelerator's name as the results' file names use it ("NVIDIA H200"), or "cpu"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def write(out: Path, benchmark: str, device: str, report: dict) -> Path:
    """<out>/<benchmark>_<device>.json: the report after who measured what, where and when; written whole or not
    at all (a run cut short keeps the last complete file)."""
    from common.files import write_atomic

    head = {"benchmark": benchmark, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **commit(),
            "device": device, "torch": torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{benchmark}_{device.replace(' ', '_')}.json"
    write_atomic(path, json.dumps({**head, **report}, indent=2, default=str))
    return path


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a CPU has none), so that a clock read after it is the work's time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """The CUDA allocator's peak since the last reset_peak; None on a CPU (no allocator to ask)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
