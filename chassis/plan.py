"""The workflow plan model: the original Go platform's format, plus ``params``.

A plan is ``start_step`` and ``steps`` (step name → :class:`Step`). Field names are the
original's. Parsing is strict: unknown fields and wrong types are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Actions the coordinator carries out itself; they never run as a Celery task.
FAN_OUT = "fan_out"
PAUSE = "pause_for_human_input"
COMPLETE = "complete_workflow"
RESERVED_ACTIONS = frozenset({FAN_OUT, PAUSE, COMPLETE})


@dataclass(frozen=True)
class SubTask:
    """One branch of a ``fan_out`` step."""

    step_name: str
    """Name its output is stored under."""
    topic: str | None = None
    """Kafka topic of an external agent; unset means a Celery action."""
    action: str | None = None
    """Action to run; defaults to ``step_name``."""
    params: dict[str, Any] = field(default_factory=dict)
    """Handed to the action."""

    @property
    def resolved_action(self) -> str:
        return self.action or self.step_name


@dataclass(frozen=True)
class Step:
    """One step of a plan."""

    action: str
    description: str = ""
    topic: str | None = None
    """Kafka topic of an external agent; unset means a Celery action."""
    dependencies: tuple[str, ...] = ()
    """Step names whose outputs must be present before this step runs."""
    next_step: str | None = None
    sub_tasks: tuple[SubTask, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """A workflow plan."""

    start_step: str
    steps: dict[str, Step]
    name: str | None = None
    description: str | None = None
