"""The part of Celery's API the worker healthcheck uses (difyops' CELERY_PING), for the stand-in
worker: ``Celery(broker=...).control.ping([f"celery@{host}"], timeout=...)`` answers a reply per
destination whose stand-in worker holds its broker key (standin:worker:<host>, refreshed on every
BRPOP), and nothing for a worker that lost the broker: what a real worker's ping answers."""

from __future__ import annotations

import sys
from types import SimpleNamespace

sys.path.insert(0, "/usr/local/lib/dify-standin")

import standin


class _Control:
    def ping(self, destination: list[str], timeout: float = 1.0) -> list[dict]:
        broker = standin.broker_from_env()
        broker.sock.settimeout(timeout)
        return [{name: {"ok": "pong"}} for name in destination
                if broker.call("EXISTS", f"standin:worker:{name.removeprefix('celery@')}") == 1]


class Celery:
    """Only what the healthcheck calls."""

    def __init__(self, broker: str = "") -> None:
        self.conf = SimpleNamespace(broker=broker, broker_transport_options={})
        self.control = _Control()
