"""Step builders several tiers share: OS packages, systemd services, compose projects."""

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


def compose_up(directory: str, project: str, *files: str,
               wait_timeout: float | None = None) -> RunCommand:
    """Bring a compose project up (waiting for its healthchecks) when its files changed; with
    wait_timeout, give up after that many seconds and name what is not healthy (wait_bounded)."""
    compose = shell.compose(directory, project)
    command = f"{compose} up -d --wait --remove-orphans"
    if wait_timeout is not None:
        command = wait_bounded(compose, command, wait_timeout)
    return RunCommand(f"compose up {project}", command, on_change=files)


def restart_unit(unit: str) -> Restart:
    """deploy.doctor's way back for a systemd service: clear its start limit, restart it."""
    quoted = shell.quote(unit)
    return Restart(unit, f"{reset_failed(quoted)}systemctl restart {quoted}")


def restart_compose(directory: str, project: str, service: str) -> Restart:
    """deploy.doctor's way back for a compose service: restart its container (started when
    stopped), then create it if it is missing, from the files the last deploy wrote."""
    return Restart(f"{project}/{service}", shell.command(
        "{compose} restart {service} && {compose} up -d --no-recreate {service}",
        compose=shell.compose(directory, project), service=service))


# docker inspect templates: a container's service, its state (+ health), its health answers.
SERVICE = '{{index .Config.Labels "com.docker.compose.service"}}'
STATE = "{{.State.Status}}{{with .State.Health}} {{.Status}}{{end}}"
CHECKS = "{{with .State.Health}}{{range .Log}}{{json .Output}}{{println}}{{end}}{{end}}"
# One health answer (a JSON string, one line) as text: quotes off, newlines as spaces.
UNQUOTE = r"""sed 's/^"//; s/"$//; s/\\n/ /g; s/ *$//; s/\\"/"/g'"""


def wait_bounded(compose: str, up: str, timeout: float, *services: str) -> str:
    """`up ... --wait` given up after `timeout` seconds; when it fails, its last line says which
    service is not healthy, its state, the last answer of its healthcheck and its last log lines,
    e.g. `api (running unhealthy) last health check: "...503...", last log lines: a | b`."""
    seconds = max(int(timeout), 1)
    names = "".join(f" {shell.quote(s)}" for s in services)
    return (f"{up} --wait-timeout {seconds} || {{ why=''; "
            f"for id in $({compose} ps -aq{names}); do "
            f"state=$(docker inspect -f '{STATE}' \"$id\"); "
            f"case \"$state\" in 'running healthy'|running) continue;; esac; "
            f"service=$(docker inspect -f '{SERVICE}' \"$id\"); "
            f"last=$(docker inspect -f '{CHECKS}' \"$id\" | sed '/^$/d' | tail -n 1 | {UNQUOTE} "
            f"| cut -c1-300); "
            f"logs=$(docker logs --tail 3 \"$id\" 2>&1 | awk 'NF {{ printf \"%s%s\", s, $0; "
            f"s=\" | \" }}' | cut -c1-400); "
            f"why=\"$why${{why:+; }}$service ($state) ${{last:+last health check: $last, }}"
            f"last log lines: $logs\"; done; "
            f"printf '%s\\n' \"not healthy after {seconds} s: ${{why:-see the output above}}\" "
            f">&2; "
            f"exit 1; }}")
