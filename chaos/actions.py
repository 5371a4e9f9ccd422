"""The actions the chaos workflows run (workers: CHASSIS_ACTION_MODULES=chaos.actions;
the agent: --actions chaos.actions). Each output says which step of which workflow
made it, so a record in the wrong place is seen."""

from __future__ import annotations

import time
from typing import Any

from chassis.actions import ActionError, action, current_attempt


def _who(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    return {"tag": params.get("tag"), "case": (data.get("input") or {}).get("case")}


@action("chaos_ok")
def ok(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Succeed after ``params.delay`` seconds."""
    time.sleep(float(params.get("delay", 0)))
    return _who(data, params)


@action("chaos_flaky")
def flaky(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Fail the first ``params.fail`` attempts, then succeed."""
    attempt = current_attempt()
    number = attempt.attempt if attempt is not None else 1
    time.sleep(float(params.get("delay", 0)))
    if number <= int(params.get("fail", 1)):
        raise ActionError(f"flaky step {params.get('tag')}: attempt {number} fails")
    return _who(data, params)


@action("chaos_fail")
def fail(data: dict[str, Any], params: dict[str, Any]) -> Any:
    """Always fail."""
    time.sleep(float(params.get("delay", 0)))
    raise ActionError(f"step {params.get('tag')} fails for good")


@action("chaos_undo")
def undo(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A compensation: what it undid."""
    return {"undid": params.get("tag"), "case": (data.get("input") or {}).get("case")}
