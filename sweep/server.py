"""`python -m sweep.server`: the MLflow tracking server a team's sweeps log to (runs, metrics, registry, artifacts).

    python -m sweep.server                                   # 127.0.0.1:5000, the local store in ./mlruns, no logins
    export MLFLOW_AUTH_ADMIN_PASSWORD=...                    # (or --admin-password-file) then, for the team:
    python -m sweep.server --host 0.0.0.0 --allowed-hosts mlflow.internal:5000 \\
        --backend-store-uri postgresql+psycopg://mlflow@db/mlflow --artifacts-destination s3://bucket/mlflow

It binds to 127.0.0.1 unless `--host` says otherwise. Beyond loopback every request needs a login: MLflow's own
basic-auth app (`mlflow server --app-name basic-auth`, `pip install -e '.[auth]'`), its admin password read from
MLFLOW_AUTH_ADMIN_PASSWORD or a file (never the command line), users read-only unless an admin grants more
(docs/security.md: giving a teammate access). `--auth` turns logins on on loopback too. The server answers only
requests whose Host header names it (`--allowed-hosts`, default the address and port it binds): a web page that
rebinds its own name to this machine is refused. Workers log to it with `tracking.uri=http://HOST:PORT` and
their login in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. Passwords in the store URLs are masked in
everything this command prints."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.files import write_atomic

from .redaction import redact

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"  # MLflow's own variable for the first admin's password
USERNAME_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"  # signs the auth app's forms (CSRF); the same for every worker
ALLOWED_HOSTS_ENV = "MLFLOW_SERVER_ALLOWED_HOSTS"
MLFLOW_DEFAULT_PASSWORD = "password1234"  # what MLflow's basic_auth.ini shipped before 3.x: publicly known
MIN_PASSWORD = 12  # MLflow's own rule for every password


class ServerError(UserError):
    """The server's settings are refused before it starts."""


@dataclass(frozen=True)
class Auth:
    """Logins on: where MLflow's basic-auth app reads its settings and its users (a private folder)."""
    config: Path  # the MLFLOW_AUTH_CONFIG_PATH ini, 0600
    secret_key: str
    database_uri: str


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def allowed_hosts(host: str, port: int, given: str | None = None) -> list[str]:
    """The Host headers the server answers: `given` (a comma list; MLflow's wildcards such as *.corp.com allowed),
    else the name and port it binds (every name of this machine when it binds all addresses). Never `*`: a
    server that answers any Host header is open to DNS rebinding from any web page its users visit."""
    if given:
        hosts = [h.strip() for h in given.split(",") if h.strip()]
        bad = [h for h in hosts if h.rsplit(":", 1)[0].strip("[]*?.") == ""]
        if bad or not hosts:
            raise ServerError(f"--allowed-hosts={given}: {', '.join(bad) or 'empty'} would accept any Host header "
                              "(DNS rebinding: a web page could drive the store). Name the host and port workers "
                              "use, e.g. --allowed-hosts mlflow.internal:5000,10.0.0.5:5000")
        return hosts
    if is_loopback(host):
        names = [LOOPBACK, "localhost"]
    elif _is_wildcard(host):
        names = list(dict.fromkeys([socket.gethostname(), socket.getfqdn(), LOOPBACK, "localhost"]))
    else:
        names = [f"[{host}]" if ":" in host else host]
    return [f"{n}:{port}" for n in names]


def admin_password(password_file: Path | None) -> str:
    """The first admin's password: from the file, else MLFLOW_AUTH_ADMIN_PASSWORD. Refused when it is missing,
    MLflow's old default, or shorter than MLflow accepts."""
    if password_file is not None:
        try:
            password = Path(password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ServerError(f"--admin-password-file={password_file}: cannot read it ({exc.strerror})") from None
        source = f"--admin-password-file={password_file}"
    else:
        password, source = os.environ.get(PASSWORD_ENV, ""), PASSWORD_ENV
    if not password:
        raise ServerError(f"logins need the admin's password, from {PASSWORD_ENV} in the environment (set it), or give "
                          "--admin-password-file PATH (a file only you can read); never on the command line")
    if password == MLFLOW_DEFAULT_PASSWORD:
        raise ServerError(f"{source}: {MLFLOW_DEFAULT_PASSWORD!r} is the default password MLflow once shipped, "
                          "which anyone can look up; choose another")
    if len(password) < MIN_PASSWORD or password != password.strip() or any(c in password for c in "\r\n\0"):
        raise ServerError(f"{source}: the admin's password needs {MIN_PASSWORD} characters or more, no line "
                          "breaks and no spaces at either end (e.g. python -c 'import secrets; "
                          "print(secrets.token_urlsafe(18))')")
    return password


def write_private(path: Path, text: str) -> None:
    """A file only this user can read (0600), written whole or not at all."""
    old = os.umask(0o077)
    try:
        write_atomic(path, text)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


def private_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def secret_key(folder: Path) -> str:
    """MLFLOW_FLASK_SERVER_SECRET_KEY if set, else the one kept in <folder>/secret_key (made once, 0600): every
    worker and every restart must sign with the same key."""
    if os.environ.get(SECRET_KEY_ENV):
        return os.environ[SECRET_KEY_ENV]
    kept = folder / "secret_key"
    if not kept.is_file():
        write_private(kept, secrets.token_urlsafe(32))
    return kept.read_text().strip()


def _ini_value(value: str) -> str:
    return value.replace("%", "%%")  # MLflow reads the ini with configparser's %-interpolation


def auth_settings(folder: Path, username: str, password: str, database_uri: str | None) -> Auth:
    """Write the basic-auth app's settings into <folder>/basic_auth.ini (0600): the first admin (created once,
    when the user store is empty; its password is changed afterwards through MLflow, not here), the user store
    (sqlite in the folder unless given), and READ for every user on what they did not create or were not granted."""
    folder = private_folder(folder)
    database_uri = database_uri or f"sqlite:///{(folder / 'basic_auth.db').resolve()}"
    ini = folder / "basic_auth.ini"
    write_private(ini, "\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = {_ini_value(database_uri)}",
        f"admin_username = {_ini_value(username)}",
        f"admin_password = {_ini_value(password)}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false", ""]))
    return Auth(ini, secret_key(folder), database_uri)


def command(host: str = LOOPBACK, port: int = 5000, backend_store_uri: str | None = None,
            artifacts_destination: str | None = None, root: Path = Path("."), workers: int | None = None,
            hosts: list[str] | None = None, auth: bool = False, cors_origins: str | None = None) -> list[str]:
    """The `mlflow server` command line: the local store under <root>/mlruns unless told otherwise."""
    folder = (Path(root) / "mlruns").resolve()
    if backend_store_uri is None:
        folder.mkdir(parents=True, exist_ok=True)
        backend_store_uri = f"sqlite:///{folder / 'mlflow.db'}"
    if artifacts_destination is None:
        artifacts_destination = str(folder / "server-artifacts")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", artifacts_destination, "--host", host, "--port", str(port),
           "--allowed-hosts", ",".join(hosts or allowed_hosts(host, port))]
    if cors_origins:
        cmd += ["--cors-allowed-origins", cors_origins]
    if workers:
        cmd += ["--workers", str(workers)]
    if auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


def _check_auth_installed() -> None:
    try:
        import flask_wtf  # noqa: F401  (MLflow's basic-auth app needs it: the mlflow[auth] extra)
    except ImportError:
        raise ServerError("logins need MLflow's auth extra: pip install -e '.[auth]' (or pip install "
                          "'mlflow[auth]')") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweep.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=LOOPBACK, help="address to bind (default 127.0.0.1: this machine only); any "
                   "other address turns logins on")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default=None,
                   help="SQLAlchemy URL of the run store (default sqlite:///<root>/mlruns/mlflow.db)")
    p.add_argument("--artifacts-destination", default=None,
                   help="where artifacts go: a folder or s3://bucket/prefix (default <root>/mlruns/server-artifacts)")
    p.add_argument("--root", default=".", help="folder of the default store")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--allowed-hosts", default=os.environ.get(ALLOWED_HOSTS_ENV),
                   help="Host headers it answers, comma-separated (e.g. mlflow.internal:5000); default the "
                   f"address and port it binds ({ALLOWED_HOSTS_ENV} if set); never '*'")
    p.add_argument("--cors-allowed-origins", default=None,
                   help="web origins (other than localhost) whose pages may change the store; default none")
    p.add_argument("--auth", action="store_true", help="logins on loopback too (always on beyond it)")
    p.add_argument("--admin-username", default=os.environ.get(USERNAME_ENV) or "admin",
                   help="the first admin, created when the user store is empty (default admin)")
    p.add_argument("--admin-password-file", type=Path, default=None,
                   help=f"a file holding the first admin's password (default: {PASSWORD_ENV})")
    p.add_argument("--auth-dir", type=Path, default=None,
                   help="private folder of the login settings, secret key and (sqlite) user store "
                   "(default <root>/mlruns/auth, mode 0700)")
    p.add_argument("--auth-database-uri", default=None,
                   help="SQLAlchemy URL of the user store (default sqlite in --auth-dir)")
    return p


def prepare(a: argparse.Namespace) -> tuple[list[str], Auth | None]:
    """Check the settings and write the login files; (the mlflow command, the logins or None)."""
    if a.cors_allowed_origins and "*" in [o.strip() for o in a.cors_allowed_origins.split(",")]:
        raise ServerError(f"--cors-allowed-origins={a.cors_allowed_origins}: '*' lets any web page change the "
                          "store; name the origins, e.g. https://notebooks.corp.com")
    hosts = allowed_hosts(a.host, a.port, a.allowed_hosts)
    auth = None
    if a.auth or not is_loopback(a.host):
        _check_auth_installed()
        password = admin_password(a.admin_password_file)
        folder = a.auth_dir or Path(a.root) / "mlruns" / "auth"
        auth = auth_settings(folder, a.admin_username, password, a.auth_database_uri)
    cmd = command(a.host, a.port, a.backend_store_uri, a.artifacts_destination, Path(a.root), a.workers, hosts,
                  auth is not None, a.cors_allowed_origins)
    return cmd, auth


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cmd, auth = prepare(a)
    except UserError as exc:
        log.error("%s", exc)
        return 2
    if not is_loopback(a.host):
        log.warning("binding %s: every request needs a login, but over plain HTTP; put TLS in front (a reverse "
                    "proxy) or keep the network private (VPN, SSH tunnel)", a.host)
    log.info("%s", " ".join(redact("cmd", c) for c in cmd[1:]))
    shown = LOOPBACK if is_loopback(a.host) or _is_wildcard(a.host) else a.host
    log.info("workers log to it with: tracking.uri=http://%s:%d%s", shown, a.port,
             " and their login in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" if auth else "")
    if auth:
        log.info("logins: admin %r, settings in %s (0600), users in %s; users read everything and change only "
                 "what they create or are granted (docs/security.md)", a.admin_username, auth.config,
                 redact("uri", auth.database_uri))
        os.environ.update({"MLFLOW_AUTH_CONFIG_PATH": str(auth.config), SECRET_KEY_ENV: auth.secret_key})
        for name in (PASSWORD_ENV, USERNAME_ENV):  # the ini holds them; MLflow would let these override it
            os.environ.pop(name, None)
    sys.stdout.flush()
    # MLflow 3's server also starts job consumers (five huey processes, for GenAI jobs) that a sweep never uses: on
    # a small machine they take CPU from the trials. MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings them back.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(cmd[0], cmd)  # the server is this process: stopping it stops the server


if __name__ == "__main__":
    sys.exit(main())
