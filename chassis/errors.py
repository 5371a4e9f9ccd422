"""The one error tree of agentchassis.

Every error the library raises on purpose is a :class:`ChassisError`. Errors about a
workflow carry its ``correlation_id`` (and the ``step`` where it applies) as attributes,
so callers never have to parse messages.
"""

from __future__ import annotations


class ChassisError(Exception):
    """Root of every error agentchassis raises on purpose."""

    def __init__(
        self, message: str, *, correlation_id: str | None = None, step: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.correlation_id = correlation_id
        self.step = step

    def __str__(self) -> str:
        return self.message


class ConfigError(ChassisError):
    """The environment or settings are wrong (a bad URL, a missing module)."""


class PlanError(ChassisError):
    """A plan could not be read or is invalid. ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems is not None else [message]


class PlanFileError(PlanError):
    """A plan file is missing or is not JSON/YAML."""


class PlanNotFound(ChassisError):
    """No registered plan has this name (or this version)."""


class InputError(ChassisError):
    """A request was refused before anything was written (bad client_id, budget, input)."""


class WorkflowNotFound(ChassisError):
    """No workflow has this correlation_id, as far as the acting client can know (another
    client's workflow is refused with this same error: the refusal reveals nothing)."""


class WorkflowConflict(InputError):
    """A start names a correlation_id that is in use by another client, or by a workflow
    started with another plan, input or budget: nothing is written."""


class InvalidTransition(ChassisError):
    """The workflow is not in a state that allows this (e.g. resuming one not paused)."""


class StepMismatch(InvalidTransition):
    """A resume names a step the workflow no longer waits at (that approval expired, or
    was answered, and another is asked): nothing is approved or rejected."""


class InsufficientFuel(ChassisError):
    """The workflow's remaining fuel does not cover the step's price."""

    def __init__(
        self, action: str, have: int, need: int, *, correlation_id: str | None = None,
        step: str | None = None,
    ) -> None:
        super().__init__(
            f"insufficient fuel for action '{action}': have {have}, need {need}",
            correlation_id=correlation_id,
            step=step,
        )
        self.action = action
        self.have = have
        self.need = need


class ServiceUnavailable(ChassisError):
    """The database or the broker could not be reached. ``recorded`` says whether the
    request was written before that (then it goes on by itself once the service is
    back, and repeating it is safe)."""

    def __init__(self, message: str, *, service: str, recorded: bool,
                 correlation_id: str | None = None) -> None:
        super().__init__(message, correlation_id=correlation_id)
        self.service = service
        self.recorded = recorded


class BrokerUnavailable(ServiceUnavailable):
    """The Celery broker could not be reached."""


class DatabaseUnavailable(ServiceUnavailable):
    """The database could not be reached."""


class StepAttemptFailed(ChassisError):
    """How a worker reports an attempt whose action failed to Celery (and Flower), after
    the failure has been recorded: ``retrying`` when another attempt follows."""

    def __init__(self, message: str, *, correlation_id: str, step: str, attempt: int,
                 retrying: bool = False) -> None:
        super().__init__(message, correlation_id=correlation_id, step=step)
        self.attempt = attempt
        self.retrying = retrying

    def __reduce__(self) -> tuple[object, ...]:  # picklable for the prefork pool
        return (_rebuild_attempt_failed, (self.message, self.correlation_id, self.step,
                                          self.attempt, self.retrying))


def _rebuild_attempt_failed(message: str, correlation_id: str, step: str, attempt: int,
                            retrying: bool) -> StepAttemptFailed:
    return StepAttemptFailed(message, correlation_id=correlation_id, step=step,
                             attempt=attempt, retrying=retrying)


class ActionError(ChassisError):
    """An action failed; the workflow fails with this message.

    ``usage``: what the attempt consumed of a model, when it knows (``input_tokens``,
    ``output_tokens``, ...; zero tokens when no model answered): its fuel is settled
    from it. None: unknown (an AI attempt is then settled at its floor)."""

    usage: dict[str, int] | None = None


class AttemptDeferred(ActionError):
    """The attempt did not run and asks to be tried again in ``retry_after`` seconds,
    without spending one of its step's attempts (an open circuit breaker: the provider
    is known to be down). It consumed nothing."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        seconds = float(retry_after)
        self.retry_after = min(max(0.0, seconds), 86400.0) if seconds == seconds else 0.0
        self.usage = {"input_tokens": 0, "output_tokens": 0}


class UnknownAction(ChassisError):
    """No action of this name is registered in this process."""
