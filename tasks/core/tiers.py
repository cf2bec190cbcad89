"""Tiers: what each part of the stack deploys, in dependency order.

A tier module (tasks/tiers/<name>.py) describes WHAT: the hosts it applies to and, per host,
its files, commands and gates. This module turns tiers into plans for the executor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tasks.core.errors import InputError, Problem
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import HostPlan, Step, TierPlan
from tasks.core.render import Renderer

StepBuilder = Callable[[Inventory, Renderer, Host], list[Step]]


@dataclass(frozen=True)
class Tier:
    """A part of the stack: which hosts it runs on and what it does on each."""

    name: str
    summary: str
    roles: tuple[str, ...]
    steps: StepBuilder
    depends_on: tuple[str, ...] = ()
    serial: bool = False
    # Run the offline validators (tasks/core/validators.py) on the tier's rendered files before
    # any host is touched; a failure stops the deploy there.
    validate: bool = False
    # The hosts the tier's other hosts wait on through a gate: planned (and started) first, so
    # that a deploy with fewer workers than hosts (deploy.all --parallel N) never waits on a
    # host that is not running yet. None: inventory order.
    leaders: Callable[[Inventory], list[Host]] | None = None

    def plan(self, inventory: Inventory, renderer: Renderer | None = None) -> TierPlan:
        """The tier's plan for this inventory (no host is contacted)."""
        renderer = renderer or Renderer(inventory)
        members = inventory.with_role(*self.roles)
        if self.leaders is not None:
            first = [h.name for h in self.leaders(inventory)]
            members.sort(key=lambda h: first.index(h.name) if h.name in first else len(first))
        hosts = [HostPlan(host, self.steps(inventory, renderer, host)) for host in members]
        return TierPlan(self.name, [plan for plan in hosts if plan.steps], self.depends_on,
                        self.serial)


def select(tiers: Iterable[Tier], only: str | None) -> list[Tier]:
    """The tiers named in a comma-separated --only (all when empty), in dependency order."""
    tiers = list(tiers)
    if not only:
        return tiers
    names = [name.strip() for name in only.split(",") if name.strip()]
    known = [tier.name for tier in tiers]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InputError([Problem("--only", ",".join(unknown), "unknown tier",
                                  f"use tier names from: {', '.join(known)}")])
    return [tier for tier in tiers if tier.name in names]


def build(tiers: Iterable[Tier], inventory: Inventory) -> list[TierPlan]:
    """Plans for the tiers, sharing one renderer."""
    renderer = Renderer(inventory)
    return [tier.plan(inventory, renderer) for tier in tiers]
