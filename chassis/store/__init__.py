"""Durable storage of workflow state, step runs, the fuel ledger and the outbox.

``Store`` is the role; :class:`chassis.store.sql.SqlStore` implements it on SQLAlchemy
(PostgreSQL in production, SQLite embedded).
"""

from __future__ import annotations

from chassis.store.sql import SqlStore, StaleState

Store = SqlStore

__all__ = ["SqlStore", "StaleState", "Store"]
