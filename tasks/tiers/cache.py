"""cache tier: Redis from the OS packages under systemd, in one of three modes.

- standalone: redis-server on each cache (and broker) host.
- sentinel: redis-server on every cache host, the first one seeding the master and the others
  its replicas, and redis-sentinel on each with quorum = a majority. Sentinel rewrites its own
  file and, through CONFIG REWRITE, the replicaof line of redis.conf: difyops writes
  sentinel.conf only while it does not monitor the master yet, converges quorum and timeouts
  with SENTINEL SET, and compares only its own part of redis.conf, so a deploy never undoes a
  failover.
- cluster: cluster_nodes_per_host redis-server@PORT nodes per cache host (ports port, port+1...),
  joined once with redis-cli --cluster create; the broker hosts run a standalone Redis for Celery
  and the plugin daemon, which do not support Redis Cluster.

Users (config/redis/users.acl.j2, Redis' aclfile, loaded again with ACL LOAD when it changes):
one per client, every command but the @dangerous ones for Dify (`default`: Dify's cluster client
sends no user name), the plugin daemon and the agent backend; `monitor` for health checks and
metrics; `difyops`, with every command, for replication, Sentinel and the tier's own tools.
Sentinel keeps one password (REDIS_PASSWORD, Dify's): it holds no data.

With tls.internal (the default) every Redis and Sentinel serves TLS only (port 0, tls-port),
replication and Sentinel's links included, with the installation's CA (tasks/core/tls.py);
clients authenticate with their user's password, not with certificates. The nodes of a Redis
Cluster stay plaintext: Dify's cluster client has no TLS settings (api/extensions/ext_redis.py),
so they must be kept on the private network.
"""

from __future__ import annotations

from tasks.core import facts, shell, tls
from tasks.core.gates import CommandGate
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.system import packages, restart_unit, service_restart, service_running
from tasks.core.tiers import Tier

HELPER = "/usr/local/sbin/difyops-redis"
OWNED_DIR = "/etc/difyops/redis"
AUTH = f"{OWNED_DIR}/auth.env"
OWNED_CONF = f"{OWNED_DIR}/redis.conf"
SENTINEL_SEED = f"{OWNED_DIR}/sentinel.conf"
USERS = f"{OWNED_DIR}/users.acl"
AUTHED = f"set -a; . {AUTH}; set +a;"  # REDISCLI_AUTH from the root-only file
TLS_DIR = f"{OWNED_DIR}/tls"  # not under /etc/redis (mode 2770): the exporter reads the CA too
CA = f"{TLS_DIR}/{tls.CA_FILE}"


def serves_tls(inventory: Inventory, host: Host) -> bool:
    """Whether the host's Redis (and Sentinel) accept TLS only: with tls.internal, all but the
    nodes of a Redis Cluster (module doc)."""
    return inventory.settings.tls.internal and not (
        inventory.settings.cache.mode == "cluster" and host.has("cache"))


def cli_options(inventory: Inventory, host: Host) -> str:
    """What redis-cli on the host needs to reach its Redis: TLS verified with the CA."""
    return f"--tls --cacert {CA}" if serves_tls(inventory, host) else ""


def cli(inventory: Inventory, host: Host, sentinel: bool = False) -> str:
    """redis-cli on the host itself as Redis' user difyops (or to its Sentinel, with Sentinel's
    password), authenticated from the root-only file (no password on a command line), over TLS
    where the host's Redis serves TLS only."""
    login = ('REDISCLI_AUTH="$SENTINEL_AUTH" timeout 5 redis-cli' if sentinel
             else "timeout 5 redis-cli --user difyops")
    return " ".join(filter(None, (AUTHED, login, cli_options(inventory, host))))


def quorum(inventory: Inventory) -> int:
    """Sentinels that must agree a master is down: a majority of the cache hosts."""
    return len(inventory.with_role("cache")) // 2 + 1


def cluster_ports(inventory: Inventory) -> list[int]:
    """The ports of the cluster nodes on each cache host."""
    cache = inventory.settings.cache
    return [cache.port + index for index in range(cache.cluster_nodes_per_host)]


def cluster_nodes(inventory: Inventory) -> list[str]:
    """Every cluster node as address:port, ordered so that redis-cli spreads masters over hosts."""
    hosts = inventory.with_role("cache")
    return [f"{host.address}:{port}" for port in cluster_ports(inventory) for host in hosts]


def memory(megabytes: int) -> str:
    """A size the way CONFIG REWRITE writes it (1024mb is written 1gb)."""
    if megabytes % 1024 == 0:
        return f"{megabytes // 1024}gb"
    return f"{megabytes}mb"


def ping(redis_cli: str, port: int, name: str, unit: str, timeout: float = 60) -> WaitFor:
    """A gate: the Redis (or Sentinel) of this unit answers PING on its port with the password."""
    return WaitFor(CommandGate(name, timeout=timeout,
                               command=f"{redis_cli} -p {port} ping | grep -q PONG"),
                   restart=restart_unit(unit))


def acl_load(port: int | None = None) -> RunCommand:
    """Redis loads a changed users file without a restart (a restart reads it anyway)."""
    node = f" {port}" if port else ""
    return RunCommand(f"users file changed: ACL LOAD{node}", f"{HELPER} acl-load{node}",
                      on_change=(USERS,))


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """The host's Redis processes for the inventory's mode."""
    cache = inventory.settings.cache
    mode = cache.mode
    nodes = inventory.with_role("cache")
    extra = {
        "seed": nodes[0].address if nodes else host.address,
        "nodes": [node.address for node in nodes],
        "quorum": quorum(inventory),
        "cluster_nodes": cluster_nodes(inventory) if mode == "cluster" else [],
        "owned": OWNED_CONF, "sentinel_seed": SENTINEL_SEED, "auth": AUTH, "acl_file": USERS,
        "maxmemory": memory(cache.maxmemory_mb) if cache.maxmemory_mb else "",
        "tls_dir": TLS_DIR if serves_tls(inventory, host) else "",
        "cli_options": cli_options(inventory, host),
    }
    redis_cli = cli(inventory, host)

    def render(template: str, **more: object) -> str:
        return renderer.render(f"config/redis/{template}", host, **{**extra, **more})

    sentinel = mode == "sentinel" and host.has("cache")
    cluster = mode == "cluster" and host.has("cache")
    certificates = tls.service_files(inventory, host, directory=TLS_DIR, owner="redis",
                                     service="redis", tier="cache") \
        if serves_tls(inventory, host) else []
    plan: list[Step] = [
        packages("redis-server", *(["redis-sentinel"] if sentinel else [])),
        *certificates,
        WriteFile(HELPER, render("difyops-redis.sh.j2"), mode=0o755),
        WriteFile(AUTH, render("auth.env.j2"), mode=0o600, secret=True),
        WriteFile(USERS, render("users.acl.j2"), mode=0o600, owner="redis", group="redis",
                  secret=True),
    ]
    if cluster:
        return [*plan, *cluster_steps(inventory, render, host)]
    plan += [
        WriteFile(OWNED_CONF, render("redis.conf.j2", port=cache.port, cluster=False,
                                     data_dir="/var/lib/redis",
                                     log_file="/var/log/redis/redis-server.log", pid_file=""),
                  mode=0o600, secret=True),
        RunCommand("redis.conf: difyops's settings, Redis's replicaof kept",
                   f"{HELPER} config-merge", unless=f"{HELPER} config-ok"),
        service_running("redis-server"),
        ping(redis_cli, cache.port, f"redis on :{cache.port}", "redis-server"),
        acl_load(),
        *([RunCommand("load the renewed certificate (no restart)", f"{HELPER} tls-reload",
                      on_change=tuple(step.path for step in certificates))]
          if certificates else []),
    ]
    if not sentinel:
        return plan
    return [
        *plan,
        WriteFile(SENTINEL_SEED, render("sentinel.conf.j2"), mode=0o600, secret=True),
        # Before join: an installation turning tls.internal on or off, or whose Redis users
        # change, asks its Sentinels the way its Redis now speaks.
        RunCommand("sentinel.conf: difyops's ports, TLS settings and login",
                   f"{HELPER} sentinel-owned", unless=f"{HELPER} sentinel-owned-ok"),
        RunCommand("replica of the current master", f"{HELPER} join",
                   unless=f"{HELPER} join-ok"),
        WaitFor(CommandGate("replication link up", timeout=300, interval=1,
                            command=f"{HELPER} in-sync")),
        RunCommand("seed sentinel.conf (once: Sentinel owns it afterwards)",
                   f"{HELPER} sentinel-seed",
                   unless=shell.command("grep -q {} /etc/redis/sentinel.conf",
                                        f"^sentinel monitor {cache.master_name} "
                                        .replace(".", "\\."))),
        service_running("redis-sentinel"),
        ping(cli(inventory, host, sentinel=True), cache.sentinel_port,
             f"sentinel on :{cache.sentinel_port}", "redis-sentinel"),
        RunCommand(f"sentinel quorum {quorum(inventory)} and timeouts", f"{HELPER} sentinel-set",
                   unless=f"{HELPER} sentinel-ok"),
        WaitFor(CommandGate(f"sentinels agree on {cache.master_name}", timeout=60,
                            interval=2, command=f"{HELPER} sentinels-ok")),
    ]


def cluster_steps(inventory: Inventory, render, host: Host) -> list[Step]:
    """Cluster nodes as redis-server@PORT units; the first cache host forms the cluster once."""
    cache = inventory.settings.cache
    plan: list[Step] = [
        RunCommand("stop the packaged redis-server (cluster nodes have their own units)",
                   "systemctl disable --now redis-server",
                   unless=facts.stopped_and_disabled("redis-server")),
    ]
    for port in cluster_ports(inventory):
        conf, data = f"/etc/redis/redis-{port}.conf", f"/var/lib/redis/{port}"
        service = f"redis-server@{port}"
        plan += [
            RunCommand(f"data directory {data}",
                       f"install -d -o redis -g redis -m 0750 {data}",
                       unless=facts.is_directory(data)),
            WriteFile(conf, render("redis.conf.j2", port=port, cluster=True, data_dir=data,
                                   log_file=f"/var/log/redis/redis-server-{port}.log",
                                   pid_file=f"/run/redis-{port}/redis-server.pid"),
                      mode=0o640, owner="redis", group="redis", secret=True),
            service_running(service),
            service_restart(service, conf),
            ping(cli(inventory, host), port, f"cluster node on :{port}", service),
            acl_load(port),
        ]
    in_sync = [WaitFor(CommandGate(f"cluster node :{port} in sync", timeout=300, interval=1,
                                   command=f"{HELPER} in-sync {port}"))
               for port in cluster_ports(inventory)]
    if host.name == inventory.with_role("cache")[0].name:
        plan += [
            WaitFor(CommandGate("every cluster node answers", timeout=300, interval=2,
                                command=f"{HELPER} cluster-nodes-up")),
            RunCommand(f"create the cluster ({cache.cluster_replicas} replica(s) per master)",
                       f"{HELPER} cluster-create", unless=f"{HELPER} cluster-ok"),
        ]
    plan.append(WaitFor(CommandGate("cluster_state:ok", timeout=300, interval=2,
                                    command=f"{HELPER} cluster-state")))
    return [*plan, *in_sync]


TIER = Tier("cache", "Redis cache and Celery broker", ("cache", "broker"), steps)
