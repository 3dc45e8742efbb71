"""MLflow: one parent run per sweep, one child run per trial. The only module (with registry.py) that imports mlflow.

The parent run and experiment are created by the launching process before any trial starts (concurrent
first use of one SQLite store races); trials find the parent through `sweep.json` in the sweep folder
and link to it with the `mlflow.parentRunId` tag, so they may run in other processes or machines.

A tracking server that does not answer when a sweep starts stops it there, with the fix. One that goes away
mid-sweep costs nothing: training goes on, and every record it could not take (runs, params, metrics, tags,
artifacts, statuses) waits in `<sweep>/mlflow_pending.jsonl`, in order, to be sent when it answers again (tried
at every trial's end and at the sweep's end; `python -m sweep.tracking sync <sweep folder>` afterwards). A resumed
trial's run is reopened, and metrics it already holds are not logged twice."""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from common import stop
from common.errors import UserError

from ..config import TrackingConfig
from ..redaction import MASK, redact, redact_logs
from ..results import SWEEP_FILE, display_name, write_json

log = logging.getLogger(__name__)

PENDING_FILE = "mlflow_pending.jsonl"
PLACEHOLDER = "pending-"  # a run id handed out while the server was away; the real one replaces it when sent
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # not a GenAI experiment
RETRY_AFTER_S = 30.0  # after a failed request, records go straight to the journal this long before trying again
_journal_lock = threading.Lock()
_open: dict[str, "Tracker"] = {}  # runs this process opened or reopened and has not ended: {run id: its tracker}
_open_lock = threading.Lock()


def worker() -> str:
    """This process as runs record it (tag `worker`): a later sweep closes a RUNNING run whose process is gone."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _literal(value: str) -> str | None:
    """`value` as a string of MLflow's filter grammar, which has no escapes: in the quotes it does not contain
    (a swept prompt may hold an apostrophe); None when it holds both kinds (then filter on something else)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def _opened(run_id: str, tracker: "Tracker") -> None:
    with _open_lock:
        _open[run_id] = tracker


def _ended(run_id: str) -> None:
    with _open_lock:
        _open.pop(run_id, None)


def close_open_runs(status: str) -> int:
    """End every run this process opened and has not ended (`status`: KILLED for a stop, FAILED for an error), so
    that no exit but SIGKILL leaves a RUNNING run. Returns how many it ended."""
    with _open_lock:
        runs = list(_open.items())
    for run_id, tracker in runs:
        try:
            tracker.set_tags(run_id, {"stop_reason": f"the process ended ({status})"})
            tracker.finish(run_id, status)
        except Exception as exc:  # ending other runs matters more; a later sweep closes this one as stale
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, exc)
    return len(runs)


def _close_at_once() -> None:
    """An immediate stop's last words: the open runs KILLED, straight to the store (no journal, no retries)."""
    with _open_lock:
        runs = list(_open.items())
    for run_id, tracker in runs:
        if not run_id.startswith(PLACEHOLDER):
            tracker.client.set_terminated(run_id, "KILLED")


stop.at_once(_close_at_once)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def store_uri(cfg: TrackingConfig, root: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment)."""
    if cfg.uri:
        return cfg.uri, None
    folder = (root / "mlruns").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


LOOPBACK = ("localhost", "127.0.0.1", "::1")


class StoreNotNamed(UserError):
    """A command opening a sweep folder would write to a server its caller did not name."""


def caller_store(given: str | None = None) -> str | None:
    """The MLflow store the person running a command names: its tracking_uri= argument, else MLFLOW_TRACKING_URI."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or None


def recorded_store(sweep: dict | None, cfg: TrackingConfig) -> str | None:
    """The store a sweep folder says it logged to: sweep.json's (what its launching process used), else its stored
    tracking.uri when that is a plain value (a stored `${oc.env:...}` is text, not a URI); None: the default local
    store under paths.root."""
    uri = (sweep or {}).get("tracking_uri") or cfg.uri
    return uri if uri and "${" not in uri else None


def on_this_machine(uri: str) -> bool:
    """A store on this machine: a file (sqlite:///, file:, a path) or a server on loopback."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return parsed.hostname in LOOPBACK
    return parsed.scheme in ("", "file", "sqlite")


def folder_store(recorded: str | None, caller: str | None, folder: Path) -> str | None:
    """Where a command that opens a sweep folder (sweep.report, sweep.promote, sweep.tracking sync) writes its
    records: the caller's store, always (a line says so when the folder recorded another); without one, the folder's
    own only when it is on this machine. A folder's stored URI never sends records, nor the caller's MLflow
    credentials (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), to a server the caller did not name."""
    if caller:
        if recorded and recorded != caller:
            log.warning("%s recorded its runs in %s; writing to %s, the store you named (tracking_uri= or "
                        "MLFLOW_TRACKING_URI)", folder, redact("uri", recorded), redact("uri", caller))
        return caller
    if recorded is None or on_this_machine(recorded):
        return recorded
    shown = redact("uri", recorded)
    raise StoreNotNamed(f"{folder} recorded its runs on {shown}, a server you did not name: nothing was written. To "
                        f"write there, name it: tracking_uri={shown} (or MLFLOW_TRACKING_URI={shown}); to write "
                        "elsewhere, name that store")


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {redact('uri', uri)}"


def credentials_to_env(uri: str) -> str:
    """An http(s) tracking URI without its user:password@: the credentials go to MLflow's own variables
    (MLFLOW_TRACKING_USERNAME/PASSWORD, read by this process and the trial processes it starts), so that MLflow
    never holds them in a URL it prints ("View run at ...") or puts in an error. A password already hidden (`***`,
    from a stored config) leaves the variables as they are."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    if sep and password != MASK:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return urlunsplit(parts._replace(netloc=host))


class TrackingUnavailable(UserError):
    """The tracking server did not answer when the sweep started."""


def _quick_retries() -> None:
    """MLflow retries a failed request 7 times with doubling waits (minutes in all); a sweep journals instead."""
    for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                 ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        os.environ.setdefault(k, v)


def is_outage(exc: BaseException) -> bool:
    """A request that failed because the server is away or broken (worth retrying), not because it was wrong (nor
    refused: a login or a permission missing is the user's to fix, never journaled as an outage)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, MlflowException):
        if _refused(exc):
            return False
        return "API request to" in str(exc) or exc.get_http_status_code() >= 500
    return False


class AccessDenied(UserError):
    """The tracking server asked for a login, refused it, or refused this user the change."""


LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # MLflow's client sends them (basic auth)


def _refused(exc: BaseException) -> int:
    """401 (no or wrong login) or 403 (no permission) when the server refused the request, else 0."""
    code = getattr(exc, "get_http_status_code", lambda: 0)()
    if code in (401, 403):
        return code
    return {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(getattr(exc, "error_code", ""), 0)


def access_error(exc: BaseException, uri: str, what: str, grant: str) -> AccessDenied | None:
    """The error a user acts on for a refused request (None for any other failure): which variables to set, or
    which permission to ask the server's admin for."""
    code = _refused(exc)
    user = os.environ.get(LOGIN_ENV[0])
    where = redact("uri", uri)
    if code == 401 and not (user and os.environ.get(LOGIN_ENV[1])):
        return AccessDenied(f"the MLflow server at {where} asks for a login to {what}: set {LOGIN_ENV[0]} and "
                            f"{LOGIN_ENV[1]} in the environment (your account there: its admin creates it, "
                            "docs/security.md), never in tracking.uri")
    if code == 401:
        return AccessDenied(f"the MLflow server at {where} refused the login {LOGIN_ENV[0]}={user}: wrong password "
                            f"or no such user; check {LOGIN_ENV[0]} and {LOGIN_ENV[1]}")
    if code == 403:
        return AccessDenied(f"the MLflow server at {where} does not let user {user or '?'} ({LOGIN_ENV[0]}) {what}: "
                            f"ask its admin for {grant} (docs/security.md: giving a teammate access)")
    return None


@contextmanager
def permitted(uri: str, what: str, grant: str) -> Iterator[None]:
    """Requests inside that the server refuses (login, permission) raise AccessDenied naming the fix."""
    try:
        yield
    except Exception as exc:
        error = access_error(exc, uri, what, grant)
        if error is None:
            raise
        raise error from None


class Tracker:
    def __init__(self, cfg: TrackingConfig, root: Path):
        import mlflow
        from mlflow import MlflowClient

        redact_logs("mlflow")  # mlflow logs through its own handler, installed on import
        self.cfg = cfg
        uri, self.artifact_location = store_uri(cfg, root)
        self.uri = credentials_to_env(uri)
        self.remote = self.uri.startswith(("http://", "https://"))
        if self.remote:
            _quick_retries()
        mlflow.set_tracking_uri(self.uri)
        self.mlflow = mlflow
        self.client = MlflowClient(self.uri)
        self.pending: Path | None = None  # the journal, once the sweep folder is known (use_journal)
        self._down_since = 0.0
        self._reopened: dict[str, dict[str, set[int]]] = {}  # resumed runs: {metric: steps it holds}, read once

    def check(self) -> None:
        """Refuse to start a sweep against a tracking server that does not answer."""
        if not self.remote:
            return
        import requests

        try:
            requests.get(self.uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.exceptions.RequestException as exc:
            port = re.search(r":(\d+)", self.uri.split("//", 1)[1])
            raise TrackingUnavailable(
                f"tracking.uri={redact('uri', self.uri)}: no MLflow server answers there ({type(exc).__name__}). "
                f"Start one (python -m sweep.server{' --port ' + port.group(1) if port else ''}), fix the URI, or "
                "leave tracking.uri unset to record in ./mlruns; nothing was trained") from None
        with permitted(self.uri, f"read experiment {self.cfg.experiment}", f"READ on experiment "
                       f"{self.cfg.experiment}"):  # /health needs no login: a request that does, before training
            self.client.get_experiment_by_name(self.cfg.experiment)

    # the journal: what the server could not take, in order --------------------------------------------------
    def use_journal(self, sweep_dir: Path) -> None:
        if self.remote:
            self.pending = Path(sweep_dir) / PENDING_FILE

    @contextmanager
    def _locked_journal(self):
        self.pending.parent.mkdir(parents=True, exist_ok=True)
        with _journal_lock, open(self.pending.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other trial processes of the sweep append to it too
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _journaled(self) -> int:
        return sum(1 for _ in open(self.pending)) if self.pending and self.pending.is_file() else 0

    def _requests(self) -> dict[str, Callable]:
        """The requests the journal can hold, by the name each is recorded under."""
        return {f.__name__.lstrip("_"): f for f in (
            self._end_sweep, self._child_run, self._log_params, self._log_metrics, self._set_tags, self._log_artifacts,
            self._log_image, self._finish)}

    def _send(self, request: Callable, *args):
        """Do `request` now, or, with the server away (or records already waiting), journal it behind the others."""
        op = request.__name__.lstrip("_")
        if self.pending is None:
            return request(*args)
        if self._journaled() and not self.flush():
            return self._append(op, args)
        if time.monotonic() - self._down_since < RETRY_AFTER_S:
            return self._append(op, args)
        try:
            return request(*args)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._down_since = time.monotonic()
            log.warning("MLflow at %s did not answer (%s); training goes on and its records wait in %s",
                        redact("uri", self.uri), str(exc).splitlines()[0][:200], self.pending)
            return self._append(op, args)

    def _append(self, op: str, args: tuple):
        result = None
        if op == "child_run":  # the run id the trial goes on with; the real one replaces it when sent
            result = PLACEHOLDER + uuid.uuid4().hex
            args = (*args, result)
        with self._locked_journal(), open(self.pending, "a") as f:
            f.write(json.dumps({"op": op, "args": list(args)}, default=str) + "\n")
        return result

    def flush(self) -> bool:
        """Send what waits in the journal, in order. True when nothing waits any more."""
        if self.pending is None or not self.pending.is_file():
            return True
        if time.monotonic() - self._down_since < RETRY_AFTER_S:
            return False
        with self._locked_journal():
            entries = [json.loads(ln) for ln in self.pending.read_text().splitlines() if ln.strip()]
            ids: dict[str, str] = {}
            sent = 0
            requests = self._requests()
            try:
                for e in entries:
                    args = [ids.get(a, a) if isinstance(a, str) else a for a in e["args"]]
                    if e["op"] == "child_run":
                        ids[args[-1]] = self._child_run(*args[:-1])
                    else:
                        requests[e["op"]](*args)
                    sent += 1
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self._down_since = time.monotonic()
            rest = [{"op": e["op"], "args": [ids.get(a, a) if isinstance(a, str) else a for a in e["args"]]}
                    for e in entries[sent:]]
            tmp = self.pending.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in rest))
            tmp.replace(self.pending)
            if not rest:
                self.pending.unlink()
        if sent:
            log.info("MLflow at %s: %d waiting record(s) sent, %d still waiting", redact("uri", self.uri), sent,
                     len(rest))
        return not rest

    def waiting(self) -> int:
        """Records still in the journal."""
        return self._journaled()

    # sweep level -----------------------------------------------------------------------------------------
    def start_sweep(self, sweep_dir: Path, name: str, tags: dict[str, str]) -> dict[str, str]:
        """Create (or, for a resumed sweep, reopen) the experiment and the parent run; record them in sweep.json."""
        record_path = Path(sweep_dir) / SWEEP_FILE
        self.close_stale()
        if record_path.is_file():
            rec = json.loads(record_path.read_text())
            self.client.update_run(rec["parent_run_id"], status="RUNNING")
            self.client.set_tag(rec["parent_run_id"], "worker", worker())
            _opened(rec["parent_run_id"], self)
            return rec
        with permitted(self.uri, f"log runs to experiment {self.cfg.experiment}",
                       f"EDIT on experiment {self.cfg.experiment}"):
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                self.cfg.experiment, artifact_location=self.artifact_location)
            if not (exp and EXPERIMENT_KIND[0] in exp.tags):  # the UI shows it as model training (runs, charts)
                self.client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
            tags = {k: redact(k, v) for k, v in {**tags, "sweep_dir": str(sweep_dir), "kind": "sweep"}.items()}
            run = self.client.create_run(exp_id, run_name=name, tags={**tags, "worker": worker()})
            _opened(run.info.run_id, self)
        rec = {"parent_run_id": run.info.run_id, "experiment_id": exp_id, "tracking_uri": redact("uri", self.uri)}
        write_json(record_path, rec)
        return rec

    def end_sweep(self, parent_run_id: str, status: str = "FINISHED") -> None:
        self._send(self._end_sweep, parent_run_id, status)
        _ended(parent_run_id)

    def close_stale(self) -> int:
        """Mark KILLED the experiment's RUNNING runs whose process is gone: started on this host (tag `worker`) by a
        process that no longer runs (killed with SIGKILL, a machine that rebooted). One query, on status. Returns how
        many it closed; a server that does not answer closes none (the next sweep tries again)."""
        try:
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                return 0
            host, closed = socket.gethostname(), 0
            for r in self.client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                             max_results=5000):
                w_host, _, pid = r.data.tags.get("worker", "").rpartition(":")
                if w_host == host and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                    self.client.set_tag(r.info.run_id, "stop_reason", f"its process ({host}:{pid}) ended without "
                                                                      "closing it")
                    self.client.set_terminated(r.info.run_id, "KILLED")
                    closed += 1
        except Exception as exc:
            if not is_outage(exc):
                raise
            return 0
        if closed:
            log.info("%d MLflow run(s) left RUNNING by processes that are gone marked KILLED", closed)
        return closed

    def _end_sweep(self, parent_run_id: str, status: str) -> None:
        # always set: registering the champion ends the parent as FINISHED on the way (mlflow.start_run's exit);
        # a rebuilt report, whose parent ended long ago, does not call this at all (finalize_folder)
        self.client.set_terminated(parent_run_id, status)

    def run_status(self, run_id: str) -> str | None:
        """A run's status ("RUNNING", "FINISHED", ...), None when it cannot be read now (server away, records
        waiting, a placeholder id)."""
        if not run_id or run_id.startswith(PLACEHOLDER) or self.waiting():
            return None
        try:
            return self.client.get_run(run_id).info.status
        except Exception as exc:
            if not is_outage(exc):
                raise
            return None

    def reviews(self) -> dict[str, bool]:
        """{sweep folder: whether the person kept the rule's pick} for every sweep in the store a person reviewed
        (python -m sweep.promote: the parent run's tag review.agreed)."""
        try:
            ids = [e.experiment_id for e in self.client.search_experiments()]
            out = {}
            for value in ("true", "false"):
                for r in self.client.search_runs(ids, filter_string=f"tags.`review.agreed` = '{value}'",
                                                  max_results=5000):
                    out[r.data.tags.get("sweep_dir", r.info.run_id)] = value == "true"
            return out
        except Exception as exc:  # a server that is away gives no count (the sweep's records wait in its journal)
            if is_outage(exc):
                return {}
            raise

    def reopen(self, run_id: str) -> None:
        """Metrics logged to this run from now on skip the steps it already holds (a resumed run, a rebuilt report)."""
        self._reopened.setdefault(run_id, {})

    # trial level -----------------------------------------------------------------------------------------
    def child_run(self, sweep: dict[str, str], trial: str, tags: dict[str, str]) -> str:
        """The trial's run under the sweep's parent: reopened if this trial was started before (resume)."""
        return self._send(self._child_run, sweep, trial, tags)

    def _child_run(self, sweep: dict[str, str], trial: str, tags: dict[str, str]) -> str:
        found = self._child(sweep, "trial", trial)
        tags = {**{k: redact(k, v) for k, v in tags.items()}, "trial": trial, "mlflow.parentRunId": sweep["parent_run_id"]}
        if found:
            run_id = found.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self._reopened[run_id] = {}  # what it holds is read when metrics come
            self._set_tags(run_id, tags)  # where it runs now (worker, GPU, batch) may differ from the first time
            _opened(run_id, self)
            return run_id
        run = self.client.create_run(sweep["experiment_id"], run_name=display_name(trial), tags=tags)
        _opened(run.info.run_id, self)
        return run.info.run_id

    def find_child(self, sweep: dict[str, str], trial: str) -> str | None:
        """The run of `trial` under the sweep's parent, None when it has none (or it cannot be read now)."""
        if self.waiting():
            return None
        found = self._child(sweep, "trial", trial)
        return found.info.run_id if found else None

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def _child(self, sweep: dict[str, str], tag: str, value: str, status: str | None = None):
        """The sweep's child run whose tag `tag` is `value` (a trial's key or folder: the user's swept values, quotes
        and all), optionally only in `status`; None if there is none."""
        where = f"tags.`mlflow.parentRunId` = '{sweep['parent_run_id']}'"
        if status:
            where += f" and attributes.status = '{status}'"
        lit = _literal(value)
        if lit is not None:
            found = self.client.search_runs([sweep["experiment_id"]], f"{where} and tags.{tag} = {lit}",
                                            max_results=1)
            return found[0] if found else None
        runs = self.client.search_runs([sweep["experiment_id"]], where, max_results=50000)  # both quote kinds
        return next((r for r in runs if r.data.tags.get(tag) == value), None)

    def running_child(self, sweep: dict[str, str], trial_folder: str) -> str | None:
        """The RUNNING run of the trial in `trial_folder` under the sweep's parent (a lost trial's), if any."""
        found = self._child(sweep, "trial_folder", trial_folder, "RUNNING")
        return found.info.run_id if found else None

    @contextmanager
    def active(self, run_id: str) -> Iterator[None]:
        """The run as MLflow's active run (system metrics: GPU memory/utilisation, CPU, RAM) while training; with
        the server away, training goes on without it (the run's status is set by `finish` all the same)."""
        try:
            if run_id.startswith(PLACEHOLDER) or self.waiting():
                raise ConnectionError("records are waiting for the server")
            self.mlflow.start_run(run_id=run_id, log_system_metrics=self.cfg.system_metrics)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("training %s without MLflow's system metrics: the server did not answer", run_id)
            yield
            return
        try:
            yield
        finally:
            try:
                self.mlflow.end_run()
            except Exception as exc:  # the server went away while training: the monitor still stops
                if not is_outage(exc):
                    raise
                from mlflow.tracking.fluent import run_id_to_system_metrics_monitor

                monitor = run_id_to_system_metrics_monitor.pop(run_id, None)
                if monitor is not None:
                    monitor.finish()

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self._send(self._log_params, run_id, {k: redact(k, v)[:6000] for k, v in params.items()})

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i:i + 100])

    def log_metrics(self, run_id: str, rows: list[tuple[str, float, int]]) -> None:
        """(name, value, step) rows; NaN values are skipped (MLflow stores them, but plots break on them)."""
        now = int(time.time() * 1000)
        rows = [(k, float(v), int(s), now) for k, v, s in rows if v is not None and math.isfinite(v)]
        if rows:
            self._send(self._log_metrics, run_id, rows)

    def _log_metrics(self, run_id: str, rows: list) -> None:
        from mlflow.entities import Metric

        if run_id in self._reopened:  # a resumed trial's run: what it already holds is not logged twice
            held = self._reopened[run_id]
            for key in {r[0] for r in rows} - held.keys():
                held[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
            rows = [r for r in rows if r[2] not in held[r[0]]]
            for r in rows:
                held[r[0]].add(r[2])
        ms = [Metric(k, v, ts, s) for k, v, s, ts in rows]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(run_id, metrics=ms[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self._send(self._set_tags, run_id, {k: redact(k, v) for k, v in tags.items()})

    def _set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, tags=items[i:i + 100])

    def log_artifacts(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._send(self._log_artifacts, run_id, str(path), artifact_path)

    def _log_artifacts(self, run_id: str, path: str, artifact_path: str | None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_image(self, run_id: str, png: Path, key: str, step: int) -> None:
        """A PNG as a step-indexed image of the run (the run page and the compare view show it by step). Logged once
        per (key, step): a repeated call, e.g. for a reopened run, keeps the one it holds."""
        if Path(png).is_file():
            self._send(self._log_image, run_id, str(png), key, int(step))

    def _log_image(self, run_id: str, png: str, key: str, step: int) -> None:
        from PIL import Image

        prefix = f"{key.replace('/', '~')}+step+{step}+"
        if any(Path(a.path).name.startswith(prefix) for a in self.client.list_artifacts(run_id, "images")):
            return
        with Image.open(png) as im:
            self.client.log_image(run_id, im.convert("RGB"), key=key, step=step)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._send(self._finish, run_id, status)
        _ended(run_id)

    def _finish(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)


class NullTracker:
    """tracking.enabled=false: the Tracker's calls, nothing recorded (a misspelt call still fails)."""

    uri = "disabled"
    pending = None

    def check(self) -> None: ...
    def use_journal(self, sweep_dir: Path) -> None: ...
    def flush(self) -> bool: return True
    def waiting(self) -> int: return 0
    def start_sweep(self, sweep_dir, name, tags): return {"parent_run_id": "", "experiment_id": "", "tracking_uri": ""}
    def end_sweep(self, parent_run_id: str, status: str = "FINISHED") -> None: ...
    def close_stale(self) -> int: return 0
    def run_status(self, run_id: str) -> None: return None
    def reopen(self, run_id: str) -> None: ...
    def reviews(self) -> dict: return {}
    def child_run(self, sweep, trial, tags) -> str: return ""
    def running_child(self, sweep, trial_folder) -> None: return None
    def find_child(self, sweep, trial) -> None: return None
    def run_tags(self, run_id) -> dict: return {}
    def log_params(self, run_id, params) -> None: ...
    def log_metrics(self, run_id, rows) -> None: ...
    def set_tags(self, run_id, tags) -> None: ...
    def log_artifacts(self, run_id, path, artifact_path=None) -> None: ...
    def log_image(self, run_id, png, key, step) -> None: ...
    def finish(self, run_id, status: str = "FINISHED") -> None: ...

    @contextmanager
    def active(self, run_id):
        yield


def make_tracker(cfg: TrackingConfig, root: Path):
    return Tracker(cfg, root) if cfg.enabled else NullTracker()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(idx)} (cuda:{idx}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'all')})"
    return "cpu"


def folder_of_run(run_id: str, given: str | None = None) -> Path | None:
    """The local sweep folder recorded on a parent run of the caller's store (caller_store), else the default one."""
    try:
        from mlflow import MlflowClient

        uri = caller_store(given) or store_uri(TrackingConfig(), Path("."))[0]
        folder = MlflowClient(uri).get_run(run_id).data.tags.get("sweep_dir")
        return Path(folder) if folder and Path(folder).is_dir() else None
    except Exception:
        return None
