"""Helpers shared by the tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def in_ci() -> bool:
    """True under CI=true, where a missing service is a failure, not a skip."""
    return os.environ.get("CI") == "true"


def require_service(name: str, ok: bool, why: str) -> None:
    """Skip the test when service ``name`` is missing (``ok`` false); fail under CI=true."""
    if ok:
        return
    if in_ci():
        pytest.fail(f"{name} is required under CI=true but is not available: {why}", pytrace=False)
    pytest.skip(f"{name} is not available: {why}")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30,
    interval: float = 0.05,
    message: str = "condition was not met",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Raises AssertionError with ``message`` after ``timeout`` seconds. Exceptions of the
    types in ``ignore`` count as "not yet" (e.g. a server still starting).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (waited {timeout:g}s; last result: {last!r})")
        time.sleep(interval)
