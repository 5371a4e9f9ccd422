"""``chassis web`` (the HTTP API and web console) and ``chassis keys`` (their API keys)."""

from __future__ import annotations

from contextlib import nullcontext

import click

from chassis import logs
from chassis.cli.base import main
from chassis.cli.output import console, print_json
from chassis.cli.workflows import _client, _in_process_worker, _run_guarded
from chassis.limits import check_name
from chassis.store import keys as api_keys


@main.command()
@click.option("--host", default=None,
              help="Address to listen on (default CHASSIS_WEB_HOST, else 127.0.0.1; "
                   "0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port to listen on (default CHASSIS_WEB_PORT, else 8000).")
@click.option("--actions", "--actions-module", "modules", multiple=True, metavar="MODULE",
              help="Import MODULE, so that inline plans may use the actions it registers "
                   "(repeatable; CHASSIS_ACTION_MODULES are imported too).")
def web(host: str | None, port: int | None, modules: tuple[str, ...]) -> None:
    """Serve the HTTP API (/api/v1, OpenAPI at /openapi.json) and the web console (/)
    with uvicorn.

    Every request needs an API key (`chassis keys create CLIENT`);
    CHASSIS_WEB_RATE_LIMIT caps each key's API requests a minute (429). In embedded mode
    (no CHASSIS_BROKER_URL) a Celery worker runs in this process too, so the workflows
    started here go on with no other server.
    """
    import uvicorn

    from chassis.web import create_app

    def go() -> int:
        client = _client(load_actions=True, modules=modules)
        settings = client.settings
        logs.configure(settings.log_format, settings.log_level)
        where, at = host or settings.web_host, port or settings.web_port
        app = create_app(settings, client)
        embedded = client.settings.embedded_broker
        with _in_process_worker() if embedded else nullcontext():
            console(err=True).print(
                f"chassis web: http://{where}:{at}/ (API /api/v1, OpenAPI "
                f"/openapi.json){' with an embedded worker' if embedded else ''}")
            # X-Forwarded-Proto/-For of a proxy on FORWARDED_ALLOW_IPS (uvicorn's
            # variable; default 127.0.0.1) are believed: the cookie is Secure behind TLS
            uvicorn.run(app, host=where, port=at, log_config=None,
                        log_level=settings.log_level.lower(), proxy_headers=True,
                        server_header=False)
        return 0

    _run_guarded(go)


@main.group()
def keys() -> None:
    """API keys of the HTTP API and web console.

    A key acts for one client: it sees and acts on that client's workflows only; an
    admin key (--admin) on every client's, and may register plans. Keys are stored
    hashed: a key is shown once, when made.
    """


@keys.command("create")
@click.argument("client")
@click.option("--admin", is_flag=True, help="An admin key: every client's workflows.")
@click.option("--label", default=None, help="A note to tell the key by (e.g. its app).")
@click.option("--expires-in", "expires_in", default=None, metavar="DURATION",
              help="The key stops working after DURATION: 30d, 12h, 90m, 45s, 2w (default: "
                   "never; at most ten years).")
@click.option("--json", "as_json", is_flag=True,
              help="Print {key, key_id, client_id, admin, ...} as JSON.")
def create_key(client: str, admin: bool, label: str | None, expires_in: str | None,
               as_json: bool) -> None:
    """Make an API key for CLIENT and print it (once: it is stored hashed)."""
    def go() -> int:
        who = check_name(client, "client").strip()
        note = None if label is None else check_name(label, "label")
        lifetime = None if expires_in is None else api_keys.parse_lifetime(expires_in)
        engine = _client().store.engine
        made, text = api_keys.create(engine, who, admin, note, lifetime)
        if as_json:
            print_json({"key": text, **made.as_dict()})
        else:
            click.echo(text)
            until = f"; it expires {made.expires_at.isoformat()[:19]} UTC" \
                if made.expires_at else ""
            console(err=True).print(
                f"key {made.key_id} for client {who}{' (admin)' if admin else ''}: "
                f"shown once, keep it now{until}. Send it as 'Authorization: Bearer <key>'.")
        return 0

    _run_guarded(go)


@keys.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Revoked keys too.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_keys(include_revoked: bool, as_json: bool) -> None:
    """The API keys (never their secrets): id, client, admin, made, last used, expiry."""
    def go() -> int:
        found = api_keys.list_keys(_client().store.engine, include_revoked)
        if as_json:
            print_json([k.as_dict() for k in found])
            return 0
        from rich.table import Table

        t = Table()
        for col in ("key id", "client", "admin", "label", "created", "last used",
                    "expires", "revoked"):
            t.add_column(col)
        for k in found:
            d = k.as_dict()
            expires = (d["expires_at"] or "never")[:19] + (" (expired)" if k.expired else "")
            t.add_row(k.key_id, k.client_id, "yes" if k.admin else "", k.label or "",
                      (d["created_at"] or "")[:19], (d["last_used_at"] or "-")[:19],
                      expires, (d["revoked_at"] or "")[:19])
        console().print(t)
        if not found:
            console().print("no API keys; make one with `chassis keys create CLIENT`")
        return 0

    _run_guarded(go)


@keys.command("revoke")
@click.argument("key_id")
def revoke_key(key_id: str) -> None:
    """Revoke key KEY_ID (its requests are refused from now on)."""
    def go() -> int:
        k = api_keys.revoke(_client().store.engine, key_id)
        console().print(f"key {k.key_id} of client {k.client_id} revoked "
                        f"({(k.revoked_at.isoformat() if k.revoked_at else '')[:19]})")
        return 0

    _run_guarded(go)
