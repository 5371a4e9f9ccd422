"""The circuit breaker's settings: CHASSIS_AI_BREAKER_FAILURES and _COOLDOWN."""

from __future__ import annotations

import pytest

from chassis import config
from chassis.ai.claude import ClaudeOptions
from chassis.errors import ConfigError


def test_defaults() -> None:
    s = config.load({})
    assert (s.ai_breaker_failures, s.ai_breaker_cooldown) == (5, 30.0)


def test_from_the_environment_to_the_provider() -> None:
    s = config.load({"CHASSIS_AI_BREAKER_FAILURES": "3", "CHASSIS_AI_BREAKER_COOLDOWN": "0.5",
                     "ANTHROPIC_API_KEY": "k"})
    assert (s.ai_breaker_failures, s.ai_breaker_cooldown) == (3, 0.5)
    options = ClaudeOptions.from_settings(s)
    assert (options.breaker_failures, options.breaker_cooldown) == (3, 0.5)


@pytest.mark.parametrize(("name", "value", "says"), [
    ("CHASSIS_AI_BREAKER_FAILURES", "0", "a whole number from 1 to"),
    ("CHASSIS_AI_BREAKER_FAILURES", "-2", "a whole number from 1 to"),
    ("CHASSIS_AI_BREAKER_FAILURES", "2.5", "a whole number from 1 to"),
    ("CHASSIS_AI_BREAKER_FAILURES", "many", "a whole number from 1 to"),
    ("CHASSIS_AI_BREAKER_COOLDOWN", "0", "a number from 0.001 to 86400"),
    ("CHASSIS_AI_BREAKER_COOLDOWN", "-1", "a number from 0.001 to 86400"),
    ("CHASSIS_AI_BREAKER_COOLDOWN", "nan", "a number from 0.001 to 86400"),
    ("CHASSIS_AI_BREAKER_COOLDOWN", "1e10", "a number from 0.001 to 86400"),
])
def test_bad_values_are_refused_naming_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load({name: value})
    assert str(refused.value).startswith(f"{name} must be {says}")
    assert repr(value) in str(refused.value)
