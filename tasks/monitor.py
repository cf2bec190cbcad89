"""monitor: exporters on every host; Prometheus, Alertmanager and Grafana on the monitor host."""

from __future__ import annotations

from invoke import Context, task
from invoke.exceptions import Exit

from tasks.core.cli import deploy_task, load, reported
from tasks.core.errors import InputError, Problem
from tasks.core.fleet import table
from tasks.core.project import display
from tasks.tiers.monitor import TIER, alerts, prometheus_url, targets

deploy = deploy_task(TIER)


@task
@reported
def status(ctx: Context) -> None:
    """Show every scrape target (up/down) and every pending or firing alert, from Prometheus."""
    inventory = load(ctx)
    if not inventory.with_role("monitor"):
        raise InputError([Problem(display(inventory.file), "hosts[*].roles",
                                  "no host has the role 'monitor'",
                                  "add 'monitor' to the roles of a host, then run "
                                  "`inv monitor.deploy`")])
    found, held = targets(inventory), alerts(inventory)
    print(f"Prometheus {prometheus_url(inventory)}: {len(found)} target(s)")
    print(table(["job", "host", "instance", "health", "last error"],
                [[t.job, t.host, t.instance, t.health, t.error] for t in found]))
    print(f"\n{len(held)} alert(s) pending or firing")
    if held:
        print(table(["alert", "host", "state", "severity", "since", "summary"],
                    [[a.name, a.host, a.state, a.severity, a.since, a.summary] for a in held]))
    down = [f"{t.job}@{t.host or t.instance}" for t in found if t.health != "up"]
    firing = [f"{a.name}@{a.host}" if a.host else a.name for a in held if a.state == "firing"]
    if down or firing:
        raise Exit("error: " + "; ".join(
            part for part in (f"target(s) down: {', '.join(down)}" if down else "",
                              f"alert(s) firing: {', '.join(firing)}" if firing else "")
            if part) + ". See the tables above.", code=1)
