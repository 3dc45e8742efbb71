"""Face identity with dlib's real models, offline, on public-domain and LFW images."""
import logging
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

from evaluation import DlibBackend, FaceSimilarity, Identity


@pytest.fixture(scope="module")
def backend():
    return DlibBackend()


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(data.astronaut())


def lfw_faces(n: int) -> list[Image.Image]:
    """Other people: scikit-image's LFW subset (25 px crops), upscaled and framed so a detector sees a face."""
    out = []
    for face in data.lfw_subset()[:n]:
        big = Image.fromarray((face * 255).astype(np.uint8)).resize((200, 200), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (300, 300), 128)
        canvas.paste(big, (50, 50))
        out.append(canvas.convert("RGB"))
    return out


def score(backend, identity, images):
    m = FaceSimilarity(backend, identity)
    m.update(images)
    return m.compute(), m


def test_same_person_scores_far_above_other_people(backend, astronaut):
    identity = Identity(backend, [astronaut])
    copies = [ImageOps.mirror(astronaut), astronaut.crop((60, 0, 420, 360)).resize((512, 512)),
              ImageEnhance.Color(ImageEnhance.Brightness(astronaut).enhance(1.2)).enhance(0.6),
              astronaut.rotate(8, fillcolor=(128, 128, 128))]
    same, _ = score(backend, identity, copies)
    singles = [score(backend, identity, [im])[0] for im in lfw_faces(40)]
    others = [float(s["similarity"]) for s in singles if not math.isnan(s["similarity"])]
    assert float(same["detection_rate"]) == 1.0 and len(others) >= 30
    assert float(same["similarity"]) > 0.98
    assert min(float(score(backend, identity, [c])[0]["similarity"]) for c in copies) > max(others) + 0.05
    assert float(same["similarity"]) - np.mean(others) > 0.1


def test_images_without_faces_give_rate_zero_and_nan_with_a_reason(backend, astronaut):
    identity = Identity(backend, [astronaut])
    noise = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8)) for i in range(3)]
    result, metric = score(backend, identity, noise + [Image.new("RGB", (256, 256), "white")])
    assert float(result["detection_rate"]) == 0.0 and math.isnan(float(result["similarity"]))
    assert metric.reason == "no face detected in any of 4 image(s)"
    mixed, _ = score(backend, identity, noise[:1] + [astronaut])
    assert float(mixed["detection_rate"]) == 0.5 and float(mixed["similarity"]) > 0.98  # mean over detected faces


def test_tensor_input_matches_pil_input(backend, astronaut):
    import torch

    identity = Identity(backend, [astronaut])
    t = torch.from_numpy(np.array(astronaut)).permute(2, 0, 1)[None]
    a, _ = score(backend, identity, t)
    b, _ = score(backend, identity, t.float() / 255)
    assert float(a["similarity"]) == pytest.approx(float(b["similarity"]), abs=1e-3) and float(a["similarity"]) > 0.99


def test_instance_photos_without_a_face_are_named(backend, astronaut):
    with pytest.raises(ValueError, match=r"no face found in 1 instance photo\(s\): wall.png.*face_backend=none"):
        Identity(backend, [astronaut, Image.new("RGB", (300, 300), "gray")], names=["me.jpg", "wall.png"])


def test_references_of_different_people_warn(backend, astronaut, caplog):
    with caplog.at_level(logging.WARNING):
        identity = Identity(backend, [astronaut, lfw_faces(1)[0]], names=["a.jpg", "b.jpg"])
    assert identity.strangers == [("a.jpg", "b.jpg")] and "may not all show the same person" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Identity(backend, [astronaut, ImageOps.mirror(astronaut)])
    assert "same person" not in caplog.text


def test_missing_backend_names_the_extra():
    from evaluation.face import FaceBackendMissing, make_backend

    pytest.importorskip("dlib")
    try:
        import insightface  # noqa: F401
        pytest.skip("insightface is installed here")
    except ImportError:
        pass
    with pytest.raises(FaceBackendMissing, match=r"pip install 'sdxl-lora-sweep\[insightface\]'"):
        make_backend("insightface")


def test_many_images_on_threads_embed_exactly_as_one_by_one(backend, astronaut):
    """Detection runs on several threads (each with its own detector); the result must not depend on it."""
    faces = [np.asarray(astronaut.rotate(r).resize((1024, 1024))) for r in (0, 8, 16)]
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    images = faces + [noise] + faces
    one_by_one = [backend.embed(a) for a in images]
    together = backend.embed_many(images)
    assert [e is None for e in together] == [False, False, False, True, False, False, False]
    assert all(b is None or np.array_equal(a, b) for a, b in zip(one_by_one, together))
