"""deploy: the whole stack in dependency order, through the plan/apply engine."""

from __future__ import annotations

from invoke import Context, task
from invoke.exceptions import Exit

from tasks.core.cli import load, reported, run_tiers
from tasks.core.fleet import table
from tasks.core.health import probe_all
from tasks.core.tiers import build, select
from tasks.tiers import TIERS


@task(help={"dry": "print the plan with a diff of every file; touch nothing",
            "only": "comma-separated tiers to run, e.g. db,cache (default: all, in order)"})
@reported
def all(ctx: Context, dry: bool = False, only: str = "") -> None:
    """Deploy every tier of the inventory in dependency order (or only some, or --dry)."""
    run_tiers(ctx, list(TIERS), dry=dry, only=only)


@task(help={"only": "comma-separated tiers to check (default: all)"})
@reported
def status(ctx: Context, only: str = "") -> None:
    """One table of every component on every host; exit non-zero when anything is unhealthy."""
    inventory = load(ctx)
    plans = build(select(TIERS, only), inventory)
    probes = probe_all(plans, inventory.settings["timeouts"])
    print(table(["host", "tier", "component", "state", "answer"],
                [(p.host, p.tier, p.component, "healthy" if p.healthy else "UNHEALTHY",
                  p.answer[:100]) for p in probes]))
    print(f"Dify {inventory.profile.version}, inventory {inventory.name}")
    unhealthy = [p for p in probes if not p.healthy]
    if unhealthy:
        raise Exit(f"error: {len(unhealthy)} component(s) unhealthy: "
                   + ", ".join(f"{p.component} on {p.host}" for p in unhealthy), code=1)
