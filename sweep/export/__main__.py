"""python -m sweep.export [<checkpoint folder> | <sweep folder> | models:/<name>@<alias>] [format=] [dtype=] [out=]:
the LoRA for ComfyUI / A1111 / Forge and diffusers, with its model card (see sweep/export/__init__.py)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common.lorafile import LORA_FILE, sha256_file
from families.kohya import DTYPES

from ..logs import quiet_for_generation
from ..markdown import code, text
from ..metrics import metrics_from_json
from ..tracking.registry import WhichSubject, champion_uri, default_store
from ..tracking.weights import RefusedVersion, fetch_lora
from . import FORMATS, Source, export, from_checkpoint, from_sweep, output_name
from .folder import ExportError

USAGE = ("usage: python -m sweep.export [<checkpoint folder> | <sweep folder> | models:/<name>@<alias>] "
         "[subject=\"sks man\" | model=<registered name>] [format=both|webui|diffusers] [out=<folder>] "
         "[overwrite=true] [dtype=fp16|bf16|fp32] [tracking_uri=URI]")
KEYS = {"format", "out", "overwrite", "dtype", "tracking_uri", "subject", "model"}
EXPORTS = Path("outputs") / "exports"  # the default folder's parent, under the working folder's outputs/ (git-ignored)


def parse(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    source, args = None, {}
    for a in argv:
        key, sep, value = a.partition("=")
        if sep and key in KEYS:
            args[key] = value
        elif not sep or a.startswith("models:/") or Path(a).exists():
            if source is not None:
                raise SystemExit(f"two sources given ({source!r} and {a!r}): export one at a time\n{USAGE}")
            source = a
        else:
            raise SystemExit(f"unknown argument {a!r}\n{USAGE}")
    if args.get("format", "both") not in FORMATS:
        raise SystemExit(f"format={args['format']!r} is not one of {', '.join(FORMATS)}: webui is the file ComfyUI, "
                         "A1111 and Forge load, diffusers the one diffusers loads, both writes the two")
    if args.get("dtype", "fp16") not in DTYPES:
        raise SystemExit(f"dtype={args['dtype']!r} is not one of {', '.join(DTYPES)} (fp16: what the web UIs use)")
    if args.get("overwrite", "false") not in ("true", "false"):
        raise SystemExit(f"overwrite={args['overwrite']!r} is not true or false (true: replace files of the same name "
                         "in out=, whoever wrote them)")
    return source, args


def from_registry(uri: str, store: str, folder: Path) -> Source:
    """A registered version, read as data into `folder` (tracking/weights.py: refused unless it is this project's
    LoRA with the bytes recorded for it): its own checkpoint folder when this machine has it with those very bytes
    (its grids and settings go into the card), else the registered copy, described by the version's tags."""
    reg = fetch_lora(uri, store, folder)
    tags = reg.tags
    ckpt = Path(tags.get("checkpoint", ""))
    if tags.get("checkpoint") and (ckpt / LORA_FILE).is_file() and sha256_file(ckpt / LORA_FILE) == reg.sha256:
        src = from_checkpoint(ckpt, origin=uri, strength=_number(tags.get("lora_scale"), 1.0))  # as champion/ has it
    else:
        src = Source(lora=reg.lora, trial=tags.get("trial", "?"), step=int(_number(tags.get("step"), 0)), origin=uri,
                     base=reg.base)
    if "metrics" in tags:
        src.metrics, src.baseline = metrics_from_json(tags["metrics"]), metrics_from_json(tags.get("baseline", "{}"))
    src.chosen = (f"Registered as {code(reg.name)} version {text(reg.version)}"  # Markdown: escaped
                  + (f" ({text(tags['registry.decision'])})" if tags.get("registry.decision") else "")
                  + (f"; objective {code(tags.get('objective_name', ''))} = {text(tags['objective'])}"
                     if tags.get("objective") else ""))
    return src


def _number(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def resolve(source: str | None, store: str | None, fetched: Path, subject: str | None = None,
            model: str | None = None) -> Source:
    """What to export: a folder, a models:/ URI, or (none given) the registry's champion of the one subject there
    (or of subject= / model=: several subjects are refused with their list); a registered LoRA is fetched into
    `fetched` (a temporary folder of the caller's)."""
    if source is None or source.startswith("models:/"):
        store = store or default_store()
        return from_registry(source or champion_uri(store, subject, model), store, fetched)
    path = Path(source).expanduser()
    if not path.exists():
        raise SystemExit(f"{source}: no such folder. Give a checkpoint folder (<trial>/checkpoints/step-NNNNNN), a "
                         f"sweep folder (outputs/sweeps/<date>) or a registered model (models:/<name>@champion)")
    if (path / "pytorch_lora_weights.safetensors").is_file():
        return from_checkpoint(path)
    if (path / "report" / "selection.json").is_file() or (path / "sweep.json").is_file():
        return from_sweep(path)
    raise SystemExit(f"{source} is neither a checkpoint folder (no pytorch_lora_weights.safetensors) nor a sweep "
                     "folder (no report/selection.json)")


def main(argv: list[str] | None = None) -> int:
    quiet_for_generation()
    source, args = parse(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="sweep-export-") as fetched:  # a registered LoRA, while it is exported
        try:
            src = resolve(source, args.get("tracking_uri"), Path(fetched), args.get("subject"), args.get("model"))
            out = Path(args["out"]) if "out" in args else EXPORTS / output_name(src)
            rec = export(src, out, args.get("format", "both"), args.get("dtype", "fp16"),
                         overwrite=args.get("overwrite") == "true")
        except (WhichSubject, RefusedVersion, ExportError) as exc:
            # several subjects and none named; not this project's LoRA or not its recorded bytes; may not write there
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"exported {src.trial} step {src.step} from {src.origin} to {rec['out']}:")
    for f, sha in rec["files"].items():
        print(f"  {f}  sha256 {sha[:16]}...")
    if rec["webui_file"]:
        print(f"ComfyUI: copy {rec['webui_file']} into ComfyUI/models/loras/ and pick it in a Load LoRA node; "
              f"A1111 / Forge: copy it into models/Lora/ and add <lora:{Path(rec['webui_file']).stem}:1> to the prompt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
