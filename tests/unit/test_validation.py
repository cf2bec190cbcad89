"""Every refusal of a bad inventory or secrets file names the file, the key path and the fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tasks.core import secrets
from tasks.core.errors import InputError
from tasks.core.inventory import Inventory
from tests.unit.conftest import good_secrets

Loader = Callable[..., Inventory]


def refusal(load: Loader, data: dict[str, Any], secret_values: dict[str, str] | None = None,
            mode: int = 0o600) -> str:
    """The message of the InputError the loader raises (the test fails if none is raised)."""
    with pytest.raises(InputError) as caught:
        load(data, secret_values, mode)
    return str(caught.value)


def test_the_base_inventory_is_valid(load: Loader, base: dict) -> None:
    inventory = load(base)
    assert [h.name for h in inventory.with_role("cache")] == ["db1", "db2", "db3"]
    assert inventory.profile.version == "1.16.1"


def test_unknown_role(load: Loader, base: dict) -> None:
    base["hosts"][1]["roles"] = ["web", "frontend"]
    message = refusal(load, base)
    assert "inventory.yml: hosts[1].roles[1]: unknown role 'frontend'" in message
    assert "fix: use one of: lb, web" in message


def test_unknown_setting_key_suggests_the_nearest(load: Loader, base: dict) -> None:
    base["db"]["max_conections"] = 500
    message = refusal(load, base)
    assert "db.max_conections: unknown key 'max_conections' (did you mean 'max_connections'?)" \
        in message


def test_unknown_host_key(load: Loader, base: dict) -> None:
    base["hosts"][0]["rolez"] = ["lb"]
    assert "hosts[0].rolez: unknown key 'rolez' (did you mean 'roles'?)" in refusal(load, base)


def test_wrong_type(load: Loader, base: dict) -> None:
    base["upload_limit_mb"] = "100M"
    message = refusal(load, base)
    assert "upload_limit_mb: must be a number, not a string ('100M')" in message


def test_required_role_with_no_host(load: Loader, base: dict) -> None:
    base["hosts"] = [h for h in base["hosts"] if h["name"] != "lb1"]
    message = refusal(load, base)
    assert "hosts[*].roles: no host has the required role 'lb'" in message
    assert "fix: add 'lb' to the roles of a host" in message


def test_duplicate_host_names(load: Loader, base: dict) -> None:
    base["hosts"][2]["name"] = "web1"
    assert "hosts[2].name: duplicate host name 'web1' (also hosts[1])" in refusal(load, base)


def test_duplicate_addresses(load: Loader, base: dict) -> None:
    base["hosts"][3]["address"] = "10.0.2.21"
    assert "hosts[3].address: duplicate address 10.0.2.21 (also hosts[2])" \
        in refusal(load, base)


def test_one_address_with_two_ssh_ports_is_one_machine(load: Loader, base: dict) -> None:
    base["hosts"][3]["address"] = "10.0.2.21"
    base["hosts"][3]["ssh"] = {"port": 2222}
    assert "hosts[3].address: duplicate address 10.0.2.21 (also hosts[2])" \
        in refusal(load, base)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("name", "../../x", "name: '../../x' is not a slug"),
    ("domain", "dify.test; return 200", "domain: 'dify.test; return 200' is not a DNS name"),
    ("upload_limit_mb", 0, "upload_limit_mb: 0 is not a positive integer"),
])
def test_free_strings_that_reach_paths_and_nginx_are_refused(load: Loader, base: dict, key: str,
                                                             value: object,
                                                             message: str) -> None:
    base[key] = value
    assert message in refusal(load, base)


def test_frame_options_is_one_of_its_values(load: Loader, base: dict) -> None:
    base["lb"] = {"frame_options": "DENY; add_header X 1"}
    assert "lb.frame_options: 'DENY; add_header X 1' is not one of 'SAMEORIGIN', 'DENY', \"\"" \
        in refusal(load, base)


def test_the_sign_in_limit_and_trusted_proxies_are_checked(load: Loader, base: dict) -> None:
    base["lb"] = {"sign_in_rate_per_minute": -1}
    assert "lb.sign_in_rate_per_minute: -1 is not a whole number of 0 or more" \
        in refusal(load, base)
    base["lb"] = {"trusted_proxies": ["10.0.9.0/24", "10.0.9.1; allow all"]}
    message = refusal(load, base)
    assert "lb.trusted_proxies[1]: '10.0.9.1; allow all' is not an address or a CIDR block" \
        in message
    assert "lb.trusted_proxies[0]" not in message


def test_ports_out_of_range_or_colliding_on_a_host(load: Loader, base: dict) -> None:
    base["db"] = {"max_connections": 400, "port": 70000}
    assert "db.port: 70000 is not a port (1-65535)" in refusal(load, base)
    base["db"] = {"max_connections": 400}
    base["cache"] = {"mode": "sentinel", "sentinel_port": 6379}
    message = refusal(load, base)
    assert "hosts[5]: redis and redis sentinel both listen on port 6379 on db1" in message
    base["cache"] = {"mode": "sentinel"}
    base["hosts"][9]["roles"] = ["monitor", "web"]
    base["monitor"] = {"grafana_port": 3000}
    assert "web and grafana both listen on port 3000 on monitor1" in refusal(load, base)


@pytest.mark.parametrize("address", ["10.0.0.300", "not a host", "", "-bad-.example"])
def test_invalid_address(load: Loader, base: dict, address: str) -> None:
    base["hosts"][0]["address"] = address
    assert f"hosts[0].address: invalid address {address!r}" in refusal(load, base)


@pytest.mark.parametrize("port", [0, 70000])
def test_invalid_port(load: Loader, base: dict, port: int) -> None:
    base["hosts"][0]["ssh"] = {"port": port}
    assert f"hosts[0].ssh.port: invalid port {port}" in refusal(load, base)


def test_missing_secret(load: Loader, base: dict) -> None:
    values = {k: v for k, v in good_secrets().items() if k != "SECRET_KEY"}
    message = refusal(load, base, values)
    assert "secrets.env: SECRET_KEY: missing" in message
    assert "run `inv config.secrets` to generate it" in message


PUBLISHED = [
    ("SECRET_KEY", "sk-9f73s3ljTXVcMT3Blb3ljTqtsKiGHXVcMT3BlbkFJLK7U"),
    ("DB_PASSWORD", "difyai123456"),
    ("DB_PASSWORD", "your_secure_password"),
    ("REDIS_PASSWORD", "your_redis_password"),
    ("DB_REPLICATION_PASSWORD", "replication_password"),
    ("WEAVIATE_API_KEY", "your_weaviate_key"),
    ("GRAFANA_ADMIN_PASSWORD", "your_admin_password"),
    ("PLUGIN_DAEMON_KEY", "lYkiYYT6owG+71oLerGzA7GXCgOT++6ovaezWAjpCjf+Sjc3ZtU+qUEi"),
]


@pytest.mark.parametrize(("name", "value"), PUBLISHED)
def test_published_default_secret(load: Loader, base: dict, name: str, value: str) -> None:
    values = good_secrets() | {name: value}
    message = refusal(load, base, values)
    assert f"secrets.env: {name}: is a published default or placeholder" in message
    assert value not in message  # the refusal never echoes a secret


def test_empty_secret(load: Loader, base: dict) -> None:
    message = refusal(load, base, good_secrets() | {"REDIS_PASSWORD": ""})
    assert "secrets.env: REDIS_PASSWORD: empty" in message


def test_secrets_file_readable_by_others(load: Loader, base: dict) -> None:
    message = refusal(load, base, mode=0o644)
    assert "secrets.env: (file): readable by others (mode 0644)" in message


def test_queue_not_consumed(load: Loader, base: dict) -> None:
    base["app"] = {"worker_groups": [{"name": "docs", "queues": ["dataset", "mail"]}]}
    message = refusal(load, base)
    assert "app.worker_groups: no worker consumes the queue(s) api_token, dataset_summary, " \
        "priority_dataset," in message
    assert "workflow_based_app_execution of Dify 1.16.1" in message


def test_queue_of_a_group_no_worker_runs_is_not_consumed(load: Loader, base: dict) -> None:
    base["app"] = {"worker_groups": [{"name": "a", "queues": "all"},
                                     {"name": "b", "queues": ["mail"]}]}
    base["hosts"][4]["worker_groups"] = ["b"]
    assert "app.worker_groups: no worker consumes the queue(s) api_token, dataset," \
        in refusal(load, base)


def test_unknown_queue(load: Loader, base: dict) -> None:
    base["app"] = {"worker_groups": [{"name": "all", "queues": "all"},
                                     {"name": "old", "queues": ["mail", "generation"]}]}
    message = refusal(load, base)
    assert "app.worker_groups[1].queues[1]: 'generation' is not a queue of Dify 1.16.1" in message


def test_no_beat(load: Loader, base: dict) -> None:
    base["hosts"][4]["roles"] = ["worker"]
    assert "no host has the required role 'beat'" in refusal(load, base)


def test_two_beats(load: Loader, base: dict) -> None:
    base["hosts"][3]["roles"] = ["api", "beat"]
    message = refusal(load, base)
    assert "hosts[4].roles: 2 hosts have role 'beat' (api2, worker1)" in message


def test_two_plugin_daemons(load: Loader, base: dict) -> None:
    base["hosts"][3]["roles"] = ["api", "plugin_daemon"]
    assert "hosts[3].roles: 2 hosts have role 'plugin_daemon' (api1, api2)" in refusal(load, base)


def test_broker_on_redis_cluster(load: Loader, base: dict) -> None:
    base["cache"]["mode"] = "cluster"
    message = refusal(load, base)
    assert "cache.mode: the Celery broker and the plugin daemon do not support Redis Cluster" \
        in message
    assert "add a host with role 'broker'" in message


def test_cluster_with_a_broker_host_is_accepted(load: Loader, base: dict) -> None:
    base["cache"]["mode"] = "cluster"
    base["hosts"][9]["roles"] = ["monitor", "broker"]
    assert load(base).with_role("broker")[0].name == "monitor1"


def test_two_weaviate_nodes(load: Loader, base: dict) -> None:
    base["hosts"][9]["roles"] = ["monitor", "vector"]
    message = refusal(load, base)
    assert "hosts[*].roles: 2 hosts have role 'vector': a 2-node Weaviate cluster has no RAFT" \
        in message


def test_old_weaviate(load: Loader, base: dict) -> None:
    base["vector"] = {"weaviate_version": "1.19.0"}
    message = refusal(load, base)
    assert "vector.weaviate_version: Weaviate 1.19.0 is too old for Dify 1.16.1" in message


def test_seed_version_accepts_its_weaviate(load: Loader, base: dict) -> None:
    base["dify"] = {"version": "1.5.1"}
    base["vector"] = {"weaviate_version": "1.19.0"}
    assert load(base).profile.queues == ("dataset", "mail", "ops_trace", "app_deletion")


def test_several_app_hosts_with_local_storage(load: Loader, base: dict) -> None:
    base["storage"]["type"] = "local"
    message = refusal(load, base)
    assert "storage.type: 3 api/worker hosts with host-local storage" in message


def test_max_connections_below_the_pools(load: Loader, base: dict) -> None:
    base["db"]["max_connections"] = 100
    message = refusal(load, base)
    # api_websocket (Dify 1.16.1, collaboration on): one more gunicorn worker per api host.
    assert ("db.max_connections: 100 is below what the app tier can open: api 2x1x40 80 + "
            "api_websocket 2x1x40 80 + workers 1x40 40 + beat 10 + plugin daemon 20 + "
            "reserved 10 = 240") in message


def test_unknown_dify_version(load: Loader, base: dict) -> None:
    base["dify"] = {"version": "0.6.0"}
    assert "dify.version: no profile for Dify 0.6.0" in refusal(load, base)


def test_all_problems_are_reported_at_once(load: Loader, base: dict) -> None:
    base["hosts"][0]["roles"] = ["lbb"]
    base["db"]["port"] = "5432"
    message = refusal(load, base)
    assert message.startswith("2 problems found before touching any host:")


def test_missing_inventory_file(tmp_path) -> None:
    from tasks.core.inventory import load_inventory

    with pytest.raises(InputError, match="the inventory file does not exist"):
        load_inventory(tmp_path / "nope.yml")


def test_yaml_syntax_error_names_the_line(write_inventory, tmp_path) -> None:
    from tasks.core.inventory import load_inventory

    path = tmp_path / "broken.yml"
    path.write_text("name: x\nhosts:\n  - name: a\n   roles: [lb]\n")
    with pytest.raises(InputError, match=r"broken.yml: line \d+: not valid YAML"):
        load_inventory(path)


def test_secret_weakness_never_contains_the_value() -> None:
    spec = secrets.SPECS[0]
    assert secrets.weakness(spec, "short") == "shorter than 16 characters"


def test_sentinel_is_refused_where_dify_runs_from_source(load: Loader, base: dict) -> None:
    base["hosts"].append({"name": "vm", "address": "10.0.5.1", "roles": ["dev_backend"]})
    message = refusal(load, base)
    assert "cache.mode: Dify run from source on a dev_backend host builds its pub/sub" in message
    assert "use cache.mode standalone in a home-lab inventory" in message


def test_a_tls_cluster_is_refused_where_dify_runs_from_source(load: Loader, base: dict) -> None:
    """tls.internal makes the broker Redis TLS only; Dify's cluster client has no TLS setting,
    and a home lab has no redis_proxy to carry it."""
    base["cache"]["mode"] = "cluster"
    base["hosts"][9]["roles"] = ["monitor", "broker"]
    base["hosts"].append({"name": "vm", "address": "10.0.5.1", "roles": ["dev_backend"]})
    message = refusal(load, base)
    assert "cache.mode: tls.internal makes the broker Redis serve TLS only" in message
    assert "use cache.mode standalone in a home-lab inventory" in message
    base["tls"] = {"internal": False}
    assert load(base).settings.cache.mode == "cluster"  # plaintext: Dify's own clients do


def test_a_home_lab_checkout_of_another_release_is_refused(load: Loader, base: dict) -> None:
    base["cache"] = {"mode": "standalone"}
    base["hosts"] = [h for h in base["hosts"] if h["name"] not in ("db2", "db3")]
    base["hosts"].append({"name": "vm", "address": "10.0.5.1", "roles": ["dev_backend"]})
    base["dev"] = {"dify_source": "/srv/dify", "dify_ref": "1.13.3"}
    message = refusal(load, base)
    assert "dev.dify_ref: checks out Dify 1.13.3, but dify.version is 1.16.1" in message
    base["dify"] = {"version": "1.13.3"}
    load(base)
