"""chassis run | status | resume | cancel | retry | ledger | list | demo.

Exit codes: 0 done (with --wait: the workflow is not FAILED); 1 the workflow FAILED,
or an operation was refused for the workflow's state (unknown id, not paused, already
finished) and nothing changed; 2 bad input, nothing written; 3 a service (database or
broker) is unreachable: the message says whether the request was recorded (then it
goes on by itself once the service is back, and repeating the command is safe).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import click
from kombu.utils.url import maybe_sanitize_url
from rich.markup import escape

from chassis import actions, config, infra
from chassis.ai import provider_note
from chassis.api import DEFAULT_FUEL, Client
from chassis.cli.base import main
from chassis.cli.output import (
    ProgressPrinter,
    console,
    fail,
    print_json,
    print_ledger,
    print_list,
    print_status,
)
from chassis.errors import ChassisError, InputError, PlanError, ServiceUnavailable
from chassis.state import SETTLED, Status
from chassis.store.db import mask_url

#: Exit code when the database or the broker cannot be reached.
EXIT_UNAVAILABLE = 3

DEMO_PLAN = Path(__file__).resolve().parent.parent / "examples" / "blog_post.yaml"
DEMO_INPUT = {"topic": "durable AI-agent workflows on Celery", "audience": "platform teams"}


def _parse_json_arg(value: str | None, what: str) -> Any:
    """JSON text, or @file holding JSON."""
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror}",
                                     param_hint=what) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=what) from None


@contextmanager
def _in_process_worker() -> Iterator[None]:
    """A real Celery worker of the `tasks` app, in this process, and the sweep."""
    from chassis import runtime
    from chassis.embedded import embedded_worker
    from chassis.sweep import Sweeper
    from tasks import app

    settings = config.load()
    sweeper = Sweeper(runtime.engine(app), settings)
    with embedded_worker(app, sweep=sweeper.sweep, sweep_interval=settings.sweep_interval):
        yield


def _worker_if_embedded(client: Client, wanted: bool) -> Any:
    """In embedded mode, waiting runs the worker here; otherwise one runs elsewhere."""
    if wanted and client.settings.embedded_broker:
        return _in_process_worker()
    return nullcontext()


def _client(embedded_upgrade: bool = True, load_actions: bool = False) -> Client:
    settings = config.load()
    if load_actions:  # a plan is checked against the actions of CHASSIS_ACTION_MODULES
        actions.load_modules(settings.action_modules)
    if embedded_upgrade and settings.database_url.startswith("sqlite"):
        from chassis.store.db import upgrade

        upgrade(settings.database_url)
    return Client(settings)


def _run_guarded(fn: Callable[[], int | None], hint: Callable[[str], str] | None = None) -> None:
    """Run a command body: refusals and unreachable services are one line on stderr
    and an exit code (see the module's docstring), never a traceback. ``hint``: what to
    add when the request was recorded but the broker is unreachable."""
    try:
        code = fn()
    except PlanError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(2)
    except InputError as exc:
        fail(str(exc), code=2)
    except ServiceUnavailable as exc:
        extra = hint(exc.correlation_id) if hint and exc.recorded and exc.correlation_id else ""
        fail(str(exc) + extra, code=EXIT_UNAVAILABLE)
    except ChassisError as exc:
        fail(str(exc))
    except Exception as exc:
        if not infra.is_infrastructure_error(exc):
            raise
        settings = config.load()
        where = (f"the database at {mask_url(settings.database_url)}"
                 if infra.is_database_error(exc)
                 else f"the broker at {maybe_sanitize_url(settings.broker_url)}")
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
        fail(f"cannot reach {where}: {reason}", code=EXIT_UNAVAILABLE)
    sys.exit(code or 0)


def _exit_code(doc: dict[str, Any]) -> int:
    return 1 if doc["status"] == Status.FAILED else 0


@main.command()
@click.argument("plan")
@click.option("--input", "input_", metavar="JSON|@FILE", help="Initial request data (JSON).")
@click.option("--client", "client_id", envvar="CHASSIS_CLIENT_ID", default="local",
              show_default=True, help="Client that owns the workflow (env CHASSIS_CLIENT_ID).")
@click.option("--project", "project_id", help="Project id carried in notifications.")
@click.option("--fuel", default=str(DEFAULT_FUEL), show_default=True,
              help="Fuel budget: a positive integer.")
@click.option("--correlation-id", help="Workflow id (UUID); starting an existing one is a no-op.")
@click.option("--wait", is_flag=True,
              help="Wait until COMPLETED, FAILED or PAUSED_FOR_HUMAN_INPUT; exit 1 if FAILED.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def run(plan: str, input_: str | None, client_id: str, project_id: str | None, fuel: str,
        correlation_id: str | None, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Start a workflow from PLAN: a JSON/YAML file, or a registered plan's NAME
    (latest version) or NAME@VERSION (see `chassis plan`).

    Bad input (invalid plan, missing client, a budget that is not a positive integer)
    is refused and nothing is written. In embedded mode, --wait runs a Celery worker in
    this process; without it the work waits for `celery -A tasks worker`.
    """
    data = _parse_json_arg(input_, "--input")

    def go() -> int:
        client = _client(load_actions=True)
        with _worker_if_embedded(client, wait):
            cid = client.start(plan, data, client_id=client_id, fuel_budget=fuel,
                               correlation_id=correlation_id, project_id=project_id)
            if not wait:
                doc = client.status(cid)
                if as_json:
                    print_json(doc)
                else:
                    console().print(f"started workflow [bold]{cid}[/] ({doc['status']})")
                    if client.settings.embedded_broker:
                        console().print("embedded broker: run `celery -A tasks worker` in this "
                                        "folder, or use --wait, to execute it")
                return 0
            show = not as_json or sys.stderr.isatty()
            printer = ProgressPrinter(err=as_json) if show else None
            if printer and not as_json:
                console().print(f"workflow [bold]{cid}[/]")
            doc = client.wait(cid, timeout=timeout, on_change=printer)
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(correlation_id: str, as_json: bool) -> None:
    """Show a workflow: status, where it waits, fuel, and every step with its attempts
    and last error (--json: every attempt too)."""
    def go() -> int:
        doc = _client().status(correlation_id)
        print_json(doc) if as_json else print_status(doc)
        return 0

    _run_guarded(go)


@main.command()
@click.argument("correlation_id")
@click.option("--approve", "decision", flag_value="approve", help="Approve and continue.")
@click.option("--reject", "decision", flag_value="reject", help="Reject: the workflow fails.")
@click.option("--feedback", metavar="JSON|@FILE", help="Feedback, kept as human_feedback.")
@click.option("--wait", is_flag=True, help="Wait until the workflow settles again.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def resume(correlation_id: str, decision: str | None, feedback: str | None, wait: bool,
           as_json: bool) -> None:
    """Resume a workflow paused for human input (--approve or --reject).

    Resuming an unknown workflow, or one that is not paused, is an error that changes
    nothing; the same answer again, once recorded, is reported as such (exit 0).
    """
    if decision is None:
        raise click.UsageError("say --approve or --reject")
    fb = _parse_json_arg(feedback, "--feedback")

    def go() -> int:
        client = _client()
        with _worker_if_embedded(client, wait):
            doc = client.resume(correlation_id, decision == "approve", fb)
            if doc.get("resume") == "already recorded" and not as_json:
                console().print(f"{'approval' if decision == 'approve' else 'rejection'} "
                                f"already recorded for workflow {doc['correlation_id']}")
            if wait:
                doc = client.wait(doc["correlation_id"],
                                  on_change=None if as_json else ProgressPrinter())
        print_json(doc) if as_json else print_status(doc)
        return _exit_code(doc)

    _run_guarded(go, lambda _cid: "; repeating the command is safe")


@main.command()
@click.argument("correlation_id")
@click.option("--reason", metavar="TEXT", help="Why (kept with the workflow and the event).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cancel(correlation_id: str, reason: str | None, as_json: bool) -> None:
    """Cancel a workflow that has not finished: in-flight steps are revoked (terminated
    on the prefork pool), late results ignored, status CANCELLED, and a
    WORKFLOW_CANCELLED event is written to the outbox.

    Cancelling an unknown or finished workflow is an error that changes nothing.
    """
    def go() -> int:
        doc = _client().cancel(correlation_id, reason)
        print_json(doc) if as_json else print_status(doc)
        return 0

    _run_guarded(go)


@main.command()
@click.argument("correlation_id")
@click.option("--wait", is_flag=True, help="Wait until the workflow settles again.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def retry(correlation_id: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Retry a FAILED workflow from its failed step (or failed sub-tasks) with fresh
    attempts, keeping every completed output and the ledger.

    Retrying a workflow that is not FAILED is an error that changes nothing.
    """
    def go() -> int:
        client = _client()
        with _worker_if_embedded(client, wait):
            doc = client.retry(correlation_id)
            if wait:
                doc = client.wait(doc["correlation_id"], timeout=timeout,
                                  on_change=None if as_json else ProgressPrinter())
        print_json(doc) if as_json else print_status(doc)
        return _exit_code(doc)

    _run_guarded(go)


@main.command()
@click.argument("correlation_id")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def ledger(correlation_id: str, as_json: bool) -> None:
    """Show a workflow's fuel ledger: one debit per attempt of a step."""
    def go() -> int:
        client = _client()
        entries = client.ledger(correlation_id)
        if as_json:
            print_json(entries)
        else:
            print_ledger(entries, client.status(correlation_id)["fuel"])
        return 0

    _run_guarded(go)


@main.command(name="list")
@click.option("--status", "status_", type=click.Choice([s.value for s in Status]),
              help="Only workflows with this status.")
@click.option("--limit", default=50, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_(status_: str | None, limit: int, as_json: bool) -> None:
    """List recent workflows, newest first."""
    def go() -> int:
        docs = _client().list(status_, limit)
        print_json(docs) if as_json else print_list(docs)
        return 0

    _run_guarded(go)


@main.command()
@click.option("--auto-approve", is_flag=True, help="Approve the review step without asking.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Give up after this many seconds.")
def demo(auto_approve: bool, timeout: float) -> None:
    """Run the Blog Post Generator plan end to end, with a worker in this process.

    With no CHASSIS_* variables set it uses SQLite and a file-system broker under
    ./.chassis: no server needed. It pauses for your approval (--auto-approve for
    scripts) and ends COMPLETED.
    """
    def go() -> int:
        client = _client()
        s = client.settings
        out = console()
        if s.embedded_broker:
            out.print(f"embedded mode: database {s.database_url}, file-system broker in "
                      f"{s.broker_dir}, Celery worker in this process")
        note = provider_note(s)
        if note:
            out.print(note, markup=False)
        with _in_process_worker():
            cid = client.start(DEMO_PLAN, DEMO_INPUT, client_id="demo")
            out.print(f"started workflow [bold]{cid}[/] from {DEMO_PLAN.name}")
            printer = ProgressPrinter()
            doc = client.wait(cid, timeout=timeout, on_change=printer)
            if doc["status"] == Status.PAUSED_FOR_HUMAN_INPUT:
                approved = _ask_approval(doc, auto_approve)
                if approved is None:
                    out.print(f"left paused; resume with: chassis resume {cid} --approve")
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
