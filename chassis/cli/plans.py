"""chassis CLI commands (plans): ``chassis validate`` and ``chassis schema``."""

from __future__ import annotations

import json
from typing import Any

import click

from chassis import actions, config
from chassis.cli.base import main
from chassis.errors import ConfigError, PlanFileError
from chassis.plan import json_schema, load_plan_data, parse_plan_partial
from chassis.validation import metrics, validate

EXIT_INVALID = 1
EXIT_UNREADABLE = 2


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def summary(source: str, m: dict[str, int]) -> str:
    """The one line ``chassis validate`` prints for a valid plan."""
    return (f"{source}: valid — {_plural(m['steps'], 'step')}, "
            f"{_plural(m['fan_out_steps'], 'fan-out step')}, "
            f"{_plural(m['external_calls'], 'external call')}, max depth {m['max_depth']}")


@main.command("validate")
@click.argument("plan", metavar="PLAN")
@click.option("--actions", "--actions-module", "modules", multiple=True, metavar="MODULE",
              help="Import MODULE first, so the actions it registers count as known "
                   "(repeatable).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"valid", "problems", "metrics"} as JSON instead of text.')
def validate_command(plan: str, modules: tuple[str, ...], as_json: bool) -> None:
    """Check the plan file PLAN (JSON or YAML) and report every problem at once. The
    actions of CHASSIS_ACTION_MODULES (and of each --actions) count as known.

    Exit status: 0 valid, 1 invalid (one problem per line), 2 the file cannot be
    read, is not JSON/YAML, or an actions module cannot be imported.
    """
    try:
        actions.load_modules([*config.load().action_modules, *modules])
        data = load_plan_data(plan)
    except (ConfigError, PlanFileError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_UNREADABLE) from None
    parsed, problems = parse_plan_partial(data)
    m: dict[str, int] | None = None
    if parsed is not None:
        problems += validate(parsed)
        m = metrics(parsed)
    if as_json:
        out: dict[str, Any] = {"valid": not problems, "problems": problems, "metrics": m}
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
    elif problems:
        for line in problems:
            click.echo(line)
    elif m is not None:
        click.echo(summary(plan, m))
    if problems:
        raise SystemExit(EXIT_INVALID)


@main.command("contract")
def contract_command() -> None:
    """Print the task contract for other apps (JSON): the Celery tasks they may send,
    a JSON Schema of each task's arguments, the queue, and what each returns."""
    from chassis.contract import document

    click.echo(json.dumps(document(), indent=2, ensure_ascii=False))


@main.command("schema")
def schema_command() -> None:
    """Print the JSON Schema (draft 2020-12) of the plan format."""
    click.echo(json.dumps(json_schema(), indent=2, ensure_ascii=False))
