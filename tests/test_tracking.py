"""The sweep end to end on CPU, read back through MLflow: runs, metrics, artifacts, registry, report, resume."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

pytestmark = pytest.mark.slow
SMALL = ["steps=4", "train.checkpoint_every=2", "data.resolution=64", "progress=false"]


def sweep(*args: str, cwd: Path, wait: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sweep", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def client(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def runs(c: MlflowClient):
    exp = c.get_experiment_by_name("sdxl-lora-sweep")
    every = c.search_runs([exp.experiment_id])
    parents = [r for r in every if r.data.tags.get("kind") == "sweep"]
    return parents, [r for r in every if "mlflow.parentRunId" in r.data.tags]


def test_demo_sweep_is_recorded_selected_registered_and_reported(tmp_path):
    p = sweep("-m", "lr=1e-4,1e-5,5e-4", *SMALL, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    c = client(tmp_path)
    [parent], children = runs(c)
    assert sorted(r.info.run_name for r in children) == ["lr=0.0001", "lr=0.0005", "lr=1e-05"]
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
        for name in ("clip_t", "clip_i", "face_detection_rate"):
            assert [m.step for m in c.get_metric_history(r.info.run_id, name)] == [2, 4]
        assert len(c.get_metric_history(r.info.run_id, "train_loss")) == 4
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"grids", "best_checkpoint", "result.json"} <= arts
        assert c.list_artifacts(r.info.run_id, "best_checkpoint")[0].path.endswith("pytorch_lora_weights.safetensors")
        assert {"lr", "train.lr", "lora.rank", "eval.num_inference_steps"} <= set(r.data.params)
        assert r.data.tags["device"] == "cpu" and r.data.tags["git_commit"]
    champ = c.get_model_version_by_alias("sdxl-lora-sks-woman", "champion")
    sweep_dir = Path(parent.data.tags["sweep_dir"])
    for r in children:  # every checkpoint's content hash is on its run, as its checkpoint.json has it
        [folder] = [d for d in sweep_dir.glob("*_*") if r.info.run_name in d.name.split("_", 1)[1].split(",")]
        for step in ("step-000002", "step-000004"):
            record = json.loads((folder / "checkpoints" / step / "checkpoint.json").read_text())
            assert r.data.tags[f"lora_sha256.{step}"] == record["lora_sha256"]
    champ_record = json.loads((Path(champ.tags["checkpoint"]) / "checkpoint.json").read_text())
    assert champ.tags["lora_sha256"] == champ_record["lora_sha256"]
    selection = json.loads((sweep_dir / "report" / "selection.json").read_text())
    assert champ.tags["checkpoint"] == selection["champion"]["checkpoint"]
    assert parent.info.status == "FINISHED" and parent.data.tags["champion.trial"] == selection["champion"]["trial"]
    _assert_shown_without_clicks(c, parent, children)
    assert parent.data.tags["registry.champion_version"] == str(champ.version)
    for f in ("report.md", "report.csv", "metrics_vs_step.png", "champion_vs_baseline.png", "selection.json"):
        assert (sweep_dir / "report" / f).is_file()
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "report")} >= {"report/report.md",
                                                                                 "report/metrics_vs_step.png"}
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlruns/mlflow.db" in p.stdout
    # a second sweep on the same protocol moves the alias only if it beats the champion; both numbers recorded
    p2 = sweep("-m", "lr=1e-5", *SMALL, cwd=tmp_path)
    assert p2.returncode == 0, p2.stdout[-3000:]
    parents, _ = runs(c)
    newest = max(parents, key=lambda r: r.info.start_time)
    assert newest.data.tags["challenger_objective"] and newest.data.tags["champion_objective"] == champ.tags["objective"]
    replaced = newest.data.tags["champion_replaced"] == "True"
    assert replaced == (float(newest.data.tags["challenger_objective"]) > float(champ.tags["objective"]))
    versions = c.search_model_versions("name='sdxl-lora-sks-woman'")
    assert len(versions) == 1 + replaced  # a best that does not beat the champion is not registered (issue 18)
    # the report rebuilds from the folder alone, and rebuilding ends no run again and logs nothing twice
    before = {r.info.run_id: (r.info.end_time, r.info.status, _histories(c, r)) for r in c.search_runs(
        [parent.info.experiment_id])}
    for f in (sweep_dir / "report").iterdir():
        f.unlink()
    assert subprocess.run([sys.executable, "-m", "sweep.report", str(sweep_dir)], cwd=tmp_path).returncode == 0
    assert (sweep_dir / "report" / "report.md").is_file()
    after = {r.info.run_id: (r.info.end_time, r.info.status, _histories(c, r)) for r in c.search_runs(
        [parent.info.experiment_id])}
    assert after == before
    _assert_strict_json(sweep_dir / "report" / "selection.json")
    assert "Champion" in c.get_run(parent.info.run_id).data.tags["mlflow.note.content"]


def _histories(c: MlflowClient, run) -> dict:
    """Every metric of a run with how many points it holds (a metric logged twice holds more)."""
    return {k: len(c.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}


def _assert_strict_json(path: Path) -> dict:
    """Parsed by a strict parser: NaN/Infinity tokens refused (they are not JSON)."""
    def refuse(token):
        raise AssertionError(f"{path.name} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _assert_shown_without_clicks(c: MlflowClient, parent, children) -> None:
    """What the MLflow UI shows without clicks: each trial's best checkpoint as best_* summary metrics beside the
    per-step series, its images by prompt slot at each step, the parent's description naming the champion and why;
    subject_token recorded as given; result.json and selection.json strict JSON; report.md with its images."""
    sweep_dir = Path(parent.data.tags["sweep_dir"])
    selection = _assert_strict_json(sweep_dir / "report" / "selection.json")
    objective = selection["objective"]
    with open(sweep_dir / "report" / "report.csv") as f:
        report_rows = {row["trial"]: row for row in csv.DictReader(f)}
    assert objective == "weighted_score"  # the demo's rule (conf/preset): its objective is not a scored metric
    for r in children:
        [folder] = [d for d in sweep_dir.iterdir() if (d / "result.json").is_file()
                    and json.loads((d / "result.json").read_text())["name"] == r.data.tags["trial"]]
        result = _assert_strict_json(folder / "result.json")
        best = int(r.data.tags["best_step"])
        m = r.data.metrics
        row = report_rows[r.info.run_name]  # one truth: the run's best_* are the report's, after racing
        assert m["best_step"] == best == int(row["best_step"])
        for k in ("face_similarity", "clip_t", "clip_i", "face_detection_rate"):
            if math.isnan(float(row[k])):  # NaN (no face found) is not logged
                assert f"best_{k}" not in m
            else:
                assert m[f"best_{k}"] == pytest.approx(float(row[k])), k
        assert m[f"best_{objective}"] == pytest.approx(float(row[f"best {objective}"]))
        round1 = result["metrics"][f"step-{int(m['round1_best_step']):06d}"]  # the trial's own first round
        assert m["round1_best_clip_t"] == pytest.approx(round1["clip_t"])
        assert {s.step for s in c.get_metric_history(r.info.run_id, objective)} == {2, 4}  # its series by step
        images = [Path(a.path).name for a in c.list_artifacts(r.info.run_id, "images")]
        for step in (2, 4):  # one image per prompt slot at each checkpoint's step
            for slot in ("p0", "p1"):
                assert any(n.startswith(f"{slot}+step+{step}+") and n.endswith(".png") for n in images), images
        assert r.data.params["data.subject_token"] == "sks"  # a prompt word, not a secret
        assert r.info.run_name == r.data.tags["trial"]  # the demo's values are short already
    champ = selection["champion"]
    note = parent.data.tags["mlflow.note.content"]
    assert f"Champion: `{champ['trial']}` at step {champ['step']}" in note
    # every trial's best side by side in the description: comparing the learning rates needs no clicks
    assert "| trial | lr | rank | best_step |" in note and "best weighted_score" in note
    assert all(f"| {r.data.tags['trial']} |" in note for r in children), note
    assert champ["checkpoint"] in note and selection["champion_lora"] in note
    assert f"get-artifact?path=report/metrics_vs_step.png&run_uuid={parent.info.run_id}" in note
    if selection["runner_up"]:
        assert "Runner-up" in note
    report_md = (sweep_dir / "report" / "report.md").read_text()
    assert "![metrics vs step](metrics_vs_step.png)" in report_md
    assert "![champion vs baseline](champion_vs_baseline.png)" in report_md
    assert selection["champion_lora"] in report_md and "weighted_score" in report_md
    assert not any(line.rstrip().endswith(":") for line in report_md.splitlines() if "Pareto" in line)


def test_run_names_are_the_swept_values_rounded_for_reading():
    from sweep.results import display_name

    assert display_name("lr=0.00018662266976517952") == "lr=0.000187"
    assert display_name("lora.rank=8,lr=1.8662266976517952e-04") == "lora.rank=8,lr=0.000187"
    assert display_name("3_lora.rank=16,lr=0.00012345678") == "3_lora.rank=16,lr=0.000123"
    for short in ("lr=1e-05", "lr=0.0001", "lr=100000000.0", "lora.rank=4", "x=[0.1234567,2]", "default"):
        assert display_name(short) == short


def test_only_real_secrets_are_masked():
    from sweep.redaction import redact

    assert redact("data.subject_token", "sks") == "sks" and redact("eval.subject_token", "sks") == "sks"
    for key in ("hf_token", "token", "auth_token", "MLFLOW_TRACKING_TOKEN", "db.password", "tracking.api_key",
                "aws.secret_access_key"):
        assert redact(key, "hunter2") == "***", key
    assert redact("tracking.uri", "postgresql://me:hunter2@db:5432/mlflow") == "postgresql://me:***@db:5432/mlflow"
    assert redact("hydra.overrides", "tracking.uri=http://u:pw@host/ x") == "tracking.uri=http://u:***@host/ x"


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    p = sweep("-m", "lr=1e-4,1e8", *SMALL, "train.checkpoint_every=1", cwd=tmp_path)
    assert p.returncode == 1  # the exit status says that a trial failed
    assert "1 trial(s) failed" in p.stdout + p.stderr
    _, children = runs(client(tmp_path))
    status = {r.info.run_name: (r.info.status, r.data.tags.get("failure_reason", "")) for r in children}
    assert status["lr=0.0001"][0] == "FINISHED"
    assert status["lr=100000000.0"][0] == "FAILED" and "loss became nan" in status["lr=100000000.0"][1]


@pytest.mark.parametrize("launcher", ["basic", "packed"])
def test_killed_sweep_resumes_without_retraining_and_picks_the_same_champion(tmp_path, launcher):
    """basic: trials one by one, killed during the second; the finished first is not touched again.
    packed (the default): both trials train as one pack, killed after their first checkpoints; both resume."""
    args = ["-m", "lr=1e-4,5e-4", "steps=6", "train.checkpoint_every=2", "data.resolution=64", "progress=false",
            f"hydra/launcher={launcher}"]
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    assert sweep(*args, cwd=ref_dir).returncode == 0
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    proc = sweep(*args, cwd=run_dir, wait=False)
    deadline = time.time() + 600
    wanted = ["1"] if launcher == "basic" else ["0", "1"]
    found = []
    while time.time() < deadline and proc.poll() is None:
        found = [p for n in wanted for p in run_dir.glob(f"outputs/sweeps/*/{n}_*/checkpoints/step-000002")]
        if len(found) == len(wanted):
            break
        time.sleep(0.2)
    assert len(found) == len(wanted), "the trials never reached their first checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [first] = run_dir.glob("outputs/sweeps/*/0_*")
    if launcher == "basic":
        stamp = (first / "result.json").stat().st_mtime_ns, (first / "train_log.jsonl").read_text()
    p = sweep(*args, "resume=true", cwd=run_dir)
    assert p.returncode == 0, p.stdout[-3000:]
    if launcher == "basic":
        assert "already finished" in p.stdout + p.stderr
        assert ((first / "result.json").stat().st_mtime_ns, (first / "train_log.jsonl").read_text()) == stamp
    else:
        assert "training 2 trial(s) of this batch together" in p.stdout + p.stderr
    assert len(list(run_dir.glob("outputs/sweeps/*"))) == 1  # the same sweep folder was continued
    for n in wanted:
        result = json.loads(next(run_dir.glob(f"outputs/sweeps/*/{n}_*/result.json")).read_text())
        assert result["resumed_from"] in (2, 4)
    parents, children = runs(client(run_dir))
    assert len(parents) == 1 and len(children) == 2  # the same parent run, no duplicate child runs
    sel = lambda d: json.loads(next(d.glob("outputs/sweeps/*/report/selection.json")).read_text())["champion"]
    a, b = sel(ref_dir), sel(run_dir)
    assert (a["trial"], a["step"], a["metrics"]) == (b["trial"], b["step"], b["metrics"])


def test_one_process_per_gpu_each_pinned_to_a_free_one(tmp_path):
    """hydra.launcher.gpus=[0,1] pack_size=2: four jobs in two batches, each batch in its own process pinned to a GPU
    taken from the free ones (the devices are only named here: the trials train on the CPU). Batches that overlap in
    time never share a GPU, both GPUs are used, and each MLflow run records its GPU and batch."""
    p = sweep("-m", "lr=1e-4,2e-4,3e-4,4e-4", *SMALL, "train.device=cpu", "hydra/launcher=processes",
              "hydra.launcher.gpus=[0,1]", "hydra.launcher.pack_size=2", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _, children = runs(client(tmp_path))
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["gpu"] for r in children} == {"0", "1"}
    assert sorted(r.data.tags["batch"] for r in children) == ["1", "1", "2", "2"]
    for b in ("1", "2"):  # a batch: one process, one GPU
        mine = [r for r in children if r.data.tags["batch"] == b]
        assert len({(r.data.tags["gpu"], r.data.tags["worker"]) for r in mine}) == 1
    spans = [(r.info.start_time, r.info.end_time, r.data.tags["gpu"], r.data.tags["batch"]) for r in children]
    for i, (s1, e1, g1, b1) in enumerate(spans):
        for s2, e2, g2, b2 in spans[i + 1:]:
            if b1 != b2 and s1 < e2 and s2 < e1:  # other batches that ran at the same time
                assert g1 != g2, spans
    assert "runs on GPU" in p.stdout + p.stderr


def test_bad_gpu_lists_are_refused():
    from sweep.launchers.process import ProcessPoolLauncher

    for gpus, needle in (([0, 0], "distinct"), ([], "distinct"), ([-1], ">= 0")):
        with pytest.raises(ValueError, match=needle):
            ProcessPoolLauncher(2, gpus)
    assert ProcessPoolLauncher(5, [3, 1]).n_workers == 2


@pytest.mark.parametrize("overrides, needle", [
    (["hydra.launcher.pack_size=0"], "hydra.launcher.pack_size=0: needs at least 1"),
    (["hydra/launcher=processes", "hydra.launcher.n_workers=0"], "hydra.launcher.n_workers=0: needs at least 1"),
    pytest.param(["cluster=gpus"], "hydra.launcher.gpus=auto (cluster=gpus sets it): torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
])
def test_a_bad_launcher_setting_is_refused_before_the_sweep_exists(overrides, needle, tmp_path):
    """Hydra builds the launcher after the sweep's callback has made its folder and MLflow run; the callback builds
    it first, so that a bad setting leaves neither behind (a parent run left RUNNING, an empty folder)."""
    p = sweep("-m", "lr=1e-4,5e-4", *SMALL, *overrides, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 2 and needle in out, out[-3000:]
    assert "Error in call to target" not in out and "Traceback" not in out
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlruns").exists()


def test_a_second_sweep_in_a_running_sweeps_folder_is_refused(tmp_path):
    folder = tmp_path / "outputs" / "sweeps" / "shared"
    args = ["-m", "lr=1e-4,5e-4", *SMALL, f"hydra.sweep.dir={folder}"]
    first = sweep(*args, cwd=tmp_path, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((folder / ".lock").is_file() and (folder / ".lock").read_text()):
        assert first.poll() is None, first.stdout.read()[-3000:]
        time.sleep(0.2)
    second = sweep(*args, cwd=tmp_path)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"in use by another sweep (pid {first.pid})" in second.stdout + second.stderr
    assert "Traceback" not in second.stdout + second.stderr
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    assert len(list(folder.glob("*/result.json"))) == 2  # the first sweep's work is whole
