"""Helpers several integration modules share: polling, summary parsing, releasing hosts."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable

import pytest

from tests.integration.lab import Lab, LabHost


def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until check() is true; return the seconds it took, fail at the deadline."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not true after {timeout:g} s")
        time.sleep(0.2)
    return time.monotonic() - started


def summary_columns(output: str) -> list[str]:
    """The status columns of a deploy's summary table (e.g. ['host', 'unchanged'])."""
    return output.split("summary:")[1].strip().splitlines()[0].split()


def summary_counts(output: str) -> dict[str, dict[str, int]]:
    """host -> {status: count} from the summary table an apply prints last."""
    lines = output.split("summary:")[-1].strip().splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())[1:]
    counts = {}
    for line in lines[1:]:
        parts = line.split()
        counts[parts[0]] = dict(zip(header, (int(p) for p in parts[1:1 + len(header)]),
                                    strict=True))
    return counts


def release(lab: Lab, hosts: dict[str, LabHost]) -> None:
    """Remove a module's hosts when it is done (kept with DIFYOPS_KEEP_LAB=1)."""
    if os.environ.get("DIFYOPS_KEEP_LAB", "").lower() in ("1", "true", "yes", "on"):
        return
    for name, host in hosts.items():
        host._wrapped().remove(force=True, v=True)  # killed: nothing on them is kept
        lab.hosts.pop(name, None)
