"""The AI actions: ``ai_text_generate_claude_haiku``, ``_sonnet``, ``_opus`` (the model
of each tier is CHASSIS_CLAUDE_<TIER>_MODEL) and ``ai_text_generate`` (``params.model``:
a model id, or a tier name ``haiku``, ``sonnet``, ``opus``).

Params: ``prompt`` (required) and ``system`` are templates over the step's data (see
:mod:`chassis.ai.templates`); ``max_tokens`` (default 2048); ``temperature`` (sent only
when set); ``effort`` (low, medium, high, xhigh, max; sent only when set). The output is
``{text, model, stop_reason, usage: {input_tokens, output_tokens}, provider}``; the
usage is also kept with the step's fuel ledger entry. Unknown params are an error.

In a worker, the model's answer is recorded as soon as it arrives (keyed by workflow,
step and attempt): the same attempt delivered again after its worker was lost returns
it without a new request, so one attempt never pays the model twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from chassis import config
from chassis.actions import action, current_attempt
from chassis.ai.errors import AIParamsError
from chassis.ai.provider import DEFAULT_MAX_TOKENS, EFFORTS, TextRequest, provider_for
from chassis.ai.templates import render
from chassis.config import Settings

log = logging.getLogger(__name__)

_PARAMS = frozenset({"prompt", "system", "max_tokens", "temperature", "effort"})
TIERS = ("haiku", "sonnet", "opus")


def tier_model(settings: Settings, tier: str) -> str:
    """The model id configured for a tier (haiku, sonnet, opus)."""
    models = {"haiku": settings.claude_haiku_model, "sonnet": settings.claude_sonnet_model,
              "opus": settings.claude_opus_model}
    return models[tier]


def build_request(name: str, data: Mapping[str, Any], params: Mapping[str, Any],
                  model: str, allowed: frozenset[str] = _PARAMS,
                  settings: Settings | None = None) -> TextRequest:
    """Check ``params`` and render the templates; :class:`AIParamsError` or
    :class:`chassis.ai.errors.PromptTemplateError` say what is wrong."""
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise AIParamsError(f"{name}: unknown params {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(allowed))})")
    if not isinstance(params.get("prompt"), str) or not params["prompt"].strip():
        raise AIParamsError(f"{name}: params.prompt is required: a template over the "
                            "step's data, e.g. 'Summarise {{ input.text }}'")
    system = params.get("system")
    s = settings or config.load()
    seconds, most = s.template_timeout, s.template_max_bytes
    return TextRequest(
        model=model,
        prompt=render(params["prompt"], data, what="prompt", seconds=seconds, max_bytes=most),
        system=None if system is None else render(system, data, what="system",
                                                  seconds=seconds, max_bytes=most),
        max_tokens=_max_tokens(name, params.get("max_tokens", DEFAULT_MAX_TOKENS)),
        temperature=_temperature(name, params.get("temperature")),
        effort=_effort(name, params.get("effort")),
    )


def _max_tokens(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AIParamsError(f"{name}: max_tokens must be a whole number of at least 1, "
                            f"got {value!r}")
    return value


def _temperature(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not 0 <= value <= 1):
        raise AIParamsError(f"{name}: temperature must be a number from 0 to 1, got {value!r}")
    return float(value)


def _effort(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if value not in EFFORTS:
        raise AIParamsError(f"{name}: effort must be one of {', '.join(EFFORTS)}, "
                            f"got {value!r}")
    return str(value)


def generate(name: str, data: Mapping[str, Any], params: Mapping[str, Any], model: str,
             settings: Settings, allowed: frozenset[str] = _PARAMS) -> dict[str, Any]:
    """Render, check, call the configured provider (unless this attempt already had
    its answer: see :func:`recalled`); the step's output."""
    request = build_request(name, data, params, model, allowed, settings)
    kept = recalled(request)
    if kept is not None:  # this attempt was answered before its worker was lost
        return kept
    output = provider_for(settings).generate_text(request).as_output()
    remember(request, output)
    return output


# A model's answer is kept as soon as it arrives, keyed by the worker's attempt
# (chassis.actions.current_attempt): the same attempt delivered again uses it instead of
# paying the model twice. With the fingerprint of the request it answered, so a second,
# different call in one attempt is never answered with the first one's text.
_REQUEST_KEY = "request_sha256"


def _fingerprint(request: TextRequest) -> str:
    blob = json.dumps(dataclasses.asdict(request), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def recalled(request: TextRequest) -> dict[str, Any] | None:
    """The output kept for ``request`` by an earlier delivery of the running attempt;
    None outside a worker's attempt, or when nothing (or another request's answer) was
    kept."""
    attempt = current_attempt()
    if attempt is None:
        return None
    kept = attempt.recall()
    if kept is None or kept.get(_REQUEST_KEY) != _fingerprint(request):
        return None
    log.info("step %s attempt %d: using the model response recorded by an earlier "
             "delivery (no new request)", attempt.step, attempt.attempt,
             extra={"correlation_id": attempt.correlation_id, "step": attempt.step})
    return {k: v for k, v in kept.items() if k != _REQUEST_KEY}


def remember(request: TextRequest, output: dict[str, Any]) -> None:
    """Keep ``output`` for the running attempt (committed on return); nothing outside a
    worker's attempt. A failure to keep it is logged, not raised: the answer is paid
    for, and the step can still record it."""
    attempt = current_attempt()
    if attempt is None:
        return
    try:
        attempt.remember({**output, _REQUEST_KEY: _fingerprint(request)})
    except Exception:  # noqa: BLE001  (losing the copy must not lose the answer)
        log.warning("step %s attempt %d: could not record the model response; a "
                    "redelivery would call the model again", attempt.step, attempt.attempt,
                    exc_info=True,
                    extra={"correlation_id": attempt.correlation_id, "step": attempt.step})


def _tier_action(tier: str, data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    settings = config.load()
    name = f"ai_text_generate_claude_{tier}"
    if "model" in params:
        raise AIParamsError(f"{name}: the model is CHASSIS_CLAUDE_{tier.upper()}_MODEL "
                            f"({tier_model(settings, tier)}); use ai_text_generate to "
                            "choose one with params.model")
    return generate(name, data, params, tier_model(settings, tier), settings)


@action("ai_text_generate_claude_haiku")
def text_generate_claude_haiku(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Claude's haiku tier (CHASSIS_CLAUDE_HAIKU_MODEL)."""
    return _tier_action("haiku", data, params)


@action("ai_text_generate_claude_sonnet")
def text_generate_claude_sonnet(data: dict[str, Any],
                                params: dict[str, Any]) -> dict[str, Any]:
    """Claude's sonnet tier (CHASSIS_CLAUDE_SONNET_MODEL)."""
    return _tier_action("sonnet", data, params)


@action("ai_text_generate_claude_opus")
def text_generate_claude_opus(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Claude's opus tier (CHASSIS_CLAUDE_OPUS_MODEL)."""
    return _tier_action("opus", data, params)


@action("ai_text_generate")
def text_generate(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Any model: ``params.model`` is a model id or a tier name (haiku, sonnet, opus)."""
    settings = config.load()
    model = params.get("model")
    if not isinstance(model, str) or not model.strip():
        raise AIParamsError("ai_text_generate: params.model is required: a model id such as "
                            f"{settings.claude_sonnet_model!r}, or haiku, sonnet or opus")
    model = tier_model(settings, model) if model in TIERS else model
    return generate("ai_text_generate", data, params, model, settings, _PARAMS | {"model"})
