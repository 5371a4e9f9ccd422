"""chassis fuel prices | fuel add, and chassis quota set | show | remove.

Bad input (a negative or non-integer amount, a window that is not day, month or total,
an unreadable price file) is one line on stderr and exit 2, with nothing written.
"""

from __future__ import annotations

import click
from rich.table import Table

from chassis import config
from chassis.api import Client
from chassis.cli.base import main
from chassis.cli.fuel import fuel
from chassis.cli.output import console, print_json, print_status
from chassis.cli.workflows import _client, _run_guarded, client_option
from chassis.store.quotas import WINDOWS


@fuel.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def prices(as_json: bool) -> None:
    """The token prices in force: fuel per million input, output, cache-write and
    cache-read tokens and the floor of a call, per model family or model id
    (CHASSIS_FUEL_PRICES names a file that overrides the defaults); and the table price
    of every other action."""
    def go() -> int:
        config.load()  # a bad price file: one line, exit 2
        doc = Client.fuel_prices()
        if as_json:
            print_json(doc)
            return 0
        t = Table(title=f"token prices ({doc['unit']}; {doc['source']})",
                  title_justify="left")
        for col in ("model", "input", "output", "cache write", "cache read", "floor"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for name, p in doc["models"].items():
            t.add_row(name, *(str(p[k]) for k in ("input", "output", "cache_write",
                                                   "cache_read", "floor")))
        out = console()
        out.print(t)
        out.print("tiers: " + ", ".join(f"{k} = {v}" for k, v in doc["tiers"].items()))
        out.print("other actions (fuel per attempt): " + ", ".join(
            f"{k} {v}" for k, v in doc["actions"].items()))
        return 0

    _run_guarded(go)


@fuel.command("add", context_settings={"ignore_unknown_options": True})
@click.argument("correlation_id")
@click.argument("amount")  # (a negative amount is refused by the check, not taken for an option)
@client_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def add(correlation_id: str, amount: str, client_id: str, as_json: bool) -> None:
    """Add AMOUNT fuel to a workflow's budget (one that has not finished, or a FAILED
    one, to retry it). A workflow paused for fuel then goes on once approved
    (chassis resume ID --approve)."""
    def go() -> int:
        doc = _client(client_id).add_fuel(correlation_id, amount)
        print_json(doc) if as_json else print_status(doc)
        return 0

    _run_guarded(go)


@main.group()
def quota() -> None:
    """Client quotas: fuel a client's workflows may spend per day, month or in total."""


@quota.command("set")
@click.argument("client")
@click.option("--fuel", "amount", required=True, metavar="N",
              help="Fuel the client may charge per window (0 or more).")
@click.option("--per", required=True, type=click.Choice(WINDOWS),
              help="The window: day or month (UTC), or total.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def set_quota(client: str, amount: str, per: str, as_json: bool) -> None:
    """Give CLIENT a quota (replacing any it had). Every reservation and debit of its
    workflows is counted against the current window in the same transaction; past it,
    a step fails (or pauses, with on_budget_exhausted: pause) with "quota exceeded"."""
    def go() -> int:
        doc = _client().set_quota(client, amount, per)
        print_json(doc) if as_json else _print_quota(doc)
        return 0

    _run_guarded(go)


@quota.command("show")
@click.argument("client")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show_quota(client: str, as_json: bool) -> None:
    """CLIENT's quota and what its current window has used."""
    def go() -> int:
        doc = _client().quota(client)
        print_json(doc) if as_json else _print_quota(doc)
        return 0

    _run_guarded(go)


@quota.command("remove")
@click.argument("client")
def remove_quota(client: str) -> None:
    """Remove CLIENT's quota (its workflows are then limited by their budgets only)."""
    def go() -> int:
        removed = _client().remove_quota(client)
        console().print(f"quota of {client} removed" if removed
                        else f"{client} had no quota")
        return 0

    _run_guarded(go)


def _print_quota(doc: dict[str, object]) -> None:
    if doc["per"] is None:
        console().print(f"{doc['client_id']}: no quota")
        return
    console().print(f"{doc['client_id']}: {doc['fuel']} fuel per {doc['per']}, "
                    f"{doc['used']} used, {doc['held']} held, {doc['left']} left")
