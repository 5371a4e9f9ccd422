"""AI settings (chassis.config), the provider choice, and the AI tasks' Celery settings."""

from __future__ import annotations

import pytest

from chassis import config
from chassis.ai import MissingAPIKey, provider_for, provider_note
from chassis.ai.claude import ClaudeProvider
from chassis.ai.offline import OfflineProvider
from chassis.celery_conf import (
    AI_QUEUE,
    STEPS_QUEUE,
    celery_settings,
    step_task_for,
    subtask_task_for,
)
from chassis.errors import ConfigError


def test_defaults_without_a_key_are_offline() -> None:
    s = config.load({})
    assert s.ai_provider == "offline"
    assert s.anthropic_api_key is None and s.anthropic_base_url is None
    assert (s.claude_haiku_model, s.claude_sonnet_model, s.claude_opus_model) == (
        "claude-haiku-5-5", "claude-sonnet-5-5", "claude-opus-5-5")
    assert (s.ai_max_retries, s.ai_timeout, s.ai_backoff, s.ai_max_backoff) == (
        4, 300.0, 1.0, 30.0)
    assert s.ai_rate_limit is None
    assert isinstance(provider_for(s), OfflineProvider)


def test_a_key_chooses_claude_and_is_never_printed() -> None:
    s = config.load({"ANTHROPIC_API_KEY": "sk-secret", "ANTHROPIC_BASE_URL": "http://x:1"})
    assert s.ai_provider == "anthropic"
    assert (s.anthropic_api_key, s.anthropic_base_url) == ("sk-secret", "http://x:1")
    assert "sk-secret" not in repr(s)
    provider = provider_for(s)
    assert isinstance(provider, ClaudeProvider)
    assert provider.options.base_url == "http://x:1"
    assert "sk-secret" not in repr(provider.options)
    assert provider_for(s) is provider  # shared: one connection pool per configuration


def test_explicit_provider_wins() -> None:
    assert config.load({"ANTHROPIC_API_KEY": "k",
                        "CHASSIS_AI_PROVIDER": "offline"}).ai_provider == "offline"
    assert config.load({"CHASSIS_AI_PROVIDER": "Anthropic"}).ai_provider == "anthropic"


def test_claude_without_a_key_fails_naming_the_variable_before_any_request() -> None:
    s = config.load({"CHASSIS_AI_PROVIDER": "anthropic", "ANTHROPIC_API_KEY": "  "})
    with pytest.raises(MissingAPIKey, match="ANTHROPIC_API_KEY is not set"):
        provider_for(s)


def test_models_retries_and_limits_from_the_environment() -> None:
    s = config.load({"CHASSIS_CLAUDE_HAIKU_MODEL": "h", "CHASSIS_CLAUDE_SONNET_MODEL": "s",
                     "CHASSIS_CLAUDE_OPUS_MODEL": "o", "CHASSIS_AI_MAX_RETRIES": "0",
                     "CHASSIS_AI_TIMEOUT": "2.5", "CHASSIS_AI_BACKOFF": "0.1",
                     "CHASSIS_AI_MAX_BACKOFF": "3", "CHASSIS_AI_RATE_LIMIT": "60/m"})
    assert (s.claude_haiku_model, s.claude_sonnet_model, s.claude_opus_model) == ("h", "s", "o")
    assert (s.ai_max_retries, s.ai_timeout, s.ai_backoff, s.ai_max_backoff) == (0, 2.5, 0.1, 3)
    assert s.ai_rate_limit == "60/m"


@pytest.mark.parametrize(("name", "value", "message"), [
    ("CHASSIS_AI_PROVIDER", "openai", "CHASSIS_AI_PROVIDER must be one of anthropic, offline"),
    ("CHASSIS_AI_MAX_RETRIES", "many", "CHASSIS_AI_MAX_RETRIES must be a whole number"),
    ("CHASSIS_AI_MAX_RETRIES", "-1", "CHASSIS_AI_MAX_RETRIES must be a whole number"),
    ("CHASSIS_AI_TIMEOUT", "0", "CHASSIS_AI_TIMEOUT must be a number from 0.001 to 1e"),
    ("CHASSIS_AI_BACKOFF", "nan", "CHASSIS_AI_BACKOFF must be a number"),
    ("CHASSIS_AI_RATE_LIMIT", "fast", "CHASSIS_AI_RATE_LIMIT must be a Celery rate limit"),
])
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load({name: value})


def test_provider_note_says_when_claude_is_not_called() -> None:
    note = provider_note(config.load({}))
    assert note is not None
    assert note.startswith("AI steps use the offline provider (ANTHROPIC_API_KEY is not set)")
    explicit = provider_note(config.load({"ANTHROPIC_API_KEY": "k",
                                          "CHASSIS_AI_PROVIDER": "offline"}))
    assert explicit is not None and "CHASSIS_AI_PROVIDER=offline" in explicit
    assert provider_note(config.load({"ANTHROPIC_API_KEY": "k"})) is None


def test_ai_tasks_have_their_queue_and_the_rate_limit() -> None:
    assert (step_task_for("ai_text_generate_claude_haiku"), step_task_for("echo")) == (
        "chassis.ai_step", "chassis.step")
    assert (subtask_task_for("ai_text_generate"), subtask_task_for("echo")) == (
        "chassis.ai_subtask", "chassis.subtask")
    conf = celery_settings(config.load({"CHASSIS_BROKER_URL": "redis://h:6379/0",
                                        "CHASSIS_AI_RATE_LIMIT": "2/s"}))
    assert conf["task_routes"]["chassis.ai_step"] == {"queue": AI_QUEUE}
    assert conf["task_routes"]["chassis.ai_subtask"] == {"queue": AI_QUEUE}
    assert conf["task_routes"]["chassis.step"] == {"queue": STEPS_QUEUE}
    assert conf["task_annotations"] == {"chassis.ai_step": {"rate_limit": "2/s"},
                                        "chassis.ai_subtask": {"rate_limit": "2/s"}}
    assert "task_annotations" not in celery_settings(
        config.load({"CHASSIS_BROKER_URL": "redis://h:6379/0"}))
