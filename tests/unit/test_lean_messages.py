"""A step's Celery message carries ids and params, never the workflow's data: its size
does not grow with what the workflow has collected (the worker reads the data with its
claim)."""

from __future__ import annotations

import json

from chassis import coordinator as co
from chassis.engine import message
from chassis.state import Status, WorkflowState


def test_a_step_message_is_the_same_size_however_much_was_collected() -> None:
    sizes = []
    for outputs in (0, 10, 300):
        s = WorkflowState(correlation_id="5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d",
                          client_id="acme", status=Status.RUNNING, current_step="next",
                          fuel_budget=10, initial_request_data={"q": "x" * 10_000},
                          collected_data={f"s{i}": {"blob": "y" * 10_000}
                                          for i in range(outputs)})
        run = co.RunStep("next", "echo", {"p": 1}, "rid", None, 2, 30.0)
        body = message(s, run)
        assert "data" not in body
        assert body == {"cid": s.correlation_id, "step": "next", "action": "echo",
                        "params": {"p": 1}, "parent": None, "attempt": 2, "timeout": 30.0}
        sizes.append(len(json.dumps(body)))
    assert len(set(sizes)) == 1 and sizes[0] < 300
