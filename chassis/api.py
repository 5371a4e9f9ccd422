"""The public Python API for other apps: start a workflow, read its status, resume,
cancel or retry it.

Enqueueing needs only the database and broker URLs (the environment, or arguments),
never the user's action code::

    from chassis.api import Client
    client = Client(client_id="acme")
    cid = client.start("examples/blog_post.yaml", {"topic": "Celery"})
    client.wait(cid)
    client.resume(cid, approved=True, feedback={"ok": True})
"""

from __future__ import annotations

import copy
import secrets
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from celery import Celery
from opentelemetry import trace

from chassis import actions, config, pricing, tracing, validation
from chassis import coordinator as co
from chassis.celery_conf import celery_settings
from chassis.engine import Engine
from chassis.errors import (
    InputError,
    InvalidTransition,
    PlanFileError,
    PlanNotFound,
    WorkflowConflict,
    WorkflowNotFound,
)
from chassis.fuel import DEFAULT_FUEL
from chassis.limits import DEFAULT as DEFAULT_LIMITS
from chassis.limits import INT32_MAX, Limits, check_count, check_json, check_name, check_text
from chassis.plan import PAUSE, Plan, load_plan, parse_plan, plan_to_dict
from chassis.registry import NAME_RE, PlanRegistry, parse_ref
from chassis.state import SETTLED, Status, WorkflowState
from chassis.status import _iso, status_dict
from chassis.store import SqlStore
from chassis.store.db import make_engine
from chassis.store.quotas import WINDOWS, QuotaRace
from chassis.store.sql import StaleState

PlanSource = Plan | Mapping[str, Any] | str | Path


def _budget(value: object) -> int:
    """A fuel budget: a whole number from 1 to 2147483647 (the column's range)."""
    try:
        return check_count(value, "fuel budget")
    except InputError:
        raise InputError(f"fuel budget must be a positive integer from 1 to {INT32_MAX}, "
                         f"got {str(value)[:30]!r}") from None


def _correlation_id(value: object) -> str:
    if value is None:
        return str(uuid.uuid4())
    try:
        return str(uuid.UUID(str(value)[:100]))
    except ValueError:
        raise InputError(f"correlation id must be a UUID, got {str(value)[:60]!r}") from None


def _optional_name(value: object, what: str) -> str | None:
    return None if value is None or value == "" else check_name(value, what)


def resolve_plan(source: PlanSource, registry: PlanRegistry | None = None) -> Plan:
    """A plan from a Plan, a mapping, a JSON/YAML file path or, given ``registry``, a
    registered plan's ``name`` (latest version) or ``name@version``. An existing file
    wins over a registered name."""
    return _resolve(source, registry)[0]


def _resolve(source: PlanSource, registry: PlanRegistry | None,
             limits: Limits = DEFAULT_LIMITS) -> tuple[Plan, str | None, int | None]:
    """(plan, registered name, version); name and version are None for a file."""
    if isinstance(source, Plan):
        return source, None, None
    if isinstance(source, Mapping):
        return parse_plan(dict(source), limits), None, None
    path = Path(source)
    if path.exists():
        return load_plan(path, limits), None, None
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
    """Talks to the store and the broker for one client; one per app and client is
    plenty (it is thread-safe).

    ``client_id`` (default CHASSIS_CLIENT_ID, else ``local``): the client this one acts
    for. Another client's workflow does not exist for it: reading, resuming, cancelling
    or retrying it raises :class:`~chassis.errors.WorkflowNotFound`, as an unknown id
    would. ``in_worker``: True inside a Celery worker (an unreachable service is waited
    for; see :class:`chassis.engine.Engine`).
    """

    def __init__(self, settings: config.Settings | None = None, *,
                 app: Celery | None = None, in_worker: bool = False,
                 client_id: str | None = None) -> None:
        self.settings = settings or config.load()
        self.client_id = check_name(client_id if client_id is not None
                                    else self.settings.client_id, "client_id").strip()
        self.limits = self.settings.limits
        if app is None:
            app = Celery("agentchassis-client", set_as_current=False)
            app.conf.update(celery_settings(self.settings))
        self.app = app
        pricing.configure(self.settings)  # (the coordinator prices AI steps with these)
        self.store = SqlStore(make_engine(self.settings.database_url))
        self.engine = Engine(self.store, app, self.settings, in_worker=in_worker)
        self.registry = PlanRegistry(self.store.engine)
        self.admin = False
        self.by: str | None = None

    def acting_as(self, client_id: str, *, admin: bool = False,
                  by: str | None = None) -> Client:
        """This client's store, broker and registry, acting for ``client_id`` (cheap:
        nothing is opened). ``admin``: every client's workflows are in its reach (it
        starts for ``client_id`` unless told another). ``by``: who acts, recorded in
        the event history instead of the client (e.g. ``acme via key 3f9a...``)."""
        other = copy.copy(self)
        other.client_id = check_name(client_id, "client_id").strip()
        other.admin, other.by = admin, by
        return other

    @property
    def _acts_for(self) -> str | None:
        """The client a command is checked against (None: an admin, any workflow)."""
        return None if self.admin else self.client_id

    def start(self, plan: PlanSource, input: Any = None, *, client_id: str | None = None,
              fuel_budget: object = DEFAULT_FUEL, correlation_id: str | None = None,
              project_id: str | None = None, request_id: str | None = None,
              known_actions: Collection[str] | None = None, check_actions: bool = True,
              plan_name: str | None = None, plan_version: int | None = None,
              traceparent: str | None = None) -> str:
        """Start a workflow for ``client_id`` (default: this client's) and return its
        correlation_id. Bad input raises before anything is written.

        Starting an id that exists with the same plan, input and budget (a repeated
        request) returns it and changes nothing; an id another client uses, or the same
        id with another plan, input or budget, raises
        :class:`~chassis.errors.WorkflowConflict`. An unreachable broker raises
        :class:`~chassis.errors.BrokerUnavailable` (with ``correlation_id``) after the
        workflow is recorded: it starts by itself once the broker is back, and starting
        the same id again is safe.

        ``plan`` is a Plan, a mapping, a file, or a registered name (``name@N`` for a
        given version); the workflow stores a snapshot of the plan it started with.

        ``check_actions=False`` accepts actions this process does not know (the
        worker has them); ``known_actions`` adds names to the registry's.

        Traced (OTEL_TRACES_EXPORTER set), the workflow's root span starts here, a child
        of ``traceparent`` (a W3C trace context the start request came with) if given.
        """
        actor = self.client_id if client_id is None else client_id
        if not isinstance(actor, str) or not actor.strip():
            raise InputError("client_id is required to execute a workflow "
                             "(pass client_id=..., or --client on the command line)")
        actor = check_name(actor.strip(), "client_id")
        budget = _budget(fuel_budget)
        cid = _correlation_id(correlation_id)
        project_id = _optional_name(project_id, "project_id")
        request_id = _optional_name(request_id, "request_id")
        input = check_json(input, "input", self.limits)
        p, name, version = _resolve(plan, self.registry, self.limits)
        if name is not None and plan_name is None:
            plan_name, plan_version = name, version
        known = set(actions.registered()) | set(known_actions or ())
        if not check_actions:
            known |= {s.action for s in p.steps.values()}
            known |= {t.resolved_action for s in p.steps.values() for t in s.sub_tasks}
            known |= {c.action for c in p.compensations()}
        validation.check(p, known)
        if traceparent is not None and not isinstance(traceparent, str):
            raise InputError(f"traceparent must be text (a W3C trace context), got "
                             f"{type(traceparent).__name__}")
        root, traceparent = tracing.start_workflow(
            cid, plan_name or p.name, actor, traceparent or tracing.caller())
        try:
            with trace.use_span(root, record_exception=False, set_status_on_exception=False):
                created = self._start(cid, actor, p, input, budget, project_id, request_id,
                                      plan_name, plan_version, traceparent)
        except BaseException as exc:
            tracing.end(root, exc)
            raise
        if created:  # (a repeated start: its span is dropped, never ended nor sent)
            tracing.end(root)
        return cid

    def _start(self, cid: str, actor: str, p: Plan, input: Any, budget: int,
               project_id: str | None, request_id: str | None, plan_name: str | None,
               plan_version: int | None, traceparent: str | None) -> bool:
        state = WorkflowState(correlation_id=cid, client_id=actor,
                              status=Status.RUNNING, current_step=p.start_step,
                              fuel_budget=budget, initial_request_data=input,
                              project_id=project_id, request_id=request_id,
                              nonce=secrets.token_hex(16), traceparent=traceparent)
        for _ in range(20):
            decision = co.decide(state, p, co.Start(self.by))
            try:
                created = self.engine.create(decision, p, plan_name=plan_name,
                                             plan_version=plan_version)
            except QuotaRace:  # the first step's charge met the client's quota: decide
                state.quota = self.store.quota(actor)  # again, knowing what is left
                continue
            if not created:
                self._same_start(cid, actor, p, input, budget)
            return created
        raise StaleState(f"workflow {cid}: too much contention on client {actor!r}'s "
                         "quota; nothing was written, try again", correlation_id=cid)

    def _same_start(self, cid: str, actor: str, plan: Plan, input: Any, budget: int) -> None:
        """The workflow exists: a repeat of the same start, or a conflict."""
        existing = self.store.get(cid)
        if existing.client_id != actor:
            raise WorkflowConflict(f"correlation id {cid} is already in use; start with "
                                   "another one (or none)", correlation_id=cid)
        differs = [what for what, same in (
            ("plan", plan_to_dict(self.store.get_plan(cid)) == plan_to_dict(plan)),
            ("input", existing.initial_request_data == input),
            ("fuel budget", existing.fuel_budget == budget)) if not same]
        if differs:
            raise WorkflowConflict(
                f"workflow {cid} exists already with another {' and '.join(differs)}: "
                "starting it again must repeat the same request (or use another id)",
                correlation_id=cid)

    def start_request(self, request: Mapping[str, Any]) -> str:
        """Start the registered plan a Kafka start request names (the ``chassis.start``
        task's payload: plan, version, input, correlation_id, client_id, project_id,
        request_id, fuel_budget). Idempotent by correlation_id."""
        if not isinstance(request, Mapping):
            raise InputError("a start request must be a JSON object")
        missing = [k for k in ("plan", "correlation_id", "client_id") if not request.get(k)]
        if missing:
            raise InputError(f"the start request needs {', '.join(missing)}")
        version = request.get("version")
        if version is not None:
            version = check_count(version, "version")
        found = self.registry.get(check_name(request["plan"], "plan"), version)
        return self.start(found.plan, request.get("input"), client_id=request["client_id"],
                          fuel_budget=request.get("fuel_budget") or DEFAULT_FUEL,
                          correlation_id=request["correlation_id"],
                          project_id=request.get("project_id"),
                          request_id=request.get("request_id"), check_actions=False,
                          plan_name=found.name, plan_version=found.version)

    def _own(self, correlation_id: str) -> str:
        """The workflow's id, when this client owns it (WorkflowNotFound otherwise)."""
        cid = _correlation_id(correlation_id)
        owner = self.store.owner(cid)
        if owner is None or (owner != self.client_id and not self.admin):
            raise WorkflowNotFound(co.not_found(cid), correlation_id=cid)
        return cid

    def status(self, correlation_id: str) -> dict[str, Any]:
        """The workflow's status document (raises WorkflowNotFound)."""
        cid = self._own(correlation_id)
        return status_dict(*self.store.snapshot(cid))

    def resume(self, correlation_id: str, approved: bool, feedback: Any = None,
               add_fuel: object = 0, step: str | None = None) -> dict[str, Any]:
        """Approve or reject a paused workflow; returns its status after the decision.
        ``add_fuel``: fuel added to its budget first (a workflow paused for fuel goes
        on with it). ``step``: the step whose approval this answers, as the person saw
        it; refused (StepMismatch, an InvalidTransition) when the workflow now waits at
        another (that approval expired, or was answered, and another is asked).

        The same answer given again, once recorded (a repeated command), changes nothing
        and returns the status with ``"resume": "already recorded"`` (with ``step``: the
        answer recorded for that step's latest pause; an approval that expired has none,
        and the answer to a pause for fuel is not kept as a pause's record, so a late
        or repeated one of those is refused); resuming a workflow that is not paused
        otherwise raises InvalidTransition."""
        cid = _correlation_id(correlation_id)
        if not isinstance(approved, bool):
            raise InputError(f"approved must be true or false, got {approved!r}"[:80])
        feedback = check_json(feedback, "feedback", self.limits)
        added = 0 if add_fuel is None or (type(add_fuel) is int and add_fuel == 0) \
            else check_count(add_fuel, "fuel to add")
        step = None if step is None else check_name(step, "step")
        try:
            self.engine.resume(cid, approved, feedback, self._acts_for, added, by=self.by,
                               step=step)
        except InvalidTransition:
            # the same answer given again is no error (of the pause named, when one
            # is: another answer, or none as it expired, is refused); one that adds
            # fuel is no repeat
            if added or self._answered(cid, step) is not approved:
                raise
            return {**self.status(cid), "resume": "already recorded"}
        return self.status(cid)

    def _answered(self, cid: str, step: str | None = None) -> bool | None:
        """The answer recorded for the workflow's latest pause (of ``step``), if any."""
        pauses = [r for r in self.store.steps(cid)
                  if r["action"] == PAUSE and (step is None or r["step_name"] == step)]
        if not pauses:
            return None
        out = max(pauses, key=lambda r: r["id"])["output"]  # (expired: no answer)
        answer = out.get("approved") if isinstance(out, dict) else None
        return answer if isinstance(answer, bool) else None

    def cancel(self, correlation_id: str, reason: str | None = None,
               compensate: bool = False) -> dict[str, Any]:
        """Cancel a workflow that has not finished: in-flight attempts are revoked
        (terminated on the prefork pool), late results ignored, status CANCELLED, a
        WORKFLOW_CANCELLED event in the outbox. With ``compensate``, its completed steps
        that have a ``compensate`` are undone first (COMPENSATING, then CANCELLED).
        Cancelling a finished (or compensating) workflow raises InvalidTransition and
        changes nothing. Returns the status after the decision."""
        cid = _correlation_id(correlation_id)
        if reason is not None:
            reason = check_text(reason, "reason")
        if not isinstance(compensate, bool):
            raise InputError(f"compensate must be true or false, got {compensate!r}"[:80])
        self.engine.cancel(cid, reason or None, self._acts_for, compensate, by=self.by)
        return self.status(cid)

    def retry(self, correlation_id: str) -> dict[str, Any]:
        """Retry a FAILED workflow from its failed step with fresh attempts, keeping
        every completed output and the ledger; anything else raises InvalidTransition.
        Returns the status after the decision."""
        cid = _correlation_id(correlation_id)
        self.engine.retry(cid, self._acts_for, by=self.by)
        return self.status(cid)

    def events(self, correlation_id: str) -> list[dict[str, Any]]:
        """The workflow's event history, oldest first: each ``{at, kind, step, attempt,
        actor, version, data}`` (``actor``: the client that asked, or the worker that ran
        an attempt; ``version``: the workflow version its transition wrote)."""
        cid = self._own(correlation_id)
        return [{"at": _iso(r["at"]), "kind": r["kind"], "step": r["step"],
                 "attempt": r["attempt"], "actor": r["actor"], "version": r["version"],
                 "data": r["data"]} for r in self.store.events(cid)]

    def add_fuel(self, correlation_id: str, amount: object) -> dict[str, Any]:
        """Add ``amount`` fuel (a whole number from 1) to the budget of a workflow that
        has not finished, or of a FAILED one; returns its status. A workflow paused for
        fuel goes on once approved (:meth:`resume`)."""
        cid = _correlation_id(correlation_id)
        amount = check_count(amount, "fuel to add")
        self.engine.apply(cid, co.AddFuel(amount, self._acts_for, self.by))
        return self.status(cid)

    def set_quota(self, client: str, fuel: object, per: str) -> dict[str, Any]:
        """Give ``client`` a quota of ``fuel`` per ``per`` (day, month or total; UTC
        windows), replacing any it had; returns :meth:`quota`. Every charge of its
        workflows counts against it from then on."""
        who = check_name(client, "client")
        amount = check_count(fuel, "quota fuel", least=0)
        if per not in WINDOWS:
            raise InputError(f"a quota is per day, month or total, got {str(per)[:40]!r}")
        self.store.set_quota(who, per, amount)
        return self.quota(who)

    def quota(self, client: str) -> dict[str, Any]:
        """``client``'s quota: {client_id, per, fuel, used, held, left}: ``used`` spent
        in the current window, ``held`` by its AI attempts under way, ``left`` = fuel -
        used - held (all None when it has none)."""
        who = check_name(client, "client")
        q = self.store.quota(who)
        if q is None:
            return {"client_id": who, "per": None, "fuel": None, "used": None, "held": None,
                    "left": None}
        return {"client_id": who, "per": q.per, "fuel": q.fuel, "used": q.used,
                "held": q.held, "left": q.left}

    def remove_quota(self, client: str) -> bool:
        """Remove ``client``'s quota; False when it had none."""
        return self.store.remove_quota(check_name(client, "client"))

    @staticmethod
    def fuel_prices() -> dict[str, Any]:
        """The token prices in force (CHASSIS_FUEL_PRICES, or the defaults), and the
        table price of every other action."""
        from chassis import fuel

        table, tiers = pricing.in_force()
        return {**table.as_dict(), "tiers": dict(tiers), "actions": dict(fuel.COST_TABLE)}

    def ledger(self, correlation_id: str) -> list[dict[str, Any]]:
        """The workflow's fuel ledger, oldest row first: kind (debit, reserve, settle,
        release), step, action, amount (what the row charges: their sum is the spent
        fuel), held (what it holds, + or -: their sum is the fuel reserved), model,
        input_tokens and output_tokens (None when the row has no usage), usage and
        created_at."""
        cid = self._own(correlation_id)
        return [{"kind": r.get("kind") or "debit", "step": r["step_name"],
                 "action": r["action"], "amount": r["amount"], "held": r.get("held") or 0,
                 "model": r.get("model"), **_tokens(r["usage"]), "usage": r["usage"],
                 "created_at": _iso(r["created_at"])}
                for r in self.store.ledger(cid)]

    def fuel_report(self, client: str | None = None,
                    since: datetime | date | str | None = None) -> list[dict[str, Any]]:
        """Fuel spent by client, plan, model and day (UTC), oldest day first, every
        client's unless ``client`` is given (an unknown one: an empty report). Each
        entry: client_id, plan and model ("-" for none), day (YYYY-MM-DD), spent (the
        sum of the rows' amounts), rows, and the tokens input_tokens, output_tokens,
        cache_creation_input_tokens, cache_read_input_tokens. ``since``: rows from
        then on (a datetime, a date, or text YYYY-MM-DD or ISO 8601; no zone: UTC)."""
        from chassis.store.reports import fuel_report

        who = None if client is None else check_name(client, "client")
        return fuel_report(self.store.engine, who, parse_since(since))

    def list(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """This client's recent workflows, newest first."""
        if status is not None and status not in Status.__members__:
            raise InputError(f"unknown status {str(status)[:40]!r}; one of: "
                             f"{', '.join(Status)}")
        limit = check_count(limit, "limit", most=10_000)
        return [status_dict(s, None) for s in self.store.list(status, limit, self.client_id)]

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


def _tokens(usage: Any) -> dict[str, int | None]:
    """A ledger row's input and output tokens, from its usage (None: not a count)."""
    got = usage if isinstance(usage, dict) else {}
    return {k: v if isinstance(v, int) and not isinstance(v, bool) else None
            for k in ("input_tokens", "output_tokens") for v in [got.get(k)]}


def parse_since(value: datetime | date | str | None) -> datetime | None:
    """An aware datetime from a datetime, a date (its midnight, UTC), or text: a date
    YYYY-MM-DD or an ISO 8601 timestamp. No zone means UTC. Else InputError."""
    if value is None:
        return None
    try:
        if isinstance(value, str) and len(value) <= 64:
            value = datetime.fromisoformat(value.strip())
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
        if isinstance(value, date):
            return datetime(value.year, value.month, value.day, tzinfo=UTC)
    except (ValueError, OverflowError):
        pass
    raise InputError("since must be a date (YYYY-MM-DD) or an ISO 8601 timestamp, got "
                     f"{str(value)[:40]!r}")


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


def resume_workflow(correlation_id: str, approved: bool, feedback: Any = None,
                    add_fuel: object = 0, step: str | None = None) -> dict[str, Any]:
    """Approve or reject a paused workflow (see :meth:`Client.resume`)."""
    return _client().resume(correlation_id, approved, feedback, add_fuel=add_fuel,
                            step=step)


def cancel_workflow(correlation_id: str, reason: str | None = None,
                    compensate: bool = False) -> dict[str, Any]:
    """Cancel a workflow (see :meth:`Client.cancel`)."""
    return _client().cancel(correlation_id, reason, compensate)


def retry_workflow(correlation_id: str) -> dict[str, Any]:
    """Retry a FAILED workflow (see :meth:`Client.retry`)."""
    return _client().retry(correlation_id)
