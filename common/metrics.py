"""The scored metrics: their names, what each measures, its direction, the fixed unit the weighted rule divides it
by, and whether the report shows it. One table that evaluation (the names it writes), selection, the report, the
registry and the Optuna objective all read; the report's columns and plots follow its order."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional

WEIGHTED_SCORE = "weighted_score"  # the weighted rule's objective
CLIP_T, CLIP_I, PAIRWISE_CLIP_I = "clip_t", "clip_i", "pairwise_clip_i"
FACE_SIMILARITY, FACE_DETECTION_RATE, PRIOR_FACE_SIMILARITY = ("face_similarity", "face_detection_rate",
                                                                 "prior_face_similarity")


@dataclass(frozen=True)
class Metric:
    """A scored metric: what it measures, the fixed unit the weighted rule divides it by, its direction, and
    whether the report's table and plots show it."""

    name: str
    meaning: str
    unit: float  # value / unit is on a 0..1-like scale, the same for every metric
    higher_is_better: bool = True
    reported: bool = True
    floor: Optional[float] = None  # the set's value is max(mean of its images', floor): CLIPScore's max(., 0)


METRICS: Dict[str, Metric] = {m.name: m for m in (
    Metric(FACE_SIMILARITY, "face embedding cosine to the subject, -1..1", 1.0),
    Metric(CLIP_T, "CLIPScore of image vs prompt: 100 x cosine, 0..100", 100.0, floor=0.0),
    Metric(CLIP_I, "CLIP image vs reference photos: 100 x cosine, 0..100", 100.0, floor=0.0),
    Metric(FACE_DETECTION_RATE, "fraction of images with a detected face, 0..1", 1.0),
    Metric(PAIRWISE_CLIP_I, "CLIP image vs image within a set: 100 x cosine, 0..100 (high: low diversity)", 100.0,
           higher_is_better=False, reported=False, floor=0.0),
    Metric(PRIOR_FACE_SIMILARITY, "face cosine of the class-prior images to the subject, -1..1", 1.0,
           higher_is_better=False, reported=False),
)}
REPORTED = tuple(name for name, m in METRICS.items() if m.reported)  # the report's metric columns and plots

def metric(name: str) -> Metric:
    """The table entry of a metric; an arm's variant (clip_t_<arm>) shares its base metric's unit and direction."""
    if name in METRICS:
        return METRICS[name]
    for base in sorted(METRICS, key=len, reverse=True):
        if name.startswith(base + "_"):
            return METRICS[base]
    raise ValueError(f"selection.weights names {name!r}, which is not a known metric: use one of "
                     f"{sorted(METRICS)} (an arm's variant, e.g. clip_t_<arm>, is accepted too){close_matches(name)}")


def close_matches(name: str, names=None) -> str:
    """' (did you mean clip_t?)' for a misspelt metric name (or one of `names`), else ''."""
    close = difflib.get_close_matches(name, list(METRICS if names is None else names), n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def aggregate(cells: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """A set of images' metrics from its cells (one image each, {metric: value}): each metric's mean over the
    cells that have a finite value (a face metric's over the images with a face; NaN when none has), at least its
    floor. So a checkpoint scored in several calls (racing rounds) has the metrics one call over all its cells
    would give."""
    values: dict[str, list[float]] = {}
    for cell in cells:
        for name, v in cell.items():
            values.setdefault(name, []).append(v)
    out = {}
    for name, vs in values.items():
        finite = [float(v) for v in vs if v is not None and math.isfinite(v)]
        mean = math.fsum(finite) / len(finite) if finite else math.nan
        floor = floor_of(name)
        out[name] = max(mean, floor) if floor is not None and finite else mean
    return out


def floor_of(name: str) -> Optional[float]:
    """The least value a set of images' metric takes (CLIP scores: 0), None without one or for a name that is not
    a metric of the table (averaged as it is)."""
    try:
        return metric(name).floor
    except ValueError:
        return None
