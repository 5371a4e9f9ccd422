"""``chassis health``, ``chassis metrics`` and ``chassis sweep``: operating a deployment."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import click

from chassis import config, health, logs
from chassis.cli.base import main
from chassis.cli.output import fail, print_json
from chassis.errors import ChassisError


@main.command("health")
@click.option("--timeout", type=float, default=5.0, show_default=True,
              help="Seconds each check may take.")
@click.option("--only", "parts", multiple=True, type=click.Choice(list(health.CHECKS)),
              help="Check only this part (repeatable).")
def health_command(timeout: float, parts: tuple[str, ...]) -> None:
    """Check the database, the Celery broker and Kafka (when CHASSIS_KAFKA_BOOTSTRAP is
    set) with real connections. Prints each part; exits 1 naming the parts that fail
    (for container health checks)."""
    try:
        results = health.check(config.load(), timeout, parts or tuple(health.CHECKS))
    except ChassisError as exc:
        fail(str(exc))
    for r in results:
        click.echo(str(r), err=not r.ok)
    failed = [r.part for r in results if not r.ok]
    if failed:
        fail(f"unhealthy: {', '.join(failed)}")


@main.command("metrics")
@click.option("--port", type=int, default=None,
              help="Port to serve on (default CHASSIS_METRICS_PORT, 9808).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
def metrics_command(port: int | None, host: str) -> None:
    """Serve Prometheus metrics (agentchassis_*) on http://HOST:PORT/metrics, computed
    from the database (and Kafka, when configured) at each scrape. Runs until SIGTERM
    or Ctrl-C."""
    from prometheus_client import start_http_server

    from chassis.metrics import registry

    settings = config.load()
    logs.configure(settings.log_format, settings.log_level)
    port = settings.metrics_port if port is None else port
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server, _ = start_http_server(port, host, registry(settings))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror}")
    except ChassisError as exc:
        fail(str(exc))
    click.echo(f"serving metrics on http://{host}:{port}/metrics", err=True)
    stop.wait()
    server.shutdown()


@main.command("sweep")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def sweep_command(as_json: bool) -> None:
    """Run the sweep once, now (beat sends chassis.sweep every CHASSIS_SWEEP_INTERVAL
    seconds): retries that are due are sent, attempts past their timeout fail, attempts
    of lost workers and lost messages are sent again, forgotten fan-ins are collected."""
    from chassis import infra
    from chassis.api import Client
    from chassis.sweep import Sweeper

    settings = config.load()
    try:
        report = Sweeper(Client(settings).engine, settings).sweep()
    except ChassisError as exc:
        fail(str(exc))
    except Exception as exc:
        if not infra.is_infrastructure_error(exc):
            raise
        fail(f"cannot reach the {'database' if infra.is_database_error(exc) else 'broker'}: "
             f"{' '.join(str(getattr(exc, 'orig', None) or exc).split())[:300]}", code=3)
    if as_json:
        print_json({**report.counts(), "attempts": {
            "sent_due": report.sent_due, "timed_out": report.timed_out,
            "expired": report.expired, "resent": report.resent, "lost": report.lost,
            "fanned_in": report.fanned_in, "failed": report.failed,
            "asked_again": report.asked_again}})
        return
    if report.locked_out:
        click.echo("another sweep is running: nothing done")
        return
    click.echo(f"{len(report.sent_due)} retry(ies) sent, {len(report.timed_out)} attempt(s) "
               f"timed out, {len(report.expired)} approval(s) expired, "
               f"{len(report.resent)} sent again, {len(report.lost)} failed by "
               f"lost workers, {len(report.fanned_in)} fan-in(s) collected, "
               f"{len(report.failed)} workflow(s) failed waiting, "
               f"{len(report.asked_again)} agent(s) asked again")
    for label, names in (("retry sent", report.sent_due), ("timed out", report.timed_out),
                         ("approval expired", report.expired),
                         ("sent again", report.resent), ("worker lost", report.lost),
                         ("fanned in", report.fanned_in), ("failed", report.failed),
                         ("asked again", report.asked_again)):
        for name in names:
            click.echo(f"  {label}: {name}")


@main.command("prune")
@click.option("--older-than", "days", type=click.FloatRange(0, 36500), required=True,
              metavar="DAYS", help="Remove finished workflows unchanged for this many days "
                                   "(0: every finished one).")
@click.option("--dry-run", is_flag=True, help="Count what would go; remove nothing.")
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True,
              help="Workflows removed per transaction.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def prune_command(days: float, dry_run: bool, batch: int, as_json: bool) -> None:
    """Remove finished workflows (COMPLETED, FAILED, CANCELLED, COMPENSATED) unchanged
    for DAYS, with their step runs, ledger rows and outbox rows, in batches of short
    transactions; running and paused workflows are never touched. Outbox rows published
    before then go too. With Kafka configured, a workflow whose events are not all
    published yet is kept; without Kafka, its events go with it (nothing would publish
    them). Beat does this daily when CHASSIS_PRUNE_AFTER_DAYS is set."""
    from datetime import timedelta

    from chassis.cli.workflows import _run_guarded
    from chassis.store.db import make_engine
    from chassis.store.prune import PruneReport, prune

    def progress(r: PruneReport) -> None:
        if not as_json:
            click.echo(f"  {'would remove' if dry_run else 'removed'} {r.workflows} "
                       f"workflow(s) so far", err=True)

    def go() -> int:
        settings = config.load()
        report = prune(make_engine(settings.database_url), timedelta(days=days),
                       kafka=bool(settings.kafka_bootstrap), dry_run=dry_run, batch=batch,
                       progress=progress)
        if as_json:
            print_json(report.counts())
            return 0
        verb = "would remove" if dry_run else "removed"
        click.echo(f"{verb} {report.workflows} finished workflow(s) unchanged since "
                   f"{report.cutoff:%Y-%m-%d %H:%M:%S} UTC: {report.step_runs} step run(s), "
                   f"{report.ledger_rows} ledger row(s), {report.outbox_rows} outbox row(s), "
                   f"{report.events} history event(s), {report.model_responses} recorded "
                   "model answer(s)")
        if report.kept_unpublished:
            click.echo(f"kept {report.kept_unpublished} whose events Kafka has not got yet "
                       "(is `chassis relay` running?)")
        return 0

    _run_guarded(go)
