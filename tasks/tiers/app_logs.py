"""The app tier's logs (app.logs): every host that runs a service, each line prefixed with its
host and service.

A source is a compose service (production layout) or a systemd unit of the home-lab layout
(dev.backend's api and worker, dev.frontend's web on Linux), read through `journalctl` in JSON.
Without --follow, each source's lines since a time are read at once (hosts in parallel) and
merged by their timestamps, which Docker and journald record per line. With --follow, every
source is streamed as it comes, each from its own terminal on the host: ending the run (Ctrl-C)
closes the connections, the terminals hang up, and no reader stays behind on a host.
A Windows workstation's dev server writes to a file of its own, which is not read here.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from tasks.core import shell
from tasks.core.errors import DifyopsError, InputError, Problem
from tasks.core.fleet import each_host
from tasks.core.hosts import Machine, connect
from tasks.core.inventory import APP_ROLES, Host, Inventory
from tasks.core.project import display
from tasks.core.windows import is_windows
from tasks.tiers.app import compose, deploy_dir, services_of
from tasks.tiers.dev_backend import API_UNIT, WORKER_UNIT
from tasks.tiers.dev_frontend import WEB_UNIT, WINDOWS_LOG

# What --since takes (Docker's forms; journal_since turns them into journalctl's): a duration
# (10m, 1h30m, 45s) or a date and time.
SINCE = re.compile(r"^(\d+[smh])+$"
                   r"|^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?$")
# The home-lab layout's services, each a systemd unit of the role's host.
DEV_UNITS = {"dev_backend": {"api": API_UNIT, "worker": WORKER_UNIT},
             "dev_frontend": {"web": WEB_UNIT}}


@dataclass(frozen=True)
class Source:
    """One service on one host: a compose service, or the systemd unit ``unit``."""

    host: Host
    service: str
    unit: str = ""

    @property
    def prefix(self) -> str:
        return f"{self.host.name} {self.service} |"

    def entry(self, raw: str) -> tuple[str, str] | None:
        """(timestamp, message) of one line the reader printed; None for what is not a line
        of the log (journalctl's notices around its JSON)."""
        if not self.unit:
            stamp, _, message = raw.partition(" ")
            return stamp, message
        try:
            record = json.loads(raw)
            micros = int(record["__REALTIME_TIMESTAMP"])
        except (ValueError, KeyError, TypeError):
            return None
        message = record.get("MESSAGE", "")
        if isinstance(message, list):  # journald's form of a message that is not UTF-8
            message = bytes(message).decode(errors="replace")
        moment = datetime.fromtimestamp(micros // 1_000_000, UTC)
        return f"{moment:%Y-%m-%dT%H:%M:%S}.{micros % 1_000_000:06d}Z", str(message)


def sources(inventory: Inventory, service: str = "", host: str = "") -> list[Source]:
    """Every (host, service) of the app tier and the home-lab units, or those of one service
    and/or one host. Windows hosts are left out (see unread)."""
    hosts = ([inventory.host(host)] if host else
             inventory.with_role(*APP_ROLES, *DEV_UNITS))
    found = [Source(h, s) for h in hosts for s in services_of(inventory, h)
             if not service or s == service]
    found += [Source(h, name, unit) for h in hosts if not is_windows(h)
              for role, units in DEV_UNITS.items() if h.has(role)
              for name, unit in units.items() if not service or name == service]
    if not found:
        what = f"the service {service!r}" if service else "no app service"
        where = f"on {host}" if host else "on any host"
        raise InputError([Problem(display(inventory.file), "hosts",
                                  f"{what} does not run {where}" if service else
                                  f"{what} runs {where}",
                                  "name a service the host runs (inv app.status lists them) "
                                  "with --service, or another host with --host")])
    return found


def unread(inventory: Inventory, service: str = "", host: str = "") -> list[str]:
    """What is left out: a Windows workstation's front end, whose dev server writes to a file."""
    if service not in ("", "web"):
        return []
    hosts = [inventory.host(host)] if host else inventory.with_role("dev_frontend")
    return [f"{h.name}: not read (a Windows workstation's dev server writes its output to "
            f"{WINDOWS_LOG} there)" for h in hosts if h.has("dev_frontend") and is_windows(h)]


def checked_since(since: str) -> str:
    """``since`` as given, once it is a duration or a date both readers take."""
    if since and not SINCE.match(since):
        raise InputError([Problem("--since", since, "is neither a duration nor a date",
                                  "give a duration such as 10m, 2h or 1h30m, or a time such as "
                                  "2026-12-07T09:00:00Z")])
    return since


def logs_command(inventory: Inventory, source: Source, since: str, follow: bool) -> str:
    """The reader of one source: docker compose logs (timestamped, without colour or compose's
    prefix) or journalctl of the unit in JSON (the time of each line in microseconds)."""
    since = checked_since(since)
    if source.unit:
        # (journalctl colours its JSON on a terminal, which --follow's is)
        words = ["SYSTEMD_COLORS=0", "journalctl", "--no-pager", "--output", "json",
                 "--output-fields", "MESSAGE", "--unit", shell.quote(source.unit)]
        words += ["--since", shell.quote(journal_since(since))] if since else []
        return " ".join(words + (["--follow"] if follow else []))
    words = [compose(deploy_dir(inventory)), "logs", "--no-color", "--no-log-prefix",
             "--timestamps"]
    words += ["--since", shell.quote(since)] if since else []
    words += ["--follow"] if follow else []
    return " ".join([*words, shell.quote(source.service)])


def journal_since(since: str) -> str:
    """A --since for journalctl that means what Docker's does on the same host: a duration
    counted back on the host's clock; a time with a zone as seconds since the epoch; one
    without a zone in the host's local time."""
    if since[-1] in "smh":
        return f"-{since}"
    moment = datetime.fromisoformat(since)
    if moment.tzinfo is None:
        return f"{moment:%Y-%m-%d %H:%M:%S}"
    return f"@{int(moment.timestamp())}"


def time_order(stamp: str) -> str:
    """A key that sorts RFC 3339 UTC timestamps in time order whatever their number of
    fraction digits (Docker trims trailing zeros: .5Z is later than .25Z)."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return f"{whole}.{fraction.ljust(9, '0')}"


def merged(answers: list[tuple[Source, str]], grep: str = "") -> list[str]:
    """The lines of every source, in time order, prefixed, filtered by a plain ``grep`` text
    when given."""
    stamped = []
    for source, text in answers:
        for raw in text.splitlines():
            entry = source.entry(raw)
            if entry and (not grep or grep in entry[1]):
                stamped.append((time_order(entry[0]),
                                f"{source.prefix} {entry[0]} {entry[1]}"))
    return [line for _, line in sorted(stamped, key=lambda pair: pair[0])]


def read(inventory: Inventory, chosen: list[Source], since: str, grep: str) -> list[str]:
    """The logs of every source since a time, merged. A host that cannot answer stops it."""
    by_host: dict[str, list[Source]] = {}
    for source in chosen:
        by_host.setdefault(source.host.name, []).append(source)

    def one(machine: Machine) -> list[tuple[Source, str]]:
        answers = []
        for source in by_host[machine.host.name]:
            result = machine.check(logs_command(inventory, source, since, False))
            answers.append((source, result.stdout))
        return answers

    hosts = [inventory.host(name) for name in by_host]
    outcomes = each_host(hosts, one, inventory.settings.timeouts)
    failed = [f"{o.host.name}: {o.error}" for o in outcomes if not o.ok]
    if failed:
        raise DifyopsError("cannot read the logs of " + "; ".join(failed))
    return merged([pair for o in outcomes for pair in o.value or []], grep)


class PrefixedLines:
    """A text stream that writes each complete line of a source it receives, prefixed and
    filtered, to ``emit`` (shared by every source's thread)."""

    def __init__(self, source: Source, grep: str, emit: Callable[[str], None]) -> None:
        self.source, self.grep, self.emit = source, grep, emit
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text.replace("\r", "")
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            entry = self.source.entry(line) if line else None
            if entry and (not self.grep or self.grep in entry[1]):
                self.emit(f"{self.source.prefix} {entry[0]} {entry[1]}")
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
        machine = connect(source.host, inventory.settings.timeouts)
        machines.append(machine)
        command = logs_command(inventory, source, since, True)
        lines = PrefixedLines(source, grep, emit)
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
