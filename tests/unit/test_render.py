"""Facts about rendered files, read back by parsing them (not golden-file comparisons)."""

from __future__ import annotations

import re

import pytest
import yaml
from dotenv import dotenv_values

from tasks.core.errors import DifyopsError
from tasks.core.inventory import Inventory
from tasks.core.plan import WriteFile
from tasks.core.render import Renderer, env_quote
from tasks.core.tiers import build
from tasks.tiers import TIERS


def files(inventory: Inventory) -> dict[tuple[str, str], str]:
    """(host, path) -> content for every file every tier writes."""
    return {(plan.host.name, step.path): step.content
            for tier in build(TIERS, inventory) for plan in tier.hosts for step in plan.files()}


def env_of(inventory: Inventory, host: str) -> dict[str, str]:
    import io

    return dotenv_values(stream=io.StringIO(files(inventory)[(host, "/opt/dify/.env")]))


def test_env_has_every_key_the_version_requires(load, base) -> None:
    inventory = load(base)
    env = env_of(inventory, "api1")
    missing = [key for key in inventory.profile.env_required if not env.get(key)]
    assert missing == []
    assert env["MIGRATION_ENABLED"] == "false"
    assert env["DB_HOST"] == "10.0.3.11"


def test_only_a_gunicorn_with_a_control_socket_is_told_to_leave_it_off(load, base) -> None:
    """1.5.1's profile names no gunicorn (no source of it is kept): its api gets no flag an
    older gunicorn would refuse."""
    assert env_of(load(base), "api1")["GUNICORN_CMD_ARGS"] == "--no-control-socket"
    base["dify"] = {"version": "1.5.1"}
    assert "GUNICORN_CMD_ARGS" not in env_of(load(base), "api1")


def test_env_pairs_match_across_the_daemon_and_sandbox(load, base) -> None:
    inventory = load(base)
    env = env_of(inventory, "api2")
    compose = yaml.safe_load(files(inventory)[("api1", "/opt/dify/compose.yml")])
    daemon = compose["services"]["plugin_daemon"]["environment"]
    assert daemon["SERVER_KEY"] == "${PLUGIN_DAEMON_KEY:?}"
    assert env["PLUGIN_DAEMON_KEY"] == inventory.secrets["PLUGIN_DAEMON_KEY"]
    assert env["CODE_EXECUTION_API_KEY"] == env["SANDBOX_API_KEY"]
    assert env["PLUGIN_DAEMON_URL"] == "http://10.0.2.21:5002"


def test_sentinel_broker_url_lists_every_sentinel(load, base) -> None:
    base["tls"] = {"internal": False}  # with it, Celery reaches Redis through redis_proxy
    env = env_of(load(base), "worker1")
    assert env["REDIS_USE_SENTINEL"] == "true"
    assert env["REDIS_SENTINELS"] == "10.0.3.11:26379,10.0.3.12:26379,10.0.3.13:26379"
    assert env["CELERY_BROKER_URL"].count("sentinel://") == 3
    assert env["CELERY_BROKER_URL"].split(";")[1].endswith("@10.0.3.12:26379/1")


def test_cluster_cache_keeps_the_broker_on_a_standalone_redis(load, base) -> None:
    base["cache"]["mode"] = "cluster"
    base["hosts"][9]["roles"] = ["monitor", "broker"]
    env = env_of(load(base), "api1")
    assert env["REDIS_USE_CLUSTERS"] == "true"
    # tls.internal: the broker through redis_proxy, which forwards to the broker host over TLS.
    assert env["CELERY_BROKER_URL"].endswith("@redis_proxy:6379/1")
    proxy = files(load(base))[("api1", "/opt/dify/redis-proxy.cfg")]
    assert re.findall(r"^\s+server (\S+) (\S+) .* ssl verify required", proxy, re.M) == [
        ("monitor1", "10.0.4.10:6379")]
    base["tls"] = {"internal": False}
    env = env_of(load(base), "api1")
    assert env["CELERY_BROKER_URL"].endswith("@10.0.4.10:6379/1")


def test_worker_groups_cover_every_queue(load, base) -> None:
    base["app"] = {"worker_groups": [{"name": "docs", "queues": ["dataset", "priority_dataset"]},
                                     {"name": "rest", "queues": "all"}]}
    inventory = load(base)
    compose = yaml.safe_load(files(inventory)[("worker1", "/opt/dify/compose.yml")])
    services = compose["services"]
    queues = {q for name, s in services.items() if name.startswith("worker_")
              and s["environment"]["MODE"] == "worker"
              for q in s["environment"]["CELERY_QUEUES"].split(",")}
    assert queues == set(inventory.profile.queues)
    assert services["worker_beat"]["environment"]["MODE"] == "beat"


def test_sandbox_reaches_out_only_through_the_proxy(load, base) -> None:
    compose = yaml.safe_load(files(load(base))[("api1", "/opt/dify/compose.yml")])
    assert compose["services"]["sandbox"]["networks"] == ["ssrf_proxy_network"]
    assert compose["networks"]["ssrf_proxy_network"]["internal"] is True
    assert "ssrf_proxy_network" in compose["services"]["ssrf_proxy"]["networks"]


def test_only_the_services_of_a_hosts_roles(load, base) -> None:
    rendered = files(load(base))
    web = yaml.safe_load(rendered[("web1", "/opt/dify/compose.yml")])
    assert set(web["services"]) == {"web"}
    assert ("web1", "/opt/dify/squid.conf") not in rendered
    assert web["services"]["web"]["environment"]["CONSOLE_API_URL"] == "http://dify.test"


def location_upstreams(site: str) -> dict[str, str]:
    """location prefix -> upstream it proxies to."""
    return dict(re.findall(r"location (\S+) \{\s*proxy_pass http://(\w+);", site))


def test_every_route_of_the_version_goes_to_its_upstream(load, base) -> None:
    inventory = load(base)
    site = files(inventory)[("lb1", "/etc/nginx/sites-available/dify.conf")]
    routes = location_upstreams(site)
    for prefix in ("/console/api", "/api", "/v1", "/files", "/mcp", "/triggers"):
        assert routes[prefix] == "dify_api"
    assert routes["/e/"] == "dify_plugin_daemon"
    assert routes["/"] == routes["/explore"] == routes["/_next/static/"] == "dify_web"
    assert "client_max_body_size 100m;" in site
    upstream = re.search(r"upstream dify_api \{(.*?)\}", site, re.S).group(1)
    assert re.findall(r"server (\S+) ", upstream) == ["10.0.2.21:5001", "10.0.2.22:5001"]


def test_postgres_settings_follow_the_host_size(load, base) -> None:
    base["hosts"][5]["size"] = {"memory_gb": 32}
    conf = files(load(base))[("db1", "/etc/postgresql/15/main/conf.d/difyops.conf")]
    settings = dict(re.findall(r"^(\w+) = (.+)$", conf, re.M))
    assert settings["shared_buffers"] == "8192MB"
    assert settings["work_mem"] == "64MB"
    assert settings["maintenance_work_mem"] == "512MB"
    assert settings["max_connections"] == "400"
    assert settings["listen_addresses"] == "'localhost,10.0.3.11'"


def test_pg_hba_admits_app_hosts_and_replicas_only(load, base) -> None:
    hba = files(load(base))[("db1", "/etc/postgresql/15/main/pg_hba.conf")]
    rules = [line.split() for line in hba.splitlines() if line.startswith("host")]
    app = {r[3] for r in rules if r[1:3] == ["dify", "dify"]}
    assert app == {"10.0.2.21/32", "10.0.2.22/32", "10.0.2.31/32"}
    # the plugin daemon (api1), as its own role, to its own database only
    assert [r[1:4] for r in rules if "dify_plugin" in r[1:3]] == [
        ["dify_plugin", "dify_plugin", "10.0.2.21/32"]]
    assert "10.0.4.10/32" not in hba  # the monitor reads statistics on the db hosts themselves
    assert {r[3] for r in rules if r[1] == "replication"} == {"10.0.3.12/32", "10.0.3.13/32"}
    assert "10.0.1.10/32" not in hba  # the load balancer never reaches the database
    # other hosts over TLS only (tls.internal, the default); loopback as before
    assert {r[0] for r in rules if not r[3].startswith(("127.", "::1"))} == {"hostssl"}
    assert {r[0] for r in rules if r[3].startswith(("127.", "::1"))} == {"host"}


def test_secret_files_are_private(load, base) -> None:
    steps = [s for t in build(TIERS, load(base)) for p in t.hosts for s in p.steps
             if isinstance(s, WriteFile) and s.secret]
    assert {s.path for s in steps} >= {"/opt/dify/.env", "/etc/difyops/redis/redis.conf"}
    assert all(s.mode & 0o007 == 0 for s in steps)  # at most the service group reads them


def test_undefined_names_fail_loudly(load, base, tmp_path, monkeypatch) -> None:
    from tasks.core import render

    (tmp_path / "bad.j2").write_text("{{ settings.nope }}")
    monkeypatch.setattr(render, "ROOT", tmp_path)
    with pytest.raises(DifyopsError, match=r"cannot render bad\.j2"):
        Renderer(load(base)).render("bad.j2")


@pytest.mark.parametrize(("value", "quoted"), [("abc-123_", "abc-123_"),
                                               ("a b", "'a b'"), ("x$y", "'x$y'")])
def test_env_quote(value: str, quoted: str) -> None:
    assert env_quote(value) == quoted
