"""Real servers on loopback: a sweep logged to `mlflow server` over HTTP, `mlflow ui` on the default store,
the champion served by `mlflow models serve`, and `python -m sweep.generate`."""
import base64
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

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
            except requests.ConnectionError:
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
                             params={"name": "sdxl-lora-champion", "alias": "champion"}).json()
        assert "model_version" in alias, (alias, [l for l in (p.stdout + p.stderr).splitlines() if "egist" in l or "rror" in l or "champion" in l])
        assert alias["model_version"]["tags"]
    assert not (tmp_path / "mlruns").exists()  # nothing went to the local default store


def test_ui_lists_the_sweep_and_the_champion_is_served_over_http(tmp_path):
    p = sweep("-m", "lr=1e-4,5e-4", *SMALL, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:]
    db = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    port = free_port()
    with server(MLFLOW + ["ui", "--backend-store-uri", db, "--host", "127.0.0.1", "--port", str(port)],
                port, "/health", tmp_path) as url:
        assert len(search_runs(url)) == 3
    port = free_port()
    cmd = MLFLOW + ["models", "serve", "-m", "models:/sdxl-lora-champion@champion", "--env-manager", "local",
                    "-h", "127.0.0.1", "-p", str(port)]
    with server(cmd, port, "/ping", tmp_path, env={"MLFLOW_TRACKING_URI": db}) as url:
        r = requests.post(url + "/invocations", timeout=300, json={
            "dataframe_split": {"columns": ["prompt"], "data": [["a picture of sks woman on the moon"]]},
            "params": {"num_inference_steps": 2, "height": 64, "width": 64}})
        assert r.status_code == 200, r.text[:2000]
        pred = r.json()["predictions"][0]
        png = base64.b64decode(pred if isinstance(pred, str) else pred["image"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "moon.png"
    g = subprocess.run([sys.executable, "-m", "sweep.generate", "prompt=a picture of sks woman on the moon",
                        f"out={out}", "steps=2", "size=64", f"tracking_uri={db}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert g.returncode == 0, g.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one byte of the registered LoRA changed (the file still parses): generation refuses it by its hash
    stored = [f for f in tmp_path.rglob("pytorch_lora_weights.safetensors") if "outputs" not in f.parts
              and "best_checkpoint" not in f.parts]
    assert stored
    for f in stored:
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    g = subprocess.run([sys.executable, "-m", "sweep.generate", "prompt=a picture of sks woman on the moon",
                        f"out={tmp_path / 'bad.png'}", "steps=2", "size=64", f"tracking_uri={db}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert g.returncode != 0 and "content hash" in g.stderr and "Traceback" not in g.stderr, g.stderr[-2000:]
    assert not (tmp_path / "bad.png").exists()
