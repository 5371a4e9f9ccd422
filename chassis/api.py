"""The public Python API for other apps: start a workflow, read its status, resume,
cancel or retry it.

Enqueueing needs only the database and broker URLs (the environment, or arguments),
never the user's action code::

    from chassis.api import Client
    client = Client()
    cid = client.start("examples/blog_post.yaml", {"topic": "Celery"}, client_id="acme")
    client.wait(cid)
    client.resume(cid, approved=True, feedback={"ok": True})
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import Celery

from chassis import actions, config, validation
from chassis import coordinator as co
from chassis.celery_conf import celery_settings
from chassis.engine import Engine
from chassis.errors import InputError, InvalidTransition, PlanFileError, PlanNotFound
from chassis.plan import PAUSE, Plan, load_plan, parse_plan
from chassis.registry import NAME_RE, PlanRegistry, parse_ref
from chassis.state import SETTLED, Status, WorkflowState
from chassis.store import SqlStore
from chassis.store.db import make_engine

DEFAULT_FUEL = 1000
"""Fuel budget of a workflow started without one."""

PlanSource = Plan | Mapping[str, Any] | str | Path


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def _attempt_doc(r: dict[str, Any]) -> dict[str, Any]:
    return {"attempt": r["attempt"], "status": r["status"], "error": r["error"],
            "error_type": r["error_type"], "deliveries": r["deliveries"],
            "dispatched_at": _iso(r["dispatched_at"]), "due_at": _iso(r["due_at"]),
            "started_at": _iso(r["started_at"]), "finished_at": _iso(r["finished_at"])}


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
            "name": name, "action": last["action"], "status": last["status"],
            "attempts": last["attempt"],
            "max_attempts": plan.policy(name).max_attempts if plan else None,
            "parent_step": last["parent_step"],
            "error": last["error"] or (errors[-1] if errors else None),
            "dispatched_at": _iso(last["dispatched_at"]), "due_at": _iso(last["due_at"]),
            "started_at": _iso(last["started_at"]), "finished_at": _iso(last["finished_at"]),
            "history": [_attempt_doc(r) for r in attempts],
        })
    return docs


def waiting_for(s: WorkflowState, steps: list[dict[str, Any]]) -> str | None:
    """Where a workflow that has not finished is waiting, in words."""
    if s.status.finished:
        return None
    open_ = [d for d in steps if d["status"] not in ("COMPLETED", "FAILED", "CANCELLED")]
    if s.status is Status.PAUSED_FOR_HUMAN_INPUT:
        return f"a human's approval at step '{s.current_step}'"
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
        return f"step '{d['name']}', attempt {d['attempts']}{of}: {what}"
    if s.current_step:
        return f"dependencies of step '{s.current_step}'"
    return None


def status_dict(s: WorkflowState, steps: list[dict[str, Any]] | None,
                plan: Plan | None = None) -> dict[str, Any]:
    """The status document of ``chassis status --json``: ``steps`` holds one entry per
    step or sub-task (its latest attempt, ``attempts`` the attempt number, ``error`` the
    last error) with its ``history`` of attempts; ``waiting_for`` says where it waits
    (None in lists, which read no attempts)."""
    step_docs = _step_docs(steps or [], plan)
    return {
        "correlation_id": s.correlation_id, "client_id": s.client_id,
        "project_id": s.project_id, "status": s.status.value,
        "current_step": s.current_step or None,
        "waiting_for": None if steps is None else waiting_for(s, step_docs),
        "awaited_steps": s.awaited_steps,
        "collected_data": s.collected_data, "input": s.initial_request_data,
        "final_result": s.final_result, "error": s.error,
        "fuel": {"budget": s.fuel_budget, "spent": s.fuel_spent,
                 "remaining": s.fuel_remaining},
        "steps": step_docs,
        "created_at": _iso(s.created_at), "updated_at": _iso(s.updated_at),
        "version": s.version,
    }


def _positive_budget(value: object) -> int:
    if isinstance(value, bool):
        raise InputError(f"fuel budget must be a positive integer, got {value!r}")
    try:
        budget = int(str(value).strip()) if isinstance(value, str) else value
    except ValueError:
        raise InputError(f"fuel budget must be a positive integer, got {value!r}") from None
    if not isinstance(budget, int) or budget <= 0:
        raise InputError(f"fuel budget must be a positive integer, got {value!r}")
    return budget


def _correlation_id(value: str | None) -> str:
    if value is None:
        return str(uuid.uuid4())
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InputError(f"correlation id must be a UUID, got {value!r}") from None


def resolve_plan(source: PlanSource, registry: PlanRegistry | None = None) -> Plan:
    """A plan from a Plan, a mapping, a JSON/YAML file path or, given ``registry``, a
    registered plan's ``name`` (latest version) or ``name@version``. An existing file
    wins over a registered name."""
    return _resolve(source, registry)[0]


def _resolve(source: PlanSource,
             registry: PlanRegistry | None) -> tuple[Plan, str | None, int | None]:
    """(plan, registered name, version); name and version are None for a file."""
    if isinstance(source, Plan):
        return source, None, None
    if isinstance(source, Mapping):
        return parse_plan(dict(source)), None, None
    path = Path(source)
    if path.exists():
        return load_plan(path), None, None
    ref = str(source)
    if registry is None or not NAME_RE.match(ref.rpartition("@")[0] or ref):
        raise PlanFileError(f"plan file not found: {source}")
    name, version = parse_ref(ref)
    try:
        found = registry.get(name, version)
    except PlanNotFound as exc:
        raise PlanFileError(f"{source}: no such plan file, and {exc}") from None
    return found.plan, found.name, found.version


class Client:
    """Talks to the store and the broker; one per app is plenty (it is thread-safe).

    ``in_worker``: True inside a Celery worker (fan-out chords are then sent directly;
    see :class:`chassis.engine.Engine`).
    """

    def __init__(self, settings: config.Settings | None = None, *,
                 app: Celery | None = None, in_worker: bool = False) -> None:
        self.settings = settings or config.load()
        if app is None:
            app = Celery("agentchassis-client", set_as_current=False)
            app.conf.update(celery_settings(self.settings))
        self.app = app
        self.store = SqlStore(make_engine(self.settings.database_url))
        self.engine = Engine(self.store, app, self.settings, in_worker=in_worker)
        self.registry = PlanRegistry(self.store.engine)

    def start(self, plan: PlanSource, input: Any = None, *, client_id: str | None,
              fuel_budget: object = DEFAULT_FUEL, correlation_id: str | None = None,
              project_id: str | None = None, request_id: str | None = None,
              known_actions: Collection[str] | None = None, check_actions: bool = True,
              plan_name: str | None = None, plan_version: int | None = None) -> str:
        """Start a workflow and return its correlation_id. Starting one whose id exists
        is a no-op that returns that id. Bad input raises before anything is written.
        An unreachable broker raises :class:`~chassis.errors.BrokerUnavailable` (with
        ``correlation_id``) after the workflow is recorded: it starts by itself once the
        broker is back, and starting the same id again is safe.

        ``plan`` is a Plan, a mapping, a file, or a registered name (``name@N`` for a
        given version); the workflow stores a snapshot of the plan it started with.

        ``check_actions=False`` accepts actions this process does not know (the
        worker has them); ``known_actions`` adds names to the registry's.
        """
        if not isinstance(client_id, str) or not client_id.strip():
            raise InputError("client_id header is required to execute a workflow "
                             "(pass client_id=..., or --client on the command line)")
        budget = _positive_budget(fuel_budget)
        cid = _correlation_id(correlation_id)
        p, name, version = _resolve(plan, self.registry)
        if name is not None and plan_name is None:
            plan_name, plan_version = name, version
        known = set(actions.registered()) | set(known_actions or ())
        if not check_actions:
            known |= {s.action for s in p.steps.values()}
            known |= {t.resolved_action for s in p.steps.values() for t in s.sub_tasks}
        validation.check(p, known)
        try:
            input = co.json_roundtrip(input)
        except TypeError as exc:
            raise InputError(f"input must be JSON: {exc}") from None
        state = WorkflowState(correlation_id=cid, client_id=client_id.strip(),
                              status=Status.RUNNING, current_step=p.start_step,
                              fuel_budget=budget, initial_request_data=input,
                              project_id=project_id, request_id=request_id)
        decision = co.decide(state, p, co.Start())
        self.engine.create(decision, p, plan_name=plan_name, plan_version=plan_version)
        return cid

    def start_request(self, request: Mapping[str, Any]) -> str:
        """Start the registered plan a Kafka start request names (the ``chassis.start``
        task's payload: plan, version, input, correlation_id, client_id, project_id,
        request_id, fuel_budget). Idempotent by correlation_id."""
        cid = _correlation_id(request["correlation_id"])
        if self.store.exists(cid):  # a re-read message: skip the plan look-up
            return cid
        found = self.registry.get(request["plan"], request.get("version"))
        return self.start(found.plan, request.get("input"), client_id=request["client_id"],
                          fuel_budget=request.get("fuel_budget") or DEFAULT_FUEL,
                          correlation_id=cid, project_id=request.get("project_id"),
                          request_id=request.get("request_id"), check_actions=False,
                          plan_name=found.name, plan_version=found.version)

    def status(self, correlation_id: str) -> dict[str, Any]:
        """The workflow's status document (raises WorkflowNotFound)."""
        cid = _correlation_id(correlation_id)
        return status_dict(self.store.get(cid), self.store.steps(cid),
                           self.store.get_plan(cid))

    def resume(self, correlation_id: str, approved: bool, feedback: Any = None) -> dict[str, Any]:
        """Approve or reject a paused workflow; returns its status after the decision.

        The same answer given again, once recorded (a repeated command), changes nothing
        and returns the status with ``"resume": "already recorded"``; resuming a workflow
        that is not paused otherwise raises InvalidTransition."""
        cid = _correlation_id(correlation_id)
        if not isinstance(approved, bool):
            raise InputError(f"approved must be true or false, got {approved!r}")
        try:
            self.engine.resume(cid, approved, feedback)
        except InvalidTransition:
            if self._answered(cid) != approved:
                raise
            return {**self.status(cid), "resume": "already recorded"}
        return self.status(cid)

    def _answered(self, cid: str) -> bool | None:
        """The answer recorded for the workflow's latest pause, if any."""
        pauses = [r for r in self.store.steps(cid)
                  if r["action"] == PAUSE and isinstance(r["output"], dict)]
        if not pauses:
            return None
        answer = max(pauses, key=lambda r: r["id"])["output"].get("approved")
        return answer if isinstance(answer, bool) else None

    def cancel(self, correlation_id: str, reason: str | None = None) -> dict[str, Any]:
        """Cancel a workflow that has not finished: in-flight attempts are revoked
        (terminated on the prefork pool), late results ignored, status CANCELLED, a
        WORKFLOW_CANCELLED event in the outbox. Cancelling a finished workflow raises
        InvalidTransition and changes nothing. Returns the status after the decision."""
        cid = _correlation_id(correlation_id)
        if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
            raise InputError("reason must be a text of at most 1000 characters")
        self.engine.cancel(cid, reason or None)
        return self.status(cid)

    def retry(self, correlation_id: str) -> dict[str, Any]:
        """Retry a FAILED workflow from its failed step with fresh attempts, keeping
        every completed output and the ledger; anything else raises InvalidTransition.
        Returns the status after the decision."""
        cid = _correlation_id(correlation_id)
        self.engine.retry(cid)
        return self.status(cid)

    def ledger(self, correlation_id: str) -> list[dict[str, Any]]:
        """The workflow's fuel debits: step, action, amount, created_at, usage."""
        cid = _correlation_id(correlation_id)
        self.store.get(cid)  # WorkflowNotFound for an unknown id
        return [{"step": r["step_name"], "action": r["action"], "amount": r["amount"],
                 "usage": r["usage"], "created_at": _iso(r["created_at"])}
                for r in self.store.ledger(cid)]

    def list(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Recent workflows, newest first."""
        if status is not None and status not in Status.__members__:
            raise InputError(f"unknown status {status!r}; one of: {', '.join(Status)}")
        return [status_dict(s, None) for s in self.store.list(status, limit)]

    def wait(self, correlation_id: str, timeout: float | None = None,
             until: Collection[str] = SETTLED, interval: float = 0.1,
             on_change: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the status is one of ``until``; ``on_change`` sees each new version.
        Raises TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            doc = self.status(correlation_id)
            key = (doc["version"], tuple((s["name"], s["status"], s["attempts"])
                                         for s in doc["steps"]))
            if key != seen:
                seen = key
                if on_change is not None:
                    on_change(doc)
            if doc["status"] in until:
                return doc
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"workflow {correlation_id} still {doc['status']} "
                                   f"after {timeout} s")
            time.sleep(interval)


_default: Client | None = None


def _client() -> Client:
    global _default
    if _default is None:
        _default = Client()
    return _default


def start_workflow(plan: PlanSource, input: Any = None, **kwargs: Any) -> str:
    """Start a workflow with the default client (see :meth:`Client.start`)."""
    return _client().start(plan, input, **kwargs)


def get_status(correlation_id: str) -> dict[str, Any]:
    """Status document of a workflow (see :meth:`Client.status`)."""
    return _client().status(correlation_id)


def resume_workflow(correlation_id: str, approved: bool, feedback: Any = None) -> dict[str, Any]:
    """Approve or reject a paused workflow (see :meth:`Client.resume`)."""
    return _client().resume(correlation_id, approved, feedback)


def cancel_workflow(correlation_id: str, reason: str | None = None) -> dict[str, Any]:
    """Cancel a workflow (see :meth:`Client.cancel`)."""
    return _client().cancel(correlation_id, reason)


def retry_workflow(correlation_id: str) -> dict[str, Any]:
    """Retry a FAILED workflow (see :meth:`Client.retry`)."""
    return _client().retry(correlation_id)
