"""Actions the agent runtime's tests serve with ``chassis agent``."""

from __future__ import annotations

import time
from typing import Any

from chassis.actions import action


@action("slow_research")
def slow_research(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Take ``params.delay`` seconds; answer with what it was asked (to tell answers
    apart)."""
    time.sleep(float(params.get("delay", 0)))
    return {"answer_for": data.get("input")}


@action("explode")
def explode(data: dict[str, Any], params: dict[str, Any]) -> Any:
    raise ValueError(f"exploded on {params.get('what', 'purpose')}")
