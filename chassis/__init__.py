"""agentchassis: a durable, budgeted, observable workflow engine for AI-agent pipelines."""

from __future__ import annotations

__version__ = "0.1.0"
