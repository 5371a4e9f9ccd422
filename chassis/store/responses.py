"""A model's answer to one attempt (rows of ``model_responses``), kept as soon as it
arrives so that the same attempt delivered again (its worker was lost before the
outcome was recorded) uses it instead of calling, and paying, the model again.

One row per (workflow, step, attempt): the first answer recorded wins. Each write is its
own short transaction, committed before the action returns; it touches no workflow
state, so it needs no version check.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from chassis.store.tables import model_responses

m = model_responses.c


def record(engine: sa.Engine, cid: str, step: str, attempt: int,
           response: dict[str, Any]) -> bool:
    """Keep ``response`` for the attempt; False when one was already kept (that one
    stays: the first wins)."""
    values = {"correlation_id": cid, "step_name": step, "attempt": attempt,
              "response": response, "created_at": datetime.now(UTC)}
    insert: Any = (postgresql.insert if engine.dialect.name == "postgresql"
                   else sqlite.insert)(model_responses)
    with engine.begin() as conn:
        done = conn.execute(insert.values(**values).on_conflict_do_nothing(
            index_elements=[m.correlation_id, m.step_name, m.attempt]).returning(m.attempt))
        return done.first() is not None


def recorded(engine: sa.Engine, cid: str, step: str, attempt: int) -> dict[str, Any] | None:
    """The response kept for the attempt, if any."""
    with engine.connect() as conn:
        value = conn.execute(sa.select(m.response).where(
            m.correlation_id == cid, m.step_name == step, m.attempt == attempt)).scalar()
    return value if isinstance(value, dict) else None


__all__ = ["record", "recorded"]
