"""chassis run | status | resume | cancel | retry | ledger | list | demo.

Every command acts for one client (``--client``, default $CHASSIS_CLIENT_ID, else
``local``): another client's workflow is as unknown to it as a missing one. Exit codes:
see :mod:`chassis.cli.errors`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from chassis import actions, config
from chassis.ai import provider_note
from chassis.api import DEFAULT_FUEL, Client
from chassis.cli.base import main
from chassis.cli.errors import describe
from chassis.cli.output import (
    ProgressPrinter,
    console,
    print_events,
    print_json,
    print_ledger,
    print_list,
    print_status,
)
from chassis.errors import InputError, ServiceUnavailable
from chassis.limits import loads_json
from chassis.state import SETTLED, Status

DEMO_PLAN = Path(__file__).resolve().parent.parent / "examples" / "blog_post.yaml"
DEMO_INPUT = {"topic": "durable AI-agent workflows on Celery", "audience": "platform teams"}


def _parse_json_arg(value: str | None, what: str) -> Any:
    """JSON text, or @file holding JSON: strict, within CHASSIS_MAX_DOCUMENT_BYTES and
    CHASSIS_MAX_DEPTH."""
    if value is None:
        return None
    limits = config.load().limits
    raw: str | bytes = value
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            with path.open("rb") as f:
                raw = f.read(limits.max_bytes + 1)
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror}",
                                     param_hint=what) from None
    try:
        return loads_json(raw, "the value", limits)
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None


def _seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0 < value <= 7 * 86400):
        raise click.BadParameter("must be a number of seconds from 0 to a week")
    return value


@contextmanager
def _in_process_worker() -> Iterator[None]:
    """A real Celery worker of the `tasks` app, in this process, and the sweep."""
    from chassis import runtime
    from chassis.embedded import embedded_worker
    from chassis.sweep import Sweeper
    from chassis.worker import app

    settings = config.load()
    sweeper = Sweeper(runtime.engine(app), settings)
    with embedded_worker(app, sweep=sweeper.sweep, sweep_interval=settings.sweep_interval):
        yield


def _worker_if_embedded(client: Client, wanted: bool) -> Any:
    """In embedded mode, waiting runs the worker here; otherwise one runs elsewhere."""
    if wanted and client.settings.embedded_broker:
        return _in_process_worker()
    return nullcontext()


def _client(client_id: str | None = None, embedded_upgrade: bool = True,
            load_actions: bool = False, modules: Sequence[str] = ()) -> Client:
    settings = config.load()
    if load_actions:  # a plan is checked against the actions of CHASSIS_ACTION_MODULES
        actions.load_modules([*settings.action_modules, *modules])
    if embedded_upgrade and settings.database_url.startswith("sqlite"):
        from chassis.store.db import upgrade

        upgrade(settings.database_url)
    return Client(settings, client_id=client_id)


#: The client a command acts for (every workflow command has it).
client_option = click.option(
    "--client", "client_id", envvar="CHASSIS_CLIENT_ID", default="local", show_default=True,
    help="Client the command acts for (env CHASSIS_CLIENT_ID); another client's "
         "workflows are out of its reach.")


def _run_guarded(fn: Callable[[], int | None], hint: Callable[[str], str] | None = None) -> None:
    """Run a command body: refusals and unreachable services are one line on stderr
    and an exit code (:mod:`chassis.cli.errors`), never a traceback. ``hint``: what to
    add when the request was recorded but the broker is unreachable."""
    try:
        code = fn()
    except click.ClickException:
        raise
    except Exception as exc:
        if click.get_current_context().meta.get("chassis.debug"):
            raise
        status, lines = describe(exc)
        if isinstance(exc, ServiceUnavailable) and exc.recorded and exc.correlation_id \
                and hint is not None:
            lines = [lines[0] + hint(exc.correlation_id)]
        for line in lines:
            click.echo(f"error: {line}", err=True)
        sys.exit(status)
    sys.exit(code or 0)


def _wait(client: Client, cid: str, timeout: float | None, as_json: bool,
          on_change: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """``client.wait``; when --timeout runs out, --json still prints the workflow's
    status document (then exit 4, as without --json)."""
    try:
        return client.wait(cid, timeout=timeout, on_change=on_change)
    except TimeoutError as exc:
        if as_json:
            print_json(client.status(cid))
        if client.settings.embedded_broker:
            _leave_now(exc)
        raise


def _leave_now(exc: Exception) -> None:
    """Embedded mode, --timeout ran out: say so and exit at once. Leaving the block
    would wait for the in-process worker's running step (its thread pool is joined at
    exit); the workflow goes on instead: that attempt's lease expires and the sweep of
    the next worker (or `chassis run --wait`) here sends it again."""
    status, lines = describe(exc)
    for line in lines:
        click.echo(f"error: {line}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    from chassis import tracing

    tracing.flush()  # (os._exit runs no exit hook: the spans buffered would be lost)
    os._exit(status)


def _exit_code(doc: dict[str, Any]) -> int:
    """1 when the workflow failed (and is, or was, undone)."""
    failed = (Status.FAILED, Status.COMPENSATING, Status.COMPENSATED)
    return 1 if doc["status"] in failed else 0


@main.command()
@click.argument("plan")
@click.option("--input", "input_", metavar="JSON|@FILE", help="Initial request data (JSON).")
@client_option
@click.option("--project", "project_id", help="Project id carried in notifications.")
@click.option("--fuel", default=str(DEFAULT_FUEL), show_default=True,
              help="Fuel budget: a positive integer.")
@click.option("--correlation-id", help="Workflow id (UUID); starting an existing one is a no-op.")
@click.option("--wait", is_flag=True,
              help="Wait until COMPLETED, FAILED, COMPENSATED or PAUSED_FOR_HUMAN_INPUT; exit 1 "
                   "if FAILED or COMPENSATED.")
@click.option("--timeout", type=float, default=None, callback=_seconds,
              help="With --wait: give up after seconds (exit 4; the workflow goes on).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--actions", "--actions-module", "modules", multiple=True, metavar="MODULE",
              help="Import MODULE first, so the actions it registers count as known and "
                   "(with --wait in embedded mode) run here (repeatable; the modules of "
                   "CHASSIS_ACTION_MODULES are imported too).")
def run(plan: str, input_: str | None, client_id: str, project_id: str | None, fuel: str,
        correlation_id: str | None, wait: bool, timeout: float | None, as_json: bool,
        modules: tuple[str, ...]) -> None:
    """Start a workflow from PLAN: a JSON/YAML file, or a registered plan's NAME
    (latest version) or NAME@VERSION (see `chassis plan`).

    Bad input (invalid plan, missing client, a budget that is not a positive integer)
    is refused and nothing is written. In embedded mode, --wait runs a Celery worker in
    this process; without it the work waits for `celery -A chassis.worker worker`.
    """
    data = _parse_json_arg(input_, "--input")

    def go() -> int:
        client = _client(client_id, load_actions=True, modules=modules)
        with _worker_if_embedded(client, wait):
            cid = client.start(plan, data, fuel_budget=fuel,
                               correlation_id=correlation_id, project_id=project_id)
            if not wait:
                doc = client.status(cid)
                if as_json:
                    print_json(doc)
                else:
                    console().print(f"started workflow [bold]{cid}[/] ({doc['status']})")
                    if client.settings.embedded_broker:
                        console().print("embedded broker: run `celery -A chassis.worker "
                                        "worker` in this folder, or use --wait, to "
                                        "execute it")
                return 0
            show = not as_json or sys.stderr.isatty()
            printer = ProgressPrinter(err=as_json) if show else None
            if printer and not as_json:
                console().print(f"workflow [bold]{cid}[/]")
            doc = _wait(client, cid, timeout, as_json, printer)
        if as_json:
            print_json(doc)
        else:
            print_status(doc)
        return _exit_code(doc)

    def hint(cid: str) -> str:
        return "; repeating the command is safe" + (
            "" if correlation_id else f" with --correlation-id {cid}")

    _run_guarded(go, hint)


@main.command()
@click.argument("correlation_id")
@client_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(correlation_id: str, client_id: str, as_json: bool) -> None:
    """Show a workflow: status, where it waits, fuel, and every step with its attempts
    and last error (--json: every attempt too)."""
    def go() -> int:
        doc = _client(client_id).status(correlation_id)
        print_json(doc) if as_json else print_status(doc)
        return 0

    _run_guarded(go)


@main.command()
@click.argument("correlation_id")
@client_option
@click.option("--approve", "approve", is_flag=True, help="Approve and continue.")
@click.option("--reject", "reject", is_flag=True,
              help="Reject: the workflow fails (its completed steps that have a compensate "
                   "are undone: COMPENSATED).")
@click.option("--feedback", metavar="JSON|@FILE", help="Feedback, kept as human_feedback.")
@click.option("--add-fuel", "add_fuel", metavar="N", default="0",
              help="Add N fuel to the budget first (a workflow paused for fuel goes on "
                   "with it).")
@click.option("--step", default=None, metavar="NAME",
              help="The step whose approval this answers: refused when the workflow now "
                   "waits at another (that approval expired, or was answered).")
@click.option("--wait", is_flag=True, help="Wait until the workflow settles again.")
@click.option("--timeout", type=float, default=None, callback=_seconds,
              help="With --wait: give up after seconds (exit 4; the workflow goes on).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def resume(correlation_id: str, client_id: str, approve: bool, reject: bool,
           feedback: str | None, add_fuel: str, step: str | None, wait: bool,
           timeout: float | None, as_json: bool) -> None:
    """Resume a workflow paused for human input (--approve or --reject).

    Resuming an unknown workflow, or one that is not paused, is an error that changes
    nothing; the same answer again, once recorded, is reported as such (exit 0).
    """
    if approve == reject:
        raise click.UsageError("say --approve or --reject" + (", not both" if approve else ""))
    decision = "approve" if approve else "reject"
    fb = _parse_json_arg(feedback, "--feedback")

    def go() -> int:
        client = _client(client_id)
        with _worker_if_embedded(client, wait):
            doc = client.resume(correlation_id, decision == "approve", fb,
                                add_fuel=0 if add_fuel.strip() == "0" else add_fuel,
                                step=step)
            if doc.get("resume") == "already recorded" and not as_json:
                console().print(f"{'approval' if decision == 'approve' else 'rejection'} "
                                f"already recorded for workflow {doc['correlation_id']}")
            if wait:
                doc = _wait(client, doc["correlation_id"], timeout, as_json,
                            None if as_json else ProgressPrinter())
        print_json(doc) if as_json else print_status(doc)
        return _exit_code(doc)

    _run_guarded(go, lambda _cid: "; repeating the command is safe")


@main.command()
@click.argument("correlation_id")
@client_option
@click.option("--reason", metavar="TEXT", help="Why (kept with the workflow and the event).")
@click.option("--compensate", is_flag=True,
              help="Undo the completed steps that have a compensate first (COMPENSATING, "
                   "then CANCELLED).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cancel(correlation_id: str, client_id: str, reason: str | None, compensate: bool,
           as_json: bool) -> None:
    """Cancel a workflow that has not finished: in-flight steps are revoked (terminated
    on the prefork pool), late results ignored, status CANCELLED, and a
    WORKFLOW_CANCELLED event is written to the outbox. With --compensate, the completed
    steps that have a compensate are undone first, last completed first.

    Cancelling an unknown, finished or compensating workflow is an error that changes
    nothing.
    """
    def go() -> int:
        doc = _client(client_id).cancel(correlation_id, reason, compensate)
        print_json(doc) if as_json else print_status(doc)
        return 0

    _run_guarded(go)


@main.command()
@click.argument("correlation_id")
@client_option
@click.option("--wait", is_flag=True, help="Wait until the workflow settles again.")
@click.option("--timeout", type=float, default=None, callback=_seconds,
              help="With --wait: give up after seconds (exit 4; the workflow goes on).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def retry(correlation_id: str, client_id: str, wait: bool, timeout: float | None,
          as_json: bool) -> None:
    """Retry a FAILED workflow from its failed step (or failed sub-tasks) with fresh
    attempts, keeping every completed output and the ledger. A workflow that failed
    while undoing its steps (a compensation out of attempts) goes on undoing: the
    compensations left run again, and it ends COMPENSATED (or CANCELLED).

    Retrying a workflow that is not FAILED is an error that changes nothing.
    """
    def go() -> int:
        client = _client(client_id)
        with _worker_if_embedded(client, wait):
            doc = client.retry(correlation_id)
            if wait:
                doc = _wait(client, doc["correlation_id"], timeout, as_json,
                            None if as_json else ProgressPrinter())
        print_json(doc) if as_json else print_status(doc)
        return _exit_code(doc)

    _run_guarded(go)


@main.command()
@click.argument("correlation_id")
@client_option
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def ledger(correlation_id: str, client_id: str, as_json: bool) -> None:
    """Show a workflow's fuel ledger: each row's kind (debit: a price from the table;
    reserve: an AI attempt's worst case, held at dispatch; settle: what it consumed;
    release: the rest of the hold), step, action, amount charged, fuel held (+) or let
    go (-), model and tokens; then the budget, the fuel spent (the amounts), reserved
    (the holds) and remaining."""
    def go() -> int:
        client = _client(client_id)
        entries = client.ledger(correlation_id)
        if as_json:
            print_json(entries)
        else:
            print_ledger(entries, client.status(correlation_id)["fuel"])
        return 0

    _run_guarded(go)


@main.command()
@click.argument("correlation_id")
@client_option
@click.option("--json", "as_json", is_flag=True, help="Print the events as a JSON list.")
def events(correlation_id: str, client_id: str, as_json: bool) -> None:
    """Show a workflow's event history, oldest first: started, each attempt dispatched,
    started (by which worker), succeeded or failed, retries scheduled, fuel charged,
    pauses, resumes and cancels (by which client), compensation, the end."""
    def go() -> int:
        entries = _client(client_id).events(correlation_id)
        print_json(entries) if as_json else print_events(entries)
        return 0

    _run_guarded(go)


@main.command(name="list")
@client_option
@click.option("--status", "status_", type=click.Choice([s.value for s in Status]),
              help="Only workflows with this status.")
@click.option("--limit", default=50, show_default=True,
              type=click.IntRange(1, 10_000), help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_(client_id: str, status_: str | None, limit: int, as_json: bool) -> None:
    """List the client's recent workflows, newest first."""
    def go() -> int:
        docs = _client(client_id).list(status_, limit)
        print_json(docs) if as_json else print_list(docs)
        return 0

    _run_guarded(go)


@main.command()
@click.option("--auto-approve", is_flag=True, help="Approve the review step without asking.")
@click.option("--timeout", type=float, default=120.0, show_default=True, callback=_seconds,
              help="Give up after this many seconds.")
def demo(auto_approve: bool, timeout: float) -> None:
    """Run the Blog Post Generator plan end to end, with a worker in this process.

    With no CHASSIS_* variables set it uses SQLite and a file-system broker under
    ./.chassis: no server needed. It pauses for your approval (--auto-approve for
    scripts) and ends COMPLETED.
    """
    def go() -> int:
        client = _client("demo")
        s = client.settings
        out = console()
        if s.embedded_broker:
            out.print(f"embedded mode: database {s.database_url}, file-system broker in "
                      f"{s.broker_dir}, Celery worker in this process")
        note = provider_note(s)
        if note:
            out.print(note, markup=False)
        with _in_process_worker():
            cid = client.start(DEMO_PLAN, DEMO_INPUT)
            out.print(f"started workflow [bold]{cid}[/] from {DEMO_PLAN.name}")
            printer = ProgressPrinter()
            doc = client.wait(cid, timeout=timeout, on_change=printer)
            if doc["status"] == Status.PAUSED_FOR_HUMAN_INPUT:
                approved = _ask_approval(doc, auto_approve)
                if approved is None:
                    out.print(f"left paused; resume with: chassis resume {cid} --approve "
                              "--client demo")
                    return 0
                client.resume(cid, approved, {"approved_by": "demo", "auto": auto_approve})
                doc = client.wait(cid, timeout=timeout, until=SETTLED - {
                    Status.PAUSED_FOR_HUMAN_INPUT}, on_change=printer)
        print_status(doc)
        return _exit_code(doc)

    _run_guarded(go)


def _ask_approval(doc: dict[str, Any], auto_approve: bool) -> bool | None:
    out = console()
    out.print("[bold yellow]paused for human review[/]; data for review:")
    for name, value in doc["collected_data"].items():
        out.print(f"  [bold]{name}[/]: {escape(json.dumps(value)[:300])}")
    if auto_approve:
        out.print("approved automatically (--auto-approve)")
        return True
    if not sys.stdin.isatty():
        out.print("not a terminal: pass --auto-approve to approve without asking")
        return None
    return click.confirm("Approve and publish?", default=True)
