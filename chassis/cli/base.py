"""The ``chassis`` command group. Each command module registers its commands on ``main``.

Every error a command does not handle itself becomes one line and an exit code
(:mod:`chassis.cli.errors`); ``chassis --debug COMMAND`` shows the traceback instead.
"""

from __future__ import annotations

from typing import Any

import click

from chassis.cli.errors import describe


class _Main(click.Group):
    """A group whose commands never end in a traceback (unless --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if ctx.meta.get("chassis.debug"):
                raise
            code, lines = describe(exc)
            for line in lines:
                click.echo(f"error: {line}", err=True)
            ctx.exit(code)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentchassis", prog_name="chassis")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """agentchassis: durable, budgeted workflows for AI-agent pipelines, on Celery.

    With no CHASSIS_* variables set, everything runs embedded (SQLite and a file-system
    broker under ./.chassis). Try `chassis demo`.

    Exit codes: 0 done; 1 refused for the workflow's state, or the workflow FAILED;
    2 bad input, nothing written; 3 a service unreachable or not set up (the line
    says whether the request was recorded); 4 --wait --timeout ran out.
    """
    ctx.meta["chassis.debug"] = debug
