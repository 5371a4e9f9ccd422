"""The ``chassis`` command group. Each command module registers its commands on ``main``."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentchassis", prog_name="chassis")
def main() -> None:
    """agentchassis: durable, budgeted workflows for AI-agent pipelines, on Celery.

    With no CHASSIS_* variables set, everything runs embedded (SQLite and a file-system
    broker under ./.chassis). Try `chassis demo`.
    """
