"""Health gates: probes polled until they pass or a deadline runs out, never a fixed sleep.

``poll`` is the one polling loop of difyops (the gates, the drain's wait for open connections,
the failover's wait for WAL, the firewall's wait for its rollback, the tests' ``until``). A
gate's timeout names the component, the host and the last answer the probe got.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from tasks.core.errors import GateTimeout
from tasks.core.inventory import endpoint

if TYPE_CHECKING:
    from tasks.core.hosts import Machine

Answer = TypeVar("Answer")


def poll(attempt: Callable[[], tuple[bool, Answer]], timeout: float, interval: float, *,
         clock: Callable[[], float] = time.monotonic,
         pause: Callable[[float], None] = time.sleep) -> tuple[bool, Answer]:
    """Call ``attempt`` (which returns (passed, answer)) until it passes or ``timeout`` seconds
    have gone by, pausing ``interval`` between tries (cut short at the deadline). Returns
    whether it passed and the last answer; it always tries at least once."""
    deadline = clock() + timeout
    while True:
        passed, answer = attempt()
        if passed or clock() >= deadline:
            return passed, answer
        pause(min(interval, max(deadline - clock(), 0)))


@dataclass(frozen=True)
class Gate:
    """A named health condition with a deadline and a polling interval (seconds)."""

    name: str
    timeout: float = 60.0
    interval: float = 1.0

    def probe(self, machine: Machine) -> tuple[bool, str]:
        """One attempt: (passed, what was answered)."""
        raise NotImplementedError


@dataclass(frozen=True)
class HttpGate(Gate):
    """An HTTP answer with the expected status (and text), from the control machine."""

    url: str = ""
    status: int = 200
    contains: str = ""

    def probe(self, machine: Machine) -> tuple[bool, str]:
        import requests  # imported here: most commands never probe HTTP

        try:
            response = requests.get(self.url, timeout=min(self.interval * 5, 10))
        except requests.RequestException as exc:
            return False, f"{type(exc).__name__} for {self.url}"
        passed = response.status_code == self.status and self.contains in response.text
        return passed, f"HTTP {response.status_code}: {one_line(response.text[:120])}"


@dataclass(frozen=True)
class TcpGate(Gate):
    """A TCP port accepting connections, from the control machine."""

    address: str = ""
    port: int = 0

    def probe(self, machine: Machine) -> tuple[bool, str]:
        try:
            with socket.create_connection((self.address, self.port), timeout=3):
                return True, f"{endpoint(self.address, self.port)} accepts connections"
        except OSError as exc:
            return False, f"{endpoint(self.address, self.port)}: {exc}"


@dataclass(frozen=True)
class CommandGate(Gate):
    """A command on the host itself that exits 0 when healthy (pg_isready, redis-cli ping).

    One run may take probe_timeout seconds (0: five intervals, at least 10 s): a probe that
    loads an application first (Dify's Celery app takes 15-30 s) needs more.
    """

    command: str = ""
    probe_timeout: float = 0.0

    def probe(self, machine: Machine) -> tuple[bool, str]:
        result = machine.run(self.command,
                             timeout=self.probe_timeout or max(self.interval * 5, 10))
        return result.ok, result.answer


def wait(gate: Gate, machine: Machine, *, clock: Callable[[], float] = time.monotonic,
         pause: Callable[[float], None] = time.sleep) -> str:
    """Poll until the gate passes; return its answer, or raise GateTimeout at the deadline."""
    passed, answer = poll(lambda: gate.probe(machine), gate.timeout, gate.interval,
                          clock=clock, pause=pause)
    if not passed:
        raise GateTimeout(f"{gate.name} on {machine.host.target} not healthy after "
                          f"{gate.timeout:g} s; last answer: {answer}")
    return answer


def one_line(text: str) -> str:
    """An answer's text as it reads, on one line: whitespace runs as one space, other control
    characters as '?' (a body can neither break a message's lines nor drive the terminal)."""
    return "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
