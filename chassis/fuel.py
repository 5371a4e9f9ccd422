"""Fuel: the per-workflow budget for costly actions (port of the seed's governance/fuel.go)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from chassis.errors import InsufficientFuel

FUEL_HEADER = "fuel_budget"
#: Fuel budget of a workflow started without one.
DEFAULT_FUEL = 1000
DEFAULT_STEP = "default_step"

#: Price in fuel units per action, exactly as the original platform's cost table.
COST_TABLE: Mapping[str, int] = MappingProxyType(
    {
        "default_step": 1,
        "fan_out": 5,
        "ai_text_generate_claude_haiku": 10,
        "ai_text_generate_claude_sonnet": 25,
        "ai_text_generate_claude_opus": 50,
        "ai_image_generate_sdxl": 40,
        "web_search": 5,
        "database_query": 1,
        "memory_store": 2,
        "memory_search": 2,
        "pause_for_human_input": 0,  # no cost for waiting
    }
)


def cost(action: str) -> int:
    """The price of one action; anything not in the table costs ``default_step``."""
    return COST_TABLE.get(action, COST_TABLE[DEFAULT_STEP])


def has_enough(remaining: int, action: str) -> bool:
    return remaining >= cost(action)


def price(action: str, sub_actions: Iterable[str] = ()) -> int:
    """Price of a step: a fan_out costs ``fan_out`` plus every sub-task's action."""
    return cost(action) + sum(cost(a) for a in sub_actions)


def check(remaining: int, action: str, need: int | None = None, **ids: str | None) -> None:
    """Raise :class:`InsufficientFuel` (the original's exact message) when too little is left."""
    need = cost(action) if need is None else need
    if remaining < need:
        raise InsufficientFuel(action, remaining, need, **ids)


def fuel_from_headers(headers: Mapping[str, str]) -> int:
    """Parse the fuel budget header; a clear ValueError when absent or not an integer."""
    if FUEL_HEADER not in headers:
        raise ValueError(f"'{FUEL_HEADER}' header not found")
    try:
        return int(headers[FUEL_HEADER])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid fuel value in header: {headers[FUEL_HEADER]!r}") from exc


def ledger_key(correlation_id: str, step: str, attempt: int = 1) -> str:
    """Idempotency key of a debit: one debit per attempt of a step per workflow (the
    first attempt keeps the original's ``correlation_id:step``)."""
    return f"{correlation_id}:{step}" if attempt == 1 else f"{correlation_id}:{step}#{attempt}"
