"""The registry as a user lives it (CPU, demo scale, the commands as typed): a champion per subject, a person's pick
that stands, a challenger, an idempotent resume, and a promote or a sweep's end killed (kill -9, fault points of
common/faults.py) at each step and run again: folder, records, report and registry agree, nothing left over."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parents[1]
ONE_TRIAL = ["-m", "lr=5e-4", "steps=4", "train.checkpoint_every=2", "data.resolution=64", "progress=false",
             "tracking.system_metrics=false"]
A = "sdxl-lora-sks-woman"  # the demo's subject: token sks, class woman
FINALIZE_POINTS = ["finalize_exported", "registry_intent", "registry_version", "registry_alias",
                   "finalize_registered", "finalize_reported", "finalize_done"]


def run(module: str, *args: str, cwd: Path, faults: str = "", timeout: float = 900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SDXL_SWEEP_FAULTS", None)
    if faults:
        env["SDXL_SWEEP_FAULTS"] = faults
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(p) -> str:
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    return out


def client(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def sweeps(cwd: Path) -> list[Path]:
    return sorted((cwd / "outputs" / "sweeps").iterdir())


def selection(folder: Path) -> dict:
    return json.loads((folder / "report" / "selection.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def alias(c: MlflowClient, name: str, which: str = "champion"):
    try:
        return c.get_model_version_by_alias(name, which)
    except Exception:
        return None


def registry_state(c: MlflowClient) -> dict:
    """Every model's versions (with their LoRA hashes) and aliases: what a command must not change by accident."""
    return {m.name: (sorted((v.version, v.tags.get("lora_sha256")) for v in c.search_model_versions(f"name='{m.name}'")),
                     dict(m.aliases)) for m in c.search_registered_models()}


def ranked(folder: Path) -> list[str]:
    """The sweep's candidates, best first under its rule (report.csv lists each trial's best; selection.json has the
    champion and the runner-up)."""
    sel = selection(folder)
    return [f"{sel[k]['trial']}@{sel[k]['step']}" for k in ("champion", "runner_up") if sel.get(k)]


def assert_agree(cwd: Path, folder: Path, model: str) -> None:
    """selection.json's handed-on pick == promotion.json's latest (if any) == the registry alias's version's
    checkpoint == champion/'s file == the report's claim; every version has its tags; no temporary or old copies."""
    sel = selection(folder)
    chosen = sel["chosen"]
    promos = json.loads((folder / "promotion.json").read_text()) if (folder / "promotion.json").is_file() else []
    if promos:
        assert promos[-1]["checkpoint"] == chosen["checkpoint"] and promos[-1]["applied"] is True
    c = client(cwd)
    v = alias(c, model)
    assert v is not None and v.tags["checkpoint"] == chosen["checkpoint"]
    record = json.loads((Path(chosen["checkpoint"]) / "checkpoint.json").read_text())
    assert v.tags["lora_sha256"] == record["lora_sha256"] == sha256(folder / "champion" /
                                                                     "pytorch_lora_weights.safetensors")
    assert sel["registry"]["state"] == "done" and sel["registry"]["version"] == str(v.version)
    registry = json.loads((folder / "registry.json").read_text())
    assert registry["state"] == "done" and registry["version"] == str(v.version)
    report = (folder / "report" / "report.md").read_text()
    assert f"`{model}` version {v.version}, alias `champion`" in report
    if promos:
        assert f"The exported and registered champion is `{promos[-1]['key']}`" in report
    versions = c.search_model_versions(f"name='{model}'")
    assert all(x.tags.get("lora_sha256") and x.tags.get("checkpoint") for x in versions)  # none without its tags
    assert len({x.tags["lora_sha256"] + x.tags["lora_scale"] for x in versions}) == len(versions)  # none twice
    left = [p for p in folder.rglob("*") if ".tmp" in p.name or ".old" in p.name]
    assert not left, left


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """One demo sweep whose end is killed as the registry's alias moves, then resumed: the same end as one not
    killed (the registry finished, nothing twice)."""
    cwd = tmp_path_factory.mktemp("swept")
    p = run("sweep", *ONE_TRIAL, cwd=cwd, faults="registry_alias:*:1=kill")
    assert p.returncode == -9, (p.stdout + p.stderr)[-3000:]
    [folder] = sweeps(cwd)
    assert json.loads((folder / "registry.json").read_text())["state"] == "intent"
    ok(run("sweep", *ONE_TRIAL, "resume=true", cwd=cwd))
    assert sweeps(cwd) == [folder]
    assert_agree(cwd, folder, A)
    assert len(client(cwd).search_model_versions(f"name='{A}'")) == 1
    return cwd


@pytest.mark.parametrize("point", ["promote_recorded", *FINALIZE_POINTS])
def test_a_promote_killed_at_any_step_then_run_again_ends_in_agreement(swept, point):
    """Each point kills a promote of the checkpoint that does not hold the alias now; the same command again
    finishes it: one entry for it in promotion.json, the alias on it, champion/, records and report agreeing."""
    [folder] = sweeps(swept)
    c = client(swept)
    now = alias(c, A).tags["checkpoint"]
    other = next(k for k in ranked(folder) if not now.endswith(f"step-00000{k[-1]}"))
    before = len(json.loads((folder / "promotion.json").read_text())) if (folder / "promotion.json").is_file() else 0
    cmd = (other, f"reason=killed at {point}", "by=ana", f"sweep={folder}")
    p = run("sweep.promote", *cmd, cwd=swept, faults=f"{point}:*:1=kill")
    assert p.returncode == -9, (p.stdout + p.stderr)[-3000:]
    out = ok(run("sweep.promote", *cmd, cwd=swept))
    assert f"promoted {other}" in out
    promos = json.loads((folder / "promotion.json").read_text())
    assert len(promos) == before + 1 and promos[-1]["key"] == other  # recorded once, not once per attempt
    assert_agree(swept, folder, A)
    assert alias(c, A).tags["review.by"] == "ana" and alias(c, A).tags["review.reason"] == f"killed at {point}"


def test_two_promotes_at_once_keep_both_entries(swept):
    [folder] = sweeps(swept)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    before = len(json.loads((folder / "promotion.json").read_text()))
    procs = [subprocess.Popen([sys.executable, "-m", "sweep.promote", key, f"reason=at once {key}", f"sweep={folder}"],
                              cwd=swept, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for key in ranked(folder)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    promos = json.loads((folder / "promotion.json").read_text())
    assert sorted(p["key"] for p in promos[before:]) == sorted(ranked(folder))
    assert_agree(swept, folder, A)  # the later of the two holds the alias, everywhere


def test_journey_per_subject_champions_a_persons_pick_a_challenger_and_an_export(tmp_path):
    """Subject A swept, a person promotes the rule's other pick; subject B (other photos) swept; A's first sweep
    resumed (finished: nothing registered, no alias moved); A swept again: its best beats the person's pick under
    the rule, and gets `challenger`; the export into a folder holding a user's files."""
    c = client(tmp_path)
    ok(run("sweep", *ONE_TRIAL, cwd=tmp_path))
    [a1] = sweeps(tmp_path)
    rule, worst = ranked(a1)
    ok(run("sweep.promote", worst, "reason=the face looks right to me", "by=ana", cwd=tmp_path))
    pick = alias(c, A)
    assert pick.tags["trial"] + "@" + pick.tags["step"] == worst and pick.tags["review.by"] == "ana"

    photos_b = tmp_path / "photos_b"  # other photos under the same token and class: another subject's model
    photos_b.mkdir()
    for f in sorted((PROJECT / "assets" / "demo_subject").iterdir())[:4]:
        shutil.copy2(f, photos_b / f.name)
    ok(run("sweep", *ONE_TRIAL, f"data.instance_dir={photos_b}", cwd=tmp_path))
    b = next(d for d in sweeps(tmp_path) if d != a1)
    model_b = json.loads((b / "registry.json").read_text())["model"]
    assert model_b.startswith(A + "-") and len(model_b) == len(A) + 9
    assert alias(c, model_b).tags["checkpoint"].startswith(str(b))
    assert alias(c, A).version == pick.version  # another subject's sweep never touches A's alias
    assert c.get_registered_model(A).tags["subject.photos_sha256"] != \
        c.get_registered_model(model_b).tags["subject.photos_sha256"]

    before = registry_state(c)
    out = ok(run("sweep", *ONE_TRIAL, "resume=true", cwd=tmp_path))
    assert len(sweeps(tmp_path)) == 2 and str(a1) in out
    assert registry_state(c) == before  # no version created, no alias moved

    ok_out = ok(run("sweep", *ONE_TRIAL, cwd=tmp_path))
    [a3] = [d for d in sweeps(tmp_path) if d not in (a1, b)]
    assert alias(c, A).version == pick.version  # the person's pick stands
    challenger = alias(c, A, "challenger")
    best = selection(a3)["chosen"]
    assert challenger is not None and challenger.tags["lora_sha256"] == best["weights"]
    switch = f"python -m sweep.promote {best['trial']}@{best['step']} sweep={a3}"
    assert switch in ok_out and switch in (a3 / "report" / "report.md").read_text()
    parent = c.get_run(json.loads((a3 / "sweep.json").read_text())["parent_run_id"])
    assert parent.data.tags["registry.alias"] == "challenger" and switch in parent.data.tags["registry.switch"]

    p = run("sweep.export", cwd=tmp_path)  # two subjects registered: which one?
    assert p.returncode == 2 and A in p.stderr and model_b in p.stderr and "model=" in p.stderr, p.stderr[-2000:]
    loras = tmp_path / "loras"
    theirs = tmp_path / "their_folder"
    loras.mkdir()
    theirs.mkdir()
    (loras / "another.safetensors").write_bytes(b"someone else's LoRA")
    (theirs / "keep.txt").write_text("keep me")
    (loras / "linked").symlink_to(theirs, target_is_directory=True)
    out = ok(run("sweep.export", f"model={A}", f"out={loras}", cwd=tmp_path))
    assert (loras / "another.safetensors").read_bytes() == b"someone else's LoRA"
    assert (loras / "linked").is_symlink() and (theirs / "keep.txt").read_text() == "keep me"
    record = json.loads((loras / "export.json").read_text())
    assert sha256(loras / "pytorch_lora_weights.safetensors") == pick.tags["lora_sha256"]
    assert record["files"][record["webui_file"]] == pick.tags["webui_sha256"] == \
        sha256(loras / record["webui_file"])
    assert "exported" in out
