"""chassis CLI commands (db)."""

from __future__ import annotations

from chassis.cli.base import main  # noqa: F401
