"""A real Celery worker started in-process, for the embedded default (and tests).

It consumes the same queues as ``celery -A tasks worker`` from a thread of this
process, so ``chassis demo`` and ``chassis run --wait`` need no server at all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
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
        self.ready.set()


@contextmanager
def embedded_worker(app: Celery, concurrency: int = 2, timeout: float = 30.0) -> Iterator[Any]:
    """Run a worker of ``app`` in a background thread for the duration of the block."""
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
    try:
        yield worker
    finally:
        worker_state.should_terminate = 0
        thread.join(timeout)
        worker_state.should_terminate = None
