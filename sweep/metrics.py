"""How metric values are written where people read them (tables, tags) and stored (strict JSON); the metric table
itself (names, directions, units) is common.metrics."""
from __future__ import annotations

import json
import math


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
