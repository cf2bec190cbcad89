"""The REAL Dify api, worker and beat on lab hosts, deployed and upgraded by the project's own
tasks (the hosts, the releases and the images: tests/integration/real_lab.py).

The story, in file order on shared hosts: the images are the releases' own; the start release
(1.13.3) is shipped by `inv images.sync` and deployed by `inv app.deploy`; the admin account, a
published workflow app and its API key are made through nginx and the workflow streams to its
end; `inv app.upgrade` to the target release (1.14.2) runs real migrations under steady requests
through nginx and `inv app.rollback` refuses to cross them; on the target: the worker's queues,
the workflow made on the start release, the inner API key, the plugin daemon's key, a deploy
that changes nothing, an app deletion done by the worker; no command of Dify's Redis users
refused (ACL LOG) and no secret in clear in a capture of the lab's network since before the
first deploy; then a PostgreSQL failover and a Redis failover, each followed by the workflow
running again (after the Redis failover, `inv deploy.doctor` restarts a worker that stopped
consuming).

What a release itself says is read from its source, by code: the alembic head of its migration
scripts, the worker's queue list in its entrypoint, its Celery app, its DSL version, its upgrade
steps' profile. Without the source or a Python 3.12 the module is skipped with the reason.
Marked ``real_dify`` (deselect with ``-m "not real_dify"``).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from dotenv import dotenv_values

from tasks.core import shell
from tasks.core.gates import poll
from tasks.core.profiles import steps_between
from tasks.tiers.cache import HELPER as REDIS_HELPER
from tests.images import dify_source
from tests.integration import capture, dify_client
from tests.integration.app_lab import ROOT
from tests.integration.capture import Capture
from tests.integration.lab import Lab
from tests.integration.real_lab import (
    ADMIN,
    APIS,
    PG_UNIT,
    RealApp,
    Release,
    Unrunnable,
    ensure_release,
    pick_releases,
    start_real,
)
from tests.integration.support import SteadyLoad, release, summary_counts, until

pytestmark = [pytest.mark.real_dify, pytest.mark.docker]


@pytest.fixture(scope="module")
def releases(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> list[Release]:
    """The target release and the one the lab starts on (when one runs here), newest first,
    each with its real api image built (once per set of inputs)."""
    try:
        picked = pick_releases(tmp_path_factory.mktemp("dify-source"))
        return [ensure_release(lab, version, root) for version, root in picked]
    except (Unrunnable, dify_source.Unavailable) as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def dify(releases: list[Release]) -> Release:
    """The target release: the one the lab ends on."""
    return releases[0]


@pytest.fixture(scope="module")
def first(releases: list[Release]) -> Release:
    """The release the lab starts on: the one before the target, else the target itself."""
    return releases[-1]


@pytest.fixture(scope="module")
def recording(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Capture | None]:
    """Every packet on the lab's network (but SSH) from before the first deploy on: read by
    the test that looks for secrets in clear (None without tcpdump)."""
    started = capture.start(lab.bridge(), tmp_path_factory.mktemp("capture") / "lab.pcap")
    try:
        yield started
    finally:
        if started is not None:
            started.stop()


@pytest.fixture(scope="module")
def real(lab: Lab, first: Release, recording: Capture | None,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealApp]:
    """Five hosts; PostgreSQL, Redis with Sentinel and nginx deployed by the real tasks (the
    lab's network recorded from before the first deploy)."""
    app = start_real(lab, tmp_path_factory.mktemp("real-dify"), first.version)
    try:
        yield app
    finally:
        release(lab, app.hosts)


def test_each_image_is_the_release_api(releases: list[Release], lab: Lab) -> None:
    for each in releases:
        image = lab.client.images.get(each.image.name)
        config = image.attrs["Config"]
        assert image.id == lab.client.images.get(each.image.tag).id
        assert len(image.attrs["RootFS"]["Layers"]) == 1  # one copy per container on vfs hosts
        assert (config["User"], config["WorkingDir"]) == ("dify", "/app/api")
        assert config["Entrypoint"] == ["/bin/bash", "/entrypoint.sh"]
        env = dict(item.split("=", 1) for item in config["Env"])
        assert {k: env.get(k) for k in dify_source.production_env(each.root)} \
            == dify_source.production_env(each.root)
        out = lab.client.containers.run(
            each.image.name, entrypoint=["/bin/bash", "-c"], remove=True,
            command=["id -u; python --version; cat /entrypoint.sh | sha256sum; "
                     "sha256sum < /app/api/gunicorn.conf.py"]).decode().split("\n")
        source = each.root / "api"
        assert out[0] == "1001"
        assert out[1].startswith("Python 3.12.")
        assert out[2].split()[0] == _sha256(source / "docker" / "entrypoint.sh")
        assert out[3].split()[0] == _sha256(source / "gunicorn.conf.py")
        print(f"real api image {each.version}: {each.image.size / 1e9:.2f} GB, "
              f"built in {each.image.seconds:.0f} s (0: cached)")


def _sha256(path: Path) -> str:
    """The hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shipped(real: RealApp, release_: Release, lab: Lab) -> str:
    """`inv images.sync` of a release's images; asserts the real api arrived on every api host
    (the very image built here) and returns the command's output."""
    result = real.ok("images.sync", "--version", release_.version)
    wanted = lab.client.images.get(release_.image.name).id
    for name in APIS:
        code, out = real.hosts[name].exec(
            f"docker image inspect -f '{{{{.Id}}}}' {release_.image.name}")
        assert (code, out.strip()) == (0, wanted), (name, out)
    return result.stdout


@pytest.fixture(scope="module")
def shipped(real: RealApp, first: Release, lab: Lab) -> str:
    """The first `inv images.sync` of the start release: its output."""
    started = time.monotonic()
    out = _shipped(real, first, lab)
    lab.timings["real dify: images.sync (first)"] = time.monotonic() - started
    return out


def test_images_sync_ships_the_real_api_over_ssh(real: RealApp, first: Release, shipped: str,
                                                 lab: Lab) -> None:
    name = re.escape(first.image.name)
    for host in APIS:
        assert re.search(rf"{host}\s+{name}\s+shipped", shipped), shipped
    again = _shipped(real, first, lab)  # the real api travels once (stand-ins may be
    # retagged meanwhile by another test run on this machine: only the api rows count)
    for host in APIS:
        assert re.search(rf"{host}\s+{name}\s+present", again), again


def _head(release_: Release) -> str:
    """The release's alembic head, read from its migration scripts."""
    heads = dify_source.alembic_heads(release_.root)
    assert len(heads) == 1, heads
    return next(iter(heads))


@pytest.fixture(scope="module")
def deployed(real: RealApp, shipped: str, lab: Lab) -> str:
    """The first `inv app.deploy`, of the start release: its output."""
    started = time.monotonic()
    out = real.ok("app.deploy").stdout
    lab.timings["real dify: app.deploy (first)"] = time.monotonic() - started
    return out


def test_deploy_migrates_to_the_release_head_and_serves_through_nginx(
        real: RealApp, first: Release, deployed: str) -> None:
    assert "app-api1: migrate the database (one run) ... changed" in deployed, deployed
    assert real.sql("SELECT version_num FROM alembic_version") == _head(first)
    assert int(real.sql("SELECT count(*) FROM information_schema.tables "
                        "WHERE table_schema = 'public'")) > 50
    for host in APIS:
        health = requests.get(f"http://{real.hosts[host].address}:5001/health",
                              timeout=10).json()
        assert (health["status"], health["version"]) == ("ok", first.version), (host, health)
    setup = requests.get(f"{real.balancer}/console/api/setup", timeout=10)
    assert setup.status_code == 200, setup.text
    assert setup.json()["step"] in ("not_started", "finished")  # (the console set it up)
    # Every connection of Dify (and of the plugin daemon) from another host is TLS: pg_hba
    # admits no other, and the api's libpq verified the server (PGSSLMODE=verify-full).
    connections = real.sql("SELECT DISTINCT a.client_addr || ' ' || s.ssl FROM pg_stat_activity a "
                           "JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'dify' "
                           "AND a.client_addr IS NOT NULL").splitlines()
    assert connections and all(line.endswith(" true") for line in connections), connections
    # Redis serves TLS only (port 0); Dify's clients reach it through their host's redis_proxy,
    # which verified the certificate: the worker's broker connections from app-api1, and the
    # api's own client on both api hosts.
    assert real.redis("config", "get", "port", db=0).split() == ["port", "0"]
    worker = real.hosts["app-api1"].address
    until(lambda: f"addr={worker}:" in real.redis("client", "list", db=0), 30,
          "the worker's connections to Redis")
    for host in APIS:
        assert _writes_through_the_proxy(real, host), host


def test_the_apis_gunicorn_forks_its_workers_from_a_single_thread(real: RealApp,
                                                                    deployed: str) -> None:
    """gunicorn 25.1.0+ serves a control socket from a second thread of its arbiter; a worker
    forked while that thread holds the log stream's lock never boots. The env turns it off."""
    for host in APIS:
        code, out = real.hosts[host].exec(
            f"docker exec {real.container('api', host)} ls /proc/1/task")
        assert code == 0, out
        assert len(out.split()) == 1, (host, out, real.logs("api", host))
        assert not re.search(r"Control (socket|server)", real.logs("api", host))


@pytest.fixture(scope="module")
def console(real: RealApp, deployed: str) -> dify_client.Console:
    """Through nginx: the admin account set up, then logged in to the console."""
    console = dify_client.Console(real.balancer)
    made = console.setup(**ADMIN)
    assert made.status_code == 201, made.text
    logged = console.login(ADMIN["email"], ADMIN["password"])
    assert logged.status_code == 200 and logged.json()["result"] == "success", logged.text
    return console


def _make_app(real: RealApp, release_: Release, console: dify_client.Console, name: str,
              build: Callable[[str, str], str] = dify_client.echo_workflow) -> dict[str, str]:
    """Through nginx: a workflow app (``build``'s DSL, in the release's DSL version) imported and
    published, an API key made. Returns app_id, key, tenant_id."""
    dsl = build(dify_source.dsl_version(release_.root), name)
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


@pytest.fixture(scope="module")
def workflow(real: RealApp, first: Release, console: dify_client.Console) -> dict[str, str]:
    """The echo workflow app, made on the release the lab starts on."""
    return _make_app(real, first, console, "difyops echo")


def _finished(real: RealApp, key: str, words: str, timeout: float = 60) -> dict:
    """One streamed workflow run through nginx: its workflow_finished data, or why not (the
    stream silent for ``timeout`` seconds)."""
    try:
        for event in dify_client.run_streaming(real.balancer, key, {"words": words},
                                               timeout=timeout):
            if event.get("event") == "workflow_finished":
                return event["data"]
    except (requests.RequestException, AssertionError, ValueError) as exc:
        return {"error": str(exc)[:300]}
    return {"error": "the stream ended without workflow_finished"}


def _streams_to_its_end(real: RealApp, key: str) -> None:
    """A streamed run through nginx starts, finishes with the input echoed and is recorded."""
    words = f"hello from the lab {secrets.token_hex(4)}"
    seen: list[str] = []
    finished: dict = {}
    for event in dify_client.run_streaming(real.balancer, key, {"words": words}):
        seen.append(event.get("event", ""))
        if event.get("event") == "workflow_finished":
            finished = event["data"]
            break
    assert finished, f"no workflow_finished event; events seen: {seen}"
    assert seen[0] == "workflow_started", seen
    assert finished["status"] == "succeeded", finished
    assert finished["outputs"] == {"echoed": words}, finished
    assert real.sql(f"SELECT status FROM workflow_runs WHERE id = '{finished['id']}'") \
        == "succeeded"


def test_a_published_workflow_streams_to_its_end_through_nginx(real: RealApp,
                                                               workflow: dict[str, str]) -> None:
    _streams_to_its_end(real, workflow["key"])


def _runs_of(real: RealApp, app_id: str) -> int:
    """How many workflow runs of an app the database holds."""
    return int(real.sql(f"SELECT count(*) FROM workflow_runs WHERE app_id = '{app_id}'"))


def _target(releases: list[Release]) -> tuple[Release, Release]:
    """(target, start) of an upgrade; skips the test when the lab starts on the target."""
    if len(releases) < 2:
        pytest.skip("no runnable release before the target to upgrade from")
    target, start = releases
    return target, start


def test_a_deploy_of_another_release_is_refused_without_touching_a_host(
        real: RealApp, releases: list[Release], deployed: str) -> None:
    target, start = _target(releases)
    before = {host: real.images(host) for host in APIS}
    real.write_inventory(version=target.version)
    try:
        result = real.inv("app.deploy")
    finally:
        real.write_inventory()
    assert result.returncode == 1, result.stdout
    assert f"app-api1 runs Dify {start.version}" in result.stdout, result.stdout
    assert f"inv app.upgrade --version {target.version}" in result.stdout, result.stdout
    assert {host: real.images(host) for host in APIS} == before


@pytest.fixture(scope="module")
def target_shipped(real: RealApp, releases: list[Release], lab: Lab) -> Release:
    """The target release's images on every host that runs Dify (`inv images.sync`)."""
    target, _ = _target(releases)
    _shipped(real, target, lab)
    return target


def test_an_upgrade_stops_before_any_api_when_dify_skips_its_migration(
        real: RealApp, releases: list[Release], target_shipped: Release) -> None:
    target, start = _target(releases)
    before = {host: real.images(host) for host in APIS}
    # Another migration holds the release's own lock (its upgrade-db command, in the cache
    # database): Dify says it skipped and exits 0; difyops must see the head was not reached.
    real.redis("SET", "db_upgrade_lock", "someone-else", "EX", "600", db=0)
    try:
        result = real.inv("app.upgrade", "--version", target.version, timeout=1800)
    finally:
        real.redis("DEL", "db_upgrade_lock", db=0)
    assert result.returncode == 1, result.stdout
    assert "Database migration skipped" in result.stderr, result.stderr
    assert f"expects its head {_head(target)}" in result.stderr, result.stderr
    assert real.sql("SELECT version_num FROM alembic_version") == _head(start)
    assert {host: real.images(host) for host in APIS} == before
    assert "compose up" not in result.stdout, result.stdout


@dataclass
class Upgrade:
    """What `inv app.upgrade` from the start release to the target did."""

    start: Release
    target: Release
    output: str
    load: SteadyLoad
    runs_before: int


@pytest.fixture(scope="module")
def upgraded(real: RealApp, releases: list[Release], workflow: dict[str, str],
             lab: Lab) -> Upgrade | None:
    """The target release deployed: by `inv app.upgrade` from the start release under steady
    requests through nginx, after a run of the workflow on the start release (None when the
    start is the target). The inventory then says the target, as the upgrade asks."""
    if len(releases) < 2:
        return None
    target, start = releases
    _streams_to_its_end(real, workflow["key"])
    runs = _runs_of(real, workflow["app_id"])
    _shipped(real, target, lab)  # again: nothing to ship after target_shipped
    with SteadyLoad(f"{real.balancer}/console/api/setup", rate=10) as load:
        result = real.inv("app.upgrade", "--version", target.version, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    lab.timings[f"real dify: app.upgrade {start.version} -> {target.version}"] = load.seconds
    real.version = target.version  # the edit the upgrade asks for: `dify.version` is the target
    real.write_inventory()
    return Upgrade(start, target, result.stdout, load, runs)


def test_upgrade_migrates_under_steady_requests_and_keeps_the_data(
        real: RealApp, upgraded: Upgrade | None, console: dify_client.Console,
        workflow: dict[str, str]) -> None:
    if upgraded is None:
        pytest.skip("no runnable release before the target to upgrade from")
    start, target, load = upgraded.start, upgraded.target, upgraded.load
    figures = load.figures()
    print(f"upgrade {start.version} -> {target.version}: {figures['sent']} requests through "
          f"nginx in {figures['seconds']:.0f} s, {figures['failed']} failed, p50 "
          f"{figures['p50']:.0f} ms, p99 {figures['p99']:.0f} ms")
    assert load.failed == [], f"requests through nginx failed: {load.errors[:5]}"
    assert figures["sent"] >= 10 * figures["seconds"] * 0.8
    # Real migrations ran: the database is at the target's head, the start's data is there.
    assert real.sql("SELECT version_num FROM alembic_version") == _head(target)
    assert _runs_of(real, workflow["app_id"]) == upgraded.runs_before
    kept = console.call("GET", f"/apps/{workflow['app_id']}")
    assert kept.status_code == 200 and kept.json()["name"] == "difyops echo", kept.text
    for host in APIS:
        health = requests.get(f"http://{real.hosts[host].address}:5001/health",
                              timeout=10).json()
        assert health["version"] == target.version, (host, health)
    # A verified backup came first; each api host left the balancer while it was replaced, one
    # after the other; the run ends with the inventory edit to make.
    assert re.search(r"\[app\] backup \d{8}T\d{6}Z taken", upgraded.output), upgraded.output
    assert "app-api1: drained" in upgraded.output and "app-api2: drained" in upgraded.output
    replaced = [line.split()[1] for line in upgraded.output.splitlines()
                if "compose up dify ... changed" in line]
    assert replaced == ["app-api1:", "app-api2:"], upgraded.output
    assert f'set `dify.version: "{target.version}"`' in upgraded.output, upgraded.output
    # The release steps of every release crossed ran once, oldest first, and are recorded.
    expected = [f"{version}:{step.name}"
                for version, step in steps_between(start.version, target.version)]
    code, text = real.hosts["app-api2"].exec("cat /var/lib/difyops/dify-releases.json")
    assert code == 0, text
    history = json.loads(text)
    assert [(h["version"], h["alembic"]) for h in history] == \
        [(start.version, _head(start)), (target.version, _head(target))]
    assert history[-1]["steps"] == expected and history[-1]["complete"], history[-1]
    # Across a real migration, a rollback is a restore: refused, nothing replaced.
    refused = real.inv("app.rollback")
    assert refused.returncode == 1, refused.stdout
    assert "A rollback across a migration is a restore" in refused.stderr, refused.stderr
    assert f"alembic revision {_head(start)}" in refused.stderr, refused.stderr
    assert real.sql("SELECT version_num FROM alembic_version") == _head(target)


@pytest.fixture(scope="module")
def on_target(upgraded: Upgrade | None, deployed: str) -> None:
    """The target release runs (upgraded to, or deployed first when it is the start)."""


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


def test_worker_consumes_exactly_the_release_queues(real: RealApp, dify: Release,
                                                    on_target: None) -> None:
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


def test_the_workflow_made_before_runs_on_the_release_now_deployed(
        real: RealApp, workflow: dict[str, str], on_target: None) -> None:
    _streams_to_its_end(real, workflow["key"])


def test_a_code_node_runs_in_the_sandbox_with_its_key(
        real: RealApp, dify: Release, console: dify_client.Console, on_target: None) -> None:
    coded = _make_app(real, dify, console, "difyops code", dify_client.code_workflow)
    words = f"shout {secrets.token_hex(4)}"
    finished = _finished(real, coded["key"], words)
    assert finished.get("status") == "succeeded", finished
    assert finished["outputs"] == {"echoed": words.upper()}, finished
    # The sandbox (stand-in) runs code only for its API key: the run above came with it.
    endpoint = real.dify_env()["CODE_EXECUTION_ENDPOINT"].rstrip("/")
    code, status = real.hosts["app-api1"].exec(
        f"docker exec {real.container('api')} curl -s -o /dev/null -w '%{{http_code}}' "
        f"-H 'X-Api-Key: not-the-key' -H 'Content-Type: application/json' "
        f"-d '{{\"language\": \"python3\", \"code\": \"print(1)\"}}' "
        f"{endpoint}/v1/sandbox/run")
    assert (code, status.strip()) == (0, "401"), status


def test_inner_api_takes_the_rendered_plugin_key_and_refuses_the_default(
        real: RealApp, workflow: dict[str, str], on_target: None) -> None:
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


def test_the_api_and_the_plugin_daemon_call_each_other_with_their_keys(
        real: RealApp, console: dify_client.Console, workflow: dict[str, str],
        on_target: None) -> None:
    listed = console.call("GET", "/workspaces/current/plugin/list?page=1&page_size=10")
    assert listed.status_code == 200, listed.text
    assert listed.json() == {"plugins": [], "total": 0}
    # The daemon (stand-in) refuses any other key: the answer above came with its SERVER_KEY.
    daemon = (f"http://{real.hosts['app-api1'].address}:5002/plugin/"
              f"{workflow['tenant_id']}/management/list")
    assert requests.get(daemon, headers={"X-Api-Key": "not-the-key"},
                        timeout=10).status_code == 401
    # The daemon's way back: its DIFY_INNER_API_URL and DIFY_INNER_API_KEY reach the real api.
    back = requests.post(f"http://{real.hosts['app-api1'].address}:5002/standin/inner/"
                         "fetch/app/info", timeout=30,
                         json={"tenant_id": workflow["tenant_id"], "user_id": "",
                               "app_id": workflow["app_id"]})
    assert back.status_code == 200, back.text
    answer = back.json()
    assert answer["status"] == 200, answer
    assert answer["body"]["data"]["data"]["user_input_form"][0]["text-input"]["variable"] \
        == "words", answer


def test_a_second_deploy_changes_nothing(real: RealApp, on_target: None) -> None:
    again = real.ok("app.deploy")
    counts = summary_counts(again.stdout)
    assert counts and all(c.get("changed", 0) == 0 for c in counts.values()), again.stdout


def test_a_one_off_command_runs_in_a_fresh_container_of_the_release(real: RealApp,
                                                                     on_target: None) -> None:
    ran = real.inv("app.exec", "--host", "app-api2", "--", "sh", "-c", "id -u; echo $DB_HOST")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    # The image's user and the host's rendered environment; the container is gone after.
    assert ran.stdout.split() == ["1001", real.dify_env("app-api2")["DB_HOST"]], ran.stdout
    assert "app-api2: `sh` in a fresh api container" in ran.stderr, ran.stderr
    code, left = real.hosts["app-api2"].exec(
        "docker ps -aq --filter label=com.docker.compose.oneoff=True")
    assert (code, left.strip()) == (0, ""), left
    failed = real.inv("app.exec", "--", "sh", "-c", "exit 7")
    assert failed.returncode == 7, failed.stdout + failed.stderr


def test_dify_s_reset_password_runs_through_app_flask(real: RealApp, on_target: None) -> None:
    new = f"difyops-Reset-{secrets.token_hex(4)}"

    def reset(password: str) -> str:
        result = real.inv("app.flask", "--", "reset-password", "--email", ADMIN["email"],
                          "--new-password", password, "--password-confirm", password)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    try:
        assert "Password reset successfully." in reset(new)
        logged = dify_client.Console(real.balancer).login(ADMIN["email"], new)
        assert logged.status_code == 200 and logged.json()["result"] == "success", logged.text
        old = dify_client.Console(real.balancer).login(ADMIN["email"], ADMIN["password"])
        assert old.status_code != 200, old.text
    finally:
        reset(ADMIN["password"])


def test_app_logs_merges_the_api_hosts_in_time_order(real: RealApp, on_target: None) -> None:
    shown = real.ok("app.logs", "--service", "api", "--since", "3h", "--grep",
                    "Booting worker").stdout.splitlines()
    # gunicorn's line at each start of a worker, from both hosts, oldest first.
    assert {line.split(" |")[0] for line in shown} == {"app-api1 api", "app-api2 api"}, shown
    assert all("Booting worker" in line for line in shown), shown
    stamps = [line.split(" | ")[1].split()[0] for line in shown]
    assert stamps == sorted(stamps), shown


def test_app_logs_follows_a_worker_until_interrupted(real: RealApp, workflow: dict[str, str],
                                                     on_target: None) -> None:
    host = real.hosts["app-api1"]
    # ([c]: the pattern must not match the shell that runs pgrep)
    streaming = "pgrep -f '[c]ompose .*logs --no-color.* --follow worker_all'"
    follower = subprocess.Popen(
        [sys.executable, "-m", "invoke", "app.logs", "--follow", "--service", "worker_all",
         "--since", "1s"], cwd=ROOT, env=real.env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
    reader.start()
    try:
        until(lambda: host.exec(streaming)[0] == 0, 30, "docker compose logs --follow on "
                                                        "app-api1")
        assert _finished(real, workflow["key"], "followed").get("status") == "succeeded"
        until(lambda: any("received" in line for line in list(lines)), 30,
              "the worker's line for the run's task, streamed")
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=30)
    reader.join(timeout=10)
    assert all(line.startswith("app-api1 worker_all | ") for line in lines if line.strip()), lines
    # Interrupted, it ended its streams: nothing is left following on the host.
    until(lambda: host.exec(streaming)[0] == 1, 15, "no docker compose logs left on app-api1")


def test_an_app_deletion_is_carried_out_by_the_worker(
        real: RealApp, dify: Release, console: dify_client.Console, on_target: None) -> None:
    doomed = _make_app(real, dify, console, "difyops doomed")
    assert _finished(real, doomed["key"], "one run to delete").get("status") == "succeeded"
    where = f"app_id = '{doomed['app_id']}'"
    tables = ("workflows", "workflow_runs", "api_tokens")
    assert all(real.sql(f"SELECT count(*) FROM {table} WHERE {where}") != "0"
               for table in tables)
    deleted = console.call("DELETE", f"/apps/{doomed['app_id']}")
    assert deleted.status_code == 204, deleted.text
    # The api only removes the app row and queues the rest (app_deletion): the worker does it.
    assert real.sql(f"SELECT count(*) FROM apps WHERE id = '{doomed['app_id']}'") == "0"
    until(lambda: all(real.sql(f"SELECT count(*) FROM {table} WHERE {where}") == "0"
                      for table in tables), 120, "the worker deleting the app's data")


def _runs_again(real: RealApp, key: str, since: float, what: str, lab: Lab) -> None:
    """Polls a streamed workflow run through nginx until one succeeds (240 s deadline); prints
    and records how long after ``since`` (the fault) the workflow did not run.

    Dify streams a run's events over Redis pub/sub, which is at-most-once: events the worker
    publishes while a failover moves the proxies lose their subscriber, whose stream then stays
    silent. An echo run answers in well under a second, so each try waits 15 s, not the 60 s of
    a first run: a lost run costs one try, not a quarter of the deadline."""
    words = f"after the {what} {secrets.token_hex(4)}"

    def ran() -> tuple[bool, dict]:
        finished = _finished(real, key, words, timeout=15)
        return finished.get("status") == "succeeded", finished

    passed, last = poll(ran, 240, 0.5)
    assert passed, "\n".join([f"no successful run after the {what}: {last}",
                               *(real.logs(service, host) for host, service in (
                                   ("app-api1", "worker_all"), ("app-api1", "api"),
                                   ("app-api2", "api"), ("app-api1", "redis_proxy")))])
    assert last["outputs"] == {"echoed": words}
    down = time.monotonic() - since
    lab.timings[f"real dify: no workflow run after the {what}"] = down
    print(f"after the {what}: workflows ran again {down:.0f} s after the fault")


def _refused(real: RealApp, hosts: tuple[str, ...] = ("app-db", "app-r2", "app-r3")
             ) -> dict[str, str]:
    """cache host -> what its Redis refused since it started (ACL LOG), where it refused any."""
    refused = {}
    for host in hosts:
        code, out = real.hosts[host].exec(f"{REDIS_HELPER} cli acl log 128")
        assert code == 0, f"{host}: {out}"
        if out.strip():
            refused[host] = out.strip()
    return refused


def test_no_command_of_dify_or_its_daemons_is_refused_by_their_redis_users(
        real: RealApp, on_target: None) -> None:
    """Dify's clients log in as Redis' user default, the plugin daemon as plugin_daemon and
    redis_proxy's checks as monitor, all without Redis' @dangerous commands: after the
    upgrade, the workflows, the one-off commands and the app deletion, none was refused."""
    assert _refused(real) == {}


# Secrets that cross the network in clear, and why (README "Security", "Not protected yet"):
# the api and the plugin daemon send their keys to each other in HTTP headers.
IN_CLEAR = {"PLUGIN_DAEMON_KEY", "PLUGIN_DIFY_INNER_API_KEY"}


def test_no_password_crosses_the_lab_network_in_clear(real: RealApp, recording: Capture | None,
                                                      on_target: None) -> None:
    """Every packet between the lab's hosts since before the first deploy (the db, cache, lb
    and app deploys, the upgrade, the workflows, the one-off commands): no secret of the
    installation in clear, but the keys of the one plaintext link named in IN_CLEAR."""
    if recording is None:
        pytest.skip("tcpdump is not installed on this machine (scripts/setup installs it)")
    # The capture sees the network: a marker sent to nginx is recorded on its way in and on
    # its way to an api host.
    marker = f"difyops-capture-{secrets.token_hex(8)}"
    requests.get(f"{real.balancer}/console/api/setup?{marker}", timeout=10)
    until(lambda: recording.count(marker) >= 2, 10, "the marker recorded twice")
    recording.stop()
    values = {name: value or "" for name, value in
              dotenv_values(real.env["DIFY_SECRETS"]).items()}
    found = recording.found(values)
    print(f"secrets seen in clear: {sorted(found)}")
    assert not found - IN_CLEAR, sorted(found - IN_CLEAR)


def test_workflows_run_again_after_a_postgresql_failover(real: RealApp, workflow: dict[str, str],
                                                         lab: Lab, on_target: None) -> None:
    new = real.hosts["app-r2"]
    until(lambda: new.exec(
        "runuser -u postgres -- psql -AtX -c 'SELECT status FROM pg_stat_wal_receiver'")[1]
        .strip() == "streaming", 60, "app-r2 streaming from the primary")
    code, out = real.hosts["app-db"].exec(f"systemctl stop {PG_UNIT}")  # the fault
    assert code == 0, out
    since = time.monotonic()
    failover = real.ok("db.failover", "--host", "app-r2")  # what the operator runs, then
    assert "app-db: fenced" in failover.stdout, failover.stdout
    assert "then `inv app.deploy` renders DB_HOST=" in failover.stdout, failover.stdout
    real.primary = "app-r2"  # the inventory edit db.failover printed
    real.write_inventory()
    real.ok("app.deploy")
    _runs_again(real, workflow["key"], since, "PostgreSQL failover", lab)
    for host in APIS:
        assert real.dify_env(host)["DB_HOST"] == new.address
    assert _runs_of(real, workflow["app_id"]) >= 2  # runs from before the failover are there


def _writes_through_the_proxy(real: RealApp, host: str) -> bool:
    """Whether the api container of a host writes to Redis through its redis_proxy, as Dify's
    own client (redis-py, REDIS_* of its environment, Redis' user default): only a master
    takes a write (a replica answers READONLY), and Dify's user may not ask INFO or ROLE."""
    probe = ("import os, redis; print(redis.Redis(host=os.environ['REDIS_HOST'], "
             "port=int(os.environ['REDIS_PORT']), password=os.environ['REDIS_PASSWORD'], "
             "socket_timeout=3).set('difyops-test-write', '1', ex=60))")
    code, out = real.hosts[host].exec(f"docker exec {real.container('api', host)} python -c "
                                      f"{shell.quote(probe)}")
    return code == 0 and out.strip().splitlines()[-1:] == ["True"]


def _sentinel_master(real: RealApp) -> str:
    """The master's address as the Sentinel on app-r2 names it ("" when it does not answer)."""
    code, out = real.hosts["app-r2"].exec(
        f"{REDIS_HELPER} sentinel-cli sentinel get-master-addr-by-name dify-master")
    return out.split()[0] if code == 0 and out.split() else ""


def test_workflows_run_again_after_a_redis_failover(real: RealApp, workflow: dict[str, str],
                                                    lab: Lab, on_target: None) -> None:
    old = real.hosts["app-db"].address
    assert _sentinel_master(real) == old
    code, out = real.hosts["app-db"].exec("systemctl stop redis-server")  # the fault
    assert code == 0, out
    since = time.monotonic()
    until(lambda: _sentinel_master(real) not in ("", old), 90, "Sentinel electing a new master")
    # ...and each api host's redis_proxy forwarding to it (its checks need about 2 s more).
    for host in APIS:
        until(lambda host=host: _writes_through_the_proxy(real, host), 30,
              f"{host}'s redis_proxy reaching the new master")
    # What doctor's timer runs every doctor.every minutes: a worker whose ack failed in the
    # failover stopped consuming and answering pings (tasks/tiers/app.py CELERY_PING) and is
    # restarted; a worker that reconnected answers and is left alone.
    doctor = real.ok("deploy.doctor", "--only", "app")
    print(f"doctor after the Redis failover:\n{doctor.stdout}")
    if "UNHEALTHY" in doctor.stdout:
        assert "worker_all answers a Celery ping healthy again after restarting dify/worker_all" \
            in doctor.stdout, doctor.stdout
    _runs_again(real, workflow["key"], since, "Redis failover", lab)
    # The clients reconnected to the new master with their users (app-db's Redis is stopped).
    assert _refused(real, ("app-r2", "app-r3")) == {}
