"""The whole stack: `inv deploy.all` from nothing on six lab hosts, as an operator meets it.

Layout in tests/integration/stack_lab.py: nginx + monitoring, two api/web hosts, a worker/beat
host (Docker hosts running the real Dify api image of the newest release that runs here, with
stand-ins for web and the plugin daemon), PostgreSQL primary + Redis and a standby on Debian 13
(pgvector). One deploy.all runs the preflight, ships the images and brings up every
tier; then every route through nginx must reach the right component on the right hosts, a row
written on the primary must reach the standby, deploy.status must be all healthy and a second
deploy.all must change nothing. Fault: an api host is stopped while deploy.all applies an
inventory change; the run fails there, says so, leaves the load balancer as it was; once the
host is back the same command finishes and a third run changes nothing.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter

import pytest
import requests

from tasks.core.inventory import load_inventory
from tasks.tiers.lb import UPSTREAMS
from tests.images import dify_source
from tests.integration import stack_lab
from tests.integration.lab import Lab
from tests.integration.real_lab import Unrunnable
from tests.integration.stack_lab import Stack
from tests.integration.support import release, summary_counts, until

pytestmark = [pytest.mark.real_dify, pytest.mark.docker]

PSQL = "runuser -u postgres -- psql -d dify -AtX -c"
ACCESS_LOG = "/var/log/nginx/dify.access.log"
UPSTREAM = re.compile(r'"GET (?P<path>\S+) [^"]*" (?P<status>\d{3}) .*upstream="(?P<up>[^"]*)"')


@pytest.fixture(scope="module")
def stack(lab: Lab, tmp_path_factory: pytest.TempPathFactory):
    try:
        the_stack = stack_lab.start(lab, tmp_path_factory.mktemp("stack"))
    except (Unrunnable, dify_source.Unavailable) as exc:
        pytest.skip(str(exc))
    yield the_stack
    release(lab, {h.name: h for h in the_stack.hosts.values()})


@pytest.fixture(scope="module")
def first(stack: Stack, lab: Lab):
    """The first deploy.all, from nothing."""
    started = time.monotonic()
    result = stack.inv("deploy.all")
    lab.timings["stack: first deploy.all"] = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def components(stack: Stack) -> dict[str, str]:
    """upstream port -> the component that listens there (the lb tier's table)."""
    settings = load_inventory(stack.inventory_file, check_secrets=False).settings
    return {**{str(port): role for _, role, port in UPSTREAMS},
            str(settings["app"]["websocket_port"]): "api_websocket"}


def through_nginx(stack: Stack, paths: list[str]) -> dict[str, list[tuple[int, str, str]]]:
    """GET each path through the balancer; path -> [(status, component, host that answered)],
    the component and host read from the upstream nginx logged for the request."""
    lb = stack.host("lb")
    agent = f"stack-test/{uuid.uuid4().hex[:8]}"
    statuses: dict[str, list[int]] = {}
    for path in paths:
        reply = requests.get(f"http://{lb.address}{path}", timeout=10,
                             headers={"Host": "dify.lab", "User-Agent": agent})
        statuses.setdefault(path, []).append(reply.status_code)
    hosts = {h.address: h.name for h in stack.hosts.values()}
    ports = components(stack)
    logged: list[tuple[str, str, str]] = []

    def all_logged() -> bool:
        _, log = lb.exec(f"grep -F {agent} {ACCESS_LOG} || true")
        logged[:] = [(m["path"], *m["up"].split(", ")[-1].rsplit(":", 1))
                     for m in map(UPSTREAM.search, log.splitlines()) if m]
        return len(logged) == len(paths)

    until(all_logged, 10, "nginx logged every request")  # it logs a request as it ends
    seen: dict[str, list[tuple[str, str]]] = {}
    for path, address, port in logged:
        seen.setdefault(path, []).append((ports.get(port, port), hosts.get(address, address)))
    return {path: [(status, *where) for status, where in zip(statuses[path], seen[path],
                                                            strict=True)]
            for path in statuses}


def test_deploy_all_from_nothing_brings_up_every_tier(stack: Stack, first) -> None:
    out = first.stdout
    assert "preflight passed" in out, out
    assert re.search(r"images: [1-9]\d* transfer\(s\)", out), out  # shipped by deploy.all
    for tier in ("db", "cache", "vector", "app", "lb", "monitor"):
        assert f"[{tier}] " in out, f"tier {tier} did not run:\n{out}"
    counts = summary_counts(out)
    assert set(counts) == {h.name for h in stack.hosts.values()}
    assert all(c.get("changed", 0) > 0 and c.get("failed", 0) == 0 for c in counts.values())
    # The migration ran once, on the first api host, before any api started.
    assert out.count("migrate the database (one run) ... changed") == 1
    assert f"[app] {stack.host('api1').name}: migrate the database (one run) ... changed" in out


def test_every_route_reaches_the_right_component_on_the_right_hosts(stack: Stack, first) -> None:
    api = {stack.host("api1").name, stack.host("api2").name}
    daemon = {stack.host("api1").name}
    web = api  # both api hosts serve web too
    expected = {  # the release's routes (config/profiles/<version>.yml), one probe path each
        "/console/api/setup": ("api", api, 200), "/api/x": ("api", api, 404),
        "/v1/x": ("api", api, 404), "/files/x": ("api", api, 404),
        "/mcp/x": ("api", api, 404), "/triggers/x": ("api", api, 404),
        # Sticky by client address: this client's rounds all reach one of the two.
        "/socket.io/?EIO=4&transport=polling": ("api_websocket", api, 200),
        "/e/x": ("plugin_daemon", daemon, 404),
        "/explore/apps": ("web", web, 200), "/": ("web", web, 200),
        "/signin": ("web", web, 200), "/_next/static/x.js": ("web", web, 200),
    }
    rounds = 4  # round robin: each api/web route is seen on both hosts
    answers = through_nginx(stack, [p for p in expected for _ in range(rounds)])
    wrong = {}
    for path, (kind, hosts, status) in expected.items():
        got = answers[path]
        answered = {h for *_, h in got}
        if {(s, c) for s, c, _ in got} != {(status, kind)} or not answered <= hosts:
            wrong[path] = got
        spread = 1 if kind == "api_websocket" else len(hosts)
        if len(answered) != spread:
            wrong[path] = got
    assert wrong == {}, json.dumps(wrong, indent=1)
    # The setup route reads the migrated database: the release's api answers it.
    reply = requests.get(f"http://{stack.host('lb').address}/console/api/setup",
                         headers={"Host": "dify.lab"}, timeout=10).json()
    assert reply["step"] == "not_started", reply
    for name in ("api1", "api2"):
        health = requests.get(f"http://{stack.host(name).address}:5001/health", timeout=5).json()
        assert (health["status"], health["version"]) == ("ok", stack.version), (name, health)


def test_a_write_on_the_primary_is_read_on_the_standby(stack: Stack, first) -> None:
    token = uuid.uuid4().hex
    code, out = stack.host("db1").exec(
        f"{PSQL} \"CREATE TABLE IF NOT EXISTS stack_check (v text); "
        f"INSERT INTO stack_check VALUES ('{token}')\"")
    assert code == 0, out
    until(lambda: token in stack.host("db2").exec(f"{PSQL} 'SELECT v FROM stack_check'")[1],
          30, "the row written on db1 read on db2")
    code, out = stack.host("db2").exec(f"{PSQL} 'SELECT pg_is_in_recovery()'")
    assert (code, out.strip()) == (0, "t"), out


def test_status_is_all_healthy_and_a_second_deploy_changes_nothing(stack: Stack, first,
                                                                   lab: Lab) -> None:
    status = stack.ok("deploy.status")
    rows = [line.split() for line in status.stdout.splitlines()
            if line.split()[:1] and line.split()[0] in {h.name for h in stack.hosts.values()}]
    assert rows and "UNHEALTHY" not in status.stdout, status.stdout
    assert all(" healthy " in f" {' '.join(row)} " for row in rows), status.stdout
    assert {row[1] for row in rows} >= {"db", "cache", "app", "lb", "monitor"}
    vector = stack.ok("vector.status")  # pgvector has no gate of its own in deploy.status
    assert re.search(rf"^{stack.host('db1').name}\s.*primary", vector.stdout, re.M), vector.stdout
    assert {row[0] for row in rows} == {h.name for h in stack.hosts.values()}

    started = time.monotonic()
    second = stack.ok("deploy.all")
    lab.timings["stack: second deploy.all (no change)"] = time.monotonic() - started
    counts = summary_counts(second.stdout)
    assert set(counts) == {h.name for h in stack.hosts.values()}
    assert all(c.get("changed", 0) == 0 for c in counts.values()), second.stdout
    assert "images: 0 transfer(s), every host has every image" in second.stdout


def test_a_host_stopped_mid_deploy_stops_its_tiers_and_the_rerun_finishes(stack: Stack,
                                                                         lab: Lab) -> None:
    api2, lb = stack.host("api2"), stack.host("lb")
    # One inventory change that the app tier (UPLOAD_FILE_SIZE_LIMIT) and the lb tier
    # (client_max_body_size) both apply; api2 goes away once the run is past its preflight.
    stack.write_inventory(upload_limit_mb=50)
    run = stack.popen("deploy.all")
    lines: list[str] = []
    stopper = None
    for line in run.stdout:
        lines.append(line)
        if stopper is None and line.startswith("[db] "):
            stopper = threading.Thread(target=api2.stop)
            stopper.start()
    run.wait(timeout=900)
    stopper.join()
    out = "".join(lines)
    assert run.returncode == 1, out
    assert "Fix the cause and run the same command again" in out  # on stderr, after the table
    counts = summary_counts(out.split("\nerror: ")[0])
    summary_line = next(line for line in out.split("summary:")[-1].splitlines()
                        if line.startswith(api2.name))
    assert counts[api2.name]["failed"] >= 1 and "[app]" in summary_line, out
    # The other app hosts went on; the balancer depends on the app tier: not run, untouched.
    for name in (stack.host("api1").name, stack.host("work").name):
        assert f"[app] {name}: file /opt/dify/.env ... changed" in out, out
    assert re.search(rf"\[lb\] {lb.name}: .* \.\.\. not run: depends on app, which failed", out)
    assert "client_max_body_size 100m;" in lb.exec(
        "cat /etc/nginx/sites-enabled/dify.conf")[1]

    started = time.monotonic()
    api2.start()
    lab.timings["stack: api2 started again"] = time.monotonic() - started
    stack.write_inventory(upload_limit_mb=50)  # its address may have changed
    started = time.monotonic()
    rerun = stack.ok("deploy.all")
    lab.timings["stack: rerun after the fault"] = time.monotonic() - started
    counts = summary_counts(rerun.stdout)
    assert counts[api2.name]["changed"] > 0 and counts[lb.name]["changed"] > 0, rerun.stdout
    assert "client_max_body_size 50m;" in lb.exec("cat /etc/nginx/sites-enabled/dify.conf")[1]
    assert "UPLOAD_FILE_SIZE_LIMIT=50" in api2.exec("cat /opt/dify/.env")[1]
    answered = Counter(h for *_, h in through_nginx(stack, ["/v1/x"] * 4)["/v1/x"])
    assert set(answered) == {stack.host("api1").name, api2.name}, answered

    third = stack.ok("deploy.all")
    assert all(c.get("changed", 0) == 0 for c in summary_counts(third.stdout).values()), \
        third.stdout

