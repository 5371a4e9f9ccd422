"""Command-line interface: ``chassis``. Only the CLI configures logging handlers."""

from __future__ import annotations

from chassis.cli import db, plans, registry, workflows  # noqa: F401  (register their commands)
from chassis.cli.base import main

__all__ = ["main"]
