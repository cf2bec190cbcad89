"""Step builders for a host's operating system: OS packages and systemd units.

Used by the tiers and by the schedules the engine installs (backup and doctor timers), so that
one package install, one "enable and start" and one restart serve every unit difyops manages.
"""

from __future__ import annotations

from tasks.core import facts, shell
from tasks.core.plan import Restart, RunCommand


def packages(*names: str) -> RunCommand:
    """Install OS packages unless all are already installed (apt may start their services)."""
    return RunCommand(f"install {' '.join(names)}",
                      shell.command("export DEBIAN_FRONTEND=noninteractive; apt-get update -q && "
                                    "apt-get install -y -q --no-install-recommends {}",
                                    shell.words(*names)),
                      unless=facts.all_installed(*names))


def service_running(unit: str) -> RunCommand:
    """Enable and start a systemd unit unless it is already enabled and active."""
    quoted = shell.quote(unit)
    return RunCommand(f"enable and start {unit}",
                      f"{reset_failed(quoted)}systemctl enable --now {quoted}",
                      unless=facts.running_and_enabled(unit))


def service_restart(unit: str, *files: str) -> RunCommand:
    """Restart a unit when one of its configuration files changed."""
    quoted = shell.quote(unit)
    return RunCommand(f"restart {unit}", f"{reset_failed(quoted)}systemctl restart {quoted}",
                      on_change=files)


def reset_failed(quoted_unit: str) -> str:
    """Clear a unit's start rate limit first: a service that apt started before difyops wrote
    its configuration may have crash-looped into "start request repeated too quickly"."""
    return f"systemctl reset-failed {quoted_unit} 2>/dev/null; "


def restart_unit(unit: str) -> Restart:
    """deploy.doctor's way back for a systemd service: clear its start limit, restart it."""
    quoted = shell.quote(unit)
    return Restart(unit, f"{reset_failed(quoted)}systemctl restart {quoted}")
