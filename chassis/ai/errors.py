"""Errors of the AI actions: all are :class:`chassis.errors.ActionError`, so a step that
raises one fails its workflow with the message; attributes carry the details."""

from __future__ import annotations

from chassis.errors import ActionError

#: The usage of an attempt that no model answered (billed nothing).
NO_TOKENS = {"input_tokens": 0, "output_tokens": 0}


class AIError(ActionError):
    """Root of the AI actions' errors."""


class NothingConsumed(AIError):
    """An AI error raised before any model answered: its attempt consumed nothing."""

    usage = NO_TOKENS


class AIParamsError(NothingConsumed):
    """A step's params for an AI action are wrong (a missing prompt, a bad max_tokens)."""


class PromptTemplateError(NothingConsumed):
    """A prompt or system template cannot be rendered. ``key`` names the missing key
    when that is the reason."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class MissingAPIKey(NothingConsumed):
    """The anthropic provider was chosen but ANTHROPIC_API_KEY is not set."""


class ClaudeAPIError(AIError):
    """The Messages API refused the request or kept failing. ``status_code`` is None when
    no HTTP answer came (a timeout or a connection error): then the model may have run
    (and been billed) and its usage is unknown; an error answer billed nothing."""

    def __init__(self, message: str, *, status_code: int | None, error_type: str | None,
                 request_id: str | None, attempts: int) -> None:
        super().__init__(message)
        self.usage = NO_TOKENS if status_code is not None else None
        self.status_code = status_code
        self.error_type = error_type
        self.request_id = request_id
        self.attempts = attempts


class EmptyAnswer(AIError):
    """The model answered without any text (``usage``: what the answer consumed)."""

    def __init__(self, message: str, usage: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.usage = usage


class EmbeddingsNotSupported(AIError):
    """Anthropic has no embeddings endpoint (as in the original Go client)."""

    def __init__(self) -> None:
        super().__init__("embedding generation not supported by Anthropic")
