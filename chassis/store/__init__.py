"""Durable storage of workflow state, attempts, the fuel ledger and the outbox.

``Store`` is the role (:mod:`chassis.store.base`); :class:`chassis.store.sql.SqlStore`
implements it on SQLAlchemy (PostgreSQL in production, SQLite embedded).
"""

from __future__ import annotations

from chassis.store.attempts import Stuck
from chassis.store.base import Store
from chassis.store.sql import Claim, SqlStore, StaleState, StoreConflict

__all__ = ["Claim", "SqlStore", "StaleState", "Store", "StoreConflict", "Stuck"]
