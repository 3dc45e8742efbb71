"""Rebuild assets/demo_subject/: five 256 px views of scikit-image's astronaut portrait (NASA, public domain).

Varied framing, mirroring and light stand in for the varied photos a user would bring.
Run: python assets/make_demo_subject.py   (needs scikit-image, a dev dependency)"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

OUT = Path(__file__).parent / "demo_subject"
# (left, top, size) boxes around the face in the 512x512 portrait, then mirror and brightness
VIEWS = [((120, 10, 240), False, 1.0), ((90, 0, 300), True, 1.1), ((140, 30, 200), False, 0.9),
         ((100, 20, 280), False, 1.2), ((130, 5, 260), True, 0.95)]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    portrait = Image.fromarray(np.asarray(data.astronaut()))
    for i, ((left, top, size), mirror, light) in enumerate(VIEWS):
        im = portrait.crop((left, top, left + size, top + size)).resize((256, 256), Image.Resampling.LANCZOS)
        im = ImageOps.mirror(im) if mirror else im
        ImageEnhance.Brightness(im).enhance(light).save(OUT / f"astronaut_{i}.jpg", quality=92)


if __name__ == "__main__":
    main()
