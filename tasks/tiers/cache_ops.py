"""Redis operations beyond a deploy: the status of every node, Sentinel and cluster.

Sentinel fails over by itself; `cache.status` says what each node and each Sentinel sees and
exits non-zero when there is no master, more than one, or the Sentinels disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tasks.core.errors import DifyopsError
from tasks.core.fleet import each_host, table
from tasks.core.hosts import Machine
from tasks.core.inventory import Inventory
from tasks.tiers.cache import cli as redis_cli
from tasks.tiers.cache import cluster_ports, quorum

Out = Callable[[str], None]


def info(text: str) -> dict[str, str]:
    """`key:value` lines of INFO (or CLUSTER INFO) as a mapping."""
    pairs = (line.strip().split(":", 1) for line in text.splitlines() if ":" in line
             and not line.startswith("#"))
    return {key: value for key, value in pairs}


def pairs(text: str) -> dict[str, str]:
    """Alternating key / value lines (SENTINEL MASTER) as a mapping."""
    lines = [line.strip() for line in text.splitlines()]
    return dict(zip(lines[0::2], lines[1::2], strict=False))


@dataclass
class RedisNode:
    """One Redis process as it answered (and, in sentinel mode, its host's Sentinel)."""

    host: str
    address: str
    port: int
    error: str = ""
    replication: dict[str, str] = field(default_factory=dict)
    cluster: dict[str, str] = field(default_factory=dict)
    sentinel_master: str = ""       # the master address this host's Sentinel gives clients
    sentinel: dict[str, str] = field(default_factory=dict)
    ckquorum: str = ""

    @property
    def role(self) -> str:
        """master or replica (Redis says slave)."""
        role = self.replication.get("role", "")
        return "replica" if role == "slave" else role

    @property
    def offset(self) -> int:
        """The replication offset this node has reached."""
        key = "slave_repl_offset" if self.role == "replica" else "master_repl_offset"
        return int(self.replication.get(key, "0") or 0)


def probe(inventory: Inventory) -> Callable[[Machine], list[RedisNode]]:
    """A function that reads every Redis process of one host (read-only)."""
    cache = inventory.settings.cache
    mode = cache.mode

    def cli(machine: Machine, port: int, command: str, sentinel: bool = False) -> str:
        result = machine.run(f"{redis_cli(inventory, machine.host, sentinel)} -p {port} "
                             f"{command}")
        if not result.ok:
            raise DifyopsError(result.answer)
        return result.stdout

    def read(machine: Machine) -> list[RedisNode]:
        host = machine.host
        clustered = mode == "cluster" and host.has("cache")
        ports = cluster_ports(inventory) if clustered else [cache.port]
        nodes = []
        for port in ports:
            node = RedisNode(host.name, host.address, port)
            try:
                node.replication = info(cli(machine, port, "info replication"))
                if clustered:
                    node.cluster = info(cli(machine, port, "cluster info"))
            except DifyopsError as exc:
                node.error = str(exc)
            nodes.append(node)
        if mode == "sentinel" and host.has("cache"):
            node, port, name = nodes[0], cache.sentinel_port, cache.master_name
            try:
                def ask(command: str) -> str:
                    return cli(machine, port, f"sentinel {command} {name}", sentinel=True)

                node.sentinel_master = (ask("get-master-addr-by-name").split() or [""])[0]
                node.sentinel = pairs(ask("master"))
                node.ckquorum = ask("ckquorum").strip()
            except DifyopsError as exc:
                node.ckquorum = f"sentinel: {exc}"
        return nodes

    return read


def survey(inventory: Inventory) -> list[RedisNode]:
    """Every Redis process of the cache and broker hosts, in inventory order."""
    hosts = inventory.with_role("cache", "broker")
    nodes: list[RedisNode] = []
    for outcome in each_host(hosts, probe(inventory), inventory.settings.timeouts):
        if outcome.ok:
            nodes.extend(outcome.value or [])
        else:
            nodes.append(RedisNode(outcome.host.name, outcome.host.address,
                                   inventory.settings.cache.port, error=outcome.error))
    return nodes


def problems(inventory: Inventory, nodes: list[RedisNode]) -> list[str]:
    """Everything wrong with the cache as the inventory's mode describes it."""
    mode = inventory.settings.cache.mode
    found = [f"{n.host}:{n.port}: {n.error}" for n in nodes if n.error]
    cache_hosts = {host.name for host in inventory.with_role("cache")}
    if mode == "sentinel":
        found += sentinel_problems(inventory, [n for n in nodes if n.host in cache_hosts])
    elif mode == "cluster":
        found += cluster_problems(inventory, [n for n in nodes if n.host in cache_hosts])
    return found


def sentinel_problems(inventory: Inventory, nodes: list[RedisNode]) -> list[str]:
    """One master, every replica linked to it, every Sentinel naming it with a quorum."""
    found = []
    answered = [n for n in nodes if not n.error]
    masters = [n for n in answered if n.role == "master"]
    if not masters:
        found.append("no Redis node is a master")
    elif len(masters) > 1:
        found.append(f"{len(masters)} masters ({', '.join(n.host for n in masters)}): split "
                     f"brain; Sentinel converts the wrong ones back, check `cache.status` again")
    views = {n.host: n.sentinel_master for n in nodes}
    seen = {view for view in views.values() if view}
    for host, view in views.items():
        if not view:
            found.append(f"{host}: its Sentinel names no master for "
                         f"{inventory.settings.cache.master_name}")
    if len(seen) > 1:
        found.append("the Sentinels disagree on the master: " +
                     ", ".join(f"{host} sees {view}" for host, view in views.items() if view))
    if len(masters) == 1 and seen and seen != {masters[0].address}:
        found.append(f"the Sentinels name {', '.join(sorted(seen))} but the master is "
                     f"{masters[0].host} ({masters[0].address})")
    for node in answered:
        if node.role == "replica" and node.replication.get("master_link_status") != "up":
            found.append(f"{node.host}: replica with its link to "
                         f"{node.replication.get('master_host', '?')} down")
        if node.ckquorum and not node.ckquorum.startswith("OK"):
            found.append(f"{node.host}: {node.ckquorum}")
        others = node.sentinel.get("num-other-sentinels")
        if others is not None and int(others) != len(nodes) - 1:
            found.append(f"{node.host}: its Sentinel knows {others} other Sentinel(s), not "
                         f"{len(nodes) - 1}")
    return found


def cluster_problems(inventory: Inventory, nodes: list[RedisNode]) -> list[str]:
    """Every node in a healthy cluster that knows every other node and covers every slot."""
    found = []
    total = len(nodes)
    for node in nodes:
        if node.error:
            continue
        where = f"{node.host}:{node.port}"
        if node.cluster.get("cluster_state") != "ok":
            found.append(f"{where}: cluster_state:{node.cluster.get('cluster_state', '?')}")
        if node.cluster.get("cluster_slots_ok") != "16384":
            found.append(f"{where}: {node.cluster.get('cluster_slots_ok', '0')} of 16384 slots ok")
        if node.cluster.get("cluster_known_nodes") != str(total):
            found.append(f"{where}: knows {node.cluster.get('cluster_known_nodes', '?')} nodes, "
                         f"not {total}")
        if node.role == "replica" and node.replication.get("master_link_status") != "up":
            found.append(f"{where}: replica with its link to "
                         f"{node.replication.get('master_host', '?')} down")
    masters: dict[str, list[RedisNode]] = {}
    for node in nodes:
        masters.setdefault(node.host, [])
        if node.role == "master":
            masters[node.host].append(node)
    crowded = [host for host, here in masters.items() if len(here) > 1]
    empty = [host for host, here in masters.items() if not here]
    if crowded and empty:
        crowded_addresses = {n.address for n in nodes if n.host in crowded}
        spare = next((n for n in nodes if n.host in empty and n.role == "replica" and
                      n.replication.get("master_host") in crowded_addresses), None)
        move = (f"run CLUSTER FAILOVER on {spare.host}:{spare.port} to make it a master again"
                if spare else "move a master back with CLUSTER FAILOVER")
        found.append(f"{', '.join(crowded)} runs several masters while {', '.join(empty)} runs "
                     f"none: losing {crowded[0]} would lose more than one master; {move}")
    return found


def status_table(inventory: Inventory, nodes: list[RedisNode]) -> str:
    """One line per Redis process: role, master, link, offset and lag, what Sentinel sees."""
    masters = {(n.address, n.port): n for n in nodes if n.role == "master"}
    lines = []
    for node in nodes:
        master = link = lag = "-"
        if node.role == "replica":
            master = f"{node.replication.get('master_host')}:{node.replication.get('master_port')}"
            link = node.replication.get("master_link_status", "?")
            upstream = masters.get((node.replication.get("master_host", ""),
                                    int(node.replication.get("master_port", "0") or 0)))
            lag = str(max(upstream.offset - node.offset, 0)) if upstream else "?"
        elif node.role == "master":
            link = f"{node.replication.get('connected_slaves', '0')} replica(s)"
        extra = []
        if node.cluster:
            extra.append(f"cluster {node.cluster.get('cluster_state', '?')} "
                         f"{node.cluster.get('cluster_slots_ok', '?')} slots")
        if node.sentinel_master or node.ckquorum:
            extra.append(f"sentinel: master {node.sentinel_master or '?'}, "
                         f"{node.ckquorum.split('.')[0] if node.ckquorum else '?'}")
        lines.append([node.host, str(node.port), node.role or ("unreachable" if node.error
                                                               else "?"),
                      master, link, str(node.offset) if node.replication else "-", lag,
                      "; ".join(extra) or "-"])
    return table(["host", "port", "role", "master", "link", "offset", "lag bytes", "view"], lines)


def status(inventory: Inventory, out: Out = print) -> None:
    """Print the table; raise when anything is wrong (the caller exits non-zero)."""
    mode = inventory.settings.cache.mode
    nodes = survey(inventory)
    heading = f"mode {mode}"
    if mode == "sentinel":
        heading += (f", master name {inventory.settings.cache.master_name}, "
                    f"quorum {quorum(inventory)} of {len(inventory.with_role('cache'))}")
    out(heading)
    out(status_table(inventory, nodes))
    found = problems(inventory, nodes)
    if found:
        raise DifyopsError("the cache is not healthy:\n" + "\n".join(f"- {p}" for p in found))
    out("cache healthy")
