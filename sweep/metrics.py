"""The scored metrics: their names, what each measures, its direction and the fixed unit the weighted rule divides
it by; one table that selection, the report, the registry and the Optuna objective all read. Also how metric values
are written where people read them (tables, tags) and stored (strict JSON)."""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Dict

WEIGHTED_SCORE = "weighted_score"  # the weighted rule's objective


@dataclass(frozen=True)
class Metric:
    """A scored metric: what it measures, the fixed unit the weighted rule divides it by, its direction."""

    name: str
    meaning: str
    unit: float  # value / unit is on a 0..1-like scale, the same for every metric
    higher_is_better: bool = True


METRICS: Dict[str, Metric] = {m.name: m for m in (
    Metric("clip_t", "CLIPScore of image vs prompt: 100 x cosine, 0..100", 100.0),
    Metric("clip_i", "CLIP image vs reference photos: 100 x cosine, 0..100", 100.0),
    Metric("pairwise_clip_i", "CLIP image vs image within a set: 100 x cosine, 0..100 (high: low diversity)", 100.0,
           higher_is_better=False),
    Metric("face_similarity", "face embedding cosine to the subject, -1..1", 1.0),
    Metric("face_detection_rate", "fraction of images with a detected face, 0..1", 1.0),
    Metric("prior_face_similarity", "face cosine of the class-prior images to the subject, -1..1", 1.0,
           higher_is_better=False),
)}


def metric(name: str) -> Metric:
    """The table entry of a metric; an arm's variant (clip_t_<arm>) shares its base metric's unit and direction."""
    if name in METRICS:
        return METRICS[name]
    for base in sorted(METRICS, key=len, reverse=True):
        if name.startswith(base + "_"):
            return METRICS[base]
    raise ValueError(f"selection.weights names {name!r}, which is not a known metric: use one of "
                     f"{sorted(METRICS)} (an arm's variant, e.g. clip_t_<arm>, is accepted too){close_matches(name)}")


def close_matches(name: str) -> str:
    """' (did you mean clip_t?)' for a misspelt metric name, else ''."""
    close = difflib.get_close_matches(name, list(METRICS), n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def fmt(v) -> str:
    """A value in a table: floats to 4 significant digits, NaN as 'nan', None as empty."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def metrics_json(metrics: dict) -> str:
    """A metrics dict as strict JSON (NaN and infinities as null), for a tag."""
    return json.dumps({k: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None)
                       for k, v in metrics.items()}, sort_keys=True)


def metrics_from_json(text: str) -> dict:
    return {k: (math.nan if v is None else float(v)) for k, v in json.loads(text).items()}
