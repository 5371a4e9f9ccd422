"""Operations settings: timeouts, beat's schedule, routes (pure, no I/O)."""

from __future__ import annotations

import pytest
from celery.schedules import crontab

from chassis import config
from chassis.celery_conf import (
    CLEANUP_TASK,
    COORDINATION_QUEUE,
    SWEEP_TASK,
    TASK_ROUTES,
    beat_schedule,
    celery_settings,
)
from chassis.errors import ConfigError

REDIS = {"CHASSIS_BROKER_URL": "redis://127.0.0.1:6379/3", "CHASSIS_HOME": "/tmp/x"}


def test_defaults() -> None:
    s = config.load({})
    assert (s.step_timeout, s.max_deliveries, s.sweep_interval) == (3600.0, 3, 5.0)
    assert (s.lease_seconds, s.redispatch_after) == (15.0, 20.0)
    assert (s.result_expires, s.metrics_port) == (86400, 9808)


def test_values_and_their_errors_name_the_variable() -> None:
    s = config.load({"CHASSIS_STEP_TIMEOUT": "90", "CHASSIS_MAX_DELIVERIES": "5",
                     "CHASSIS_SWEEP_INTERVAL": "0.5", "CHASSIS_RESULT_EXPIRES": "600",
                     "CHASSIS_METRICS_PORT": "9100", "CHASSIS_LEASE_SECONDS": "6",
                     "CHASSIS_REDISPATCH_AFTER": "2.5"})
    assert (s.step_timeout, s.max_deliveries, s.sweep_interval) == (90.0, 5, 0.5)
    assert (s.lease_seconds, s.redispatch_after) == (6.0, 2.5)
    assert (s.result_expires, s.metrics_port) == (600, 9100)
    for name, bad in (("CHASSIS_STEP_TIMEOUT", "soon"), ("CHASSIS_MAX_DELIVERIES", "0"),
                      ("CHASSIS_SWEEP_INTERVAL", "-1"), ("CHASSIS_METRICS_PORT", "http"),
                      ("CHASSIS_LEASE_SECONDS", "0.5"), ("CHASSIS_REDISPATCH_AFTER", "nan"),
                      ("CHASSIS_VISIBILITY_TIMEOUT", "x"), ("CHASSIS_RELAY_BATCH_SIZE", "0"),
                      ("CHASSIS_PREFETCH_MULTIPLIER", "1.5"),
                      # out of range once they are numbers: refused, not an overflow later
                      ("CHASSIS_MAX_DOCUMENT_BYTES", "9" * 30), ("CHASSIS_MAX_DEPTH", "100000"),
                      ("CHASSIS_METRICS_PORT", "70000"), ("CHASSIS_STEP_TIMEOUT", "1e300"),
                      ("CHASSIS_RELAY_BATCH_SIZE", "\u0663"),  # an Arabic-Indic three
                      ("CHASSIS_LOG_FORMAT", "xml"), ("CHASSIS_LOG_LEVEL", "chatty"),
                      ("CHASSIS_BROKER_URL", "redis//localhost"),
                      ("CHASSIS_BROKER_URL", "rabbit://localhost"),
                      ("CHASSIS_BROKER_URL", "redis://a;nope"),
                      ("CHASSIS_RESULT_BACKEND", "postgres://x")):
        with pytest.raises(ConfigError, match=name):
            config.load({name: bad})


def test_known_urls_and_choices_are_taken_as_written() -> None:
    s = config.load({"CHASSIS_BROKER_URL": " amqp://guest:guest@h:5672// ",
                     "CHASSIS_RESULT_BACKEND": "db+postgresql://u@h/db",
                     "CHASSIS_LOG_FORMAT": "JSON", "CHASSIS_LOG_LEVEL": "debug"})
    assert (s.broker_url, s.result_backend) == ("amqp://guest:guest@h:5672//",
                                                "db+postgresql://u@h/db")
    assert (s.log_format, s.log_level) == ("json", "DEBUG")
    both = config.load({"CHASSIS_BROKER_URL": "redis://a:6379/0;redis://b:6379/0"})
    assert both.broker_url.count("redis://") == 2


def test_beat_sends_the_sweep_every_interval_and_each_message_expires() -> None:
    s = config.load({**REDIS, "CHASSIS_SWEEP_INTERVAL": "30"})
    sweep = beat_schedule(s)["chassis-sweep"]
    assert sweep == {"task": SWEEP_TASK, "schedule": 30.0, "options": {"expires": 30.0}}
    assert TASK_ROUTES[SWEEP_TASK] == {"queue": COORDINATION_QUEUE}


def test_redis_expires_results_itself_a_database_backend_is_cleaned_by_beat() -> None:
    redis = config.load(REDIS)
    assert CLEANUP_TASK not in beat_schedule(redis)
    assert celery_settings(redis)["result_expires"] == 86400
    db = config.load({**REDIS, "CHASSIS_RESULT_BACKEND": "db+postgresql://h/db"})
    cleanup = beat_schedule(db)[CLEANUP_TASK]
    assert cleanup["task"] == CLEANUP_TASK
    assert cleanup["schedule"] == crontab(minute=0, hour=4)


def test_the_relay_fallback_joins_the_schedule_only_with_kafka() -> None:
    assert "chassis-relay" not in celery_settings(config.load(REDIS))["beat_schedule"]
    conf = celery_settings(config.load({**REDIS, "CHASSIS_KAFKA_BOOTSTRAP": "k:9092"}))
    assert {"chassis-sweep", "chassis-relay"} <= set(conf["beat_schedule"])
    assert conf["beat_schedule_filename"] == "/tmp/x/celerybeat-schedule"
