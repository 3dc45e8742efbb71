"""python -m sweep.review <sweep folder> [seed=<s>]: the pick laid out for a person to judge by eye.

A contact sheet, prompts down and candidates across, every image at the same seed (the first evaluation seed by
default; every checkpoint has it, racing's first round included): the champion and the runner-up first, marked,
then every other trial's best checkpoint, then the baseline (no LoRA). Each image is labelled with its checkpoint
and its scores at that cell. Written to <sweep>/report/review.png; the console says where, and how sure the rule
was."""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from common.metrics import CLIP_T, FACE_SIMILARITY
from evaluation.grid import wrap

from .confidence import compare
from .metrics import fmt
from .report import table
from .results import EVAL_DIR, collect, load_config
from .selection import Candidate, select

CELL, LABEL, HEADER, PROMPT_W = 256, 34, 28, 200
REVIEW_FILE = "review.png"


def columns(sweep_dir: Path) -> tuple[list[tuple[str, Candidate | None]], object]:
    """(role, candidate) across the sheet, the baseline last as (role, None); and the sweep's config."""
    conf = load_config(sweep_dir)
    candidates, baseline, _ = collect(sweep_dir)
    sel = select(candidates, baseline, conf.selection)
    cols: list[tuple[str, Candidate | None]] = []
    if sel.champion:
        cols.append(("CHAMPION", sel.champion))
    if sel.runner_up:
        cols.append(("RUNNER-UP", sel.runner_up))
    shown = {c.key for _, c in cols}
    for row in table(candidates, sel, {}):
        c = next((c for c in candidates if c.key == row["key"]), None)
        if c is not None and c.key not in shown:
            cols.append(("best of its trial", c))
            shown.add(c.key)
    return cols + [("baseline (no LoRA)", None)], (conf, sel, baseline)


def write_sheet(sweep_dir: Path, seed: int | None = None) -> tuple[Path, object]:
    """The sheet's path, and (config, selection, baseline) it was made from."""
    sweep_dir = Path(sweep_dir).resolve()
    cols, (conf, sel, baseline) = columns(sweep_dir)
    prompts = list(conf.eval.prompts)
    seed = conf.eval.seeds[0] if seed is None else seed
    if seed not in conf.eval.seeds:
        raise SystemExit(f"seed={seed} is not one of the evaluation's seeds {list(conf.eval.seeds)}")
    sheet = Image.new("RGB", (PROMPT_W + len(cols) * CELL, HEADER + len(prompts) * (CELL + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    base_dir = next(iter(sorted(sweep_dir.glob(f"*/{EVAL_DIR}/images/baseline"))), None)
    for j, (role, c) in enumerate(cols):
        x = PROMPT_W + j * CELL
        marked = c is not None and c in (sel.champion, sel.runner_up)
        draw.text((x + 6, 8), role + ("" if c is None else f"  {c.key}"), fill="darkred" if marked else "black")
        folder = base_dir if c is None else Path(c.checkpoint).parent.parent / EVAL_DIR / "images" / c.entry
        for p in range(len(prompts)):
            y = HEADER + p * (CELL + LABEL)
            png = folder / f"base_p{p}_s{seed}.png" if folder else None
            if png is not None and png.is_file():
                with Image.open(png) as im:
                    sheet.paste(im.convert("RGB").resize((CELL, CELL)), (x, y + LABEL))
            else:
                draw.rectangle((x, y + LABEL, x + CELL - 1, y + LABEL + CELL - 1), fill="lightgray")
            draw.multiline_text((x + 4, y + 2), _label(c, p, seed, baseline), fill="black")
            if marked:
                draw.rectangle((x, y + LABEL, x + CELL - 1, y + LABEL + CELL - 1), outline="darkred", width=3)
    for p, text in enumerate(prompts):
        draw.multiline_text((6, HEADER + p * (CELL + LABEL) + LABEL + 6), wrap(text, 30), fill="black")
    out = sweep_dir / "report" / REVIEW_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out, (conf, sel, baseline)


def _label(c: Candidate | None, prompt: int, seed: int, baseline: dict) -> str:
    """'seed 0: face 0.61, clip_t 31.2': the scores of this very image (its cell)."""
    if c is None:
        return f"seed {seed}: no LoRA"
    cell = c.cells.get(f"p{prompt}_s{seed}", {})
    shown = [f"{n.replace('_similarity', '')} {fmt(cell[n])}" for n in (FACE_SIMILARITY, CLIP_T) if n in cell]
    return f"seed {seed}: " + (", ".join(shown) if shown else "not scored")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folders = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(options) - {"seed"})
    if len(folders) != 1 or unknown:
        print("usage: python -m sweep.review <sweep folder> [seed=<one of eval.seeds>]"
              + (f" (unknown: {', '.join(unknown)})" if unknown else ""), file=sys.stderr)
        return 2
    folder = Path(folders[0])
    if not (folder / "multirun.yaml").is_file() and not list(folder.glob("*/result.json")) and \
            not (folder / "result.json").is_file():
        print(f"{folder} is not a sweep folder (outputs/sweeps/<date>): nothing to review", file=sys.stderr)
        return 2
    try:
        seed = int(options["seed"]) if "seed" in options else None
    except ValueError:
        print(f"seed={options['seed']!r} is not a number: give one of the evaluation's seeds", file=sys.stderr)
        return 2
    path, (conf, sel, baseline) = write_sheet(folder, seed)
    print(f"review sheet: {path}")
    if sel.champion and sel.runner_up:
        c = compare(sel.champion, sel.runner_up, baseline, conf.selection)
        if c is not None:
            print(f"the rule's pick: {c.verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
