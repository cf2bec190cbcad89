"""Dify's Redis clients follow a Sentinel failover: the pub/sub address is the compose service
redis_proxy, whose HAProxy forwards to whichever cache host answers role:master; with
tls.internal every client goes through it and it speaks TLS to Redis; broker URLs carry the
password percent-encoded."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import yaml

from tasks.core.plan import WriteFile
from tasks.core.render import Renderer, redis_url, resp_hex
from tasks.tiers import app as tier


def files_of(inventory, name: str) -> dict[str, str]:
    return {s.path: s.content for s in tier.steps(inventory, Renderer(inventory),
                                                  inventory.host(name))
            if isinstance(s, WriteFile)}


def env_of(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines()
                if line and not line.startswith("#"))


def plaintext(base: dict) -> dict:
    """The inventory without tls.internal (Redis and PostgreSQL in plaintext)."""
    return {**base, "tls": {**base.get("tls", {}), "internal": False}}


def test_pubsub_reaches_redis_through_the_proxy_and_the_daemon_asks_sentinel(load,
                                                                            base) -> None:
    inventory = load(plaintext(base))  # Sentinel on db1, db2, db3
    files = files_of(inventory, "api1")
    env = env_of(files["/opt/dify/.env"])
    # What Dify builds its pub/sub client from when PUBSUB_REDIS_URL is not set: never a
    # fixed cache host, which a failover would leave behind.
    assert "PUBSUB_REDIS_URL" not in env
    assert (env["REDIS_HOST"], env["REDIS_PORT"]) == ("redis_proxy", "6379")
    compose = yaml.safe_load(files["/opt/dify/compose.yml"])["services"]
    assert compose["redis_proxy"]["image"] == "haproxy:2.8"
    assert "redis_proxy" in compose["api"]["depends_on"]
    # The plugin daemon (every release reads REDIS_USE_SENTINEL) finds the master itself.
    daemon = compose["plugin_daemon"]
    assert "depends_on" not in daemon
    assert daemon["environment"]["REDIS_USE_SENTINEL"] == "true"
    assert daemon["environment"]["REDIS_SENTINELS"] == "${REDIS_SENTINELS:?}"
    assert env["REDIS_SENTINELS"] == "10.0.3.11:26379,10.0.3.12:26379,10.0.3.13:26379"
    config = files["/opt/dify/redis-proxy.cfg"]
    servers = re.findall(r"^\s+server (\S+) (\S+) check .*on-marked-down shutdown-sessions$",
                         config, re.M)
    assert servers == [("db1", "10.0.3.11:6379"), ("db2", "10.0.3.12:6379"),
                       ("db3", "10.0.3.13:6379")]
    sent = [bytes.fromhex(h) for h in re.findall(r"tcp-check send-binary (\w+)", config)]
    password = inventory.secrets["REDIS_MONITOR_PASSWORD"].encode()  # Redis' user monitor
    assert sent[0] == b"*3\r\n$4\r\nAUTH\r\n$7\r\nmonitor\r\n$%d\r\n%s\r\n" % (
        len(password), password)
    assert sent[1] == b"*2\r\n$4\r\nINFO\r\n$11\r\nreplication\r\n"
    assert "tcp-check expect string role:master" in config
    assert " ssl " not in config


def test_with_internal_tls_every_client_reaches_redis_through_the_proxy_over_tls(
        load, base) -> None:
    """Dify's Sentinel client and the plugin daemon's have no TLS settings: with tls.internal
    they all use redis_proxy, which verifies each cache host's certificate and name."""
    inventory = load(base)
    for name in ("api1", "worker1"):
        files = files_of(inventory, name)
        env = env_of(files["/opt/dify/.env"])
        assert (env["REDIS_HOST"], env["REDIS_PORT"]) == ("redis_proxy", "6379")
        assert not {"REDIS_USE_SENTINEL", "CELERY_USE_SENTINEL", "REDIS_SENTINELS"} & set(env)
        broker = urlsplit(env["CELERY_BROKER_URL"])
        assert (broker.scheme, broker.hostname, broker.port, broker.path) == (
            "redis", "redis_proxy", 6379, "/1")
        compose = yaml.safe_load(files["/opt/dify/compose.yml"])["services"]
        assert "/opt/dify/tls/ca.crt:/difyops-tls/ca.crt:ro" in compose["redis_proxy"]["volumes"]
        servers = re.findall(r"^\s+server (\S+) (\S+) check .*shutdown-sessions(.*)$",
                             files["/opt/dify/redis-proxy.cfg"], re.M)
        assert servers == [
            (node, f"{address}:6379",
             f" ssl verify required ca-file /difyops-tls/ca.crt verifyhost {node}")
            for node, address in (("db1", "10.0.3.11"), ("db2", "10.0.3.12"),
                                  ("db3", "10.0.3.13"))]
    # The one-off migration (on api1) reaches Redis through the app project's redis_proxy,
    # started before it.
    migration = yaml.safe_load(files_of(inventory, "api1")["/opt/dify/migration/compose.yml"])
    assert migration["networks"]["default"] == {"name": "dify_default", "external": True}
    labels = [s.label for s in tier.steps(inventory, Renderer(inventory), inventory.host("api1"))]
    assert labels.index("compose up redis_proxy") < labels.index("migrate the database (one run)")
    daemon = yaml.safe_load(files_of(inventory, "api1")["/opt/dify/compose.yml"])[
        "services"]["plugin_daemon"]
    assert "redis_proxy" in daemon["depends_on"]
    assert "REDIS_USE_SENTINEL" not in daemon["environment"]
    assert daemon["environment"]["REDIS_HOST"] == "${REDIS_HOST:?}"


def test_standalone_redis_with_internal_tls_has_one_proxied_server(load, base) -> None:
    base["cache"] = {"mode": "standalone"}
    base["hosts"] = [h for h in base["hosts"] if h["name"] not in ("db2", "db3")] + [
        {"name": "db2", "address": "10.0.3.12", "roles": ["db_replica"]}]
    files = files_of(load(base), "api1")
    assert re.findall(r"^\s+server (\S+) (\S+) ", files["/opt/dify/redis-proxy.cfg"],
                      re.M) == [("db1", "10.0.3.11:6379")]
    assert env_of(files["/opt/dify/.env"])["REDIS_HOST"] == "redis_proxy"


def test_no_proxy_without_sentinel(load, base) -> None:
    base["cache"] = {"mode": "standalone"}
    base["hosts"] = [h for h in base["hosts"] if h["name"] not in ("db2", "db3")] + [
        {"name": "db2", "address": "10.0.3.12", "roles": ["db_replica"]}]
    inventory = load(plaintext(base))
    files = files_of(inventory, "api1")
    assert "/opt/dify/redis-proxy.cfg" not in files
    assert "redis_proxy" not in yaml.safe_load(files["/opt/dify/compose.yml"])["services"]
    assert env_of(files["/opt/dify/.env"])["REDIS_HOST"] == "10.0.3.11"


def test_broker_urls_quote_the_password() -> None:
    password = "p@ss:w/rd%40#x"
    url = redis_url("10.0.3.11", "sentinel", password, 26379, 1)
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("sentinel", "10.0.3.11",
                                                                      26379, "/1")
    assert unquote(parts.password) == password


def test_a_password_with_url_characters_keeps_the_brokers_address(load, base) -> None:
    inventory = load(plaintext(base))
    inventory.secrets["REDIS_PASSWORD"] = "a@b:c/d%e"
    env = env_of(files_of(inventory, "worker1")["/opt/dify/.env"])
    urls = env["CELERY_BROKER_URL"].strip("'").split(";")
    assert [urlsplit(u).hostname for u in urls] == ["10.0.3.11", "10.0.3.12", "10.0.3.13"]
    assert {unquote(urlsplit(u).password) for u in urls} == {"a@b:c/d%e"}


def test_resp_hex_frames_any_bytes() -> None:
    assert bytes.fromhex(resp_hex("AUTH", "x y\r\n")) == b"*2\r\n$4\r\nAUTH\r\n$5\r\nx y\r\n\r\n"
