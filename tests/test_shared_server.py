"""A team's tracking server with logins (`python -m sweep.server --auth`, MLflow's basic-auth app) on loopback: a
crafted Host header and a request without a login are refused; a sweep logs to it with its login from the
environment; a teammate without EDIT cannot move the champion alias. One server for the module (it takes ~15 s)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from sweep.config import TrackingConfig
from sweep.server import allowed_hosts, main
from sweep.tracking import AccessDenied, Tracker

from .services import MlflowServer

ADMIN = ("admin", "adm1n-pa'ss%word")  # a quote and a % on purpose: the ini MLflow reads interpolates %
ALICE = ("alice", "alice-password-1")  # runs the sweep
BOB = ("bob", "bob-password-12")      # reads only (the server's default for every user)
MODEL = "sdxl-lora-sks-woman"
SMALL = ["lr=1e-4", "steps=2", "train.checkpoint_every=2", "data.resolution=64", "eval.seeds=[0]", "progress=false"]
API = "/api/2.0/mlflow/experiments/search?max_results=1"


def as_user(login: tuple[str, str] | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    return {**env, "MLFLOW_TRACKING_USERNAME": login[0], "MLFLOW_TRACKING_PASSWORD": login[1]} if login else env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("shared"), admin_password=ADMIN[1]).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def admin(server):
    """MLflow's own user administration client, logged in as the admin."""
    from mlflow.server import get_app_client

    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN[0], MLFLOW_TRACKING_PASSWORD=ADMIN[1])
    client = get_app_client("basic-auth", tracking_uri=server.uri)
    for user, password in (ALICE, BOB):
        client.create_user(user, password)
    yield client
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_a_crafted_host_header_and_a_request_without_login_are_refused(server):
    """DNS rebinding: a page on evil.example that resolves its name to this machine sends `Host: evil.example`."""
    url = server.uri + API
    assert requests.get(url, headers={"Host": "evil.example"}, auth=ADMIN).status_code == 403
    assert requests.get(url, headers={"Host": f"evil.example:{server.port}"}).status_code == 403
    anonymous = requests.get(url)
    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"].startswith("Basic")
    assert requests.get(url, auth=(ADMIN[0], "wrong-password-1")).status_code == 401
    assert requests.get(url, auth=ADMIN).status_code == 200
    assert requests.get(url.replace("127.0.0.1", "localhost"), auth=ADMIN).status_code == 200
    ini = server.root / "mlruns" / "auth" / "basic_auth.ini"  # the password is on no command line, only here
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600 and "default_permission = READ" in ini.read_text()
    assert stat.S_IMODE((server.root / "mlruns" / "auth" / "secret_key").stat().st_mode) == 0o600
    assert stat.S_IMODE(ini.parent.stat().st_mode) == 0o700


def test_the_tracker_check_names_the_login_variables(server, admin, monkeypatch):
    """The up-front check (before anything trains): no login, a wrong one, and the right one."""
    tracker = Tracker(TrackingConfig(uri=server.uri), Path("."))
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(AccessDenied, match="asks for a login.*set MLFLOW_TRACKING_USERNAME and "
                                           "MLFLOW_TRACKING_PASSWORD"):
        tracker.check()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ALICE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-her-password")
    with pytest.raises(AccessDenied, match="refused the login MLFLOW_TRACKING_USERNAME=alice: wrong password") as e:
        tracker.check()
    assert "not-her-password" not in str(e.value)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE[1])
    tracker.check()


def test_server_settings_that_open_it_are_refused(tmp_path, monkeypatch, caplog):
    """Never `*` for the Host header, no login beyond loopback without a real admin password, which never goes on
    the command line."""
    for given in ("*", "*:5000", "mlflow.internal:5000,*", "?*"):
        with pytest.raises(Exception, match="would accept any Host header"):
            allowed_hosts("0.0.0.0", 5000, given)
    assert allowed_hosts("127.0.0.1", 5001) == ["127.0.0.1:5001", "localhost:5001"]
    assert allowed_hosts("10.0.0.5", 5000) == ["10.0.0.5:5000"]
    assert "127.0.0.1:5000" in allowed_hosts("0.0.0.0", 5000) and "*" not in allowed_hosts("0.0.0.0", 5000)
    called = []
    monkeypatch.setattr(os, "execv", lambda path, args: called.append(args))  # what it would run, not run
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_CONFIG_PATH"):
        monkeypatch.setenv(name, "")  # main sets some for the server: undone after the test
        monkeypatch.delenv(name)
    root = ["--root", str(tmp_path)]
    assert main(["--host", "0.0.0.0", *root]) == 2 and "from MLFLOW_AUTH_ADMIN_PASSWORD in the environment" in caplog.text
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "password1234")
    assert main(["--host", "0.0.0.0", *root]) == 2 and "default password MLflow once shipped" in caplog.text
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "short")
    assert main(["--host", "0.0.0.0", *root]) == 2 and "12 characters or more" in caplog.text
    assert main(["--host", "0.0.0.0", "--allowed-hosts", "*", *root]) == 2
    assert main(["--cors-allowed-origins", "*", *root]) == 2
    assert not called
    (tmp_path / "pw").write_text("from-a-file-password\n")
    assert main(["--host", "0.0.0.0", "--admin-password-file", str(tmp_path / "pw"), *root]) is None
    cmd = called[0]
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth" and "*" not in cmd[cmd.index("--allowed-hosts") + 1]
    assert not any("from-a-file-password" in c for c in cmd) and "MLFLOW_AUTH_ADMIN_PASSWORD" not in os.environ
    ini = Path(os.environ["MLFLOW_AUTH_CONFIG_PATH"])
    assert "admin_password = from-a-file-password" in ini.read_text() and stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"] == (ini.parent / "secret_key").read_text().strip()
    assert "every request needs a login" in caplog.text


@pytest.mark.slow
def test_a_sweep_logs_with_its_login_and_a_reader_cannot_move_the_champion(server, admin, tmp_path):
    """alice's sweep, her login from the environment, creates the experiment and the model (she manages them);
    bob, who may only read, is refused the alias by the server and told what to ask for by sweep.promote; the
    admin's grant (docs/security.md) lets him."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    env = {**as_user(ALICE), "MLFLOW_TRACKING_URI": server.uri, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "sweep", "-m", "tracking=server", *SMALL], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN[0], MLFLOW_TRACKING_PASSWORD=ADMIN[1])
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("sdxl-lora-sweep")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and any("clip_t" in r.data.metrics for r in runs)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert not (tmp_path / "mlruns").exists()  # nothing went to a local store

    os.environ.update(MLFLOW_TRACKING_USERNAME=BOB[0], MLFLOW_TRACKING_PASSWORD=BOB[1])
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion.version  # he reads
    with pytest.raises(MlflowException) as denied:
        client.set_registered_model_alias(MODEL, "champion", champion.version)
    assert denied.value.error_code == "PERMISSION_DENIED"
    sweep_dir = next((tmp_path / "outputs" / "sweeps").iterdir())
    rule = json.loads((sweep_dir / "report" / "selection.json").read_text())["champion"]
    key = f"{rule['trial']}@2"  # the only checkpoint: a person's pick, its version tagged and the alias set anew
    promote = subprocess.run([sys.executable, "-m", "sweep.promote", key, "reason=bob prefers it",
                              f"sweep={sweep_dir}", "by=bob"], cwd=tmp_path, capture_output=True, text=True,
                             env={**as_user(BOB), "MLFLOW_TRACKING_URI": server.uri}, timeout=600)
    assert promote.returncode == 2 and "Traceback" not in promote.stderr, promote.stderr[-3000:]
    assert f"does not let user bob (MLFLOW_TRACKING_USERNAME) register versions of model {MODEL}" in promote.stderr
    assert f"ask its admin for EDIT on registered model {MODEL}" in promote.stderr
    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN[0], MLFLOW_TRACKING_PASSWORD=ADMIN[1])
    after = client.get_model_version_by_alias(MODEL, "champion")
    assert after.version == champion.version and "review.by" not in after.tags  # nothing moved, nothing tagged

    admin.grant_user_permission(BOB[0], "registered_model", MODEL, "EDIT")  # docs/security.md's command
    os.environ.update(MLFLOW_TRACKING_USERNAME=BOB[0], MLFLOW_TRACKING_PASSWORD=BOB[1])
    client.set_registered_model_alias(MODEL, "champion", champion.version)


def scram_matches(stored: str, password: str) -> bool:
    """Whether PostgreSQL's stored SCRAM-SHA-256 verifier is of `password` (RFC 5802: StoredKey = H(HMAC(
    PBKDF2(password, salt, i), "Client Key")))."""
    import base64
    import hashlib
    import hmac

    method, rest = stored.split("$", 1)
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return method == "SCRAM-SHA-256" and base64.b64encode(hashlib.sha256(client_key).digest()).decode() == \
        keys.split(":")[0]


def test_the_compose_init_script_takes_any_password(tmp_path):
    """deploy/initdb/10-databases.sh on a real PostgreSQL, with passwords holding quotes and SQL: the users get
    exactly those passwords and nothing else runs."""
    from sweep import PROJECT_DIR

    from .services import postgres

    passwords = {"mlflow": "it's'; DROP DATABASE postgres; --", "optuna": 'a"b\\c $HOME `id` %s :x'}
    import psycopg

    with postgres("probe") as urls:  # its URL tells the port
        port = urls["probe"].rsplit(":", 1)[1].split("/")[0]
        env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": port, "MLFLOW_DB_PASSWORD": passwords["mlflow"],
               "OPTUNA_DB_PASSWORD": passwords["optuna"]}
        run = subprocess.run(["sh", str(PROJECT_DIR / "deploy" / "initdb" / "10-databases.sh")], env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres") as c:
            stored = dict(c.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN "
                                    "('mlflow', 'optuna')").fetchall())
            databases = {r[0] for r in c.execute("SELECT datname FROM pg_database").fetchall()}
    assert {"postgres", "mlflow", "mlflow_auth", "optuna"} <= databases
    assert all(scram_matches(stored[user], pw) for user, pw in passwords.items())


def test_cluster_ray_refuses_to_join_a_cluster_without_a_token(tmp_path, monkeypatch):
    """An address with no Ray token here is refused when the launcher is built (before the sweep starts); a token
    from any of Ray's three places, or require_token=false, lets it join; a Ray instance of its own needs none."""
    from hydra_plugins.sdxl_lora_sweep.ray_launcher import RayLauncher
    from sweep.launchers import ray as ray_launcher

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray_launcher, "TOKEN_FILE", tmp_path / "no-token")
    with pytest.raises(ValueError, match="hydra.launcher.address=head:6379: no Ray token here.*RAY_AUTH_MODE=token"):
        RayLauncher(address="head:6379")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(ValueError, match="address=auto"):
        RayLauncher()
    monkeypatch.delenv("RAY_ADDRESS")
    RayLauncher()  # a Ray instance in this process
    RayLauncher(address="head:6379", require_token=False)
    (tmp_path / "token").write_text("abc123\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    RayLauncher(address="head:6379")
    assert ray_launcher.ray_token_source() == str(tmp_path / "token")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a token, but authentication turned off here
    with pytest.raises(ValueError, match="no Ray token here"):
        RayLauncher(address="head:6379")
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(ray_launcher.FORWARDED_ENV)
