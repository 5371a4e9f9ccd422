"""The offline provider: deterministic stand-in text, no I/O.

Chosen by CHASSIS_AI_PROVIDER=offline, and by default when ANTHROPIC_API_KEY is not set,
so that the demo and tests run anywhere. The same request always gives the same answer;
token counts are estimates (about four characters a token).
"""

from __future__ import annotations

import hashlib
import json

from chassis.ai.errors import EmbeddingsNotSupported
from chassis.ai.provider import TextRequest, TextResult

_CHARS_PER_TOKEN = 4


def _tokens(text: str) -> int:
    return max(1, -(-len(text) // _CHARS_PER_TOKEN))


class OfflineProvider:
    """Answers every prompt with deterministic text that quotes it."""

    name = "offline"

    def generate_text(self, request: TextRequest) -> TextResult:
        key = json.dumps([request.model, request.system, request.prompt, request.max_tokens])
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        prompt = " ".join(request.prompt.split())
        excerpt = prompt if len(prompt) <= 240 else prompt[:239] + "…"
        text = (f"Offline stand-in for {request.model} (ref {digest}): no request was sent "
                f"to Claude. The prompt was: {excerpt}")
        stop_reason = "end_turn"
        limit = request.max_tokens * _CHARS_PER_TOKEN
        if len(text) > limit:
            text, stop_reason = text[:limit], "max_tokens"
        prompt_tokens = _tokens(request.prompt) + (_tokens(request.system)
                                                   if request.system else 0)
        return TextResult(text=text, model=request.model, stop_reason=stop_reason,
                          input_tokens=prompt_tokens, output_tokens=_tokens(text),
                          provider=self.name)

    def generate_embedding(self, text: str) -> list[float]:
        """Like Anthropic, whose stand-in this is: no embeddings."""
        raise EmbeddingsNotSupported()
