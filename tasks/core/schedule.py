"""What a schedule installed by difyops needs of a machine: systemd (a timer) or cron (a file).

Shared by the backup schedule (tasks/backups/schedule.py) and the doctor's (doctor_schedule.py):
where the timer units and cron files go, this machine as a host, and which scheduler runs there.
"""

from __future__ import annotations

from tasks.core.hosts import Machine
from tasks.core.inventory import Host

UNIT_DIR = "/etc/systemd/system"
CRON_DIR = "/etc/cron.d"
CONTROL = Host(name="control", address="127.0.0.1", connection="local")


def has_systemd(machine: Machine) -> bool:
    """Whether systemd runs the machine (its runtime folder exists)."""
    return machine.run("test -d /run/systemd/system", sudo=False).ok


def has_cron(machine: Machine) -> bool:
    """Whether a cron daemon that reads /etc/cron.d is installed there."""
    return machine.run(f"test -d {CRON_DIR} && {{ command -v cron || command -v crond; }} "
                       f">/dev/null", sudo=False).ok
