"""One hook layer around a step's attempt: whatever needs the attempt's context (the log
context, tracing, your own metrics) wraps it here, with the attempt's ids as the engine
knows them, instead of reading Celery signals or the task's argument text.

A hook is a function of an :class:`Attempt` returning a context manager, entered before
the attempt is claimed and left once its outcome is recorded (``attempt.outcome`` is set
by then)::

    from contextlib import contextmanager
    from chassis import hooks

    @contextmanager
    def timing(attempt: hooks.Attempt):
        start = time.monotonic()
        yield
        STEP_SECONDS.labels(attempt.action).observe(time.monotonic() - start)

    hooks.register(timing)

The log context and tracing are hooks themselves (:data:`DEFAULT`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from chassis import logs, tracing

log = logging.getLogger(__name__)


@dataclass
class Attempt:
    """One delivery of a step's (or sub-task's) attempt, as a hook sees it."""

    correlation_id: str
    step: str
    action: str
    attempt: int
    parent_step: str | None = None
    task_id: str | None = None
    worker: str | None = None
    traceparent: str | None = None
    """The trace context the message brought (the workflow's, or its fan-out's)."""
    fuel: int | None = None
    """Fuel charged (or reserved) for the attempt when it was dispatched."""
    outcome: str | None = None
    """Once recorded: ``succeeded``, ``failed``, ``retrying`` (failed, another attempt
    follows), ``skipped`` (a duplicate delivery: the attempt finished or runs elsewhere)
    or ``ignored`` (it ran, but its result came too late: the workflow was cancelled or
    had moved on)."""
    error: str | None = None
    error_type: str | None = None
    settled: int | None = None
    """Fuel the attempt's AI usage was settled at (AI actions)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Room for hooks to pass things to each other."""


Hook = Callable[[Attempt], AbstractContextManager[Any]]


@contextmanager
def log_context(attempt: Attempt) -> Iterator[None]:
    """Every record logged during the attempt carries its correlation_id, step and task id."""
    with logs.bind(correlation_id=attempt.correlation_id, step=attempt.step,
                   task_id=attempt.task_id):
        yield


@contextmanager
def trace_attempt(attempt: Attempt) -> Iterator[None]:
    """A span per attempt (``step <name>``), child of the context its message brought;
    its attributes: the workflow's and the step's ids, the action, the attempt, the fuel
    charged, and once recorded the outcome (a failure marks the span as an error)."""
    if not tracing.active():  # (tracing off: nothing at all)
        yield
        return
    with tracing.span(f"step {attempt.step}", under=attempt.traceparent, attributes={
            tracing.CID: attempt.correlation_id, tracing.STEP: attempt.step,
            tracing.ACTION: attempt.action, tracing.ATTEMPT: attempt.attempt,
            "chassis.parent_step": attempt.parent_step, "chassis.fuel.charged": attempt.fuel,
            "chassis.worker": attempt.worker, "messaging.message.id": attempt.task_id}) as s:
        yield
        if attempt.outcome is not None:
            s.set_attribute("chassis.outcome", attempt.outcome)
        if attempt.settled is not None:
            s.set_attribute("chassis.fuel.settled", attempt.settled)
        if attempt.outcome in ("failed", "retrying"):
            tracing.failed(s, attempt.error or "failed", attempt.error_type)


#: The hooks every attempt goes through, outermost first.
DEFAULT: tuple[Hook, ...] = (log_context, trace_attempt)
_hooks: list[Hook] = list(DEFAULT)


def register(hook: Hook) -> Hook:
    """Add a hook (innermost: after the log context and the span are in place)."""
    if hook not in _hooks:
        _hooks.append(hook)
    return hook


def unregister(hook: Hook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)


@contextmanager
def _guarded(hook: Hook, attempt: Attempt) -> Iterator[None]:
    """``hook`` around the attempt; a hook that raises is logged and left out (a broken
    metrics hook must not stop the attempts it measures)."""
    try:
        cm = hook(attempt)
        cm.__enter__()
    except Exception:  # noqa: BLE001
        log.exception("hook %s failed before step %s: left out", _name(hook), attempt.step)
        yield
        return
    try:
        yield
    except BaseException as exc:
        try:
            cm.__exit__(type(exc), exc, exc.__traceback__)
        except Exception:  # noqa: BLE001
            log.exception("hook %s failed after step %s", _name(hook), attempt.step)
        raise
    try:
        cm.__exit__(None, None, None)
    except Exception:  # noqa: BLE001
        log.exception("hook %s failed after step %s", _name(hook), attempt.step)


def _name(hook: Hook) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)


@contextmanager
def around(attempt: Attempt) -> Iterator[Attempt]:
    """Run the hooks around an attempt (each one's failure is its own)."""
    with ExitStack() as stack:
        for hook in list(_hooks):
            stack.enter_context(_guarded(hook, attempt))
        yield attempt


__all__ = ["DEFAULT", "Attempt", "Hook", "around", "log_context", "register",
           "trace_attempt", "unregister"]
