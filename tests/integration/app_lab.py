"""The app tier's lab, shared by tests/integration/test_app.py and benchmarks/upgrade.py.

Hosts: app-db (PostgreSQL + Redis + the nginx load balancer, deployed by db.deploy, cache.deploy
and lb.deploy), app-api1 (api + plugin daemon: the migration host), app-api2 (api), app-work
(worker groups, beat, web). The Dify images are the stand-ins of tests/images (same ports, health
paths, MODE values and environment names; /health only "ok" when the database and Redis really
answer), named as the 1.5.1 and 1.13.3 profiles name them behind the registry mirror prefix
"difyops-standin/".
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tasks.tiers.cache import HELPER as REDIS_HELPER
from tests.images import haproxy_image, standin
from tests.integration.lab import Lab, LabHost, ensure_base_image

ROOT = Path(__file__).resolve().parents[2]
A, B = "1.5.1", "1.13.3"
DEPLOY = "/opt/dify"
PSQL = "runuser -u postgres -- psql -d dify -AtX -c"
NAMES = ("app-db", "app-api1", "app-api2", "app-work")


class App:
    """The hosts, their inventory and a way to run `inv` against them."""

    primary = "app-db"  # the PostgreSQL primary the inventory names (sql() asks it)

    def __init__(self, hosts: dict[str, LabHost], tmp: Path) -> None:
        self.hosts = hosts
        self.tmp = tmp
        self.inventory_file = tmp / "app-lab.yml"
        self.env = {**os.environ, "DIFY_INVENTORY": str(self.inventory_file),
                    "DIFY_SECRETS": str(tmp / "app-lab.env")}

    def write_inventory(self, version: str = A, health_timeout: int = 90,
                        secrets_command: str = "") -> None:
        """The lab's inventory; with secrets_command, the secrets come from that command."""
        h = self.hosts
        inventory = {
            "name": "app-lab",
            "domain": "dify.lab",
            **({"secrets": {"source": "command", "command": secrets_command}}
               if secrets_command else {}),
            "dify": {"version": version, "registry_mirror": standin.PREFIX},
            "storage": {"type": "shared-fs", "path": "/srv/dify/storage"},
            "cache": {"mode": "standalone"},
            "vector": {"store": "pgvector"},
            "timeouts": {"connect": 10, "command": 600},
            "backup": {"dir": str(self.tmp / "backups")},
            "app": {"health_timeout": health_timeout,
                    "api": {"cpus": "1", "memory": "256m"},
                    "worker_groups": [
                        {"name": "docs", "queues": ["dataset"], "concurrency": 1},
                        {"name": "rest", "queues": "all", "concurrency": 1}]},
            "net": {"firewall": "off"},
            "hosts": [h["app-db"].inventory_entry(["db_primary", "cache", "lb"]),
                      h["app-api1"].inventory_entry(["api", "plugin_daemon"]),
                      h["app-api2"].inventory_entry(["api"], user="deploy"),
                      h["app-work"].inventory_entry(["worker", "beat", "web"])],
        }
        self.inventory_file.write_text(yaml.safe_dump(inventory, sort_keys=False))

    @property
    def balancer(self) -> str:
        """The nginx load balancer's base URL."""
        return f"http://{self.hosts['app-db'].address}"

    def inv(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                              capture_output=True, env=self.env, timeout=timeout, check=False)

    def ok(self, *args: str) -> subprocess.CompletedProcess:
        result = self.inv(*args)
        assert result.returncode == 0, f"inv {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    def sql(self, query: str) -> str:
        code, out = self.hosts[self.primary].exec(f"{PSQL} \"{query}\"")
        assert code == 0, out
        return out.strip()

    def redis(self, *args: str, db: int = 1) -> str:
        """A redis-cli command on the cache host app-db (db 1: the broker, db 0: the cache),
        through the cache tier's own helper (the password from its file, TLS with the CA)."""
        command = f"{REDIS_HELPER} cli -n {db} " + " ".join(args)
        code, out = self.hosts["app-db"].exec(command)
        assert code == 0, out
        return out.strip()

    def images(self, name: str) -> dict[str, str]:
        """service -> image of the running containers of the dify project on a host."""
        code, out = self.hosts[name].exec(
            "docker ps --filter label=com.docker.compose.project=dify "
            "--format '{{.Label \"com.docker.compose.service\"}} {{.Image}}'")
        assert code == 0, out
        return dict(line.split() for line in out.splitlines() if line.strip())

    def put_image(self, name: str, image: str, as_name: str) -> None:
        """An image of this machine's engine into a host's engine (docker save | docker load),
        tagged there as `as_name` (replacing whatever that name pointed to)."""
        container = self.hosts[name]._wrapped().name
        shipped = subprocess.run(f"docker save {image} | docker exec -i {container} docker load -q",
                                 shell=True, capture_output=True, text=True, check=False)
        assert shipped.returncode == 0, shipped.stderr
        code, out = self.hosts[name].exec(f"docker tag {image} {as_name}")
        assert code == 0, out


def start_app(lab: Lab, tmp: Path) -> App:
    """Stand-in images built here, the four hosts started, PostgreSQL, Redis and nginx deployed
    (the app tier itself is left to the caller)."""
    started = time.monotonic()
    base = ensure_base_image(lab.client)
    standin.ensure_images(lab.client, base)
    haproxy_image.ensure_haproxy(lab.client, base)  # redis_proxy: tls.internal is on
    lab.timings["app: stand-in images"] = time.monotonic() - started
    (db,) = lab.start([NAMES[0]])
    docker_hosts = lab.start(list(NAMES[1:]), docker=True)
    app = App({h.name: h for h in [db, *docker_hosts]}, tmp)
    app.write_inventory()
    app.ok("config.secrets")
    started = time.monotonic()
    app.ok("db.deploy")
    app.ok("cache.deploy")
    app.ok("lb.deploy")  # the rolling upgrade drains api hosts through it
    lab.timings["app: db + cache + lb tiers"] = time.monotonic() - started
    return app
