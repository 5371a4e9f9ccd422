"""``chassis db``: create and migrate the database named by CHASSIS_DATABASE_URL."""

from __future__ import annotations

import click

from chassis.cli.base import main
from chassis.config import load
from chassis.store import db as store_db


@main.group()
def db() -> None:
    """Create and migrate the chassis database.

    The database is CHASSIS_DATABASE_URL (default: SQLite under ./.chassis, or
    CHASSIS_HOME). postgresql:// URLs use psycopg 3.
    """


@db.command()
def upgrade() -> None:
    """Apply every pending migration. Safe to run again: does nothing when up to date."""
    url = load().database_url
    applied = store_db.upgrade(url)  # (an unreachable database: exit 3, one line)
    target = store_db.mask_url(url)
    if not applied:
        revision = store_db.current_revision(url)
        click.echo(f"database is up to date at revision {revision} ({target})")
        return
    click.echo(f"applied {len(applied)} migration(s) to {target}:")
    for revision in applied:
        click.echo(f"  {revision}")
    click.echo(f"database is now at revision {applied[-1]}")


@db.command()
def current() -> None:
    """Show the migration revision the database is at."""
    url = load().database_url
    revision = store_db.current_revision(url)
    head = store_db.head_revision()
    if revision is None:
        click.echo(
            f"no revision: the database is not migrated; run `chassis db upgrade` "
            f"({store_db.mask_url(url)})"
        )
    elif revision == head:
        click.echo(f"{revision} (head)")
    else:
        click.echo(f"{revision} (head is {head}; run `chassis db upgrade`)")
