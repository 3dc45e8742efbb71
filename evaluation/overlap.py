"""Scoring one checkpoint's images while the next ones generate (or while training goes on): a worker thread
that runs the work handed to it in order, at most `depth` pieces waiting (each holds a checkpoint's images), and
hands its first error back.

The GPU generates in the caller's thread; CLIP and the face backend (dlib, which releases the GIL in its C++
parts) score in the worker's. Work runs in the order given and one piece at a time in the whole process (dlib's
descriptor network is not safe to share between threads), so what it computes, and the order in which
metrics.json grows, is what scoring in line computes. The worker's error is raised again in the caller's thread,
as it was. Off (`on=False`), `submit` runs the work at once in the caller's thread: the same code, in turn."""
from __future__ import annotations

import contextvars
import functools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Self

log = logging.getLogger(__name__)
_DONE = object()
_ONE_AT_A_TIME = threading.Lock()  # pieces of every worker of the process, one after another


class Overlap:
    """`submit(fn)` hands `fn` to the worker (blocking while `depth` pieces wait); `wait()` returns once all of
    it ran. `waited_s` (and `times["wait_s"]`, when given): how long the caller was held up by scoring (blocked
    in `submit` or `wait`), the time the overlap did not hide; without the overlap (`on=False`) all of it. As a
    context manager, leaving it waits for the work handed over (also when the caller fails or is stopped, so the
    checkpoints generated so far keep their scores)."""

    def __init__(self, on: bool = True, depth: int = 1, name: str = "scoring", times: Counter | None = None):
        self.on, self.waited_s, self._times = on, 0.0, times
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True) if on else None
        if self._thread is not None:
            self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        self._raise()
        if not self.on:  # scored here and now: the caller waits for all of it
            tic = time.perf_counter()
            try:
                with _ONE_AT_A_TIME:
                    fn()
            finally:
                self._waited(time.perf_counter() - tic)
            return
        tic = time.perf_counter()
        # run in a copy of the caller's context: its context variables (the trial a log line names) go along
        self._queue.put(functools.partial(contextvars.copy_context().run, fn))  # waits while `depth` pieces queue
        self._waited(time.perf_counter() - tic)

    def busy(self) -> bool:
        """Whether pieces handed over have not run yet."""
        return self._thread is not None and self._queue.unfinished_tasks > 0

    def settle(self) -> None:
        """Returns once every piece handed over so far has run (or was skipped after a failure); raises nothing.
        Any thread may call it (another call's evaluation waiting for the scores it borrows)."""
        if self._thread is not None:
            self._queue.join()

    def wait(self) -> None:
        """Every piece handed over has run (the worker ends); raises the worker's error, if any."""
        if self._thread is not None and self._thread.is_alive():
            tic = time.perf_counter()
            self._queue.put(_DONE)
            self._thread.join()
            self._waited(time.perf_counter() - tic)
        self._raise()

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            try:
                if fn is _DONE:
                    return
                if self._error is None:  # after a failure the rest is skipped, not run on a broken state
                    with _ONE_AT_A_TIME:
                        fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the generating thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _waited(self, seconds: float) -> None:
        self.waited_s += seconds
        if self._times is not None:
            self._times["wait_s"] += seconds

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


class Later:
    """A call's scoring still under way on its worker: `result()` (in the caller's thread) waits for it, raises
    its error if it failed, and returns what it made. `keys`: what other calls may wait for with `settle()` (the
    LoRA files' sha256 it scores)."""

    def __init__(self, work: Overlap, out: list, keys: frozenset = frozenset(),
                 waited: Callable[[float], None] | None = None):
        self.work, self._out, self.keys, self._waited = work, out, keys, waited

    def result(self) -> Any:
        self.work.wait()
        if self._waited is not None:  # once: how long this call's callers were held up by its scoring
            waited, self._waited = self._waited, None
            waited(self.work.waited_s)
        return self._out[0]

    def settle(self) -> None:
        self.work.settle()
