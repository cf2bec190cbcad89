"""Rules that relate inventory settings and hosts to each other and to the Dify version.

Each rule returns the problems it finds; `check` runs them all. They encode the failures that
self-hosted Dify installations meet (see DIFY.md): unconsumed queues, two beats, two plugin
daemons, a Celery broker on a Redis Cluster, Weaviate without quorum, diverging local storage,
PostgreSQL running out of connections.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from tasks.core import netplan, placement, schema
from tasks.core.errors import Problem
from tasks.core.inventory import APP_ROLES, Inventory, is_ipv6
from tasks.core.profiles import version_key
from tasks.core.project import display

Rule = Callable[[Inventory, str], Iterator[Problem]]


def check(inventory: Inventory) -> list[Problem]:
    """Every problem every rule finds, in a stable order."""
    shown = display(inventory.file)
    return [problem for rule in RULES for problem in rule(inventory, shown)]


def required_roles(inventory: Inventory) -> list[str]:
    """Roles an inventory of this layout cannot do without."""
    roles = ["db_primary", "cache"]
    if inventory.settings.vector.store == "weaviate":
        roles.append("vector")
    if not inventory.is_dev_layout:
        roles.extend([*(role for role in APP_ROLES if role != placement.AGENT_ROLE), "lb"])
    return roles


def role_presence(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """A required role with no host, and roles that must be played exactly once."""
    for role in required_roles(inventory):
        if not inventory.with_role(role):
            yield Problem(shown, "hosts[*].roles", f"no host has the required role {role!r}",
                          f"add {role!r} to the roles of a host")
    singletons = {"db_primary": "one PostgreSQL primary",
                  "plugin_daemon": "one plugin daemon (plugin state lives in one place)",
                  "beat": "one Celery beat (two would schedule every periodic task twice)"}
    for role, why in singletons.items():
        hosts = inventory.with_role(role)
        if len(hosts) > 1:
            yield Problem(shown, f"hosts[{index_of(inventory, hosts[1].name)}].roles",
                          f"{len(hosts)} hosts have role {role!r} "
                          f"({', '.join(h.name for h in hosts)}): the installation needs exactly "
                          f"{why}", f"keep {role!r} on one host only")
    yield from agent_placement(inventory, shown)
    if inventory.with_role("db_replica") and not inventory.with_role("db_primary"):
        yield Problem(shown, "hosts[*].roles", "replicas without a primary",
                      "give one host the role 'db_primary'")


def agent_placement(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """The agent services (Dify 1.16.1+) run on exactly one Linux host (tasks/core/placement.py).
    With an older release the role is allowed and runs nothing (an upgrade or rollback changes
    only the version)."""
    hosts = inventory.with_role(placement.AGENT_ROLE)
    if not hosts:
        return
    if len(hosts) > 1:
        yield Problem(shown, f"hosts[{index_of(inventory, hosts[1].name)}].roles",
                      f"{len(hosts)} hosts have role 'agent' ({', '.join(h.name for h in hosts)}): "
                      f"api and worker know one agent backend (AGENT_BACKEND_BASE_URL), and its "
                      f"runs live in that one process", "keep 'agent' on one host only")
    for host in hosts:
        if host.labels.get("os", "").lower() == "windows":
            yield Problem(shown, f"hosts[{index_of(inventory, host.name)}].roles",
                          f"{host.name} is a Windows host: the agent services run by compose on "
                          f"Linux (local_sandbox needs Landlock, Linux 5.13+)",
                          "give the role 'agent' to a Linux host")


def websocket_port(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """api_websocket's host port: a port number of its own on the api hosts."""
    port = inventory.settings.app.websocket_port
    taken = {5001: "the api", 5002: "the plugin daemon", 3000: "web",
             placement.AGENT_PORT: "the agent backend", 22: "SSH", 80: "HTTP", 443: "HTTPS"}
    if not 1024 <= port <= 65535 or port in taken:
        why = f" (used by {taken[port]})" if port in taken else ""
        yield Problem(shown, "app.websocket_port", f"{port} is not a free port{why}",
                      "use a port of its own between 1024 and 65535, e.g. 5006")


def queue_coverage(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """The worker groups that run somewhere must consume every queue of the Dify version."""
    profile = inventory.profile
    groups = inventory.settings.app.worker_groups
    workers = inventory.with_role("worker")
    if not workers:
        return
    running = {name for host in workers for name in (host.worker_groups or
                                                     [g["name"] for g in groups])}
    consumed: set[str] = set()
    for index, group in enumerate(groups):
        queues = inventory.worker_queues(group)
        for queue_index, queue in enumerate(queues):
            if queue not in profile.queues:
                yield Problem(shown, f"app.worker_groups[{index}].queues[{queue_index}]",
                              f"{queue!r} is not a queue of Dify {profile.version}",
                              f"use queues of that version: {', '.join(profile.queues)}")
        if group["name"] in running:
            consumed.update(queues)
    missing = [queue for queue in profile.queues if queue not in consumed]
    rest = [g["name"] for g in groups if g["queues"] == "rest"]
    if len(rest) > 1:
        yield Problem(shown, "app.worker_groups",
                      f"more than one group says `queues: rest` ({', '.join(rest)})",
                      "give `rest` to one group and list the others' queues by name")
    if missing:
        yield Problem(shown, "app.worker_groups",
                      f"no worker consumes the queue(s) {', '.join(missing)} of Dify "
                      f"{profile.version}: their tasks (documents, mail, workflows) would wait "
                      f"in 'Queuing' forever",
                      "add them to a worker group that runs on a worker host, or set "
                      "`queues: all` or `queues: rest` on one group")


def broker_not_on_cluster(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """Celery and the plugin daemon cannot use Redis Cluster: a cluster needs broker hosts."""
    cache = inventory.settings.cache
    hosts = inventory.with_role("cache")
    if cache.mode == "cluster" and not inventory.with_role("broker"):
        yield Problem(shown, "cache.mode",
                      "the Celery broker and the plugin daemon do not support Redis Cluster, "
                      "and no host has the role 'broker'",
                      "add a host with role 'broker' (a standalone Redis for Celery), or set "
                      "cache.mode to sentinel")
    for host in inventory.with_role("broker") if cache.mode == "cluster" else ():
        if host.has("cache"):
            yield Problem(shown, f"hosts[{index_of(inventory, host.name)}].roles",
                          f"{host.name} is both a cluster node and the broker: both listen on "
                          f"cache.port {cache.port}",
                          "give the role 'broker' to a host without the role 'cache'")
    if cache.mode == "cluster" and 0 < len(hosts) < 3:
        yield Problem(shown, "cache.mode", f"a Redis Cluster needs 3 or more masters, the "
                      f"inventory has {len(hosts)} cache host(s)",
                      "add cache hosts or set cache.mode to standalone")
    if cache.mode == "sentinel" and inventory.with_role("dev_backend"):
        yield Problem(shown, "cache.mode",
                      "Dify run from source on a dev_backend host builds its pub/sub client "
                      "(streaming answers) from REDIS_HOST:REDIS_PORT, which cannot follow a "
                      "Sentinel failover: streaming would break at the first one",
                      "use cache.mode standalone in a home-lab inventory")
    if cache.mode == "cluster" and inventory.with_role("dev_backend") and \
            inventory.settings.tls.internal:
        yield Problem(shown, "cache.mode",
                      "tls.internal makes the broker Redis serve TLS only, and Dify run from "
                      "source on a dev_backend host has no TLS setting for a Redis Cluster",
                      "use cache.mode standalone in a home-lab inventory")
    if cache.mode == "sentinel" and 0 < len(hosts) < 3:
        yield Problem(shown, "cache.mode", f"Sentinel needs 3 or more cache hosts to reach a "
                      f"quorum, the inventory has {len(hosts)}",
                      "add cache hosts, or set cache.mode to standalone on a single host")


def redis_lists_ipv4(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """In sentinel and cluster mode Dify reads its Redis nodes from REDIS_SENTINELS or
    REDIS_CLUSTERS, host:port pairs it splits on ':' (api/extensions/ext_redis.py:
    `node.split(":")[0], int(node.split(":")[1])`): an IPv6 address cannot be listed there,
    bracketed or not."""
    mode = inventory.settings.cache.mode
    if mode not in ("sentinel", "cluster"):
        return
    setting = "REDIS_SENTINELS" if mode == "sentinel" else "REDIS_CLUSTERS"
    for host in inventory.with_role("cache"):
        if is_ipv6(host.address):
            yield Problem(shown, f"hosts[{index_of(inventory, host.name)}].address",
                          f"{host.name} is a cache host with the IPv6 address {host.address}: "
                          f"with cache.mode {mode}, Dify reads the cache hosts from {setting}, "
                          f"which it splits on ':' into host and port, so it cannot reach an "
                          f"IPv6 address", f"give {host.name}'s IPv4 address, or a DNS name "
                          f"that resolves to it")


def image_overrides(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """Per-component image overrides are references, nothing else: they reach compose files and
    docker commands (the other image settings are typed in config/defaults.yml)."""
    image = schema.TYPES["!image"]
    for component, value in inventory.settings.dify.images.items():
        if not image.accepts(value):
            yield Problem(shown, f"dify.images.{component}", f"{value!r} is not {image.what}",
                          f"use {image.fix}")


def trusted_proxies(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """The proxies whose X-Forwarded-For nginx believes are addresses or networks."""
    yield from netplan.address_blocks(inventory.settings.lb.trusted_proxies,
                                      "lb.trusted_proxies", shown,
                                      "trusted_proxies: [203.0.113.0/24]")


def dev_release(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """A home lab's checkout must be the release whose profile drives it (queues, Celery app)."""
    ref = inventory.settings.dev.dify_ref
    version = inventory.profile.version
    if inventory.with_role("dev_backend") and re.fullmatch(r"\d+\.\d+\.\d+", ref) \
            and ref != version:
        yield Problem(shown, "dev.dify_ref",
                      f"checks out Dify {ref}, but dify.version is {version}: the worker would "
                      f"consume {version}'s queues with {ref}'s code",
                      f"set dify.version: \"{ref}\" or dev.dify_ref: \"{version}\"")


def vector_store(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """Weaviate: a version the Dify client speaks to, and 1 node or a RAFT quorum of 3+."""
    vector = inventory.settings.vector
    if vector.store == "pgvector" and len(inventory.with_role("vector")) > 1:
        yield Problem(shown, "hosts[*].roles",
                      f"{len(inventory.with_role('vector'))} hosts have role 'vector' with "
                      f"vector.store pgvector: pgvector lives in one PostgreSQL",
                      "keep 'vector' on one host (its own PostgreSQL), or on none (the db "
                      "primary's PostgreSQL)")
    if vector.store != "weaviate":
        return
    nodes = inventory.with_role("vector")
    if len(nodes) == 2:
        yield Problem(shown, "hosts[*].roles",
                      "2 hosts have role 'vector': a 2-node Weaviate cluster has no RAFT quorum "
                      "and stops when either node is down",
                      "use 1 vector host, or 3 or more")
    version = weaviate_version(inventory)
    minimum = inventory.profile.weaviate_min_version
    if version_key(version) < version_key(minimum):
        yield Problem(shown, "vector.weaviate_version",
                      f"Weaviate {version} is too old for Dify {inventory.profile.version}, "
                      f"whose client needs {minimum} or newer (gRPC on :50051)",
                      f"set vector.weaviate_version to {minimum} or newer (or leave it empty)")
    factor = vector.replication_factor
    if nodes and not 1 <= factor <= len(nodes):
        yield Problem(shown, "vector.replication_factor",
                      f"replication factor {factor} with {len(nodes)} Weaviate node(s)",
                      f"use a factor between 1 and {len(nodes)}")


def shared_storage(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """Several api/worker hosts must share storage; a local volume per host diverges."""
    storage = inventory.settings.storage
    app_hosts = inventory.with_role("api", "worker")
    if storage.type == "local" and len(app_hosts) > 1:
        yield Problem(shown, "storage.type",
                      f"{len(app_hosts)} api/worker hosts with host-local storage: uploads made "
                      f"through one host are missing on the others",
                      "set storage.type to s3 (with s3_endpoint and s3_bucket) or shared-fs")
    if storage.type == "s3":
        for key in ("s3_endpoint", "s3_bucket"):
            if not storage[key]:
                yield Problem(shown, f"storage.{key}", "required when storage.type is s3",
                              f"set storage.{key}")


def connection_budget(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """PostgreSQL's max_connections must hold every pool the app tier can open at once."""
    db, app = inventory.settings.db, inventory.settings.app
    parts = connection_parts(inventory)
    needed = sum(count for _, count in parts) + db.reserved_connections
    if parts and db.max_connections < needed:
        detail = " + ".join(f"{what} {count}" for what, count in parts)
        yield Problem(shown, "db.max_connections",
                      f"{db.max_connections} is below what the app tier can open: {detail} "
                      f"+ reserved {db.reserved_connections} = {needed} "
                      f"(PostgreSQL would answer 'too many clients')",
                      f"raise db.max_connections to at least {needed}, or lower "
                      f"app.api.db_pool_size/db_max_overflow (now "
                      f"{app.api.db_pool_size}+{app.api.db_max_overflow})")


def connection_parts(inventory: Inventory) -> list[tuple[str, int]]:
    """Connections each kind of app process can hold: (label, count) per kind that exists."""
    app = inventory.settings.app
    groups = {group["name"] for group in app.worker_groups}

    def pool(section: str) -> int:
        return app[section]["db_pool_size"] + app[section]["db_max_overflow"]

    api_hosts = inventory.with_role("api")
    worker_processes = sum(len(host.worker_groups or groups)
                           for host in inventory.with_role("worker"))
    # api_websocket: one gunicorn worker per api host, with the api's pool.
    sockets = len(api_hosts) if placement.websocket_enabled(inventory) else 0
    parts = [
        (f"api {len(api_hosts)}x{app.api.server_workers}x{pool('api')}",
         len(api_hosts) * app.api.server_workers * pool("api")),
        (f"api_websocket {sockets}x1x{pool('api')}", sockets * pool("api")),
        (f"workers {worker_processes}x{pool('worker')}", worker_processes * pool("worker")),
        ("beat", len(inventory.with_role("beat")) * pool("beat")),
        ("plugin daemon", len(inventory.with_role("plugin_daemon"))
         * app.plugin_daemon["db_max_open_conns"]),
    ]
    return [(label, count) for label, count in parts if count]


def tls_settings(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """The files or the contact the TLS mode needs."""
    tls = inventory.settings.tls
    if tls.mode == "file":
        for key in ("cert_file", "key_file"):
            if not tls[key]:
                yield Problem(shown, f"tls.{key}", "required when tls.mode is file",
                              f"set tls.{key} to the path on the control machine")
    if tls.mode == "acme":
        if not tls.acme_email:
            yield Problem(shown, "tls.acme_email", "required when tls.mode is acme",
                          "set tls.acme_email to a contact address")
        if inventory.settings.domain in ("localhost", ""):
            yield Problem(shown, "domain", "ACME certificates need a public domain name",
                          "set domain to the name that resolves to the load balancer")


def monitor_settings(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """A Slack format with its webhook, an extra rule file that exists."""
    monitor = inventory.settings.monitor
    if monitor.webhook_format == "slack" and not monitor.alert_webhook:
        yield Problem(shown, "monitor.alert_webhook", "required when webhook_format is slack",
                      "set monitor.alert_webhook to the incoming webhook's URL")
    if monitor.extra_rules and not extra_rules_path(inventory).is_file():
        yield Problem(shown, "monitor.extra_rules",
                      f"no such file: {extra_rules_path(inventory)}",
                      "give the path of a Prometheus rule file on this machine, or leave it empty")


SIZE = re.compile(r"^(\d+)([kmg])$")
SIZE_UNITS = {"k": 1, "m": 1024, "g": 1024 * 1024}
INDEX_PREFIX = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,100}$")
ES_USER = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# Users Elasticsearch (and the stack around it) reserves for itself.
RESERVED_ES_USERS = ("elastic", "kibana", "kibana_system", "logstash_system", "beats_system",
                     "apm_system", "remote_monitoring_user")


def size_kib(text: str) -> int | None:
    """A size such as 512m or 2g in KiB; None when it is not one."""
    match = SIZE.match(str(text))
    return int(match.group(1)) * SIZE_UNITS[match.group(2)] if match else None


def logging_settings(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """The logging store: security on, one node, a heap that fits its memory, sane names."""
    hosts = inventory.with_role("logging")
    if not hosts:
        return
    logging = inventory.settings.logging
    if logging.security is not True:
        yield Problem(shown, "logging.security",
                      "Elasticsearch without security answers anyone who reaches its port: "
                      "every log line of every host, and the right to delete them",
                      "remove the setting (or set it to true): difyops always enables security "
                      "and takes the passwords from the secrets file")
    if len(hosts) > 1:
        yield Problem(shown, f"hosts[{index_of(inventory, hosts[1].name)}].roles",
                      f"{len(hosts)} hosts have role 'logging' "
                      f"({', '.join(h.name for h in hosts)}): difyops deploys a single-node "
                      f"Elasticsearch and has no cluster configuration (discovery, transport "
                      f"TLS, shard allocation) for more",
                      "keep 'logging' on one host")
    for host in hosts:
        try:
            usable = not ipaddress.ip_address(host.address).is_unspecified
        except ValueError:
            usable = False
        if not usable:
            yield Problem(shown, f"hosts[{index_of(inventory, host.name)}].address",
                          f"{host.address!r}: the logging host publishes Elasticsearch and "
                          f"Kibana on its own address only, which Docker needs as an IP address",
                          "give the logging host its private IP address")
        if host.labels.get("os", "").lower() == "windows":
            yield Problem(shown, f"hosts[{index_of(inventory, host.name)}].roles",
                          f"{host.name} is a Windows host: the logging store runs by compose on "
                          f"Linux", "give the role 'logging' to a Linux host")
    sizes = {}
    for key in ("heap", "es_memory", "kibana_memory", "queue_max_disk"):
        sizes[key] = size_kib(logging[key])
        if sizes[key] is None or sizes[key] == 0:
            yield Problem(shown, f"logging.{key}", f"{logging[key]!r} is not a size",
                          "write a number and a unit k, m or g, e.g. 512m or 2g")
    heap, memory = sizes["heap"], sizes["es_memory"]
    if heap and memory and heap * 2 > memory:
        yield Problem(shown, "logging.heap",
                      f"a heap of {logging.heap} in a container limited to "
                      f"{logging.es_memory}: Elasticsearch needs as much memory again "
                      f"outside the heap (file cache, direct buffers) or the kernel kills it",
                      "lower logging.heap to at most half of logging.es_memory, or raise "
                      "logging.es_memory to at least twice the heap")
    if heap and heap > 31 * SIZE_UNITS["g"]:
        yield Problem(shown, "logging.heap",
                      f"{logging.heap} is above 31g: the JVM loses compressed object "
                      f"pointers and a larger heap holds less", "use 31g or less")
    if heap and heap < 256 * SIZE_UNITS["m"]:
        yield Problem(shown, "logging.heap", f"{logging.heap} is too small to start "
                      f"Elasticsearch", "use 256m or more (1g or more in production)")
    ports = {key: logging[key] for key in ("es_port", "kibana_port")}
    if logging.kibana and ports["es_port"] == ports["kibana_port"]:
        yield Problem(shown, "logging.kibana_port",
                      f"the same port as logging.es_port ({ports['es_port']})",
                      "give Kibana its own port (5601 is its usual one)")
    if not INDEX_PREFIX.match(logging.index_prefix):
        yield Problem(shown, "logging.index_prefix",
                      f"{logging.index_prefix!r} is not usable in an Elasticsearch index name",
                      "use lower-case letters, digits, '-', '_' or '.', starting with a letter "
                      "or digit, e.g. dify-logs")
    user = logging.writer_user
    if not ES_USER.match(user) or user in RESERVED_ES_USERS:
        yield Problem(shown, "logging.writer_user",
                      f"{user!r} is not a name difyops may give the shippers' user"
                      + (" (Elasticsearch reserves it)" if user in RESERVED_ES_USERS else ""),
                      "use lower-case letters, digits and underscores, e.g. difyops_logs_writer")
    if logging.health_timeout < 10:
        yield Problem(shown, "logging.health_timeout", f"{logging.health_timeout} seconds",
                      "give Elasticsearch time to start: 300 is a good value")
    for key in ("elasticsearch_image", "kibana_image"):
        if ":" not in logging[key].rsplit("/", 1)[-1]:
            yield Problem(shown, f"logging.{key}", f"{logging[key]!r} names no version tag",
                          "pin a version, e.g. elasticsearch:8.15.3")
    tags = {key: logging[key].rsplit("/", 1)[-1].partition(":")[2]
            for key in ("elasticsearch_image", "kibana_image")}
    if logging.kibana and all(tags.values()) and len(set(tags.values())) > 1:
        yield Problem(shown, "logging.kibana_image",
                      f"Kibana {tags['kibana_image']} with Elasticsearch "
                      f"{tags['elasticsearch_image']}: Kibana refuses to start against another "
                      f"version of Elasticsearch", "use the same version tag for both images")


def extra_rules_path(inventory: Inventory) -> Path:
    """The operator's own rule file: absolute, or relative to the inventory file."""
    path = Path(inventory.settings.monitor.extra_rules).expanduser()
    return path if path.is_absolute() else inventory.file.parent / path


def weaviate_version(inventory: Inventory) -> str:
    """The Weaviate version in use: the inventory's, else the one in the profile's image."""
    chosen = inventory.settings.vector.weaviate_version
    return chosen or inventory.profile.images["weaviate"].rsplit(":", 1)[-1]


def index_of(inventory: Inventory, name: str) -> int:
    """The position of a host in the inventory's host list (for key paths in messages)."""
    return next(i for i, host in enumerate(inventory.hosts) if host.name == name)


RULES: tuple[Rule, ...] = (image_overrides, trusted_proxies, role_presence, websocket_port,
                           queue_coverage, broker_not_on_cluster, redis_lists_ipv4, dev_release,
                           vector_store, shared_storage, connection_budget, tls_settings,
                           monitor_settings, netplan.check, logging_settings)
