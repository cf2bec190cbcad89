"""Progress lines while work runs and the per-host summary at the end."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

CHANGED, UNCHANGED, FAILED, NOT_RUN = "changed", "unchanged", "failed", "not run"
WOULD_CHANGE = "would change"


@dataclass
class StepResult:
    """What happened to one step on one host."""

    tier: str
    host: str
    step: str
    status: str
    detail: str = ""


@dataclass
class Report:
    """Every step result of one run, printed as it arrives and summarised per host at the end."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    results: list[StepResult] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # summary order: as the plan lists them
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, result: StepResult) -> None:
        """Record a result and print its progress line."""
        with self._lock:
            self.results.append(result)
            detail = f": {result.detail}" if result.detail else ""
            print(f"[{result.tier}] {result.host}: {result.step} ... {result.status}{detail}",
                  file=self.out, flush=True)

    def expect(self, host: str) -> None:
        """Register a host so the summary lists hosts in plan order, not finishing order."""
        if host not in self.hosts:
            self.hosts.append(host)

    def note(self, text: str) -> None:
        """Print free text (a diff, a heading) without interleaving with other threads."""
        with self._lock:
            print(text, file=self.out, flush=True)

    @property
    def failed(self) -> list[StepResult]:
        """The results that failed."""
        return [r for r in self.results if r.status == FAILED]

    def count(self, status: str) -> int:
        """How many steps ended in that status."""
        return sum(1 for r in self.results if r.status == status)

    def summary(self) -> str:
        """A table with one line per host: counts per status and the first failure."""
        hosts: dict[str, Counter] = {name: Counter() for name in self.hosts}
        first_failure: dict[str, str] = {}
        for result in self.results:
            hosts.setdefault(result.host, Counter())[result.status] += 1
            if result.status == FAILED:
                first_failure.setdefault(result.host, f"[{result.tier}] {result.step}: "
                                                      f"{result.detail}")
        columns = (CHANGED, WOULD_CHANGE, UNCHANGED, FAILED, NOT_RUN)
        shown = [c for c in columns if any(counter[c] for counter in hosts.values())] or [
            UNCHANGED]
        width = max([len("host"), *(len(h) for h in hosts)])
        lines = ["host".ljust(width) + "  " + "  ".join(c.rjust(9) for c in shown)]
        for host, counter in hosts.items():
            line = host.ljust(width) + "  " + "  ".join(str(counter[c]).rjust(9) for c in shown)
            if host in first_failure:
                line += f"  {first_failure[host]}"
            lines.append(line)
        return "\n".join(lines)
