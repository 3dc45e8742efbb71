"""Every user command of the README, run as a user runs it: taken from the README's ```bash blocks at test time,
so the README and what works cannot drift apart.

Each command is run verbatim through bash, except for these documented demo-scale changes:
- sweeps get `DEMO_SCALE` appended (4 steps, a checkpoint every 2, 64 px; Optuna sweeps also fewer trials);
- "your photos" runs with HOME set to a folder whose `photos/me` holds the bundled demo subject, on the tiny
  model and the demo's scoring (`model=tiny eval=demo`): no SDXL weights can be downloaded here;
- the sweep folder in `python -m sweep.report outputs/sweeps/<date>` is the demo's own;
- servers get a free port on 127.0.0.1 instead of the default one.
Commands that need SDXL's weights and a GPU are listed in `SKIPPED`, by name, and reported as skipped.

The commands that follow the demo work on what it left, in the README's order: the report, generate, serve and a
request, the MLflow UI opened in headless Chromium, then the Optuna demo in the same folder (the champion must
then be the best checkpoint of both sweeps)."""
from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow import MlflowClient
from PIL import Image

from sweep import PROJECT_DIR

pytestmark = pytest.mark.slow
README = PROJECT_DIR / "README.md"
DEMO_DIR = PROJECT_DIR / "assets" / "demo_subject"
DEMO_SCALE = ["steps=4", "train.checkpoint_every=2", "data.resolution=64", "progress=false"]
ON_TINY_MODEL = ["model=tiny", "eval=demo"]
FEW_TRIALS = ["hydra.sweeper.n_trials=2"]
PNG = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
LOADED = "src => [...document.images].some(i => (i.getAttribute('src') || '').includes(src) && i.naturalWidth > 0)"

# every command the README shows, by a pattern that matches it and nothing else
COMMANDS = {
    "demo": r"^python -m pip install torch==\S+ && python -m pip install -e \. && python -m sweep -m lr=",
    "tests": r"^python -m pip install torch==\S+ && python -m pip install -e '\.\[test\]' && python -m pytest",
    "mlflow ui": r"^mlflow ui --backend-store-uri sqlite:///\$PWD/mlruns/mlflow\.db$",
    "report": r"^python -m sweep\.report outputs/sweeps/\S+$",
    "review": r"^python -m sweep\.review outputs/sweeps/\S+$",
    "promote": r"^python -m sweep\.promote \S+@\d+ reason=",
    "your photos": r"^python -m sweep -m experiment=sdxl data\.instance_dir=\$HOME/photos/me lr=\S+$",
    "plan": r"^python -m sweep -m experiment=sdxl data\.instance_dir=\$HOME/photos/me lr=\S+ steps=\S+ plan_only=true$",
    "generate": r"^python -m sweep\.generate prompt=",
    "serve": r"^python -m sweep\.serve port=5001$",
    "request": r"^curl -s http://127\.0\.0\.1:5001/invocations ",
    "export": r"^python -m sweep\.export$",
    "search demo": r"^python -m sweep -m search=demo$",
    "search your photos": r"^python -m sweep -m experiment=sdxl search=rank_lr data\.instance_dir=\$HOME/photos/me$",
    "search space": r"^python -m sweep -m hydra/sweeper=optuna 'lr=tag\(log, interval\(",
    "flux demo": r"^python -m sweep -m model=flux_tiny lr=\S+$",
    "flux your photos": r"^python -m sweep -m experiment=flux data\.instance_dir=\$HOME/photos/me lr=\S+$",
}
SKIPPED = {
    "tests": "it is .ci/run's own command (test_setup_commands_are_what_ci_runs checks that)",
    "search your photos": "20 trials of 500 steps on SDXL's weights: needs the download and a GPU "
                          "(the same search runs on the tiny model as `search demo`)",
    "flux your photos": "FLUX.1-dev is gated and 34 GB, trained on a GPU (the same sweep runs on the tiny FLUX.1 "
                        "model as `flux demo`, and on its architecture in tests/test_flux.py)",
}


def readme_commands() -> list[str]:
    text = README.read_text()
    lines = [ln.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in block.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def command(name: str) -> str:
    [cmd] = [c for c in readme_commands() if re.search(COMMANDS[name], c)]
    return cmd


def test_every_readme_command_is_run_or_skipped_by_name():
    cmds = readme_commands()
    for c in cmds:
        names = [n for n, pat in COMMANDS.items() if re.search(pat, c)]
        assert len(names) == 1, f"README command not covered by tests/test_readme.py (or covered twice): {c!r} {names}"
    for name, pat in COMMANDS.items():
        assert sum(bool(re.search(pat, c)) for c in cmds) == 1, f"{name!r}: no README command matches {pat!r}"


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_command_not_run_here(name):
    command(name)  # still in the README
    pytest.skip(f"README command {name!r}: {SKIPPED[name]}")


def test_setup_commands_are_what_ci_runs():
    ci = (PROJECT_DIR / ".ci" / "run").read_text()
    assert command("tests") in ci.splitlines()  # .ci/run runs the README's test command verbatim
    install_demo, _, _ = command("demo").rpartition(" && ")
    install_tests, _, _ = command("tests").rpartition(" && ")
    assert install_demo == install_tests.replace("'.[test]'", ".")  # the same install, without the test extra


# running them -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env(home: Path) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # the project's python, mlflow
    return {**os.environ, "PATH": path, "HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class User:
    """A person in a fresh folder with photos in ~/photos/me, typing README commands into bash."""

    def __init__(self, folder: Path):
        self.cwd = folder
        self.home = folder / "home"
        shutil.copytree(DEMO_DIR, self.home / "photos" / "me")

    def run(self, cmd: str, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
        line = " ".join([cmd, *extra])
        p = subprocess.run(["bash", "-c", line], cwd=self.cwd, env=user_env(self.home), capture_output=True,
                           text=True, timeout=timeout)
        p.output = p.stdout + p.stderr
        return p

    def start(self, cmd: str, port: int, ready: str, timeout: int = 300, **env: str) -> subprocess.Popen:
        log = open(self.cwd / f"server-{port}.log", "w")
        proc = subprocess.Popen(["bash", "-c", cmd], cwd=self.cwd, env={**user_env(self.home), **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # stop() ends its process group
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert proc.poll() is None, (self.cwd / f"server-{port}.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}{ready}", timeout=2).status_code == 200:
                    return proc
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy starting
                pass
            time.sleep(0.5)
        stop(proc)
        raise AssertionError(f"{cmd!r} did not answer: " + (self.cwd / f"server-{port}.log").read_text()[-3000:])

    def sweep_folders(self) -> list[Path]:
        return sorted((self.cwd / "outputs" / "sweeps").iterdir())

    def mlflow(self) -> MlflowClient:
        return MlflowClient(f"sqlite:///{self.cwd / 'mlruns' / 'mlflow.db'}")

    def champion(self):
        return self.mlflow().get_model_version_by_alias("sdxl-lora-sks-woman", "champion")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> User:
    """The demo, run once as the README's first command; the later commands work on what it left."""
    u = User(tmp_path_factory.mktemp("readme-user"))
    demo = command("demo").rpartition(" && ")[2]  # the install before it is CI's own (see above)
    p = u.run(demo, *DEMO_SCALE)
    assert p.returncode == 0, p.output[-4000:]
    u.demo_output = p.output
    return u


def test_demo_leaves_what_the_readme_promises(user):
    [folder] = user.sweep_folders()
    trials = sorted(d for d in folder.iterdir() if (d / "result.json").is_file())
    assert [json.loads((t / "result.json").read_text())["name"] for t in trials] == ["lr=0.0001", "lr=1e-05", "lr=0.0005"]
    for t in trials:
        assert sorted(c.name for c in (t / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
        assert (t / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors").is_file()
        assert list((t / "eval" / "grids").glob("*.png"))
    for f in ("report.md", "report.csv", "metrics_vs_step.png", "champion_vs_baseline.png", "selection.json"):
        assert (folder / "report" / f).is_file(), f
    assert (user.cwd / "mlruns" / "mlflow.db").is_file()
    assert "Traceback" not in user.demo_output and "raised" not in user.demo_output
    # how sure the pick is, and what racing (the default in a multirun) saved: in the console, report and files
    selection = json.loads((folder / "report" / "selection.json").read_text())
    verdict = selection["confidence"]["comparison"]["verdict"]
    assert verdict.startswith(("decisive: ", "too close to call: ")) and f"how sure: {verdict}" in user.demo_output
    champ = selection["champion"]
    ival = selection["confidence"]["intervals"][f"{champ['trial']}@{champ['step']}"][selection["objective"]]
    assert ival["low"] <= ival["value"] <= ival["high"]
    report = (folder / "report" / "report.md").read_text()
    assert "**How sure:**" in report and "## Racing evaluation" in report and "95% low" in report
    race = json.loads((folder / "report" / "race.json").read_text())
    assert race["checkpoints"] == 6 and race["images"] <= race["full_protocol_images"]
    champion_dir = Path(champ["checkpoint"]).parent.parent
    cells = json.loads((champion_dir / "eval" / "metrics.json").read_text())["cells"][f"step-{champ['step']:06d}"]
    assert {k for k in cells if not k.startswith("prior_")} == {f"p{p}_s{s}" for p in (0, 1) for s in (0, 1)}


def test_report_rebuilds_from_the_sweep_folder(user):
    [folder] = user.sweep_folders()
    (folder / "report" / "report.md").unlink()
    p = user.run(command("report").replace("outputs/sweeps/2026-12-01_09-30-00", f"outputs/sweeps/{folder.name}"))
    assert p.returncode == 0, p.output[-3000:]
    assert "Champion" in (folder / "report" / "report.md").read_text()


def test_review_sheet_lays_the_candidates_side_by_side(user):
    [folder] = user.sweep_folders()
    p = user.run(command("review").replace("outputs/sweeps/2026-12-01_09-30-00", f"outputs/sweeps/{folder.name}"),
                 timeout=300)
    assert p.returncode == 0, p.output[-3000:]
    sheet = folder / "report" / "review.png"
    assert f"review sheet: {sheet}" in p.stdout and "the rule's pick: " in p.stdout
    sel = json.loads((folder / "report" / "selection.json").read_text())
    with open(folder / "report" / "report.csv") as f:
        bests = {f"{r['trial']}@{r['best_step']}" for r in csv.DictReader(f)}
    shown = bests | {f"{sel[k]['trial']}@{sel[k]['step']}" for k in ("champion", "runner_up")}
    with Image.open(sheet) as im:  # 2 prompts down; champion, runner-up, each trial's best, the baseline across
        assert im.size == (200 + (len(shown) + 1) * 256, 28 + 2 * (256 + 34))
        header = np.asarray(im.convert("RGB").crop((200, 0, 200 + 2 * 256, 28)))
    assert (header[..., 0] > header[..., 1] + 50).any()  # the champion and runner-up headers are marked in red
    bad = user.run(command("review").replace("outputs/sweeps/2026-12-01_09-30-00", f"outputs/sweeps/{folder.name}")
                   + " seed=7")
    assert bad.returncode != 0 and "seed=7 is not one of the evaluation's seeds [0, 1]" in bad.output


def test_generate_uses_the_champions_evaluation_settings(user):
    champ = user.champion()
    gen = json.loads(champ.tags["generation"])
    assert (gen["resolution"], gen["num_inference_steps"], gen["guidance_scale"], gen["seed"]) == (64, 4, 5.0, 0)
    assert gen["device"] == "cpu" and gen["seconds_per_image"] > 0 and gen["scheduler"].endswith("Scheduler")
    p = user.run(command("generate"), timeout=120)  # no steps=/size=: the champion's own settings, seconds on a CPU
    assert p.returncode == 0, p.output[-3000:]
    plan = next(line for line in p.stdout.splitlines() if line.startswith("generating "))
    assert plan.startswith(f"generating 1 image, 64x64 px, 4 steps, guidance 5.0, seed 0, scheduler {gen['scheduler']}")
    assert (f"with models:/sdxl-lora-sks-woman@champion (version {champ.version}: trial {champ.tags['trial']} "
            f"step {champ.tags['step']}) on cpu; about ") in plan, plan
    written = Path(p.stdout.strip().splitlines()[-1].removeprefix("written "))
    assert written.parent == Path("outputs") / "generated" and written.suffix == ".png", p.stdout[-500:]
    with Image.open(user.cwd / written) as im:
        assert im.format == "PNG" and im.size == (64, 64)
        got = np.asarray(im.convert("RGB"), dtype=np.int16)
    # the README's prompt is the demo's first evaluation prompt: at seed 0 it is the image the champion was scored on
    ckpt = Path(champ.tags["checkpoint"])
    with Image.open(ckpt.parent.parent / "eval" / "images" / ckpt.name / "base_p0_s0.png") as im:
        assert np.abs(got - np.asarray(im.convert("RGB"), dtype=np.int16)).max() <= 2
    # an override wins over the recorded setting, and the plan says so
    p = user.run(command("generate"), "size=32", "steps=2", "out=small.png", timeout=120)
    assert p.returncode == 0 and "generating 1 image, 32x32 px, 2 steps, guidance 5.0" in p.stdout, p.output[-3000:]
    with Image.open(user.cwd / "small.png") as im:
        assert im.size == (32, 32)


def test_served_champion_answers_a_request_with_a_png(user):
    port = free_port()
    proc = user.start(command("serve").replace("port=5001", f"port={port}"), port, "/ping")  # 200 once loaded
    try:
        p = user.run(command("request").replace("127.0.0.1:5001", f"127.0.0.1:{port}"), timeout=300)
        assert p.returncode == 0, p.output[-3000:]
        [pred] = json.loads(p.stdout)["predictions"]  # MLflow's scoring server's shape: one base64 PNG per prompt
        png = base64.b64decode(pred)
    finally:
        stop(proc)
    assert png[:8] == PNG
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (64, 64)  # a plain request generates at the champion's evaluation settings
    strays = [f for f in user.cwd.rglob("mlflow.db") if "mlruns" not in f.relative_to(user.cwd).parts]
    assert not strays, strays  # it read the project's store and made none of its own


def test_export_for_comfyui_a1111_forge_loads_from_the_registry_too(user):
    """`python -m sweep.export` writes the champion's web-UI file with its metadata and model card; the sweep wrote
    the same tensors into its champion/ folder, which the registered version carries (its sha256 on the version);
    loaded from the registry through mlflow.diffusers, the web-UI file gives the diffusers file's UNet output."""
    import dataclasses
    import hashlib

    import mlflow.diffusers
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = user.run(command("export"))
    assert p.returncode == 0 and "Traceback" not in p.output, p.output[-3000:]
    [out] = (user.cwd / "outputs" / "exports").iterdir()  # under outputs/ (git-ignored): a README walk leaves
    assert not (user.cwd / "exports").exists() and not (user.cwd / "generated.png").exists()  # the checkout clean
    record = json.loads((out / "export.json").read_text())
    webui = record["webui_file"]
    assert {webui, "pytorch_lora_weights.safetensors", "README.md", "grid.png", "baseline.png"} <= {
        f.name for f in out.iterdir()}
    champ = user.champion()
    assert webui.startswith("sks_woman_") and f"step{champ.tags['step']}" in webui
    [folder] = user.sweep_folders()
    in_sweep = json.loads((folder / "champion" / "export.json").read_text())["files"]
    assert champ.tags["webui_file"] == webui
    # the same checkpoint gives the same bytes (sorted safetensors headers), whoever exported it and when (the
    # rebuilt report re-exported champion/): the registry's sha256, champion/'s and this export's are one
    assert champ.tags["webui_sha256"] == in_sweep[webui] == record["files"][webui]
    assert hashlib.sha256((out / webui).read_bytes()).hexdigest() == champ.tags["webui_sha256"]
    assert champ.tags["lora_sha256"] == in_sweep["pytorch_lora_weights.safetensors"] == record["files"][
        "pytorch_lora_weights.safetensors"]
    ours, theirs = load_file(out / webui), load_file(folder / "champion" / webui)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with safe_open(str(out / webui), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"  # the demo's rank, alpha = rank
    assert meta["modelspec.trigger_phrase"] == "sks woman" and meta["sdxl_lora_sweep.trial"] == champ.tags["trial"]
    assert json.loads(meta["sdxl_lora_sweep.metrics"]) == json.loads(champ.tags["metrics"])
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    card = (out / "README.md").read_text()
    for text in ("trigger phrase: **`sks woman`**", "recommended LoRA strength: **1**", "## Metrics against the base",
                 "![with the LoRA](grid.png)", "## How it was chosen", "## Training", "## Licence"):
        assert text in card, text
    assert (folder / "report" / "report.md").read_text().count(webui) == 1  # the report points at it

    mlflow.set_tracking_uri(f"sqlite:///{user.cwd / 'mlruns' / 'mlflow.db'}")
    model = mlflow.diffusers.load_model("models:/sdxl-lora-sks-woman@champion")
    registered = Path(model.adapter_path) / webui
    assert hashlib.sha256(registered.read_bytes()).hexdigest() == champ.tags["webui_sha256"]  # the copy it carries
    outputs = []
    for m in (model, dataclasses.replace(model, weight_name=webui)):
        pipe = m.load_pipeline(device="cpu", torch_dtype=torch.float32)
        g = torch.Generator().manual_seed(0)
        x, emb = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
        added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        with torch.no_grad():
            outputs.append(pipe.unet(x, torch.tensor([500]), emb, added_cond_kwargs=added).sample)
    torch.testing.assert_close(outputs[1], outputs[0], atol=2e-3, rtol=2e-3)  # fp16 export of an fp32 LoRA


def printed_links(output: str) -> dict[str, str]:
    """{what it shows: the link's path} for each `then open <link>   (<what>)` line the sweep printed last."""
    return {what: link for link, what in re.findall(r"then open http://127\.0\.0\.1:5000(\S+)\s+\(([^)]+)\)", output)}


MLRUNS_BEFORE_MODELS = 9_461_273  # bytes of mlruns/ after the demo before checkpoints were LoggedModels (issue 35)


def parent_run(c: MlflowClient, exp):
    [parent] = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("kind") == "sweep"]
    return parent


def test_every_scored_checkpoint_is_a_logged_model_with_the_reports_numbers(user):
    """search_logged_models: one model per scored checkpoint of the sweep, named by its key, with the report's final
    metrics and interval; roles from the rule; the registered champion's model_id is the champion checkpoint's; its
    LoRA referenced by path and sha256, so mlruns/ is no bigger than before (within 10%)."""
    c = user.mlflow()
    exp = c.get_experiment_by_name("sdxl-lora-sweep")
    [folder] = user.sweep_folders()
    selection = json.loads((folder / "report" / "selection.json").read_text())
    models = c.search_logged_models([exp.experiment_id])
    race = json.loads((folder / "report" / "race.json").read_text())
    assert len(models) == race["checkpoints"] == 6
    assert len({m.name for m in models}) == 6 and all(str(m.status) == "READY" for m in models)
    by_key = {m.tags["checkpoint.key"]: m for m in models}
    champ = selection["champion"]
    key = f"{champ['trial']}@{champ['step']}"
    assert models[0].tags["checkpoint.key"] == key and models[0].tags["role"] == "champion"  # newest first
    objective = selection["objective"]
    with open(folder / "report" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for row in rows:
        m = by_key[f"{row['trial']}@{row['best_step']}"]
        metrics = {x.key: x.value for x in m.metrics}
        for name in ("clip_t", "clip_i", "face_detection_rate"):
            assert metrics[f"final_{name}"] == pytest.approx(float(row[name]), rel=1e-9), (name, row)
        assert metrics[f"final_{objective}"] == pytest.approx(float(row[f"best {objective}"]), rel=1e-9)
        assert metrics[f"final_{objective}_low"] == pytest.approx(float(row["95% low"]), rel=1e-9)
        assert metrics[f"final_{objective}_high"] == pytest.approx(float(row["95% high"]), rel=1e-9)
        assert {x.dataset_name for x in m.metrics} == {"sks woman photos x 2 prompts"}
        assert m.params["trial"] == row["trial"] and m.params["step"] == row["best_step"] and m.params["lr"] == row["lr"]
        lora = Path(m.tags["weights.path"])
        assert lora.is_file() and m.tags["weights.sha256"] == json.loads((lora.parent / "checkpoint.json").read_text())[
            "lora_sha256"]
    assert by_key[selection["runner_up"]["key"] if "key" in selection["runner_up"] else
                  f"{selection['runner_up']['trial']}@{selection['runner_up']['step']}"].tags["role"] == "runner-up"
    assert {m.source_run_id for m in models} == {r.info.run_id for r in c.search_runs([exp.experiment_id])
                                                 if r.data.tags.get("kind") != "sweep"}
    version = user.champion()  # its LoggedModel: the source models:/<id> (MLflow's SQL store keeps no model_id)
    assert version.source == f"models:/{by_key[key].model_id}" and version.run_id == parent_run(c, exp).info.run_id
    assert json.loads(c.get_logged_model(by_key[key].model_id).tags["mlflow.modelVersions"]) == [
        {"name": "sdxl-lora-sks-woman", "version": version.version}]
    assert (version.model_id or by_key[key].model_id) == by_key[key].model_id
    parent = parent_run(c, exp)
    assert parent.info.run_name == f"sks woman · {key}" and parent.data.tags["sweep.started"] == folder.name
    size = sum(f.stat().st_size for f in (user.cwd / "mlruns").rglob("*") if f.is_file())
    assert size <= 1.1 * MLRUNS_BEFORE_MODELS, size  # 8.3 MB: the per-prompt images are smaller than the grids were


def test_mlflow_ui_models_tab_runs_view_and_images_by_step(user, tmp_path):
    """The printed links in headless Chromium: the Models tab lists every scored checkpoint with its metrics, the
    champion first; the runs list opens sorted by the rule's objective with the deciding columns; a trial's run shows
    its images by prompt slot and step. Screenshots in this test's temp folder."""
    c = user.mlflow()
    exp = c.get_experiment_by_name("sdxl-lora-sweep")
    [folder] = user.sweep_folders()
    selection = json.loads((folder / "report" / "selection.json").read_text())
    champ = selection["champion"]
    key = f"{champ['trial']}@{champ['step']}"
    [child] = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("trial") == champ["trial"]]
    links = printed_links(user.demo_output)
    with mlflow_ui_page(user, 2400, 1000) as (url, page):
        page.goto(url + links["every checkpoint, the champion first"])
        names = page.locator("[role=row] a", has_text="@")
        names.first.wait_for(timeout=180_000)
        shown = [n.strip() for n in names.all_inner_texts()]
        models = c.search_logged_models([exp.experiment_id])
        assert shown[0] == next(m.name for m in models if m.tags["checkpoint.key"] == key)
        assert sorted(shown) == sorted(m.name for m in models)
        page.get_by_text("final_clip_t").first.wait_for(timeout=60_000)  # its metrics, beside each model
        body = page.inner_text("body")
        for m in models:
            assert str(next(x.value for x in m.metrics if x.key == "final_clip_t")) in body, m.name
        page.screenshot(path=str(tmp_path / "models_tab.png"), full_page=True)
        page.goto(url + links["the trials by the rule's objective"])
        for column in (f"best_{selection['objective']}", "best_clip_t", "best_step"):  # the deciding columns
            page.get_by_role("columnheader").filter(has_text=column).first.wait_for(timeout=120_000)
        page.get_by_text(f"sks woman · {key}").first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "runs_view.png"), full_page=True)
        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}/model-metrics"
                  "?workflowType=machine_learning")
        page.get_by_placeholder("Search metric charts").fill("p0")  # the image cards, by prompt slot
        page.wait_for_function("() => [...document.images].some(i => /p0%2Bstep%2B|p0\\+step\\+/.test("
                               "i.src) && i.naturalWidth > 0)", timeout=120_000)
        page.screenshot(path=str(tmp_path / "child_images.png"), full_page=True)


@contextlib.contextmanager
def mlflow_ui_page(user: User, width: int, height: int):
    """`mlflow ui` started as the README says (no GenAI job workers: CPU for the rest) and a headless Chromium page
    of `width` x `height` on it: yields (the UI's address, the page); the browser and the server stop after."""
    sync_playwright = _playwright()
    port = free_port()
    proc = user.start(f"{command('mlflow ui')} --host 127.0.0.1 --port {port}", port, "/health",
                      MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
            try:
                yield f"http://127.0.0.1:{port}", browser.new_page(viewport={"width": width, "height": height})
            finally:
                browser.close()
    finally:
        stop(proc)


def _playwright():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to open the MLflow UI")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[test]'")
    return sync_playwright


def test_mlflow_ui_shows_the_champion_and_checkpoint_images_without_menus(user):
    """The UI started as the README says, run pages opened from their URLs in headless Chromium (Debian's, driven by
    Playwright): the sweep's description names the champion, with the report's images; a trial's best metrics and
    its grid at a step. Screenshots: /tmp/mlflow_ui_*.png."""
    c = user.mlflow()
    exp = c.get_experiment_by_name("sdxl-lora-sweep")
    every = c.search_runs([exp.experiment_id])
    [parent] = [r for r in every if r.data.tags.get("kind") == "sweep"]
    champ = json.loads((Path(parent.data.tags["sweep_dir"]) / "report" / "selection.json").read_text())["champion"]
    [child] = [r for r in every if r.data.tags.get("trial") == champ["trial"]]
    image = next(a.path for a in c.list_artifacts(child.info.run_id, "images")
                 if Path(a.path).name.startswith(f"p0+step+{champ['step']}+") and a.path.endswith(".png"))
    with mlflow_ui_page(user, 1400, 1800) as (url, page):
        # the link the sweep printed, on this test's port: the sweep's run in the "Model training" view
        printed = printed_links(user.demo_output)["the champion and why"]
        assert printed == f"/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}" \
                          "?workflowType=machine_learning"
        page.goto(url + printed)
        page.get_by_text("Champion:").first.wait_for(timeout=180_000)
        assert page.get_by_role("link", name="Model registry").count() == 1  # not the GenAI view
        description = page.get_by_text("Champion:").first.locator("xpath=ancestor::*[self::div][1]")
        assert champ["trial"] in description.inner_text()
        page.wait_for_function(LOADED, arg="get-artifact?path=report/metrics_vs_step.png", timeout=60_000)
        page.wait_for_function(LOADED, arg="get-artifact?path=report/champion_vs_baseline.png", timeout=60_000)
        page.screenshot(path="/tmp/mlflow_ui_parent.png", full_page=True)
        assert "champion_clip_t" in page.inner_text("body")
        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}")
        page.get_by_text("best_step").first.wait_for(timeout=120_000)
        page.screenshot(path="/tmp/mlflow_ui_child.png", full_page=True)
        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}/artifacts/{image}")
        page.wait_for_function("alt => [...document.images].some(i => i.alt === alt && i.naturalWidth > 0)",
                               arg=image, timeout=120_000)
        page.screenshot(path="/tmp/mlflow_ui_child_image.png", full_page=True)
        # the API lists the sweep's parent run and its three trials
        api = f"{url}/api/2.0/mlflow/runs/search"
        assert len(requests.post(api, json={"experiment_ids": [exp.experiment_id]}).json()["runs"]) == 4


def test_search_demo_after_the_grid_keeps_the_best_of_both_as_champion(user):
    """A grid sweep, then the Optuna demo in the same store, under the demo's weighted rule (clip_t 1, clip_i 1):
    the alias ends on a checkpoint no candidate of either sweep beats on the raw metrics the rule uses (the argmax of
    the weighted score over both); a sweep whose best lost registered nothing."""
    p = user.run(command("search demo"), *DEMO_SCALE, *FEW_TRIALS)
    assert p.returncode == 0, p.output[-4000:]
    grid, search = user.sweep_folders()
    assert len(list(search.glob("*/result.json"))) == 2 and (search / "report" / "optuna_study.json").is_file()
    candidates = {}  # checkpoint folder -> raw metrics, every checkpoint of every trial that did not fail
    for f in user.cwd.glob("outputs/sweeps/*/*/result.json"):
        res = json.loads(f.read_text())
        # the scores selection ranks: eval/metrics.json, where a raced checkpoint's later rounds add to its first
        scores = json.loads((f.parent / "eval" / "metrics.json").read_text())["metrics"]
        if res["status"] != "failed":
            candidates.update({str(f.parent / "checkpoints" / k): scores[k] for k in (res.get("metrics") or {})
                               if k.startswith("step-")})
    ok = lambda v: isinstance(v, (int, float)) and v == v  # noqa: E731
    pool = {k: m for k, m in candidates.items() if ok(m.get("clip_t")) and ok(m.get("clip_i"))}
    assert len({Path(k).parents[2] for k in pool}) == 2 and len(pool) >= 6
    champ = user.champion()
    best = pool[champ.tags["checkpoint"]]
    for k, m in pool.items():
        assert not (m["clip_t"] >= best["clip_t"] and m["clip_i"] >= best["clip_i"]
                    and (m["clip_t"], m["clip_i"]) != (best["clip_t"], best["clip_i"])), (k, m, best)
    score = {k: m["clip_t"] / 100 + m["clip_i"] / 100 for k, m in pool.items()}
    assert score[champ.tags["checkpoint"]] == pytest.approx(max(score.values()))
    assert float(champ.tags["objective"]) == pytest.approx(max(score.values()))
    assert champ.tags["objective_name"] == "weighted_score"
    c = user.mlflow()
    parents = [r for r in c.search_runs([c.get_experiment_by_name("sdxl-lora-sweep").experiment_id])
               if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 2
    moves = [r for r in parents if r.data.tags["champion_replaced"] == "True"]
    assert len(c.search_model_versions("name='sdxl-lora-sks-woman'")) == len(moves)
    for r in parents:
        if r.data.tags["champion_replaced"] != "True":
            assert float(r.data.tags["challenger_objective"]) <= float(r.data.tags["champion_objective"])
            assert "registry.version" not in r.data.tags


def test_promote_puts_a_persons_pick_on_record(user):
    """The README's promote command on the newest sweep (the search demo's), with a checkpoint of that sweep in place
    of the README's example: the alias moves to it, the report and the parent run say the rule was overruled."""
    newest = user.sweep_folders()[-1]
    sel = json.loads((newest / "report" / "selection.json").read_text())
    other = sel["runner_up"]
    key = f"{other['trial']}@{other['step']}"
    cmd = re.sub(r"lr=0\.0001@20", lambda _: shlex.quote(key), command("promote"))
    p = user.run(cmd, timeout=600)
    assert p.returncode == 0, p.output[-3000:]
    rule = sel["champion"]["trial"]
    assert f"promoted {key} in outputs/sweeps/{newest.name}: over the rule's pick {rule}@" in p.stdout
    assert user.champion().tags["review.reason"] == "sharper face, the moon still there"
    assert "**overrode the rule**" in (newest / "report" / "report.md").read_text()


def test_a_changed_registered_lora_is_refused(user):
    """Last (it spoils the store): one byte of the registered LoRA changed, the file still parses; generation refuses
    it by the sha256 recorded on its version."""
    stored = [f for f in (user.cwd / "mlruns").rglob("pytorch_lora_weights.safetensors")
              if "best_checkpoint" not in f.parts]
    assert stored
    for f in stored:
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    p = user.run(command("generate"), "out=bad.png", timeout=300)
    assert p.returncode != 0 and "content hash" in p.stderr and "Traceback" not in p.stderr, p.output[-2000:]
    assert not (user.cwd / "bad.png").exists()


def test_your_photos_command_on_the_bundled_photos(tmp_path):
    u = User(tmp_path)
    p = u.run(command("your photos"), *ON_TINY_MODEL, *DEMO_SCALE)
    assert p.returncode == 0, p.output[-4000:]
    [folder] = u.sweep_folders()
    results = [json.loads(f.read_text()) for f in folder.glob("*/result.json")]
    assert len(results) == 3 and all(r["status"] == "finished" for r in results)
    [first] = folder.glob("0_*")
    cfg = (first / ".hydra" / "config.yaml").read_text()
    assert f"instance_dir: {u.home}/photos/me" in cfg  # $HOME expanded by the shell, as the README says


def test_plan_only_prints_the_plan_and_trains_nothing(tmp_path):
    """The 9 trials of 3 learning rates x 3 step counts: 3 trainings (a constant schedule), printed and written,
    and nothing trained, tracked or scored."""
    u = User(tmp_path)
    p = u.run(command("plan"), *ON_TINY_MODEL, "data.resolution=64", "progress=false", timeout=300)
    assert p.returncode == 0, p.output[-4000:]
    assert "plan: 9 trial(s) in 3 training(s), 1 pack(s)" in p.output, p.output[-3000:]
    assert "also writes lr=0.0001,steps=500 (its first 500 steps); lr=0.0001,steps=300 (its first 300 steps)" \
        in p.output
    assert "plan_only=true: nothing trained" in p.output and "Traceback" not in p.output
    [folder] = u.sweep_folders()
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["trials"] == 9 and plan["trainings"] == 3
    assert [t["steps"] for pack in plan["packs"] for t in pack["trainings"]] == [1000, 1000, 1000]
    assert sorted(p.name for p in folder.iterdir()) == ["multirun.yaml", "plan.json"]  # no trial folder, no lock
    assert not (u.cwd / "mlruns").exists()


def test_search_space_on_the_command_line(tmp_path):
    u = User(tmp_path)
    p = u.run(command("search space"), *DEMO_SCALE, *FEW_TRIALS)
    assert p.returncode == 0, p.output[-4000:]
    [folder] = u.sweep_folders()
    trials = [json.loads(f.read_text()) for f in folder.glob("*/result.json")]
    assert len(trials) == 2 and all(1e-5 <= t["params"]["lr"] <= 5e-4 for t in trials)
    assert all(t["params"]["rank"] in (4, 8, 16, 32) for t in trials)


def test_flux_demo_trains_a_pack_on_the_tiny_flux_model_and_registers_a_flux_champion(tmp_path):
    """The "Other models" demo: two FLUX.1 trials as one pack, scored, a champion registered under its own name and
    exported with kohya's FLUX names (tests/test_flux.py checks the rest of that sweep, and a kill and resume)."""
    u = User(tmp_path)
    p = u.run(command("flux demo"), *DEMO_SCALE)
    assert p.returncode == 0, p.output[-4000:]
    [folder] = u.sweep_folders()
    results = [json.loads(f.read_text()) for f in sorted(folder.glob("*/result.json"))]
    assert [(r["status"], r["pack_size"]) for r in results] == [("finished", 2)] * 2
    assert u.mlflow().get_model_version_by_alias("flux-lora-sks-woman", "champion")
    assert list((folder / "champion").glob("sks_woman_*.safetensors"))
    assert "Traceback" not in p.output
