"""The lab of the REAL Dify, shared by tests/integration/test_real_dify.py and the benchmarks.

The api image is built from a release's source (tests/images/dify_real.py); web, plugin daemon,
sandbox and SSRF proxy are the stand-ins; redis_proxy is a real HAProxy
(tests/images/haproxy_image.py). Hosts: app-db (PostgreSQL primary, Redis with Sentinel, the
nginx load balancer), app-r2 (a PostgreSQL standby, a Redis replica and Sentinel), app-r3 (a
Redis replica and Sentinel: a quorum of three), app-api1 (its own Docker engine: api, worker,
beat, web, plugin daemon) and app-api2 (its own Docker engine: a second api behind nginx, so an
upgrade can roll). The images reach the hosts by `inv images.sync` over SSH.

Releases: the newest runnable one (1.14.2 where its profile and source exist, else 1.13.3) is
the target; the runnable one before it (1.13.3) is where the lab starts, so that a real upgrade
with real migrations is part of the story. ``DIFYOPS_REAL_DIFY_VERSION`` names another target
(an operator with internet access runs 1.16.1 this way; the start is then 1.14.2).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import yaml

from tasks.core.profiles import available_versions, version_key
from tests.images import dify_real, dify_source, haproxy_image, standin
from tests.integration.app_lab import DEPLOY, App
from tests.integration.lab import Lab, ensure_base_image

RUNNABLE = ("1.14.2", "1.13.3")  # releases whose api runs here, newest first
VERSION_ENV = "DIFYOPS_REAL_DIFY_VERSION"  # the target release instead of the newest runnable
OTHERS = ("web", "plugin_daemon", "sandbox", "ssrf_proxy")
# The inventory's registry mirror: the images of this lab under names of their own, so that
# stand-in builds of another test run on the same engine cannot take the api's name over.
MIRROR = "difyops-real/"
ADMIN = {"email": "admin@dify.lab", "name": "Lab Admin", "password": "difyops-Lab-2026"}
APIS = ("app-api1", "app-api2")
PG_UNIT = "postgresql@15-main"


class Unrunnable(Exception):
    """No release can run here: the reasons, one per release tried."""


@dataclass
class Release:
    """A release of the lab: its version, unpacked source and built api image."""

    version: str
    root: Path
    image: dify_real.Built


def pick_releases(unpack_into: Path, count: int = 2) -> list[tuple[str, Path]]:
    """(version, unpacked source) of the target release and, when ``count`` is 2 and one is
    runnable, of the release before it: newest first. Raises Unrunnable when no target can
    run."""
    profiles = set(available_versions())
    wanted = os.environ.get(VERSION_ENV, "").strip()
    candidates = [wanted, *(v for v in RUNNABLE if version_key(v) < version_key(wanted))] \
        if wanted else list(RUNNABLE)
    found: list[tuple[str, Path]] = []
    reasons: list[str] = []
    for version in candidates:
        if len(found) == count:
            break
        if version not in profiles:
            reasons.append(f"no profile {version}")
            continue
        try:
            root = dify_source.unpack(dify_source.source_for(version), unpack_into / version)
        except dify_source.Unavailable as exc:
            reasons.append(str(exc))
            continue
        if dify_source.version_of(root) != version:
            reasons.append(f"the source of {version} is Dify {dify_source.version_of(root)}")
            continue
        found.append((version, root))
    if not found or (wanted and found[0][0] != wanted):
        raise Unrunnable("no runnable Dify release: " + "; ".join(reasons))
    return found


def ensure_release(lab: Lab, version: str, root: Path) -> Release:
    """The release's real api image (built once per set of inputs), the stand-ins of the other
    components and the HAProxy image of redis_proxy, all behind MIRROR."""
    client: docker.DockerClient = lab.client
    base = ensure_base_image(client)
    others = standin.ensure_images(client, base, (version,), roles=OTHERS)[version]
    standin.mirror(client, others.values(), MIRROR)
    haproxy_image.ensure_haproxy(client, base, MIRROR)
    built = dify_real.ensure_image(client, base, version, MIRROR, dify_real.API)
    if built.seconds:
        lab.timings[f"real dify: api image {version} built"] = built.seconds
    return Release(version, root, built)


class RealApp(App):
    """The hosts of the real-Dify lab and their inventory (App's helpers: inv, ok, sql)."""

    version = ""

    def write_inventory(self, version: str = "", health_timeout: int = 300) -> None:
        """The lab's inventory (module doc) on ``version`` (default: ``self.version``)."""
        h = self.hosts
        standby = "app-r2" if self.primary == "app-db" else "app-db"
        db_roles = {self.primary: ["db_primary"], standby: ["db_replica"]}
        inventory = {
            "name": "real-dify-lab",
            "domain": "dify.lab",
            "dify": {"version": version or self.version, "registry_mirror": MIRROR},
            "storage": {"type": "shared-fs", "path": "/srv/dify/storage"},
            # Two api hosts of 1.14.2 (api and api_websocket) need more than the default 200.
            "db": {"max_connections": 300},
            "cache": {"mode": "sentinel"},
            "vector": {"store": "pgvector"},
            "timeouts": {"connect": 10, "command": 1800},
            "backup": {"dir": str(self.tmp / "backups")},
            "app": {"health_timeout": health_timeout,
                    "worker_groups": [{"name": "all", "queues": "all", "concurrency": 1}]},
            "net": {"firewall": "off"},
            "hosts": [h["app-db"].inventory_entry([*db_roles["app-db"], "cache", "lb"]),
                      h["app-r2"].inventory_entry([*db_roles["app-r2"], "cache"]),
                      h["app-r3"].inventory_entry(["cache"]),
                      h["app-api1"].inventory_entry(["api", "worker", "beat", "web",
                                                     "plugin_daemon"]),
                      h["app-api2"].inventory_entry(["api"])],
        }
        self.inventory_file.write_text(yaml.safe_dump(inventory, sort_keys=False))

    def dify_env(self, host: str = "app-api1") -> dict[str, str]:
        """The rendered Dify environment on an app host (/opt/dify/.env)."""
        code, out = self.hosts[host].exec(f"cat {DEPLOY}/.env")
        assert code == 0, out
        pairs = (line.split("=", 1) for line in out.splitlines() if "=" in line
                 and not line.startswith("#"))
        return {k: v.strip().strip("'\"") for k, v in pairs}

    def container(self, service: str, host: str = "app-api1") -> str:
        """The id of the running container of a compose service on an app host."""
        code, out = self.hosts[host].exec(
            f"docker ps -q --filter label=com.docker.compose.project=dify "
            f"--filter label=com.docker.compose.service={service}")
        assert code == 0 and out.strip(), f"{service}: {out}"
        return out.split()[0]

    def logs(self, service: str, host: str = "app-api1", tail: int = 60) -> str:
        """The last lines a compose service logged on an app host (for a failure's message)."""
        code, out = self.hosts[host].exec(
            f"docker logs --tail {tail} $(docker ps -aq --filter label=com.docker.compose."
            f"project=dify --filter label=com.docker.compose.service={service} | head -n1) 2>&1")
        return f"--- {host} {service} (exit {code}) ---\n{out}"


def start_real(lab: Lab, tmp: Path, version: str) -> RealApp:
    """The five hosts started; PostgreSQL (primary and standby), Redis with Sentinel and nginx
    deployed by the real tasks, the inventory on ``version`` (the app tier is the caller's)."""
    started = time.monotonic()
    plain = lab.start(["app-db", "app-r2", "app-r3"])
    apis = lab.start(list(APIS), docker=True, overlay2=True)
    app = RealApp({h.name: h for h in [*plain, *apis]}, tmp)
    app.version = version
    app.write_inventory()
    app.ok("config.secrets")
    app.ok("db.deploy")
    app.ok("cache.deploy")
    app.ok("lb.deploy")
    lab.timings["real dify: hosts + db, cache, lb tiers"] = time.monotonic() - started
    return app
