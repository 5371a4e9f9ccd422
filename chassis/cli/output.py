"""How the CLI prints: tables for people, one JSON document for programs."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

_STYLE = {"COMPLETED": "green", "FAILED": "red", "PAUSED_FOR_HUMAN_INPUT": "yellow",
          "RUNNING": "cyan", "AWAITING_RESPONSES": "cyan", "AWAITING": "cyan",
          "DISPATCHED": "dim", "SCHEDULED": "yellow", "CANCELLED": "magenta",
          "COMPENSATING": "yellow", "COMPENSATED": "magenta"}


def console(err: bool = False) -> Console:
    stream = sys.stderr if err else sys.stdout
    # a pipe or a file gets full-width tables, not a guessed 80 columns
    return Console(stderr=err, highlight=False, soft_wrap=True,
                   width=None if stream.isatty() else 160)


def fail(message: str, code: int = 1) -> NoReturn:
    click_echo_err(f"error: {message}")
    sys.exit(code)


def click_echo_err(text: str) -> None:
    print(text, file=sys.stderr)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def _styled(status: str | None) -> str:
    if not status:
        return "-"
    return f"[{_STYLE.get(status, 'white')}]{status}[/]"


def _duration(start: str | None, end: str | None) -> str:
    if not start or not end:
        return "-"
    secs = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    return f"{secs * 1000:.0f} ms" if secs < 1 else f"{secs:.2f} s"


def _time(ts: str | None) -> str:
    return datetime.fromisoformat(ts).strftime("%H:%M:%S.%f")[:-3] if ts else "-"


def print_status(doc: dict[str, Any]) -> None:
    out = console()
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    fuel = doc["fuel"]
    head.add_row("workflow", doc["correlation_id"])
    head.add_row("client", doc["client_id"])
    head.add_row("status", _styled(doc["status"]))
    head.add_row("current step", doc["current_step"] or "-")
    if doc.get("waiting_for"):
        head.add_row("waiting for", escape(doc["waiting_for"]))
    held = f", {fuel['reserved']} reserved" if fuel.get("reserved") else ""
    head.add_row("fuel", f"{fuel['spent']} spent of {fuel['budget']}{held} "
                         f"({fuel['remaining']} remaining)")
    wait = doc.get("paused_for_fuel")
    if wait:
        head.add_row("paused for fuel", escape(
            f"step {wait['step']} needs {wait['needed']}, {wait['available']} available "
            f"({'add fuel' if wait['reason'] == 'budget' else 'raise the quota'}, then "
            "resume --approve)"))
    if doc["error"]:
        head.add_row("error", f"[red]{escape(doc['error'])}[/]")
    undo = doc.get("compensation") or {}
    if undo.get("pending"):
        left = ", then ".join(" and ".join(batch) for batch in undo["pending"])
        head.add_row("to undo", escape(left))
    for m in doc.get("undelivered") or []:
        head.add_row("undelivered", escape(f"{m['event_type'] or 'message'} to {m['topic']}: "
                                           f"{m['error']}"))
    out.print(head)
    if doc["steps"]:
        t = Table(title="steps", title_justify="left")
        for col in ("step", "action", "status", "attempts", "started", "duration",
                    "last error"):
            t.add_column(col)
        for s in doc["steps"]:
            name = f"  {s['name']}" if s["parent_step"] else s["name"]
            if s.get("compensates"):
                name = f"undo {s['compensates']}"
            tries = str(s["attempts"]) + (f"/{s['max_attempts']}"
                                          if (s.get("max_attempts") or 1) > 1 else "")
            t.add_row(name, s["action"], _styled(s["status"]), tries,
                      _time(s["started_at"]), _duration(s["started_at"], s["finished_at"]),
                      escape((s["error"] or "")[:80]))
        out.print(t)
    if doc["status"] == "COMPLETED" and doc["final_result"] is not None:
        out.print("final result: " + json.dumps(doc["final_result"], default=str)[:2000],
                  markup=False)


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def print_ledger(entries: list[dict[str, Any]], fuel: dict[str, int]) -> None:
    """Each row's kind, step, action, amount, held, model and tokens; then the budget,
    the fuel spent (Σ amount), reserved (Σ held) and what remains of the budget."""
    t = Table(title="fuel ledger", title_justify="left")
    numbers = ("amount", "held", "tokens in", "tokens out")
    for col in ("kind", "step", "action", "amount", "held", "model", "tokens in",
                "tokens out", "at"):
        t.add_column(col, justify="right" if col in numbers else "left")
    for e in entries:
        t.add_row(e.get("kind") or "debit", escape(e["step"]), escape(e["action"]),
                  str(e["amount"]), str(e.get("held") or 0), escape(e.get("model") or "-"),
                  _count(e.get("input_tokens")), _count(e.get("output_tokens")),
                  _time(e["created_at"]))
    reserved = sum(e.get("held") or 0 for e in entries)
    t.add_section()
    t.add_row("total", "", "", str(sum(e["amount"] for e in entries)), str(reserved), "",
              str(sum(e.get("input_tokens") or 0 for e in entries)),
              str(sum(e.get("output_tokens") or 0 for e in entries)), "")
    out = console()
    out.print(t)
    out.print(f"budget {fuel['budget']}, spent {fuel['spent']}, reserved {reserved}, "
              f"remaining {fuel['budget'] - fuel['spent'] - reserved}")


def print_events(entries: list[dict[str, Any]]) -> None:
    """The event history: one line per event, oldest first."""
    t = Table(title="events", title_justify="left")
    for col in ("at", "event", "step", "attempt", "by", "details"):
        t.add_column(col, justify="right" if col == "attempt" else "left")
    for e in entries:
        data = e.get("data")
        details = "" if not data else json.dumps(data, separators=(", ", ": "),
                                                  default=str)
        t.add_row(escape((e["at"] or "")[:23].replace("T", " ")), escape(e["kind"]),
                  escape(e["step"] or "-"),
                  "" if e["attempt"] is None else str(e["attempt"]),
                  escape(e["actor"] or "-"), escape(details[:160]))
    console().print(t)


def print_fuel_report(groups: list[dict[str, Any]]) -> None:
    """Fuel spent and tokens by day, client, plan and model, with a total line."""
    t = Table(title="fuel spent", title_justify="left")
    numbers = ("spent", "tokens in", "tokens out", "rows")
    for col in ("day", "client", "plan", "model", "spent", "tokens in", "tokens out",
                "rows"):
        t.add_column(col, justify="right" if col in numbers else "left")
    for g in groups:
        t.add_row(g["day"], escape(g["client_id"]), escape(g["plan"]), escape(g["model"]),
                  str(g["spent"]), str(g["input_tokens"]), str(g["output_tokens"]),
                  str(g["rows"]))
    t.add_section()
    t.add_row("total", "", "", "", *(str(sum(g[k] for g in groups)) for k in (
        "spent", "input_tokens", "output_tokens", "rows")))
    out = console()
    out.print(t)
    if not groups:
        out.print("no fuel spent")


def print_list(docs: list[dict[str, Any]]) -> None:
    t = Table()
    for col in ("workflow", "client", "status", "current step", "fuel spent", "created"):
        t.add_column(col)
    for d in docs:
        t.add_row(d["correlation_id"], d["client_id"], _styled(d["status"]),
                  d["current_step"] or "-", f"{d['fuel']['spent']}/{d['fuel']['budget']}",
                  (d["created_at"] or "-")[:19])
    console().print(t)
    if not docs:
        console().print("no workflows")


class ProgressPrinter:
    """Prints each step's and the workflow's changes as they happen."""

    def __init__(self, err: bool = False) -> None:
        self.out = console(err)
        self.seen: dict[str, str] = {}
        self.status: str | None = None

    def __call__(self, doc: dict[str, Any]) -> None:
        for s in doc["steps"]:
            seen = f"{s['status']}#{s['attempts']}"
            if self.seen.get(s["name"]) != seen:
                self.seen[s["name"]] = seen
                indent = "    " if s["parent_step"] else "  "
                label = f"undo {s['compensates']}" if s.get("compensates") else s["name"]
                extra = f" ({escape(s['error'])})" if s["error"] else ""
                attempt = f" attempt {s['attempts']}" if s["attempts"] > 1 else ""
                self.out.print(f"{indent}{label:<24} {s['action']:<32} "
                               f"{_styled(s['status'])}{attempt}{extra}")
        if doc["status"] != self.status:
            self.status = doc["status"]
            self.out.print(f"workflow {_styled(doc['status'])}"
                           f"{' at ' + doc['current_step'] if doc['current_step'] else ''}")
