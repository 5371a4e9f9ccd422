"""Celery settings derived from :class:`chassis.config.Settings` (JSON only, acks late)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery.schedules import crontab
from kombu import Exchange, Queue
from kombu.transport import TRANSPORT_ALIASES

from chassis.config import Settings

#: Our brokers, kombu's transports made safe (see chassis.filebroker and
#: chassis.redisbroker), by the short names logs show them under.
FILE_TRANSPORT = "chassis-files"
REDIS_TRANSPORT = "chassis-redis"
TRANSPORT_ALIASES.setdefault(FILE_TRANSPORT, "chassis.filebroker:Transport")
TRANSPORT_ALIASES.setdefault(REDIS_TRANSPORT, "chassis.redisbroker:Transport")

#: One direct exchange for the three queues, each bound by its own name: a message
#: published to it with routing key ``chassis.steps`` lands in ``chassis.steps`` only.
#: (A queue declared without an exchange gets Celery's default one, named after the
#: default queue, with the default routing key: all three were bound to
#: ``chassis.steps``/``chassis.steps``, so one publish there reached all three.)
EXCHANGE = Exchange("chassis", type="direct")
COORDINATION_QUEUE = "chassis.coordination"
STEPS_QUEUE = "chassis.steps"
AI_QUEUE = "chassis.ai"
AI_PREFIX = "ai_"
#: How often beat sends ``chassis.relay`` (when CHASSIS_KAFKA_BOOTSTRAP is set).
RELAY_BEAT_SECONDS = 10.0
SWEEP_TASK = "chassis.sweep"
PRUNE_TASK = "chassis.prune"
#: Celery's own task deleting expired results (Redis expires them itself).
CLEANUP_TASK = "celery.backend_cleanup"
STEP_TASK = "chassis.step"
SUBTASK_TASK = "chassis.subtask"
#: The same tasks for AI actions: their own names carry CHASSIS_AI_RATE_LIMIT.
AI_STEP_TASK = "chassis.ai_step"
AI_SUBTASK_TASK = "chassis.ai_subtask"
RESUME_TASK = "chassis.resume"
CANCEL_TASK = "chassis.cancel"
RETRY_TASK = "chassis.retry"
START_TASK = "chassis.start"
STATUS_TASK = "chassis.status"
#: Celery's default queue: a task another app sends without naming a queue lands here
#: (the shipped coordinator consumes it too, see the README's task contract).
DEFAULT_QUEUE = "celery"
RESPOND_TASK = "chassis.respond"
RELAY_TASK = "chassis.relay"


def queue_for(action: str) -> str:
    """AI actions (``ai_*``) run on their own queue, so they can be rate-limited and
    scaled apart from cheap steps."""
    return AI_QUEUE if action.startswith(AI_PREFIX) else STEPS_QUEUE


def step_task_for(action: str) -> str:
    """The task that runs a step of this action (AI actions: the rate-limited one)."""
    return AI_STEP_TASK if action.startswith(AI_PREFIX) else STEP_TASK


def subtask_task_for(action: str) -> str:
    """The task that runs a fan-out sub-task of this action."""
    return AI_SUBTASK_TASK if action.startswith(AI_PREFIX) else SUBTASK_TASK


TASK_ROUTES: dict[str, dict[str, str]] = {
    STEP_TASK: {"queue": STEPS_QUEUE},
    SUBTASK_TASK: {"queue": STEPS_QUEUE},
    AI_STEP_TASK: {"queue": AI_QUEUE},
    AI_SUBTASK_TASK: {"queue": AI_QUEUE},
    RESUME_TASK: {"queue": COORDINATION_QUEUE},
    CANCEL_TASK: {"queue": COORDINATION_QUEUE},
    RETRY_TASK: {"queue": COORDINATION_QUEUE},
    START_TASK: {"queue": COORDINATION_QUEUE},
    STATUS_TASK: {"queue": COORDINATION_QUEUE},
    RESPOND_TASK: {"queue": COORDINATION_QUEUE},
    RELAY_TASK: {"queue": COORDINATION_QUEUE},
    SWEEP_TASK: {"queue": COORDINATION_QUEUE},
    PRUNE_TASK: {"queue": COORDINATION_QUEUE},
    CLEANUP_TASK: {"queue": COORDINATION_QUEUE},
}


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """What ``celery beat`` sends. Every entry is idempotent and safe to receive twice
    (two beats by mistake): see :mod:`chassis.sweep`; the clean-up deletes only rows
    already expired. Each message expires after one period, so a backlog never piles up.
    """
    schedule: dict[str, dict[str, Any]] = {
        "chassis-sweep": {"task": SWEEP_TASK, "schedule": settings.sweep_interval,
                          "options": {"expires": settings.sweep_interval}},
    }
    if settings.prune_after_days is not None:
        schedule["chassis-prune"] = {"task": PRUNE_TASK, "schedule": crontab(minute=30, hour=3),
                                     "args": [settings.prune_after_days],
                                     "options": {"expires": 12 * 3600}}
    if not settings.result_backend.startswith(("redis://", "rediss://")):
        # Celery adds this one itself for such backends; declared here to be seen
        schedule[CLEANUP_TASK] = {"task": CLEANUP_TASK, "schedule": crontab(minute=0, hour=4),
                                  "options": {"expires": 12 * 3600}}
    return schedule


def celery_settings(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for these settings (no task modules: see celeryconfig)."""
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # a task may be delivered again after a crash: every task is idempotent
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,
        "result_expires": settings.result_expires,
        "result_extended": False,
        "task_queues": tuple(Queue(q, EXCHANGE, routing_key=q)
                             for q in (COORDINATION_QUEUE, STEPS_QUEUE, AI_QUEUE)),
        "task_default_queue": STEPS_QUEUE,
        "task_default_exchange": EXCHANGE.name,
        "task_default_exchange_type": EXCHANGE.type,
        "task_default_routing_key": STEPS_QUEUE,
        "task_routes": TASK_ROUTES,
        "broker_connection_retry_on_startup": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "broker_transport_options": {},
    }
    conf["beat_schedule"] = beat_schedule(settings)
    conf["beat_schedule_filename"] = str(settings.home / "celerybeat-schedule")
    if settings.ai_rate_limit:
        # Celery enforces a rate limit per worker and per task name
        limit = {"rate_limit": settings.ai_rate_limit}
        conf["task_annotations"] = {AI_STEP_TASK: limit, AI_SUBTASK_TASK: limit}
    if settings.kafka_bootstrap:
        # the fallback publisher of the outbox; `chassis relay` is the fast path
        conf.setdefault("beat_schedule", {})["chassis-relay"] = {
            "task": RELAY_TASK, "schedule": RELAY_BEAT_SECONDS,
            "options": {"expires": RELAY_BEAT_SECONDS}}
    if settings.result_backend.startswith("file://"):
        # the file-system result backend needs its folder to exist
        Path(settings.result_backend[len("file://"):]).mkdir(parents=True, exist_ok=True)
    if settings.embedded_broker:
        queue = settings.broker_dir / "queue"
        control = settings.broker_dir / "control"
        for folder in (queue, control):
            folder.mkdir(parents=True, exist_ok=True)
        # kombu's file-system transport, whose messages appear and are taken whole
        conf["broker_transport"] = FILE_TRANSPORT
        conf["broker_transport_options"] = {
            "data_folder_in": str(queue), "data_folder_out": str(queue),
            "taken_folder": str(settings.broker_dir / "taken"),
            "control_folder": str(control), "polling_interval": 0.05,
        }
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        if settings.broker_url.startswith("redis://"):
            # kombu's Redis transport, which survives a Redis restart under work in flight
            conf["broker_transport"] = REDIS_TRANSPORT
        vt = settings.visibility_timeout
        # look for abandoned (unacked) messages often enough to honour a short timeout
        conf["broker_transport_options"] = {
            "visibility_timeout": vt,
            "unacked_restore_interval": max(1, min(10, vt // 3)),
            "unacked_restore_throttle": 1 if vt < 300 else 10,
        }
    return conf
