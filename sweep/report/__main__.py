"""python -m sweep.report <sweep folder or parent run id>: rebuild a sweep's report (and its MLflow records)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..finalize import finalize_folder
from ..tracking import folder_of_run


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sweep.report <sweep folder or parent run id>", file=sys.stderr)
        return 2
    target = Path(args[0])
    folder = target if target.is_dir() else folder_of_run(args[0])
    if folder is None:
        print(f"{args[0]!r} is neither a sweep folder nor a parent run id in the default MLflow store", file=sys.stderr)
        return 2
    finalize_folder(folder, register=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
