"""python -m sweep.tracking sync <sweep folder>: send the MLflow records a sweep kept while its server was away
(<sweep>/mlflow_pending.jsonl), then finish the sweep (selection, registry, report) as its end would have.

python -m sweep.tracking champion [--subject "sks woman" | --model NAME] [--tracking-uri URI]: the registered
champion's models:/ URI (what model= of sweep.generate, sweep.serve and sweep.export takes); several subjects
registered: exit 2, listing them."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import resolve_path
from ..finalize import finalize_folder
from ..redaction import redact
from ..results import load_config
from . import make_tracker
from .registry import WhichSubject, champion_uri, default_store

log = logging.getLogger("sweep.tracking")


def sync(sweep_dir: Path) -> int:
    """Send what waits in a sweep's journal, then finish the sweep (selection, registry, report) as its end would
    have. Exit status 0 when nothing waits any more."""
    sweep_dir = Path(sweep_dir).resolve()
    conf = load_config(sweep_dir)
    tracker = make_tracker(conf.tracking, resolve_path(conf.paths, "."))
    tracker.use_journal(sweep_dir)
    waiting = tracker.waiting()
    if not tracker.flush():
        log.error("MLflow at %s still does not answer: %d record(s) wait in %s", redact("uri", tracker.uri),
                  tracker.waiting(), tracker.pending)
        return 1
    log.info("%d waiting record(s) sent to %s", waiting, redact("uri", tracker.uri))
    sel, _ = finalize_folder(sweep_dir)
    return 0 if sel is not None else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweep.tracking")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sync", help="send the MLflow records a sweep kept while its server was away, then "
                                    "register its champion")
    s.add_argument("sweep_dir", type=Path)
    c = sub.add_parser("champion", help="print the registered champion's models:/ URI (for model= of sweep.serve)")
    c.add_argument("--subject", help='the subject as prompts name it, e.g. "sks woman"')
    c.add_argument("--model", help="a registered model's name")
    c.add_argument("--tracking-uri", help="the store (default: ./mlruns/mlflow.db)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if a.command == "champion":
        try:
            print(champion_uri(a.tracking_uri or default_store(), a.subject, a.model))
        except WhichSubject as exc:
            print(exc, file=sys.stderr)
            return 2
        return 0
    return sync(a.sweep_dir)


if __name__ == "__main__":
    sys.exit(main())
