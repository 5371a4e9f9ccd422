"""An example external agent's actions, served over Kafka by ``chassis agent``.

    chassis agent --type research --actions examples.agent

consumes TaskRequests on ``system.agent.research.requests`` and answers on
``system.responses.research`` (see the README's Kafka section): each request names an
action registered here (or a built-in one, or a Claude action), and its output is the
answer. A raised exception answers ``success: false`` with the error. Replace the canned
research with a real one; the runtime does the rest (offsets committed after the answer,
a bounded pool, dead letters, /health, /ready and /metrics).
"""

from __future__ import annotations

import json
from typing import Any

from chassis.actions import action


@action("research")
def research(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A canned summary of what it was asked: the workflow's input, else the params."""
    question = data.get("input") or params
    return {"action": "research",
            "summary": f"Findings on {json.dumps(question)}: three sources agree.",
            "sources": ["https://example.org/a", "https://example.org/b"]}


@action("release")
def release(data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Undo a reservation (a compensation served by an agent): what it released."""
    return {"released": data.get("output"), "why": params.get("why")}
