"""python -m sweep.report <sweep folder or parent run id> [tracking_uri=URI]: rebuild a sweep's report (and its MLflow
records). Its records go to tracking_uri= or MLFLOW_TRACKING_URI when given, else to the store the folder recorded
if that is on this machine (a server elsewhere must be named: sweep/tracking folder_store)."""
from __future__ import annotations

import sys
from pathlib import Path

from common.errors import UserError

from ..finalize import finalize_folder, opened_store
from ..tracking import folder_of_run

USAGE = "usage: python -m sweep.report <sweep folder or parent run id> [tracking_uri=URI]"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    options = dict(a.split("=", 1) for a in args if a.startswith("tracking_uri="))
    targets = [a for a in args if not a.startswith("tracking_uri=")]
    if len(targets) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    target = Path(targets[0])
    folder = target if target.is_dir() else folder_of_run(targets[0], options.get("tracking_uri"))
    if folder is None:
        print(f"{targets[0]!r} is neither a sweep folder nor a parent run id in the MLflow store", file=sys.stderr)
        return 2
    try:
        finalize_folder(folder, register=False, tracking_uri=opened_store(folder, options.get("tracking_uri")))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
