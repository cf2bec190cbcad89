"""deploy.doctor --schedule: doctor every `doctor.every` minutes on the control machine.

A systemd timer where systemd runs the machine, else a file in /etc/cron.d; a plan like a tier's
(files, commands with probes, nothing changed on a rerun) applied to this machine. Doctor itself
posts to the alert webhook; the schedule only runs it (exit 75, a deploy holding the lock, counts
as success: the next tick tries again).
"""

from __future__ import annotations

import re
import sys

from tasks.core import shell
from tasks.core.apply import execute
from tasks.core.errors import DifyopsError, InputError, Problem
from tasks.core.hosts import connect
from tasks.core.inventory import Inventory
from tasks.core.plan import HostPlan, Step, TierPlan
from tasks.core.project import ROOT, display
from tasks.core.report import Report
from tasks.core.schedule import CONTROL, cron_steps, has_cron, has_systemd, timer_steps


def name(inventory: Inventory) -> str:
    """difyops-doctor-<inventory name>: one schedule per inventory on a machine."""
    return "difyops-doctor-" + re.sub(r"[^A-Za-z0-9_-]", "-", inventory.name)


def every(inventory: Inventory) -> int:
    """Minutes between two runs; refused outside 1..59 before anything is touched."""
    minutes = inventory.settings.doctor.every
    if not 1 <= minutes <= 59:
        raise InputError([Problem(display(inventory.file), "doctor.every", f"{minutes}",
                                  "minutes between two doctor runs: from 1 to 59")])
    return minutes


def environment(inventory: Inventory) -> dict[str, str]:
    """What `inv` needs to find the inventory, its secrets and its SSH host keys from any
    working directory."""
    found = {"DIFY_INVENTORY": str(inventory.file), "DIFY_SECRETS": str(inventory.secrets_file)}
    if inventory.known_hosts:
        found["DIFY_KNOWN_HOSTS"] = str(inventory.known_hosts)
    return found


def header(inventory: Inventory) -> str:
    return (f"# Managed by difyops (`inv deploy.doctor --schedule`) for inventory "
            f"{inventory.name}; edits are overwritten.\n")


def doctor_args(only: str) -> str:
    """The task and its flags as the schedule runs it."""
    return shell.words("deploy.doctor", *(("--only", only) if only else ()))


def service(inventory: Inventory, only: str = "") -> str:
    """The oneshot unit that runs doctor once."""
    env = "".join(f'Environment="{key}={value}"\n' for key, value in
                  environment(inventory).items())
    return (f"{header(inventory)}[Unit]\nDescription=difyops doctor of Dify (inventory "
            f"{inventory.name}): restart what is down, report what needs a person\n"
            f"Wants=network-online.target\nAfter=network-online.target\n\n"
            f"[Service]\nType=oneshot\nWorkingDirectory={ROOT}\n{env}"
            f'ExecStart="{sys.executable}" -m invoke {doctor_args(only)}\n'
            f"# 75: a deploy held the lock; doctor checked nothing and runs at the next tick\n"
            f"SuccessExitStatus=75\nTimeoutStartSec=1h\n")


def timer(inventory: Inventory) -> str:
    """Every `doctor.every` minutes, counted from the end of the last run (never two at once);
    the first run that long after the timer starts (at boot, or when installed)."""
    minutes = every(inventory)
    return (f"{header(inventory)}[Unit]\nDescription=difyops doctor every {minutes} min "
            f"(inventory {inventory.name})\n\n[Timer]\nOnActiveSec={minutes}min\n"
            f"OnUnitInactiveSec={minutes}min\nUnit={name(inventory)}.service\n\n"
            f"[Install]\nWantedBy=timers.target\n")


def log_file(inventory: Inventory) -> str:
    """Where the cron variant appends doctor's output."""
    return f"/var/log/{name(inventory)}.log"


def cron_command(inventory: Inventory, only: str = "") -> str:
    """The command of the crontab line."""
    env = shell.assignments(environment(inventory))
    return shell.command("cd {} && {} {} -m invoke {} >>{} 2>&1", ROOT, env, sys.executable,
                         doctor_args(only), log_file(inventory))


def cron(inventory: Inventory, only: str = "") -> str:
    """The /etc/cron.d file (with its user field)."""
    return (f"{header(inventory)}# Every {every(inventory)} minutes; output goes to "
            f"{log_file(inventory)}.\nSHELL=/bin/sh\n"
            f"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
            f"*/{every(inventory)} * * * * root {cron_command(inventory, only)}\n")


def steps(inventory: Inventory, *, use_cron: bool, only: str = "") -> list[Step]:
    """The timer and its service (systemd), or the cron file; the other variant removed."""
    unit = name(inventory)
    if use_cron:
        return cron_steps(unit, cron(inventory, only))
    return timer_steps(unit, service(inventory, only), timer(inventory))


def install(inventory: Inventory, *, dry: bool = False, only: str = "") -> Report:
    """The schedule on this machine, through the executor."""
    minutes = every(inventory)
    machine = connect(CONTROL, inventory.settings.timeouts)
    try:
        use_cron = not has_systemd(machine)
        nothing_runs_it = use_cron and not has_cron(machine)
    finally:
        machine.close()
    if nothing_runs_it:
        raise DifyopsError(f"this machine runs neither systemd nor cron: install cron (Debian "
                           f"package cron) and run `inv deploy.doctor --schedule` again, or "
                           f"have your scheduler run this every {minutes} minutes:\n"
                           f"{cron_command(inventory, only)}")
    kind = "cron file" if use_cron else "systemd timer"
    print(f"{'dry run of' if dry else 'installing'} the {kind} {name(inventory)} on this "
          f"machine: deploy.doctor every {minutes} min", flush=True)
    plan = steps(inventory, use_cron=use_cron, only=only)
    # A dry run shows the few small files of the schedule in full.
    report = execute([TierPlan("doctor", [HostPlan(CONTROL, plan)])],
                     dry=dry, show_diff=True, timeouts=inventory.settings.timeouts)
    if report.failed:
        raise DifyopsError("the schedule was not installed completely; see the summary above, "
                           "fix the cause and run the same command again")
    return report
