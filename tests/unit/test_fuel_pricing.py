"""Token prices, escrow, quotas in decisions and pausing for fuel: pure, no I/O."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chassis import coordinator as co
from chassis import pricing
from chassis.errors import ConfigError, InvalidTransition
from chassis.plan import Plan, Step, SubTask, parse_plan
from chassis.state import Quota, Status, WorkflowState

pytestmark = pytest.mark.timeout(30)

CID = "5b0c3c5e-8f3a-4f0e-9a51-2f7d7c1e0a11"


def state(step: str, fuel: int = 1000) -> WorkflowState:
    return WorkflowState(correlation_id=CID, client_id="acme", status=Status.RUNNING,
                         current_step=step, fuel_budget=fuel)


def of(d: co.Decision, kind: type) -> list[Any]:
    return [c for c in d.commands if isinstance(c, kind)]


def ledger_ok(decisions: list[co.Decision]) -> None:
    """The ledger's amounts add up to spent, its holds to what is reserved."""
    rows = [c for d in decisions for c in of(d, co.Debit)]
    last = decisions[-1].state
    assert sum(r.amount for r in rows) == last.fuel_spent
    assert sum(r.held for r in rows) == last.fuel_reserved


# ------------------------------------------------------------------------ prices


def test_the_default_table_prices_tokens_with_a_floor() -> None:
    haiku = pricing.DEFAULT_PRICES["haiku"]
    # 4000 in at 1000/M + 3000 out at 5000/M = 4 + 15 = 19
    assert haiku.of({"input_tokens": 4000, "output_tokens": 3000}) == 19
    assert haiku.of({"input_tokens": 21, "output_tokens": 5}) == 10  # the floor
    assert haiku.of({"input_tokens": 0, "output_tokens": 0}) == 0  # nothing answered
    assert haiku.of(None) == 10  # unknown: the floor
    # cache writes at 1250/M and reads at 100/M: 0.8M written + 1M read = 1000 + 100
    assert haiku.of({"input_tokens": 0, "output_tokens": 0,
                     "cache_creation_input_tokens": 800_000,
                     "cache_read_input_tokens": 1_000_000}) == 1100
    assert haiku.worst_case(2048, 0) == 11  # 2048 x 5000/M = 10.24, rounded up
    assert haiku.worst_case(10, 0) == 10


def test_models_are_priced_by_family_and_unknown_ones_as_the_dearest() -> None:
    assert pricing.resolve("ai_text_generate", {"model": "opus"})[1] == \
        pricing.DEFAULT_PRICES["opus"]
    model, price = pricing.resolve("ai_text_generate", {"model": "claude-sonnet-4-5"})
    assert (model, price) == ("claude-sonnet-4-5", pricing.DEFAULT_PRICES["sonnet"])
    assert pricing.resolve("ai_text_generate_claude_haiku", {})[1] == \
        pricing.DEFAULT_PRICES["haiku"]
    assert pricing.resolve("ai_text_generate", {"model": "mystery-1"})[1] == \
        pricing.DEFAULT_PRICES["opus"]


def test_a_price_file_overrides_families_and_model_ids(tmp_path: Path) -> None:
    f = tmp_path / "prices.yaml"
    f.write_text("models:\n  haiku: {input: 2000}\n  claude-opus-4-1: {output: 75000}\n")
    table = pricing.load_prices(str(f))
    assert table.entries["haiku"].input == 2000
    assert table.entries["haiku"].output == 5000  # what it does not say: the default
    assert table.price("claude-opus-4-1")[1].output == 75000
    assert table.price("claude-opus-4-1")[1].floor == 50  # from its family
    assert table.price("claude-opus-4-5")[1].output == 25000


@pytest.mark.parametrize(("text", "says"), [
    ("models:\n  gpt-4: {input: 1}\n", "unknown model 'gpt-4'"),
    ("models:\n  haiku: {input: -1}\n", "models.haiku.input must be a whole number"),
    ("models:\n  haiku: {input: 1.5}\n", "models.haiku.input must be a whole number"),
    ("models:\n  haiku: {input: true}\n", "models.haiku.input must be a whole number"),
    ("models:\n  haiku: {inptu: 1}\n", "unknown field(s) inptu"),
    ("models:\n  haiku: []\n", "models.haiku must be a mapping"),
    ("prices: {}\n", "a price file is a mapping with one key, models"),
    ("models: [unclosed\n", "not JSON or YAML"),
    ("models:\n  haiku: !!python/object:os.system {}\n", "not JSON or YAML"),
])
def test_a_bad_price_file_is_refused_saying_why(tmp_path: Path, text: str, says: str) -> None:
    f = tmp_path / "prices.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        pricing.load_prices(str(f))
    assert says in str(e.value)
    assert str(f) in str(e.value)


def test_settings_refuse_a_missing_price_file(tmp_path: Path) -> None:
    from chassis import config

    with pytest.raises(ConfigError, match="CHASSIS_FUEL_PRICES: .*no such file"):
        config.load({"CHASSIS_FUEL_PRICES": str(tmp_path / "nope.yaml"),
                     "CHASSIS_HOME": str(tmp_path)})


# ------------------------------------------------------------------------ escrow


def ai_plan(**params: Any) -> Plan:
    return Plan("write", {
        "write": Step("ai_text_generate_claude_haiku", params={"prompt": "Hi", **params},
                      next_step="done"),
        "done": Step("complete_workflow")})


def test_an_ai_step_reserves_its_worst_case_then_settles_and_releases() -> None:
    plan = ai_plan(max_tokens=4000)  # 4000 x 5000/M = 20, plus the prompt's estimate: 21
    start = co.decide(state("write"), plan, co.Start())
    [reserve] = of(start, co.Debit)
    assert (reserve.kind, reserve.amount, reserve.held, reserve.model) == (
        "reserve", 0, 21, "claude-haiku-5-5")
    assert start.state.fuel_reserved == 21 and start.state.fuel_spent == 0
    assert start.state.fuel_remaining == 1000 - 21
    assert start.charged == 21
    usage = {"input_tokens": 4000, "output_tokens": 3000}  # 19
    done = co.decide(start.state, plan, co.StepSucceeded(
        "write", {"text": "t", "usage": usage}, 1))
    settle, release, complete = of(done, co.Debit)
    assert (settle.kind, settle.amount, settle.held, settle.usage) == ("settle", 19, -19, usage)
    assert (release.kind, release.amount, release.held) == ("release", 0, -2)
    assert (complete.kind, complete.amount) == ("debit", 1)
    assert done.state.status is Status.COMPLETED
    assert done.state.fuel_spent == 20 and done.state.fuel_reserved == 0
    assert (done.charged, done.released, done.forced) == (1, -2, 0)
    ledger_ok([start, done])


def test_an_attempt_that_used_more_than_it_held_is_charged_all_of_it() -> None:
    plan = ai_plan(max_tokens=10)  # the floor: 10
    start = co.decide(state("write"), plan, co.Start())
    done = co.decide(start.state, plan, co.StepSucceeded(
        "write", {"text": "t", "usage": {"input_tokens": 30_000, "output_tokens": 10}}, 1))
    settle = of(done, co.Debit)[0]
    assert (settle.amount, settle.held) == (31, -10)  # 30 + 0.05 rounded up; 10 held
    assert done.forced == 21
    ledger_ok([start, done])


def test_failed_attempts_settle_what_they_consumed_and_retries_reserve_again() -> None:
    plan = parse_plan({"start_step": "write", "steps": {
        "write": {"action": "ai_text_generate_claude_haiku", "params": {"prompt": "Hi"},
                  "retry": {"max_attempts": 3, "initial_interval": 0.01}}}})
    start = co.decide(state("write"), plan, co.Start())
    api_error = co.decide(start.state, plan, co.StepFailed(
        "write", "Claude API error 500", 1, ("ClaudeAPIError",),
        {"input_tokens": 0, "output_tokens": 0}))
    settle, release, reserve = of(api_error, co.Debit)
    assert (settle.amount, release.held, reserve.kind) == (0, -11, "reserve")
    unknown = co.decide(api_error.state, plan, co.StepFailed("write", "timed out", 2,
                                                             ("AttemptTimeout",)))
    assert of(unknown, co.Debit)[0].amount == 10  # unknown consumption: the floor
    ledger_ok([start, api_error, unknown])


def test_a_deferred_attempt_spends_no_attempt_and_nothing() -> None:
    plan = parse_plan({"start_step": "write", "steps": {
        "write": {"action": "ai_text_generate_claude_haiku", "params": {"prompt": "Hi"},
                  "retry": {"max_attempts": 1}}}})
    d = co.decide(state("write"), plan, co.Start())
    decisions = [d]
    for attempt in range(1, 6):  # five deferrals of a step allowed one attempt
        d = co.decide(d.state, plan, co.StepFailed(
            "write", "the circuit breaker is open", attempt, ("AttemptDeferred",),
            {"input_tokens": 0, "output_tokens": 0}, retry_after=30.0))
        decisions.append(d)
        assert d.retries("write")
        [later] = of(d, co.ScheduleStep)  # 30 s: kept for the sweep
        assert later.delay == 30.0
    assert d.state.status is not Status.FAILED
    assert d.state.fuel_spent == 0
    ledger_ok(decisions)


def test_cancel_settles_attempts_under_way_at_the_floor() -> None:
    plan = ai_plan()
    start = co.decide(state("write"), plan, co.Start())
    cancel = co.decide(start.state, plan, co.Cancel("stop"))
    settle, release = of(cancel, co.Debit)
    assert (settle.amount, release.held) == (10, -1)
    assert cancel.state.fuel_reserved == 0
    ledger_ok([start, cancel])


def test_a_fan_out_of_ai_sub_tasks_reserves_all_or_nothing() -> None:
    plan = Plan("fan", {"fan": Step("fan_out", sub_tasks=(
        SubTask("a", action="ai_text_generate_claude_haiku", params={"prompt": "x"}),
        SubTask("b", action="ai_text_generate_claude_haiku", params={"prompt": "y"})))})
    short = co.decide(state("fan", fuel=20), plan, co.Start())  # 5 + 11 + 11 > 20
    assert short.state.status is Status.FAILED
    assert short.state.error == ("insufficient fuel for action 'fan_out': have 20, need 27")
    ok = co.decide(state("fan", fuel=27), plan, co.Start())
    assert [c.kind for c in of(ok, co.Debit)] == ["debit", "reserve", "reserve"]
    assert ok.state.fuel_remaining == 0


def test_agents_keep_the_table_price() -> None:
    plan = Plan("w", {"w": Step("ai_text_generate_claude_opus", topic="agents.opus")})
    d = co.decide(state("w"), plan, co.Start())
    assert [(c.kind, c.amount) for c in of(d, co.Debit)] == [("debit", 50)]


# ------------------------------------------------------------------------ quotas


def test_a_quota_refuses_what_it_has_not_left() -> None:
    plan = Plan("a", {"a": Step("web_search", next_step="b"), "b": Step("web_search")})
    s = state("a")
    s.quota = Quota("acme", "day", 30, 4)
    d = co.decide(s, plan, co.Start())
    assert d.state.status is Status.FAILED
    assert d.state.error == ("quota exceeded for client 'acme': action 'web_search' needs 5, "
                             "4 left of 30 per day")
    assert d.charged == 0


# ------------------------------------------------------------------------ pausing


def pausing_plan() -> Plan:
    return parse_plan({"on_budget_exhausted": "pause", "start_step": "a", "steps": {
        "a": {"action": "echo", "next_step": "b"},
        "b": {"action": "web_search", "next_step": "done"},
        "done": {"action": "complete_workflow"}}})


def test_out_of_fuel_pauses_with_a_notification_and_goes_on_with_more() -> None:
    plan = pausing_plan()
    start = co.decide(state("a", fuel=3), plan, co.Start())
    paused = co.decide(start.state, plan, co.StepSucceeded("a", {}, 1))
    s = paused.state
    assert s.status is Status.PAUSED_FOR_HUMAN_INPUT and s.current_step == "b"
    assert s.budget_wait is not None and s.budget_wait["needed"] == 5
    [note] = of(paused, co.Emit)
    assert note.payload["event_type"] == "WORKFLOW_PAUSED_FOR_BUDGET"
    assert (note.payload["needed"], note.payload["available"]) == (5, 2)
    # approving without fuel: paused again, asking the same
    again = co.decide(s, plan, co.Resume(True))
    assert again.state.status is Status.PAUSED_FOR_HUMAN_INPUT
    more = co.decide(again.state, plan, co.AddFuel(20))
    assert more.state.fuel_budget == 23 and more.state.status is Status.PAUSED_FOR_HUMAN_INPUT
    go = co.decide(more.state, plan, co.Resume(True))
    assert go.state.status is Status.RUNNING and go.state.budget_wait is None
    assert [c.step for c in of(go, co.RunStep)] == ["b"]


def test_a_rejection_fails_with_the_original_message() -> None:
    plan = pausing_plan()
    start = co.decide(state("a", fuel=3), plan, co.Start())
    paused = co.decide(start.state, plan, co.StepSucceeded("a", {}, 1))
    no = co.decide(paused.state, plan, co.Resume(False, add_fuel=0))
    assert no.state.status is Status.FAILED
    assert no.state.error == "insufficient fuel for action 'web_search': have 2, need 5"


def test_resume_can_add_fuel_and_fuel_cannot_be_added_to_a_finished_workflow() -> None:
    plan = pausing_plan()
    start = co.decide(state("a", fuel=3), plan, co.Start())
    paused = co.decide(start.state, plan, co.StepSucceeded("a", {}, 1))
    go = co.decide(paused.state, plan, co.Resume(True, add_fuel=10))
    assert go.state.fuel_budget == 13 and go.state.status is Status.RUNNING
    done = co.decide(go.state, plan, co.StepSucceeded("b", {}, 1))
    assert done.state.status is Status.COMPLETED
    with pytest.raises(InvalidTransition, match="already COMPLETED"):
        co.decide(done.state, plan, co.AddFuel(5))
    with pytest.raises(InvalidTransition, match="would exceed"):
        co.decide(paused.state, plan, co.AddFuel(2**31 - 1))


def test_plans_accept_only_fail_or_pause() -> None:
    from chassis.errors import PlanError

    with pytest.raises(PlanError) as e:
        parse_plan({"on_budget_exhausted": "wait", "start_step": "a",
                    "steps": {"a": {"action": "echo"}}})
    assert "on_budget_exhausted: must be fail or pause, got 'wait'" in e.value.problems


# ------------------------------------------------------------------ review findings


def test_an_ai_compensation_is_settled_and_a_compensated_workflow_holds_nothing() -> None:
    plan = parse_plan({"start_step": "a", "steps": {
        "a": {"action": "echo", "next_step": "b",
              "compensate": {"action": "ai_text_generate_claude_haiku",
                             "params": {"prompt": "undo", "max_tokens": 100}}},
        "b": {"action": "fail"}}})
    d0 = co.decide(state("a"), plan, co.Start())
    d1 = co.decide(d0.state, plan, co.StepSucceeded("a", {}, 1))
    d2 = co.decide(d1.state, plan, co.StepFailed("b", "boom", 1))
    assert d2.state.status is Status.COMPENSATING and d2.state.fuel_reserved == 10
    d3 = co.decide(d2.state, plan, co.StepSucceeded(
        "a/compensate", {"text": "undone", "usage": {"input_tokens": 5, "output_tokens": 5}},
        1))
    assert d3.state.status is Status.COMPENSATED
    assert d3.state.fuel_reserved == 0 and d3.state.holds == {}
    assert [c.kind for c in of(d3, co.Debit)] == ["settle"]  # the floor: all it held
    ledger_ok([d0, d1, d2, d3])


def test_settle_and_release_keys_cannot_be_another_steps() -> None:
    plan = Plan("w", {"w": Step("ai_text_generate_claude_haiku", params={"prompt": "p"},
                                next_step="w:settle"),
                      "w:settle": Step("complete_workflow")})
    start = co.decide(state("w"), plan, co.Start())
    done = co.decide(start.state, plan, co.StepSucceeded(
        "w", {"usage": {"input_tokens": 1, "output_tokens": 1}}, 1))
    keys = [c.key for d in (start, done) for c in of(d, co.Debit)]
    assert keys == [f"{CID}:w", f"{CID}:w/settle", f"{CID}:w/release", f"{CID}:w:settle"]
    assert done.state.status is Status.COMPLETED


def test_an_agent_cannot_defer_its_attempt_to_escape_the_retry_policy() -> None:
    plan = parse_plan({"start_step": "w", "steps": {
        "w": {"action": "work", "topic": "agents.w", "retry": {"max_attempts": 1}}}})
    d = co.decide(state("w"), plan, co.Start())
    rid = d.state.awaited_steps[0]
    d = co.decide(d.state, plan, co.ResponseReceived(rid, False, error="later",
                                                     error_type="AttemptDeferred"))
    assert d.state.status is Status.FAILED


@pytest.mark.parametrize("seconds", [float("inf"), 1e12, float("nan"), -5.0])
def test_a_deferral_waits_at_most_a_day(seconds: float) -> None:
    plan = ai_plan()
    d = co.decide(state("write"), plan, co.Start())
    d = co.decide(d.state, plan, co.StepFailed("write", "later", 1, ("AttemptDeferred",),
                                               {"input_tokens": 0, "output_tokens": 0},
                                               retry_after=seconds))
    delays = [c.delay for c in d.commands if isinstance(c, co.ScheduleStep | co.RunStep)]
    assert len(delays) == 1 and 0.0 <= delays[0] <= co.MAX_DEFERRAL


def test_a_cancelled_workflow_is_no_longer_paused_for_fuel() -> None:
    plan = pausing_plan()
    start = co.decide(state("a", fuel=3), plan, co.Start())
    paused = co.decide(start.state, plan, co.StepSucceeded("a", {}, 1))
    assert paused.state.budget_wait is not None
    cancelled = co.decide(paused.state, plan, co.Cancel("no"))
    assert cancelled.state.status is Status.CANCELLED
    assert cancelled.state.budget_wait is None


def test_price_file_families_are_matched_whatever_their_case(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("models:\n  Sonnet: {output: 1}\n")
    assert pricing.load_prices(str(f)).price("claude-sonnet-4-5")[1].output == 1
    twice = tmp_path / "twice.yaml"  # (a file is read once per process)
    twice.write_text("models:\n  Sonnet: {output: 1}\n  sonnet: {output: 2}\n")
    with pytest.raises(ConfigError, match="given twice"):
        pricing.load_prices(str(twice))


def test_a_clients_settings_choose_the_prices(tmp_path: Path) -> None:
    from chassis import config

    f = tmp_path / "p.json"
    f.write_text('{"models": {"haiku": {"output": 100000}}}')
    try:
        pricing.configure(config.load({"CHASSIS_FUEL_PRICES": str(f),
                                       "CHASSIS_CLAUDE_HAIKU_MODEL": "claude-haiku-x",
                                       "CHASSIS_HOME": str(tmp_path)}))
        model, price = pricing.resolve("ai_text_generate_claude_haiku", {})
        assert (model, price.output) == ("claude-haiku-x", 100000)
    finally:
        pricing._configured.clear()
    assert pricing.resolve("ai_text_generate_claude_haiku", {})[1].output == 5000


def test_an_api_error_billed_nothing_but_a_lost_answer_is_unknown() -> None:
    from chassis.ai.errors import ClaudeAPIError

    refused = ClaudeAPIError("500", status_code=500, error_type="api_error", request_id=None,
                             attempts=1)
    timed_out = ClaudeAPIError("timed out", status_code=None, error_type=None,
                               request_id=None, attempts=5)
    assert refused.usage == {"input_tokens": 0, "output_tokens": 0}  # settles 0
    assert timed_out.usage is None  # settles the floor

