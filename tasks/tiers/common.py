"""Step builders several tiers share: OS packages, systemd services, compose projects."""

from __future__ import annotations

import shlex

from tasks.core.plan import Restart, RunCommand


def packages(*names: str) -> RunCommand:
    """Install OS packages unless all are already installed (apt may start their services)."""
    listed = " ".join(names)
    probe = " && ".join(
        f"dpkg-query -W -f='${{Status}}' {shlex.quote(n)} 2>/dev/null | grep -q 'ok installed'"
        for n in names)
    return RunCommand(f"install {listed}",
                      f"export DEBIAN_FRONTEND=noninteractive; apt-get update -q && "
                      f"apt-get install -y -q --no-install-recommends {listed}",
                      unless=probe)


def service_running(unit: str) -> RunCommand:
    """Enable and start a systemd unit unless it is already enabled and active."""
    quoted = shlex.quote(unit)
    return RunCommand(f"enable and start {unit}",
                      f"{reset_failed(quoted)}systemctl enable --now {quoted}",
                      unless=f"systemctl is-enabled --quiet {quoted} && "
                             f"systemctl is-active --quiet {quoted}")


def service_restart(unit: str, *files: str) -> RunCommand:
    """Restart a unit when one of its configuration files changed."""
    quoted = shlex.quote(unit)
    return RunCommand(f"restart {unit}", f"{reset_failed(quoted)}systemctl restart {quoted}",
                      on_change=files)


def reset_failed(quoted_unit: str) -> str:
    """Clear a unit's start rate limit first: a service that apt started before difyops wrote
    its configuration may have crash-looped into "start request repeated too quickly"."""
    return f"systemctl reset-failed {quoted_unit} 2>/dev/null; "


def compose_up(directory: str, project: str, *files: str) -> RunCommand:
    """Bring a compose project up (waiting for its healthchecks) when its files changed."""
    compose = f"docker compose --project-directory {shlex.quote(directory)} -p {project}"
    return RunCommand(f"compose up {project}", f"{compose} up -d --wait --remove-orphans",
                      on_change=files)


def restart_unit(unit: str) -> Restart:
    """deploy.doctor's way back for a systemd service: clear its start limit, restart it."""
    quoted = shlex.quote(unit)
    return Restart(unit, f"{reset_failed(quoted)}systemctl restart {quoted}")


def restart_compose(directory: str, project: str, service: str) -> Restart:
    """deploy.doctor's way back for a compose service: restart its container (started when
    stopped), then create it if it is missing, from the files the last deploy wrote."""
    compose = f"docker compose --project-directory {shlex.quote(directory)} -p {project}"
    return Restart(f"{project}/{service}",
                   f"{compose} restart {service} && {compose} up -d --no-recreate {service}")
