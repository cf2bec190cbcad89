"""cache tier on real hosts: Redis with Sentinel failover, then a Redis Cluster with a broker.

r1 r2 r3 run redis-server and redis-sentinel (sentinel mode, TLS only: tls.internal is on);
rp runs a real HAProxy with the app tier's redis_proxy configuration (what every Dify client
reaches, over TLS to the master); c1 c2 c3 run two cluster nodes each (plaintext) and cb the
standalone broker Redis (TLS; cluster mode). The tests run in order and share hosts.
"""

from __future__ import annotations

import base64
import itertools
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values

from tasks.core import tls
from tasks.core.inventory import load_inventory
from tasks.core.render import Renderer
from tasks.tiers.app import proxied_redis
from tasks.tiers.cache import CA, HELPER, serves_tls
from tests.integration.lab import Lab, LabHost
from tests.integration.support import release, summary_columns, until

ROOT = Path(__file__).resolve().parents[2]
AUTHED = "set -a; . /etc/difyops/redis/auth.env; set +a;"
DOWN_AFTER_S = 5  # cache.down_after_ms in config/defaults.yml
SENTINEL_PORT = 26379
# Redis' @dangerous commands Dify's and the plugin daemon's users must be refused.
DANGEROUS = ("config get maxmemory", "flushall", "client list", "keys acl-default", "info",
             "monitor", "replicaof no one", "shutdown nosave", "acl list", "module list", "save")


@dataclass
class CacheLab:
    """Hosts of one mode, their inventory and a way to run `inv` on it."""

    hosts: dict[str, LabHost]
    inventory: Path
    secrets: Path

    def inv(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "DIFY_INVENTORY": str(self.inventory),
               "DIFY_SECRETS": str(self.secrets)}
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                              capture_output=True, env=env, timeout=900, check=False)

    def redis(self, host: str, command: str, port: int = 6379, target: str = "") -> str:
        """redis-cli on a host (docker exec) through the cache tier's helper: Redis' user
        difyops (or Sentinel's password, on Sentinel's port) from the root-only file, TLS with
        the CA where the host's Redis serves TLS only."""
        to = f"-h {target} " if target else ""
        login = "sentinel-cli" if port == SENTINEL_PORT else f"cli -p {port}"
        code, out = self.hosts[host].exec(f"{HELPER} {login} {to}{command}")
        return out.strip() if code == 0 else f"exit {code}: {out.strip()}"

    def as_user(self, host: str, user: str, password: str, command: str,
                target: str = "", port: int = 6379, tls_on: bool = True) -> str:
        """redis-cli on a host as one of Redis' users (`default`: no user name, as Dify's
        clients log in)."""
        login = f"--user {user} " if user != "default" else ""
        tls_options = f"--tls --cacert {CA} " if tls_on else ""
        code, out = self.hosts[host].exec(
            f"REDISCLI_AUTH={shlex.quote(password)} timeout 5 redis-cli {login}{tls_options}"
            f"-h {target or '127.0.0.1'} -p {port} {command}")
        return out.strip() if code == 0 else f"exit {code}: {out.strip()}"

    def address(self, name: str) -> str:
        return self.hosts[name].address


def make_lab(lab: Lab, folder: Path, mode: str, roles: dict[str, list[str]]) -> CacheLab:
    hosts = dict(zip(roles, lab.start(list(roles)), strict=True))
    inventory = folder / f"cache-{mode}.yml"
    inventory.write_text(yaml.safe_dump({
        "name": f"cache-{mode}", "cache": {"mode": mode}, "vector": {"store": "pgvector"},
        "net": {"firewall": "off"},
        "hosts": [hosts[name].inventory_entry(host_roles, user="deploy" if name == "r3"
                                              else "root")
                  for name, host_roles in roles.items()],
    }, sort_keys=False))
    cache = CacheLab(hosts, inventory, folder / f"cache-{mode}.env")
    assert cache.inv("config.secrets").returncode == 0
    return cache


@pytest.fixture(scope="module")
def sentinel(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheLab]:
    # db_primary and dev_frontend only satisfy the inventory rules: no db or app tier runs here.
    cache = make_lab(lab, tmp_path_factory.mktemp("sentinel"), "sentinel",
                     {"r1": ["cache", "db_primary", "dev_frontend"], "r2": ["cache"],
                      "r3": ["cache"]})
    yield cache
    release(lab, cache.hosts)


@pytest.fixture(scope="module")
def redis_proxy(lab: Lab, sentinel: CacheLab) -> Iterator[LabHost]:
    """A host running HAProxy from the OS packages with the app tier's rendered redis_proxy
    configuration and the command line of the compose service (the packaged unit's sandboxing
    needs mount namespaces, which a lab host does not have)."""
    host = lab.start(["rp"])[0]
    os.environ["DIFY_SECRETS"] = str(sentinel.secrets)
    inventory = load_inventory(sentinel.inventory)
    config = Renderer(inventory).render(
        "config/haproxy/redis-master.cfg.j2", inventory.host("r1"),
        servers=[(node, serves_tls(inventory, node)) for node in proxied_redis(inventory)])
    assert config.count(" ssl verify required ") == 3
    data = base64.b64encode(config.encode()).decode()
    ca = base64.b64encode(tls.authority(inventory.secrets["INTERNAL_CA_KEY"],
                                        inventory.name).encode()).decode()
    code, out = host.exec("DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy "
                          f">/dev/null && echo {data} | base64 -d > /etc/haproxy/haproxy.cfg && "
                          f"mkdir -p {Path(tls.CONTAINER_CA).parent} && "
                          f"echo {ca} | base64 -d > {tls.CONTAINER_CA} && "
                          "haproxy -c -f /etc/haproxy/haproxy.cfg && systemctl disable --now "
                          "haproxy && systemd-run --unit difyops-redis-proxy haproxy -W -db -f "
                          "/etc/haproxy/haproxy.cfg")
    assert code == 0, out
    yield host
    release(lab, {"rp": host})


def through_proxy(cache: CacheLab, proxy: LabHost, command: str) -> str:
    """A plaintext redis-cli command sent to the proxy, as Dify's containers send theirs (from
    r3, which has redis-cli and the password); the proxy speaks TLS to the master."""
    code, out = cache.hosts["r3"].exec(f"{AUTHED} redis-cli --user difyops "
                                       f"-h {proxy.address} -p 6379 {command}")
    return out.strip() if code == 0 else f"exit {code}: {out.strip()}"


def run_id(answer: str) -> str:
    """run_id from an INFO server answer; "" from any other answer (the proxy closes a client's
    connection while no node answers role:master, as it does between the fault and Sentinel's
    election)."""
    return next((line.split(":", 1)[1].strip() for line in answer.splitlines()
                 if line.startswith("run_id:")), "")


def sentinel_views(cache: CacheLab, client: str) -> set[str]:
    """The master address every Sentinel gives, asked from a client host."""
    return {cache.redis(client, "sentinel get-master-addr-by-name dify-master", 26379,
                        cache.address(name)).splitlines()[0] for name in ("r1", "r2", "r3")}


def celery_style_master(cache: CacheLab, client: str) -> str:
    """What a Sentinel client does: ask the Sentinels in turn, take the first answer."""
    for name in ("r1", "r2", "r3"):
        answer = cache.redis(client, "sentinel get-master-addr-by-name dify-master", 26379,
                             cache.address(name))
        if answer and not answer.startswith("exit"):
            return answer.splitlines()[0]
    return ""


def test_sentinel_deploy_one_master_two_replicas(sentinel: CacheLab) -> None:
    first = sentinel.inv("cache.deploy")
    assert first.returncode == 0, first.stdout + first.stderr
    r1 = sentinel.address("r1")
    assert "role:master" in sentinel.redis("r1", "info replication")
    assert "connected_slaves:2" in sentinel.redis("r1", "info replication")
    for name in ("r2", "r3"):
        assert f"master_host:{r1}" in sentinel.redis(name, "info replication")
    assert sentinel_views(sentinel, "r2") == {r1}
    assert sentinel.redis("r1", "sentinel ckquorum dify-master", 26379).startswith("OK 3 usable")
    assert sentinel.redis("r1", "set before-failover kept") == "OK"
    until(lambda: sentinel.redis("r3", "get before-failover") == "kept", 10, "key on r3")
    _, conf = sentinel.hosts["r1"].exec("grep -c '^replicaof' /etc/redis/redis.conf || true")
    assert conf.strip() == "0"
    password = sentinel.secrets.read_text()
    assert not any(line.split("=", 1)[1] in first.stdout for line in password.splitlines())
    status = sentinel.inv("cache.status")
    assert status.returncode == 0, status.stdout + status.stderr


def test_redis_and_sentinel_serve_only_tls_clients_that_trust_the_ca(
        sentinel: CacheLab) -> None:
    """tls.internal: a plaintext client, a TLS client without the installation's CA and one
    with another CA are refused by Redis and by Sentinel; replication runs over TLS (port 0:
    there is nothing else), and the certificate names the host."""
    r3, r1 = sentinel.hosts["r3"], sentinel.address("r1")
    other = base64.b64encode(tls.authority("another installation's secret", "other").encode())
    assert r3.exec(f"echo {other.decode()} | base64 -d > /tmp/other-ca.crt")[0] == 0
    for port, cli in ((6379, "timeout 5 redis-cli --user difyops"),
                      (SENTINEL_PORT, 'REDISCLI_AUTH="$SENTINEL_AUTH" timeout 5 redis-cli')):
        ask = f"{AUTHED} {cli} -h {r1} -p {port}"
        for options, refusal in (("", ""), ("--tls", "certificate verify failed"),
                                 ("--tls --cacert /tmp/other-ca.crt",
                                  "certificate verify failed")):
            code, out = r3.exec(f"{ask} {options} ping")
            assert "PONG" not in out, (port, options, out)
            assert refusal in out, (port, options, out)
        code, out = r3.exec(f"{ask} --tls --cacert {CA} ping")
        assert (code, out.strip()) == (0, "PONG"), out
    assert sentinel.redis("r1", "config get port").split() == ["port", "0"]
    code, out = r3.exec(f"openssl s_client -connect {r1}:6379 -CAfile {CA} "
                        f"-verify_hostname r1 -verify_return_error </dev/null")
    assert code == 0 and "Verify return code: 0 (ok)" in out, out


def acl_log_users(cache: CacheLab, host: str) -> list[str]:
    """The user of every entry of a Redis' ACL LOG (what it refused, and to whom)."""
    lines = cache.redis(host, "acl log 128").splitlines()
    return [value for key, value in itertools.pairwise(lines) if key == "username"]


def test_each_client_logs_in_as_its_own_user_without_dangerous_commands(
        sentinel: CacheLab) -> None:
    """Dify (`default`) and the plugin daemon may use every command but Redis' @dangerous ones;
    monitor may read INFO and no key; the admin password is difyops's user's only."""
    secrets = dotenv_values(sentinel.secrets)
    r1 = sentinel.address("r1")
    assert sentinel.redis("r1", "acl log reset") == "OK"

    def ask(user: str, secret: str, command: str) -> str:
        return sentinel.as_user("r2", user, secrets[secret], command, target=r1)

    for user, secret in (("default", "REDIS_PASSWORD"),
                         ("plugin_daemon", "REDIS_PLUGIN_DAEMON_PASSWORD")):
        assert ask(user, secret, f"set acl-{user} 1") == "OK"
        assert ask(user, secret, f"get acl-{user}") == "1"
        assert ask(user, secret, "publish acl-events 1").isdigit()  # pub/sub
        for command in DANGEROUS:
            assert "NOPERM" in ask(user, secret, command), (user, command)
    assert "role:master" in ask("monitor", "REDIS_MONITOR_PASSWORD", "info replication")
    for command in ("get acl-default", "set acl-monitor 1", "config set maxmemory 1"):
        assert "NOPERM" in ask("monitor", "REDIS_MONITOR_PASSWORD", command), command
    assert "WRONGPASS" in ask("default", "REDIS_ADMIN_PASSWORD", "ping")
    assert ask("difyops", "REDIS_ADMIN_PASSWORD", "config get appendonly").split() == [
        "appendonly", "yes"]
    refused = acl_log_users(sentinel, "r1")
    assert {"default", "plugin_daemon", "monitor"} <= set(refused), refused
    # Replication and Sentinel log in as difyops: nothing of theirs was refused.
    assert "difyops" not in refused
    assert "connected_slaves:2" in sentinel.redis("r1", "info replication")
    # The users file holds no password, only their SHA-256.
    _, users = sentinel.hosts["r1"].exec("cat /etc/difyops/redis/users.acl")
    assert not [value for value in secrets.values() if value and value in users]


def test_the_redis_proxy_reaches_the_master(sentinel: CacheLab, redis_proxy: LabHost) -> None:
    until(lambda: "role:master" in through_proxy(sentinel, redis_proxy, "info replication"),
          15, "the proxy forwards to a master")
    assert run_id(through_proxy(sentinel, redis_proxy, "info server")) == \
        run_id(sentinel.redis("r1", "info server")) != ""
    assert through_proxy(sentinel, redis_proxy, "set via-proxy yes") == "OK"


def test_sentinel_second_deploy_changes_nothing(sentinel: CacheLab) -> None:
    second = sentinel.inv("cache.deploy")
    assert second.returncode == 0, second.stdout + second.stderr
    assert summary_columns(second.stdout) == ["host", "unchanged"]


def test_killed_master_is_replaced_and_clients_follow(sentinel: CacheLab) -> None:
    old = sentinel.address("r1")
    sentinel.hosts["r1"].exec("systemctl stop redis-server")  # killed, and it stays down
    deadline = DOWN_AFTER_S + 25
    took = until(lambda: celery_style_master(sentinel, "r3") not in ("", old), deadline,
                 "a new master named by Sentinel")
    new = celery_style_master(sentinel, "r3")
    assert new in (sentinel.address("r2"), sentinel.address("r3"))
    print(f"\nSentinel named a new master {took:.1f} s after the old one was killed")
    until(lambda: sentinel.redis("r3", "role", target=new).startswith("master"), 10,
          "the new master answers as master")
    assert sentinel.redis("r3", "set after-failover written", target=new) == "OK"
    assert sentinel.redis("r3", "get before-failover", target=new) == "kept"
    until(lambda: sentinel_views(sentinel, "r2") == {new}, 20, "every Sentinel agrees")
    status = sentinel.inv("cache.status")
    assert status.returncode == 1
    assert "r1:6379" in status.stderr


def test_the_redis_proxy_follows_the_failover(sentinel: CacheLab, redis_proxy: LabHost) -> None:
    """What Dify's pub/sub reaches through REDIS_HOST=redis_proxy is the new master."""
    new = celery_style_master(sentinel, "r3")
    name = next(n for n in ("r2", "r3") if sentinel.address(n) == new)
    took = until(lambda: run_id(through_proxy(sentinel, redis_proxy, "info server"))
                 == run_id(sentinel.redis(name, "info server")) != "", 15,
                 "the proxy forwards to the new master")
    print(f"\nthe Redis proxy reached the new master {took:.1f} s after Sentinel named it")
    assert through_proxy(sentinel, redis_proxy, "get via-proxy") == "yes"
    assert through_proxy(sentinel, redis_proxy, "set via-proxy-after ok") == "OK"


def test_deploy_after_failover_keeps_the_new_master(sentinel: CacheLab) -> None:
    new = celery_style_master(sentinel, "r2")
    rejoin = sentinel.inv("cache.deploy")  # r1's redis-server is started again, as a replica
    assert rejoin.returncode == 0, rejoin.stdout + rejoin.stderr
    assert "[cache] r1: enable and start redis-server ... changed" in rejoin.stdout
    assert f"master_host:{new}" in sentinel.redis("r1", "info replication")
    _, tail = sentinel.hosts["r1"].exec("grep '^replicaof' /etc/redis/redis.conf")
    assert tail.split() == ["replicaof", new, "6379"]
    again = sentinel.inv("cache.deploy")
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary_columns(again.stdout) == ["host", "unchanged"]
    assert celery_style_master(sentinel, "r2") == new
    until(lambda: sentinel.inv("cache.status").returncode == 0, 30, "cache.status healthy")
    assert sentinel.redis("r1", "get after-failover") == "written"


def test_sentinel_settings_change_through_sentinel_set(sentinel: CacheLab) -> None:
    """A changed timeout reaches every Sentinel without rewriting its file or moving the master."""
    master = celery_style_master(sentinel, "r2")
    data = yaml.safe_load(sentinel.inventory.read_text())
    data["cache"]["down_after_ms"] = 4000
    sentinel.inventory.write_text(yaml.safe_dump(data, sort_keys=False))
    changed = sentinel.inv("cache.deploy")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    for name in ("r1", "r2", "r3"):
        assert f"[cache] {name}: sentinel quorum 2 and timeouts ... changed" in changed.stdout
        answer = sentinel.redis(name, "sentinel master dify-master", 26379).splitlines()
        assert answer[answer.index("down-after-milliseconds") + 1] == "4000"
    assert "seed sentinel.conf (once: Sentinel owns it afterwards) ... changed" \
        not in changed.stdout
    assert celery_style_master(sentinel, "r2") == master
    again = sentinel.inv("cache.deploy")
    assert summary_columns(again.stdout) == ["host", "unchanged"]


def test_an_installation_turning_internal_tls_off_and_on_keeps_its_master_and_data(
        sentinel: CacheLab) -> None:
    """What every installation made before tls.internal meets at its next deploy, and back:
    Redis, replication and the Sentinels change how they speak, the master stays, no key is
    lost, and the next deploy changes nothing."""
    master = celery_style_master(sentinel, "r2")
    assert sentinel.redis("r3", "set across-tls kept", target=master) == "OK"
    data = yaml.safe_load(sentinel.inventory.read_text())
    for internal in (False, True):
        data["tls"] = {"internal": internal}
        sentinel.inventory.write_text(yaml.safe_dump(data, sort_keys=False))
        changed = sentinel.inv("cache.deploy")
        assert changed.returncode == 0, changed.stdout + changed.stderr
        for name in ("r1", "r2", "r3"):
            assert f"[cache] {name}: sentinel.conf: difyops's ports, TLS settings and " \
                   "login ... changed" in changed.stdout, changed.stdout
            assert sentinel.redis(name, "config get port").split() == \
                ["port", "0" if internal else "6379"]
        assert celery_style_master(sentinel, "r2") == master
        for name in ("r1", "r2", "r3"):
            until(lambda name=name: sentinel.redis(name, "get across-tls") == "kept", 30,
                  f"the key on {name}")
        again = sentinel.inv("cache.deploy")
        assert summary_columns(again.stdout) == ["host", "unchanged"], again.stdout


@pytest.fixture(scope="module")
def cluster(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CacheLab]:
    cache = make_lab(lab, tmp_path_factory.mktemp("cluster"), "cluster",
                     {"c1": ["cache", "db_primary"], "c2": ["cache"], "c3": ["cache"],
                      "cb": ["broker", "dev_frontend"]})
    yield cache
    release(lab, cache.hosts)


def masters(cache: CacheLab) -> dict[str, str]:
    """address:port -> slot ranges of every master, from c1's view of the cluster."""
    nodes = cache.redis("c1", "cluster nodes").splitlines()
    return {fields[1].split("@")[0]: " ".join(fields[8:]) for fields in
            (line.split() for line in nodes) if "master" in fields[2] and
            "fail" not in fields[2]}


def test_cluster_deploy_spreads_slots_and_keys(cluster: CacheLab) -> None:
    first = cluster.inv("cache.deploy")
    assert first.returncode == 0, first.stdout + first.stderr
    for name in ("c1", "c2", "c3"):
        for port in (6379, 6380):
            assert "cluster_state:ok" in cluster.redis(name, "cluster info", port)
    found = masters(cluster)
    assert len(found) == 3
    assert {address.split(":")[0] for address in found} == {cluster.address(n)
                                                            for n in ("c1", "c2", "c3")}
    for index in range(60):
        assert cluster.redis("c2", f"-c set key{index} value{index}") == "OK"
    for address in found:
        host, port = address.split(":")
        assert int(cluster.redis("c1", "dbsize", int(port), host)) > 0, address
    assert "cluster_enabled:0" in cluster.redis("cb", "info cluster")
    assert cluster.redis("cb", "ping") == "PONG"
    # tls.internal: the broker serves TLS only; the cluster nodes stay plaintext (Dify's cluster
    # client has no TLS settings)
    assert cluster.redis("cb", "config get port").split() == ["port", "0"]
    assert cluster.redis("c1", "config get tls-port").split() == ["tls-port", "0"]
    # Dify's cluster client sends no user name: it is `default` on every node, without
    # dangerous commands; the plugin daemon has its own user on the broker.
    secrets = dotenv_values(cluster.secrets)
    dify = secrets["REDIS_PASSWORD"]
    assert cluster.as_user("c2", "default", dify, "-c set dify-key 1", tls_on=False) == "OK"
    assert "NOPERM" in cluster.as_user("c2", "default", dify, "config get port", tls_on=False)
    assert cluster.as_user("cb", "plugin_daemon", secrets["REDIS_PLUGIN_DAEMON_PASSWORD"],
                           "set daemon-key 1") == "OK"
    status = cluster.inv("cache.status")
    assert status.returncode == 0, status.stdout + status.stderr


def test_cluster_second_deploy_changes_nothing(cluster: CacheLab) -> None:
    second = cluster.inv("cache.deploy")
    assert second.returncode == 0, second.stdout + second.stderr
    assert summary_columns(second.stdout) == ["host", "unchanged"]


def test_a_stopped_cluster_master_is_replaced_by_its_replica(cluster: CacheLab) -> None:
    c1 = cluster.address("c1")
    nodes = cluster.redis("c2", "cluster nodes").splitlines()
    master_id = next(line.split()[0] for line in nodes if f"{c1}:6379@" in line)
    replica = next(line.split()[1].split("@")[0] for line in nodes
                   if line.split()[3] == master_id)
    cluster.hosts["c1"].exec("systemctl stop redis-server@6379")
    host, port = replica.split(":")
    took = until(lambda: cluster.redis("c2", "role", int(port), host).startswith("master"),
                 30, f"{replica} promoted")
    print(f"\ncluster replica {replica} took over {took:.1f} s after its master stopped")
    until(lambda: "cluster_state:ok" in cluster.redis("c2", "cluster info"), 30,
          "cluster_state:ok again")
    for index in range(60):
        assert cluster.redis("c3", f"-c get key{index}") == f"value{index}"
