"""An attempt's timeout, enforced inside the process that runs the action.

Where the action runs in a process's main thread (Celery's prefork and solo pools), a
timer signal (SIGALRM) interrupts it at its deadline with :class:`AttemptDeadline`, so
the attempt fails promptly and its worker is free again. Elsewhere (the threads,
gevent and eventlet pools, and the embedded worker) a thread cannot be interrupted:
the sweep fails the attempt when its deadline has passed, the action goes on until it
returns, and its late result is ignored.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class AttemptDeadline(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt
    """Raised into an action that ran past its timeout. A BaseException, so that an
    action's own ``except Exception`` does not swallow it."""


def can_interrupt() -> bool:
    return (hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread())


@contextmanager
def time_limit(seconds: float | None) -> Iterator[bool]:
    """Interrupt the block after ``seconds`` where possible; yields whether it can.

    Limits nest (a prompt template's inside its step's): an outer limit that comes
    first still fires, as its own, and is re-armed for what is left of it afterwards."""
    if seconds is None or not can_interrupt():
        yield False
        return
    began = time.monotonic()
    outer_left = signal.getitimer(signal.ITIMER_REAL)[0]
    outer_first = 0 < outer_left <= seconds

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        if outer_first and callable(previous):
            previous(signum, frame)  # the outer deadline came first: it raises its own
        raise AttemptDeadline(f"ran past its timeout of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, outer_left if outer_first else seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left > 0:
            left = outer_left - (time.monotonic() - began)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))


__all__ = ["AttemptDeadline", "can_interrupt", "time_limit"]
