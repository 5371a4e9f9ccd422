"""chassis.config: defaults, URL normalisation, derived settings. No I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from chassis.config import load, normalize_database_url


def test_empty_environment_is_fully_embedded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)

    settings = load({})

    home = (tmp_path / ".chassis").resolve()
    assert settings.home == home
    assert settings.database_url == f"sqlite:///{home / 'chassis.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings.embedded_broker is True
    assert settings.broker_dir == home / "broker"
    assert settings.result_backend == f"file://{home / 'results'}"
    assert settings.kafka_bootstrap is None
    assert settings.action_modules == ()
    assert (settings.log_format, settings.log_level) == ("text", "INFO")


def test_chassis_home_moves_the_embedded_files(tmp_path: Path) -> None:
    settings = load({"CHASSIS_HOME": str(tmp_path / "state")})

    home = (tmp_path / "state").resolve()
    assert settings.home == home
    assert settings.database_url == f"sqlite:///{home / 'chassis.db'}"
    assert settings.result_backend == f"file://{home / 'results'}"
    assert settings.embedded_broker is True


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/chassis", "postgresql+psycopg://u:p@db:5432/chassis"),
        ("postgres://u@db/chassis", "postgresql+psycopg://u@db/chassis"),
        ("postgresql+psycopg://u@db/chassis", "postgresql+psycopg://u@db/chassis"),
        ("sqlite:////var/lib/chassis.db", "sqlite:////var/lib/chassis.db"),
    ],
)
def test_database_url_normalisation(given: str, expected: str) -> None:
    assert normalize_database_url(given) == expected
    assert load({"CHASSIS_DATABASE_URL": given}).database_url == expected


def test_redis_broker_is_also_the_result_backend() -> None:
    settings = load({"CHASSIS_BROKER_URL": "redis://127.0.0.1:6379/3"})

    assert settings.broker_url == "redis://127.0.0.1:6379/3"
    assert settings.result_backend == "redis://127.0.0.1:6379/3"
    assert settings.embedded_broker is False


def test_explicit_result_backend_wins() -> None:
    settings = load(
        {"CHASSIS_BROKER_URL": "redis://r:6379/0", "CHASSIS_RESULT_BACKEND": "redis://r:6379/1"}
    )

    assert settings.result_backend == "redis://r:6379/1"


def test_other_settings_are_parsed() -> None:
    settings = load(
        {
            "CHASSIS_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
            "CHASSIS_ACTION_MODULES": " myapp.actions, ,other.actions ",
            "CHASSIS_VISIBILITY_TIMEOUT": "120",
            "CHASSIS_LOG_FORMAT": "JSON",
            "CHASSIS_LOG_LEVEL": "debug",
        }
    )

    assert settings.kafka_bootstrap == "k1:9092,k2:9092"
    assert settings.action_modules == ("myapp.actions", "other.actions")
    assert settings.visibility_timeout == 120
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
