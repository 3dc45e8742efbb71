"""Photo checks happen before any model loads and name the files and the fix."""
import logging
import random

import pytest
from PIL import Image

from trainer import DataError
from trainer.data import open_photo, prepare, scan_photos

from .conftest import save_image


def scan(folder, resolution=64, min_images=3, allow_upscale=False):
    return scan_photos(str(folder), key="data.instance_dir", resolution=resolution, min_images=min_images,
                       allow_upscale=allow_upscale)


def test_bundled_demo_subject_is_usable(photo_dir):
    photos = scan(photo_dir, resolution=256)
    assert len(photos) == 5 and all(p.width == p.height == 256 for p in photos)
    assert len({p.sha256 for p in photos}) == 5


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"data.instance_dir='.*nope' does not exist"):
        scan(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        scan(tmp_path)


def test_a_file_instead_of_a_folder(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        scan(save_image(tmp_path / "a.png"))


def test_unreadable_files_are_skipped_with_a_warning(photo_dir, caplog):
    (photo_dir / "notes.txt").write_text("hello")
    (photo_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (photo_dir / "astronaut_0.jpg").read_bytes()
    (photo_dir / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (photo_dir / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        photos = scan(photo_dir)
    assert sorted(p.path.name for p in photos) == [f"astronaut_{i}.jpg" for i in range(5)]
    for name in ("notes.txt", "corrupt.jpg", "truncated.jpg", "empty.png"):
        assert name in caplog.text


def test_too_few_usable_photos_fail(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"has 1 usable photo\(s\), fewer than data.min_images=3"):
        scan(tmp_path)


def test_small_photos_are_named_unless_upscaling_is_allowed(tmp_path, caplog):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", size=(300, 200))
    with pytest.raises(DataError, match=r"smaller than data.resolution=256.*0.png \(300x200\).*allow_upscale=true"):
        scan(tmp_path, resolution=256)
    with caplog.at_level(logging.WARNING):
        assert len(scan(tmp_path, resolution=256, allow_upscale=True)) == 3
    assert "upscaling 3 photo(s)" in caplog.text


def test_exif_orientation_and_color_modes(tmp_path):
    im = Image.new("RGB", (200, 100), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert open_photo(tmp_path / "rot.jpg").size == (100, 200)
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "alpha.png")
    assert open_photo(tmp_path / "alpha.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    Image.new("CMYK", (64, 64)).save(tmp_path / "cmyk.jpg")
    Image.new("L", (64, 64)).save(tmp_path / "gray.png")
    assert open_photo(tmp_path / "cmyk.jpg").mode == open_photo(tmp_path / "gray.png").mode == "RGB"


def test_crop_conditioning_matches_sdxl(tmp_path):
    save_image(tmp_path / "wide.png", size=(400, 200))
    [photo] = scan(tmp_path, resolution=100, min_images=1)
    centre = prepare(photo, 100, center_crop=True, rng=random.Random(0))
    assert centre.pixels.shape == (3, 100, 100) and -1.0 <= centre.pixels.min() <= centre.pixels.max() <= 1.0
    assert centre.original_size == (200, 400) and centre.crop_top_left == (0, 50)  # resized to 200x100
    rand = prepare(photo, 100, center_crop=False, rng=random.Random(3))
    assert rand.crop_top_left == prepare(photo, 100, False, random.Random(3)).crop_top_left  # seeded, repeatable
    flipped = prepare(photo, 100, center_crop=False, rng=random.Random(3), flip=True)
    assert flipped.crop_top_left[1] == 200 - rand.crop_top_left[1] - 100
