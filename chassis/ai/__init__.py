"""AI actions for plans: Claude through the official ``anthropic`` SDK, or a
deterministic offline stand-in.

The actions themselves (``ai_text_generate_claude_haiku``/``_sonnet``/``_opus`` and
``ai_text_generate``) live in :mod:`chassis.ai.actions` and are registered with the
built-ins. Which provider answers is CHASSIS_AI_PROVIDER (default: ``anthropic`` when
ANTHROPIC_API_KEY is set, else ``offline``); :func:`provider_note` tells people when
Claude is not being called.
"""

from chassis.ai.errors import (
    AIError,
    AIParamsError,
    ClaudeAPIError,
    EmbeddingsNotSupported,
    EmptyAnswer,
    MissingAPIKey,
    PromptTemplateError,
)
from chassis.ai.provider import (
    DEFAULT_MAX_TOKENS,
    TextProvider,
    TextRequest,
    TextResult,
    provider_for,
    provider_note,
)
from chassis.ai.templates import render

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "AIError",
    "AIParamsError",
    "ClaudeAPIError",
    "EmbeddingsNotSupported",
    "EmptyAnswer",
    "MissingAPIKey",
    "PromptTemplateError",
    "TextProvider",
    "TextRequest",
    "TextResult",
    "provider_for",
    "provider_note",
    "render",
]
