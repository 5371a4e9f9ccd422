"""The status document of a workflow (``chassis status --json``, ``Client.status``):
its state, where it waits, and every step with its attempts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from chassis.plan import PAUSE, Plan
from chassis.state import Status, WorkflowState, compensated_step, json_copy


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def _attempt_doc(r: dict[str, Any]) -> dict[str, Any]:
    return {"attempt": r["attempt"], "status": r["status"], "error": r["error"],
            "error_type": r["error_type"], "deliveries": r["deliveries"],
            "dispatched_at": _iso(r["dispatched_at"]), "due_at": _iso(r["due_at"]),
            "started_at": _iso(r["started_at"]), "finished_at": _iso(r["finished_at"]),
            "deadline": _iso(r.get("deadline"))}


def _step_docs(rows: list[dict[str, Any]], plan: Plan | None) -> list[dict[str, Any]]:
    """One entry per step or sub-task (its latest attempt), with every attempt."""
    by_step: dict[str, list[dict[str, Any]]] = {}
    for r in rows:  # in id order: first dispatch first
        by_step.setdefault(r["step_name"], []).append(r)
    docs = []
    for name, attempts in by_step.items():
        attempts.sort(key=lambda r: r["attempt"])
        last = attempts[-1]
        errors = [r["error"] for r in attempts if r["error"] and r["status"] == "FAILED"]
        docs.append({
            "name": name, "compensates": compensated_step(name),
            "action": last["action"], "status": last["status"],
            "attempts": last["attempt"],
            "max_attempts": plan.policy(name).max_attempts if plan else None,
            "parent_step": last["parent_step"],
            "error": last["error"] or (errors[-1] if errors else None),
            "dispatched_at": _iso(last["dispatched_at"]), "due_at": _iso(last["due_at"]),
            "started_at": _iso(last["started_at"]), "finished_at": _iso(last["finished_at"]),
            "deadline": _iso(last.get("deadline")),
            "history": [_attempt_doc(r) for r in attempts],
        })
    return docs


def waiting_for(s: WorkflowState, steps: list[dict[str, Any]]) -> str | None:
    """Where a workflow that has not finished is waiting, in words."""
    if s.status.finished:
        return None
    open_ = [d for d in steps if d["status"] not in ("COMPLETED", "FAILED", "CANCELLED")]
    if s.status is Status.PAUSED_FOR_HUMAN_INPUT and s.budget_wait:
        w = s.budget_wait
        more = "fuel" if w.get("reason") == "budget" else "the client's quota"
        return (f"more {more} and an approval at step '{s.current_step}' (needs "
                f"{w.get('needed')}, {w.get('available')} available)")
    if s.status is Status.PAUSED_FOR_HUMAN_INPUT:
        pause = next((d for d in open_ if d["name"] == s.current_step), None)
        expiry = f" (it expires at {pause['deadline']})" if pause and pause["deadline"] \
            else ""
        return f"a human's approval at step '{s.current_step}'{expiry}"
    subs = [d for d in open_ if d["parent_step"]]
    if subs:
        names = ", ".join(d["name"] for d in subs[:5]) + (", ..." if len(subs) > 5 else "")
        return f"{len(subs)} sub-task(s) of '{subs[0]['parent_step']}': {names}"
    for d in open_:
        if d["action"] in (PAUSE, "fan_out"):
            continue
        of = f" of {d['max_attempts']}" if d["max_attempts"] else ""
        what = {"SCHEDULED": f"retry due at {d['due_at']}", "DISPATCHED": "queued",
                "RUNNING": f"running since {d['started_at']}",
                "AWAITING": "waiting for the agent's answer"}.get(d["status"], d["status"])
        if d["compensates"]:
            return (f"compensation of '{d['compensates']}', attempt {d['attempts']}{of}: "
                    f"{what}")
        return f"step '{d['name']}', attempt {d['attempts']}{of}: {what}"
    if s.current_step:
        return f"dependencies of step '{s.current_step}'"
    return None


def status_dict(s: WorkflowState, steps: list[dict[str, Any]] | None,
                plan: Plan | None = None,
                refused: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The status document of ``chassis status --json``: ``steps`` holds one entry per
    step or sub-task (its latest attempt, ``attempts`` the attempt number, ``error`` the
    last error) with its ``history`` of attempts; ``waiting_for`` says where it waits
    (None in lists, which read no attempts); ``undelivered`` lists its outgoing messages
    Kafka refused for good; ``compensation`` (when the workflow was undone, or is
    being undone) the error that started it, the status it ends with and the
    compensations still to run, in batches."""
    step_docs = _step_docs(steps or [], plan)
    return {
        "correlation_id": s.correlation_id, "client_id": s.client_id,
        "project_id": s.project_id, "status": s.status.value,
        "current_step": s.current_step or None,
        "waiting_for": None if steps is None else waiting_for(s, step_docs),
        "awaited_steps": s.awaited_steps,
        "collected_data": json_copy(s.collected_data.to_dict()),
        "input": s.initial_request_data,
        "final_result": s.final_result, "error": s.error,
        "fuel": {"budget": s.fuel_budget, "spent": s.fuel_spent,
                 "reserved": s.fuel_reserved, "remaining": s.fuel_remaining},
        "paused_for_fuel": s.budget_wait,
        "steps": step_docs,
        "created_at": _iso(s.created_at), "updated_at": _iso(s.updated_at),
        "version": s.version,
        "undelivered": [{**m, "failed_at": _iso(m["failed_at"])} for m in refused or []],
        "compensation": None if s.cause is None else {
            "cause": s.cause, "ends": s.then, "pending": s.undo,
            "failed": s.undo_failed},
    }


__all__ = ["status_dict", "waiting_for"]
