"""The ``chassis`` command group. Each command module registers its commands on ``main``.

Every error a command does not handle itself becomes one line and an exit code
(:mod:`chassis.cli.errors`); ``chassis --debug COMMAND`` shows the traceback instead.
"""

from __future__ import annotations

from typing import Any

import click

from chassis.cli.errors import describe


class _OneLine(click.UsageError):
    """A usage error (a bad option or argument) shown as one ``error:`` line, like the
    other errors, naming the help to read; exit code 2."""

    def show(self, file: Any = None) -> None:
        hint = (f" (see {self.ctx.command_path} {self.ctx.help_option_names[0]})"
                if self.ctx is not None else "")
        click.echo(f"error: {self.format_message()}{hint}", err=True)


def _one_line(exc: click.UsageError) -> click.UsageError:
    if isinstance(exc, _OneLine | click.exceptions.NoArgsIsHelpError):
        return exc  # (a group run without a command shows its help)
    return _OneLine(exc.format_message(), exc.ctx)


class _Main(click.Group):
    """A group whose commands never end in a traceback (unless --debug)."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _one_line(exc) from exc.__cause__

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from exc.__cause__
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

    Exit codes: 0 done; 1 refused for the workflow's state, or the workflow FAILED (or
    COMPENSATED); 2 bad input, nothing written; 3 a service unreachable or not set up
    (the line says whether the request was recorded); 4 --wait --timeout ran out.
    """
    ctx.meta["chassis.debug"] = debug
