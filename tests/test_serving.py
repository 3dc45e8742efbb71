"""Real servers on loopback: a sweep logged to `mlflow server` over HTTP; `python -m sweep.generate` without a champion.
(The README's `mlflow ui`, `python -m sweep.serve` and `python -m sweep.generate` after the demo: tests/test_readme.py;
serving MLflow's contract on loopback and refusing a version that is not this project's LoRA: tests/test_security.py.)"""
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from sweep.tracking.weights import fetch_lora

from .test_tracking import SMALL, sweep

pytestmark = pytest.mark.slow
MLFLOW = [sys.executable, "-m", "mlflow"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(args: list[str], port: int, ready_path: str, cwd: Path, env=None, timeout=240):
    log = open(cwd / f"server-{port}.log", "w")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # mlflow execs uvicorn
    proc = subprocess.Popen(args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PATH": path, **(env or {})}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert proc.poll() is None, (cwd / f"server-{port}.log").read_text()[-3000:]
            try:
                if requests.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"server on {port} did not come up: " + (cwd / f"server-{port}.log").read_text()[-3000:])
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def search_runs(url: str) -> list[dict]:
    exps = requests.post(url + "/api/2.0/mlflow/experiments/search", json={"max_results": 100}).json()["experiments"]
    exp = next(e for e in exps if e["name"] == "sdxl-lora-sweep")
    return requests.post(url + "/api/2.0/mlflow/runs/search",
                         json={"experiment_ids": [exp["experiment_id"]], "max_results": 100}).json()["runs"]


def test_sweep_logs_to_an_mlflow_server_over_http(tmp_path):
    port = free_port()
    store = tmp_path / "server-store"
    store.mkdir()
    cmd = MLFLOW + ["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "art")]
    with server(cmd, port, "/health", tmp_path) as url:
        p = sweep("-m", "lr=1e-4,5e-4", *SMALL, f"tracking.uri={url}", cwd=tmp_path)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs = search_runs(url)
        tags = lambda r: {t["key"]: t["value"] for t in r["data"].get("tags", [])}
        parents = [r for r in runs if tags(r).get("kind") == "sweep"]
        children = [r for r in runs if "mlflow.parentRunId" in tags(r)]
        assert len(parents) == 1 and len(children) == 2
        assert all(tags(c)["mlflow.parentRunId"] == parents[0]["info"]["run_id"] for c in children)
        assert all({"clip_t", "train_loss"} <= {m["key"] for m in c["data"]["metrics"]} for c in children)
        alias = requests.get(url + "/api/2.0/mlflow/registered-models/alias",
                             params={"name": "sdxl-lora-sks-woman", "alias": "champion"}).json()
        assert "model_version" in alias, (alias, [l for l in (p.stdout + p.stderr).splitlines() if "egist" in l or "rror" in l or "champion" in l])
        assert alias["model_version"]["tags"]
        # read back through the server as generate, serve and export read it: three files, the LoRA's bytes checked
        reg = fetch_lora("models:/sdxl-lora-sks-woman@champion", url, tmp_path / "fetched")
        tags = {t["key"]: t["value"] for t in alias["model_version"]["tags"]}
        assert reg.sha256 == tags["lora_sha256"] and reg.generation["resolution"] == 64
        assert sorted(f.name for f in (tmp_path / "fetched").rglob("*") if f.is_file()) == [
            "MLmodel", "checkpoint.json", "pytorch_lora_weights.safetensors"]
    assert not (tmp_path / "mlruns").exists()  # nothing went to the local default store


MOON = "a picture of sks woman showing the thumbs up gesture on the moon"
PNG = b"\x89PNG\r\n\x1a\n"


def generate(*args: str, cwd: Path, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sweep.generate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_generate_without_a_champion_names_the_store_and_the_fix(tmp_path):
    g = generate(f"prompt={MOON}", cwd=tmp_path, timeout=300)
    db = tmp_path / "mlruns" / "mlflow.db"
    assert g.returncode != 0 and f"{db} does not exist" in g.stderr and "tracking_uri=" in g.stderr, g.stderr[-2000:]
    assert "Traceback" not in g.stderr and not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    empty = f"sqlite:///{tmp_path / 'empty.db'}"  # a store with no registered champion
    g = generate(f"prompt={MOON}", f"tracking_uri={empty}", cwd=tmp_path, timeout=300)
    assert g.returncode != 0 and "Traceback" not in g.stderr, g.stderr[-2000:]
    assert f"no registered champion in the store {empty}" in g.stderr
    assert "python -m sweep" in g.stderr
    assert not (tmp_path / "outputs").exists()  # no image: no outputs/generated/ folder either
