"""A real Celery worker started in-process, for the embedded default (and tests).

It consumes the same queues as ``celery -A chassis.worker worker`` from a thread of this
process, so ``chassis demo`` and ``chassis run --wait`` need no server at all. A second
thread runs the sweep (retries due, timeouts, lost work) as beat would.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.worker import WorkController
from celery.worker import state as worker_state


class _Worker(WorkController):
    """A WorkController that tells when its consumer is ready."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        _wake_often(consumer.connection)
        self.ready.set()


#: Seconds the embedded worker's loop waits for a message before it looks whether it
#: should stop (Celery's loop waits 2 s: a `chassis run --wait` would end that late).
WAKE_INTERVAL = 0.05


def _wake_often(connection: Any) -> None:
    """Cap the loop's wait for messages (the file-system broker polls anyway)."""
    drain = connection.drain_events

    def drain_events(timeout: float | None = None, **kwargs: Any) -> Any:
        return drain(timeout=WAKE_INTERVAL if timeout is None else min(timeout, WAKE_INTERVAL),
                     **kwargs)

    connection.drain_events = drain_events


log = logging.getLogger(__name__)


def _sweeping(sweep: Callable[[], Any], interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            sweep()
        except Exception as exc:  # the next round tries again
            log.warning("embedded sweep failed: %s", exc)


@contextmanager
def embedded_worker(app: Celery, concurrency: int = 2, timeout: float = 30.0,
                    sweep: Callable[[], Any] | None = None,
                    sweep_interval: float = 5.0) -> Iterator[Any]:
    """Run a worker of ``app`` in a background thread for the duration of the block,
    and ``sweep`` every ``sweep_interval`` seconds in another."""
    app.finalize()
    app.set_current()
    worker = _Worker(app=app, concurrency=concurrency, pool="threads", loglevel="WARNING",
                     hostname=f"embedded-{threading.get_ident()}@localhost",
                     without_heartbeat=True, without_mingle=True, without_gossip=True,
                     ready_callback=None)
    thread = threading.Thread(target=worker.start, name="chassis-embedded-worker",
                              daemon=True)
    thread.start()
    if not worker.ready.wait(timeout):
        raise RuntimeError(f"the embedded Celery worker did not start within {timeout} s")
    stop = threading.Event()
    if sweep is not None:
        threading.Thread(target=_sweeping, args=(sweep, sweep_interval, stop),
                         name="chassis-embedded-sweep", daemon=True).start()
    try:
        yield worker
    finally:
        stop.set()
        worker_state.should_terminate = 0
        thread.join(timeout)
        worker_state.should_terminate = None
