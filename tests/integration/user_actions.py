"""Actions a user would register in their own module; the test workers load it through
CHASSIS_ACTION_MODULES. They count their runs in Redis so tests can see side effects."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from chassis.actions import action

_redis: redis.Redis | None = None


def counter() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["CHASSIS_TEST_COUNTER_URL"])
    return _redis


@action("count")
def count(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Count one run under params.key, then sleep params.seconds (default 0)."""
    n = counter().incr(f"runs:{params['key']}")
    if params.get("seconds"):
        time.sleep(float(params["seconds"]))
    return {"runs": int(n), "saw": sorted(data)}


class FlakyError(Exception):
    """What ``flaky`` raises: an error of the user's own type."""


@action("flaky")
def flaky(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Count one run under params.key; fail the first params.fail_times runs (raising
    params.error, a builtin exception name, else FlakyError); sleep params.seconds."""
    n = int(counter().incr(f"runs:{params['key']}"))
    if params.get("seconds"):
        time.sleep(float(params["seconds"]))
    if n <= int(params.get("fail_times", 0)):
        kind = {"ValueError": ValueError, "KeyError": KeyError}.get(params.get("error", ""),
                                                                     FlakyError)
        raise kind(f"flaky run {n}")
    return {"runs": n}


@action("big")
def big(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """An output of params.size characters."""
    return {"blob": "x" * int(params["size"])}


@action("record")
def record(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Append params.name (and what it saw: output, error) to the list log:params.key,
    sleep params.seconds, then fail if params.fail says so (true: always; a number:
    the first that many runs of this name). A booking's steps and their undoing."""
    import json

    r = counter()
    name = params["name"]
    n = int(r.incr(f"runs:{params['key']}:{name}"))
    r.rpush(f"log:{params['key']}", json.dumps(
        {"name": name, "output": data.get("output"), "error": data.get("error"),
         "at": time.time(), "saw": sorted(data)}))
    if params.get("seconds"):
        time.sleep(float(params["seconds"]))
    fail = params.get("fail")
    if fail is True or (isinstance(fail, int) and n <= fail):
        raise RuntimeError(f"{name} failed (run {n})")
    return {"did": name, "run": n}


@action("mutate")
def mutate(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Change the output of step params.of in place (a careless action)."""
    seen = data[params["of"]]
    seen["items"].sort()
    seen["note"] = "scratch"
    return {"ok": True}
