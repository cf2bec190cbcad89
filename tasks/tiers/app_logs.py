"""The app tier's logs (app.logs): every host that runs a service, each line prefixed with its
host and service.

Without --follow, each source's lines since a time are read at once (hosts in parallel) and
merged by their timestamps, which Docker records per line in UTC. With --follow, every source is
streamed as it comes, each from its own terminal on the host: ending the run (Ctrl-C) closes the
connections, the terminals hang up, and no `docker compose logs` stays behind on a host.
"""

from __future__ import annotations

import re
import shlex
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tasks.core.errors import DifyopsError, InputError, Problem
from tasks.core.fleet import each_host
from tasks.core.hosts import Machine, connect
from tasks.core.inventory import APP_ROLES, Host, Inventory
from tasks.core.project import display
from tasks.tiers.app import compose, deploy_dir, services_of

# What `docker logs --since` takes: a duration (10m, 1h30m, 45s) or a date and time.
SINCE = re.compile(r"^(\d+[smh])+$"
                   r"|^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?$")


@dataclass(frozen=True)
class Source:
    """One service on one host."""

    host: Host
    service: str

    @property
    def prefix(self) -> str:
        return f"{self.host.name} {self.service} |"


def sources(inventory: Inventory, service: str = "", host: str = "") -> list[Source]:
    """Every (host, service) of the app tier, or those of one service and/or one host."""
    hosts = [inventory.host(host)] if host else inventory.with_role(*APP_ROLES)
    found = [Source(h, s) for h in hosts for s in services_of(inventory, h)
             if not service or s == service]
    if not found:
        what = f"the service {service!r}" if service else "no app service"
        where = f"on {host}" if host else "on any host"
        raise InputError([Problem(display(inventory.file), "hosts",
                                  f"{what} does not run {where}" if service else
                                  f"{what} runs {where}",
                                  "name a service the host runs (inv app.status lists them) "
                                  "with --service, or another host with --host")])
    return found


def logs_command(inventory: Inventory, service: str, since: str, follow: bool) -> str:
    """docker compose logs of one service: timestamped, without colour or compose's prefix."""
    if since and not SINCE.match(since):
        raise InputError([Problem("--since", since, "is neither a duration nor a date",
                                  "give a duration such as 10m, 2h or 1h30m, or a time such as "
                                  "2026-12-07T09:00:00Z")])
    words = [compose(deploy_dir(inventory)), "logs", "--no-color", "--no-log-prefix",
             "--timestamps"]
    words += ["--since", shlex.quote(since)] if since else []
    words += ["--follow"] if follow else []
    return " ".join([*words, shlex.quote(service)])


def merged(answers: list[tuple[Source, str]], grep: str = "") -> list[str]:
    """The lines of every source, in time order (Docker's timestamps), prefixed, filtered by
    a plain ``grep`` text when given."""
    stamped = []
    for source, text in answers:
        for raw in text.splitlines():
            stamp, _, message = raw.partition(" ")
            if not grep or grep in message:
                stamped.append((stamp, f"{source.prefix} {stamp} {message}"))
    return [line for _, line in sorted(stamped, key=lambda pair: pair[0])]


def read(inventory: Inventory, chosen: list[Source], since: str, grep: str) -> list[str]:
    """The logs of every source since a time, merged. A host that cannot answer stops it."""
    by_host: dict[str, list[Source]] = {}
    for source in chosen:
        by_host.setdefault(source.host.name, []).append(source)

    def one(machine: Machine) -> list[tuple[Source, str]]:
        answers = []
        for source in by_host[machine.host.name]:
            result = machine.check(logs_command(inventory, source.service, since, False))
            answers.append((source, result.stdout))
        return answers

    hosts = [inventory.host(name) for name in by_host]
    outcomes = each_host(hosts, one, inventory.settings["timeouts"])
    failed = [f"{o.host.name}: {o.error}" for o in outcomes if not o.ok]
    if failed:
        raise DifyopsError("cannot read the logs of " + "; ".join(failed))
    return merged([pair for o in outcomes for pair in o.value or []], grep)


class PrefixedLines:
    """A text stream that writes each complete line it receives, prefixed and filtered, to
    ``emit`` (shared by every source's thread)."""

    def __init__(self, prefix: str, grep: str, emit: Callable[[str], None]) -> None:
        self.prefix, self.grep, self.emit = prefix, grep, emit
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text.replace("\r", "")
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line and (not self.grep or self.grep in line.partition(" ")[2]):
                self.emit(f"{self.prefix} {line}")
        return len(text)

    def flush(self) -> None:
        """Nothing held back but a partial line."""


def follow(inventory: Inventory, chosen: list[Source], since: str, grep: str) -> None:
    """Stream every source until every stream ended or the run is interrupted (Ctrl-C); then
    close every connection, which ends the remote commands."""
    printing = threading.Lock()

    def emit(line: str) -> None:
        with printing:
            print(line, flush=True)

    machines: list[Machine] = []
    threads = []
    for source in chosen:
        machine = connect(source.host, inventory.settings["timeouts"])
        machines.append(machine)
        command = logs_command(inventory, source.service, since, True)
        lines = PrefixedLines(source.prefix, grep, emit)
        threads.append(threading.Thread(target=_stream, args=(machine, command, lines, source),
                                        daemon=True))
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)  # in short waits: Ctrl-C reaches this thread
    finally:
        for machine in machines:
            machine.close()


def _stream(machine: Machine, command: str, lines: PrefixedLines, source: Source) -> None:
    """One source's stream; a failure is said on stderr and ends only this stream."""
    try:
        machine.attach(command, hangup=True, out=lines)
    except DifyopsError as exc:
        print(f"{source.prefix} stopped: {exc}", file=sys.stderr, flush=True)
