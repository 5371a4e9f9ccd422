"""Values rendered for people in the console (Jinja filters): a model's text as
formatted text (a small, safe Markdown subset), other JSON values as a compact
key/value view, times and durations.

Everything is HTML-escaped first; the only markup in the results is the one these
functions add (no raw HTML, no links, no attributes from the data).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from html import escape
from typing import Any

from markupsafe import Markup

#: Longest text shown in full; longer text is cut (the API has all of it).
MAX_TEXT = 20_000
#: Nesting shown as a key/value view; deeper values are shown as compact JSON.
MAX_DEPTH = 4
#: Most entries of a mapping or list shown.
MAX_ITEMS = 100

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^\s*\d{1,9}[.)]\s+(.*)$")
_QUOTE = re.compile(r"^\s*>\s?(.*)$")
_RULE = re.compile(r"^\s*([-*_])(\s*\1){2,}\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_STRONG = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
_EM = re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])"
                 r"|(?<![\w_])_(?=[^\s_])(.+?)(?<=[^\s_])_(?![\w_])")


def _cut(text: str, most: int = MAX_TEXT) -> str:
    return text if len(text) <= most else text[:most] + " …"


def _emphasis(escaped: str) -> str:
    """Bold and italic in text already escaped (their markers survive escaping)."""
    escaped = _STRONG.sub(lambda m: f"<strong>{m.group(1) or m.group(2)}</strong>", escaped)
    return _EM.sub(lambda m: f"<em>{m.group(1) or m.group(2)}</em>", escaped)


def inline(text: str) -> str:
    """One line of Markdown as HTML: `code`, **bold**, *italic*; the rest escaped."""
    out, at = [], 0
    for m in _CODE_SPAN.finditer(text):
        out.append(_emphasis(escape(text[at:m.start()], quote=False)))
        out.append(f"<code>{escape(m.group(2).strip(), quote=False)}</code>")
        at = m.end()
    out.append(_emphasis(escape(text[at:], quote=False)))
    return "".join(out)


def markdown(text: object) -> Markup:
    """``text`` as HTML: headings, paragraphs, **bold**, *italic*, lists, block quotes,
    `code` and fenced code blocks. Any HTML in it is shown as text."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    lines = _cut(text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    html: list[str] = []
    para: list[str] = []
    items: list[str] = []
    list_tag = ""

    def flush() -> None:
        nonlocal list_tag
        if para:
            html.append("<p>" + "<br>".join(inline(p) for p in para) + "</p>")
            para.clear()
        if items:
            html.append(f"<{list_tag}>" + "".join(f"<li>{inline(i)}</li>" for i in items)
                        + f"</{list_tag}>")
            items.clear()
            list_tag = ""

    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            flush()
            code: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence.group(1)):
                code.append(lines[i])
                i += 1
            html.append("<pre><code>" + escape("\n".join(code), quote=False) + "</code></pre>")
            i += 1
            continue
        stripped = line.strip()
        heading = _HEADING.match(stripped)
        bullet, numbered = _BULLET.match(line), _NUMBERED.match(line)
        quote = _QUOTE.match(line)
        if not stripped:
            flush()
        elif _RULE.match(line) and not bullet:
            flush()
            html.append("<hr>")
        elif heading:
            flush()
            level = min(len(heading.group(1)) + 2, 6)  # under the page's own headings
            html.append(f"<h{level}>{inline(heading.group(2))}</h{level}>")
        elif bullet or numbered:
            tag = "ul" if bullet else "ol"
            if para or (items and tag != list_tag):
                flush()
            list_tag = tag
            items.append((bullet or numbered).group(1))  # type: ignore[union-attr]
        elif quote:
            flush()
            quoted = [quote.group(1)]
            while i + 1 < len(lines) and (q := _QUOTE.match(lines[i + 1])):
                quoted.append(q.group(1))
                i += 1
            html.append("<blockquote>" + str(markdown("\n".join(quoted))) + "</blockquote>")
        elif items and line[:1].isspace():  # a list item's continuation
            items[-1] += " " + stripped
        else:
            if items:
                flush()
            para.append(stripped)
        i += 1
    flush()
    return Markup('<div class="md">' + "".join(html) + "</div>")


def ai_output(value: object) -> bool:
    """A model's answer as stored under its step: ``{"text": ..., "model": ...}``."""
    return (isinstance(value, Mapping) and isinstance(value.get("text"), str)
            and any(k in value for k in ("model", "provider", "usage", "stop_reason")))


def _ai_view(value: Mapping[str, Any]) -> str:
    usage = value.get("usage")
    if not isinstance(usage, Mapping):
        usage = {}
    meta = [str(value.get("model") or "")]
    tokens_in, tokens_out = usage.get("input_tokens"), usage.get("output_tokens")
    if tokens_in is not None or tokens_out is not None:
        meta.append(f"{tokens_in if tokens_in is not None else '?'} tokens in, "
                    f"{tokens_out if tokens_out is not None else '?'} out")
    if value.get("stop_reason") not in (None, "end_turn"):
        meta.append(f"stopped: {value.get('stop_reason')}")
    if value.get("provider") not in (None, "anthropic"):
        meta.append(f"provider: {value.get('provider')}")
    line = " · ".join(escape(m) for m in meta if m)
    return (f'<div class="ai-output">{markdown(value["text"])}'
            f'<div class="ai-meta">{line}</div></div>')


def _scalar(value: object) -> str:
    if value is None:
        return '<span class="v-null">null</span>'
    if isinstance(value, bool):
        return f'<span class="v-bool">{"true" if value else "false"}</span>'
    if isinstance(value, int | float):
        return f'<span class="v-num">{escape(str(value))}</span>'
    text = _cut(str(value))
    if "\n" in text or len(text) > 160:
        return f'<div class="v-text">{escape(text)}</div>'
    return f'<span class="v-str">{escape(text)}</span>'


def _view(value: object, depth: int) -> str:
    if ai_output(value):
        return _ai_view(value)  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        if not value:
            return '<span class="v-empty">(empty)</span>'
        if depth >= MAX_DEPTH:
            return _compact(value)
        rows = [f"<dt>{escape(str(k))}</dt><dd>{_view(v, depth + 1)}</dd>"
                for k, v in list(value.items())[:MAX_ITEMS]]
        more = len(value) - MAX_ITEMS
        if more > 0:
            rows.append(f'<dt class="v-more">…</dt><dd class="v-more">{more} more</dd>')
        return '<dl class="kv">' + "".join(rows) + "</dl>"
    if isinstance(value, list | tuple):
        if not value:
            return '<span class="v-empty">(none)</span>'
        if depth >= MAX_DEPTH:
            return _compact(value)
        if all(not isinstance(v, Mapping | list | tuple) for v in value) and \
                sum(len(str(v)) for v in value) < 120:
            return '<span class="v-list">' + ", ".join(_scalar(v) for v in value) + "</span>"
        rows = [f"<li>{_view(v, depth + 1)}</li>" for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            rows.append(f'<li class="v-more">{len(value) - MAX_ITEMS} more</li>')
        return '<ol class="kv-list">' + "".join(rows) + "</ol>"
    return _scalar(value)


def _compact(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f'<code class="v-json">{escape(_cut(text, 2000))}</code>'


def value_view(value: object) -> Markup:
    """A JSON value for people: mappings as key/value lists, a model's answer as
    formatted text, long text kept in its lines."""
    return Markup(_view(value, 0))


def inline_data(value: object, most: int = 160) -> str:
    """A value on one short line (an event's data): ``key=value, ...``."""
    if value is None or value == {}:
        return ""
    if isinstance(value, Mapping):
        parts = [f"{k}={json.dumps(v, ensure_ascii=False, default=str)}"
                 for k, v in value.items()]
        text = ", ".join(parts)
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= most else text[:most - 1] + "…"


def parse_time(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def when(value: object) -> Markup:
    """A time as ``2025-01-31 14:02:03`` (UTC), the exact time as its title."""
    at = parse_time(value)
    if at is None:
        return Markup('<span class="muted">–</span>')
    iso = at.isoformat()
    shown = at.strftime("%Y-%m-%d %H:%M:%S")
    return Markup(f'<time datetime="{escape(iso)}" title="{escape(iso)}">{shown}</time>')


def duration(start: object, end: object) -> str:
    """``1.25 s``, ``3 min 4 s``, ``2 h 5 min``; ``""`` when either end is unknown."""
    a, b = parse_time(start), parse_time(end)
    if a is None or b is None:
        return ""
    seconds = max(0.0, (b - a).total_seconds())
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


FILTERS = {"markdown": markdown, "value_view": value_view, "inline_data": inline_data,
           "when": when, "duration": duration}

__all__ = ["FILTERS", "ai_output", "duration", "inline", "inline_data", "markdown",
           "value_view", "when"]
