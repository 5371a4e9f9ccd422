"""Prompt templates: Jinja2 in its sandbox, over the data a step sees.

Plans arrive from other apps, so a template must not reach Python internals: the
sandboxed environment refuses attributes such as ``__class__`` and unsafe callables.
Every name must exist (StrictUndefined), and a missing one is an error naming the key,
e.g. ``{{ input.topic }}`` with no ``topic`` in the input.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from jinja2.utils import missing

from chassis.ai.errors import PromptTemplateError


class _MissingKeyError(UndefinedError):
    """UndefinedError that remembers the key that was missing."""

    def __init__(self, message: str | None = None, *, key: Any = None) -> None:
        super().__init__(message)
        self.key = key


class _StrictKeys(StrictUndefined):
    """StrictUndefined whose error names the missing key and what was there instead."""

    __slots__ = ()

    def __init__(self, hint: str | None = None, obj: Any = missing, name: str | None = None,
                 exc: Any = UndefinedError) -> None:
        # the sandbox passes SecurityError for unsafe attributes: keep that one
        if exc is UndefinedError:
            exc = functools.partial(_MissingKeyError, key=name)
        super().__init__(hint, obj, name, exc)

    @property
    def _undefined_message(self) -> str:
        if self._undefined_hint:
            return self._undefined_hint
        name, obj = self._undefined_name, self._undefined_obj
        if obj is missing:
            return f"{name!r} is undefined"
        if isinstance(obj, Mapping):
            keys = ", ".join(sorted(map(str, obj))) or "none"
            return f"no key {name!r} in a map with keys: {keys}"
        return f"no key {name!r} in {type(obj).__name__} value {str(obj)[:60]!r}"


_ENV = SandboxedEnvironment(undefined=_StrictKeys, autoescape=False, keep_trailing_newline=True)


def render(template: str, data: Mapping[str, Any], *, what: str = "prompt") -> str:
    """Render ``template`` with the step's data as its variables (``input``, earlier
    steps by name, ``human_feedback``). Raises :class:`PromptTemplateError`."""
    if not isinstance(template, str):
        raise PromptTemplateError(f"{what} must be a string (a template), "
                                  f"got {type(template).__name__}")
    try:
        return _ENV.from_string(template).render(dict(data))
    except _MissingKeyError as exc:
        seen = ", ".join(sorted(data)) or "nothing"
        raise PromptTemplateError(
            f"{what} template: missing key {exc.key!r}: {exc.message} "
            f"(the step's data has: {seen})", key=None if exc.key is None else str(exc.key),
        ) from None
    except SecurityError as exc:
        raise PromptTemplateError(f"{what} template is not allowed: {exc}") from None
    except TemplateSyntaxError as exc:
        raise PromptTemplateError(
            f"{what} template has a syntax error on line {exc.lineno}: {exc.message}") from None
    except UndefinedError as exc:
        raise PromptTemplateError(f"{what} template: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001  (e.g. a filter given the wrong type)
        raise PromptTemplateError(f"{what} template failed: {type(exc).__name__}: {exc}") from None


__all__ = ["render"]
