"""Health of a deployment: every gate of every tier's plan probed once, per host, no waiting.

The gates a deploy waits on are exactly the checks that say a component is healthy, so status
reuses them instead of describing health a second time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tasks.core.errors import DifyopsError
from tasks.core.fleet import each_host
from tasks.core.hosts import Machine
from tasks.core.plan import HostPlan, TierPlan, WaitFor

NOT_DEPLOYED = "nothing deployed on this host yet: run `inv deploy.all`"


@dataclass(frozen=True)
class Probe:
    """One gate's answer on one host."""

    host: str
    tier: str
    component: str
    healthy: bool
    answer: str


def probe_all(plans: list[TierPlan], timeouts: Mapping[str, int] | None = None) -> list[Probe]:
    """Probe every gate once; an unreachable host gives one unhealthy line per gate."""
    hosts = {plan.host.name: plan.host for tier in plans for plan in tier.hosts}
    gates = {name: [(tier.tier, plan, step.gate) for tier in plans for plan in tier.hosts
                    if plan.host.name == name for step in plan.steps
                    if isinstance(step, WaitFor)] for name in hosts}

    def probe_host(machine: Machine) -> list[Probe]:
        probes, deployed = [], {}
        for tier, plan, gate in gates[machine.host.name]:
            if tier not in deployed:
                deployed[tier] = was_deployed(machine, plan)
            if not deployed[tier]:
                healthy, answer = False, NOT_DEPLOYED
            else:
                try:
                    healthy, answer = gate.probe(machine)
                except DifyopsError as exc:
                    healthy, answer = False, str(exc)
            probes.append(Probe(machine.host.name, tier, gate.name, healthy, answer))
        return probes

    outcomes = each_host([hosts[name] for name in hosts if gates[name]], probe_host, timeouts)
    results: list[Probe] = []
    for outcome in outcomes:
        if outcome.ok:
            results.extend(outcome.value or [])
        else:
            results.extend(Probe(outcome.host.name, tier, gate.name, False, outcome.error)
                           for tier, _, gate in gates[outcome.host.name])
    return results


def was_deployed(machine: Machine, plan: HostPlan) -> bool:
    """Whether a tier was ever deployed on a host: a file it manages there exists (a tier that
    writes no file counts as deployed; its gates tell the rest)."""
    files = plan.files()
    return not files or any(machine.file_state(step.path) is not None for step in files)
