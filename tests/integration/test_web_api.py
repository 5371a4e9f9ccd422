"""The HTTP API of ``chassis web`` (a real server process, PostgreSQL, Redis and a Celery
worker), through an HTTP client: every route, API keys, one client's key refused on
another's workflows, bad input refused with a clear 4xx and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from chassis import config
from chassis.api import Client
from tests.helpers import wait_until
from tests.integration.conftest import ROOT, Services, Web, Worker, start_web

pytestmark = pytest.mark.timeout(180)

PAUSING = {"name": "review-me", "start_step": "draft", "steps": {
    "draft": {"action": "echo", "params": {"text": "a draft"}, "next_step": "review"},
    "review": {"action": "pause_for_human_input", "next_step": "done"},
    "done": {"action": "complete_workflow"}}}
FAILING = {"name": "failing", "start_step": "boom", "steps": {
    "boom": {"action": "fail", "params": {"message": "boom"}, "next_step": "done"},
    "done": {"action": "complete_workflow"}}}
SAGA = {"name": "saga", "start_step": "reserve", "steps": {
    "reserve": {"action": "echo", "params": {"reserved": 1},
                "compensate": {"action": "echo", "params": {"released": 1}},
                "next_step": "review"},
    "review": {"action": "pause_for_human_input", "next_step": "done"},
    "done": {"action": "complete_workflow"}}}


@pytest.fixture(scope="module")
def web(services: Services, worker: Worker) -> Web:
    return start_web(services)


@pytest.fixture(scope="module")
def keys(web: Web) -> dict[str, str]:
    return {"acme": web.key("acme"), "beta": web.key("beta"),
            "admin": web.key("ops", admin=True)}


@pytest.fixture(scope="module")
def http(web: Web) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=web.url, timeout=30) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def start(http: httpx.Client, key: str, plan: Any = PAUSING, **body: Any) -> dict[str, Any]:
    r = http.post("/api/v1/workflows", headers=auth(key), json={"plan": plan, **body})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/api/v1/workflows/{r.json()['correlation_id']}"
    return r.json()


def wait_status(http: httpx.Client, key: str, cid: str, *statuses: str) -> dict[str, Any]:
    def now() -> dict[str, Any] | None:
        doc = http.get(f"/api/v1/workflows/{cid}", headers=auth(key)).json()
        return doc if doc["status"] in statuses else None

    return wait_until(now, timeout=60, interval=0.1, message=f"{cid} never {statuses}")


def count(services: Services) -> int:
    return len(Client(config.load(services.env), client_id="x").store.runs(limit=100_000))


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok", "checks": None}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["database"].startswith("database: ok")
    assert ready.json()["checks"]["broker"].startswith("broker: ok")


def test_not_ready_names_the_part_that_is_down(services: Services) -> None:
    web = start_web(services, CHASSIS_BROKER_URL="redis://127.0.0.1:1/0")
    r = httpx.get(f"{web.url}/readyz", timeout=30)
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable"
    assert r.json()["checks"]["broker"].startswith("broker: cannot connect to redis://")
    assert r.json()["checks"]["database"].startswith("database: ok")


def test_start_pause_approve_with_the_history_naming_the_key(
        http: httpx.Client, keys: dict[str, str]) -> None:
    me = http.get("/api/v1/me", headers=auth(keys["acme"])).json()
    assert me["client_id"] == "acme" and me["admin"] is False
    doc = start(http, keys["acme"], input={"topic": "Celery"}, fuel_budget=50)
    cid = doc["correlation_id"]
    assert doc["client_id"] == "acme" and doc["input"] == {"topic": "Celery"}
    assert doc["fuel"]["budget"] == 50
    paused = wait_status(http, keys["acme"], cid, "PAUSED_FOR_HUMAN_INPUT")
    assert paused["collected_data"]["draft"] == {"text": "a draft"}
    r = http.post(f"/api/v1/workflows/{cid}/resume", headers=auth(keys["acme"]),
                  json={"approved": True, "feedback": {"comment": "ship it"}})
    assert r.status_code == 200, r.text
    done = wait_status(http, keys["acme"], cid, "COMPLETED")
    assert done["final_result"]["human_feedback"] == {"comment": "ship it"}
    # the same answer again is no error and changes nothing
    again = http.post(f"/api/v1/workflows/{cid}/resume", headers=auth(keys["acme"]),
                      json={"approved": True, "feedback": {"comment": "ship it"}})
    assert again.status_code == 200 and again.json()["version"] == done["version"]
    events = http.get(f"/api/v1/workflows/{cid}/events", headers=auth(keys["acme"])).json()
    kinds = [e["kind"] for e in events["events"]]
    assert kinds[0] == "started" and "resumed" in kinds and kinds[-1] == "completed"
    resumed = next(e for e in events["events"] if e["kind"] == "resumed")
    assert resumed["actor"] == f"acme via key {me['key_id']}"
    assert resumed["data"]["feedback"] == {"comment": "ship it"}
    started = events["events"][0]
    assert started["actor"] == f"acme via key {me['key_id']}"
    ledger = http.get(f"/api/v1/workflows/{cid}/ledger", headers=auth(keys["acme"])).json()
    assert [e["total"] for e in ledger["entries"]] == \
        [sum(x["amount"] for x in ledger["entries"][:i + 1])
         for i in range(len(ledger["entries"]))]
    assert ledger["entries"][-1]["total"] == ledger["fuel"]["spent"] == done["fuel"]["spent"]
    plan = http.get(f"/api/v1/workflows/{cid}/plan", headers=auth(keys["acme"])).json()
    assert plan["start_step"] == "draft" and set(plan["steps"]) == {"draft", "review", "done"}


def test_an_approval_with_a_timeout_shows_when_it_expires(
        http: httpx.Client, keys: dict[str, str]) -> None:
    from chassis.web.auth import COOKIE

    expiring = json.loads(json.dumps(PAUSING))
    expiring["name"] = "expiring"
    expiring["steps"]["review"].update(timeout=86400, on_failure="done")
    cid = start(http, keys["acme"], expiring)["correlation_id"]
    doc = wait_status(http, keys["acme"], cid, "PAUSED_FOR_HUMAN_INPUT")
    review = next(s for s in doc["steps"] if s["name"] == "review")
    assert review["deadline"] and review["history"][-1]["deadline"] == review["deadline"]
    assert doc["waiting_for"].endswith(f"(it expires at {review['deadline']})")
    with httpx.Client(base_url=str(http.base_url), cookies={COOKIE: keys["acme"]},
                      timeout=30) as browser:
        inbox = browser.get("/inbox").text
        item = inbox[inbox.index(f'data-cid="{cid}"'):]
        assert 'class="expires">expires <time' in item[:item.index("</header>")]
        assert '<input type="hidden" name="step" value="review">' in item  # what was seen
        page = browser.get(f"/workflows/{cid}").text
        assert 'class="muted deadline">expires <time' in page
    # an answer to an approval no longer asked (named by its step) is refused
    r = http.post(f"/api/v1/workflows/{cid}/resume", headers=auth(keys["acme"]),
                  json={"approved": True, "step": "draft"})
    assert r.status_code == 409 and "waits at step 'review', not 'draft'" in r.text
    assert http.get(f"/api/v1/workflows/{cid}", headers=auth(keys["acme"])).json()[
        "version"] == doc["version"]
    r = http.post(f"/api/v1/workflows/{cid}/resume", headers=auth(keys["acme"]),
                  json={"approved": True, "step": "review"})
    assert r.status_code == 200, r.text


def test_an_answer_names_its_pause_a_repeat_is_recorded_once_another_is_refused(
        http: httpx.Client, keys: dict[str, str]) -> None:
    two = {"name": "two-pauses", "start_step": "first", "steps": {
        "first": {"action": "pause_for_human_input", "next_step": "second"},
        "second": {"action": "pause_for_human_input", "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    key = auth(keys["acme"])
    cid = start(http, keys["acme"], two)["correlation_id"]
    wait_status(http, keys["acme"], cid, "PAUSED_FOR_HUMAN_INPUT")
    url = f"/api/v1/workflows/{cid}/resume"
    assert http.post(url, headers=key, json={"approved": True, "step": "first"}
                     ).status_code == 200

    def at_second() -> dict[str, Any] | None:
        doc = http.get(f"/api/v1/workflows/{cid}", headers=key).json()
        return doc if doc["status"] == "PAUSED_FOR_HUMAN_INPUT" and \
            doc["current_step"] == "second" else None

    doc = wait_until(at_second, timeout=60, interval=0.1, message="never at 'second'")
    # the same answer to 'first' again (a repeated request): recorded once, no error,
    # and 'second' still waits for its own answer
    r = http.post(url, headers=key, json={"approved": True, "step": "first"})
    assert r.status_code == 200 and r.json()["current_step"] == "second", r.text
    assert r.json()["resume"] == "already recorded"
    # another answer to 'first', or one to a step never asked: refused, nothing changes
    for body in ({"approved": False, "step": "first"}, {"approved": True, "step": "draft"}):
        r = http.post(url, headers=key, json=body)
        assert r.status_code == 409 and "waits at step 'second'" in r.json()["message"]
    assert http.get(f"/api/v1/workflows/{cid}", headers=key).json()["version"] == \
        doc["version"]
    assert http.post(url, headers=key, json={"approved": True, "step": "second"}
                     ).status_code == 200
    assert wait_status(http, keys["acme"], cid, "COMPLETED", "FAILED")["status"] == \
        "COMPLETED"


def test_a_late_answer_after_an_approval_expired_is_refused_not_already_recorded(
        http: httpx.Client, keys: dict[str, str], web: Web) -> None:
    two = {"name": "expires-second", "start_step": "first", "steps": {
        "first": {"action": "pause_for_human_input", "next_step": "second"},
        "second": {"action": "pause_for_human_input", "timeout": 1, "next_step": "done"},
        "done": {"action": "complete_workflow"}}}
    key = auth(keys["acme"])
    cid = start(http, keys["acme"], two)["correlation_id"]
    url = f"/api/v1/workflows/{cid}"
    wait_status(http, keys["acme"], cid, "PAUSED_FOR_HUMAN_INPUT")
    assert http.post(f"{url}/resume", headers=key, json={"approved": True}).status_code == 200

    def expired() -> dict[str, Any] | None:  # the sweep (beat's, here by hand) expires it
        subprocess.run([sys.executable, "-m", "chassis", "sweep"], cwd=ROOT,
                       env={**os.environ, **web.env}, capture_output=True, timeout=60)
        doc = http.get(url, headers=key).json()
        return doc if doc["status"] == "FAILED" else None

    doc = wait_until(expired, timeout=60, interval=0.5, message="the approval never expired")
    assert "expired" in doc["error"]
    # 'first' was approved, but nobody answered 'second': a late approval is no repeat
    for body in ({"approved": True}, {"approved": True, "step": "second"}):
        r = http.post(f"{url}/resume", headers=key, json=body)
        assert r.status_code == 409 and "not paused" in r.json()["message"], r.text
    assert http.get(url, headers=key).json()["version"] == doc["version"]


def test_a_repeated_start_is_the_same_workflow_and_a_changed_one_conflicts(
        http: httpx.Client, keys: dict[str, str], services: Services) -> None:
    cid = str(uuid.uuid4())
    first = start(http, keys["acme"], correlation_id=cid, input={"n": 1})
    second = start(http, keys["acme"], correlation_id=cid, input={"n": 1})
    assert first["correlation_id"] == second["correlation_id"] == cid
    before = count(services)
    changed = http.post("/api/v1/workflows", headers=auth(keys["acme"]),
                        json={"plan": PAUSING, "correlation_id": cid, "input": {"n": 2}})
    assert changed.status_code == 409
    assert "exists already with another input" in changed.json()["message"]
    taken = http.post("/api/v1/workflows", headers=auth(keys["beta"]),
                      json={"plan": PAUSING, "correlation_id": cid})
    assert taken.status_code == 409 and taken.json()["error"] == "conflict"
    assert count(services) == before


def test_cancel_with_compensation_and_retry_of_a_failed_workflow(
        http: httpx.Client, keys: dict[str, str]) -> None:
    key = keys["acme"]
    cid = start(http, key, SAGA)["correlation_id"]
    wait_status(http, key, cid, "PAUSED_FOR_HUMAN_INPUT")
    r = http.post(f"/api/v1/workflows/{cid}/cancel", headers=auth(key),
                  json={"reason": "changed my mind", "compensate": True})
    assert r.status_code == 200, r.text
    done = wait_status(http, key, cid, "CANCELLED")
    undo = [s for s in done["steps"] if s["compensates"] == "reserve"]
    assert [s["status"] for s in undo] == ["COMPLETED"]
    assert done["error"] == "Workflow cancelled: changed my mind"
    twice = http.post(f"/api/v1/workflows/{cid}/cancel", headers=auth(key), json={})
    assert twice.status_code == 409 and twice.json()["error"] == "refused"

    cid = start(http, key, FAILING)["correlation_id"]
    failed = wait_status(http, key, cid, "FAILED")
    assert "boom" in failed["error"]
    r = http.post(f"/api/v1/workflows/{cid}/retry", headers=auth(key))
    assert r.status_code == 200, r.text
    again = wait_status(http, key, cid, "FAILED")
    boom = next(s for s in again["steps"] if s["name"] == "boom")
    assert boom["attempts"] == 2  # a fresh attempt ran
    retried = [e for e in http.get(f"/api/v1/workflows/{cid}/events",
                                   headers=auth(key)).json()["events"]
               if e["kind"] == "retried"]
    assert len(retried) == 1 and retried[0]["actor"].startswith("acme via key ")
    not_paused = http.post(f"/api/v1/workflows/{cid}/resume", headers=auth(key),
                           json={"approved": True})
    assert not_paused.status_code == 409


def test_list_filters_and_pages(http: httpx.Client, keys: dict[str, str],
                                web: Web) -> None:
    key = web.key("lister")
    cids = [start(http, key, PAUSING)["correlation_id"] for _ in range(5)]
    failing = start(http, key, FAILING)["correlation_id"]
    wait_status(http, key, failing, "FAILED")
    for cid in cids:
        wait_status(http, key, cid, "PAUSED_FOR_HUMAN_INPUT")
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = http.get("/api/v1/workflows", headers=auth(key), params=params).json()
        seen += [w["correlation_id"] for w in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [failing, *reversed(cids)]  # newest first, each once
    paused = http.get("/api/v1/workflows", headers=auth(key),
                      params={"status": "PAUSED_FOR_HUMAN_INPUT"}).json()["items"]
    assert {w["correlation_id"] for w in paused} == set(cids)
    by_plan = http.get("/api/v1/workflows", headers=auth(key),
                       params={"plan": "failing"}).json()["items"]
    assert [w["correlation_id"] for w in by_plan] == [failing]
    assert by_plan[0]["plan"] == "failing" and by_plan[0]["status"] == "FAILED"
    later = http.get("/api/v1/workflows", headers=auth(key),
                     params={"since": "2999-01-01"}).json()
    assert later == {"items": [], "next_cursor": None}
    # another client's list holds none of them; an admin's holds them all
    other = http.get("/api/v1/workflows", headers=auth(keys["beta"]),
                     params={"limit": 500}).json()["items"]
    assert not {w["correlation_id"] for w in other} & {failing, *cids}
    every = http.get("/api/v1/workflows", headers=auth(keys["admin"]),
                     params={"limit": 500}).json()["items"]
    assert {failing, *cids} <= {w["correlation_id"] for w in every}
    import base64

    def cursor_of(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    for bad in ({"status": "SLEEPING"}, {"limit": 0}, {"limit": 501},
                {"since": "yesterday"}, {"cursor": "bm90LWEtY3Vyc29y"},
                {"cursor": cursor_of(f"0001-01-01T00:00:00+14:00|{uuid.uuid4()}")},
                {"cursor": cursor_of(f"9999-12-31T23:59:59-14:00|{uuid.uuid4()}")},
                {"cursor": cursor_of(f"2026-01-01T00:00:00|{uuid.uuid4()}")}):
        r = http.get("/api/v1/workflows", headers=auth(key), params=bad)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"] == "invalid_input" and r.json()["message"]


def test_another_clients_key_gets_404_on_every_route_and_changes_nothing(
        http: httpx.Client, keys: dict[str, str]) -> None:
    cid = start(http, keys["acme"])["correlation_id"]
    before = wait_status(http, keys["acme"], cid, "PAUSED_FOR_HUMAN_INPUT")
    beta = auth(keys["beta"])
    for method, path, body in (
            ("GET", "", None), ("GET", "/ledger", None), ("GET", "/events", None),
            ("GET", "/plan", None), ("POST", "/resume", {"approved": True}),
            ("POST", "/cancel", {"reason": "mine"}), ("POST", "/retry", None)):
        r = http.request(method, f"/api/v1/workflows/{cid}{path}", headers=beta, json=body)
        assert r.status_code == 404, (path, r.text)
        assert r.json() == {"error": "not_found", "correlation_id": cid,
                            "message": f"no workflow with correlation_id {cid}"}
    unknown = str(uuid.uuid4())
    r = http.get(f"/api/v1/workflows/{unknown}", headers=beta)
    assert r.status_code == 404  # the same answer as for an unknown id
    after = http.get(f"/api/v1/workflows/{cid}", headers=auth(keys["acme"])).json()
    assert after["version"] == before["version"] and after["status"] == before["status"]
    # an admin key reaches it, and its answer is recorded with the admin's key
    admin = http.post(f"/api/v1/workflows/{cid}/resume", headers=auth(keys["admin"]),
                      json={"approved": False, "feedback": "not now"})
    assert admin.status_code == 200, admin.text
    wait_status(http, keys["acme"], cid, "FAILED")
    events = http.get(f"/api/v1/workflows/{cid}/events", headers=auth(keys["acme"])).json()
    rejected = next(e for e in events["events"] if e["kind"] == "rejected")
    assert rejected["actor"].startswith("ops via key ")


def test_admin_starts_for_a_client_and_others_may_not(
        http: httpx.Client, keys: dict[str, str]) -> None:
    doc = start(http, keys["admin"], client_id="beta")
    assert doc["client_id"] == "beta"
    seen = http.get(f"/api/v1/workflows/{doc['correlation_id']}", headers=auth(keys["beta"]))
    assert seen.status_code == 200
    r = http.post("/api/v1/workflows", headers=auth(keys["acme"]),
                  json={"plan": PAUSING, "client_id": "beta"})
    assert r.status_code == 403 and "only an admin key" in r.json()["message"]


def test_plans_list_show_register(http: httpx.Client, keys: dict[str, str],
                                  services: Services) -> None:
    name = f"web-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "plan": PAUSING}
    refused = http.post("/api/v1/plans", headers=auth(keys["acme"]), json=body)
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    made = http.post("/api/v1/plans", headers=auth(keys["admin"]), json=body)
    assert made.status_code == 201 and made.json()["version"] == 1
    assert made.json()["created"] is True
    same = http.post("/api/v1/plans", headers=auth(keys["admin"]), json=body)
    assert same.status_code == 200 and same.json()["created"] is False
    listed = http.get("/api/v1/plans", headers=auth(keys["acme"])).json()
    assert {"name": name, "latest": 1, "versions": 1} == \
        {k: v for k, v in next(p for p in listed if p["name"] == name).items()
         if k != "last_registered"}
    shown = http.get(f"/api/v1/plans/{name}", headers=auth(keys["acme"]),
                     params={"version": 1}).json()
    assert shown["plan"]["start_step"] == "draft"
    assert http.get(f"/api/v1/plans/{name}", headers=auth(keys["acme"]),
                    params={"version": 2}).status_code == 404
    # start it by name and by name@version: the workflow names its plan
    doc = start(http, keys["acme"], f"{name}@1")
    assert (doc["plan_name"], doc["plan_version"]) == (name, 1)
    invalid = http.post("/api/v1/plans", headers=auth(keys["admin"]), json={
        "name": f"{name}-bad", "plan": {"start_step": "a", "steps": {
            "a": {"action": "no_such_action"}}}})
    assert invalid.status_code == 422 and invalid.json()["error"] == "invalid_plan"
    assert any("no_such_action" in p for p in invalid.json()["problems"])
    assert http.get(f"/api/v1/plans/{name}-bad", headers=auth(keys["acme"])).status_code == 404


def test_bad_input_is_refused_clearly_and_writes_nothing(
        http: httpx.Client, keys: dict[str, str], services: Services) -> None:
    key = auth(keys["acme"])
    before = count(services)
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/api/v1/workflows", b'{"plan": ', 400, "not valid JSON"),
        ("POST", "/api/v1/workflows", b'[1, 2]', 422, "must be a JSON object"),
        ("POST", "/api/v1/workflows", b'', 422, "a JSON body is required"),
        ("POST", "/api/v1/workflows", {"plan": PAUSING, "colour": "red"}, 422,
         "colour: unknown field"),
        ("POST", "/api/v1/workflows", {"plan": {"start_step": "x", "steps": {}}}, 422,
         "plan is invalid"),
        ("POST", "/api/v1/workflows", {"plan": "no-such-plan"}, 404, "no registered plan"),
        ("POST", "/api/v1/workflows", {"plan": "../etc/passwd"}, 422,
         "a registered plan's name"),
        ("POST", "/api/v1/workflows", {"plan": PAUSING, "fuel_budget": 0}, 422,
         "fuel_budget"),
        ("POST", "/api/v1/workflows", {"plan": PAUSING, "fuel_budget": "10"}, 422,
         "fuel_budget"),
        ("POST", "/api/v1/workflows", {"plan": PAUSING, "correlation_id": "abc"}, 422,
         "correlation id must be a UUID"),
        ("POST", "/api/v1/workflows", {"plan": PAUSING, "input": {"a": "\u0000"}}, 422,
         "NUL"),
        ("POST", "/api/v1/workflows", b'{"plan": "x", "input": NaN}', 422, "input"),
        ("POST", "/api/v1/workflows", {"plan": PAUSING, "project_id": "x" * 300}, 422,
         "project_id"),
        ("GET", "/api/v1/workflows/not-a-uuid", None, 422, "correlation id must be a UUID"),
        ("POST", f"/api/v1/workflows/{uuid.uuid4()}/resume", {"approved": "yes"}, 422,
         "approved"),
        ("POST", f"/api/v1/workflows/{uuid.uuid4()}/resume", {}, 422, "approved: required"),
    ]
    for method, path, body, status, text in cases:
        content = body if isinstance(body, bytes) else None
        r = http.request(method, path, headers=key, content=content,
                         json=None if content is not None else body)
        assert r.status_code == status, (body, r.text)
        assert r.headers["content-type"] == "application/json"
        assert text in r.json()["message"], (body, r.json())
    too_big = http.post("/api/v1/workflows", headers=key,
                        json={"plan": PAUSING, "input": "x" * 3_000_000})
    assert too_big.status_code == 413 and too_big.json()["error"] == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        yield b'{"plan": "x", "input": "'
        for _ in range(50):
            yield b"x" * 65536
        yield b'"}'

    chunked = http.post("/api/v1/workflows", headers=key, content=chunks())
    assert chunked.status_code == 413 and chunked.json()["error"] == "too_large"

    def small() -> Iterator[bytes]:
        yield b'{"plan": '
        yield json.dumps(PAUSING).encode() + b', "colour": 1}'

    read = http.post("/api/v1/workflows", headers=key, content=small())
    assert read.status_code == 422 and "colour: unknown field" in read.json()["message"]
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    r = http.post("/api/v1/workflows", headers=key, json={"plan": PAUSING, "input": deep})
    assert r.status_code == 422, r.text
    assert "nested more than 64 levels deep" in r.json()["message"]
    assert count(services) == before


def test_keys_missing_wrong_or_revoked_get_401(http: httpx.Client, web: Web,
                                               services: Services) -> None:
    made = subprocess.run([sys.executable, "-m", "chassis", "keys", "create", "gamma",
                           "--label", "the gamma app", "--json"], cwd=ROOT,
                          env={**os.environ, **web.env},
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    key, key_id = info["key"], info["key_id"]
    assert key.startswith(f"chassis_{key_id}_") and info["client_id"] == "gamma"
    assert http.get("/api/v1/me", headers=auth(key)).status_code == 200
    listed = subprocess.run([sys.executable, "-m", "chassis", "keys", "list", "--json"],
                            cwd=ROOT, env={**os.environ, **web.env},
                            capture_output=True, text=True, timeout=60)
    row = next(k for k in json.loads(listed.stdout) if k["key_id"] == key_id)
    assert row["label"] == "the gamma app" and row["last_used_at"] is not None
    assert key not in listed.stdout  # never the secret
    before = count(services)
    for headers, text in (
            ({}, "an API key is required"),
            ({"Authorization": "Basic Zm9vOmJhcg=="}, "must be 'Bearer <API key>'"),
            (auth("chassis_000000000000_" + "A" * 43), "not valid"),
            (auth(key[:-1] + ("B" if key[-1] != "B" else "C")), "not valid")):
        r = http.post("/api/v1/workflows", headers=headers, json={"plan": PAUSING})
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert text in r.json()["message"]
    revoked = subprocess.run([sys.executable, "-m", "chassis", "keys", "revoke", key_id],
                             cwd=ROOT, env={**os.environ, **web.env},
                             capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
    r = http.get("/api/v1/me", headers=auth(key))
    assert r.status_code == 401 and "revoked" in r.json()["message"]
    # a console session of a revoked key: its pages send it to sign in, signing out works
    with httpx.Client(base_url=str(http.base_url), cookies={"chassis_session": key},
                      timeout=30) as browser:
        page = browser.get("/runs")
        assert page.status_code == 303 and page.headers["location"] == "/login"
        out = browser.post("/logout")
        assert out.status_code == 303 and 'chassis_session=""' in out.headers["set-cookie"]
    unknown = subprocess.run([sys.executable, "-m", "chassis", "keys", "revoke", "ffffffffffff"],
                             cwd=ROOT, env={**os.environ, **web.env},
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "no API key with id" in unknown.stderr
    assert count(services) == before


def test_a_key_made_to_expire_works_until_then_and_is_refused_after(
        http: httpx.Client, web: Web) -> None:
    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "chassis", "keys", *args], cwd=ROOT,
                              env={**os.environ, **web.env}, capture_output=True,
                              text=True, timeout=60)

    made = keys("create", "delta", "--expires-in", "3s", "--json")
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert info["expires_at"] and info["expired"] is False
    assert http.get("/api/v1/me", headers=auth(info["key"])).status_code == 200
    wait_until(lambda: http.get("/api/v1/me", headers=auth(info["key"])).status_code == 401,
               timeout=30, interval=0.2, message="the key never expired")
    r = http.get("/api/v1/me", headers=auth(info["key"]))
    assert "expired" in r.json()["message"]
    listed = keys("list")
    assert "(expired)" in listed.stdout and info["key_id"] in listed.stdout
    assert next(k for k in json.loads(keys("list", "--json").stdout)
                if k["key_id"] == info["key_id"])["expired"] is True
    for bad in ("0s", "-1d", "soon", "11000d", "3 fortnights", ""):
        refused = keys("create", "delta", "--expires-in", bad)
        assert refused.returncode == 2 and "a lifetime is a number" in refused.stderr, bad
    plain = json.loads(keys("create", "delta", "--json").stdout)
    assert plain["expires_at"] is None and plain["expired"] is False


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(services: Services) -> None:
    from chassis.web.auth import COOKIE

    limited = start_web(services, CHASSIS_WEB_RATE_LIMIT="3")
    one, other = limited.key("epsilon"), limited.key("zeta")
    with httpx.Client(base_url=limited.url, timeout=30) as c:
        # (3 a minute: one more every 20 s, so the requests below all fall within one)
        codes = [c.get("/api/v1/me", headers=auth(one)).status_code for _ in range(3)]
        assert codes == [200] * 3
        r = c.get("/api/v1/me", headers=auth(one))
        assert r.status_code == 429 and r.json()["error"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 20 and r.json()["retry_after"]
        assert "more than 3 requests in a minute" in r.json()["message"]
        assert c.get("/api/v1/me", headers=auth(other)).status_code == 200  # its own
        documented = c.get("/openapi.json").json()["paths"]["/api/v1/me"]["get"]
        assert "Retry-After" in documented["responses"]["429"]["headers"]
        # the console's pages (a person, by the session cookie) are not limited; the
        # API is, by whichever credential the key came with
        with httpx.Client(base_url=limited.url, cookies={COOKIE: one}, timeout=30) as page:
            assert page.get("/runs").status_code == 200
            r = page.get("/api/v1/me")
            assert r.status_code == 429 and r.json()["error"] == "rate_limited"
    helped = subprocess.run([sys.executable, "-m", "chassis", "web", "--help"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    assert "CHASSIS_WEB_RATE_LIMIT" in helped


def test_a_long_client_id_is_recorded_within_the_column(
        http: httpx.Client, web: Web) -> None:
    long = "c" * 255
    key = web.key(long)
    cid = start(http, key)["correlation_id"]
    events = http.get(f"/api/v1/workflows/{cid}/events", headers=auth(key)).json()["events"]
    assert events[0]["kind"] == "started"
    assert events[0]["actor"].startswith("c" * 230 + " via key ")
    assert len(events[0]["actor"]) <= 255


def test_the_console_cookie_needs_the_csrf_token_to_change_anything(
        http: httpx.Client, keys: dict[str, str]) -> None:
    from chassis.web.auth import COOKIE, csrf_token

    cid = start(http, keys["acme"])["correlation_id"]
    before = wait_status(http, keys["acme"], cid, "PAUSED_FOR_HUMAN_INPUT")
    cookies = {COOKIE: keys["acme"]}
    with httpx.Client(base_url=str(http.base_url), cookies=cookies, timeout=30) as browser:
        assert browser.get(f"/api/v1/workflows/{cid}").status_code == 200  # reads: fine
        r = browser.post(f"/api/v1/workflows/{cid}/resume", json={"approved": True})
        assert r.status_code == 403 and "CSRF" in r.json()["message"]
        r = browser.post(f"/api/v1/workflows/{cid}/resume", json={"approved": True},
                         headers={"X-CSRF-Token": csrf_token(keys["acme"]),
                                  "Origin": "https://evil.example"})
        assert r.status_code == 403
        after = http.get(f"/api/v1/workflows/{cid}", headers=auth(keys["acme"])).json()
        assert after["version"] == before["version"]
        odd = browser.post(f"/workflows/{cid}/resume", data={
            "decision": "approve", "add_fuel": "\u00b2", "csrf_token": csrf_token(keys["acme"])})
        assert odd.status_code == 422 and "whole number" in odd.text  # a page, no 500
        r = browser.post(f"/api/v1/workflows/{cid}/resume", json={"approved": True},
                         headers={"X-CSRF-Token": csrf_token(keys["acme"])})
        assert r.status_code == 200, r.text
    wait_status(http, keys["acme"], cid, "COMPLETED")


def test_the_console_answers_a_fuel_pause_naming_its_step(
        http: httpx.Client, keys: dict[str, str]) -> None:
    from chassis.web.auth import COOKIE, csrf_token

    hungry = {"name": "hungry", "start_step": "a", "on_budget_exhausted": "pause",
              "steps": {"a": {"action": "echo", "next_step": "b"},
                        "b": {"action": "echo", "next_step": "c"},
                        "c": {"action": "echo", "next_step": "done"},
                        "done": {"action": "complete_workflow"}}}
    cid = start(http, keys["acme"], hungry, fuel_budget=1)["correlation_id"]
    doc = wait_status(http, keys["acme"], cid, "PAUSED_FOR_HUMAN_INPUT")
    assert doc["paused_for_fuel"] and doc["current_step"] == "b"
    with httpx.Client(base_url=str(http.base_url), cookies={COOKIE: keys["acme"]},
                      timeout=30) as browser:
        for page in ("/inbox", f"/workflows/{cid}"):
            text = browser.get(page).text
            text = text[text.index(f"/workflows/{cid}/resume"):]
            assert '<input type="hidden" name="step" value="b">' in \
                text[:text.index("</form>")], page
        r = browser.post(f"/workflows/{cid}/resume", data={
            "decision": "approve", "add_fuel": "5", "step": "b", "back": "workflow",
            "csrf_token": csrf_token(keys["acme"])}, follow_redirects=False)
        assert r.status_code == 303, r.text
    done = wait_status(http, keys["acme"], cid, "COMPLETED", "FAILED")
    assert done["status"] == "COMPLETED" and done["fuel"]["budget"] == 6


def test_unknown_routes_and_methods(http: httpx.Client, keys: dict[str, str]) -> None:
    r = http.get("/api/v1/nothing-here", headers=auth(keys["acme"]))
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = http.delete("/api/v1/workflows", headers=auth(keys["acme"]))
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    page = http.get("/login")
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    spec = http.get("/openapi.json").json()
    assert {"/api/v1/workflows", "/api/v1/workflows/{correlation_id}/resume",
            "/api/v1/plans", "/healthz", "/readyz"} <= set(spec["paths"])
