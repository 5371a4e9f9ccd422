"""What the CLI says about an error: one line (a plan: one per problem) and an exit code.

Exit codes (the same for every command):

= ======================================================================================
0 done
1 refused for the workflow's state (unknown workflow, not paused, already finished, not
  failed), or the workflow is FAILED or COMPENSATED when the command ends; anything
  unexpected
2 bad input (a plan, an option, a variable of the environment): nothing written
3 a service is unreachable or not set up (the database, the broker; a database that is
  not migrated); the line says whether the request was recorded
4 ``--wait --timeout`` ran out; the workflow goes on
= ======================================================================================

No traceback, unless ``chassis --debug``.
"""

from __future__ import annotations

import sqlalchemy.exc as sa_exc
from kombu.utils.url import maybe_sanitize_url

from chassis import config, infra
from chassis.errors import (
    ChassisError,
    ConfigError,
    InputError,
    PlanError,
    ServiceUnavailable,
)

OK, REFUSED, BAD_INPUT, UNAVAILABLE, TIMED_OUT = 0, 1, 2, 3, 4


def _reason(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]


def _where(exc: BaseException) -> str:
    try:
        settings = config.load()
    except ConfigError:
        return "the database" if infra.is_database_error(exc) else "the broker"
    from chassis.store.db import mask_url

    if infra.is_database_error(exc) or isinstance(exc, sa_exc.DBAPIError):
        return f"the database at {mask_url(settings.database_url)}"
    return f"the broker at {maybe_sanitize_url(settings.broker_url)}"


def _not_migrated(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, sa_exc.DBAPIError) and (
        "no such table" in text or ("relation" in text and "does not exist" in text)
        or ("column" in text and "does not exist" in text) or "no such column" in text)


def describe(exc: BaseException) -> tuple[int, list[str]]:
    """(exit code, lines) for an error a command ran into."""
    if isinstance(exc, PlanError):
        return BAD_INPUT, list(exc.problems)
    if isinstance(exc, InputError | ConfigError):
        return BAD_INPUT, [str(exc)]
    if isinstance(exc, ServiceUnavailable):
        return UNAVAILABLE, [str(exc)]
    if isinstance(exc, ChassisError):
        return REFUSED, [str(exc)]
    if isinstance(exc, TimeoutError):
        return TIMED_OUT, [f"{exc}; the workflow goes on (see `chassis status`)"]
    if _not_migrated(exc):
        return UNAVAILABLE, [f"{_where(exc)} is not migrated to this version: run "
                             "`chassis db upgrade`"]
    if infra.is_infrastructure_error(exc):
        return UNAVAILABLE, [f"cannot reach {_where(exc)}: {_reason(exc)}"]
    return REFUSED, [f"unexpected error: {type(exc).__name__}: {_reason(exc)} "
                     "(run `chassis --debug ...` for the traceback)"]


__all__ = ["BAD_INPUT", "OK", "REFUSED", "TIMED_OUT", "UNAVAILABLE", "describe"]
