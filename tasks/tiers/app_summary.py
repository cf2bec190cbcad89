"""What an inventory deploys of its Dify release: services and where they run, the worker
queues, the routes through the load balancer. Read from the rendered plans (the compose files as
they will be written), so it says what a deploy does, not what a template meant to do."""

from __future__ import annotations

import yaml

from tasks.core.inventory import Inventory
from tasks.core.plan import TierPlan
from tasks.tiers import app, lb


def services(plans: list[TierPlan], inventory: Inventory) -> dict[str, list[str]]:
    """service -> the hosts whose compose project runs it (the one-off migration included)."""
    found: dict[str, list[str]] = {}
    compose = f"{app.deploy_dir(inventory)}/compose.yml"
    migration = f"{app.deploy_dir(inventory)}/migration/compose.yml"
    for plan in plans:
        for host_plan in plan.hosts if plan.tier == "app" else ():
            for step in host_plan.files():
                if step.path in (compose, migration):
                    for name in yaml.safe_load(step.content).get("services", {}):
                        found.setdefault(name, []).append(host_plan.host.name)
    return found


def lines(plans: list[TierPlan], inventory: Inventory) -> list[str]:
    """The release summary config.check prints."""
    profile = inventory.profile
    out = [f"Dify {profile.version} deploys:"]
    placed = services(plans, inventory)
    out += [f"  service {name}: {', '.join(hosts)}" for name, hosts in sorted(placed.items())]
    consumed = {group["name"]: inventory.worker_queues(group)
                for group in inventory.settings.app.worker_groups}
    out.append(f"  queues ({len(profile.queues)}): {', '.join(profile.queues)}")
    out += [f"    worker group {name}: {len(queues)} queue(s)"
            for name, queues in consumed.items()]
    if inventory.with_role("lb"):
        out.append("  routes: " + ", ".join(f"{route} -> {upstream.removeprefix('dify_')}"
                                           for route, _, upstream in lb.routes(inventory)))
    if profile.upgrade_steps:
        out.append("  on upgrade to it: " + ", ".join(f"flask {' '.join(s.command)}"
                                                       for s in profile.upgrade_steps))
    return out
