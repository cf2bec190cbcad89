"""What a schedule installed by difyops needs of a machine: systemd (a timer) or cron (a file).

Shared by the backup schedule (tasks/backups/schedule.py) and the doctor's (doctor_schedule.py):
where the timer units and cron files go, this machine as a host, and which scheduler runs there.
"""

from __future__ import annotations

from tasks.core import facts, shell
from tasks.core.hosts import Machine
from tasks.core.inventory import Host
from tasks.core.plan import RunCommand, Step, WriteFile
from tasks.core.system import service_restart, service_running

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


def cron_steps(unit: str, cron_file: str) -> list[Step]:
    """The /etc/cron.d file `unit`, and the timer variant of the same schedule disabled."""
    timer = f"{unit}.timer"
    return [WriteFile(f"{CRON_DIR}/{unit}", cron_file),
            RunCommand(f"disable {timer}", shell.command("systemctl disable --now {}", timer),
                       unless=facts.not_enabled(timer))]


def timer_steps(unit: str, service_file: str, timer_file: str) -> list[Step]:
    """The systemd service and timer `unit`, enabled and started (restarted when the timer
    changed), and the cron variant of the same schedule removed."""
    service_path, timer_path = f"{UNIT_DIR}/{unit}.service", f"{UNIT_DIR}/{unit}.timer"
    timer, crontab = f"{unit}.timer", f"{CRON_DIR}/{unit}"
    return [
        WriteFile(service_path, service_file),
        WriteFile(timer_path, timer_file),
        RunCommand("systemctl daemon-reload", "systemctl daemon-reload",
                   on_change=(service_path, timer_path)),
        service_running(timer),
        service_restart(timer, timer_path),
        RunCommand(f"remove {crontab}", shell.command("rm -f {}", crontab),
                   unless=facts.is_absent(crontab)),
    ]
