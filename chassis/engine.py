"""The executor: carries out the coordinator's decisions with the store and Celery.

A step's way through here costs one broker hop (the next step's task) and two database
transactions: the claim (the step run becomes RUNNING, attempt counted) and the
transition (output recorded, next step priced, debited and dispatched, all at once).
Messages are sent only after the transaction that decided them has committed.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, chord

from chassis import actions
from chassis import coordinator as co
from chassis.celery_conf import step_task_for, subtask_task_for
from chassis.plan import Plan
from chassis.state import StepStatus, WorkflowState
from chassis.store import SqlStore
from chassis.store.sql import now

log = logging.getLogger(__name__)

JOIN_TASK = "chassis.join"
FANOUT_TASK = "chassis.fanout"


def run_action(payload: dict[str, Any]) -> co.StepSucceeded | co.StepFailed:
    """Run the payload's action; any exception becomes a failure carrying its message."""
    step = payload["step"]
    try:
        fn = actions.get(payload["action"])
        return co.StepSucceeded(step, co.json_roundtrip(fn(payload["data"], payload["params"])))
    except Exception as exc:  # noqa: BLE001  (a raised exception fails the workflow)
        message = str(exc) or type(exc).__name__
        log.warning("step %s failed: %s", step, message,
                    extra={"correlation_id": payload["cid"], "step": step})
        return co.StepFailed(step, message)


class Engine:
    """Starts, advances and resumes workflows; ``app`` is the Celery app that sends tasks.

    ``in_worker``: chords are built here only inside a worker. Elsewhere (an app using
    the API) a fan-out is handed to a worker by one small task, because Celery's Redis
    backend would subscribe the sending process to every sub-task's result.
    """

    def __init__(self, store: SqlStore, app: Celery, *, in_worker: bool = True) -> None:
        self.store = store
        self.app = app
        self.in_worker = in_worker

    # -------------------------------------------------------------- transitions

    def create(self, decision: co.Decision, plan: Plan, **plan_ref: Any) -> bool:
        """Persist a new workflow's Start decision, then send what it calls for."""
        created = self.store.create(decision, plan, **plan_ref)
        if created:
            self.dispatch(decision)
        return created

    def apply(self, cid: str, event: co.Event,
              state: WorkflowState | None = None) -> co.Decision:
        """Apply one event durably, then send what it calls for."""
        decision = self.store.transition(cid, lambda s, p: co.decide(s, p, event), state)
        if decision.changed:
            self.dispatch(decision)
        return decision

    def run_step(self, payload: dict[str, Any], task_id: str | None) -> None:
        """Body of the ``chassis.step`` task."""
        cid, step = payload["cid"], payload["step"]
        # the worker's log context (tasks/log_context.py) already carries cid/step/task
        claim = self.store.claim(cid, step, task_id)
        if claim is None:
            log.info("step %s already finished: duplicate delivery ignored", step)
            return
        log.debug("step %s attempt %d", step, claim[0])
        self.apply(cid, run_action(payload), claim[1])

    def run_subtask(self, payload: dict[str, Any], task_id: str | None) -> dict[str, Any]:
        """Body of ``chassis.subtask``: no transaction of its own; its result (with its
        start time) goes to the chord callback, which records all sub-tasks at once."""
        started = now().isoformat()
        event = run_action(payload)
        if isinstance(event, co.StepFailed):
            return {"step": event.step, "error": event.error, "started_at": started}
        return {"step": event.step, "output": event.output, "started_at": started}

    def resume(self, cid: str, approved: bool, feedback: Any = None) -> co.Decision:
        """Approve (feedback kept as human_feedback) or reject a paused workflow.
        Raises WorkflowNotFound or InvalidTransition, having changed nothing."""
        return self.apply(cid, co.Resume(approved, feedback))

    def join(self, cid: str, step: str, results: list[dict[str, Any]]) -> None:
        """Body of the chord callback: record every sub-task's output and continue."""
        outputs = {r["step"]: r.get("output") for r in results if "error" not in r}
        errors = {r["step"]: r["error"] for r in results if "error" in r}
        started = {r["step"]: r["started_at"] for r in results if r.get("started_at")}
        self.apply(cid, co.SubtasksSucceeded(step, outputs, errors, started))

    # -------------------------------------------------------------- sending

    def dispatch(self, decision: co.Decision) -> None:
        """Send the Celery tasks a committed decision calls for."""
        s = decision.state
        for c in decision.commands:
            if isinstance(c, co.RunStep):
                self.app.send_task(step_task_for(c.action), args=[message(s, c)],
                                   task_id=c.request_id, ignore_result=True,
                                   argsrepr=_repr(s, c), kwargsrepr="{}")
            elif isinstance(c, co.RunFanOut) and not self.in_worker:
                self.app.send_task(FANOUT_TASK, args=[s.correlation_id, c.step],
                                   ignore_result=True)
            elif isinstance(c, co.RunFanOut):
                self._chord(s, c)
            if isinstance(c, co.RunStep | co.RunFanOut):
                log.debug("dispatched %s", c.step,
                          extra={"correlation_id": s.correlation_id, "step": c.step})

    def _chord(self, s: WorkflowState, c: co.RunFanOut) -> None:
        header = [self.app.signature(subtask_task_for(t.action), args=[message(s, t)],
                                     options={"task_id": t.request_id,
                                              "argsrepr": _repr(s, t), "kwargsrepr": "{}"})
                  for t in c.subtasks]
        body = self.app.signature(JOIN_TASK, args=[s.correlation_id, c.step],
                                  options={"ignore_result": True})
        chord(header, app=self.app)(body)

    def fan_out(self, cid: str, step: str) -> None:
        """Body of ``chassis.fanout``: send the chord of a fan-out decided elsewhere,
        unless its sub-tasks are already under way (a duplicate delivery)."""
        state = self.store.get(cid)
        plan = self.store.get_plan(cid)
        runs = {r["step_name"]: r for r in self.store.steps(cid) if r["parent_step"] == step}
        todo = tuple(co.RunStep(t.step_name, t.resolved_action, dict(t.params),
                                r["request_id"], parent_step=step)
                     for t in plan.steps[step].sub_tasks
                     if (r := runs.get(t.step_name)) and not t.topic)
        if todo and all(runs[t.step]["status"] == StepStatus.DISPATCHED for t in todo):
            self._chord(state, co.RunFanOut(step, todo))
        else:
            log.info("fan-out %s already under way: duplicate ignored", step,
                     extra={"correlation_id": cid, "step": step})


def _repr(s: WorkflowState, c: co.RunStep) -> str:
    """What Flower and the logs show for a step task (Celery would repr the whole payload,
    collected data included, on every send)."""
    return f"({s.correlation_id}/{c.step}: {c.action})"


def message(s: WorkflowState, c: co.RunStep) -> dict[str, Any]:
    """The task payload of one step: what it runs and the data it sees."""
    return {"cid": s.correlation_id, "step": c.step, "action": c.action, "params": c.params,
            "data": s.step_data(), "parent": c.parent_step}


