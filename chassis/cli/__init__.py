"""Command-line interface: ``chassis``. Only the CLI configures logging handlers."""

from __future__ import annotations

from chassis.cli import (  # noqa: F401  (register their commands)
    budget,
    db,
    fuel,
    kafka,
    ops,
    plans,
    registry,
    web,
    workflows,
)
from chassis.cli.base import main

__all__ = ["main"]
