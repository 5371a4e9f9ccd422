"""Leases of running attempts, renewed by a heartbeat thread in each worker process.

A worker that claims an attempt holds a lease on its row (CHASSIS_LEASE_SECONDS) and
renews it every third of that while the action runs. When the worker dies (SIGKILL,
OOM, a lost machine) the renewals stop, the lease expires, and the sweep sends the
attempt again: that is how a dead worker's step is found within seconds rather than
when the broker's visibility timeout ends. While the lease is alive, the sweep never
starts a second copy, and a duplicate delivery of the same attempt is ignored.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Heartbeat:
    """Renews the leases of the attempts this process runs (thread-safe, fork-aware)."""

    def __init__(self, renew: Callable[[Sequence[int], float], int], lease: float) -> None:
        self.renew = renew
        self.lease = lease
        self.interval = lease / 3
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = -1
        self._thread: threading.Thread | None = None

    @contextmanager
    def hold(self, row_id: int) -> Iterator[None]:
        """Keep the lease of attempt row ``row_id`` alive for the duration of the block."""
        with self._lock:
            self._ensure_thread()
            self._held[row_id] = self._held.get(row_id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._held.get(row_id, 1) - 1
                if left:
                    self._held[row_id] = left
                else:
                    self._held.pop(row_id, None)

    def held(self) -> list[int]:
        with self._lock:
            return list(self._held)

    def _ensure_thread(self) -> None:
        # threads do not survive a fork (Celery's prefork pool): start one per process
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._held = {}  # the parent's attempts are not this process's
            self._thread = None
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="chassis-heartbeat",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._wake.wait(self.interval):
            ids = self.held()
            if not ids:
                continue
            try:
                self.renew(ids, self.lease)
            except Exception as exc:  # the database blinked: the next beat tries again
                log.warning("could not renew %d lease(s): %s", len(ids),
                            " ".join(str(exc).split())[:200])


__all__ = ["Heartbeat"]
