"""Where a process's overhead goes: wall-clock seconds of named parts of the work that is neither training,
generating nor scoring (start-up, loading models, caching latents, setting up a pack, writing checkpoints, merging
LoRAs, ...), added up over the process. A sweep's end writes them beside its phases (sweep/phases.py), so that a
person or a bench sees what its overhead is made of, not only how large it is."""
from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

_LOCK = threading.Lock()
_SECONDS: dict[str, float] = defaultdict(float)
_COUNTS: dict[str, int] = defaultdict(int)


def add(name: str, seconds: float) -> None:
    with _LOCK:
        _SECONDS[name] += seconds
        _COUNTS[name] += 1


def once(name: str, seconds: float) -> None:
    """`name` set the first time only (start-up: when the process's first job began)."""
    with _LOCK:
        if name not in _SECONDS:
            _SECONDS[name], _COUNTS[name] = seconds, 1


@contextlib.contextmanager
def span(name: str):
    """The block's wall-clock seconds added to `name` (also when it raises)."""
    tic = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - tic)


def parts() -> dict[str, dict[str, float]]:
    """{name: {"seconds": s, "count": n}} of this process so far, largest first."""
    with _LOCK:
        return {k: {"seconds": round(_SECONDS[k], 3), "count": _COUNTS[k]}
                for k in sorted(_SECONDS, key=_SECONDS.get, reverse=True)}


def reset() -> None:
    with _LOCK:
        _SECONDS.clear()
        _COUNTS.clear()
