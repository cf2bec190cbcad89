"""The services of Dify 1.14.2-1.16.1 without hosts: api_websocket (collaboration) and the agent
services (agent_backend, local_sandbox, agent_ssrf_proxy), from the parsed rendered files, the
placement rules, the secrets, the preflight checks, the network plan and the status table."""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import pytest
import yaml
from dotenv import dotenv_values

from tasks.core import netplan, placement, preflight, secrets
from tasks.core.errors import InputError
from tasks.core.inventory import Inventory
from tasks.core.plan import WriteFile
from tasks.core.render import Renderer
from tasks.tiers import app as tier
from tasks.tiers import firewall
from tests.unit.test_dify_source import release  # noqa: F401  (its session fixture)


def files_of(inventory: Inventory, name: str) -> dict[str, str]:
    plan = tier.steps(inventory, Renderer(inventory), inventory.host(name))
    return {s.path: s.content for s in plan if isinstance(s, WriteFile)}


def services(inventory: Inventory, name: str) -> dict[str, Any]:
    return yaml.safe_load(files_of(inventory, name)["/opt/dify/compose.yml"])["services"]


def compose_file(inventory: Inventory, name: str) -> dict[str, Any]:
    return yaml.safe_load(files_of(inventory, name)["/opt/dify/compose.yml"])


def env(inventory: Inventory, name: str) -> dict[str, str | None]:
    return dotenv_values(stream=io.StringIO(files_of(inventory, name)["/opt/dify/.env"]))


# --- api_websocket ------------------------------------------------------------------------------


def test_api_websocket_runs_on_every_api_host_with_the_release_settings(load, base) -> None:
    inventory = load(base)
    for name, address in (("api1", "10.0.2.21"), ("api2", "10.0.2.22")):
        service = services(inventory, name)["api_websocket"]
        assert service["image"] == "langgenius/dify-api:1.16.1"
        assert service["environment"]["MODE"] == "api"
        assert service["environment"]["SERVER_WORKER_AMOUNT"] == "1"
        assert service["environment"]["SERVER_WORKER_CLASS"] == \
            "geventwebsocket.gunicorn.workers.GeventWebSocketWorker"
        assert service["environment"]["SERVER_WORKER_CONNECTIONS"] == "1000"
        assert service["environment"]["GUNICORN_TIMEOUT"] == "360"
        assert service["ports"] == [f"{address}:5006:5001"]
        assert service["env_file"] == [".env"]
        assert "http://127.0.0.1:5001/health" in service["healthcheck"]["test"]
    for name in ("worker1", "web1"):
        assert "api_websocket" not in services(inventory, name)
    for name in ("api1", "worker1"):
        assert env(inventory, name)["ENABLE_COLLABORATION_MODE"] == "true"
    gate = next(s.gate for s in tier.steps(inventory, Renderer(inventory), inventory.host("api2"))
                if getattr(s, "label", "") == "health api_websocket /health")
    assert gate.url == "http://10.0.2.22:5006/health" and gate.contains == "ok"


def test_collaboration_off_renders_the_switch_and_no_container(load, base) -> None:
    base["app"] = {"collaboration": False, "websocket_port": 5016}
    inventory = load(base)
    assert "api_websocket" not in services(inventory, "api1")
    assert env(inventory, "api1")["ENABLE_COLLABORATION_MODE"] == "false"
    assert not any(s.port == 5016 for s in netplan.services(inventory))
    assert "api_websocket" not in tier.services_of(inventory, inventory.host("api1"))


def test_an_older_release_has_neither_the_switch_nor_the_new_services(load, base) -> None:
    base["dify"] = {"version": "1.13.3"}
    inventory = load(base)
    found = services(inventory, "api1")
    assert not {"api_websocket", *placement.AGENT_SERVICES} & set(found)
    values = env(inventory, "api1")
    assert "ENABLE_COLLABORATION_MODE" not in values and "AGENT_BACKEND_BASE_URL" not in values
    assert "/opt/dify/squid-agent.conf" not in files_of(inventory, "api1")
    assert not inventory.with_role("agent")
    assert not any(s.name == "DIFY_AGENT_API_TOKEN" for s in secrets.needed(inventory))


def test_1_14_2_has_api_websocket_but_no_agent(load, base) -> None:
    base["dify"] = {"version": "1.14.2"}
    inventory = load(base)
    assert "api_websocket" in services(inventory, "api1")
    assert "agent_backend" not in services(inventory, "api1")
    assert "AGENT_BACKEND_BASE_URL" not in env(inventory, "worker1")


@pytest.mark.parametrize("port", [5001, 5050, 80])
def test_the_websocket_port_must_be_its_own(load, base, port) -> None:
    base["app"] = {"websocket_port": port}
    with pytest.raises(InputError, match=r"inventory.yml: app.websocket_port: .* is not a free "
                                         r"port[\s\S]*fix: use a port of its own"):
        load(base)


# --- the agent services -------------------------------------------------------------------------


def test_the_agent_services_default_to_the_first_api_host(load, base) -> None:
    inventory = load(base)
    assert [h.name for h in inventory.with_role("agent")] == ["api1"]
    api1 = compose_file(inventory, "api1")
    found = api1["services"]
    backend, sandbox, proxy = (found[name] for name in placement.AGENT_SERVICES)
    assert backend["image"] == "langgenius/dify-agent-backend:1.16.1"
    assert backend["ports"] == ["10.0.2.21:5050:5050"]
    assert "env_file" not in backend and "env_file" not in sandbox  # not the whole .env
    assert backend["environment"]["DIFY_AGENT_SHELLCTL_ENTRYPOINT"] == "http://local_sandbox:5004"
    assert backend["environment"]["DIFY_AGENT_API_TOKEN"] == "${AGENT_BACKEND_API_TOKEN:?}"
    assert backend["environment"]["DIFY_AGENT_SERVER_SECRET_KEY"] == \
        "${DIFY_AGENT_SERVER_SECRET_KEY:?}"
    assert backend["environment"]["DIFY_AGENT_INNER_API_KEY"] == "${INNER_API_KEY_FOR_PLUGIN:?}"
    assert backend["environment"]["DIFY_AGENT_INNER_API_URL"] == "http://10.0.2.21:5001"
    assert backend["environment"]["DIFY_AGENT_REDIS_URL"] == "${DIFY_AGENT_REDIS_URL:?}"
    assert backend["depends_on"]["local_sandbox"] == {"condition": "service_healthy"}
    assert backend["healthcheck"]["test"][:2] == ["CMD", "python3"]  # the image has no curl
    assert "http://127.0.0.1:5050/openapi.json" in " ".join(backend["healthcheck"]["test"])
    # local_sandbox: reachable only through its two internal networks, out only by the proxy.
    assert sandbox["networks"] == ["agent_sandbox_network", "local_sandbox_proxy_network"]
    assert "ports" not in sandbox
    assert sandbox["environment"]["SHELLCTL_AUTH_TOKEN"] == "${DIFY_AGENT_SHELLCTL_AUTH_TOKEN:?}"
    assert sandbox["environment"]["HTTP_PROXY"] == "http://agent_ssrf_proxy:3128"
    assert sandbox["environment"]["HTTPS_PROXY"] == "http://agent_ssrf_proxy:3128"
    assert sandbox["healthcheck"]["test"][-1] == "http://127.0.0.1:5004/healthz"
    assert backend["networks"] == ["default", "agent_sandbox_network"]
    assert proxy["networks"] == ["default", "local_sandbox_proxy_network"]
    assert proxy["volumes"] == ["./squid-agent.conf:/etc/squid/squid.conf:ro"]
    networks = api1["networks"]
    assert all(networks[n] == {"driver": "bridge", "internal": True} for n in (
        "ssrf_proxy_network", "agent_sandbox_network", "local_sandbox_proxy_network"))
    assert not set(placement.AGENT_SERVICES) & set(services(inventory, "api2"))
    assert tier.host_images(inventory, inventory.host("api1"))["agent_backend"] == \
        "langgenius/dify-agent-backend:1.16.1"
    assert "agent_backend" not in tier.host_images(inventory, inventory.host("api2"))


def test_a_host_with_the_role_agent_runs_them_alone(load, base) -> None:
    base["hosts"].append({"name": "agent1", "address": "10.0.2.41", "roles": ["agent"]})
    inventory = load(base)
    assert [h.name for h in inventory.with_role("agent")] == ["agent1"]
    assert not set(placement.AGENT_SERVICES) & set(services(inventory, "api1"))
    compose = compose_file(inventory, "agent1")
    assert set(compose["services"]) == {"redis_proxy", *placement.AGENT_SERVICES}
    assert set(compose["networks"]) == {"agent_sandbox_network", "local_sandbox_proxy_network"}
    assert "agent1" in [plan.host.name for plan in tier.TIER.plan(inventory).hosts]
    # api and worker everywhere reach it on its address; the token is the agent's API token.
    for name in ("api2", "worker1", "agent1"):
        values = env(inventory, name)
        assert values["AGENT_BACKEND_BASE_URL"] == "http://10.0.2.41:5050"
        assert values["AGENT_BACKEND_API_TOKEN"] == inventory.secrets["DIFY_AGENT_API_TOKEN"]
    labels = [s.label for s in tier.steps(inventory, Renderer(inventory),
                                          inventory.host("agent1"))]
    assert "health plugin daemon on api1" in labels
    assert "health Redis reachable at 10.0.3.11:26379" in labels
    assert labels[-2:] == ["health agent_backend /openapi.json",
                           "health local_sandbox healthy (:5004/healthz)"]
    assert tier.services_of(inventory, inventory.host("agent1")) == [
        "redis_proxy", *placement.AGENT_SERVICES]  # Sentinel: the master-following proxy


def test_two_agent_hosts_are_refused_with_file_key_and_fix(load, base) -> None:
    base["hosts"][3]["roles"].append("agent")
    base["hosts"][4]["roles"].append("agent")
    with pytest.raises(InputError) as caught:
        load(base)
    text = str(caught.value)
    assert "inventory.yml: hosts[4].roles: 2 hosts have role 'agent' (api2, worker1)" in text
    assert "fix: keep 'agent' on one host only" in text


def test_the_role_agent_with_an_older_release_runs_nothing(load, base) -> None:
    base["dify"] = {"version": "1.15.0"}
    base["hosts"].append({"name": "agent1", "address": "10.0.2.41", "roles": ["agent"]})
    inventory = load(base)
    assert placement.agent_host(inventory) is None
    assert tier.steps(inventory, Renderer(inventory), inventory.host("agent1")) == []


@pytest.mark.parametrize(("mode", "extra", "internal_tls", "address", "port"), [
    ("standalone", [], False, "10.0.3.11", 6379),
    ("standalone", [], True, "redis_proxy", 6379),
    ("sentinel", [], False, "redis_proxy", 6379),
    ("cluster", [{"name": "broker1", "address": "10.0.3.31", "roles": ["broker"]}], False,
     "10.0.3.31", 6379),
    ("cluster", [{"name": "broker1", "address": "10.0.3.31", "roles": ["broker"]}], True,
     "redis_proxy", 6379)])
def test_the_agent_backend_follows_the_apps_redis_on_db_2(load, base, mode, extra,
                                                         internal_tls, address, port) -> None:
    base["cache"] = {"mode": mode}
    base["tls"] = {"internal": internal_tls}
    if mode == "standalone":
        for host in base["hosts"][6:8]:
            host["roles"] = [r for r in host["roles"] if r != "cache"]
    base["hosts"] += extra
    inventory = load(base)
    password = inventory.secrets["REDIS_AGENT_PASSWORD"]  # its own Redis user
    assert env(inventory, "api1")["DIFY_AGENT_REDIS_URL"] == \
        f"redis://agent_backend:{password}@{address}:{port}/2"
    # Sentinel or tls.internal: the redis_proxy of the agent host, started before it.
    proxied = mode == "sentinel" or internal_tls
    backend = services(inventory, "api1")["agent_backend"]
    assert ("redis_proxy" in backend["depends_on"]) == proxied
    assert ("redis_proxy" in services(inventory, "api1")) == proxied


def test_the_agent_proxy_lets_the_sandbox_reach_only_the_stub_and_files(load, base) -> None:
    inventory = load(base)
    files = files_of(inventory, "api1")
    agent = files["/opt/dify/squid-agent.conf"].splitlines()
    access = [line for line in agent if line.startswith("http_access")]
    assert access == ["http_access deny !Safe_ports", "http_access deny CONNECT !SSL_ports",
                      "http_access allow dst_agent_backend path_agent_stub",
                      "http_access allow dst_dify_api path_files",
                      "http_access deny internal_destination", "http_access allow localnet",
                      "http_access deny all"]
    assert "acl dst_agent_backend dstdomain agent_backend" in agent
    assert "acl dst_dify_api dstdomain api 10.0.2.21 10.0.2.22 dify.test" in agent
    assert "acl path_agent_stub urlpath_regex -i ^/agent-stub/" in agent
    # The same template makes ssrf_proxy's file, without the agent's exceptions.
    ssrf = files["/opt/dify/squid.conf"]
    assert "dst_agent_backend" not in ssrf and "http_access deny internal_destination" in ssrf


# --- secrets ------------------------------------------------------------------------------------


def test_agent_secrets_are_generated_and_checked(load, base, write_inventory) -> None:
    inventory = load(base)
    names = {s.name for s in secrets.needed(inventory)}
    assert {"DIFY_AGENT_SERVER_SECRET_KEY", "DIFY_AGENT_API_TOKEN",
            "DIFY_AGENT_SHELLCTL_AUTH_TOKEN"} <= names
    inventory.secrets_file.write_text("")
    written = secrets.generate(inventory)
    values = dotenv_values(inventory.secrets_file)
    assert "DIFY_AGENT_SERVER_SECRET_KEY" in written
    key = values["DIFY_AGENT_SERVER_SECRET_KEY"]
    assert len(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))) == 32
    assert secrets.read(inventory)[1] == []


@pytest.mark.parametrize(("name", "value", "problem"), [
    ("DIFY_AGENT_SERVER_SECRET_KEY", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY",
     "published default"),
    ("DIFY_AGENT_API_TOKEN", "dify-agent-run-token-for-dev-only", "published default"),
    ("DIFY_AGENT_SERVER_SECRET_KEY", "not+base64url/at-all-0123456789", "not unpadded base64url"),
    ("DIFY_AGENT_SERVER_SECRET_KEY", "c2hvcnQtYnV0LXZhbGlkLWJhc2U2NA",
     "does not decode to exactly 32 bytes")])
def test_bad_agent_secrets_are_refused(load, base, name, value, problem) -> None:
    from tests.unit.conftest import good_secrets

    values = {**good_secrets(), name: value}
    with pytest.raises(InputError) as caught:
        load(base, values)
    assert f"secrets.env: {name}: " in str(caught.value)
    assert problem in str(caught.value)


# --- preflight and the network plan -------------------------------------------------------------


def facts(kernel: str = "6.1.0-18-amd64", compose: str = "2.29.1") -> preflight.Facts:
    return preflight.Facts(os_id="debian", os_version="12", os_name="Debian 12", kernel=kernel,
                           docker="27.1.1", compose=compose, listeners=[])


def rows_by_check(inventory: Inventory, name: str, found: preflight.Facts) -> dict[str, Any]:
    return {row.check: row for row in preflight.evaluate(inventory, inventory.host(name), found)}


def test_preflight_refuses_an_old_kernel_where_local_sandbox_runs(load, base) -> None:
    inventory = load(base)
    old = rows_by_check(inventory, "api1", facts(kernel="5.10.0-28-amd64"))["kernel"]
    assert old.status == preflight.REFUSE and old.host == "api1"
    assert "Linux 5.10.0-28-amd64 found" in old.detail and "needs Linux 5.13 or newer" in old.detail
    assert "boot a newer kernel" in old.detail
    assert rows_by_check(inventory, "api1", facts())["kernel"].status == preflight.OK
    assert "kernel" not in rows_by_check(inventory, "api2", facts(kernel="5.10.0-28-amd64"))


def test_preflight_refuses_an_old_compose_on_app_hosts(load, base) -> None:
    inventory = load(base)
    row = rows_by_check(inventory, "worker1", facts(compose="2.20.2"))["docker"]
    assert row.status == preflight.REFUSE and row.host == "worker1"
    assert "compose 2.20.2; this Dify release needs compose 2.24.0 or newer" in row.detail
    assert "upgrade the docker-compose-plugin" in row.detail
    assert rows_by_check(inventory, "worker1", facts(compose="v2.24.0"))["docker"].status == \
        preflight.OK
    # Weaviate's host runs compose too, but not Dify's compose file.
    assert rows_by_check(inventory, "vector1", facts(compose="2.20.2"))["docker"].status == \
        preflight.OK


def test_the_network_plan_opens_the_new_ports_to_their_clients(load, base) -> None:
    inventory = load(base)
    plan = {s.name: s for s in netplan.services(inventory)}
    websocket, agent = plan["api websocket"], plan["agent backend"]
    assert (websocket.port, websocket.servers, websocket.clients) == (5006, ("api",), ("lb",))
    assert (agent.port, agent.servers) == (5050, ("agent",))
    assert set(agent.clients) == {"api", "worker"}
    api1 = inventory.host("api1")
    assert agent in netplan.served(inventory, api1)
    assert agent not in netplan.served(inventory, inventory.host("api2"))
    sources = firewall.service_sources(inventory, api1, agent)
    assert sources.v4 == ("10.0.2.22", "10.0.2.31")  # api2, worker1 (api1 through the bridge)
    assert sources.interfaces == firewall.DOCKER_INTERFACES
    ws_sources = firewall.service_sources(inventory, inventory.host("api2"), websocket)
    assert ws_sources.v4 == ("10.0.1.10",)
    assert (inventory.host("db1"), plan["redis"]) in [
        (peer, s) for peer, s in netplan.needed_peers(inventory, api1) if s.name == "redis"]


def test_the_connection_budget_counts_api_websocket(load, base) -> None:
    inventory = load(base)
    from tasks.core import rules

    parts = dict(rules.connection_parts(inventory))
    assert parts["api_websocket 2x1x40"] == 80
    base["app"] = {"collaboration": False}
    assert not any(label.startswith("api_websocket") for label, _ in
                   rules.connection_parts(load(base)))


def test_status_names_a_missing_container(load, base, monkeypatch, capsys) -> None:
    import tasks.app as app_tasks
    from tasks.core.fleet import Outcome

    inventory = load(base)
    monkeypatch.setattr(app_tasks, "load", lambda ctx: inventory)

    def each_host(hosts, action, timeouts):
        running = [{"Service": s, "Image": "i", "State": "running", "Health": "healthy"}
                   for s in ("api", "api_websocket", "sandbox", "ssrf_proxy", "plugin_daemon",
                             "redis_proxy", "agent_backend", "agent_ssrf_proxy")]
        return [Outcome(inventory.host("api1"), running)]

    monkeypatch.setattr(app_tasks, "each_host", each_host)
    with pytest.raises(Exception, match="1 container"):
        app_tasks.status.body(None)
    lines = capsys.readouterr().out.splitlines()
    assert any(re.search(r"api1 +local_sandbox +- +missing", line) for line in lines)


# --- facts read from each release's own compose file (skipped where its source is absent) ------

DEFAULT = re.compile(r"^\$\{[A-Z0-9_]+:-(.*)\}$")


def compose_value(value: Any) -> str:
    """A value of Dify's compose file with `${NAME:-default}` resolved to its default."""
    match = DEFAULT.match(str(value))
    return match.group(1) if match else str(value)


def environment(body: dict) -> dict[str, str]:
    """A compose service's environment as a mapping (Dify writes both forms)."""
    env = body.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: compose_value(value) for key, value in env.items()}


@pytest.mark.parametrize("version", ["1.14.2", "1.15.0", "1.16.1"])
def test_api_websocket_runs_as_the_releases_compose_says(release, load, base,  # noqa: F811
                                                        version) -> None:
    source = release(version)
    theirs = environment(source.compose["services"]["api_websocket"])
    base["dify"] = {"version": version}
    ours = services(load(base), "api1")["api_websocket"]["environment"]
    for key in ("MODE", "SERVER_WORKER_AMOUNT", "SERVER_WORKER_CLASS",
                "SERVER_WORKER_CONNECTIONS", "GUNICORN_TIMEOUT"):
        assert ours[key] == theirs[key], key
    assert source.services["api_websocket"].profiles == ("collaboration",)
    assert "ENABLE_COLLABORATION_MODE" in source.env_keys_read


def test_agent_services_use_the_releases_environment_names(release, load, base) -> None:  # noqa: F811
    source = release("1.16.1")
    theirs = source.compose["services"]
    found = services(load(base), "api1")
    for name in placement.AGENT_SERVICES:
        assert set(environment(found[name])) <= set(environment(theirs[name])) | {
            "SHELLCTL_ENABLE_PATH_ISOLATION"}, name  # local-sandbox.env.example's switch
    assert set(theirs["local_sandbox"]["networks"]) == set(found["local_sandbox"]["networks"])
    assert theirs["local_sandbox"]["healthcheck"]["test"][-1].endswith(":5004/healthz")
    assert "--port\", \"5050" in source.read("dify-agent/Dockerfile").replace("'", '"')
    agent_settings = source.read("dify-agent/src/dify_agent/server/app.py")
    assert "Redis.from_url(" in agent_settings and "Sentinel" not in agent_settings
