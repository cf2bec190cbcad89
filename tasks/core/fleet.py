"""Run a function on many hosts in parallel and collect each host's answer or error.

For read-only verbs (status, checks) and one-off operations (promote, drain) that are not a
plan: the caller gets one outcome per host, in inventory order, and prints them as a table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from tasks.core.errors import DifyopsError
from tasks.core.hosts import Machine, connect
from tasks.core.inventory import Host

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """One host's answer, or the error that stopped it."""

    host: Host
    value: T | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether the function returned without a difyops error."""
        return not self.error


def each_host(hosts: Sequence[Host], action: Callable[[Machine], T],
              timeouts: Mapping[str, int] | None = None, parallel: int = 16) -> list[Outcome[T]]:
    """Call action(machine) for every host, in parallel; connections are closed afterwards."""

    def one(host: Host) -> Outcome[T]:
        machine = connect(host, timeouts)
        try:
            return Outcome(host, value=action(machine))
        except DifyopsError as exc:
            return Outcome(host, error=str(exc))
        finally:
            machine.close()

    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=min(parallel, len(hosts))) as pool:
        return list(pool.map(one, hosts))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with aligned columns (the last column is not padded)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) if i < len(headers) - 1 else cell
                       for i, cell in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)
