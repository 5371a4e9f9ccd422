"""chassis fuel report (and the group's other commands).

``fuel`` is the group of fuel's commands; each adds itself with ``@fuel.command()``.
"""

from __future__ import annotations

from datetime import datetime

import click

from chassis.api import parse_since
from chassis.cli.base import main
from chassis.cli.output import print_fuel_report, print_json
from chassis.errors import InputError
from chassis.limits import check_name


@main.group()
def fuel() -> None:
    """Fuel, the unit workflows' budgets are counted in."""


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    try:
        return parse_since(value)
    except InputError:
        raise click.BadParameter(f"must be a date (YYYY-MM-DD) or an ISO 8601 timestamp "
                                 f"(no zone: UTC), got {str(value)[:40]!r}") from None


def _client_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return None if value is None else check_name(value, "the client")
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


@fuel.command()
@click.option("--client", "client", metavar="CLIENT", callback=_client_name,
              help="Only this client's fuel (default: every client's; an unknown client "
                   "gives an empty report).")
@click.option("--since", metavar="DATE", callback=_since,
              help="Only fuel spent from then on: YYYY-MM-DD (midnight UTC) or an ISO 8601 "
                   "timestamp (no zone: UTC).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list, one object per client, plan, model and day.")
def report(client: str | None, since: datetime | None, as_json: bool) -> None:
    """Fuel spent and tokens by day, client, plan and model.

    Sums the ledger's amounts (debits and settled AI attempts) and tokens by day (UTC),
    client, plan ("-": started from a file) and model ("-": not an AI row), with a
    total line. Reservations charge nothing and are not counted (see `chassis ledger
    ID` for a workflow's holds).

    Every client's spend unless --client: an operator's view, like the metrics.
    """
    from chassis.cli.workflows import _client, _run_guarded

    def go() -> int:
        groups = _client().fuel_report(client, since)
        print_json(groups) if as_json else print_fuel_report(groups)
        return 0

    _run_guarded(go)
