"""Step builders several tiers share: compose projects (OS packages and systemd units are the
engine's: tasks/core/system.py)."""

from __future__ import annotations

from tasks.core import shell
from tasks.core.plan import Restart, RunCommand


def compose_up(directory: str, project: str, *files: str,
               wait_timeout: float | None = None) -> RunCommand:
    """Bring a compose project up (waiting for its healthchecks) when its files changed; with
    wait_timeout, give up after that many seconds and name what is not healthy (wait_bounded)."""
    compose = shell.compose(directory, project)
    command = f"{compose} up -d --wait --remove-orphans"
    if wait_timeout is not None:
        command = wait_bounded(compose, command, wait_timeout)
    return RunCommand(f"compose up {project}", command, on_change=files)


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
