"""Every bench/ script's tiny mode, run as a user runs it (`python bench/<script>.py --tiny`, a subprocess on the
CPU): an API change breaks a test here instead of a published number. Each test asserts on the JSON the script
wrote: its rows and counts, the device it names and the commit it measured."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sweep import PROJECT_DIR

BENCH = PROJECT_DIR / "bench"
HEAD = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True).stdout.strip()
# one thread per process: on a shared CPU torch's thread pool only spins against other processes' (tests/conftest.py)
ENV = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def bench(script: str, tmp: Path, cache: Path, *args: str, tiny: bool = True) -> subprocess.CompletedProcess:
    """bench/<script>.py --tiny, its JSON in tmp/out, its work in tmp/work, the session's tiny model cache."""
    cmd = [sys.executable, str(BENCH / f"{script}.py"), *(["--tiny"] if tiny else []), "--out", str(tmp / "out"),
           "--cache", str(cache), "--work", str(tmp / "work"), *args]
    return subprocess.run(cmd, cwd=PROJECT_DIR, env=ENV, capture_output=True, text=True, timeout=900)


def written(script: str, proc: subprocess.CompletedProcess, tmp: Path) -> dict:
    """The one JSON the run wrote, after the checks every results file passes: it names itself, the CPU and the
    commit measured (a tiny run never writes into bench/results/)."""
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    [path] = (tmp / "out").iterdir()
    assert path.name == f"{script}_cpu.json"
    report = json.loads(path.read_text())
    assert report["benchmark"] == script and report["device"] == "cpu" and report["tiny"] is True
    assert report["commit"] == HEAD and isinstance(report["dirty"], bool)
    assert f"written {path}" in proc.stdout
    return report


def test_a_tiny_run_refuses_to_write_into_bench_results(tmp_path, cache_dir):
    p = bench("evaluation", tmp_path, cache_dir, "--out", str(BENCH / "results"))
    assert p.returncode != 0
    assert f"--out {BENCH / 'results'}: a --tiny run checks the script, it measures nothing" in p.stderr
    assert not (tmp_path / "work" / "cache").exists()  # refused before any model was built


def test_reference_timer_times_each_optimizer_step_of_a_script_it_runs_unchanged(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import sys, torch\nm = torch.nn.Linear(4, 1)\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
                      "for _ in range(int(sys.argv[1])):\n    m(torch.randn(8, 4)).pow(2).mean().backward()\n"
                      "    opt.step()\n    opt.zero_grad()\n")
    out = tmp_path / "reference.json"
    p = subprocess.run([sys.executable, str(BENCH / "reference_timer.py"), str(out), str(script), "5"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["steps"] == 5 and len(rec["step_seconds"]) == 4 and all(s > 0 for s in rec["step_seconds"])
    assert rec["device"] == "cpu" and rec["peak_memory_gib"] is None and rec["script"] == str(script)
    assert rec["commit"] == HEAD and isinstance(rec["dirty"], bool)


def test_evaluation_bench(tmp_path, cache_dir):
    report = written("evaluation", bench("evaluation", tmp_path, cache_dir), tmp_path)
    assert [(r["batch"], r["images"]) for r in report["generation"]] == [(1, 2), (2, 2)]
    assert all(r["s_per_image"] > 0 and r["peak_memory_gib"] is None for r in report["generation"])
    full = report["full_evaluate"]
    assert full["checkpoints"] == 1 and full["images"] == 2 * (2 + 1)  # baseline + checkpoint; 2 prompts + drift
    assert set(full["metrics"]) == {"baseline", "step-000002"} and full["seconds"] > 0


def test_single_trial_bench(tmp_path, cache_dir):
    report = written("single_trial", bench("single_trial", tmp_path, cache_dir), tmp_path)
    assert report["failed"] == {}
    rows = report["results"]
    assert set(rows) == {"ours", "ours_packed_2", "low_memory_prior_preservation", "eval_batch_1", "eval_batch_2",
                         "eval_batch_2_lora_merged", "eval_batch_2_lora_peft", "ours_peft"}
    assert rows["ours"]["trials"] == 1 and rows["ours_packed_2"]["trials"] == 2 and rows["ours"]["steps"] == 4
    assert rows["ours_peft"]["pack_size"] == 0 and rows["ours_packed_2"]["pack_size"] == 2
    assert all(r["ms_per_step"] > 0 for r in rows.values())
    assert set(report["ratios"]) == {f"{n}_images_per_s_vs_batch_1" for n in rows if n.startswith("eval_")}


def test_profile_step_bench(tmp_path, cache_dir):
    report = written("profile_step", bench("profile_step", tmp_path, cache_dir), tmp_path)
    assert report["failed"] == {}
    assert set(report["rows"]) == {"gemm_peak_bf16", "eval_default", "eval_flops", "eval_vae_decode",
                                   "train_2_bmm", "train_2_dense", "train_2_no_lora"}
    assert report["rows"]["eval_default"]["samples"] == 2 and report["rows"]["train_2_dense"]["trials"] == 2
    assert report["rows"]["eval_flops"]["tflop_total"] > 0
    # the CPU profiler's operators sorted into families, for the rows that profile
    assert set(report["profiles"]) == {"eval_default", "train_2_bmm", "train_2_dense"}
    assert all(p["gpu_ms"] > 0 and p["top"] for p in report["profiles"].values())


def test_sweep_phases_add_up_each_trials_records_and_leave_the_rest_to_overhead(tmp_path):
    """A pack of two trials shares its steps (each result.json holds the pack's 12 s: 12 s of training, not 24);
    every evaluate call's seconds add up (live scoring and the race's rounds alike); overhead is the wall clock's
    rest, and never below 0 when trials ran side by side."""
    import time

    from common import timeline
    from sweep.phases import read_phases, sweep_phases, write_phases

    timeline.reset()
    timeline.add("loading the base model", 2.5)
    timeline.once("starting up", 7.0)
    timeline.once("starting up", 99.0)  # once: the first job's start only

    seconds = [{"baseline": {"images": 6, "generate_s": 3.0, "score_s": 1.0},
                "step-000002": {"images": 12, "generate_s": 6.0, "score_s": 2.0, "wait_s": 0.5}},
               {"step-000002": {"images": 6, "generate_s": 3.0, "score_s": 1.0}}]
    for i, spent in enumerate(seconds):
        trial = tmp_path / f"{i}_lr={i}"
        (trial / "eval").mkdir(parents=True)
        (trial / "result.json").write_text(json.dumps({"name": f"lr={i}", "pack_size": 2, "train_seconds": 12.0}))
        (trial / "eval" / "metrics.json").write_text(json.dumps({"seconds": spent}))
    phases = sweep_phases(tmp_path, time.time() - 60)
    assert (phases.training_s, phases.generating_s, phases.scoring_s, phases.waiting_s) == (12.0, 12.0, 4.0, 0.5)
    assert phases.images == 24 and phases.trials == 2 and 60 <= phases.wall_s < 120
    assert math.isclose(phases.overhead_s, phases.wall_s - 24.5)  # scoring ran beside: only its waiting counts
    assert [name for name, _, _ in phases.metrics()] == ["time_training_s", "time_generating_s", "time_scoring_s",
                                                         "time_waiting_s", "time_overhead_s", "time_wall_s"]
    # what the overhead is made of: the parts this process timed, largest first, on the console and in report.md
    assert phases.overhead_parts == {"starting up": {"seconds": 7.0, "count": 1},
                                     "loading the base model": {"seconds": 2.5, "count": 1}}
    assert "overhead's largest parts: starting up 7.0 s, loading the base model 2.5 s" in phases.text()
    assert "| loading the base model | 2.5 | 1 |" in phases.markdown()
    write_phases(tmp_path, phases)
    timeline.reset()
    rebuilt = sweep_phases(tmp_path, None)  # a report rebuilt later keeps the wall clock the sweep's end measured
    assert rebuilt.wall_s == phases.wall_s and read_phases(tmp_path)["overhead_s"] == phases.overhead_s
    assert rebuilt.overhead_parts == phases.overhead_parts  # and what its overhead was made of
    assert sweep_phases(tmp_path, time.time() - 10).overhead_s == 0.0  # side by side: more work than wall clock


def phases_agree(phases: dict, wall: float) -> None:
    """The sweep's own record of where its time went: every phase measured, and no more than the command took."""
    assert phases["training_s"] > 0 and phases["generating_s"] > 0 and phases["scoring_s"] > 0
    assert phases["waiting_s"] >= 0 and phases["overhead_s"] >= 0
    busy = sum(phases[k] for k in ("training_s", "generating_s", "waiting_s", "overhead_s"))  # scoring: beside
    assert math.isclose(busy, phases["wall_s"], rel_tol=1e-6)
    assert phases["wall_s"] <= wall  # the sweep's clock starts with its process and stops before the report


@pytest.mark.slow
def test_study_grid_bench(tmp_path, cache_dir):
    report = written("study_grid", bench("study_grid", tmp_path, cache_dir), tmp_path)
    assert report["trials"] == 3 and report["checkpoints_scored"] == 3
    assert [t["status"] for t in report["per_trial"]] == ["finished"] * 3
    assert report["evaluation"]["images"] == 4 * (5 + 1)  # baseline + 3 checkpoints; 5 prompts + drift, 1 seed
    phases_agree(report["phases"], report["wall_s"])


@pytest.mark.slow
def test_multi_gpu_bench_on_cpu_processes(tmp_path, cache_dir):
    report = written("multi_gpu", bench("multi_gpu", tmp_path, cache_dir), tmp_path)
    [run] = report["runs"]
    assert run["gpus"] == [] and run["pack_size"] == 2 and run["exit_status"] == 0 and run["nvidia_smi"] == {}
    assert [(t["status"], t["pack_size_trained"]) for t in run["per_trial"]] == [("finished", 2)] * 2
    assert report["trials"] == 2 and report["speedup"] == {"[] pack_size=2": 1.0}
    assert report["speedup_per_gpu"] == {"[] pack_size=2": 1.0} and run["gpus_used"] == 1
    # the baseline's images and each trial's checkpoint's (5 prompts, eval.seeds=[0], one checkpoint per trial)
    assert run["images"] == len(list(tmp_path.rglob("eval/images/*/*.png"))) > 5


@pytest.mark.slow
def test_racing_bench_race_and_full_protocol(tmp_path, cache_dir):
    """Every phase: the raced sweep through bench/synthetic_scores.py (its wrapper of evaluate()'s internals once
    broke on an added argument) twice (cold, then warm where generation compiled: the CPU never compiles, so both
    are cold here), then the full protocol on the same checkpoints in process."""
    report = written("racing", bench("racing", tmp_path, cache_dir, "--phase", "all"), tmp_path)
    race, full = report["race"], report["full"]
    assert [r["compile_cache"] for r in report["races"]] == ["cold", "cold"] and report["races_decide_alike"]
    assert [r["target_min"] for r in report["races"]] == [6.0, 6.0] and not race["generation_compiled"]
    assert report["races"][-1]["sweep"] == Path(race["sweep"]).name and len(report["all_races"]) == 2
    assert race["trials"] == 3 and race["checkpoints"] == 3
    assert race["race"]["checkpoints"] == 3 and race["race"]["full_protocol_images"] == 3 * (5 + 1) * 2
    assert 0 < race["images"] <= full["images"] and full["evaluate_calls"] == 1 + 3
    assert report["agreement"]["race"] == race["champion"] and race["champion"] is not None
    phases_agree(race["phases"], race["wall_s"])
    assert math.isclose(race["generate_s"], race["phases"]["generating_s"])  # the sweep's record, not remeasured
    # the synthetic scores replaced the real ones (random weights find no face): the baseline's cells are the
    # values bench/synthetic_scores.py makes for them
    from bench.synthetic_scores import cell_values

    record = [json.loads(m.read_text()) for m in Path(race["sweep"]).glob("*/eval/metrics.json")]
    [baseline] = [r["cells"]["baseline"] for r in record if "baseline" in r["cells"]]  # the first trial scored it
    prompts = {k: v for k, v in baseline.items() if re.fullmatch(r"p\d+_s\d+", k)}
    assert len(prompts) == 5 * 2  # the study's prompts x 2 seeds
    for key, cell in prompts.items():
        p, s = (int(n) for n in key[1:].split("_s"))
        assert math.isclose(cell["clip_t"], cell_values(None, p, s)["clip_t"]), key
