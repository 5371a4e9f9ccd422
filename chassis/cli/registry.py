"""``chassis plan register | list | show``: the plan registry."""

from __future__ import annotations

import sys

import click
import yaml

from chassis import actions
from chassis.cli.base import main
from chassis.cli.output import console, print_json
from chassis.cli.plans import EXIT_INVALID, EXIT_UNREADABLE
from chassis.cli.workflows import _client, _run_guarded
from chassis.errors import ConfigError, InputError, PlanFileError
from chassis.limits import INT32_MAX
from chassis.plan import load_plan_data, parse_plan_partial
from chassis.registry import check_name
from chassis.validation import validate


@main.group()
def plan() -> None:
    """Named, versioned plans stored in the database.

    `chassis run NAME` and Kafka start messages on system.agent.NAME.process start the
    latest version of a registered plan; every workflow keeps a snapshot of its plan.
    """


@plan.command("register")
@click.argument("name")
@click.argument("file", metavar="FILE")
@click.option("--actions", "--actions-module", "modules", multiple=True, metavar="MODULE",
              help="Import MODULE first, so the actions it registers count as known "
                   "(repeatable; CHASSIS_ACTION_MODULES are imported too).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def register(name: str, file: str, modules: tuple[str, ...], as_json: bool) -> None:
    """Validate FILE (JSON or YAML) and store it as plan NAME.

    The same content as an existing version is a no-op that says so; new content
    becomes the next version. Exit status: 0 registered or unchanged, 1 invalid plan
    (one problem per line), 2 unreadable file or bad name.
    """
    try:
        check_name(name)
        client = _client()
        actions.load_modules([*client.settings.action_modules, *modules])
        data = load_plan_data(file)
    except (ConfigError, InputError, PlanFileError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNREADABLE)
    parsed, problems = parse_plan_partial(data)
    if parsed is not None:
        problems += validate(parsed)
    if problems or parsed is None:
        for line in problems:
            click.echo(f"error: {line}", err=True)
        sys.exit(EXIT_INVALID)

    def go() -> int:
        done = client.registry.register(name, parsed)
        p = done.plan
        if as_json:
            print_json({"name": p.name, "version": p.version, "created": done.created,
                        "content_hash": p.content_hash})
        elif done.created:
            console().print(f"registered plan [bold]{p.name}[/] version {p.version}")
        else:
            console().print(f"plan [bold]{p.name}[/] unchanged: same content as "
                            f"version {p.version} (nothing registered)")
        return 0

    _run_guarded(go)


@plan.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_plans(as_json: bool) -> None:
    """Registered plans: name, latest version, number of versions."""
    def go() -> int:
        rows = _client().registry.list_plans()
        if as_json:
            print_json(rows)
            return 0
        from rich.table import Table

        t = Table()
        for col in ("plan", "latest version", "versions", "last registered"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"], str(r["latest"]), str(r["versions"]),
                      str(r["last_registered"])[:19])
        console().print(t)
        if not rows:
            console().print("no registered plans; add one with `chassis plan register "
                            "NAME FILE`")
        return 0

    _run_guarded(go)


@plan.command("show")
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(1, INT32_MAX), default=None,
              help="This version (default: the latest).")
@click.option("--json", "as_json", is_flag=True,
              help="Print {name, version, content_hash, created_at, plan} as JSON.")
def show(name: str, version: int | None, as_json: bool) -> None:
    """Print a registered plan (YAML; --json for JSON with its metadata)."""
    def go() -> int:
        p = _client().registry.get(name, version)
        if as_json:
            print_json({"name": p.name, "version": p.version,
                        "content_hash": p.content_hash,
                        "created_at": p.created_at.isoformat(), "plan": p.content})
        else:
            click.echo(f"# plan {p.name} version {p.version} "
                       f"(registered {p.created_at.isoformat()[:19]})")
            click.echo(yaml.safe_dump(p.content, sort_keys=False, allow_unicode=True)
                       .rstrip())
        return 0

    _run_guarded(go)

