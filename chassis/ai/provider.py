"""The text-generation interface the AI actions use, and the choice of implementation.

Implementations: :class:`chassis.ai.claude.ClaudeProvider` (the anthropic SDK) and
:class:`chassis.ai.offline.OfflineProvider` (deterministic, no I/O).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from chassis.config import Settings

#: max_tokens when a step sets none (the original Go client's value).
DEFAULT_MAX_TOKENS = 2048
#: ``effort`` values the Messages API accepts (output_config.effort).
EFFORTS = ("low", "medium", "high", "xhigh", "max")


@dataclass(frozen=True)
class TextRequest:
    """One prompt for a model. ``temperature`` and ``effort`` are sent only when set."""

    model: str
    """The model id."""
    prompt: str
    """The user message (already rendered)."""
    system: str | None = None
    """The system prompt (already rendered), if any."""
    max_tokens: int = DEFAULT_MAX_TOKENS
    """The most tokens the answer may have."""
    temperature: float | None = None
    """Sampling temperature; None leaves the model's default (newer models accept no other)."""
    effort: str | None = None
    """How much effort the model spends (one of :data:`EFFORTS`); None: the default."""


@dataclass(frozen=True)
class TextResult:
    """A model's answer, as stored under the step's name."""

    text: str
    model: str
    stop_reason: str | None
    input_tokens: int
    output_tokens: int
    provider: str
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0

    def as_output(self) -> dict[str, Any]:
        """The step output; its ``usage`` (cache tokens only when there are any) prices
        the attempt and is kept with its ledger rows."""
        usage = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        if self.cache_write_tokens:
            usage["cache_creation_input_tokens"] = self.cache_write_tokens
        if self.cache_read_tokens:
            usage["cache_read_input_tokens"] = self.cache_read_tokens
        return {"text": self.text, "model": self.model, "stop_reason": self.stop_reason,
                "usage": usage, "provider": self.provider}


class TextProvider(Protocol):
    """Generates text (and, where supported, embeddings)."""

    name: str

    def generate_text(self, request: TextRequest) -> TextResult:
        """The model's answer to ``request``; raises :class:`chassis.ai.errors.AIError`."""
        ...

    def generate_embedding(self, text: str) -> list[float]:
        """An embedding of ``text``; raises when the provider has none."""
        ...


def provider_for(settings: Settings) -> TextProvider:
    """The provider that ``settings`` choose (CHASSIS_AI_PROVIDER). The anthropic one
    raises :class:`chassis.ai.errors.MissingAPIKey` when ANTHROPIC_API_KEY is unset."""
    if settings.ai_provider == "offline":
        from chassis.ai.offline import OfflineProvider

        return OfflineProvider()
    from chassis.ai.claude import ClaudeProvider  # imports the SDK only when used

    return ClaudeProvider.for_settings(settings)


def provider_note(settings: Settings) -> str | None:
    """A line for people (e.g. ``chassis demo``) when AI steps will not call Claude;
    None when they will."""
    if settings.ai_provider != "offline":
        return None
    if settings.anthropic_api_key is None:
        why, how = "ANTHROPIC_API_KEY is not set", "set ANTHROPIC_API_KEY"
    else:
        why, how = "CHASSIS_AI_PROVIDER=offline", "set CHASSIS_AI_PROVIDER=anthropic"
    return (f"AI steps use the offline provider ({why}): they return deterministic "
            f"stand-in text and make no requests to Claude; {how} to call Claude.")
