"""The REAL Dify api, worker and beat on lab hosts, deployed by the project's own tasks.

The api image is built from the release's source (tests/images/dify_real.py; 1.14.2 when its
profile and source exist, else 1.13.3); web, plugin daemon, sandbox and SSRF proxy are the
stand-ins; redis_proxy is a real HAProxy (tests/images/haproxy_image.py). Hosts: app-db
(PostgreSQL, Redis with Sentinel, nginx: `inv db.deploy cache.deploy lb.deploy`), app-r2 and
app-r3 (Redis replicas and Sentinels: a quorum of three) and app-api1 (its own Docker engine:
api, worker, beat, web, plugin daemon by `inv app.deploy`), the image shipped there by
`inv images.sync` over SSH.

What the release itself says is read from its source, by code: the alembic head of its
migration scripts, the worker's queue list in its entrypoint, its Celery app, its DSL version.
The tests share the hosts and run in file order. Without the source or a Python 3.12 the module
is skipped with the reason. Marked ``real_dify`` (deselect with ``-m "not real_dify"``).
``DIFYOPS_REAL_DIFY_VERSION=1.13.3`` runs another release than the newest runnable one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from tasks.core.profiles import available_versions
from tests.images import dify_real, dify_source, haproxy_image, standin
from tests.integration import dify_client
from tests.integration.app_lab import DEPLOY, App
from tests.integration.lab import Lab, ensure_base_image
from tests.integration.support import release, summary_counts, until

pytestmark = [pytest.mark.real_dify, pytest.mark.docker]

PREFERRED = ("1.14.2", "1.13.3")  # releases that run here, newest first
VERSION_ENV = "DIFYOPS_REAL_DIFY_VERSION"  # run this release instead (e.g. 1.13.3)
OTHERS = ("web", "plugin_daemon", "sandbox", "ssrf_proxy")
# The inventory's registry mirror: the images of this module under names of their own, so that
# stand-in builds of another test session on the same engine cannot take the api's name over.
MIRROR = "difyops-real/"
ADMIN = {"email": "admin@dify.lab", "name": "Lab Admin", "password": "difyops-Lab-2026"}


class RealApp(App):
    """The hosts of this module and their inventory (App's helpers: inv, sql, redis)."""

    version = ""

    def write_inventory(self, version: str = "", health_timeout: int = 300) -> None:
        """app-db: database, cache, balancer; app-r2, app-r3: the other two Redis + Sentinel
        nodes (a quorum); app-api1: every app component."""
        h = self.hosts
        inventory = {
            "name": "real-dify-lab",
            "domain": "dify.lab",
            "dify": {"version": version or self.version, "registry_mirror": MIRROR},
            "storage": {"type": "shared-fs", "path": "/srv/dify/storage"},
            "cache": {"mode": "sentinel"},
            "vector": {"store": "pgvector"},
            "timeouts": {"connect": 10, "command": 1800},
            "app": {"health_timeout": health_timeout,
                    "worker_groups": [{"name": "all", "queues": "all", "concurrency": 1}]},
            "hosts": [h["app-db"].inventory_entry(["db_primary", "cache", "lb"]),
                      h["app-r2"].inventory_entry(["cache"]),
                      h["app-r3"].inventory_entry(["cache"]),
                      h["app-api1"].inventory_entry(["api", "worker", "beat", "web",
                                                     "plugin_daemon"])],
        }
        self.inventory_file.write_text(yaml.safe_dump(inventory, sort_keys=False))

    def dify_env(self) -> dict[str, str]:
        """The rendered Dify environment on the app host (/opt/dify/.env)."""
        code, out = self.hosts["app-api1"].exec(f"cat {DEPLOY}/.env")
        assert code == 0, out
        pairs = (line.split("=", 1) for line in out.splitlines() if "=" in line
                 and not line.startswith("#"))
        return {k: v.strip().strip("'\"") for k, v in pairs}

    def container(self, service: str) -> str:
        """The id of the running container of a compose service on the app host."""
        code, out = self.hosts["app-api1"].exec(
            f"docker ps -q --filter label=com.docker.compose.project=dify "
            f"--filter label=com.docker.compose.service={service}")
        assert code == 0 and out.strip(), f"{service}: {out}"
        return out.split()[0]


@dataclass
class Release:
    """The release under test: its version, unpacked source and built api image."""

    version: str
    root: Path
    image: dify_real.Built


def _pick_release(unpack_into: Path) -> tuple[str, Path]:
    """The release to run (see the module doc) and its unpacked source; skip when none."""
    profiles = set(available_versions())
    reasons = []
    wanted = os.environ.get(VERSION_ENV, "").strip()
    for version in (wanted,) if wanted else PREFERRED:
        if version not in profiles:
            reasons.append(f"no profile {version}")
            continue
        try:
            source = dify_source.source_for(version)
            root = dify_source.unpack(source, unpack_into / version)
        except dify_source.Unavailable as exc:
            reasons.append(str(exc))
            continue
        if dify_source.version_of(root) in profiles:
            return dify_source.version_of(root), root
        reasons.append(f"{source} is Dify {dify_source.version_of(root)}: no profile")
    pytest.skip("no runnable Dify release: " + "; ".join(reasons))


@pytest.fixture(scope="module")
def dify(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The release's real api image built (once per set of inputs), with the stand-ins of
    the other components."""
    version, root = _pick_release(tmp_path_factory.mktemp("dify-source"))
    base = ensure_base_image(lab.client)
    others = standin.ensure_images(lab.client, base, (version,), roles=OTHERS)[version]
    for name in others.values():
        lab.client.images.get(name).tag(*(MIRROR + name.removeprefix(standin.PREFIX))
                                        .rsplit(":", 1))
    haproxy_image.ensure_haproxy(lab.client, base, MIRROR)  # redis_proxy, in Sentinel mode
    try:
        built = dify_real.ensure_api_image(lab.client, base, version, MIRROR)
    except dify_source.Unavailable as exc:
        pytest.skip(str(exc))
    if built.seconds:
        lab.timings[f"real dify: api image {version} built"] = built.seconds
    return Release(version, root, built)


@pytest.fixture(scope="module")
def real(lab: Lab, dify: Release, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealApp]:
    """Four hosts; PostgreSQL, Redis with Sentinel and nginx deployed by the real tasks."""
    started = time.monotonic()
    plain = lab.start(["app-db", "app-r2", "app-r3"])
    (api,) = lab.start(["app-api1"], docker=True, overlay2=True)
    app = RealApp({h.name: h for h in [*plain, api]}, tmp_path_factory.mktemp("real-dify"))
    app.version = dify.version
    app.write_inventory()
    try:
        app.ok("config.secrets")
        app.ok("db.deploy")
        app.ok("cache.deploy")
        app.ok("lb.deploy")
        lab.timings["real dify: hosts + db, cache, lb tiers"] = time.monotonic() - started
        yield app
    finally:
        release(lab, app.hosts)


def test_the_image_is_the_release_api(dify: Release, lab: Lab) -> None:
    image = lab.client.images.get(dify.image.name)
    config = image.attrs["Config"]
    assert image.id == lab.client.images.get(dify.image.tag).id
    assert len(image.attrs["RootFS"]["Layers"]) == 1  # one vfs copy per container on the hosts
    assert (config["User"], config["WorkingDir"]) == ("dify", "/app/api")
    assert config["Entrypoint"] == ["/bin/bash", "/entrypoint.sh"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert {k: env.get(k) for k in dify_source.production_env(dify.root)} \
        == dify_source.production_env(dify.root)
    out = lab.client.containers.run(
        dify.image.name, entrypoint=["/bin/bash", "-c"], remove=True,
        command=["id -u; python --version; cat /entrypoint.sh | sha256sum; "
                 "sha256sum < /app/api/gunicorn.conf.py"]).decode().split("\n")
    source = dify.root / "api"
    assert out[0] == "1001"
    assert out[1].startswith("Python 3.12.")
    assert out[2].split()[0] == _sha256(source / "docker" / "entrypoint.sh")
    assert out[3].split()[0] == _sha256(source / "gunicorn.conf.py")
    print(f"real api image {dify.version}: {dify.image.size / 1e9:.2f} GB, "
          f"built in {dify.image.seconds:.0f} s (0: cached)")


def _sha256(path: Path) -> str:
    """The hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_images_sync_ships_the_real_api_over_ssh(real: RealApp, dify: Release,
                                                 lab: Lab) -> None:
    started = time.monotonic()
    first = real.ok("images.sync")
    lab.timings["real dify: images.sync (first)"] = time.monotonic() - started
    code, out = real.hosts["app-api1"].exec(
        f"docker image inspect -f '{{{{.Id}}}}' {dify.image.name}")
    assert (code, out.strip()) == (0, lab.client.images.get(dify.image.name).id), out
    assert re.search(rf"app-api1\s+{re.escape(dify.image.name)}\s+shipped", first.stdout), \
        first.stdout
    second = real.ok("images.sync")  # the real api travels once (stand-ins may be retagged
    # meanwhile by another test session on this machine: only the api's row is asserted)
    assert re.search(rf"app-api1\s+{re.escape(dify.image.name)}\s+present", second.stdout), \
        second.stdout


def test_deploy_migrates_to_the_release_head_and_serves_through_nginx(
        real: RealApp, dify: Release, lab: Lab) -> None:
    started = time.monotonic()
    first = real.ok("app.deploy")
    lab.timings["real dify: app.deploy (first)"] = time.monotonic() - started
    assert "app-api1: migrate the database (one run) ... changed" in first.stdout, first.stdout
    heads = dify_source.alembic_heads(dify.root)
    assert len(heads) == 1, heads
    assert real.sql("SELECT version_num FROM alembic_version") == heads.pop()
    assert int(real.sql("SELECT count(*) FROM information_schema.tables "
                        "WHERE table_schema = 'public'")) > 50
    health = requests.get(f"http://{real.hosts['app-api1'].address}:5001/health",
                          timeout=10).json()
    assert (health["status"], health["version"]) == ("ok", dify.version), health
    setup = requests.get(f"{real.balancer}/console/api/setup", timeout=10)
    assert setup.status_code == 200, setup.text
    assert setup.json()["step"] == "not_started"


def _active_queues(real: RealApp, celery_app: str) -> dict[str, list[str]]:
    """worker name -> the queues it consumes, as Celery itself answers (inspect, by the
    broker), asked from inside the worker container."""
    container = real.container("worker_all")
    code, out = real.hosts["app-api1"].exec(
        f"docker exec {container} celery -A {celery_app} inspect active_queues --json "
        "--timeout 10 2>/dev/null")
    if code != 0:
        return {}
    line = next((line for line in out.splitlines() if line.startswith("{")), "{}")
    return {worker: sorted(q["name"] for q in queues)
            for worker, queues in json.loads(line).items()}


def test_worker_consumes_exactly_the_release_queues(real: RealApp, dify: Release) -> None:
    expected = sorted(dify_source.worker_queues(dify.root))
    answers: dict[str, list[str]] = {}

    def answered() -> bool:
        answers.update(_active_queues(real, dify_source.celery_app(dify.root)))
        return bool(answers)

    until(answered, 240, "a Celery worker answering inspect active_queues")
    assert len(answers) == 1, answers
    (queues,) = answers.values()
    missing, extra = set(expected) - set(queues), set(queues) - set(expected)
    assert (missing, extra) == (set(), set()), (
        f"the worker consumes {len(queues)} queues, the release's entrypoint lists "
        f"{len(expected)}: missing {sorted(missing)}, extra {sorted(extra)} (the version "
        "profile's queue list)")


@pytest.fixture(scope="module")
def console(real: RealApp) -> dify_client.Console:
    """Through nginx: the admin account set up, then logged in to the console."""
    console = dify_client.Console(real.balancer)
    made = console.setup(**ADMIN)
    assert made.status_code == 201, made.text
    logged = console.login(ADMIN["email"], ADMIN["password"])
    assert logged.status_code == 200 and logged.json()["result"] == "success", logged.text
    return console


@pytest.fixture(scope="module")
def workflow(real: RealApp, dify: Release, console: dify_client.Console) -> dict[str, str]:
    """Through nginx: an echo workflow app imported and published, an API key made. Returns
    app_id, key, tenant_id."""
    dsl = dify_client.echo_workflow(dify_source.dsl_version(dify.root), "difyops echo")
    imported = console.import_app(dsl)
    assert imported.status_code == 200, imported.text
    assert imported.json()["status"] == "completed", imported.text
    app_id = imported.json()["app_id"]
    published = console.publish(app_id)
    assert published.status_code == 200 and published.json()["result"] == "success", \
        published.text
    key = console.api_key(app_id)
    assert key.status_code == 201, key.text
    tenant = real.sql(f"SELECT tenant_id FROM apps WHERE id = '{app_id}'")
    return {"app_id": app_id, "key": key.json()["token"], "tenant_id": tenant}


def test_a_published_workflow_streams_to_its_end_through_nginx(real: RealApp,
                                                               workflow: dict[str, str]) -> None:
    words = f"hello from the lab {secrets.token_hex(4)}"
    seen: list[str] = []
    finished: dict = {}
    for event in dify_client.run_streaming(real.balancer, workflow["key"], {"words": words}):
        seen.append(event.get("event", ""))
        if event.get("event") == "workflow_finished":
            finished = event["data"]
            break
    assert finished, f"no workflow_finished event; events seen: {seen}"
    assert seen[0] == "workflow_started", seen
    assert finished["status"] == "succeeded", finished
    assert finished["outputs"] == {"echoed": words}, finished
    run = real.sql(f"SELECT status FROM workflow_runs WHERE id = '{finished['id']}'")
    assert run == "succeeded"


def test_inner_api_takes_the_rendered_plugin_key_and_refuses_the_default(
        real: RealApp, workflow: dict[str, str]) -> None:
    env = real.dify_env()
    rendered = "INNER_API_KEY_FOR_PLUGIN" in env  # (no secret values in the failure message)
    assert rendered, (
        "the rendered environment has no INNER_API_KEY_FOR_PLUGIN (the name the api reads): "
        f"the api falls back to the public default; keys rendered: "
        f"{sorted(k for k in env if 'INNER' in k)}")
    key = env["INNER_API_KEY_FOR_PLUGIN"]
    assert key and key != "inner-api-key"
    url = f"http://{real.hosts['app-api1'].address}:5001/inner/api/fetch/app/info"
    body = {"tenant_id": workflow["tenant_id"], "user_id": "", "app_id": workflow["app_id"]}

    def post(with_key: str) -> requests.Response:
        return requests.post(url, json=body, headers={"X-Inner-Api-Key": with_key}, timeout=10)

    accepted = post(key)
    assert accepted.status_code == 200, accepted.text
    form = accepted.json()["data"]["data"]["user_input_form"]  # the imported app's own input
    assert form[0]["text-input"]["variable"] == "words", accepted.text
    assert post("inner-api-key").status_code == 404


def test_the_api_calls_the_plugin_daemon_with_its_server_key(
        real: RealApp, console: dify_client.Console, workflow: dict[str, str]) -> None:
    listed = console.call("GET", "/workspaces/current/plugin/list?page=1&page_size=10")
    assert listed.status_code == 200, listed.text
    assert listed.json() == {"plugins": [], "total": 0}
    # The daemon (stand-in) refuses any other key: the answer above came with its SERVER_KEY.
    daemon = (f"http://{real.hosts['app-api1'].address}:5002/plugin/"
              f"{workflow['tenant_id']}/management/list")
    assert requests.get(daemon, headers={"X-Api-Key": "not-the-key"},
                        timeout=10).status_code == 401


def test_a_second_deploy_changes_nothing(real: RealApp) -> None:
    again = real.ok("app.deploy")
    counts = summary_counts(again.stdout)
    assert counts and all(c.get("changed", 0) == 0 for c in counts.values()), again.stdout


def _sentinel_master(real: RealApp) -> str:
    """The master's address as the Sentinel on app-r2 names it ("" when it does not answer)."""
    code, out = real.hosts["app-r2"].exec(
        "set -a; . /etc/difyops/redis/auth.env; set +a; redis-cli --no-auth-warning -p 26379 "
        "sentinel get-master-addr-by-name dify-master")
    return out.split()[0] if code == 0 and out.split() else ""


def _finished(real: RealApp, key: str, words: str) -> dict:
    """One streamed workflow run through nginx: its workflow_finished data, or why not."""
    try:
        for event in dify_client.run_streaming(real.balancer, key, {"words": words}, timeout=60):
            if event.get("event") == "workflow_finished":
                return event["data"]
    except (requests.RequestException, AssertionError, ValueError) as exc:
        return {"error": str(exc)[:300]}
    return {"error": "the stream ended without workflow_finished"}


def test_workflows_run_again_after_a_redis_failover(real: RealApp,
                                                    workflow: dict[str, str]) -> None:
    old = real.hosts["app-db"].address
    assert _sentinel_master(real) == old
    code, out = real.hosts["app-db"].exec("systemctl stop redis-server")  # the fault
    assert code == 0, out
    until(lambda: _sentinel_master(real) not in ("", old), 90, "Sentinel electing a new master")
    words = f"after the failover {secrets.token_hex(4)}"
    deadline = time.monotonic() + 240
    last: dict = {}
    while time.monotonic() < deadline:
        last = _finished(real, workflow["key"], words)
        if last.get("status") == "succeeded":
            break
        time.sleep(0.5)  # a poll, as support.until does, keeping the last answer
    assert last.get("status") == "succeeded", f"no successful run after the failover: {last}"
    assert last["outputs"] == {"echoed": words}
