"""python -m sweep.promote <trial>@<step>[x<strength>] reason="..." [sweep=<folder>] [by=<name>] [tracking_uri=URI]:
a person's pick.

The original study chose its champion by eye; here the selection rule chooses, and a person who has looked
(`python -m sweep.review`) may keep its pick or overrule it, on record. Promoting writes the pick to
<sweep>/promotion.json (every pick kept, newest last) and finishes the sweep again with it (sweep.finalize): the
promoted checkpoint is exported to <sweep>/champion/ and takes the registry's `champion` alias whatever the rule
says, its model version and the sweep's parent run tagged with who (`by`, default the login name) and why; the
report and the console say whether the person overrode the rule, and across reviewed sweeps how often people kept
the rule's pick. Without sweep=, the newest sweep under ./outputs/sweeps. The registry and runs written are in
tracking_uri= or MLFLOW_TRACKING_URI when given, else in the store the folder recorded if it is on this machine (a
server elsewhere must be named: nothing is recorded until it is).

A person's pick holds `champion`: a later sweep whose best beats it under the rule gets alias `challenger`, and
says the command that makes it the champion (this one, on that sweep). Promotes of one sweep run one at a time
(a lock on promotion.json: none loses its entry); one killed at any point is finished by running it again."""
from __future__ import annotations

import datetime as dt
import difflib
import getpass
import sys
from pathlib import Path

from common import faults
from common.errors import UserError

from .finalize import finalize_folder, opened_store
from .results import PROMOTION_FILE, collect, load_config, locked, read_promotions, trial_dirs, write_json
from .selection import select

OPTIONS = ("reason", "sweep", "by", "tracking_uri")
USAGE = ('usage: python -m sweep.promote <trial>@<step>[x<strength>] reason="why" [sweep=<folder>] [by=<name>] '
         '[tracking_uri=URI]')


def newest_sweep(root: Path = Path("outputs/sweeps")) -> Path | None:
    folders = [d for d in root.glob("*") if d.is_dir() and trial_dirs(d)]
    return max(folders, key=lambda d: d.stat().st_mtime) if folders else None


def promote(sweep_dir: Path, key: str, reason: str, by: str, tracking_uri: str | None = None) -> dict:
    """Record the pick and finish the sweep again with it, writing to `tracking_uri` (None: the store the folder
    recorded); returns the record. SystemExit names what is wrong."""
    candidates, baseline, _ = collect(sweep_dir)
    chosen = next((c for c in candidates if c.key == key), None)
    if chosen is None:
        keys = sorted(c.key for c in candidates)
        near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
        raise SystemExit(f"{key!r} is not a scored checkpoint of {sweep_dir.name}"
                         + (f"; did you mean {' or '.join(near)}?" if near else "")
                         + f". It scored: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")
    if chosen.trial_status == "failed":
        raise SystemExit(f"{key}: its trial failed; promote a checkpoint of a trial that ran")
    rule = select(candidates, baseline, load_config(sweep_dir).selection).champion
    record = {"key": key, "by": by, "reason": reason, "rule_pick": rule.key if rule else None,
              "agreed": bool(rule and rule.key == key), "checkpoint": chosen.checkpoint, "scale": chosen.scale,
              "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    path = sweep_dir / PROMOTION_FILE
    with locked(path):  # one promote of this sweep at a time: each keeps its entry, the last one's pick stands
        picks = read_promotions(sweep_dir)
        last = picks[-1] if picks else {}
        if not (last and not last.get("applied") and _same_pick(last, record)):  # else: finish that one
            picks.append(record)
            write_json(path, picks)
        faults.hit("promote_recorded")  # the pick is on record; champion/, the registry and the report not yet
        finalize_folder(sweep_dir, tracking_uri=tracking_uri)
        picks[-1] = {**picks[-1], "applied": True}
        write_json(path, picks)
    return picks[-1]


def _same_pick(a: dict, b: dict) -> bool:
    """The same command again (a promote that was killed before it finished is finished, not recorded twice)."""
    return all(a.get(k) == b.get(k) for k in ("key", "by", "reason", "checkpoint", "scale"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    options = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in OPTIONS and "=" in a}
    keys = [a for a in args if not ("=" in a and a.split("=", 1)[0] in OPTIONS)]
    if len(keys) != 1:
        print(USAGE + ("" if keys else " (name the checkpoint, e.g. lr=0.0001@300 as the report lists it)"),
              file=sys.stderr)
        return 2
    if not options.get("reason", "").strip():
        print(f'{USAGE}\nsay why, for the record: reason="sharper face, scene intact"', file=sys.stderr)
        return 2
    folder = Path(options["sweep"]) if "sweep" in options else newest_sweep()
    if folder is None or not folder.is_dir() or not trial_dirs(folder):
        print(f"{folder or 'outputs/sweeps'}: no sweep folder with scored trials here; give sweep=<folder> "
              "(outputs/sweeps/<date>)", file=sys.stderr)
        return 2
    try:
        store = opened_store(folder.resolve(), options.get("tracking_uri"))  # refused here: nothing recorded yet
        record = promote(folder.resolve(), keys[0], options["reason"].strip(), options.get("by") or _login(), store)
    except (SystemExit, UserError) as exc:  # UserError: e.g. the server refused this user the alias (AccessDenied)
        print(exc, file=sys.stderr)
        return 2
    print(f"promoted {record['key']} in {folder}: " + ("the rule's pick, confirmed" if record["agreed"] else
                                                         f"over the rule's pick {record['rule_pick']}"))
    return 0


def _login() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in this environment (a container)
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
