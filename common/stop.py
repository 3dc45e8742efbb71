"""A graceful stop (Ctrl-C, SIGTERM from `timeout`, `kill` or a Slurm preemption), asked for once per process and
honoured where work can end cleanly: the training loops between steps, evaluation between checkpoints, the
launchers between batches, the sweep's end between its steps. It lives below trainer and evaluation so that both
can check it without knowing who asked or what records the stop (only sweep/ talks to MLflow).

A second signal stops at once: whatever was registered with `at_once` (close the MLflow runs, print the resume
command) runs for a few seconds at most, then the process exits with 128 + the signal's number."""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable

_asked = threading.Event()
_signum = [0]
_listeners: list[Callable[[int, bool], None]] = []  # told of every signal: (number, whether it stops at once)
_last_words: list[Callable[[], None]] = []
LAST_WORDS_S = 5.0  # how long the last words of an immediate stop may take


class Stopped(BaseException):
    """Raised where a stop asked for is honoured. A BaseException, as KeyboardInterrupt is, so that the handlers that
    turn a trial's error into a FAILED trial (`except Exception`) let it pass: a stopped trial resumes, it did not
    fail."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM: what shells and schedulers expect


def requested() -> int:
    """The signal a stop was asked for with, 0 if none."""
    return _signum[0] if _asked.is_set() else 0


def check() -> None:
    """Raise Stopped if a stop was asked for: call where the work done so far is safe (a step ended, a checkpoint's
    scores written)."""
    if _asked.is_set():
        raise Stopped(_signum[0])


def request(signum: int = signal.SIGINT) -> None:
    """Ask for a stop (the first signal's handler does; so may a test or a launcher)."""
    if not _asked.is_set():
        _signum[0] = signum
        _asked.set()


def on_signal(listener: Callable[[int, bool], None]) -> None:
    """`listener(signum, at_once)` is called in the main thread on each stop signal (a launcher forwards it); once,
    however often it is registered."""
    if listener not in _listeners:
        _listeners.append(listener)


def at_once(words: Callable[[], None]) -> None:
    """`words()` runs (bounded in time) before an immediate stop exits the process."""
    _last_words.append(words)


def install(ignore_sigint: bool = False) -> None:
    """The stop signals' handlers, in the main thread. `ignore_sigint`: a launcher's job process, which the
    terminal's Ctrl-C reaches too; it stops when its launcher forwards SIGTERM instead, so one Ctrl-C is one stop."""
    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else _handle)


def say(text: str) -> None:
    """To stderr without logging's locks (a signal handler may interrupt a thread that holds them)."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


def _handle(signum: int, frame) -> None:
    again = _asked.is_set()
    if not again:
        request(signum)
        say(f"\n{signal.Signals(signum).name}: stopping after the current step (finished checkpoints are kept); "
             "press Ctrl-C again to stop at once")
    for listener in list(_listeners):
        try:
            listener(signum, again)
        except Exception as exc:  # a listener's failure must not turn the stop into a traceback
            say(f"(while stopping: {type(exc).__name__}: {exc})")
    if again:
        stop_now(signum)


def stop_now(signum: int) -> None:
    """The immediate stop: the last words (in a thread, at most LAST_WORDS_S), then exit without unwinding."""
    say(f"{signal.Signals(signum).name} again: stopping at once")

    def speak() -> None:
        for words in list(_last_words):
            try:
                words()
            except Exception as exc:
                say(f"(while stopping: {type(exc).__name__}: {exc})")

    t = threading.Thread(target=speak, daemon=True, name="last-words")
    t.start()
    t.join(LAST_WORDS_S)
    os._exit(128 + signum)


def reset() -> None:
    """Forget a stop asked for (tests; a process that serves more than one sweep)."""
    _asked.clear()
    _signum[0] = 0
