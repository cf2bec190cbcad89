"""Dify 1.16.1's new services on real hosts, deployed by the real tasks: api_websocket on both api
hosts behind nginx's /socket.io/, and agent_backend, local_sandbox and agent_ssrf_proxy on the
host with the role `agent`.

agent_backend is the REAL dify-agent-backend image, built from the release's dify-agent/ folder
by tests/images/dify_real.py (the source: tests/images/dify_source.py); without the source or a
Python 3.12 the stand-in takes its place and the test of the real server is skipped with the
reason. Every other component is a stand-in (the release's api cannot be built here). The images
are named behind a registry-mirror prefix of this module's own (MIRROR), so that the stand-in
names other modules build and deploy keep naming stand-ins.

Hosts: svc-db (PostgreSQL, Redis, the nginx load balancer), svc-api1 (api, plugin daemon, worker,
beat, web: the migration host), svc-api2 (api and the role agent). The tests share the hosts and
run in file order.
"""

from __future__ import annotations

import secrets as random
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from dotenv import dotenv_values

from tests.images import dify_real, dify_source, haproxy_image, standin
from tests.integration.app_lab import App
from tests.integration.lab import Lab, ensure_base_image
from tests.integration.support import release, summary_counts, until

VERSION = "1.16.1"
NAMES = ("svc-db", "svc-api1", "svc-api2")
WEBSOCKET_PORT = 5006
MIRROR = "difyops-agent/"  # the inventory's registry mirror: this module's names (module doc)
AGENT_CONTAINER = "dify-agent_backend-1"


class Services(App):
    """The three hosts and an inventory on Dify 1.16.1; ``agent`` is the real agent backend
    image deployed, or None and ``agent_missing`` says why the stand-in runs instead."""

    agent: dify_real.Built | None = None
    agent_missing = ""

    def write_inventory(self, version: str = VERSION, health_timeout: int = 120) -> None:
        h = self.hosts
        inventory = {
            "name": "svc-lab",
            "domain": "dify.lab",
            "dify": {"version": version, "registry_mirror": MIRROR},
            "storage": {"type": "shared-fs", "path": "/srv/dify/storage"},
            "cache": {"mode": "standalone"},
            "vector": {"store": "pgvector"},
            "timeouts": {"connect": 10, "command": 600},
            "app": {"health_timeout": health_timeout, "websocket_port": WEBSOCKET_PORT,
                    "api": {"db_pool_size": 10, "db_max_overflow": 5},
                    "worker_groups": [{"name": "all", "queues": "all", "concurrency": 1}]},
            "net": {"firewall": "off"},
            "hosts": [h["svc-db"].inventory_entry(["db_primary", "cache", "lb"]),
                      h["svc-api1"].inventory_entry(["api", "plugin_daemon", "worker", "beat",
                                                     "web"]),
                      h["svc-api2"].inventory_entry(["api", "agent"])],
        }
        self.inventory_file.write_text(yaml.safe_dump(inventory, sort_keys=False))

    def services(self, name: str) -> dict[str, str]:
        """service -> state (with health) of the dify project's containers on a host."""
        code, out = self.hosts[name].exec(
            "docker ps -a --filter label=com.docker.compose.project=dify --format "
            "'{{.Label \"com.docker.compose.service\"}} {{.State}}{{if .Status}} "
            "{{.Status}}{{end}}'")
        assert code == 0, out
        return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines()
                if line.strip()}


def mirror_images(lab: Lab) -> tuple[dify_real.Built | None, str]:
    """The images of 1.16.1 behind MIRROR: the real agent backend (built once per set of
    inputs) and the stand-ins of every other component, of agent_backend too without it.
    Returns the real agent backend image, or None and why it cannot be built."""
    base = ensure_base_image(lab.client)
    names = standin.ensure_images(lab.client, base, (VERSION,))[VERSION]
    agent, missing = None, ""
    try:
        agent = dify_real.ensure_image(lab.client, base, VERSION, MIRROR,
                                       dify_real.AGENT_BACKEND)
    except dify_source.Unavailable as exc:
        missing = str(exc)
    if agent and agent.seconds:
        lab.timings[f"app {VERSION}: real agent backend image built"] = agent.seconds
    standin.mirror(lab.client, [name for role, name in names.items()
                                if role != "agent_backend" or agent is None], MIRROR)
    haproxy_image.ensure_haproxy(lab.client, base, MIRROR)  # redis_proxy: tls.internal is on
    return agent, missing


@pytest.fixture(scope="module")
def svc(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """The images of 1.16.1 (mirror_images), three hosts, PostgreSQL, Redis and nginx
    deployed."""
    tmp: Path = tmp_path_factory.mktemp("svc")
    agent, missing = mirror_images(lab)
    (db,) = lab.start([NAMES[0]])
    docker_hosts = lab.start(list(NAMES[1:]), docker=True)
    the_lab = Services({h.name: h for h in [db, *docker_hosts]}, tmp)
    the_lab.agent, the_lab.agent_missing = agent, missing
    the_lab.env["DIFY_SECRETS"] = str(tmp / "svc-lab.env")
    the_lab.write_inventory()
    the_lab.ok("config.secrets")
    the_lab.ok("db.deploy")
    the_lab.ok("cache.deploy")
    the_lab.ok("images.sync")
    yield the_lab
    release(lab, the_lab.hosts)


def test_every_new_container_is_healthy_on_its_host(svc: Services) -> None:
    svc.ok("app.deploy")
    svc.ok("lb.deploy")
    api1, api2 = svc.services("svc-api1"), svc.services("svc-api2")
    for name, found in (("svc-api1", api1), ("svc-api2", api2)):
        assert "healthy" in found["api_websocket"], (name, found)
        health = requests.get(f"http://{svc.hosts[name].address}:{WEBSOCKET_PORT}/health",
                              timeout=5).json()
        assert health["status"] == "ok" and health["version"] == VERSION
    # The agent services run where the role `agent` is, and only there.
    for service in ("agent_backend", "local_sandbox"):
        assert "healthy" in api2[service], api2
    assert api2["agent_ssrf_proxy"].startswith("running"), api2
    assert not {"agent_backend", "local_sandbox", "agent_ssrf_proxy"} & set(api1)
    # agent_backend answers on the agent host's address.
    answer = requests.get(f"http://{svc.hosts['svc-api2'].address}:5050/openapi.json", timeout=5)
    assert answer.status_code == 200, answer.text
    # local_sandbox is reachable only on its internal networks: agent_backend reaches it, the
    # host does not, and it has no way out but the proxy.
    code, out = svc.hosts["svc-api2"].exec(
        "docker inspect -f '{{range $n, $_ := .NetworkSettings.Networks}}{{$n}} {{end}}' "
        "dify-local_sandbox-1")
    assert code == 0 and sorted(out.split()) == ["dify_agent_sandbox_network",
                                                 "dify_local_sandbox_proxy_network"], out
    code, out = svc.hosts["svc-api2"].exec(
        "docker network inspect -f '{{.Internal}}' dify_agent_sandbox_network "
        "dify_local_sandbox_proxy_network")
    assert out.split() == ["true", "true"], out
    # api and worker know where the agent backend is.
    code, out = svc.hosts["svc-api1"].exec("grep -h '^AGENT_BACKEND_BASE_URL=' /opt/dify/.env")
    assert out.strip() == f"AGENT_BACKEND_BASE_URL=http://{svc.hosts['svc-api2'].address}:5050"
    status = svc.ok("app.status")
    assert "missing" not in status.stdout


@pytest.mark.real_dify
def test_agent_backend_is_the_real_release(lab: Lab, svc: Services) -> None:
    """The agent host runs the image built from the release's source, healthy, and the real
    server works with what difyops renders: its token guards /runs and its Redis answers."""
    if svc.agent is None:
        pytest.skip(f"the real agent backend image of {VERSION} cannot be built here: "
                    f"{svc.agent_missing}")
    host = svc.hosts["svc-api2"]
    code, out = host.exec(f"docker inspect -f '{{{{.Image}}}} {{{{.Config.Image}}}}' "
                          f"{AGENT_CONTAINER}")
    assert code == 0, out
    assert out.split() == [lab.client.images.get(svc.agent.tag).id, svc.agent.name], out
    assert "healthy" in svc.services("svc-api2")["agent_backend"]
    # The release's own server, started as its image starts it: uvicorn of the virtualenv,
    # user dify, the dify_agent package installed in the virtualenv (no source beside it).
    probe = ("id -u; tr '\\000' ' ' </proc/1/cmdline; echo; echo $(ls -A /app/api); "
             "python -c 'import dify_agent; print(dify_agent.__file__)'")
    code, out = host.exec(f"docker exec {AGENT_CONTAINER} sh -c {shlex.quote(probe)}")
    assert code == 0, out
    uid, cmdline, listing, package = out.splitlines()
    assert uid == "1001"
    assert cmdline.split()[1:] == ["/app/api/.venv/bin/uvicorn", "dify_agent.server.app:app",
                                   "--host", "0.0.0.0", "--port", "5050"], cmdline
    assert sorted(listing.split()) == [".venv", "storage"], listing
    assert package.startswith("/app/api/.venv/lib/python3.12/site-packages/dify_agent/")
    url = f"http://{host.address}:5050"
    schema = requests.get(f"{url}/openapi.json", timeout=5).json()
    assert schema["info"]["title"] == "Dify Agent Run Server"
    assert {"/runs", "/runs/{run_id}", "/agent-stub/connections"} <= set(schema["paths"])
    # DIFY_AGENT_API_TOKEN (from the secrets file) guards /runs; DIFY_AGENT_REDIS_URL (with the
    # Redis password) is where the run is looked up: an unknown run is a 404, not a 500.
    run = f"{url}/runs/{random.token_hex(8)}"
    assert requests.get(run, timeout=5).status_code == 401
    token = dotenv_values(svc.env["DIFY_SECRETS"])["DIFY_AGENT_API_TOKEN"]
    assert requests.get(run, headers={"Authorization": "Bearer wrong"},
                        timeout=5).status_code == 401
    answer = requests.get(run, headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert (answer.status_code, answer.json()) == (404, {"detail": "run not found"}), answer.text


def test_socket_io_goes_through_nginx_to_api_websocket(svc: Services) -> None:
    agent = f"difyops-test/{random.token_hex(4)}"
    lb = svc.hosts["svc-db"]
    answer = requests.get(f"http://{lb.address}/socket.io/?EIO=4&transport=polling",
                          headers={"Host": "dify.lab", "User-Agent": agent}, timeout=10)
    assert answer.status_code == 404 and answer.json()["version"] == VERSION  # the api answered
    sockets = {f"{svc.hosts[n].address}:{WEBSOCKET_PORT}" for n in ("svc-api1", "svc-api2")}

    def logged() -> bool:
        code, out = lb.exec(f"grep -F '{agent}' /var/log/nginx/dify.access.log")
        return code == 0 and any(f'upstream="{s}"' in out for s in sockets)

    until(logged, 10, "nginx logging the /socket.io/ request answered by an api_websocket")
    _, out = lb.exec("nginx -T 2>/dev/null | sed -n '/upstream dify_websocket/,/}/p'")
    assert "hash $remote_addr consistent;" in out, out
    check = svc.ok("lb.check")
    assert "/socket.io/" in check.stdout


def test_a_second_deploy_changes_nothing(svc: Services) -> None:
    again = svc.ok("app.deploy")
    counts = summary_counts(again.stdout)
    assert set(counts) == set(NAMES[1:]), again.stdout
    assert all(row.get("changed", 0) == 0 for row in counts.values()), again.stdout
