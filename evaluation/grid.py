"""Image grids people look at: prompts x seeds for one checkpoint, checkpoints x seeds for one prompt."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

LABEL_W = 180


def grid(images: list[Image.Image], rows: int, cols: int, labels: list[str] | None = None, cell: int = 256) -> Image.Image:
    """Row-major grid with an optional text label left of each row."""
    lw = LABEL_W if labels else 0
    out = Image.new("RGB", (lw + cols * cell, rows * cell), "white")
    draw = ImageDraw.Draw(out)
    for k, im in enumerate(images[: rows * cols]):
        r, c = divmod(k, cols)
        out.paste(im.convert("RGB").resize((cell, cell)), (lw + c * cell, r * cell))
    for r, text in enumerate(labels or []):
        draw.multiline_text((6, r * cell + 6), wrap(text, 26), fill="black")
    return out


def wrap(text: str, width: int) -> str:
    """Words on lines of at most `width` characters (a longer word gets a line of its own)."""
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


def save(image: Image.Image, path: Path, compress_level: int = 6) -> Path:
    """PNG written atomically (a temporary name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp, compress_level=compress_level)
    tmp.replace(path)
    return path


class Writer:
    """Saves images on background threads (Pillow encodes without the GIL) while the GPU generates the next
    ones; `wait()` returns once all are on disk and raises the first error."""

    def __init__(self, threads: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="png")
        self.pending: list = []

    def save(self, image: Image.Image, path: Path, compress_level: int = 6) -> None:
        self.pending.append(self.pool.submit(save, image, path, compress_level))

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for f in pending:
            f.result()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()
