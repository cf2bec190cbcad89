"""Helpers several integration modules share: polling, summary parsing, releasing hosts."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tasks.core.gates import poll
from tests.integration.lab import Lab, LabHost


def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until check() is true (the engine's poll); return the seconds it took, fail at the
    deadline."""
    started = time.monotonic()
    passed, _ = poll(lambda: (check(), None), timeout, 0.2)
    if not passed:
        pytest.fail(f"{what}: not true after {timeout:g} s")
    return time.monotonic() - started


def eventually(what: str, probe: Callable[[], Any], timeout: float = 60,
               interval: float = 0.5) -> Any:
    """Poll (the engine's poll) until probe() answers something true, and return that answer;
    an error it raises on the way (no answer yet, a half-written reply) counts as a false
    answer. At the deadline, fail with the last answer."""

    def attempt() -> tuple[bool, Any]:
        try:
            answer = probe()
        except (requests.RequestException, OSError, KeyError, ValueError) as exc:
            return False, exc
        return bool(answer), answer

    passed, last = poll(attempt, timeout, interval)
    if not passed:
        pytest.fail(f"{what}: not within {timeout:g} s; last answer: {last!r}")
    return last


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
        host.remove_volumes()
        lab.hosts.pop(name, None)


class SteadyLoad:
    """GET requests to one URL at a fixed rate from a few threads, while a `with` block runs.

    Each thread keeps its own schedule (rate / threads requests per second; a thread that falls
    behind sends at once until it is on time again). Every request is recorded as (seconds since
    the start, HTTP status or 0 for no answer, seconds to the answer).
    """

    def __init__(self, url: str, rate: float = 10.0, threads: int = 2,
                 timeout: float = 5.0) -> None:
        self.url, self.rate, self.threads, self.timeout = url, rate, threads, timeout
        self.records: list[tuple[float, int, float]] = []
        self.errors: list[tuple[float, str]] = []  # (seconds since the start, what went wrong)
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.started = self.seconds = 0.0

    def __enter__(self) -> SteadyLoad:
        self.started = time.monotonic()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join()
        self.seconds = time.monotonic() - self.started

    def _run(self, index: int) -> None:
        import requests

        session = requests.Session()
        period = self.threads / self.rate
        due = self.started + index * period / self.threads
        while not self._stop.is_set():
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            sent = time.monotonic()
            why = ""
            try:
                response = session.get(self.url, timeout=self.timeout)
                status = response.status_code
                if not 200 <= status < 300:
                    why = f"HTTP {status} {response.text[:80]!r}"
            except requests.RequestException as exc:
                status, why = 0, f"{type(exc).__name__}: {str(exc)[:160]}"
                session = requests.Session()  # a fresh connection after a failure
            with self._lock:
                self.records.append((sent - self.started, status, time.monotonic() - sent))
                if why:
                    self.errors.append((sent - self.started, why))
            due += period

    @property
    def failed(self) -> list[tuple[float, int, float]]:
        """The requests that got no answer or a status other than 2xx."""
        return [r for r in self.records if not 200 <= r[1] < 300]

    def figures(self) -> dict[str, float]:
        """sent, failed, p50 and p99 latency in ms (over every request: one without an answer
        counts the time until it gave up), seconds loaded."""
        latencies = sorted(r[2] for r in self.records)

        def percentile(share: float) -> float:
            if not latencies:
                return float("nan")
            return 1000 * latencies[min(len(latencies) - 1, int(share * len(latencies)))]

        return {"sent": len(self.records), "failed": len(self.failed),
                "p50": percentile(0.50), "p99": percentile(0.99), "seconds": self.seconds}
