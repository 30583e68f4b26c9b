"""`squeeze distill` command (placeholder until its subsystem lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the squeeze CLI."""
