"""The planner through the command line: step counts under a constant schedule cost one training per learning rate,
and every requested trial is still a trial of its own (result, MLflow run, selection candidate)."""
import json
import os
import subprocess
import sys

from dataclasses import replace

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from sweep.config import SweepConfig
from sweep.plan import make_plan
from sweep.results import collect, load_config
from sweep.selection import select

from .services import kill_a_batch_mid_pack, trial_runs


SCALE = ["train.checkpoint_every=10", "data.resolution=64", "progress=false"]


def short(name):
    """A trial's name without the demo-scale overrides every trial shares."""
    return name and name.replace("data.resolution=64,", "").replace(",train.checkpoint_every=10", "")


def sweep(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cwd.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([sys.executable, "-m", "sweep", *args, *SCALE], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _job(lr: float, steps: int, schedule: str = "constant"):
    conf = SweepConfig()
    conf.train = replace(conf.train, lr=lr, max_steps=steps, checkpoint_every=10, lr_scheduler=schedule)
    return f"lr={lr:g},steps={steps}", conf


def test_a_training_and_the_trials_it_serves_are_never_split_over_launcher_batches():
    """9 jobs, batches of at most 2 trainings: each learning rate's 3 step counts in one batch, and a decaying
    schedule's trials each a training of their own (all of them in one pack when they share a batch)."""
    jobs = [_job(lr, steps) for steps in (10, 20, 30) for lr in (1e-4, 1e-5, 5e-4)]  # Hydra's order: steps outer
    plan = make_plan(jobs, 2)
    assert plan.trials == 9 and plan.trainings == 3
    assert [[jobs[i][0] for i in b] for b in plan.batches] == [
        ["lr=0.0001,steps=10", "lr=1e-05,steps=10", "lr=0.0001,steps=20", "lr=1e-05,steps=20", "lr=0.0001,steps=30",
         "lr=1e-05,steps=30"], ["lr=0.0005,steps=10", "lr=0.0005,steps=20", "lr=0.0005,steps=30"]]
    assert [(t.trial, [n for n, _ in t.serves]) for p in plan.packs for t in p.trainings] == [
        ("lr=0.0001,steps=30", ["lr=0.0001,steps=20", "lr=0.0001,steps=10"]),
        ("lr=1e-05,steps=30", ["lr=1e-05,steps=20", "lr=1e-05,steps=10"]),
        ("lr=0.0005,steps=30", ["lr=0.0005,steps=20", "lr=0.0005,steps=10"])]
    cosine = make_plan([_job(1e-4, steps, "cosine") for steps in (10, 20, 30)], 8)
    assert cosine.trainings == 3 and len(cosine.packs) == 1 and cosine.packs[0].steps == 30
    assert "plan: 3 trial(s) in 3 training(s), 1 pack(s)" in cosine.text()



def test_trials_finished_in_an_earlier_run_are_listed_not_planned():
    """A re-run (resume=true): finished trials train nothing and cost nothing; they ride in the first batch (where
    they report their results); a shorter trial whose longer one finished trains on its own training."""
    jobs = [_job(lr, steps) for steps in (10, 20, 30) for lr in (1e-4, 1e-5, 5e-4)]
    done = frozenset(i for i, (name, _) in enumerate(jobs)
                     if name.startswith("lr=0.0001,") or name == "lr=1e-05,steps=30")
    plan = make_plan(jobs, 2, done)
    assert plan.finished == ["lr=0.0001,steps=10", "lr=0.0001,steps=20", "lr=0.0001,steps=30", "lr=1e-05,steps=30"]
    assert [(t.trial, [n for n, _ in t.serves]) for p in plan.packs for t in p.trainings] == [
        ("lr=1e-05,steps=20", ["lr=1e-05,steps=10"]),
        ("lr=0.0005,steps=30", ["lr=0.0005,steps=20", "lr=0.0005,steps=10"])]
    assert sorted(i for b in plan.batches for i in b) == list(range(9)) and done <= set(plan.batches[0])
    assert "plan: 9 trial(s) in 2 training(s), 1 pack(s); 4 already finished" in plan.text()
    everything = make_plan(jobs, 2, frozenset(range(9)))
    assert everything.trainings == 0 and everything.batches == [list(range(9))] and everything.seconds() is None
    assert "estimated training time" not in everything.text()


def test_batches_go_to_the_worker_that_frees_up_first_by_their_estimated_time():
    """Six trials of three lengths in batches of two trainings on two GPUs: the plan places each batch where the
    launcher's queue will (the first GPU to free up), from the measured step time, and states both the GPU time
    and the time side by side."""
    jobs = [_job(lr, steps, "cosine") for lr, steps in ((1e-4, 300), (2e-4, 300), (1e-4, 100), (2e-4, 100),
                                                        (1e-4, 50), (2e-4, 50))]
    plan = make_plan(jobs, 2)
    assert [len(b) for b in plan.batches] == [2, 2, 2]
    for p in plan.packs:
        p.ms_per_step, p.source = 100.0, "measured"
    plan.place_on(["GPU 0", "GPU 1"])
    # batch 1 (30 s) on GPU 0, batch 2 (10 s) on GPU 1, batch 3 (5 s) on GPU 1 again, which is free at 10 s
    assert plan.where == {1: "GPU 0", 2: "GPU 1", 3: "GPU 1"}
    assert plan.seconds() == 45 and plan.wall == 30
    text = plan.text()
    assert "pack 3 (batch 3, GPU 1): 2 training(s), 50 steps" in text
    assert "estimated training time: 45 s, ~30 s from start to end side by side" in text
    assert "3 batches, 2 at a time (GPU 0, GPU 1)" in text
    assert [p["where"] for p in plan.as_dict()["packs"]] == ["GPU 0", "GPU 1", "GPU 1"]
    plan.label(lambda b: f"Ray task {b}")
    assert plan.where == {1: "Ray task 1", 2: "Ray task 2", 3: "Ray task 3"}

@pytest.mark.slow
def test_step_counts_under_a_constant_schedule_train_once_per_learning_rate(tmp_path):
    p = sweep("-m", "lr=1e-4,5e-4", "steps=20,30", cwd=tmp_path / "grid")
    log = p.stdout + p.stderr
    [folder] = (tmp_path / "grid" / "outputs" / "sweeps").iterdir()
    results = {short(d.name.split("_", 1)[1]): json.loads((d / "result.json").read_text())
               for d in folder.iterdir() if (d / "result.json").is_file()}
    assert sorted(results) == ["lr=0.0001,steps=20", "lr=0.0001,steps=30", "lr=0.0005,steps=20",
                               "lr=0.0005,steps=30"]
    assert all(r["status"] == "finished" for r in results.values())
    # 2 trainings (one pass of the base for both), 4 trials
    assert {k: short(r["training"]) for k, r in results.items()} == {
        "lr=0.0001,steps=20": "lr=0.0001,steps=30", "lr=0.0001,steps=30": "lr=0.0001,steps=30",
        "lr=0.0005,steps=20": "lr=0.0005,steps=30", "lr=0.0005,steps=30": "lr=0.0005,steps=30"}
    assert {r["pack_size"] for r in results.values()} == {2}
    assert log.count("the first steps of trial") == 2, log[-3000:]
    short20 = next(d for d in folder.iterdir() if "lr=0.0001,steps=20" in d.name)
    assert sorted(c.name for c in (short20 / "checkpoints").iterdir()) == ["step-000010", "step-000020"]
    assert [json.loads(ln)["step"] for ln in (short20 / "train_log.jsonl").read_text().splitlines()] == \
        list(range(1, 21))
    # its checkpoints are scored without generating again: borrowed from the 30-step trial's identical files
    assert set(json.loads((short20 / "eval" / "metrics.json").read_text())["borrowed"]) == \
        {"step-000010", "step-000020"}

    # the 20-step trial's LoRA is a lone 20-step run's: each weight within 1% of the most it can move (lr x steps;
    # packed and lone matmuls round differently, ~1e-7, and AdamW carries that into the weights)
    sweep("lr=1e-4", "steps=20", cwd=tmp_path / "lone")
    [lone] = (tmp_path / "lone" / "outputs" / "runs").iterdir()
    mine = load_file(short20 / "checkpoints" / "step-000020" / "pytorch_lora_weights.safetensors")
    alone = load_file(lone / "checkpoints" / "step-000020" / "pytorch_lora_weights.safetensors")
    assert mine.keys() == alone.keys()
    assert max(float((mine[k] - alone[k]).abs().max()) for k in mine) < 0.01 * 1e-4 * 20

    # its MLflow run holds its own 20 steps and names the training it came from
    conf = load_config(folder)
    client = MlflowClient(f"sqlite:///{tmp_path / 'grid' / 'mlruns' / 'mlflow.db'}")
    [run] = [r for r in client.search_runs(
        [client.get_experiment_by_name(conf.tracking.experiment).experiment_id])
        if "lr=0.0001,steps=20" in r.data.tags.get("trial_folder", "")]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, 21))
    assert short(run.data.tags["training"]) == "lr=0.0001,steps=30"

    # twins (the same file under two trials) are one candidate: the runner-up is another LoRA
    candidates, baseline, _ = collect(folder)
    assert len(candidates) == 10  # 2 + 3 checkpoints per learning rate
    sel = select(candidates, baseline, conf.selection)
    assert sel.champion and sel.runner_up and sel.champion.weights != sel.runner_up.weights
    assert sum("the same weights as" in why for why in sel.rejected.values()) == 4

    # the plan of the next sweep on this model and resolution states its training time from these step times
    ckpts = len(list((tmp_path / "grid" / "outputs").glob("sweeps/*/*/checkpoints/*")))
    p = sweep("-m", "lr=1e-4,5e-4,1e-5", "steps=20,30", "plan_only=true", cwd=tmp_path / "grid")
    out = p.stdout + p.stderr
    assert "plan: 6 trial(s) in 3 training(s), 1 pack(s)" in out, out[-3000:]
    assert "ms/step (scaled from packs of 2 of tiny at 64 px)" in out and "estimated training time: " in out
    assert len(list((tmp_path / "grid" / "outputs").glob("sweeps/*/*/checkpoints/*"))) == ckpts  # nothing trained
    # the first sweep again with resume=true: its plan lists its four trials as finished and costs nothing (a newer
    # folder holding only the plan of the same command is not the sweep to continue)
    sweep("-m", "lr=1e-4,5e-4", "steps=20,30", "plan_only=true", cwd=tmp_path / "grid")
    p = sweep("-m", "lr=1e-4,5e-4", "steps=20,30", "resume=true", "plan_only=true", cwd=tmp_path / "grid")
    assert f"continuing the sweep in outputs/sweeps/{folder.name}" in p.stdout + p.stderr
    out = p.stdout + p.stderr
    assert "plan: 4 trial(s) in 0 training(s), 0 pack(s); 4 already finished" in out, out[-3000:]
    assert "estimated training time" not in out


SIX = "lr=1e-4,2e-4,3e-4,4e-4,5e-4,6e-4"


@pytest.mark.slow
def test_two_worker_processes_train_two_packs_of_three_at_once_and_a_killed_one_resumes(tmp_path):
    """hydra/launcher=processes with two workers and pack_size=3: six compatible trials are two batches, each a pack
    of three in a process of its own, both at once. One process is killed mid-pack: a new one runs its batch again,
    its three trials resume from their checkpoints into their own MLflow runs, the other batch is untouched."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sweep", "-m", SIX, "steps=6", "train.checkpoint_every=2",
                             "data.resolution=64", "progress=false", "hydra/launcher=processes",
                             "hydra.launcher.n_workers=2", "hydra.launcher.pack_size=3"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    killed, pid = kill_a_batch_mid_pack(proc, tmp_path, client, size=3)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-5000:]
    assert "2 batches, 2 at a time (process 1, process 2)" in out and "pack 2 (batch 2, process 2)" in out
    assert f"batch {killed}: its process ended abnormally" in out and "retry 1 of 1" in out
    [folder] = (tmp_path / "outputs" / "sweeps").iterdir()
    plan = json.loads((folder / "plan.json").read_text())
    assert [(p["batch"], p["where"], len(p["trainings"])) for p in plan["packs"]] == [
        (1, "process 1", 3), (2, "process 2", 3)]
    children = trial_runs(client, "sdxl-lora-sweep")
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children)  # one run per trial
    by_batch = {b: [r for r in children if r.data.tags["batch"] == b] for b in ("1", "2")}
    assert {b: len(rs) for b, rs in by_batch.items()} == {"1": 3, "2": 3}
    spans = {b: (min(r.info.start_time for r in rs), max(r.info.end_time for r in rs)) for b, rs in by_batch.items()}
    assert spans["1"][0] < spans["2"][1] and spans["2"][0] < spans["1"][1]  # the two packs trained at once
    for b, rs in by_batch.items():
        results = [json.loads((folder / r.data.tags["trial_folder"] / "result.json").read_text()) for r in rs]
        assert all(res["status"] == "finished" and res["pack_size"] == 3 for res in results)
        if b == killed:  # each resumed from its own checkpoint, in a new process
            assert all(res["resumed_from"] in (2, 4) for res in results), results
            assert all(int(r.data.tags["worker"].rsplit(":", 1)[1]) != pid for r in rs)
        else:
            assert all(not res.get("resumed_from") for res in results)
