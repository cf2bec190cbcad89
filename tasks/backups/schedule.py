"""backup.schedule: a daily `inv backup.run` from a systemd timer, or a cron line without systemd.

The schedule is a plan like a tier's (files, commands with probes, nothing changed on a rerun)
applied to the control machine, or to an inventory host that holds the same difyops checkout.
Its wrapper script (backup/difyops-backup.sh.j2) runs `inv backup.run backup.prune` and reports
a failure: non-zero exit, a log line, syslog, and a POST to monitor.alert_webhook when set.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from tasks.backups import settings
from tasks.core import shell
from tasks.core.apply import execute
from tasks.core.errors import DifyopsError
from tasks.core.hosts import connect
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import HostPlan, Step, TierPlan, WriteFile
from tasks.core.project import ROOT
from tasks.core.render import Renderer
from tasks.core.report import Report
from tasks.core.schedule import (
    CONTROL,
    cron_steps,
    has_cron,
    has_systemd,
    timer_steps,
)

WRAPPER_DIR = "/usr/local/sbin"


def unit_name(inventory: Inventory) -> str:
    """difyops-backup-<inventory name>: one schedule per inventory on a machine."""
    return "difyops-backup-" + re.sub(r"[^A-Za-z0-9_-]", "-", inventory.name)


def target(inventory: Inventory, host_name: str = "") -> Host:
    """Where the schedule is installed: this machine, or a host of the inventory."""
    return inventory.host(host_name) if host_name else CONTROL


def context(inventory: Inventory) -> dict[str, Any]:
    """What the templates of backup/ need."""
    name = unit_name(inventory)
    hour, minute = inventory.settings.backup.time.split(":")
    return {
        "name": name,
        "wrapper": f"{WRAPPER_DIR}/{name}",
        "log": f"{inventory.settings.backup.dir.rstrip('/')}/backup.log",
        "webhook": inventory.settings.monitor.alert_webhook,
        "project": str(ROOT),
        "python": sys.executable,
        "inventory_file": str(inventory.file),
        "secrets_file": str(inventory.secrets_file),
        "known_hosts": str(inventory.known_hosts or ""),
        "hour": hour,
        "minute": minute,
        "shquote": shell.quote,
    }


def cron_line(inventory: Inventory) -> str:
    """The crontab line (user crontab form, without the user field)."""
    values = context(inventory)
    return f"{int(values['minute'])} {int(values['hour'])} * * * {values['wrapper']}"


def steps(inventory: Inventory, renderer: Renderer, host: Host, *, cron: bool,
          wrapper_only: bool = False) -> list[Step]:
    """The wrapper, then the timer and service (systemd) or the /etc/cron.d file (cron)."""
    values = context(inventory)
    name = values["name"]
    plan: list[Step] = [
        # secret: the webhook URL (a Slack webhook is a credential) never shows in a diff
        WriteFile(values["wrapper"], renderer.render("backup/difyops-backup.sh.j2", host,
                                                     **values), mode=0o700, secret=True),
    ]
    if wrapper_only:
        return plan
    if cron:
        return [*plan, *cron_steps(name, renderer.render("backup/difyops-backup.cron.j2", host,
                                                         **values))]
    return [*plan, *timer_steps(
        name, renderer.render("backup/difyops-backup.service.j2", host, **values),
        renderer.render("backup/difyops-backup.timer.j2", host, **values))]


def plan(inventory: Inventory, host: Host, *, cron: bool,
         wrapper_only: bool = False) -> list[TierPlan]:
    """The schedule as a one-host plan for the executor."""
    return [TierPlan("backup", [HostPlan(host, steps(inventory, Renderer(inventory), host,
                                                     cron=cron, wrapper_only=wrapper_only))])]


def install(inventory: Inventory, *, host_name: str = "", dry: bool = False,
            cron: bool = False) -> Report:
    """backup.schedule: the timer (or cron line) and its script, through the executor."""
    settings.check(inventory)
    host = target(inventory, host_name)
    machine = connect(host, inventory.settings.timeouts)
    try:
        use_cron = cron or not has_systemd(machine)
        nothing_runs_it = use_cron and not has_cron(machine)
    finally:
        machine.close()
    kind = "script only" if nothing_runs_it else "cron line" if use_cron else "systemd timer"
    print(f"{'dry run of' if dry else 'installing'} the {kind} {unit_name(inventory)} on "
          f"{host.target}: daily at {inventory.settings.backup.time}", flush=True)
    # A dry run shows the few small files of the schedule in full.
    report = execute(plan(inventory, host, cron=use_cron, wrapper_only=nothing_runs_it),
                     dry=dry, show_diff=True, timeouts=inventory.settings.timeouts)
    if report.failed:
        raise DifyopsError("the schedule was not installed completely; see the summary above, "
                           "fix the cause and run the same command again")
    if nothing_runs_it:
        raise DifyopsError(f"{host.target} runs neither systemd nor cron, so nothing runs the "
                           f"backup yet: install cron (Debian package cron) and run `inv "
                           f"backup.schedule` again, or have your scheduler run this daily "
                           f"(crontab form):\n{cron_line(inventory)}")
    return report
