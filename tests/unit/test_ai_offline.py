"""The offline provider: deterministic text, usage estimates, no I/O."""

from __future__ import annotations

import pytest

from chassis.ai import EmbeddingsNotSupported, TextRequest
from chassis.ai.offline import OfflineProvider

REQUEST = TextRequest(model="claude-haiku-5-5", prompt="Write about  Celery\nchords.",
                      system="Be brief.")


def test_the_same_request_gives_the_same_answer() -> None:
    first = OfflineProvider().generate_text(REQUEST)
    assert OfflineProvider().generate_text(REQUEST) == first
    assert first.text.startswith("Offline stand-in for claude-haiku-5-5 (ref ")
    assert first.text.endswith("The prompt was: Write about Celery chords.")
    assert (first.model, first.stop_reason, first.provider) == (
        "claude-haiku-5-5", "end_turn", "offline")


def test_another_prompt_system_or_model_gives_another_answer() -> None:
    texts = {OfflineProvider().generate_text(r).text for r in (
        REQUEST,
        TextRequest(model=REQUEST.model, prompt="Other.", system=REQUEST.system),
        TextRequest(model=REQUEST.model, prompt=REQUEST.prompt, system="Be long."),
        TextRequest(model="claude-opus-5-5", prompt=REQUEST.prompt, system=REQUEST.system),
    )}
    assert len(texts) == 4


def test_usage_is_an_estimate_of_four_characters_a_token() -> None:
    result = OfflineProvider().generate_text(REQUEST)
    assert result.input_tokens == 7 + 3  # 26 characters of prompt, 9 of system
    assert result.output_tokens == -(-len(result.text) // 4)
    assert result.as_output() == {
        "text": result.text, "model": "claude-haiku-5-5", "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "output_tokens": result.output_tokens},
        "provider": "offline"}


def test_max_tokens_cuts_the_answer() -> None:
    result = OfflineProvider().generate_text(
        TextRequest(model="m", prompt="x" * 400, max_tokens=5))
    assert (len(result.text), result.output_tokens, result.stop_reason) == (20, 5, "max_tokens")


def test_a_long_prompt_is_quoted_in_part() -> None:
    result = OfflineProvider().generate_text(TextRequest(model="m", prompt="word " * 500))
    assert result.text.endswith("…") and len(result.text) < 400


def test_no_embeddings_like_anthropic() -> None:
    with pytest.raises(EmbeddingsNotSupported,
                       match="^embedding generation not supported by Anthropic$"):
        OfflineProvider().generate_embedding("text")
