"""chassis CLI commands (workflows)."""

from __future__ import annotations

from chassis.cli.base import main  # noqa: F401
