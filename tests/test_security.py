"""Weights, never code, from a store (docs/security.md). A `PythonModel` registered and set as `@champion` in a real
sqlite store is refused by `sweep.generate`, `sweep.serve` and `sweep.export` (exit 2, a message naming it) and its
code never runs, though MLflow's own loader runs it; a LoRA whose bytes differ from a recorded sha256 is refused,
naming the record; the champion a real sweep registered is still served, generated and exported. The first tests
are pure (the request and flavour checks); the rest share one one-trial sweep."""
import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from PIL import Image

from sweep.serve import BadRequest, read_request
from sweep.tracking.weights import RefusedVersion, fetch_lora, lora_flavour, settings_of, verify_lora

from .test_registry import ONE_TRIAL, A, ok, run
from .test_serving import free_port, server

OURS = {"flavors": {"diffusers": {"adapter_type": "lora", "adapter_weights": "adapter_weights", "code": None,
                                  "base_model": "/models/tiny"},
                    "python_function": {"loader_module": "mlflow.diffusers"}},
        "metadata": {"generation": {"resolution": 64}}}
PYFUNC = {"flavors": {"python_function": {"loader_module": "mlflow.pyfunc.loaders.code_model", "code": None}}}
EVIL = '''import os
import mlflow
from mlflow.pyfunc import PythonModel


class Evil(PythonModel):
    def load_context(self, context):
        if os.environ.get("SDXL_SWEEP_SENTINEL"):
            open(os.environ["SDXL_SWEEP_SENTINEL"], "w").write("code from the store ran")

    def predict(self, context, model_input, params=None):
        return ["pwned"]


mlflow.models.set_model(Evil())
'''


# pure checks ------------------------------------------------------------------------------------------------
def test_only_this_projects_lora_flavour_passes():
    assert lora_flavour(OURS, "v")["base_model"] == "/models/tiny"
    assert lora_flavour(OURS, "v")["generation"] == {"resolution": 64}
    bad = {"a PythonModel": (PYFUNC, "python_function (loader mlflow.pyfunc.loaders.code_model)"),
           "no flavours": ({"flavors": {}}, "names no flavour"),
           "not YAML mapping": ("flavors", "names no flavour")}
    for what, (mlmodel, said) in bad.items():
        with pytest.raises(RefusedVersion, match="is not this project's LoRA") as e:
            lora_flavour(mlmodel, "models:/m/1")
        assert said in str(e.value) and "nothing of it was loaded" in str(e.value), what
    for key, value in (("adapter_type", "textual_inversion"), ("code", "code"), ("adapter_weights", "../up"),
                       ("adapter_weights", "/abs"), ("weight_name", "other.safetensors")):
        changed = {**OURS, "flavors": {"diffusers": {**OURS["flavors"]["diffusers"], key: value}}}
        with pytest.raises(RefusedVersion, match="is not this project's LoRA"):
            lora_flavour(changed, "models:/m/1")


def test_each_record_that_disagrees_with_the_files_bytes_is_named(tmp_path):
    f = tmp_path / "pytorch_lora_weights.safetensors"
    f.write_bytes(b"lora bytes")
    good, bad = hashlib.sha256(b"lora bytes").hexdigest(), "0" * 64
    tag, rec = "the version's lora_sha256 tag", "its checkpoint.json"
    assert verify_lora(f, {tag: good, rec: good}, "v") == good
    for recorded, named, not_named in (({tag: bad, rec: good}, [tag], [rec]), ({tag: good, rec: bad}, [rec], [tag]),
                                       ({tag: bad, rec: bad}, [tag, rec], [])):
        with pytest.raises(RefusedVersion, match="content hash") as e:
            verify_lora(f, recorded, "models:/m/1")
        assert all(n in str(e.value) for n in named) and not any(n in str(e.value) for n in not_named)
    with pytest.raises(RefusedVersion, match="no sha256 recorded in its checkpoint.json"):
        verify_lora(f, {tag: good, rec: None}, "v")


def test_recorded_settings_keep_known_keys_of_their_types():
    assert settings_of('{"resolution": 64, "guidance_scale": 5, "seed": null, "rm": "-rf", "steps": [1]}') == {
        "resolution": 64, "guidance_scale": 5, "seed": None}
    assert settings_of('{"resolution": "64; import os"}') is None and settings_of("not json") is None


def test_requests_in_mlflows_input_forms_and_what_is_refused():
    split = {"dataframe_split": {"columns": ["prompt"], "data": [["a"], ["b"]]}, "params": {"seed": 1}}
    assert read_request(json.dumps(split).encode()) == (["a", "b"], {"seed": 1})
    for body in ({"dataframe_records": [{"prompt": "a"}]}, {"instances": ["a"]}, {"inputs": {"prompt": ["a"]}},
                 {"inputs": "a"}):
        assert read_request(json.dumps(body).encode()) == (["a"], {}), body
    refused = {b"not json": "not JSON", b'{"prompt": "a"}': "exactly one of",
               b'{"inputs": ["a"], "params": {"steps": 3}}': "unknown param 'steps'",
               b'{"inputs": ["a"], "params": {"height": 30}}': "multiple of 8",
               b'{"inputs": ["a"], "params": {"seed": "1"}}': "must be an integer",
               b'{"inputs": [""]}': "non-empty string", json.dumps({"inputs": ["a"] * 17}).encode(): "1 to 16"}
    for body, said in refused.items():
        with pytest.raises(BadRequest, match=said):
            read_request(body)


# against a real store ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """One trial swept at demo scale: a real store holding a real champion of the demo's subject."""
    cwd = tmp_path_factory.mktemp("security")
    ok(run("sweep", *ONE_TRIAL, cwd=cwd))
    return cwd


def store(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}"


def champion(cwd: Path):
    return MlflowClient(store(cwd)).get_model_version_by_alias(A, "champion")


def command(module: str, *args: str, cwd: Path, sentinel: Path | None = None, timeout: float = 300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDXL_SWEEP_SENTINEL": str(sentinel or cwd / "unused")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def register(cwd: Path, log_model, tags: dict | None = None) -> str:
    """A new version of the subject's model, logged by `log_model()` (returns its model_uri): what anyone who can
    write to the store can do."""
    import mlflow

    mlflow.set_tracking_uri(store(cwd))
    with mlflow.start_run(run_name="someone else's"):
        uri = log_model()
    return str(mlflow.register_model(uri, A, tags=tags).version)


def test_a_python_model_set_as_champion_never_runs(swept, tmp_path, monkeypatch):
    import mlflow

    good = champion(swept)
    (tmp_path / "evil.py").write_text(EVIL)
    sentinel = tmp_path / "sentinel"
    evil = register(swept, lambda: mlflow.pyfunc.log_model(name="champion_lora", python_model=str(tmp_path / "evil.py"))
                    .model_uri, tags=dict(good.tags))  # even the real champion's tags, its lora_sha256 among them
    c = MlflowClient(store(swept))
    c.set_registered_model_alias(A, "champion", evil)
    try:
        port = free_port()
        for module, args in (("sweep.generate", ["prompt=a picture of sks woman", "out=x.png"]),
                             ("sweep.export", []), ("sweep.serve", [f"port={port}"])):
            p = command(module, *args, cwd=swept, sentinel=sentinel)
            assert p.returncode == 2, (module, p.stdout[-2000:], p.stderr[-2000:])
            assert f"models:/{A}@champion (registered model {A} version {evil}) is not this project's LoRA" in p.stderr
            assert "python_function (loader mlflow.pyfunc.loaders.code_model)" in p.stderr
            assert "Traceback" not in p.stderr and not sentinel.exists(), module
        assert not (swept / "x.png").exists() and not (swept / "outputs" / "exports").exists()
        # MLflow's own loader (what `mlflow models serve` and the old generate used) runs it: the attack is real
        monkeypatch.setenv("SDXL_SWEEP_SENTINEL", str(sentinel))
        mlflow.pyfunc.load_model(f"models:/{A}@champion")
        assert sentinel.read_text() == "code from the store ran"
    finally:
        c.set_registered_model_alias(A, "champion", good.version)


def test_a_lora_flavour_with_code_or_other_bytes_is_refused_by_its_record(swept, tmp_path):
    import mlflow

    good = champion(swept)
    ckpt = Path(good.tags["checkpoint"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in ("pytorch_lora_weights.safetensors", "checkpoint.json"):
        shutil.copy2(ckpt / f, adapter / f)
    (tmp_path / "helper.py").write_text("raise SystemExit('a helper module of the version was imported')\n")

    def log(**kw):
        return lambda: mlflow.diffusers.log_model(adapter_path=str(adapter), base_model="/x", name="m", **kw).model_uri

    with_code = register(swept, log(code_paths=[str(tmp_path / "helper.py")]), tags=dict(good.tags))
    with pytest.raises(RefusedVersion, match=r"its diffusers flavour has .*code='code'"):
        fetch_lora(f"models:/{A}/{with_code}", store(swept), tmp_path / "a")

    data = bytearray((adapter / "pytorch_lora_weights.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one byte of a tensor: the file still parses
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(bytes(data))
    changed = register(swept, log(), tags=dict(good.tags))
    with pytest.raises(RefusedVersion, match="content hash") as e:
        fetch_lora(f"models:/{A}/{changed}", store(swept), tmp_path / "b")
    assert "the version's lora_sha256 tag says" in str(e.value) and "its checkpoint.json says" in str(e.value)
    from sweep.generate import main as generate

    out = tmp_path / "x.png"
    assert generate(["prompt=a", f"model=models:/{A}/{changed}", f"tracking_uri={store(swept)}", f"out={out}"]) == 2
    assert not out.exists()

    shutil.copy2(ckpt / "pytorch_lora_weights.safetensors", adapter / "pytorch_lora_weights.safetensors")
    retagged = register(swept, log(), tags={**good.tags, "lora_sha256": "0" * 64})  # the tag alone disagrees
    with pytest.raises(RefusedVersion, match="content hash") as e:
        fetch_lora(f"models:/{A}/{retagged}", store(swept), tmp_path / "c")
    assert "the version's lora_sha256 tag says 0000" in str(e.value) and "checkpoint.json says" not in str(e.value)


def test_the_registered_champion_is_served_over_mlflows_contract_on_loopback(swept):
    port = free_port()
    cmd = [sys.executable, "-m", "sweep.serve", f"port={port}"]
    with server(cmd, port, "/ping", swept, env={"HF_HUB_OFFLINE": "1"}) as url:
        assert requests.get(url + "/health", timeout=10).status_code == 200
        body = {"dataframe_split": {"columns": ["prompt"], "data": [["a picture of sks woman"], ["sks woman, moon"]]},
                "params": {"num_inference_steps": 2, "height": 32, "width": 32, "seed": 3}}
        r = requests.post(url + "/invocations", json=body, timeout=300)
        assert r.status_code == 200, r.text[:2000]
        pngs = [base64.b64decode(p) for p in r.json()["predictions"]]
        assert len(pngs) == 2 and all(Image.open(io.BytesIO(p)).size == (32, 32) for p in pngs)
        r = requests.post(url + "/invocations", json={"inputs": ["a picture of sks woman"]}, timeout=300)
        [png] = [base64.b64decode(p) for p in r.json()["predictions"]]
        assert Image.open(io.BytesIO(png)).size == (64, 64)  # the champion's recorded evaluation settings
        r = requests.post(url + "/invocations", json={"instances": ["a"]}, headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 403 and "loopback" in r.json()["message"]  # a DNS-rebinding page is refused
        r = requests.post(url + "/invocations", data="prompt=a", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        r = requests.post(url + "/invocations", json={"inputs": ["a"], "params": {"steps": 2}})
        assert r.status_code == 400 and r.json() == {"error_code": "BAD_REQUEST", "message": r.json()["message"]}
        assert "unknown param 'steps'" in r.json()["message"]
    log = next(swept.glob(f"server-{port}.log")).read_text()
    assert f"serving models:/{A}@champion (version {champion(swept).version}" in log and "Traceback" not in log


def test_serve_asks_which_subject_when_several_have_a_champion(swept, capsys):
    from sweep.serve import main as serve

    c = MlflowClient(store(swept))
    c.create_registered_model("sdxl-lora-sks-man", tags={"subject": "sks man"})
    c.set_registered_model_alias("sdxl-lora-sks-man", "champion",
                                 c.create_model_version("sdxl-lora-sks-man", source=str(swept / "elsewhere")).version)
    try:
        assert serve([f"tracking_uri={store(swept)}", f"port={free_port()}"]) == 2
    finally:
        c.delete_registered_model("sdxl-lora-sks-man")
    err = capsys.readouterr().err
    assert "2 subjects have a champion" in err and A in err and "sdxl-lora-sks-man (sks man" in err, err
    assert 'subject="' in err and "model=" in err


def test_export_from_the_registered_copy_when_the_checkpoint_is_elsewhere(swept, tmp_path):
    """A teammate's machine has the store, not the sweep's folder: the registered LoRA itself is exported, its bytes
    the ones recorded on the version."""
    good = champion(swept)
    ckpt = Path(good.tags["checkpoint"])
    moved = ckpt.with_name(ckpt.name + ".away")
    ckpt.rename(moved)
    try:
        p = command("sweep.export", f"out={tmp_path / 'out'}", cwd=swept)
    finally:
        moved.rename(ckpt)
    assert p.returncode == 0, p.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "export.json").read_text())
    assert record["files"]["pytorch_lora_weights.safetensors"] == good.tags["lora_sha256"] == record["lora_sha256"]
    assert record["webui_file"] and (tmp_path / "out" / record["webui_file"]).is_file()
