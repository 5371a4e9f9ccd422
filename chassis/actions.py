"""The action registry: the Python functions a plan's steps can name as ``action``.

An action is ``fn(data, params) -> result``: ``data`` is what the step sees (``input``,
earlier outputs by step name, ``human_feedback``), ``params`` is the step's ``params``,
and the result must be JSON-serialisable (it is stored as the step's output). Register
one with ``@action("name")`` or bare ``@action`` (the function's name). Workers and
``chassis validate`` import user modules with :func:`load_modules`. Inside a worker,
:func:`current_attempt` is the attempt an action runs for.

Built-ins for demos and tests: ``noop``, ``echo``, ``sleep``, ``fail``.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from chassis.errors import ActionError, ConfigError, UnknownAction
from chassis.plan import RESERVED_ACTIONS

if TYPE_CHECKING:
    from chassis.store.breaker import CircuitBreakers

Action = Callable[[dict[str, Any], dict[str, Any]], Any]
F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: dict[str, Action] = {}


def _register(name: str, fn: Action, replace: bool) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"an action name must be a non-empty string, got {name!r}")
    if name in RESERVED_ACTIONS:
        raise ValueError(f"{name!r} is reserved for the coordinator; choose another name")
    old = _REGISTRY.get(name)
    if old is not None and old is not fn and not replace and not _same_definition(old, fn):
        raise ValueError(
            f"action {name!r} is already registered by {_where(old)}; "
            f"pass replace=True to replace it with {_where(fn)}"
        )
    _REGISTRY[name] = fn


def _same_definition(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    # A module imported again (importlib.reload) defines a new function object for the
    # same source definition; that is a re-registration, not a clash.
    return _where(a) == _where(b)


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


@overload
def action(name: F, /) -> F: ...
@overload
def action(name: str | None = None, /, *, replace: bool = False) -> Callable[[F], F]: ...
def action(name: str | F | None = None, /, *, replace: bool = False) -> F | Callable[[F], F]:
    """Register ``fn(data, params)`` as an action: ``@action``, ``@action("name")`` or
    ``@action("name", replace=True)``. Returns the function unchanged."""
    if callable(name):
        fn = name
        _register(fn.__name__, fn, replace)
        return fn

    def decorate(fn: F) -> F:
        _register(name if name is not None else fn.__name__, fn, replace)
        return fn

    return decorate


def unregister(name: str) -> None:
    """Remove an action (no error when it is not registered); mainly for tests."""
    _REGISTRY.pop(name, None)


def registered() -> frozenset[str]:
    """Names of the actions registered in this process."""
    return frozenset(_REGISTRY)


def get(name: str) -> Action:
    """The action registered as ``name``; :class:`UnknownAction` when there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownAction(
            f"no action named {name!r} is registered in this process (registered: {known}); "
            "register it with @chassis.actions.action and load its module "
            "(--actions)"
        ) from None


def load_modules(names: Iterable[str]) -> None:
    """Import the modules that register actions; :class:`ConfigError` names the one that
    cannot be imported. The current folder is searched first, as ``celery -A`` does (a
    console script such as ``chassis`` does not have it on ``sys.path``)."""
    names = list(names)
    if names and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any error while importing user code is a config error
            raise ConfigError(
                f"cannot import actions module {name!r}: {type(exc).__name__}: {exc}"
            ) from exc


# ------------------------------------------------------------ the attempt under way


@dataclass(frozen=True)
class Attempt:
    """The attempt an action runs for in a worker: its workflow, step and attempt
    number, and a model response kept for it. The engine sets it around the action
    (:func:`current_attempt`); ``load`` and ``keep`` reach the store."""

    correlation_id: str
    step: str
    attempt: int
    load: Callable[[], dict[str, Any] | None] = field(repr=False)
    keep: Callable[[dict[str, Any]], bool] = field(repr=False)
    breakers: CircuitBreakers | None = field(default=None, repr=False)
    """The AI providers' circuit breakers, in the worker's database (chassis.ai.breaker)."""

    def recall(self) -> dict[str, Any] | None:
        """The model response an earlier delivery of this attempt kept, if any."""
        return self.load()

    def remember(self, response: dict[str, Any]) -> bool:
        """Keep a model response for this attempt, committed when this returns; False
        when one was kept already (that one stays: the first wins)."""
        return self.keep(response)


_ATTEMPT: ContextVar[Attempt | None] = ContextVar("chassis_attempt", default=None)


def current_attempt() -> Attempt | None:
    """The attempt the running action belongs to; None outside a worker's attempt (an
    action called directly, e.g. in a unit test)."""
    return _ATTEMPT.get()


@contextmanager
def attempt_context(attempt: Attempt) -> Iterator[Attempt]:
    """Make ``attempt`` the :func:`current_attempt` of this thread (or task) inside the
    block."""
    token = _ATTEMPT.set(attempt)
    try:
        yield attempt
    finally:
        _ATTEMPT.reset(token)


# -------------------------------------------------------------------------- built-ins


@action("noop")
def noop(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Do nothing; returns {}."""
    return {}


@action("echo")
def echo(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Return the step's params."""
    return dict(params)


@action("sleep")
def sleep(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Wait ``params.seconds`` (default 0); returns {}."""
    raw = params.get("seconds", 0)
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        raise ActionError(f"sleep: 'seconds' must be a number, got {raw!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ActionError(f"sleep: 'seconds' must be zero or more, got {raw!r}")
    time.sleep(seconds)
    return {}


@action("fail")
def fail(data: dict[str, Any], params: dict[str, Any]) -> Any:
    """Raise :class:`ActionError` with ``params.message``."""
    raise ActionError(str(params.get("message", "step failed by the 'fail' action")))


__all__ = ["Action", "Attempt", "action", "attempt_context", "current_attempt", "get",
           "load_modules", "registered", "unregister"]

# The AI actions (ai_text_generate_*) are built-ins too. Imported last: that module
# registers them with @action from this one.
import chassis.ai.actions  # noqa: E402,F401
