"""cache tier and cache.status: rendered facts per mode, the redis.conf merge, status rules."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.core.inventory import Inventory
from tasks.core.plan import RunCommand, WriteFile
from tasks.tiers import cache_ops
from tasks.tiers.cache import HELPER, OWNED_CONF, SENTINEL_SEED, TIER, USERS, memory, quorum
from tasks.tiers.cache_ops import RedisNode, info, pairs, problems

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def plans(inventory: Inventory) -> dict[str, list]:
    return {plan.host.name: plan.steps for plan in TIER.plan(inventory).hosts}


def files(inventory: Inventory) -> dict[tuple[str, str], str]:
    return {(name, step.path): step.content for name, steps in plans(inventory).items()
            for step in steps if isinstance(step, WriteFile)}


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found.setdefault(key, []).append(value)
    return found


def test_sentinel_mode_renders_no_static_replicaof(load, base) -> None:
    rendered = files(load(base))
    for name in ("db1", "db2", "db3"):
        conf = directives(rendered[(name, OWNED_CONF)])
        assert "replicaof" not in conf and "slaveof" not in conf
        assert conf["protected-mode"] == ["yes"] and conf["appendonly"] == ["yes"]
        # Users from the users file; replicas log in as difyops (config/redis/users.acl.j2).
        assert "requirepass" not in conf and conf["aclfile"] == ["/etc/difyops/redis/users.acl"]
        assert conf["masteruser"] == ["difyops"]
    assert directives(rendered[("db2", OWNED_CONF)])["bind"] == ["127.0.0.1 10.0.3.12"]
    # Redis's own files are never overwritten by a plain file write
    assert not {path for _, path in rendered} & {"/etc/redis/redis.conf",
                                                 "/etc/redis/sentinel.conf"}


def users_of(text: str) -> dict[str, list[str]]:
    """user name -> its rules, from a users file."""
    return {line.split()[1]: line.split()[2:] for line in text.splitlines()
            if line.startswith("user ")}


def test_one_redis_user_per_client_and_dangerous_commands_denied(load, base) -> None:
    inventory = load(base)
    secrets = inventory.secrets

    def password(name: str) -> str:
        return "#" + hashlib.sha256(secrets[name].encode()).hexdigest()

    for name in ("db1", "db3"):
        step = next(s for s in plans(inventory)[name] if isinstance(s, WriteFile)
                    and s.path == USERS)
        assert (step.mode, step.owner, step.secret) == (0o600, "redis", True)
        users = users_of(step.content)
        # Redis reads nothing else there (a comment line stops it from starting).
        assert all(line.startswith("user ") for line in step.content.splitlines())
        assert not [value for value in secrets.values() if value in step.content]
        clients = {"default": "REDIS_PASSWORD", "plugin_daemon": "REDIS_PLUGIN_DAEMON_PASSWORD",
                   "agent_backend": "REDIS_AGENT_PASSWORD"}
        for user, secret in clients.items():
            assert users[user] == ["on", password(secret), "~*", "&*", "+@all", "-@dangerous"]
        assert users["difyops"] == ["on", password("REDIS_ADMIN_PASSWORD"), "~*", "&*", "+@all"]
        monitor = users["monitor"]
        assert monitor[:5] == ["on", password("REDIS_MONITOR_PASSWORD"), "resetkeys",
                               "resetchannels", "-@all"]
        assert "+info" in monitor and not [rule for rule in monitor if rule.startswith("~")]
    base["dify"] = {"version": "1.15.0"}  # no agent backend: no user for it
    older = next(s for s in plans(load(base))["db1"] if isinstance(s, WriteFile)
                 and s.path == USERS)
    assert "agent_backend" not in users_of(older.content)
    # The file changes: Redis loads it without a restart.
    load_step = next(s for s in plans(inventory)["db1"] if isinstance(s, RunCommand)
                     and s.command == f"{HELPER} acl-load")
    assert load_step.on_change == (USERS,)


def test_sentinel_seed_and_quorum(load, base) -> None:
    inventory = load(base)
    assert quorum(inventory) == 2
    seed = directives(files(inventory)[("db3", SENTINEL_SEED)])
    monitors = [v for v in seed["sentinel"] if v.startswith("monitor ")]
    assert monitors == ["monitor dify-master @MASTER@ 6379 2"]
    assert "down-after-milliseconds dify-master 5000" in seed["sentinel"]
    # tls.internal: TLS only, to Redis and the other Sentinels too (tls-replication)
    assert (seed["port"], seed["tls-port"], seed["tls-replication"]) == (["0"], ["26379"],
                                                                         ["yes"])
    assert seed["tls-ca-cert-file"] == ["/etc/difyops/redis/tls/ca.crt"]
    steps = plans(inventory)["db3"]
    seeding = next(s for s in steps if isinstance(s, RunCommand) and s.name.startswith("seed"))
    assert seeding.unless == "grep -q '^sentinel monitor dify-master ' /etc/redis/sentinel.conf"
    converge = next(s for s in steps if isinstance(s, RunCommand) and "quorum" in s.name)
    assert converge.command == f"{HELPER} sentinel-set"
    assert converge.unless == f"{HELPER} sentinel-ok"


@pytest.mark.parametrize(("hosts", "expected"), [(3, 2), (4, 3), (5, 3)])
def test_quorum_is_a_majority(load, base, hosts: int, expected: int) -> None:
    for index in range(3, 3 + hosts - 3):
        base["hosts"][index]["roles"] = [*base["hosts"][index]["roles"], "cache"]
    assert quorum(load(base)) == expected


@pytest.mark.parametrize(("megabytes", "written"), [(512, "512mb"), (1024, "1gb"),
                                                    (1536, "1536mb"), (4096, "4gb")])
def test_maxmemory_written_as_config_rewrite_writes_it(megabytes: int, written: str) -> None:
    assert memory(megabytes) == written


def test_maxmemory_setting(load, base) -> None:
    base["cache"]["maxmemory_mb"] = 2048
    base["cache"]["maxmemory_policy"] = "allkeys-lru"
    conf = directives(files(load(base))[("db1", OWNED_CONF)])
    assert conf["maxmemory"] == ["2gb"] and conf["maxmemory-policy"] == ["allkeys-lru"]


def cluster_inventory(base: dict) -> dict:
    base["cache"]["mode"] = "cluster"
    base["hosts"][9]["roles"] = ["monitor", "broker"]
    return base


def test_cluster_mode_nodes_and_creation(load, base) -> None:
    inventory = load(cluster_inventory(base))
    rendered = files(inventory)
    node = directives(rendered[("db2", "/etc/redis/redis-6380.conf")])
    assert node["port"] == ["6380"] and node["cluster-enabled"] == ["yes"]
    # Dify's cluster client has no TLS settings: the nodes stay plaintext, without certificates
    assert "tls-port" not in node
    assert not [path for host, path in rendered if host == "db2" and "/tls/" in path]
    assert node["dir"] == ["/var/lib/redis/6380"]
    steps = plans(inventory)
    creators = [name for name, host_steps in steps.items()
                for s in host_steps if isinstance(s, RunCommand) and s.name.startswith("create")]
    assert creators == ["db1"]
    script = rendered[("db1", HELPER)]
    assert ('CLUSTER_NODES="10.0.3.11:6379 10.0.3.12:6379 10.0.3.13:6379 10.0.3.11:6380 '
            '10.0.3.12:6380 10.0.3.13:6380"') in script
    # the broker is a standalone Redis, not a cluster node
    broker = directives(rendered[("monitor1", OWNED_CONF)])
    assert "cluster-enabled" not in broker and broker["port"] == ["0"]
    assert broker["tls-port"] == ["6379"]  # the broker is reached through redis_proxy


def test_broker_and_cluster_node_on_one_host_is_refused(load, base) -> None:
    from tasks.core.errors import InputError

    cluster_inventory(base)
    base["hosts"][5]["roles"] = ["db_primary", "cache", "broker"]
    with pytest.raises(InputError, match=r"hosts\[5\]\.roles: db1 is both a cluster node and "
                                         r"the broker"):
        load(base)


def test_renewed_certificates_are_loaded_and_every_probe_speaks_tls(load, base) -> None:
    from tasks.core.plan import WaitFor

    steps = plans(load(base))["db1"]
    reload = next(s for s in steps if isinstance(s, RunCommand)
                  and s.command == f"{HELPER} tls-reload")
    assert {"/etc/difyops/redis/tls/server.crt", "/etc/difyops/redis/tls/server.key"} <= \
        set(reload.on_change)
    gates = [s.gate.command for s in steps if isinstance(s, WaitFor) and "ping" in
             getattr(s.gate, "command", "")]
    assert len(gates) == 2  # Redis as its user difyops, and Sentinel with its own password
    assert "redis-cli --user difyops --tls --cacert /etc/difyops/redis/tls/ca.crt -p 6379 " \
        in gates[0]
    assert 'REDISCLI_AUTH="$SENTINEL_AUTH" timeout 5 redis-cli --tls --cacert ' \
        '/etc/difyops/redis/tls/ca.crt -p 26379 ' in gates[1]
    plaintext = plans(load({**base, "tls": {"internal": False}}))["db1"]
    assert not [s for s in plaintext if isinstance(s, RunCommand) and "tls-reload" in s.command]
    assert not [s for s in plaintext if isinstance(s, WriteFile) and "/tls/" in s.path]


# --- the helper scripts, run for real on local copies of the files -----------------------------

@needs_bash
def test_helper_scripts_are_valid_bash(load, base) -> None:
    for inventory in (load(base), load(cluster_inventory(base))):
        script = files(inventory)[("db1", HELPER)]
        checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True,
                                 check=False)
        assert checked.returncode == 0, checked.stderr


@pytest.fixture
def merge(load, base, tmp_path: Path):
    """The rendered helper pointed at files in tmp_path, with systemctl and chown stubbed."""
    inventory = load(base)
    rendered = files(inventory)
    owned = tmp_path / "owned.conf"
    owned.write_text(rendered[("db2", OWNED_CONF)])
    auth = tmp_path / "auth.env"
    auth.write_text("REDISCLI_AUTH=x\n")
    live = tmp_path / "redis.conf"
    script = (rendered[("db2", HELPER)]
              .replace(f"OWNED={OWNED_CONF}", f"OWNED={owned}")
              .replace("LIVE=/etc/redis/redis.conf", f"LIVE={live}")
              .replace(". /etc/difyops/redis/auth.env", f". {auth}")
              .replace("mktemp /etc/redis/", f"mktemp {tmp_path}/")
              .replace("chown redis:redis", "true")
              .replace("systemctl restart redis-server", f"touch {tmp_path}/restarted")
              .replace(f"SENTINEL_SEED={SENTINEL_SEED}", f"SENTINEL_SEED={tmp_path}/seed.conf")
              .replace("SENTINEL_LIVE=/etc/redis/sentinel.conf",
                       f"SENTINEL_LIVE={tmp_path}/sentinel.conf")
              .replace("systemctl stop redis-sentinel", f"touch {tmp_path}/sentinel-stopped")
              .replace("systemctl start redis-sentinel", f"touch {tmp_path}/sentinel-started"))
    (tmp_path / "seed.conf").write_text(rendered[("db2", SENTINEL_SEED)])
    helper = tmp_path / "helper"
    helper.write_text(script)

    def run(command: str) -> int:
        return subprocess.run(["bash", str(helper), command], capture_output=True,
                              check=False).returncode

    return owned, live, run, tmp_path


def rewritten(owned: str) -> str:
    """What CONFIG REWRITE makes of difyops's file on a replica (as Redis 7.0 writes it)."""
    quoted = []
    for line in owned.splitlines():
        key, _, value = line.partition(" ")
        if key in ("masterauth", "dir", "logfile"):
            line = f'{key} "{value}"'
        quoted.append(line)
    return ("\n".join(quoted) + "\n\n# Generated by CONFIG REWRITE\nsupervised systemd\n"
            "replicaof 10.0.3.11 6379\nuser default on #0123abcd ~* &* +@all\n")


@needs_bash
def test_config_rewrite_by_sentinel_is_not_a_change(merge) -> None:
    owned, live, run, tmp = merge
    live.write_text(rewritten(owned.read_text()))
    assert run("config-ok") == 0
    assert not (tmp / "restarted").exists()


@needs_bash
def test_a_changed_setting_is_merged_keeping_replicaof_only(merge) -> None:
    owned, live, run, tmp = merge
    live.write_text(rewritten(owned.read_text()))
    owned.write_text(owned.read_text().replace("tcp-keepalive 60", "tcp-keepalive 120"))
    assert run("config-ok") == 1
    assert run("config-merge") == 0
    text = live.read_text()
    assert text == owned.read_text() + "\n# Generated by CONFIG REWRITE\nreplicaof 10.0.3.11 6379\n"
    assert "user default" not in text  # Redis refuses user lines next to an aclfile
    assert (tmp / "restarted").exists()
    assert run("config-ok") == 0


@needs_bash
def test_the_packaged_redis_conf_is_replaced(merge) -> None:
    owned, live, run, _ = merge
    live.write_text("bind 127.0.0.1 -::1\nport 6379\n# lots of comments\n")
    assert run("config-ok") == 1
    assert run("config-merge") == 0
    assert live.read_text() == owned.read_text()


@needs_bash
def test_an_installation_turning_tls_on_gets_sentinels_ports_tls_and_login_lines(
        merge, load, base) -> None:
    """sentinel.conf is Sentinel's, written once; its port, tls-* and login lines are difyops's:
    a Sentinel seeded in plaintext, logging in with Dify's password, gets the TLS lines and the
    user difyops, the rest of what it wrote is kept, and the way CONFIG REWRITE quotes them is
    not a change."""
    _, _, run, tmp = merge
    admin = load(base).secrets["REDIS_ADMIN_PASSWORD"]
    live = tmp / "sentinel.conf"
    state = ("sentinel monitor dify-master 10.0.3.12 6379 2\n"
             "sentinel known-replica dify-master 10.0.3.11 6379\nsentinel current-epoch 3\n")
    live.write_text(f"port 26379\ndir \"/var/lib/redis\"\n{state}"
                    "sentinel auth-pass dify-master dify-password\n")
    assert run("sentinel-owned-ok") == 1
    assert run("sentinel-owned") == 0
    assert (tmp / "sentinel-stopped").exists() and (tmp / "sentinel-started").exists()
    lines = live.read_text().splitlines()
    assert [line for line in lines if line.startswith(("port ", "tls-"))] == [
        "port 0", "tls-port 26379", "tls-cert-file /etc/difyops/redis/tls/server.crt",
        "tls-key-file /etc/difyops/redis/tls/server.key",
        "tls-ca-cert-file /etc/difyops/redis/tls/ca.crt", "tls-auth-clients no",
        "tls-replication yes"]
    # The login lines after the monitor line of their master (Sentinel refuses them before it).
    assert [line for line in lines if line.startswith("sentinel ")] == [
        *state.splitlines(), "sentinel auth-user dify-master difyops",
        f"sentinel auth-pass dify-master {admin}"]
    assert run("sentinel-owned-ok") == 0
    live.write_text(live.read_text().replace("tls-cert-file /etc/difyops/redis/tls/server.crt",
                                             'tls-cert-file "/etc/difyops/redis/tls/server.crt"'))
    assert run("sentinel-owned-ok") == 0


# --- cache.status rules ------------------------------------------------------------------------

def test_parsers() -> None:
    assert info("# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\n") == {
        "role": "slave", "master_host": "10.0.0.1"}
    assert pairs("name\ndify-master\nquorum\n2\n") == {"name": "dify-master", "quorum": "2"}


def sentinel_nodes() -> list[RedisNode]:
    def node(host: str, address: str, role: str) -> RedisNode:
        replication = {"role": role, "master_repl_offset": "500", "connected_slaves": "2"} \
            if role == "master" else {"role": "slave", "master_host": "10.0.3.11",
                                      "master_port": "6379", "master_link_status": "up",
                                      "slave_repl_offset": "480"}
        return RedisNode(host, address, 6379, replication=replication,
                         sentinel_master="10.0.3.11", sentinel={"num-other-sentinels": "2"},
                         ckquorum="OK 3 usable Sentinels. Quorum and failover authorization "
                                  "can be reached")

    return [node("db1", "10.0.3.11", "master"), node("db2", "10.0.3.12", "replica"),
            node("db3", "10.0.3.13", "replica")]


def test_healthy_sentinel_set(load, base) -> None:
    inventory = load(base)
    nodes = sentinel_nodes()
    assert problems(inventory, nodes) == []
    lines = cache_ops.status_table(inventory, nodes).splitlines()
    assert lines[2].split()[:7] == ["db2", "6379", "replica", "10.0.3.11:6379", "up", "480",
                                    "20"]


@pytest.mark.parametrize(("breakage", "expected"), [
    (lambda n: setattr(n[1], "sentinel_master", "10.0.3.12"), "the Sentinels disagree"),
    (lambda n: setattr(n[2], "sentinel_master", ""), "db3: its Sentinel names no master"),
    (lambda n: n[1].replication.update(role="master"), "2 masters (db1, db2)"),
    (lambda n: n[0].replication.update(role="slave"), "no Redis node is a master"),
    (lambda n: n[2].replication.update(master_link_status="down"), "db3: replica with its link"),
    (lambda n: setattr(n[0], "ckquorum", "NOQUORUM 1 usable Sentinels"), "db1: NOQUORUM"),
    (lambda n: n[0].sentinel.update({"num-other-sentinels": "1"}), "knows 1 other Sentinel"),
    (lambda n: setattr(n[2], "error", "Connection refused"), "db3:6379: Connection refused"),
])
def test_each_sentinel_problem_is_named(load, base, breakage, expected) -> None:
    inventory = load(base)
    nodes = sentinel_nodes()
    breakage(nodes)
    found = problems(inventory, nodes)
    assert any(expected in problem for problem in found), found


def test_cluster_problems(load, base) -> None:
    inventory = load(cluster_inventory(base))
    ok = {"cluster_state": "ok", "cluster_slots_ok": "16384", "cluster_known_nodes": "6"}

    def node(host: str, address: str, port: int, role: str, master: str = "") -> RedisNode:
        replication = {"role": role, "master_host": master, "master_link_status": "up"}
        return RedisNode(host, address, port, replication=replication, cluster=dict(ok))

    nodes = [node("db1", "10.0.3.11", 6379, "master"), node("db1", "10.0.3.11", 6380, "slave",
                                                             "10.0.3.12"),
             node("db2", "10.0.3.12", 6379, "master"), node("db2", "10.0.3.12", 6380, "slave",
                                                             "10.0.3.13"),
             node("db3", "10.0.3.13", 6379, "master"), node("db3", "10.0.3.13", 6380, "slave",
                                                             "10.0.3.11")]
    assert problems(inventory, nodes) == []
    nodes[4].cluster["cluster_state"] = "fail"
    assert "db3:6379: cluster_state:fail" in problems(inventory, nodes)
    nodes[4].cluster["cluster_state"] = "ok"
    nodes[0].replication["role"] = "slave"             # db1's master failed over to db2:6380
    nodes[0].replication["master_host"] = "10.0.3.12"
    nodes[3].replication["role"] = "master"
    found = problems(inventory, nodes)
    assert any("db2 runs several masters while db1 runs none" in p and
               "CLUSTER FAILOVER on db1:6379" in p for p in found), found
