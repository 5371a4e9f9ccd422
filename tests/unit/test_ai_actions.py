"""The AI actions' params, models and outputs (offline provider: no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from chassis import actions
from chassis.ai import AIParamsError, MissingAPIKey, PromptTemplateError
from chassis.ai.actions import build_request
from chassis.ai.claude import ClaudeOptions, ClaudeProvider
from chassis.fuel import price

AI_ACTIONS = ("ai_text_generate_claude_haiku", "ai_text_generate_claude_sonnet",
              "ai_text_generate_claude_opus", "ai_text_generate")
DATA: dict[str, Any] = {"input": {"topic": "Celery"}}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHASSIS_AI_PROVIDER", "offline")
    monkeypatch.setenv("CHASSIS_CLAUDE_SONNET_MODEL", "sonnet-under-test")


def test_the_ai_actions_are_built_ins_with_the_seeds_prices() -> None:
    assert set(AI_ACTIONS) <= actions.registered()
    assert [price(a) for a in AI_ACTIONS] == [10, 25, 50, 1]


def test_defaults_send_neither_temperature_nor_effort() -> None:
    request = build_request("t", DATA, {"prompt": "About {{ input.topic }}"}, "m")
    assert (request.model, request.prompt, request.system, request.max_tokens) == (
        "m", "About Celery", None, 2048)
    assert (request.temperature, request.effort) == (None, None)


def test_all_params_and_the_system_template() -> None:
    request = build_request("t", DATA, {
        "prompt": "p", "system": "Expert in {{ input.topic }}", "max_tokens": 100,
        "temperature": 0.2, "effort": "low"}, "m")
    assert (request.system, request.max_tokens, request.temperature, request.effort) == (
        "Expert in Celery", 100, 0.2, "low")


@pytest.mark.parametrize(("params", "message"), [
    ({}, "t: params.prompt is required"),
    ({"prompt": "  "}, "t: params.prompt is required"),
    ({"prompt": "p", "temprature": 0.2}, "t: unknown params temprature"),
    ({"prompt": "p", "max_tokens": 0}, "max_tokens must be a whole number"),
    ({"prompt": "p", "max_tokens": "100"}, "max_tokens must be a whole number"),
    ({"prompt": "p", "max_tokens": True}, "max_tokens must be a whole number"),
    ({"prompt": "p", "temperature": 1.5}, "temperature must be a number from 0 to 1"),
    ({"prompt": "p", "temperature": "hot"}, "temperature must be a number from 0 to 1"),
    ({"prompt": "p", "effort": "extreme"}, "effort must be one of low, medium, high"),
])
def test_bad_params_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(AIParamsError, match=message):
        build_request("t", DATA, params, "m")


def test_a_template_error_comes_before_any_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHASSIS_AI_PROVIDER", "anthropic")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    haiku = actions.get("ai_text_generate_claude_haiku")
    with pytest.raises(PromptTemplateError, match="missing key 'topc'"):
        haiku(DATA, {"prompt": "{{ input.topc }}"})
    with pytest.raises(MissingAPIKey, match="ANTHROPIC_API_KEY"):
        haiku(DATA, {"prompt": "{{ input.topic }}"})


@pytest.mark.usefixtures("offline")
def test_tier_actions_use_their_configured_model() -> None:
    out = actions.get("ai_text_generate_claude_sonnet")(DATA, {"prompt": "{{ input.topic }}"})
    assert out["model"] == "sonnet-under-test"
    assert set(out) == {"text", "model", "stop_reason", "usage", "provider"}
    assert set(out["usage"]) == {"input_tokens", "output_tokens"}
    assert out["provider"] == "offline"
    with pytest.raises(AIParamsError, match="use ai_text_generate to choose one"):
        actions.get("ai_text_generate_claude_opus")(DATA, {"prompt": "p", "model": "x"})


@pytest.mark.usefixtures("offline")
def test_ai_text_generate_takes_a_model_id_or_a_tier() -> None:
    generate = actions.get("ai_text_generate")
    assert generate(DATA, {"prompt": "p", "model": "claude-x-9"})["model"] == "claude-x-9"
    assert generate(DATA, {"prompt": "p", "model": "sonnet"})["model"] == "sonnet-under-test"
    with pytest.raises(AIParamsError, match="params.model is required"):
        generate(DATA, {"prompt": "p"})


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    claude = ClaudeProvider(ClaudeOptions(api_key="k", backoff=1.0, max_backoff=5.0))
    for _ in range(50):
        assert 0.5 <= claude._delay(1, None) <= 1.0
        assert 1.0 <= claude._delay(2, None) <= 2.0
        assert 2.0 <= claude._delay(3, None) <= 4.0
        assert 2.5 <= claude._delay(4, None) <= 5.0
        assert claude._delay(9, None) <= 5.0
        assert claude._delay(1, 3.0) == 3.0  # the server's retry-after, honoured
        assert claude._delay(1, 60.0) == 5.0  # up to max_backoff
