"""The whole stack on six lab hosts: the layout shared by test_stack.py and benchmarks/deploy.py.

| host (after a prefix, e.g. st-) | roles | runs |
|---|---|---|
| lb | lb, monitor | nginx; Prometheus, Alertmanager, blackbox (OS packages; no Grafana) |
| api1 | api, web, plugin_daemon | Docker: api (the migration host), web, plugin daemon |
| api2 | api, web | Docker: api, web |
| work | worker, beat | Docker: the worker group and the one beat |
| db1 | db_primary, cache | Debian 13: PostgreSQL 17 with pgvector, Redis |
| db2 | db_replica | Debian 13: a streaming standby |

The db hosts run Debian 13 because only it ships pgvector (postgresql-17-pgvector). The api,
worker, beat and migration run the REAL api image of the newest release that runs here, built
from its source (tests/integration/real_lab.py: 1.14.2, or the release
``DIFYOPS_REAL_DIFY_VERSION`` names); web and the plugin daemon are the stand-ins of
tests/images. deploy.all itself ships them to the Docker hosts (`dify.sync_images: true`, no
registry here). Lab hosts are far smaller than the planned sizes, so the inventory lowers
`preflight.sizes` (the preflight itself still runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.integration.lab import Lab, LabHost
from tests.integration.real_lab import MIRROR, ensure_release, pick_releases

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = {  # host -> roles (the prefix is added per lab)
    "lb": ["lb", "monitor"],
    "api1": ["api", "web", "plugin_daemon"],
    "api2": ["api", "web"],
    "work": ["worker", "beat"],
    "db1": ["db_primary", "cache"],
    "db2": ["db_replica"],
}
DOCKER = ("api1", "api2", "work")
TRIXIE = ("db1", "db2")
SMALL = {"cpu": 1, "memory_gb": 1, "disk_gb": 5}


class Stack:
    """Hosts of one lab layout, its inventory file and `inv` against it."""

    def __init__(self, hosts: dict[str, LabHost], folder: Path, prefix: str,
                 version: str) -> None:
        self.hosts = hosts  # by short name (lb, api1, ...)
        self.version = version  # the Dify release deployed
        self.prefix = prefix
        self.folder = folder
        self.name = f"{prefix}stack"
        self.inventory_file = folder / f"{self.name}.yml"
        self.env = {**os.environ, "DIFY_INVENTORY": str(self.inventory_file),
                    "DIFY_SECRETS": str(folder / f"{self.name}.env")}

    def host(self, short: str) -> LabHost:
        return self.hosts[short]

    def write_inventory(self, **overrides: object) -> None:
        """The inventory of the layout (addresses read now: a restarted host may move)."""
        inventory = {
            "name": self.name,
            "domain": "dify.lab",
            "dify": {"version": self.version, "registry_mirror": MIRROR, "sync_images": True},
            # Two api hosts, each with api and api_websocket, need more than the default 200.
            "db": {"version": 17, "max_connections": 300},
            "storage": {"type": "shared-fs", "path": "/srv/dify/storage"},
            "cache": {"mode": "standalone"},
            "vector": {"store": "pgvector"},
            "timeouts": {"connect": 5, "command": 600},
            "app": {"health_timeout": 300},
            "monitor": {"grafana": False, "scrape_interval": "5s",
                        "evaluation_interval": "5s"},
            "backup": {"dir": str(self.folder / "backups")},
            "preflight": {"sizes": {role: dict(SMALL) for roles in LAYOUT.values()
                                    for role in roles},
                          "min_free_disk_gb": 2},
            "net": {"firewall": "off"},
            "hosts": [self.hosts[short].inventory_entry(roles)
                      for short, roles in LAYOUT.items()],
            **overrides,
        }
        self.inventory_file.write_text(yaml.safe_dump(inventory, sort_keys=False))

    def inv(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                              capture_output=True, env=self.env, timeout=timeout, check=False)

    def popen(self, *args: str) -> subprocess.Popen:
        """`inv` started in the background, its output (stdout and stderr) line by line."""
        return subprocess.Popen([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                bufsize=1)

    def ok(self, *args: str) -> subprocess.CompletedProcess:
        result = self.inv(*args)
        assert result.returncode == 0, f"inv {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result


def start(lab: Lab, folder: Path, prefix: str = "st-") -> Stack:
    """The images of the newest runnable release built (once; real_lab.Unrunnable or
    dify_source.Unavailable when none can be), the six hosts started, inventory and secrets
    written."""
    started = time.monotonic()
    ((version, root),) = pick_releases(folder / "dify-source", count=1)
    ensure_release(lab, version, root)
    lab.timings[f"{prefix}stack: images of Dify {version}"] = time.monotonic() - started
    names = {short: f"{prefix}{short}" for short in LAYOUT}
    # SYS_PTRACE: root on a real server sees which process holds a port (`ss -p` reads other
    # users' /proc/<pid>/fd); without it the preflight of a second deploy finds PostgreSQL,
    # Redis and Prometheus on their ports and cannot tell they are ours. (Docker hosts have it.)
    seeing = ("SYS_PTRACE",)
    hosts = dict(zip(["lb"], lab.start([names["lb"]], cap_add=seeing), strict=True))
    hosts.update(zip(DOCKER, lab.start([names[s] for s in DOCKER], docker=True, overlay2=True),
                     strict=True))
    hosts.update(zip(TRIXIE, lab.start([names[s] for s in TRIXIE], cap_add=seeing,
                                       suite="trixie"), strict=True))
    stack = Stack(hosts, folder, prefix, version)
    stack.write_inventory()
    stack.ok("config.secrets")
    return stack
