"""Face identity: detect the largest face, embed it, compare with the subject's identity.

Backends share one interface (`FaceBackend.embed`); dlib's ResNet is the default because its weights
ship in the PyPI package face_recognition_models and work offline. insightface (ArcFace) and
facenet-pytorch download their weights on first use on a user's machine."""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torchmetrics import Metric

log = logging.getLogger(__name__)

Images = Sequence[Image.Image] | torch.Tensor


class FaceBackendMissing(ImportError):
    pass


class FaceBackend(Protocol):
    name: str

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        """Embedding of the largest face in an HxWx3 uint8 RGB image, or None when there is no face."""

    def same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        """The backend's own verification rule (used to warn about mixed reference photos)."""


def _need(module: str, extra: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise FaceBackendMissing(f"eval.face_backend={what} needs the `{module}` package: pip install "
                                 f"'sdxl-lora-sweep[{extra}]' (or eval.face_backend=none: no face-identity metrics)")


class DlibBackend:
    """dlib HOG detector, 5-point alignment, ResNet-34 128-d descriptor (99.38% on LFW)."""

    name = "dlib"
    threshold = 0.6  # dlib's documented same-person Euclidean distance

    def __init__(self, upsample: int = 1, max_side: int = 640):
        _need("dlib", "dlib", "dlib")
        _need("face_recognition_models", "dlib", "dlib")
        import dlib

        # the package's __init__ needs pkg_resources; its files are all we use
        models = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
        self._local = threading.local()
        self._pool = None
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self.upsample, self.max_side = upsample, max_side

    def _detector(self):
        """A detector per thread: one instance is not safe to share between threads."""
        det = getattr(self._local, "detect", None)
        if det is None:
            import dlib

            det = self._local.detect = dlib.get_frontal_face_detector()
        return det

    def face_count(self, image: np.ndarray) -> int:
        return len(self._boxes(self._fit(image)))

    def _fit(self, image: np.ndarray) -> np.ndarray:
        if max(image.shape[:2]) > self.max_side:
            im = Image.fromarray(image)
            im.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
            image = np.asarray(im)
        return np.ascontiguousarray(image)

    def _boxes(self, image: np.ndarray):
        return self._detector()(image, self.upsample)

    def _detect_largest(self, image: np.ndarray):
        # HOG detection time grows with pixels; a 1024 px render is scored at 640 px (the descriptor sees a
        # 150 px aligned chip either way)
        image = self._fit(image)
        boxes = self._boxes(image)
        return image, (max(boxes, key=lambda r: r.width() * r.height()) if len(boxes) else None)

    def _describe(self, image: np.ndarray, box) -> np.ndarray | None:
        if box is None:
            return None
        return np.asarray(self._net.compute_face_descriptor(image, self._shape(image, box)), dtype=np.float32)

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        return self._describe(*self._detect_largest(image))

    def embed_many(self, images: list[np.ndarray]) -> list[np.ndarray | None]:
        """`embed` for many images: resizing and HOG detection (most of the time, and free of shared state) on
        several CPU threads, the ResNet descriptor (which keeps its buffers in the network) on this one."""
        if self._pool is None:  # kept: each thread builds its detector once (a quarter second each)
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="face")
        found = list(self._pool.map(self._detect_largest, images))
        return [self._describe(im, box) for im, box in found]

    def same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        return float(np.linalg.norm(a - b)) < self.threshold


class InsightFaceBackend:
    """ArcFace through insightface's FaceAnalysis (buffalo_l); downloads its ONNX weights on first use."""

    name = "insightface"

    def __init__(self, model: str = "buffalo_l", det_size: int = 640):
        _need("insightface", "insightface", "insightface")
        from insightface.app import FaceAnalysis

        self._app = FaceAnalysis(name=model, allowed_modules=["detection", "recognition"])
        self._app.prepare(ctx_id=0 if torch.cuda.is_available() else -1, det_size=(det_size, det_size))

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        faces = self._app.get(np.ascontiguousarray(image[:, :, ::-1]))  # insightface expects BGR
        if not faces:
            return None
        face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        return np.asarray(face.normed_embedding, dtype=np.float32)

    def same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        return _cos(a, b) > 0.3


class FaceNetBackend:
    """MTCNN + InceptionResnetV1 (VGGFace2) from facenet-pytorch; downloads its weights on first use."""

    name = "facenet"

    def __init__(self):
        _need("facenet_pytorch", "facenet", "facenet")
        from facenet_pytorch import MTCNN, InceptionResnetV1

        self._mtcnn = MTCNN(select_largest=True)
        self._net = InceptionResnetV1(pretrained="vggface2").eval()

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> np.ndarray | None:
        face = self._mtcnn(Image.fromarray(image))
        return None if face is None else self._net(face[None]).squeeze(0).numpy()

    def same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        return float(np.linalg.norm(a / np.linalg.norm(a) - b / np.linalg.norm(b))) < 1.1


BACKENDS = {"dlib": DlibBackend, "insightface": InsightFaceBackend, "facenet": FaceNetBackend}


def make_backend(name: str) -> FaceBackend:
    return BACKENDS[name]()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def to_arrays(images: Images) -> list[np.ndarray]:
    """PIL images or an N x 3 x H x W tensor (uint8, or float in [0, 1]) -> list of HxWx3 uint8."""
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        if t.is_floating_point():
            t = (t.clamp(0, 1) * 255).round()
        return [a for a in t.to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    return [np.asarray(im.convert("RGB")) for im in images]


class Identity:
    """The subject's identity: the mean of the reference photos' unit face embeddings."""

    def __init__(self, backend: FaceBackend, references: Images, names: Sequence[str] | None = None):
        arrays = to_arrays(references)
        names = list(names) if names else [f"reference {i}" for i in range(len(arrays))]
        embs = [backend.embed(a) for a in arrays]
        missing = [n for n, e in zip(names, embs) if e is None]
        if missing:
            raise ValueError(f"no face found in {len(missing)} instance photo(s): {', '.join(missing)}. Use photos "
                             "where the face is clearly visible, or turn the face metric off (eval.face_backend=none)")
        count = getattr(backend, "face_count", None)
        crowded = [f"{n} ({k} faces)" for n, a in zip(names, arrays) if count and (k := count(a)) > 1]
        if crowded:
            log.warning("instance photo(s) with several faces: %s; the largest face is taken as the subject's. "
                        "Crop them to the subject for a cleaner identity", ", ".join(crowded))
        self.crowded = crowded
        self.embeddings = [e / np.linalg.norm(e) for e in embs]
        mean = np.mean(self.embeddings, axis=0)
        self.vector = mean / np.linalg.norm(mean)
        strangers = [(names[i], names[j]) for i in range(len(embs)) for j in range(i + 1, len(embs))
                     if not backend.same_person(embs[i], embs[j])]
        if strangers:
            log.warning("the instance photos may not all show the same person (%s says %s differ); the identity "
                        "is their mean, so mixed photos weaken the face metric", backend.name, strangers[:3])
        self.strangers = strangers


class FaceSimilarity(Metric):
    """Mean cosine similarity between the largest face of each image and the identity, over images with a face,
    and the share of images where a face was found. Images without a face count against the detection rate;
    with no face at all the similarity is NaN and `reason` says why."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, backend: FaceBackend, identity: Identity, **kwargs):
        super().__init__(**kwargs)
        self.backend, self.identity = backend, identity
        self.add_state("similarity_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("detected", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("cells", default=[], dist_reduce_fx="cat")  # each image's similarity, NaN without a face
        self.reason: str | None = None

    def update(self, images: Images) -> None:
        arrays = to_arrays(images)
        many = getattr(self.backend, "embed_many", None)
        for emb in (many(arrays) if many else map(self.backend.embed, arrays)):
            self.total += 1
            sim = math.nan
            if emb is not None:
                sim = _cos(emb, self.identity.vector)
                self.detected += 1
                self.similarity_sum += sim
            self.cells.append(torch.tensor([sim], dtype=torch.float64))

    def per_image(self) -> list[float]:
        """Each image's similarity since the last reset, in update order (NaN where no face was found)."""
        return [float(v) for v in torch.cat(self.cells)] if len(self.cells) else []

    def compute(self) -> dict[str, torch.Tensor]:
        n, total = int(self.detected), int(self.total)
        self.reason = None if n else f"no face detected in any of {total} image(s)"
        sim = self.similarity_sum / n if n else torch.tensor(math.nan, dtype=torch.float64)
        rate = torch.tensor(n / total if total else math.nan, dtype=torch.float64)
        return {"similarity": sim, "detection_rate": rate}
