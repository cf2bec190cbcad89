"""Hosts given by IPv6 addresses: every URL and host:port difyops writes brackets them, and the
Redis lists Dify cannot read them in are refused before any host is touched."""

from __future__ import annotations

import copy
import dataclasses
import io
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from dotenv import dotenv_values

from tasks.core.errors import InputError
from tasks.core.gates import HttpGate
from tasks.core.inventory import Inventory, endpoint
from tasks.core.plan import WaitFor
from tasks.core.render import Renderer, redis_url
from tasks.core.tiers import build
from tasks.tiers import TIERS
from tests.unit.conftest import good_secrets
from tests.unit.test_dev_tiers import lab

SECRETS = good_secrets()
# The unit inventory's hosts by IPv6 address (fd00::<IPv4 address's last two octets>).
V6 = {"lb1": "fd00::1:10", "web1": "fd00::2:11", "api1": "fd00::2:21", "api2": "fd00::2:22",
      "worker1": "fd00::2:31", "db1": "fd00::3:11", "db2": "fd00::3:12", "db3": "fd00::3:13",
      "vector1": "fd00::3:21", "monitor1": "fd00::4:10"}


def files(inventory: Inventory) -> dict[tuple[str, str], str]:
    """(host, path) -> content for every file every tier writes."""
    return {(plan.host.name, step.path): step.content
            for tier in build(TIERS, inventory) for plan in tier.hosts for step in plan.files()}


def env(text: str) -> dict[str, str | None]:
    return dotenv_values(stream=io.StringIO(text))


@pytest.fixture
def v6(base: dict[str, Any]) -> dict[str, Any]:
    """The unit inventory on IPv6 addresses: standalone Redis (Dify cannot list IPv6 Sentinels),
    the agent services on worker1, a three-node Weaviate."""
    base["cache"]["mode"] = "standalone"
    for host in base["hosts"]:
        host["address"] = V6[host["name"]]
        if host["name"] in ("db2", "db3"):
            host["roles"] = ["db_replica"]
    base["hosts"][4]["roles"].append("agent")
    base["hosts"][9]["roles"].append("vector")
    base["hosts"][1]["roles"].append("vector")
    return base


def test_endpoint_brackets_only_ipv6() -> None:
    assert endpoint("10.0.2.21", 5001) == "10.0.2.21:5001"
    assert endpoint("api1.dify.test", 5001) == "api1.dify.test:5001"
    assert endpoint("fd00::2:21", 5001) == "[fd00::2:21]:5001"
    assert redis_url("fd00::3:11", "redis", "p@ss", 6379, 1) == "redis://:p%40ss@[fd00::3:11]:6379/1"


def test_app_compose_brackets_ipv6(load, v6) -> None:
    written = files(load(v6))
    api = yaml.safe_load(written[("api1", "/opt/dify/compose.yml")])["services"]
    assert api["api"]["ports"] == ["[fd00::2:21]:5001:5001"]
    assert api["api_websocket"]["ports"] == ["[fd00::2:21]:5006:5001"]
    assert api["plugin_daemon"]["ports"] == ["[fd00::2:21]:5002:5002"]
    assert api["plugin_daemon"]["environment"]["DIFY_INNER_API_URL"] == "http://[fd00::2:21]:5001"
    web = yaml.safe_load(written[("web1", "/opt/dify/compose.yml")])["services"]
    assert web["web"]["ports"] == ["[fd00::2:11]:3000:3000"]
    agent = yaml.safe_load(written[("worker1", "/opt/dify/compose.yml")])["services"]
    assert agent["agent_backend"]["ports"] == ["[fd00::2:31]:5050:5050"]
    assert agent["agent_backend"]["environment"]["DIFY_AGENT_INNER_API_URL"] == \
        "http://[fd00::2:21]:5001"


def test_dify_env_brackets_ipv6(load, v6) -> None:
    written = files(load(v6))
    # tls.internal: Redis through redis_proxy, whose server line brackets the address.
    assert re.findall(r"^\s*server (\S+ \S+) ", written[("api1", "/opt/dify/redis-proxy.cfg")],
                      re.M) == ["db1 [fd00::3:11]:6379"]
    v6["tls"] = {"internal": False}
    values = env(files(load(v6))[("api1", "/opt/dify/.env")])
    assert values["WEAVIATE_ENDPOINT"] == "http://[fd00::2:11]:8080"  # the first vector host
    assert values["WEAVIATE_GRPC_ENDPOINT"] == "grpc://[fd00::2:11]:50051"
    assert values["PLUGIN_DAEMON_URL"] == "http://[fd00::2:21]:5002"
    assert values["AGENT_BACKEND_BASE_URL"] == "http://[fd00::2:31]:5050"
    assert values["CELERY_BROKER_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@[fd00::3:11]:6379/1"
    assert values["DIFY_AGENT_REDIS_URL"] == \
        f"redis://agent_backend:{SECRETS['REDIS_AGENT_PASSWORD']}@[fd00::3:11]:6379/2"
    # Addresses that Dify reads on their own (with the port in a key of its own) stay bare.
    assert values["REDIS_HOST"] == values["DB_HOST"] == "fd00::3:11"


def test_cluster_broker_url_brackets_ipv6(load, v6) -> None:
    """In cluster mode the broker is a standalone Redis of its own, which may be IPv6."""
    v6["cache"]["mode"] = "cluster"
    for host in v6["hosts"]:
        host["address"] = host["address"].replace("fd00::3:1", "10.0.3.1")
        if host["name"] in ("db2", "db3"):
            host["roles"] = ["db_replica", "cache"]
    v6["hosts"][9]["roles"].append("broker")
    v6["tls"] = {"internal": False}  # with it, the broker is reached through redis_proxy
    values = env(files(load(v6))[("api1", "/opt/dify/.env")])
    assert values["REDIS_CLUSTERS"] == "10.0.3.11:6379,10.0.3.12:6379,10.0.3.13:6379"
    assert values["CELERY_BROKER_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@[fd00::4:10]:6379/1"


def test_every_gate_url_reaches_its_ipv6_host(load, v6) -> None:
    """The health gates probed from the control machine: URLs a client parses into the host's
    address and the port."""
    urls = [step.gate.url for tier in build(TIERS, load(v6)) for plan in tier.hosts
            for step in plan.steps if isinstance(step, WaitFor) and isinstance(step.gate, HttpGate)]
    parsed = {(urlsplit(url).hostname, urlsplit(url).port) for url in urls}
    assert {"http://[fd00::1:10]:80/health", "http://[fd00::2:21]:5001/health",
            "http://[fd00::2:21]:5002/health/check", "http://[fd00::3:21]:8080/v1/.well-known/ready"
            } <= set(urls)
    assert all(host in V6.values() for host, _ in parsed), parsed


def test_weaviate_cluster_join_brackets_ipv6(load, v6) -> None:
    compose = yaml.safe_load(files(load(v6))[("vector1", "/opt/dify-vector/compose.yml")])
    environment = compose["services"]["weaviate"]["environment"]
    assert environment["CLUSTER_JOIN"] == "[fd00::2:11]:7100,[fd00::4:10]:7100"
    assert environment["CLUSTER_ADVERTISE_ADDR"] == "fd00::3:21"


def test_haproxy_servers_bracket_ipv6(load, base) -> None:
    """HAProxy's server address is `[v6]:port` (its parser takes the port after the last ':'
    outside brackets, then strips them). The rule below keeps IPv6 cache hosts out of Sentinel
    mode, where redis_proxy runs, so the inventory is changed after it was checked."""
    inventory = load(base)
    inventory.hosts = [dataclasses.replace(host, address=f"fd00::3:{host.address[-2:]}")
                       if host.has("cache") else host for host in inventory.hosts]
    config = Renderer(inventory).render("config/haproxy/redis-master.cfg.j2",
                                        inventory.host("api1"),
                                        servers=[(host, False)
                                                 for host in inventory.with_role("cache")])
    assert re.findall(r"^\s*server (\S+ \S+) ", config, re.M) == [
        "db1 [fd00::3:11]:6379", "db2 [fd00::3:12]:6379", "db3 [fd00::3:13]:6379"]


def test_dev_env_files_bracket_ipv6(load, v6) -> None:
    data = lab()
    data["dev"]["network"] = "fd00::/64"
    data["net"]["management"] = ["fd00::/64"]
    for host, address in zip(data["hosts"], ("fd00::100", "fd00::101", "fd00::102"), strict=True):
        host["address"] = address
    written = files(load(data))
    api = env(next(content for (host, path), content in written.items()
                   if host == "ubuntu-vm" and path.endswith("/api/.env")))
    assert api["CONSOLE_API_URL"] == api["FILES_URL"] == "http://[fd00::101]:5001"
    assert api["CONSOLE_WEB_URL"] == "http://[fd00::102]:3000"
    assert api["WEAVIATE_ENDPOINT"] == "http://[fd00::100]:8080"
    web = env(next(content for (host, path), content in written.items()
                   if host == "workstation" and path.endswith("/web/.env.local")))
    assert web["NEXT_PUBLIC_API_PREFIX"] == "http://[fd00::101]:5001/console/api"
    assert web["NEXT_PUBLIC_PUBLIC_API_PREFIX"] == "http://[fd00::101]:5001/api"
    assert web["NEXT_PUBLIC_SOCKET_URL"] == "ws://[fd00::101]:5001"
    # A home lab has no plugin_daemon host: the dev api's PLUGIN_DAEMON_URL, for one on IPv6.
    inventory = load(v6)
    dev_api = env(Renderer(inventory).render("config/dev/api.env.j2", inventory.host("api1"),
                                             api_url="", web_urls=[""]))
    assert dev_api["PLUGIN_DAEMON_URL"] == "http://[fd00::2:21]:5002"


@pytest.mark.parametrize(("mode", "setting"), [("sentinel", "REDIS_SENTINELS"),
                                               ("cluster", "REDIS_CLUSTERS")])
def test_ipv6_cache_hosts_are_refused_where_dify_splits_on_colons(load, base, mode: str,
                                                                   setting: str) -> None:
    base["cache"]["mode"] = mode
    base["hosts"][6]["address"] = "fd00::3:12"
    if mode == "cluster":
        base["hosts"][9]["roles"].append("broker")
    with pytest.raises(InputError) as caught:
        load(base)
    assert str(caught.value).startswith("1 problem found") and (
        f"hosts[6].address: db2 is a cache host with the IPv6 address fd00::3:12: with "
        f"cache.mode {mode}, Dify reads the cache hosts from {setting}, which it splits on ':' "
        f"into host and port, so it cannot reach an IPv6 address\n"
        f"    fix: give db2's IPv4 address, or a DNS name that resolves to it") in str(caught.value)


def test_ipv6_hosts_that_are_not_listed_there_are_accepted(load, base) -> None:
    standalone = copy.deepcopy(base)
    standalone["cache"]["mode"] = "standalone"
    for host in standalone["hosts"][5:8]:
        host["roles"] = [role for role in host["roles"] if role != "cache"]
    standalone["hosts"][5]["roles"].append("cache")
    standalone["hosts"][5]["address"] = "fd00::3:11"
    assert load(standalone).host("db1").address == "fd00::3:11"
    base["hosts"][2]["address"] = "fd00::2:21"  # an api host, in sentinel mode
    assert load(base).host("api1").address == "fd00::2:21"


def test_ipv4_output_is_unchanged(load, base) -> None:
    """The IPv4 forms, exactly as before brackets existed."""
    base["tls"] = {"internal": False}  # with it, Dify reaches Redis through redis_proxy
    written = files(load(base))
    values = env(written[("api1", "/opt/dify/.env")])
    assert values["REDIS_SENTINELS"] == "10.0.3.11:26379,10.0.3.12:26379,10.0.3.13:26379"
    assert values["WEAVIATE_ENDPOINT"] == "http://10.0.3.21:8080"
    assert values["WEAVIATE_GRPC_ENDPOINT"] == "grpc://10.0.3.21:50051"
    assert values["PLUGIN_DAEMON_URL"] == "http://10.0.2.21:5002"
    compose = written[("api1", "/opt/dify/compose.yml")]
    assert '    ports: ["10.0.2.21:5001:5001"]\n' in compose
    assert "      DIFY_INNER_API_URL: http://10.0.2.21:5001\n" in compose
    assert re.findall(r"^\s*server (\S+ \S+) ", written[("api1", "/opt/dify/redis-proxy.cfg")],
                      re.M) == ["db1 10.0.3.11:6379", "db2 10.0.3.12:6379", "db3 10.0.3.13:6379"]
