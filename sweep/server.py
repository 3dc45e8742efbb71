"""`python -m sweep.server`: the MLflow tracking server a team's sweeps log to (runs, metrics, registry, artifacts).

    python -m sweep.server                                   # 127.0.0.1:5000, the local store in ./mlruns
    python -m sweep.server --backend-store-uri postgresql+psycopg://mlflow:PW@db/mlflow \\
                           --artifacts-destination s3://bucket/mlflow --host 0.0.0.0

It binds to 127.0.0.1 unless `--host` says otherwise (a tracking server has no authentication: opening it to a
network is a decision, and it is warned about). Workers then log to it with `tracking.uri=http://HOST:PORT`.
Passwords in the store URLs are masked in everything this command prints."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from .redaction import redact

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


def command(host: str = LOOPBACK, port: int = 5000, backend_store_uri: str | None = None,
            artifacts_destination: str | None = None, root: Path = Path("."), workers: int | None = None) -> list[str]:
    """The `mlflow server` command line: the local store under <root>/mlruns unless told otherwise."""
    folder = (Path(root) / "mlruns").resolve()
    if backend_store_uri is None:
        folder.mkdir(parents=True, exist_ok=True)
        backend_store_uri = f"sqlite:///{folder / 'mlflow.db'}"
    if artifacts_destination is None:
        artifacts_destination = str(folder / "server-artifacts")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", artifacts_destination, "--host", host, "--port", str(port)]
    if workers:
        cmd += ["--workers", str(workers)]
    if not is_loopback(host):  # the server's host check would refuse requests naming this machine otherwise
        cmd += ["--allowed-hosts", "*"]
    return cmd


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweep.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=LOOPBACK, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default=None,
                   help="SQLAlchemy URL of the run store (default sqlite:///<root>/mlruns/mlflow.db)")
    p.add_argument("--artifacts-destination", default=None,
                   help="where artifacts go: a folder or s3://bucket/prefix (default <root>/mlruns/server-artifacts)")
    p.add_argument("--root", default=".", help="folder of the default store")
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not is_loopback(a.host):
        log.warning("binding %s: anyone who can reach this machine can read and change every run (MLflow has no "
                    "login by default); put it behind a proxy with authentication, or keep the default 127.0.0.1",
                    a.host)
    cmd = command(a.host, a.port, a.backend_store_uri, a.artifacts_destination, Path(a.root), a.workers)
    log.info("%s", " ".join(redact("cmd", c) for c in cmd[1:]))
    log.info("workers log to it with: tracking.uri=http://%s:%d", LOOPBACK if is_loopback(a.host) else a.host, a.port)
    sys.stdout.flush()
    # MLflow 3's server also starts job consumers (five huey processes, for GenAI jobs) that a sweep never uses: on
    # a small machine they take CPU from the trials. MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings them back.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(cmd[0], cmd)  # the server is this process: stopping it stops the server


if __name__ == "__main__":
    sys.exit(main())
