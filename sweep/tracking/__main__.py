"""python -m sweep.tracking sync <sweep folder> [--tracking-uri URI]: send the MLflow records a sweep kept while its
server was away (<sweep>/mlflow_pending.jsonl), then finish the sweep (selection, registry, report) as its end would
have. The store: --tracking-uri or MLFLOW_TRACKING_URI when given, else the one the folder recorded if it is on this
machine (sweep/tracking folder_store: a server elsewhere must be named).

python -m sweep.tracking close-stale: mark KILLED the RUNNING runs whose process is gone.

python -m sweep.tracking champion [--subject "sks woman" | --model NAME] [--tracking-uri URI]: the registered
champion's models:/ URI (what model= of sweep.generate, sweep.serve and sweep.export takes); several subjects
registered: exit 2, listing them."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from common.errors import UserError

from ..config import TrackingConfig, resolve_path
from ..finalize import finalize_folder, opened_store
from ..redaction import redact
from ..results import load_config
from . import make_tracker
from .registry import WhichSubject, champion_uri, default_store

log = logging.getLogger("sweep.tracking")


def sync(sweep_dir: Path, tracking_uri: str | None = None) -> int:
    """Send what waits in a sweep's journal, then finish the sweep (selection, registry, report) as its end would
    have. Exit status 0 when nothing waits any more; 2 when the folder names a server the caller did not."""
    sweep_dir = Path(sweep_dir).resolve()
    conf = load_config(sweep_dir)
    try:
        store = opened_store(sweep_dir, tracking_uri)
    except UserError as exc:
        log.error("%s", exc)
        return 2
    tracker = make_tracker(replace(conf.tracking, uri=store), resolve_path(conf.paths, "."))
    tracker.close_stale()
    tracker.use_journal(sweep_dir)
    waiting = tracker.waiting()
    if not tracker.flush():
        log.error("MLflow at %s still does not answer: %d record(s) wait in %s", redact("uri", tracker.uri),
                  tracker.waiting(), tracker.pending)
        return 1
    log.info("%d waiting record(s) sent to %s", waiting, redact("uri", tracker.uri))
    sel, _ = finalize_folder(sweep_dir, tracking_uri=store)
    return 0 if sel is not None else 1


def close_stale(uri: str | None, experiment: str) -> int:
    """Mark KILLED the experiment's RUNNING runs left by processes of this host that are gone (a sweep killed with
    SIGKILL, a machine that rebooted); a sweep or resume=true does it too when it starts."""
    cfg = TrackingConfig(uri=uri, experiment=experiment)
    tracker = make_tracker(cfg, Path("."))
    closed = tracker.close_stale()
    print(f"{closed} stale run(s) of experiment {experiment!r} at {redact('uri', tracker.uri)} marked KILLED")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweep.tracking")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sync", help="send the MLflow records a sweep kept while its server was away, then "
                                    "register its champion")
    s.add_argument("sweep_dir", type=Path)
    s.add_argument("--tracking-uri", help="the store to send to (default: MLFLOW_TRACKING_URI, else the one the "
                                          "sweep recorded, if it is on this machine)")
    c = sub.add_parser("close-stale", help="mark KILLED the RUNNING runs whose process (on this host) is gone")
    c.add_argument("--uri", default=None, help="tracking URI (default: the project's ./mlruns store)")
    c.add_argument("--experiment", default=TrackingConfig().experiment)
    c = sub.add_parser("champion", help="print the registered champion's models:/ URI (for model= of sweep.serve)")
    c.add_argument("--subject", help='the subject as prompts name it, e.g. "sks woman"')
    c.add_argument("--model", help="a registered model's name")
    c.add_argument("--tracking-uri", help="the store (default: ./mlruns/mlflow.db)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if a.command == "close-stale":
        return close_stale(a.uri, a.experiment)
    if a.command == "champion":
        try:
            print(champion_uri(a.tracking_uri or default_store(), a.subject, a.model))
        except WhichSubject as exc:
            print(exc, file=sys.stderr)
            return 2
        return 0
    return sync(a.sweep_dir, a.tracking_uri)


if __name__ == "__main__":
    sys.exit(main())
