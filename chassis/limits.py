"""Values at the edge: one check of what comes from outside, shared by every entry point
(plan files, CLI options, the Python API, Celery task payloads, Kafka headers and
values).

Refused values raise :class:`~chassis.errors.InputError` naming what was wrong and where,
before anything is written. The rules:

- JSON only: no NaN or infinities, object keys are strings, no NUL character and no lone
  surrogate in any string (PostgreSQL's JSONB refuses them), integers within 64 bits;
- bounded: nesting at most ``max_depth`` levels, a document at most ``max_bytes`` bytes
  of JSON (CHASSIS_MAX_DEPTH, CHASSIS_MAX_DOCUMENT_BYTES);
- names (client, project, step, action, topic, ...) are 1 to 255 characters without
  control characters; counts and budgets are whole numbers within their column's range.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chassis.errors import InputError

#: The columns' limits (PostgreSQL INTEGER, VARCHAR(255)).
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
NAME_MAX = 255
TEXT_MAX = 1000
#: An event's data field (final_result, data_for_review) larger than this, in bytes of
#: JSON, goes out as a reference to the workflow instead: events stay small.
EVENT_FIELD_MAX = 64 * 1024
#: The largest request to an external agent: Kafka's default message size (1 MB) with
#: room for headers. A larger one fails its step at once.
MESSAGE_MAX = 900_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"^[0-9]+$")


@dataclass(frozen=True)
class Limits:
    """Bounds of documents from outside (CHASSIS_MAX_DOCUMENT_BYTES, CHASSIS_MAX_DEPTH)."""

    max_bytes: int = 1_048_576
    """Largest JSON document (input, feedback, an agent's data, a plan), in bytes."""
    max_depth: int = 64
    """Deepest nesting of lists and maps."""


DEFAULT = Limits()


def _where(path: str) -> str:
    return f" at {path}" if path else ""


def _check_string(value: str, what: str, path: str) -> None:
    if "\x00" in value:
        raise InputError(f"{what}: a NUL character{_where(path)} is not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what}: a lone surrogate{_where(path)} is not valid text") from None


def check_json(value: Any, what: str, limits: Limits = DEFAULT) -> Any:
    """``value`` if it is a JSON document within the limits; InputError otherwise."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    visits = 0
    while stack:
        item, path, depth = stack.pop()
        visits += 1
        if visits > limits.max_bytes:  # every value takes a byte of JSON at least
            raise InputError(f"{what}: more than {limits.max_bytes} values (a document "
                             "copied into itself by aliases?), more than allowed "
                             "(CHASSIS_MAX_DOCUMENT_BYTES)")
        if isinstance(item, str):
            _check_string(item, what, path)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not -INT64_MAX - 1 <= item <= INT64_MAX:
                raise InputError(f"{what}: the integer{_where(path)} is out of range "
                                 "(64 bits at most)")
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                raise InputError(f"{what}: {item!r}{_where(path)} is not a JSON number")
        elif isinstance(item, Mapping | list | tuple):
            if depth >= limits.max_depth:
                raise InputError(f"{what}: nested more than {limits.max_depth} levels deep"
                                 f"{_where(path)}")
            if isinstance(item, Mapping):
                for key, sub in item.items():
                    if not isinstance(key, str):
                        raise InputError(f"{what}: keys must be strings, got "
                                         f"{type(key).__name__}{_where(path)}")
                    _check_string(key, what, path)
                    stack.append((sub, f"{path}.{key}" if path else key, depth + 1))
            else:
                stack.extend((sub, f"{path}[{i}]", depth + 1) for i, sub in enumerate(item))
        else:
            raise InputError(f"{what}: {type(item).__name__}{_where(path)} is not a JSON value")
    size = len(json.dumps(value, ensure_ascii=False).encode())
    if size > limits.max_bytes:
        raise InputError(f"{what}: {size} bytes of JSON, more than the {limits.max_bytes} "
                         "allowed (CHASSIS_MAX_DOCUMENT_BYTES)")
    return value


def _depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings (before parsing it)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def no_constant(name: str) -> Any:
    """``parse_constant`` for :func:`json.loads`: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not a JSON number")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise ValueError(f"the integer {text[:20]}... has too many digits")
    return int(text)


def loads_json(raw: str | bytes, what: str, limits: Limits = DEFAULT) -> Any:
    """Parse JSON text strictly (no NaN or Infinity, no key given twice in an object:
    which one would be meant?) within the limits; InputError naming ``what`` otherwise."""
    size = len(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise InputError(f"{what}: {size} bytes, more than the {limits.max_bytes} allowed "
                         "(CHASSIS_MAX_DOCUMENT_BYTES)")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    if _depth(text) > limits.max_depth:
        raise InputError(f"{what}: nested more than {limits.max_depth} levels deep")
    try:
        value = json.loads(text, parse_constant=no_constant, parse_int=_int,
                           object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{what} is not valid JSON: {exc}") from None
    return check_json(value, what, limits)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads`: a key given twice is refused."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:60]!r}")
        out[key] = value
    return out


def check_name(value: Any, what: str, *, max_length: int = NAME_MAX) -> str:
    """A name: a string of 1 to ``max_length`` characters, no control characters."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InputError(f"{what} must not be empty")
    if len(value) > max_length:
        raise InputError(f"{what} is {len(value)} characters long, more than {max_length}")
    if _CONTROL.search(value):
        raise InputError(f"{what} must not contain control characters")
    _check_string(value, what, "")
    return value


def check_text(value: Any, what: str, *, max_length: int = TEXT_MAX) -> str:
    """Free text (a reason, a description): a string, at most ``max_length`` characters,
    no NUL or lone surrogate."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_length:
        raise InputError(f"{what} is {len(value)} characters long, more than {max_length}")
    _check_string(value, what, "")
    return value


def check_count(value: Any, what: str, *, least: int = 1, most: int = INT32_MAX) -> int:
    """A whole number from ``least`` to ``most``: an int, or a string of ASCII digits."""
    if isinstance(value, str):
        text = value.strip()
        if not _DIGITS.match(text) or len(text) > 19:
            raise InputError(f"{what} must be a whole number from {least} to {most}, "
                             f"got {value[:30]!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        shown = repr(value)[:30]
        raise InputError(f"{what} must be a whole number from {least} to {most}, got {shown}")
    return value


__all__ = ["DEFAULT", "EVENT_FIELD_MAX", "INT32_MAX", "Limits", "MESSAGE_MAX", "NAME_MAX",
           "check_count", "check_json", "check_name", "check_text", "loads_json"]
