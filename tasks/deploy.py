"""deploy: the whole stack in dependency order, through the plan/apply engine."""

from __future__ import annotations

from invoke import Context, task

from tasks.core.cli import reported, run_tiers
from tasks.tiers import TIERS


@task(help={"dry": "print the plan with a diff of every file; touch nothing",
            "only": "comma-separated tiers to run, e.g. db,cache (default: all, in order)"})
@reported
def all(ctx: Context, dry: bool = False, only: str = "") -> None:
    """Deploy every tier of the inventory in dependency order (or only some, or --dry)."""
    run_tiers(ctx, list(TIERS), dry=dry, only=only)
