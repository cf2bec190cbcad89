"""The network plan: which roles listen on which ports, and which roles may connect to them.

One table serves the preflight (ports that must be free, peers that must be reachable) and the
host firewall (what each host accepts, from whom). It follows the original plan's port plan
(80/443 public; 3000, 5001, 5432, 6379, 8080 internal) and completes it with what a Dify
installation really uses: the plugin daemon, Sentinel, Weaviate's gRPC and cluster ports, the
exporters Prometheus scrapes, SSH from the management range.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from tasks.core import placement
from tasks.core.errors import DifyopsError, Problem
from tasks.core.inventory import ROLES, Host, Inventory

# Pseudo-roles for clients that are not inventory hosts.
PUBLIC = "@public"          # anyone: the load balancer's HTTP(S)
MANAGEMENT = "@management"  # net.management (anywhere when empty)
EVERY_HOST = "@hosts"       # every host of the inventory (log shippers)
DEV_NETWORK = "@dev"        # dev.network, the home-lab network
# Roles whose processes talk to PostgreSQL and Redis.
DATA_CLIENTS = ("api", "worker", "beat", "plugin_daemon", "dev_backend")
# Roles whose services run under Docker compose (Docker and compose v2 must be there).
COMPOSE_ROLES = ("api", "worker", "beat", "web", "plugin_daemon", "agent", "vector", "monitor",
                 "logging")
# Processes that publish a compose service's port on the host.
DOCKER = ("docker-proxy", "dockerd")


@dataclass(frozen=True)
class Service:
    """A port some roles listen on and the roles (or pseudo-roles) allowed to connect to it."""

    name: str
    port: int
    servers: tuple[str, ...]
    clients: tuple[str, ...]
    owners: tuple[str, ...] = ()   # process names that hold the port when it is ours
    published: bool = False        # published by Docker: reached through DNAT (forward path)
    udp: bool = False              # also UDP on the same port (Weaviate's gossip)

    def owned_by(self, process: str) -> bool:
        """Whether a listening process (as `ss` names it, 15 characters at most) is ours."""
        return any(process == owner[:15] for owner in self.owners)


def services(inventory: Inventory) -> list[Service]:
    """Every service of the plan for this inventory's settings."""
    settings = inventory.settings
    db, cache = settings.db, settings.cache
    weaviate = settings.vector.store == "weaviate"
    plan = [
        Service("http", 80, ("lb",), (PUBLIC,), ("nginx",)),
        Service("https", 443, ("lb",), (PUBLIC,), ("nginx",)),
        Service("web", 3000, ("web",), ("lb",), DOCKER, published=True),
        # The api's inner API: from the plugin daemon and the agent backend.
        Service("api", 5001, ("api",), ("lb", "plugin_daemon", placement.AGENT_ROLE), DOCKER,
                published=True),
        Service("plugin daemon", 5002, ("plugin_daemon",),
                ("lb", "api", "worker", placement.AGENT_ROLE), DOCKER, published=True),
        Service("postgresql", db.port, ("db_primary", "db_replica"),
                (*DATA_CLIENTS, "monitor", "db_primary", "db_replica"), ("postgres",)),
        Service("redis", cache.port, ("cache", "broker"),
                (*DATA_CLIENTS, placement.AGENT_ROLE, "cache"),
                ("redis-server", "redis-check-rdb")),
    ]
    if placement.websocket_enabled(inventory):
        plan.append(Service("api websocket", settings.app.websocket_port, ("api",), ("lb",),
                            DOCKER, published=True))
    if placement.agent_enabled(inventory):
        plan.append(Service("agent backend", placement.AGENT_PORT, (placement.AGENT_ROLE,),
                            ("api", "worker"), DOCKER, published=True))
    if cache.mode == "sentinel":
        plan.append(Service("redis sentinel", cache.sentinel_port, ("cache",),
                            (*DATA_CLIENTS, "cache"),
                            ("redis-sentinel", "redis-server", "redis-check-rdb")))
    if cache.mode == "cluster":
        plan.append(Service("redis cluster bus", cache.port + 10000, ("cache",), ("cache",),
                            ("redis-server",)))
    if weaviate:
        owners = ("weaviate", *DOCKER)
        plan += [
            Service("weaviate", 8080, ("vector",), ("api", "worker", "dev_backend"), owners),
            Service("weaviate grpc", 50051, ("vector",), ("api", "worker", "dev_backend"), owners),
        ]
        if len(inventory.with_role("vector")) > 1:
            plan += [Service("weaviate gossip", 7100, ("vector",), ("vector",), owners, udp=True),
                     Service("weaviate data", 7101, ("vector",), ("vector",), owners),
                     Service("weaviate raft", 8300, ("vector",), ("vector",), owners),
                     Service("weaviate raft rpc", 8301, ("vector",), ("vector",), owners)]
    every_role = tuple(ROLES)
    plan += [
        Service("node exporter", 9100, every_role, ("monitor",),
                ("prometheus-node-exporter", "node_exporter")),
        Service("postgres exporter", 9187, ("db_primary", "db_replica"), ("monitor",),
                ("prometheus-postgres-exporter", "postgres_exporter")),
        Service("redis exporter", 9121, ("cache", "broker"), ("monitor",),
                ("prometheus-redis-exporter", "redis_exporter")),
        Service("nginx exporter", 9113, ("lb",), ("monitor",),
                ("prometheus-nginx-exporter", "nginx-prometheus-exporter")),
        Service("prometheus", 9090, ("monitor",), (MANAGEMENT,), ("prometheus", *DOCKER),
                published=True),
        Service("alertmanager", 9093, ("monitor",), (MANAGEMENT,),
                ("prometheus-alertmanager", "alertmanager", *DOCKER), published=True),
        Service("grafana", settings.monitor.grafana_port, ("monitor",), (MANAGEMENT,),
                ("grafana", "grafana-server", *DOCKER), published=True),
        Service("elasticsearch", settings.logging.es_port, ("logging",), (EVERY_HOST,),
                ("java", *DOCKER), published=True),
        Service("kibana", settings.logging.kibana_port, ("logging",), (MANAGEMENT,),
                ("node", *DOCKER), published=True),
        Service("dify api (dev)", 5001, ("dev_backend",), ("dev_frontend", DEV_NETWORK),
                ("python", "python3", "flask", "gunicorn", "uv")),
        Service("dify web (dev)", 3000, ("dev_frontend",), (DEV_NETWORK,),
                ("node", "next-server", "pnpm")),
    ]
    return plan


def runs_compose(inventory: Inventory, host: Host) -> bool:
    """Whether a tier runs Docker compose projects on this host."""
    roles = [role for role in COMPOSE_ROLES
             if (role != "vector" or inventory.settings.vector.store == "weaviate")
             and (role != "monitor" or inventory.settings.monitor.grafana)]
    return host.has(*roles)


def served(inventory: Inventory, host: Host) -> list[Service]:
    """The services a host listens on, by its roles."""
    return [service for service in services(inventory) if host.has(*service.servers)]


def clients(inventory: Inventory, host: Host, service: Service) -> list[Host]:
    """The other hosts allowed to reach a service on this host."""
    roles = [role for role in service.clients if not role.startswith("@")]
    every = EVERY_HOST in service.clients
    return [peer for peer in inventory.hosts
            if peer.name != host.name and (every or peer.has(*roles))]


def needed_peers(inventory: Inventory, host: Host) -> list[tuple[Host, Service]]:
    """What this host connects to: (peer, service) for every service its roles are a client of."""
    found = []
    for service in services(inventory):
        every = EVERY_HOST in service.clients
        if not (every or host.has(*service.clients)):
            continue
        for peer in inventory.with_role(*service.servers):
            if peer.name != host.name:
                found.append((peer, service))
    return found


def resolve(address: str) -> list[str]:
    """The IP addresses behind an inventory address (itself when it is one)."""
    try:
        return [str(ipaddress.ip_address(address))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise DifyopsError(f"cannot resolve {address}: {exc}; fix DNS (or /etc/hosts) or "
                           f"give IP addresses in the inventory") from exc
    return sorted({str(info[4][0]) for info in infos})


# Settings that are ports: never two services on one port of one host.
PORT_SETTINGS = ("db.port", "cache.port", "cache.sentinel_port", "app.websocket_port",
                 "monitor.grafana_port", "logging.es_port", "logging.kibana_port")


def port_collisions(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """Two services of the plan on one port of one host (each port is typed !port)."""
    plan = services(inventory)
    for index, host in enumerate(inventory.hosts):
        taken: dict[int, str] = {}
        for service in plan:
            if not host.has(*service.servers):
                continue
            other = taken.setdefault(service.port, service.name)
            if other != service.name:
                yield Problem(shown, f"hosts[{index}]",
                              f"{other} and {service.name} both listen on port {service.port} "
                              f"on {host.name}",
                              "change one of the port settings (" + ", ".join(PORT_SETTINGS)
                              + "), or put the roles on different hosts")


def address_blocks(entries: list, key: str, shown: str, example: str) -> Iterator[Problem]:
    """Each entry of an inventory list of addresses is an address or a CIDR block."""
    for index, entry in enumerate(entries):
        try:
            ipaddress.ip_network(entry if isinstance(entry, str) else None, strict=False)
        except (TypeError, ValueError):
            yield Problem(shown, f"{key}[{index}]", f"{entry!r} is not an address or a CIDR block",
                          f"write addresses or networks, e.g. `{example}`")


def firewall_on(inventory: Inventory) -> bool:
    """Whether deploy.all applies the host firewall: net.firewall on, or auto with more than
    one host."""
    mode = inventory.settings.net.firewall
    return mode == "on" or (mode == "auto" and len(inventory.hosts) > 1)


def exposed(inventory: Inventory) -> list[str]:
    """What a host firewall would keep from strangers: `service port (hosts)` for every
    service of the plan that only some clients may reach."""
    found = []
    for service in services(inventory):
        hosts = [host.name for host in inventory.with_role(*service.servers)]
        if hosts and PUBLIC not in service.clients:
            found.append(f"{service.name} {service.port} ({', '.join(hosts)})")
    return found


def firewall_mode(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """While the firewall is on, net.management says who may manage."""
    net = inventory.settings.net
    if firewall_on(inventory) and not net.management:
        why = ("net.firewall: auto and more than one host" if net.firewall == "auto"
               else "net.firewall: on")
        yield Problem(shown, "net.management",
                      f"empty while the host firewall is on ({why}): nobody could be allowed to "
                      f"SSH to the hosts or open the monitoring UIs",
                      "list the addresses or networks operators work from, e.g. `management: "
                      "[10.0.4.0/24]`; or set `firewall: \"off\"` under net, which leaves every "
                      "port of every host open to whoever reaches it")


def check(inventory: Inventory, shown: str) -> Iterator[Problem]:
    """Rule: the network and preflight settings make sense."""
    yield from port_collisions(inventory, shown)
    net, preflight = inventory.settings.net, inventory.settings.preflight
    yield from address_blocks(net.management, "net.management", shown,
                              "management: [10.0.4.0/24]")
    yield from firewall_mode(inventory, shown)
    if not 10 <= net.rollback_seconds <= 3600:
        yield Problem(shown, "net.rollback_seconds",
                      f"{net.rollback_seconds} is outside 10..3600",
                      "give the confirmation time to happen: 60 is a good value")
    if not 1 <= preflight.refuse_percent <= 100:
        yield Problem(shown, "preflight.refuse_percent",
                      f"{preflight.refuse_percent} is outside 1..100",
                      "50 refuses a host with less than half the planned size")
    for role, size in preflight.sizes.items():
        for key, value in size.items():
            if value < 0:
                yield Problem(shown, f"preflight.sizes.{role}.{key}", f"negative ({value})",
                              "use 0 (no minimum) or a positive number")
