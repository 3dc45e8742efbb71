"""What a sweep leaves on disk, and reading it back: the file names, one atomic strict-JSON writer, each trial's
result.json, the candidates (trial, checkpoint, metrics) selection ranks, lost trials, the sweep's typed config."""
from __future__ import annotations

import fcntl
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import OmegaConf

from common.files import write_atomic
from common.lorafile import LORA_FILE, recorded_sha256
from evaluation.config import is_entry, parse_entry

from . import stored
from .config import SweepConfig, to_typed
from .redaction import redact_text, redact_tree
from .selection import Candidate

RESULT = "result.json"
BASELINE = "baseline_metrics.json"
CHAMPION_DIR = "champion"  # the champion exported for the web UIs and diffusers (sweep/export)
LOST_FILE = "lost_jobs.jsonl"  # jobs a launcher lost before they made a trial folder (launchers/process.py lost_job)
EVAL_DIR, EVAL_FILE = "eval", "metrics.json"  # a trial's scores: metrics and cells (evaluation.evaluate writes it)
PROMOTION_FILE = "promotion.json"  # a person's picks over the rule's (python -m sweep.promote), newest last
SWEEP_FILE = "sweep.json"  # the sweep's MLflow experiment and parent run (tracking.Tracker.start_sweep)
REGISTRY_FILE = "registry.json"  # the sweep's registration: intent, then what the registry holds (finalize.py)


def _clean(obj):
    """obj with every non-finite float (NaN, inf) as None, recursively: what strict JSON can hold."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy scalars
        try:
            obj = obj.item()
        except (TypeError, ValueError):
            return obj
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strict_json(obj, **kw) -> str:
    """Strict JSON (RFC 8259: no NaN/Infinity tokens): non-finite numbers are written as null."""
    return json.dumps(_clean(obj), allow_nan=False, default=str, **kw)


def lora_file(c: Candidate) -> str:
    return str(Path(c.checkpoint) / LORA_FILE)


def write_result(out: Path, payload: dict) -> None:
    """A trial's result.json (NaN, e.g. of a failed trial or a checkpoint with no face found, as null)."""
    write_json(Path(out) / RESULT, payload)


def write_json(path: Path, payload) -> None:
    """`payload` as strict JSON in `path`, atomically (write_text), secrets hidden (a value under a secret's key,
    a password in a URL) as in every file the sweep writes."""
    write_text(path, strict_json(redact_tree(_clean(payload)), indent=2))


def write_text(path: Path, text: str) -> None:
    """`text` in `path` with its secrets hidden (sweep/redaction.py), all or nothing (common.files.write_atomic): a
    process killed at any point leaves the old file or the new one, never half of one; two writers never share a
    temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, redact_text(text))


HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra saves in a run's .hydra/


def stored_configs(folder: Path) -> list[Path]:
    """Hydra's copies of a command's config in a run or sweep folder: multirun.yaml, .hydra/*.yaml, and each trial's."""
    folder = Path(folder)
    return [p for p in (folder / "multirun.yaml", *(folder / ".hydra" / n for n in HYDRA_FILES),
                        *(t / ".hydra" / n for t in sorted(folder.glob("*/")) for n in HYDRA_FILES)) if p.is_file()]


def hide_secrets_in(paths: list[Path]) -> None:
    """Hydra writes a command's values as typed (a password in tracking.uri, a token override) into the files it
    keeps: each is rewritten with its secrets hidden. References (`${oc.env:MLFLOW_TRACKING_URI}`) stay as they are:
    they name a variable, not its value. A file with nothing to hide is left untouched."""
    for path in paths:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        clean = redact_tree(data)
        if clean != data:
            write_text(path, OmegaConf.to_yaml(OmegaConf.create(clean)))


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (its `.lock` file beside it) across processes, for read-modify-write of a record:
    two promotes at once both keep their entry. The lock goes with the process, even when it is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_json(path: Path, change: Callable, empty=None):
    """Read the JSON record at `path` (`empty` when there is none), apply `change` to it and write what it returns,
    under the record's lock and atomically; returns the new content."""
    with locked(path):
        current = json.loads(Path(path).read_text()) if Path(path).is_file() else empty
        new = change(current)
        write_json(path, new)
        return new


def read_json(path: Path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


def trial_dirs(sweep_dir: Path) -> list[Path]:
    """Folders of the sweep's trials (the sweep folder itself for a single run)."""
    if (sweep_dir / RESULT).is_file():
        return [sweep_dir]
    return sorted(d for d in sweep_dir.iterdir() if d.is_dir() and (d / RESULT).is_file())


def finished_objective(out: Path, cfg_hash: str, steps: int) -> float | None:
    """The stored objective of a trial that already finished in `out` with this configuration (a re-run skips it)."""
    if not (out / RESULT).is_file():
        return None
    res = read_result(out)
    if res.get("config_hash") != cfg_hash or "objective" not in res:
        return None
    if (res.get("status") == "finished" and res.get("steps") == steps) or res.get("status") == "pruned":
        return res["objective"]
    return None


def read_result(trial_dir: Path) -> dict:
    """A trial's result.json, its nulls (how strict JSON writes NaN) read back as NaN: objective and metrics."""
    res = json.loads((Path(trial_dir) / RESULT).read_text())
    if "objective" in res:
        res["objective"] = math.nan if res["objective"] is None else res["objective"]
    if isinstance(res.get("metrics"), dict):
        res["metrics"] = {ck: {k: math.nan if v is None else v for k, v in m.items()} if isinstance(m, dict) else m
                          for ck, m in res["metrics"].items()}
    return res


def collect(sweep_dir: Path) -> tuple[list[Candidate], dict[str, float], dict[str, str]]:
    """Every scored checkpoint of the sweep, the baseline's metrics and each trial's status. A checkpoint's metrics
    and cells are its latest scoring's (eval/metrics.json: a racing round after the trial ended adds cells)."""
    candidates, statuses = [], {}
    for d in trial_dirs(sweep_dir):
        res = read_result(d)
        statuses[res["name"]] = res["status"]
        scored = read_scores(d)
        for entry, metrics in (res.get("metrics") or {}).items():
            if is_entry(entry):
                metrics, cells = scored.get(entry, (metrics, {}))
                candidates.append(candidate(res["name"], entry, metrics, d, res["status"], res.get("params"), cells))
    base_file = sweep_dir / BASELINE
    baseline = json.loads(base_file.read_text())["metrics"] if base_file.is_file() else {}
    return candidates, baseline, statuses


def read_scores(trial_dir: Path) -> dict[str, tuple[dict[str, float], dict[str, dict[str, float]]]]:
    """{checkpoint: (metrics, cells)} as the trial's evaluation last wrote them (eval/metrics.json)."""
    path = Path(trial_dir) / EVAL_DIR / EVAL_FILE
    if not path.is_file():
        return {}
    rec = json.loads(path.read_text())  # written by evaluation: NaN as NaN
    cells = rec.get("cells", {})
    return {k: (m, cells.get(k, {})) for k, m in rec.get("metrics", {}).items() if is_entry(k)}


def candidates(metrics: dict, out: Path, name: str, status: str, params: dict) -> list[Candidate]:
    """A trial's scored checkpoints ({"step-000100": metrics, "step-000100_x0.7": ...}) as selection candidates."""
    return [candidate(name, k, v, out, status, params) for k, v in metrics.items() if is_entry(k)]


def candidate(name: str, entry: str, metrics: dict, out: Path, status: str = "finished", params: dict | None = None,
              cells: dict | None = None) -> Candidate:
    """One scored entry (a checkpoint at a strength) of the trial in `out` as a selection candidate."""
    folder, step, scale = parse_entry(entry)
    ckpt = out / "checkpoints" / folder
    return Candidate(name, step, metrics, str(ckpt), status, params or {}, cells or {}, scale,
                     recorded_sha256(ckpt / LORA_FILE) or "")


def read_promotions(sweep_dir: Path) -> list[dict]:
    """Every human pick of the sweep (python -m sweep.promote), oldest first."""
    return read_json(Path(sweep_dir) / PROMOTION_FILE, [])


def read_promotion(sweep_dir: Path) -> dict | None:
    """The sweep's latest human pick (python -m sweep.promote): {"key", "by", "reason", "rule_pick", "agreed", "at"}."""
    picks = read_promotions(sweep_dir)
    return picks[-1] if picks else None


def score_notes(sweep_dir: Path) -> list[str]:
    """What evaluation said about its own numbers (eval/metrics.json `notes`): e.g. that the base model or CLIP has
    random weights, so the scores carry no meaning (the demo's tiny model)."""
    notes: list[str] = []
    for d in trial_dirs(sweep_dir):
        for n in read_json(Path(d) / EVAL_DIR / EVAL_FILE, {}).get("notes", []):
            if n not in notes:
                notes.append(n)
    return notes


def load_config(sweep_dir: Path) -> SweepConfig:
    """The sweep's typed config, as its first trial saw it, read as data (sweep/stored.py: no resolver runs, no
    environment variable is read)."""
    first = (trial_dirs(sweep_dir) or lost_trials(sweep_dir))[0]
    return to_typed(stored.load(first / ".hydra" / "config.yaml"))


def lost_trials(sweep_dir: Path) -> list[Path]:
    """Trial folders whose job ended without a result: its process was killed, or its machine lost. Only in a
    grid sweep's folder (held by its launching process: no job of it runs any more when it ends); an Optuna
    study's workers share a folder, and re-queue their dead trials themselves."""
    if (sweep_dir / RESULT).is_file() or not (sweep_dir / ".lock").is_file():
        return []
    return sorted(d for d in sweep_dir.iterdir()
                  if d.is_dir() and (d / ".hydra").is_dir() and not (d / RESULT).is_file())


def lost_before_start(sweep_dir: Path) -> dict[str, str]:
    """Jobs a launcher lost (launchers/process.py lost_job) before they made a trial folder: {"job N": why}."""
    path = sweep_dir / LOST_FILE
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if not any(sweep_dir.glob(f"{rec['job']}_*")):
            out[f"job {rec['job']} ({' '.join(rec['overrides'])})"] = rec["why"]
    return out


def read_sweep(sweep_dir: Path) -> dict[str, str] | None:
    p = Path(sweep_dir) / SWEEP_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def display_name(trial: str, digits: int = 3) -> str:
    """A run's name: the trial key with its float values rounded for reading ("lr=0.000187", not Optuna's
    "lr=0.00018662266976517952"); values short already stay as written ("lr=1e-05", "lr=100000000.0"). The
    run's `trial` tag keeps the exact key."""
    def short(part: str) -> str:
        key, eq, value = part.rpartition("=")
        if not eq or not re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][-+]?\d+)", value):
            return part
        rounded = f"{float(value):.{digits}g}"
        return part if float(rounded) == float(value) else f"{key}={rounded}"

    return ",".join(short(p) for p in trial.split(","))


