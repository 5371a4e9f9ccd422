"""The web console in a real browser (issue 17): `chassis web` as a process on
PostgreSQL and Redis with a real Celery worker, Claude the fake Messages API through the
real SDK, and a headless Chromium driven by Selenium.

The blog-post plan runs until it pauses for review; a person signs in with an API key,
reads the draft in the inbox (the model's Markdown rendered, not JSON), approves it with
a comment, and watches the workflow page (which updates itself) turn COMPLETED with
every node of the plan graph green. The history records who approved, with the comment.
A cross-site form post (the session cookie, no CSRF token) is refused and changes
nothing.

The browser test needs Debian's chromium and chromium-driver (/usr/bin/chromium,
/usr/bin/chromedriver): skipped without them, failed under CI=true (Selenium is given
both paths, so Selenium Manager never downloads anything). With CHASSIS_SCREENSHOTS=1 the
screenshots of the workflow page and the inbox are written to docs/images/ (for the
README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from chassis.store.db import upgrade
from chassis.web.auth import COOKIE, csrf_token
from tests.fakes.anthropic_server import FakeAnthropic, message
from tests.helpers import require_service, wait_until
from tests.integration.conftest import Services, Worker
from tests.services import free_port

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 900)

#: The draft Claude "writes": Markdown, with HTML that must show as text.
DRAFT = """# Durable workflows, plainly

Agent pipelines fail in *boring* ways: a timeout, a **crash**, a lost message.

## What helps

- retries with backoff
- a ledger of every `fuel` charge

<script>window.injected = true</script> stays text.
"""
COMMENT = "Ship it; shorten the intro <b>please</b>."


@dataclass
class Console:
    """`chassis web` serving the console, and an API key of client acme."""

    url: str
    key: str
    key_id: str
    proc: Worker

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {self.key}"})


@pytest.fixture(scope="module")
def browser_binaries() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    require_service("Chromium and chromedriver", not missing,
                    f"{', '.join(missing)} not found (apt-get install chromium "
                    "chromium-driver)")


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        server.default = message(DRAFT, input_tokens=420, output_tokens=96)
        yield server


@pytest.fixture(scope="module")
def console(postgres_url: str, redis_url: str,
            claude: FakeAnthropic, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Console]:
    upgrade(postgres_url)
    tmp = tmp_path_factory.mktemp("console")
    env = {
        "CHASSIS_DATABASE_URL": postgres_url, "CHASSIS_BROKER_URL": redis_url,
        "CHASSIS_RESULT_BACKEND": redis_url, "CHASSIS_HOME": str(tmp / ".chassis"),
        "CHASSIS_AI_PROVIDER": "anthropic", "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": claude.url,
    }
    services = Services(env, tmp)
    services.start_worker()
    full_env = {**os.environ, **env}
    made = subprocess.run([sys.executable, "-m", "chassis", "keys", "create", "acme", "--json"],
                          cwd=tmp, env=full_env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    port = free_port()
    log = tmp / "web.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "chassis", "web", "--port", str(port)],
                                cwd=tmp, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    web = Worker(proc, log)
    services.workers.append(web)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, f"chassis web exited: {web.text()}"
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200

    wait_until(up, timeout=60, ignore=(httpx.HTTPError,),
               message=f"chassis web did not get ready: {log}")
    try:
        yield Console(url, key["key"], key["key_id"], web)
    finally:
        for w in services.workers:
            w.stop()


@pytest.fixture
def browser(browser_binaries: None, console: Console, tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--force-device-scale-factor=1",
                f"--window-size={WINDOW[0]},{WINDOW[1]}",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    # the driver given explicitly: Selenium Manager never looks for (or downloads) one
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * WINDOW[0] - inner[0], 2 * WINDOW[1] - inner[1])  # the viewport
    try:
        yield driver
    finally:
        driver.quit()


def screenshot_dir(tmp_path: Path) -> Path:
    if os.environ.get("CHASSIS_SCREENSHOTS") == "1":
        folder = ROOT / "docs" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float = 60,
             message: str = "the page did not get there") -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(
        condition, f"{message} (at {driver.current_url})")


def start_blog_post(console: Console) -> str:
    plan = yaml.safe_load((ROOT / "examples" / "blog_post.yaml").read_text())
    with console.api() as api:
        r = api.post("/api/v1/workflows",
                     json={"plan": plan, "input": {"topic": "durable workflows"}})
        assert r.status_code == 201, r.text
        cid = str(r.json()["correlation_id"])
        wait_until(lambda: api.get(f"/api/v1/workflows/{cid}").json()["status"]
                   == "PAUSED_FOR_HUMAN_INPUT", timeout=90,
                   message=f"the workflow did not pause for review: {console.proc.log}")
    return cid


def status_of(console: Console, cid: str) -> dict[str, Any]:
    with console.api() as api:
        doc: dict[str, Any] = api.get(f"/api/v1/workflows/{cid}").json()
        return doc


def events_of(console: Console, cid: str) -> list[dict[str, Any]]:
    with console.api() as api:
        events: list[dict[str, Any]] = api.get(f"/api/v1/workflows/{cid}/events") \
            .json()["events"]
        return events


def sign_in(driver: Any, console: Console) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{console.url}/login")
    driver.find_element(By.ID, "key").send_keys(console.key)
    driver.find_element(By.ID, "sign-in").click()
    wait_for(driver, lambda d: d.current_url.endswith("/runs"), 30, "not signed in")


def test_a_person_reviews_and_approves_a_draft_in_the_browser(
        console: Console, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    shots = screenshot_dir(tmp_path)
    driver = browser
    sign_in(driver, console)
    driver.execute_script("window.notReloaded = true")  # gone if the page reloads
    cid = start_blog_post(console)

    # the runs list, open meanwhile, shows it paused without a reload
    wait_for(driver, lambda d: d.find_element(
        By.CSS_SELECTOR, f"#runs tr.run[data-cid='{cid}']").get_attribute("data-status")
        == "PAUSED_FOR_HUMAN_INPUT", 30, "the runs list did not show the paused run")
    assert driver.execute_script("return window.notReloaded === true"), "reloaded"
    row = driver.find_element(By.CSS_SELECTOR, f"#runs tr.run[data-cid='{cid}']")
    assert "Blog Post Generator" in row.text and "Paused for approval" in row.text

    # the workflow page, paused: the review step amber, the others done
    driver.get(f"{console.url}/workflows/{cid}")
    status = driver.find_element(By.ID, "status")
    assert status.get_attribute("data-status") == "PAUSED_FOR_HUMAN_INPUT"
    nodes = {n.get_attribute("data-step"): n.get_attribute("data-status")
             for n in driver.find_elements(By.CSS_SELECTOR, "svg.plan-graph g.node")}
    assert nodes == {"research": "COMPLETED", "web_research": "COMPLETED",
                     "style_analysis": "COMPLETED", "generate": "COMPLETED",
                     "pause_for_review": "PAUSED", "finish": "NOT_RUN"}
    assert driver.find_elements(By.CSS_SELECTOR,
                                "#actions button[name=decision][value=approve]")
    driver.execute_script("window.notReloaded = true")  # gone if the page reloads
    workflow_tab = driver.current_window_handle

    # the inbox, in another tab: the draft rendered for a person
    driver.switch_to.new_window("tab")
    driver.get(f"{console.url}/inbox")
    item = wait_for(driver, lambda d: d.find_element(
        By.CSS_SELECTOR, f"#inbox .inbox-item[data-cid='{cid}']"), 30, "not in the inbox")
    draft = item.find_element(By.CSS_SELECTOR, ".review-item.ai[data-step='generate'] .md")
    assert draft.find_element(By.CSS_SELECTOR, "h3").text == "Durable workflows, plainly"
    assert draft.find_element(By.CSS_SELECTOR, "h4").text == "What helps"
    assert draft.find_element(By.CSS_SELECTOR, "strong").text == "crash"
    assert draft.find_element(By.CSS_SELECTOR, "em").text == "boring"
    assert [li.text for li in draft.find_elements(By.CSS_SELECTOR, "ul li")] == [
        "retries with backoff", "a ledger of every fuel charge"]
    assert "<script>window.injected = true</script> stays text." in draft.text
    assert not draft.find_elements(By.CSS_SELECTOR, "script")
    assert driver.execute_script("return window.injected === undefined")
    assert '"text"' not in item.text and "{" not in draft.text  # not JSON
    findings = item.find_element(By.CSS_SELECTOR, ".review-item[data-step='web_research']")
    assert "findings" in findings.text and "Three recent releases" in findings.text
    assert "claude-haiku" in item.find_element(By.CSS_SELECTOR, ".ai-meta").text
    driver.save_screenshot(str(shots / "console-inbox.png"))

    # approve, with a comment
    item.find_element(By.CSS_SELECTOR, "textarea[name=comment]").send_keys(COMMENT)
    item.find_element(By.CSS_SELECTOR, "button[name=decision][value=approve]").click()
    flash = wait_for(driver, lambda d: d.find_element(By.ID, "flash"), 30, "no confirmation")
    assert "Approved" in flash.text
    assert not driver.find_elements(By.CSS_SELECTOR, f".inbox-item[data-cid='{cid}']")

    # the workflow page, left open, updates itself to COMPLETED: every node green
    driver.close()
    driver.switch_to.window(workflow_tab)
    wait_for(driver, lambda d: d.find_element(By.ID, "status").get_attribute("data-status")
             == "COMPLETED", 60, "the workflow page did not turn COMPLETED")
    assert driver.execute_script("return window.notReloaded === true"), "reloaded"
    assert driver.find_element(By.ID, "status").text == "Completed"
    graph_nodes = driver.find_elements(By.CSS_SELECTOR, "svg.plan-graph g.node")
    assert {n.get_attribute("data-step") for n in graph_nodes} == set(nodes)
    for node in graph_nodes:
        assert node.get_attribute("data-status") == "COMPLETED", node.get_attribute("data-step")
        assert "tone-done" in (node.get_attribute("class") or "")
        stroke = driver.execute_script(
            "return getComputedStyle(arguments[0].querySelector('rect')).stroke", node)
        assert stroke == "rgb(26, 127, 55)", stroke  # green
    assert not driver.find_elements(By.ID, "actions")  # nothing left to decide
    assert driver.find_element(By.ID, "other-data").text.count("Ship it") == 1
    resumed_row = driver.find_element(By.CSS_SELECTOR, "#events tr[data-kind='resumed']")
    assert f"acme via key {console.key_id}" in resumed_row.text
    driver.get(f"{console.url}/workflows/{cid}")  # a fresh load, for the picture
    wait_for(driver, lambda d: d.find_element(By.ID, "status").get_attribute("data-status")
             == "COMPLETED", 10)
    driver.save_screenshot(str(shots / "console-workflow.png"))

    # the history: who approved, with the comment (exactly once)
    resumed = [e for e in events_of(console, cid) if e["kind"] == "resumed"]
    assert len(resumed) == 1, resumed
    assert resumed[0]["actor"] == f"acme via key {console.key_id}"
    assert resumed[0]["data"]["feedback"] == {"comment": COMMENT}
    assert status_of(console, cid)["collected_data"]["human_feedback"] == {"comment": COMMENT}


def test_a_cross_site_form_post_is_refused_and_changes_nothing(console: Console) -> None:
    cid = start_blog_post(console)
    with httpx.Client(base_url=console.url, cookies={COOKIE: console.key},
                      timeout=30) as session:
        assert session.get(f"/workflows/{cid}").status_code == 200  # the cookie works
        no_token = session.post(f"/workflows/{cid}/resume",
                                data={"decision": "approve", "comment": "forged"},
                                headers={"Origin": "https://evil.example"})
        assert no_token.status_code == 403, no_token.text
        assert "CSRF" in no_token.text
        no_token_same_site = session.post(f"/workflows/{cid}/resume",
                                          data={"decision": "approve"})
        assert no_token_same_site.status_code == 403, no_token_same_site.text
        wrong_origin = session.post(
            f"/workflows/{cid}/resume", headers={"Origin": "https://evil.example"},
            data={"decision": "approve", "csrf_token": csrf_token(console.key)})
        assert wrong_origin.status_code == 403, wrong_origin.text
        cancel = session.post(f"/workflows/{cid}/cancel", data={"compensate": "1"})
        assert cancel.status_code == 403, cancel.text
    doc = status_of(console, cid)
    assert doc["status"] == "PAUSED_FOR_HUMAN_INPUT"
    assert "human_feedback" not in doc["collected_data"]
    kinds = [e["kind"] for e in events_of(console, cid)]
    assert not {"resumed", "rejected", "cancelled"} & set(kinds), kinds

    # the same forms with their token, from the site itself, are done (or refused in words)
    with httpx.Client(base_url=console.url, cookies={COOKIE: console.key},
                      timeout=30) as session:
        token = csrf_token(console.key)
        rejected = session.post(f"/workflows/{cid}/resume", headers={"Origin": console.url},
                                data={"decision": "reject", "comment": "not this time",
                                      "csrf_token": token})
        assert rejected.status_code == 303, rejected.text
        assert rejected.headers["location"] == f"/workflows/{cid}?done=rejected"
        assert status_of(console, cid)["status"] == "FAILED"
        refused = session.post(f"/workflows/{cid}/cancel", headers={"Origin": console.url},
                               data={"csrf_token": token})
        assert refused.status_code == 409, refused.text
        assert "Not done:" in refused.text and "Traceback" not in refused.text
        assert 'id="retry-form"' in refused.text  # a FAILED workflow offers a retry
    events = [e for e in events_of(console, cid) if e["kind"] in ("resumed", "rejected")]
    assert [(e["kind"], e["data"]["feedback"]) for e in events] == [
        ("rejected", {"comment": "not this time"})]


def test_unknown_and_signed_out_pages(console: Console) -> None:
    with httpx.Client(base_url=console.url, timeout=30) as anonymous:
        r = anonymous.get("/inbox")
        assert r.status_code == 303 and r.headers["location"] == "/login"
    with httpx.Client(base_url=console.url, cookies={COOKIE: console.key},
                      timeout=30) as session:
        missing = session.get(f"/workflows/{uuid.uuid4()}")
        assert missing.status_code == 404 and "<html" in missing.text
        partial = session.get("/runs?partial=1")
        assert partial.status_code == 200 and "<html" not in partial.text
