"""Benchmark: how long the data tiers stay without a writable master. Prints figures only.

- PostgreSQL: from stopping the primary's PostgreSQL to a promoted standby that accepts writes
  (`inv db.promote` started right after the stop: the time an operator or a script adds to it is
  not counted). Between runs the old primary is fenced, the inventory edited and `inv db.deploy`
  rebuilds it as a standby.
- Redis: from stopping the master's redis-server to a new master named by Sentinel, as a Sentinel
  client (Celery, Dify) sees it. Between runs `inv cache.deploy` brings the old master back as a
  replica.

Runs on container hosts of the test lab (needs the Docker engine, like the integration tests).
Run: python benchmarks/failover.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.tiers.cache import HELPER as REDIS_HELPER  # noqa: E402
from tests.integration.lab import Lab, LabHost  # noqa: E402


class Inventory:
    """An inventory file of lab hosts and `inv` on it."""

    def __init__(self, folder: Path, name: str, data: dict) -> None:
        self.path = folder / f"{name}.yml"
        self.secrets = folder / f"{name}.env"
        self.path.write_text(yaml.safe_dump(data, sort_keys=False))
        self.inv("config.secrets")

    def inv(self, *args: str) -> None:
        env = {**os.environ, "DIFY_INVENTORY": str(self.path), "DIFY_SECRETS": str(self.secrets)}
        result = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, check=False)
        if result.returncode:
            raise SystemExit(f"inv {' '.join(args)} failed:\n{result.stdout}{result.stderr}")

    def set_primary(self, name: str) -> None:
        data = yaml.safe_load(self.path.read_text())
        for host in data["hosts"]:
            role = "db_primary" if host["name"] == name else "db_replica"
            host["roles"] = [role, *(r for r in host["roles"] if not r.startswith("db_"))]
        self.path.write_text(yaml.safe_dump(data, sort_keys=False))


def postgres(lab: Lab, folder: Path, runs: int) -> list[float]:
    hosts = lab.start(["pg1", "pg2", "pg3"])
    names = [host.name for host in hosts]
    inventory = Inventory(folder, "bench-db", {
        "name": "bench-db", "cache": {"mode": "standalone"}, "vector": {"store": "pgvector"},
        "net": {"firewall": "off"},
        "hosts": [hosts[0].inventory_entry(["db_primary", "cache", "dev_backend"]),
                  *(host.inventory_entry(["db_replica"]) for host in hosts[1:])]})
    inventory.inv("db.deploy")
    samples = []
    for run in range(runs):
        old, new = names[run % 3], names[(run + 1) % 3]
        started = time.monotonic()
        hosts[names.index(old)].exec("systemctl stop postgresql@15-main")
        inventory.inv("db.promote", "--host", new)
        samples.append(time.monotonic() - started)
        inventory.inv("db.failover", "--host", new)      # fence the old one, re-point the other
        inventory.set_primary(new)
        inventory.inv("db.deploy")                        # the old primary rejoins as a standby
        print(f"  postgres run {run + 1}: {samples[-1]:.2f} s ({old} -> {new})", flush=True)
    return samples


def sentinel_master(host: LabHost, sentinels: list[str]) -> str:
    for address in sentinels:
        code, out = host.exec(f"{REDIS_HELPER} cli -h {address} -p 26379 "
                              f"sentinel get-master-addr-by-name dify-master")
        if code == 0 and out.strip():
            return out.split()[0]
    return ""


def redis(lab: Lab, folder: Path, runs: int) -> list[float]:
    hosts = lab.start(["rs1", "rs2", "rs3"])
    by_address = {host.address: host for host in hosts}
    inventory = Inventory(folder, "bench-cache", {
        "name": "bench-cache", "cache": {"mode": "sentinel"}, "vector": {"store": "pgvector"},
        "net": {"firewall": "off"},
        "hosts": [hosts[0].inventory_entry(["cache", "db_primary", "dev_frontend"]),
                  *(host.inventory_entry(["cache"]) for host in hosts[1:])]})
    inventory.inv("cache.deploy")
    sentinels = list(by_address)
    samples = []
    for run in range(runs):
        master = sentinel_master(hosts[0], sentinels)
        client = next(host for host in hosts if host.address != master)
        started = time.monotonic()
        by_address[master].exec("systemctl stop redis-server")
        while sentinel_master(client, sentinels) in ("", master):
            if time.monotonic() - started > 120:
                raise SystemExit("no new master after 120 s")
            time.sleep(0.1)
        samples.append(time.monotonic() - started)
        inventory.inv("cache.deploy")                     # the old master rejoins as a replica
        print(f"  redis run {run + 1}: {samples[-1]:.2f} s", flush=True)
    return samples


def main() -> None:
    """Measure and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="failovers per figure (median)")
    runs = parser.parse_args().runs
    with Lab() as lab, tempfile.TemporaryDirectory() as scratch:
        pg = postgres(lab, Path(scratch), runs)
        rd = redis(lab, Path(scratch), runs)
    print(f"PostgreSQL primary stopped -> promoted standby accepts writes   median "
          f"{statistics.median(pg):.2f} s  (min {min(pg):.2f}, max {max(pg):.2f}, {runs} runs)")
    print(f"Redis master stopped -> new master seen by a Sentinel client     median "
          f"{statistics.median(rd):.2f} s  (min {min(rd):.2f}, max {max(rd):.2f}, {runs} runs; "
          f"cache.down_after_ms 5000)")


if __name__ == "__main__":
    main()
