"""Real servers for the tests, on loopback: PostgreSQL (Debian's package, a throwaway cluster) and the MLflow
tracking server this project starts (`python -m sweep.server`). Nothing here is a fake."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find_pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).is_file():
            return str(d / name)
    return None


@contextmanager
def postgres(*databases: str) -> Iterator[dict[str, str]]:
    """A PostgreSQL server on 127.0.0.1 with `databases` created; yields {name: SQLAlchemy URL}."""
    initdb, pg_ctl = _find_pg_bin("initdb"), _find_pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    data = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    as_user = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(as_user + [initdb, "-D", str(data / "db"), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    subprocess.run(as_user + [pg_ctl, "-D", str(data / "db"), "-l", str(data / "log"), "-w", "-o",
                              f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"],
                   check=True, capture_output=True)
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as c:
            for db in databases:
                c.execute(f"CREATE DATABASE {db}")
        yield {db: f"postgresql+psycopg://postgres@127.0.0.1:{port}/{db}" for db in databases}
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data / "db"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


class MlflowServer:
    """`python -m sweep.server` on 127.0.0.1: started, stopped (to play an outage) and started again on one port."""

    def __init__(self, root: Path, backend_store_uri: str | None = None, port: int | None = None,
                 admin_password: str | None = None):
        self.root, self.backend = Path(root), backend_store_uri
        self.admin_password = admin_password  # logins on (--auth), the first admin's password from the environment
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "sweep.server", "--port", str(self.port), "--root", str(self.root)]
        if self.backend:
            cmd += ["--backend-store-uri", self.backend]
        env = dict(os.environ)
        if self.admin_password:
            cmd += ["--auth", "--workers", "1"]
            env["MLFLOW_AUTH_ADMIN_PASSWORD"] = self.admin_password
        self.log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MLflow server ended: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"MLflow server did not answer on {self.uri}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers, at once: an outage
            self.proc.wait()
        self.proc = None


@contextmanager
def mlflow_server(root: Path, backend_store_uri: str | None = None) -> Iterator[MlflowServer]:
    server = MlflowServer(root, backend_store_uri).start()
    try:
        yield server
    finally:
        server.stop()


def trial_runs(client, experiment: str) -> list:
    """The trials' MLflow runs (children of a sweep run) of this experiment; none before it exists."""
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags] if exp else []


def kill_a_batch_mid_pack(proc: subprocess.Popen, cwd: Path, client, size: int,
                          experiment: str = "sdxl-lora-sweep") -> tuple[str, int]:
    """SIGKILL the process (a job process, a Ray worker) of the first batch of `size` trials that have all written
    their step-2 checkpoint (mid-pack: they train on to a later step); returns (its batch number, its pid), read
    from its trials' MLflow runs (tags `batch` and `worker` = host:pid)."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        batches: dict[str, list] = {}
        for r in trial_runs(client, experiment):
            if "batch" in r.data.tags:
                batches.setdefault(r.data.tags["batch"], []).append(r)
        for batch, members in sorted(batches.items()):
            if len(members) == size and all(
                    list(cwd.glob(f"outputs/sweeps/*/{r.data.tags['trial_folder']}/checkpoints/step-000002"))
                    for r in members):
                pid = int(members[0].data.tags["worker"].rsplit(":", 1)[1])
                os.kill(pid, signal.SIGKILL)
                return batch, pid
        time.sleep(0.1)
    raise AssertionError(f"no batch of {size} reached its first checkpoints: {proc.communicate()[0][-5000:]}")
