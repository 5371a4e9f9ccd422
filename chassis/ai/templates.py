"""Prompt templates: Jinja2 in its sandbox, over the data a step sees.

Plans arrive from other apps, so a template must not reach Python internals: the
sandboxed environment refuses attributes such as ``__class__`` and unsafe callables.
Every name must exist (StrictUndefined), and a missing one is an error naming the key,
e.g. ``{{ input.topic }}`` with no ``topic`` in the input.

Nor may a template hold a worker: rendering stops after CHASSIS_TEMPLATE_TIMEOUT seconds
(2) and CHASSIS_TEMPLATE_MAX_BYTES of output (1 MiB), ``**`` and ``*`` refuse results too
large to compute (``{{ 9 ** (9 ** 8) }}``, ``{{ 'x' * 10 ** 9 }}``), and ``range`` is
bounded by the sandbox. The time limit interrupts a template where the worker runs
steps in a process's main thread (prefork, solo); elsewhere it is checked as output is
produced.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import select
import signal
import time
from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from jinja2.utils import missing

from chassis.ai.errors import PromptTemplateError
from chassis.deadline import AttemptDeadline, time_limit

#: Bits a ``**`` or ``*`` of integers may produce (about 30,000 decimal digits).
MAX_INT_BITS = 100_000


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


class _Bounded(SandboxedEnvironment):
    """The sandbox, with ``**`` and ``*`` refusing results too large to build."""

    intercepted_binops = frozenset({"**", "*"})
    max_bytes = 1_048_576

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and _int(left) and _int(right) and right > 0 and abs(left) > 1:
            if right * math.log2(abs(left)) > MAX_INT_BITS:
                raise SecurityError(f"{left} ** {right} is too large to compute")
        if operator == "*":
            if _int(left) and _int(right) and left.bit_length() + right.bit_length() \
                    > MAX_INT_BITS:
                raise SecurityError("the product is too large to compute")
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and _int(n) \
                        and len(seq) * max(n, 0) > self.max_bytes:
                    raise SecurityError(f"repeating a {type(seq).__name__} {n} times is "
                                        "larger than a template may make")
        return super().call_binop(context, operator, left, right)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_ENV = _Bounded(undefined=_StrictKeys, autoescape=False, keep_trailing_newline=True)


class _TooLong(Exception):
    pass


def _bounded(chunks: Any, seconds: float, max_bytes: int) -> str:
    """Join the template's output, stopping at ``max_bytes`` or after ``seconds``."""
    out: list[str] = []
    size = 0
    deadline = time.monotonic() + seconds
    for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise _TooLong(f"makes more than {max_bytes} characters "
                           "(CHASSIS_TEMPLATE_MAX_BYTES)")
        if time.monotonic() > deadline:
            raise _TooLong(f"took longer than {seconds:g} s (CHASSIS_TEMPLATE_TIMEOUT)")
        out.append(chunk)
    return "".join(out)


def render(template: str, data: Mapping[str, Any], *, what: str = "prompt",
           seconds: float = 2.0, max_bytes: int = 1_048_576) -> str:
    """Render ``template`` with the step's data as its variables (``input``, earlier
    steps by name, ``human_feedback``) within ``seconds`` and ``max_bytes`` of output.
    Raises :class:`PromptTemplateError`.

    Where processes can fork (Linux, macOS), the rendering runs in a child process with
    its own time limit and a cap on its memory (MEMORY_HEADROOM above the worker's), so
    that no template can hold the worker or exhaust its memory: the worker stays
    healthy and the step's attempt fails with a clear error."""
    if not isinstance(template, str):
        raise PromptTemplateError(f"{what} must be a string (a template), "
                                  f"got {type(template).__name__}")
    if not hasattr(os, "fork"):
        return _render_here(template, data, what, seconds, max_bytes)
    # compiling runs in the child too: Jinja computes constant output while compiling
    return _render_in_child(template, data, what, seconds, max_bytes)


#: Memory a template's child process may use beyond what the worker already had.
MEMORY_HEADROOM = 256 * 1024 * 1024


def _render_in_child(template: str, data: Mapping[str, Any], what: str, seconds: float,
                     max_bytes: int) -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: render, send the answer, leave without any clean-up
        code = 0
        try:
            os.close(read_end)
            _cap_memory()
            answer: dict[str, str | None]
            try:
                answer = {"text": _render_here(template, data, what, seconds, max_bytes)}
            except PromptTemplateError as exc:
                answer = {"error": str(exc), "key": exc.key}
            except MemoryError:
                answer = {"error": f"{what} template needs more memory than a template "
                                   "may use"}
            payload = json.dumps(answer).encode()
            view = memoryview(payload)
            while view:
                view = view[os.write(write_end, view):]
        except BaseException:  # noqa: BLE001  (nothing may escape a forked child)
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        raw = _read_all(read_end, time.monotonic() + seconds + 1.0)
    finally:
        os.close(read_end)
        _reap(pid, kill=True)
    if raw is None:
        raise PromptTemplateError(f"{what} template took longer than {seconds:g} s "
                                  "(CHASSIS_TEMPLATE_TIMEOUT)")
    try:
        answer = json.loads(raw)
    except ValueError:
        raise PromptTemplateError(f"{what} template could not be rendered (its process "
                                  "ended without an answer: out of memory?)") from None
    if "error" in answer:
        raise PromptTemplateError(str(answer["error"]), key=answer.get("key"))
    return str(answer["text"])


def _read_all(fd: int, deadline: float) -> bytes | None:
    """Everything written to ``fd`` until its end; None at the deadline."""
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reap(pid: int, kill: bool) -> None:
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _cap_memory() -> None:
    try:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return  # not Linux: the time limit still holds
    limit = size + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _render_here(template: str, data: Mapping[str, Any], what: str, seconds: float,
                 max_bytes: int) -> str:
    """Render in this process (interrupted at ``seconds`` where a signal can)."""
    try:
        compiled = _ENV.from_string(template)
        with time_limit(seconds):
            return _bounded(compiled.generate(dict(data)), seconds, max_bytes)
    except AttemptDeadline:
        raise PromptTemplateError(f"{what} template took longer than {seconds:g} s "
                                  "(CHASSIS_TEMPLATE_TIMEOUT)") from None
    except _TooLong as exc:
        raise PromptTemplateError(f"{what} template {exc}") from None
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
    except MemoryError:
        raise PromptTemplateError(f"{what} template needs more memory than a template may "
                                  "use") from None
    except Exception as exc:  # noqa: BLE001  (e.g. a filter given the wrong type)
        raise PromptTemplateError(f"{what} template failed: {type(exc).__name__}: {exc}") from None


__all__ = ["render"]
