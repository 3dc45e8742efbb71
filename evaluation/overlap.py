"""Scoring one checkpoint's images while the next ones generate: a worker thread that runs the work handed to it
in order, at most `depth` pieces waiting (each holds a checkpoint's images), and hands its first error back.

The GPU generates in the caller's thread; CLIP and the face backend (dlib, which releases the GIL in its C++
parts) score in the worker's. Work runs in the order given and each piece alone, so what it computes (and the
order in which metrics.json grows) is what scoring in line computes. The worker's error is raised again in the
caller's thread, as it was. Off (`on=False`), `submit` runs the work at
once in the caller's thread: the same code, one after another."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Self

log = logging.getLogger(__name__)
_DONE = object()


class Overlap:
    """`submit(fn)` hands `fn` to the worker (blocking while `depth` pieces wait); `wait()` returns once all of
    it ran. `waited_s`: how long the caller was held up by scoring (blocked in `submit` or `wait`), the time
    the overlap did not hide. Use as a context manager: leaving it waits for the work handed over (also when the
    caller fails or is stopped, so the checkpoints generated so far keep their scores)."""

    def __init__(self, on: bool = True, depth: int = 1, name: str = "scoring"):
        self.on, self.waited_s = on, 0.0
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True) if on else None
        if self._thread is not None:
            self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._raise()
        if not self.on:
            fn()
            return
        tic = time.perf_counter()
        self._queue.put(fn)  # waits while `depth` pieces are queued: memory stays bounded
        self.waited_s += time.perf_counter() - tic

    def wait(self) -> None:
        """Every piece handed over has run (the worker ends); raises the worker's error, if any."""
        if self._thread is not None and self._thread.is_alive():
            tic = time.perf_counter()
            self._queue.put(_DONE)
            self._thread.join()
            self.waited_s += time.perf_counter() - tic
        self._raise()

    def _run(self) -> None:
        while (fn := self._queue.get()) is not _DONE:
            if self._error is None:  # after a failure the rest is skipped, not run on a broken state
                try:
                    fn()
                except BaseException as exc:  # noqa: BLE001 - handed to the generating thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc  # as it was raised (type, message, the worker's traceback): callers handle it as before

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None:
            self.wait()
            return
        try:  # the caller failed or was stopped: what it handed over is still scored, and its own error wins
            self.wait()
        except BaseException as other:  # noqa: BLE001
            log.error("scoring also failed: %s: %s", type(other).__name__, other)
