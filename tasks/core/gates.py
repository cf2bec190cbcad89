"""Health gates: probes polled until they pass or a deadline runs out, never a fixed sleep.

A gate's timeout names the component, the host and the last answer the probe got.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.core.errors import GateTimeout

if TYPE_CHECKING:
    from tasks.core.hosts import Machine


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
        return passed, f"HTTP {response.status_code} {response.text[:120]!r}"


@dataclass(frozen=True)
class TcpGate(Gate):
    """A TCP port accepting connections, from the control machine."""

    address: str = ""
    port: int = 0

    def probe(self, machine: Machine) -> tuple[bool, str]:
        try:
            with socket.create_connection((self.address, self.port), timeout=3):
                return True, f"{self.address}:{self.port} accepts connections"
        except OSError as exc:
            return False, f"{self.address}:{self.port}: {exc}"


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
    deadline = clock() + gate.timeout
    while True:
        passed, answer = gate.probe(machine)
        if passed:
            return answer
        if clock() >= deadline:
            raise GateTimeout(f"{gate.name} on {machine.host.target} not healthy after "
                              f"{gate.timeout:g} s; last answer: {answer}")
        pause(min(gate.interval, max(deadline - clock(), 0)))
