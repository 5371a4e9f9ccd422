"""The chaos run: start the cases, answer their pauses, inject the faults, wait for every
workflow to settle, and check each against its model."""

from __future__ import annotations

import json
import random
import signal
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from chaos.cluster import Cluster
from chaos.model import Case, make_cases
from chassis import config
from chassis.api import Client
from chassis.errors import ChassisError, InvalidTransition
from chassis.state import Status
from chassis.store.tables import orchestrator_state, outbox

FINAL = {s.value for s in Status if s.finished}
#: Fault kinds; those marked Kafka need it.
FAULTS = ("worker_kill", "worker_child", "worker_term", "redis_restart", "postgres_restart",
          "duplicate_task", "bridge_kill", "relay_kill", "agent_kill", "duplicate_answer",
          "revoke")
KAFKA_FAULTS = {"bridge_kill", "relay_kill", "agent_kill", "duplicate_answer"}


@dataclass
class Report:
    seed: int
    workflows: int
    faults: Counter[str] = field(default_factory=Counter)
    violations: dict[str, list[str]] = field(default_factory=dict)
    stuck: list[int] = field(default_factory=list)
    settle_seconds: float = 0.0
    seconds: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    crashed: Counter[str] = field(default_factory=Counter)
    """Processes that exited by themselves (restarted, as a supervisor would)."""
    first: dict[str, int] = field(default_factory=dict)
    """The first case of each kind of violation (its index)."""
    revoked: int = 0
    """Attempts recorded as failed by a revoke through Celery (``revoke`` faults that
    took: the others came after their attempt had ended, or were lost with Redis)."""

    def add(self, kind: str, case: Case, text: str) -> None:
        self.violations.setdefault(kind, []).append(f"case {case.index}: {text}")
        self.first.setdefault(kind, case.index)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.stuck


def cid_of(seed: int, index: int) -> str:
    """A workflow's id, the same for the same seed and case (a rerun finds it)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"chaos:{seed}:{index}"))


class Run:
    def __init__(self, seed: int, workflows: int, faults: int, kafka: bool = True,
                 concurrency: int = 60, only: list[int] | None = None,
                 folder: Path | None = None, timeout: float | None = None,
                 kinds: tuple[str, ...] | None = None, log: Any = print) -> None:
        self.seed, self.faults_wanted, self.kafka = seed, faults, kafka
        cases = make_cases(seed, workflows, kafka)
        self.cases = [c for c in cases if only is None or c.index in only]
        self.concurrency = concurrency
        self.folder = folder or Path(tempfile.mkdtemp(prefix="chaos-"))
        self.timeout = timeout or 300 + 0.6 * len(self.cases)
        allowed = kinds or FAULTS
        self.kinds = [k for k in allowed if kafka or k not in KAFKA_FAULTS]
        self.rng = random.Random(seed * 7919 + 1)
        self.report = Report(seed, len(self.cases))
        self.log = log
        self.cluster = Cluster(self.folder, kafka)
        self.cids: dict[int, str] = {}
        self.answered: set[int] = set()
        self.settled: set[int] = set()
        """Cases whose workflow reached a final status."""
        self.restarts: list[tuple[float, str]] = []
        self.last_fault_at: float | None = None
        """When the last fault was done, or the last service it took down came back."""

    # --------------------------------------------------------------------- run

    def run(self) -> Report:
        started = time.monotonic()
        try:
            self.cluster.start()
            settings = config.load(self.cluster.env)
            self.client = Client(settings, client_id="chaos", in_worker=False)
            self.engine = self.client.store.engine
            self._drive(started)
            self._check()
        finally:
            self.cluster.stop()
        self.report.seconds = time.monotonic() - started
        return self.report

    def _drive(self, started: float) -> None:
        waiting = list(self.cases)
        open_: dict[int, Case] = {}
        deadline = started + self.timeout
        # faults about a second apart, the starts spread over as long: the faults land
        # on work under way, not on a finished run
        gap = 1.0
        next_fault = time.monotonic() + gap
        start_every = self.faults_wanted * gap / max(1, len(self.cases))
        next_start = time.monotonic()
        injected = 0
        last_progress = last_settled = time.monotonic()
        while (waiting or open_) and time.monotonic() < deadline:
            while waiting and len(open_) < self.concurrency and \
                    time.monotonic() >= next_start:
                next_start += start_every
                case = waiting[0]
                if not self._start(case):
                    break
                waiting.pop(0)
                open_[case.index] = case
            statuses = self._statuses([self.cids[i] for i in open_])
            for index, case in list(open_.items()):
                status = statuses.get(self.cids[index])
                if status == Status.PAUSED_FOR_HUMAN_INPUT.value and index not in self.answered:
                    self._answer(case)
                if status in FINAL:
                    self.settled.add(index)
                    del open_[index]
                    last_progress = last_settled = time.monotonic()
            now = time.monotonic()
            if injected < self.faults_wanted and now >= next_fault:
                if self._fault():
                    injected += 1
                    next_fault = now + self.rng.uniform(0.5, 1.5) * gap
                else:  # not doable now (PostgreSQL down, nothing to duplicate): another
                    next_fault = now + 0.2
            for at, name in list(self.restarts):
                if now >= at:
                    self.restarts.remove((at, name))
                    self._bring_back(name)
            self._supervise()
            if now - last_progress > 15:
                last_progress = now
                self.log(f"  {len(self.settled)} settled, {len(open_)} open, {len(waiting)} to "
                         f"start, {injected} faults")
            time.sleep(0.05)
        for _at, name in sorted(self.restarts):
            self._bring_back(name)
        if self.last_fault_at is not None:
            self.report.settle_seconds = max(0.0, last_settled - self.last_fault_at)
        self.report.stuck = sorted(open_) + sorted(c.index for c in waiting)

    def _start(self, case: Case) -> bool:
        cid = self.cids.setdefault(case.index, cid_of(self.seed, case.index))
        try:
            self.client.start(case.plan, case.input, correlation_id=cid, fuel_budget=10_000,
                              check_actions=False)
        except ChassisError as exc:
            if getattr(exc, "recorded", False):
                return True  # saved: it goes on once the broker is back
            return False  # the database is down: later
        except Exception:  # noqa: BLE001  (a service restarting: try again later)
            return False
        return True

    def _statuses(self, cids: list[str]) -> dict[str, str]:
        if not cids:
            return {}
        t = orchestrator_state.c
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(t.correlation_id, t.status)
                                    .where(t.correlation_id.in_(cids))).all()
        except Exception:  # noqa: BLE001  (PostgreSQL stopped: nothing learnt now)
            return {}
        return {str(r.correlation_id): r.status for r in rows}

    def _answer(self, case: Case) -> None:
        cid = self.cids[case.index]
        if case.answer == "expire":  # nobody answers: the sweep expires the approval
            self.answered.add(case.index)
            return
        try:
            if case.answer == "cancel":
                self.client.cancel(cid, "chaos", compensate=True)
            else:
                self.client.resume(cid, case.answer == "approve",
                                   {"by": "chaos"} if case.answer == "approve" else None)
        except InvalidTransition:
            pass  # answered already (a repeated answer)
        except ChassisError as exc:
            if not getattr(exc, "recorded", False):
                return  # not recorded: answered again next turn
        except Exception:  # noqa: BLE001  (a service restarting)
            return
        self.answered.add(case.index)

    # ------------------------------------------------------------------ faults

    def _fault(self) -> bool:
        """Do one fault; False when it could not be done (it is not counted)."""
        down = {name for _, name in self.restarts}
        kinds = [k for k in self.kinds if not (k == "postgres_restart" and "postgres" in down)]
        kind = self.rng.choice(kinds)
        workers = [n for n in self.cluster.procs if n.startswith("worker")]
        worker = self.rng.choice([w for w in workers if w not in down] or workers)
        self.report.faults[kind] += 1
        self.last_fault_at = time.monotonic()
        try:
            if kind == "worker_kill":
                self.cluster.kill(worker)
                self._later(worker)
            elif kind == "worker_child":
                if worker == "worker_coordinator" or not self.cluster.kill_pool_child(worker):
                    self.report.faults[kind] -= 1
                    self.report.faults["worker_kill"] += 1
                    self.cluster.kill(worker)
                    self._later(worker)
            elif kind == "worker_term":
                self.cluster.kill(worker, signal.SIGTERM)
                self._later(worker)
            elif kind == "redis_restart":
                self.cluster.restart_redis()
            elif kind == "postgres_restart":
                self.cluster.stop_postgres()
                self._later("postgres")
            elif kind in ("bridge_kill", "relay_kill", "agent_kill"):
                name = kind.split("_")[0]
                self.cluster.kill(name)
                self._later(name)
            elif kind == "duplicate_task":
                if not self._duplicate_task():
                    self.report.faults[kind] -= 1
                    return False
            elif kind == "duplicate_answer":
                if not self._duplicate_answer():
                    self.report.faults[kind] -= 1
                    return False
            elif kind == "revoke":
                if not self._revoke():
                    self.report.faults[kind] -= 1
                    return False
        except Exception as exc:  # noqa: BLE001  (a fault that could not be done)
            self.report.faults[kind] -= 1
            self.log(f"  fault {kind} could not be done now: {str(exc).splitlines()[0]}")
            return False
        return True

    def _supervise(self) -> None:
        """Restart a process that exited by itself, as a supervisor would (systemd,
        compose's ``restart: unless-stopped``); counted in the report."""
        down = {name for _, name in self.restarts}
        for name, p in self.cluster.procs.items():
            if name not in down and not p.alive:
                self.report.crashed[name] += 1
                self.log(f"  {name} exited by itself: restarted (see {p.log})")
                self.restarts.append((time.monotonic() + 0.5, name))

    def _later(self, name: str) -> None:
        self.restarts.append((time.monotonic() + self.rng.uniform(0.2, 3.0), name))

    def _bring_back(self, name: str) -> None:
        try:
            if name == "postgres":
                self.cluster.start_postgres()
            else:
                self.cluster.restart(name)
            self.last_fault_at = time.monotonic()
        except Exception as exc:  # noqa: BLE001
            self.log(f"  {name} did not come back at once ({exc}); trying again")
            self.restarts.append((time.monotonic() + 1.0, name))

    def _some_case(self, kinds: tuple[str, ...]) -> tuple[Case, str] | None:
        started = [c for c in self.cases if c.index in self.cids]
        self.rng.shuffle(started)
        for case in started:
            for name, kind in zip(case.plan["steps"], case.kinds, strict=False):
                if kind in kinds:
                    return case, name
        return None

    def _duplicate_task(self) -> bool:
        """Deliver a Celery step task again (the same attempt, the same task id)."""
        found = self._some_case(("ok", "flaky"))
        if found is None:
            return False
        case, step = found
        cid = self.cids[case.index]
        s = self.client.store.get(cid)
        spec = case.plan["steps"][step]
        payload = {"cid": cid, "step": step, "action": spec["action"],
                   "params": spec["params"], "parent": None, "attempt": 1, "timeout": None}
        self.client.app.send_task("chassis.step", args=[payload], task_id=s.rid(step, 1),
                                  queue="chassis.steps")
        return True

    def _revoke(self) -> bool:
        """Revoke a step's tasks through Celery, terminating the one that runs (as
        ``celery control revoke --terminate`` or Flower would): each attempt it reaches
        is a failed attempt. It targets ``onfail`` steps, whose attempts all fail anyway,
        so the model holds whichever attempts it reaches: what is checked is that a
        revoked attempt is recorded once, as failed, and the workflow goes on."""
        started = [c for c in self.cases if c.index in self.cids
                   and c.index not in self.settled and "onfail" in c.kinds]
        if not started:
            return False
        case = self.rng.choice(started)
        step = next(name for name, kind in zip(case.plan["steps"], case.kinds, strict=False)
                    if kind == "onfail")
        s = self.client.store.get(self.cids[case.index])
        attempts = case.plan["steps"][step]["retry"]["max_attempts"]
        self.client.app.control.revoke([s.rid(step, a) for a in range(1, attempts + 1)],
                                       terminate=True)
        return True

    def _duplicate_answer(self) -> bool:
        """An agent's answer delivered (again): the same answer, on the response topic."""
        found = self._some_case(("agent",))
        if found is None:
            return False
        case, step = found
        cid = self.cids[case.index]
        rid = self.client.store.get(cid).rid(step, 1)
        from confluent_kafka import Producer

        p = Producer({"bootstrap.servers": self.cluster.bootstrap})
        answer = {"success": True, "data": case.expect.outputs.get(step) or
                  {"tag": f"{case.index}:{step}", "case": case.index}, "error": None}
        p.produce("system.responses.chaos", key=cid, value=json.dumps(answer).encode(),
                  headers=[("correlation_id", cid.encode()), ("causation_id", rid.encode()),
                           ("client_id", b"chaos")])
        return p.flush(10) == 0

    # ------------------------------------------------------------------- check

    def _check(self) -> None:
        for case in self.cases:
            cid = self.cids.get(case.index)
            if cid is None or case.index in self.report.stuck:
                continue
            try:
                self._check_case(case, cid)
            except Exception as exc:  # noqa: BLE001  (a check that cannot be made)
                self.report.add("unreadable", case, f"{type(exc).__name__}: {exc}")

    def _check_case(self, case: Case, cid: str) -> None:
        r, e = self.report, case.expect
        doc = self.client.status(cid)
        r.statuses[doc["status"]] += 1
        if doc["status"] != e.status:
            r.add("wrong_status", case, f"{doc['status']}, the model says {e.status} "
                                        f"(error {doc['error']!r})")
            return
        if e.error and e.error not in (doc["error"] or ""):
            r.add("wrong_status", case, f"error {doc['error']!r}, the model says {e.error!r}")
        steps = {s["name"]: s for s in doc["steps"]}
        r.revoked += sum(1 for s in doc["steps"] for a in s.get("history") or ()
                         if "through Celery" in (a["error"] or ""))
        for name, attempts in e.attempts.items():
            got = steps.get(name)
            if got is None:
                r.add("lost", case, f"step {name} never ran")
            elif got["attempts"] != attempts:
                r.add("wrong_records", case, f"step {name}: {got['attempts']} attempts, the "
                                             f"model says {attempts}")
        ran = {n for n in steps if "/" not in n}
        extra = ran - set(e.attempts)
        if extra:
            r.add("wrong_records", case, f"steps ran that the model says must not: "
                                         f"{sorted(extra)}")
        data = doc["collected_data"]
        for name, output in e.outputs.items():
            if data.get(name) != output:
                r.add("wrong_records", case, f"output of {name}: {data.get(name)!r}, the "
                                             f"model says {output!r}")
        undone = sorted((s for s in doc["steps"] if s["compensates"]),
                        key=lambda s: s["finished_at"] or "")
        if [s["name"] for s in undone] != e.compensations:
            r.add("compensation", case, f"compensations {[s['name'] for s in undone]}, the "
                                        f"model says {e.compensations}")
        for s in undone:
            if s["attempts"] != 1 or s["status"] != "COMPLETED":
                r.add("compensation", case, f"{s['name']}: {s['attempts']} attempts, "
                                            f"{s['status']}")
        events = self.client.events(cid)
        succeeded = Counter(ev["step"] for ev in events if ev["kind"] == "succeeded")
        twice = sorted(n for n, k in succeeded.items() if k > 1)
        if twice:
            r.add("duplicated", case, f"recorded twice: {twice}")
        ledger = self.client.ledger(cid)
        total = sum(row["amount"] for row in ledger)
        if not total == doc["fuel"]["spent"] == e.fuel:
            r.add("fuel", case, f"ledger {total}, spent {doc['fuel']['spent']}, the model "
                                f"says {e.fuel}")
        if doc["fuel"]["reserved"]:
            r.add("fuel", case, f"{doc['fuel']['reserved']} fuel still held")
        open_steps = [s["name"] for s in doc["steps"]
                      if s["status"] in ("RUNNING", "DISPATCHED", "SCHEDULED", "AWAITING")]
        if open_steps:
            r.add("stuck_steps", case, f"steps not finished: {open_steps}")
        if self.kafka:
            self._check_outbox(case, cid)

    def _check_outbox(self, case: Case, cid: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(outbox.c.id, outbox.c.published_at)
                                    .where(outbox.c.correlation_id == cid)
                                    .order_by(outbox.c.id)).all()
            unpublished = [row.id for row in rows if row.published_at is None]
            if not unpublished or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if unpublished:
            self.report.add("outbox", case, f"{len(unpublished)} outbox rows never published")
        times = [row.published_at for row in rows if row.published_at is not None]
        if times != sorted(times):
            self.report.add("outbox", case, "outbox rows published out of order")


__all__ = ["FAULTS", "Report", "Run"]
