"""PostgreSQL operations beyond a deploy: status, promote, failover, fence.

The inventory stays the source of truth for which host is the primary. A failover changes the
servers and then prints the exact edit of the inventory file (one role swapped on two hosts);
until the edit is made, `db.deploy` refuses to touch a fenced old primary or a promoted standby
(the guard in tasks/tiers/db.py), so nothing undoes the failover by accident.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tasks.core import shell
from tasks.core.apply import execute
from tasks.core.errors import DifyopsError, HostError
from tasks.core.fleet import each_host, table
from tasks.core.gates import poll, wait
from tasks.core.hosts import Machine, connect
from tasks.core.inventory import Host, Inventory
from tasks.core.project import display
from tasks.core.report import Report
from tasks.tiers.db import FENCE, HELPER, TIER, conf_dir, psql, slot_name, unit, writable_gate

Out = Callable[[str], None]


@dataclass
class Standby:
    """Row of pg_stat_replication on a primary: one connected standby."""

    name: str
    address: str
    state: str
    lag_bytes: int
    lag_seconds: float


@dataclass
class Slot:
    """Row of pg_replication_slots on a primary."""

    name: str
    active: bool
    wal_status: str
    retained_bytes: int


@dataclass
class Node:
    """What one db host's PostgreSQL answered."""

    host: Host
    error: str = ""                 # unreachable, or a command failed
    deployed: bool = True           # False: no cluster of db.version on the host (never deployed)
    running: bool = False
    fenced: str = ""                # the fence note, when db.failover or db.fence stopped it
    in_recovery: bool = False
    timeline: str = ""
    lsn: int = 0                    # primary: current WAL position; standby: received
    replay_lsn: int = 0
    receiver: str = ""              # standby: WAL receiver status (streaming, ...)
    upstream: str = ""              # standby: the address it streams from
    standbys: list[Standby] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)

    @property
    def is_primary(self) -> bool:
        """A running server that accepts writes."""
        return self.running and not self.in_recovery

    @property
    def state(self) -> str:
        """One word for the table."""
        if self.error:
            return "unreachable"
        if not self.deployed:
            return "not deployed"
        if self.fenced:
            return "fenced"
        if not self.running:
            return "stopped"
        return "standby" if self.in_recovery else "primary"


def lsn(text: str) -> int:
    """A WAL position X/Y as a number (0 when empty)."""
    if not text or "/" not in text:
        return 0
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def rows(machine: Machine, inventory: Inventory, sql: str) -> list[list[str]]:
    """The rows a query returns (split on |); a failure raises HostError naming the host."""
    result = machine.check(psql(inventory, sql))
    return [line.split("|") for line in result.stdout.splitlines() if line.strip()]


def probe(inventory: Inventory) -> Callable[[Machine], Node]:
    """A function that reads one host's replication state (read-only)."""

    def read(machine: Machine) -> Node:
        node = Node(machine.host)
        node.fenced = machine.run(f"cat {FENCE} 2>/dev/null").stdout.strip()
        node.deployed = bool(node.fenced) or machine.probe(f"test -d {conf_dir(inventory)}")
        if not node.deployed:
            return node
        node.running = machine.run(f"systemctl is-active --quiet {unit(inventory)}").ok and \
            machine.run(f"pg_isready -q -p {inventory.settings.db.port}").ok
        if not node.running:
            return node
        (recovery,), = rows(machine, inventory, "SELECT pg_is_in_recovery()")
        node.in_recovery = recovery == "t"
        if node.in_recovery:
            found = rows(machine, inventory,
                         "SELECT coalesce(pg_last_wal_receive_lsn()::text, ''), "
                         "coalesce(pg_last_wal_replay_lsn()::text, ''), "
                         "coalesce((SELECT status || '|' || coalesce(sender_host, '') "
                         "FROM pg_stat_wal_receiver), '|'), coalesce((SELECT received_tli "
                         "FROM pg_stat_wal_receiver), (SELECT timeline_id "
                         "FROM pg_control_checkpoint()))")
            received, replayed, node.receiver, node.upstream, node.timeline = found[0]
            node.lsn, node.replay_lsn = lsn(received), lsn(replayed)
            return node
        (current, timeline), = rows(machine, inventory,
                                    "SELECT pg_current_wal_lsn(), "
                                    "substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
        node.lsn = node.replay_lsn = lsn(current)
        node.timeline = str(int(timeline, 16))
        node.standbys = [
            Standby(name, address, state, int(float(lag or 0)), float(seconds or 0))
            for name, address, state, lag, seconds in rows(
                machine, inventory,
                "SELECT application_name, coalesce(host(client_addr), ''), state, "
                "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint, "
                "coalesce(extract(epoch FROM replay_lag), 0) FROM pg_stat_replication")]
        node.slots = [
            Slot(name, active == "t", status, int(float(retained or 0)))
            for name, active, status, retained in rows(
                machine, inventory,
                "SELECT slot_name, active, coalesce(wal_status, ''), "
                "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint "
                "FROM pg_replication_slots WHERE slot_type = 'physical'")]
        return node

    return read


def survey(inventory: Inventory) -> list[Node]:
    """Every db host's state, in inventory order (unreachable hosts carry their error)."""
    hosts = inventory.with_role("db_primary", "db_replica")
    outcomes = each_host(hosts, probe(inventory), inventory.settings.timeouts)
    return [outcome.value if outcome.ok else Node(outcome.host, error=outcome.error)
            for outcome in outcomes]


def problems(inventory: Inventory, nodes: list[Node]) -> list[str]:
    """Everything wrong with replication as the inventory describes it."""
    found: list[str] = []
    named = inventory.with_role("db_primary")[0]
    primaries = [node for node in nodes if node.is_primary]
    if not any(node.deployed or node.error for node in nodes):
        return ["nothing deployed on the db hosts yet: run `inv deploy.all` (or `inv db.deploy`)"]
    for node in nodes:
        if node.error:
            found.append(f"{node.host.name}: {node.error}")
        elif not node.deployed:
            found.append(f"{node.host.name}: nothing deployed on this host yet: run "
                         f"`inv db.deploy`")
        elif node.fenced:
            fix = ("give db_primary to the new primary in the inventory"
                   if node.host.has("db_primary")
                   else "run `inv db.deploy` to rebuild it as a standby")
            found.append(f"{node.host.name}: fenced ({node.fenced}); {fix}")
        elif not node.running:
            found.append(f"{node.host.name}: PostgreSQL is not running")
    if not primaries:
        found.append("no primary accepts writes: promote a standby with `inv db.failover`")
    elif len(primaries) > 1:
        found.append(f"{len(primaries)} primaries ({', '.join(n.host.name for n in primaries)}): "
                     f"fence the one the application does not use with `inv db.fence --host H`")
    elif primaries[0].host.name != named.name:
        found.append(f"the primary is {primaries[0].host.name} but the inventory names "
                     f"{named.name}: make {primaries[0].host.name} db_primary in "
                     f"{display(inventory.file)} (see `inv db.failover`)")
    if len(primaries) != 1:
        return found
    primary = primaries[0]
    limit = inventory.settings.db.max_lag_bytes
    for node in nodes:
        if node is primary or not node.running or not node.in_recovery:
            continue
        if node.receiver != "streaming":
            found.append(f"{node.host.name}: not streaming ({node.receiver or 'no WAL receiver'})")
        elif node.upstream != primary.host.address:
            found.append(f"{node.host.name}: streams from {node.upstream}, not from the primary "
                         f"{primary.host.name} ({primary.host.address})")
        elif primary.lsn - node.replay_lsn > limit:
            found.append(f"{node.host.name}: replays {primary.lsn - node.replay_lsn} bytes behind "
                         f"{primary.host.name} (more than db.max_lag_bytes {limit})")
    slots = {slot.name: slot for slot in primary.slots}
    for host in inventory.with_role("db_replica"):
        if host.name == primary.host.name:
            continue
        slot = slots.get(slot_name(host))
        if slot is None:
            found.append(f"{primary.host.name}: no replication slot {slot_name(host)} for "
                         f"{host.name}: run `inv db.deploy`")
        elif not slot.active:
            found.append(f"{primary.host.name}: slot {slot.name} of {host.name} is not in use and "
                         f"holds {slot.retained_bytes} bytes of WAL")
        if slot is not None and slot.wal_status == "lost":
            found.append(f"{primary.host.name}: slot {slot.name} lost WAL {host.name} needs: "
                         f"rebuild it (`inv db.fence --host {host.name}`, then `inv db.deploy`)")
    return found


def status_table(inventory: Inventory, nodes: list[Node]) -> str:
    """One line per host: role, state, timeline, upstream, lag, slot."""
    primary = next((node for node in nodes if node.is_primary), None)
    by_name = {standby.name: standby for standby in primary.standbys} if primary else {}
    slots = {slot.name: slot for slot in primary.slots} if primary else {}
    lines = []
    for node in nodes:
        role = "db_primary" if node.host.has("db_primary") else "db_replica"
        lag_bytes = lag_seconds = slot_text = replication = "-"
        if node.in_recovery and node.running:
            replication = f"{node.receiver or 'no receiver'} from {node.upstream or '?'}"
            if primary:
                lag_bytes = str(max(primary.lsn - node.replay_lsn, 0))
                standby = by_name.get(node.host.name)
                lag_seconds = f"{standby.lag_seconds:.1f}" if standby else "?"
        elif node.is_primary:
            replication = f"{len(node.standbys)} standby(s) streaming"
        if primary and node is not primary:
            slot = slots.get(slot_name(node.host))
            slot_text = (f"{slot.name} {'active' if slot.active else 'inactive'} "
                         f"{slot.wal_status}" if slot else "missing")
        lines.append([node.host.name, role, node.state, node.timeline or "-", replication,
                      lag_bytes, lag_seconds, slot_text])
    return table(["host", "inventory", "state", "timeline", "replication", "lag bytes", "lag s",
                  "slot"], lines)


def status(inventory: Inventory, out: Out = print) -> None:
    """Print the table; raise when anything is wrong (the caller exits non-zero)."""
    nodes = survey(inventory)
    out(status_table(inventory, nodes))
    found = problems(inventory, nodes)
    if found:
        raise DifyopsError("replication is not healthy:\n" + "\n".join(f"- {p}" for p in found))
    out("replication healthy: one primary, every standby streaming from it")


def with_machine(host: Host, inventory: Inventory, action: Callable[[Machine], object]) -> object:
    """Run an action on one host's connection, closing it afterwards."""
    machine = connect(host, inventory.settings.timeouts)
    try:
        return action(machine)
    finally:
        machine.close()


def promote_node(inventory: Inventory, node: Node, out: Out) -> None:
    """Promote a standby and wait until it accepts writes (already a primary: nothing to do)."""
    name = node.host.name
    if node.error or not node.running:
        raise HostError(f"cannot promote {name}: {node.error or 'PostgreSQL is not running'}")
    timeout = inventory.settings.db.promote_timeout

    def promote(machine: Machine) -> str:
        if node.in_recovery:
            machine.check(psql(inventory, f"SELECT pg_promote(true, {timeout})"))
        return wait(writable_gate(inventory), machine)

    started = time.monotonic()
    with_machine(node.host, inventory, promote)
    done = "promoted" if node.in_recovery else "was already a primary"
    out(f"{name} {done}: accepts writes ({time.monotonic() - started:.1f} s)")


def promote(inventory: Inventory, name: str, out: Out = print) -> None:
    """db.promote: promote one standby, refusing while another primary still accepts writes."""
    target = inventory.host(name)
    if not target.has("db_primary", "db_replica"):
        raise DifyopsError(f"{name} is not a db host of {display(inventory.file)}")
    nodes = survey(inventory)
    node = next(n for n in nodes if n.host.name == name)
    others = [n for n in nodes if n.is_primary and n.host.name != name]
    if others:
        raise DifyopsError(
            f"{others[0].host.name} still accepts writes: promoting {name} would make two "
            f"primaries. Use `inv db.failover --host {name}` (it stops and fences "
            f"{others[0].host.name} first), or stop {others[0].host.name}'s PostgreSQL")
    promote_node(inventory, node, out)
    old = inventory.with_role("db_primary")[0]
    if old.name != name:
        out(f"next: `inv db.failover --host {name}` fences {old.name} (so it cannot come back as "
            f"a second primary), re-points the other standbys to {name} and prints the "
            f"inventory edit")


def swapped(inventory: Inventory, new_primary: str) -> Inventory:
    """The inventory with db_primary moved to another db host (the old primary a replica)."""
    def roles(host: Host) -> tuple[str, ...]:
        if host.name == new_primary:
            return tuple("db_primary" if r == "db_replica" else r for r in host.roles)
        return tuple("db_replica" if r == "db_primary" else r for r in host.roles)

    hosts = [dataclasses.replace(host, roles=roles(host)) if host.has("db_primary", "db_replica")
             else host for host in inventory.hosts]
    return dataclasses.replace(inventory, hosts=hosts)


def role_edit(text: str, host: str, old: str, new: str) -> str | None:
    """The inventory text with one role of one host replaced; None when it cannot be found."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines)
                  if re.search(rf"(^|[\s{{,])name:\s*['\"]?{re.escape(host)}['\"]?\s*([,}}]|$)",
                               line.rstrip("\n"))), None)
    if start is None:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip(" -"))
    for index in range(start, len(lines)):
        line = lines[index]
        if index > start and (line.lstrip().startswith("- ") and
                              len(line) - len(line.lstrip(" ")) < indent):
            return None  # the next host's entry
        if index > start and re.match(r"\s*-?\s*name:", line):
            return None
        changed = re.sub(rf"(?<![\w-]){re.escape(old)}(?![\w-])", new, line, count=1)
        if changed != line:
            lines[index] = changed
            return "".join(lines)
    return None


def inventory_edit(inventory: Inventory, old: str, new: str) -> str:
    """The exact edit of the inventory file that records the new primary, as a unified diff."""
    path = inventory.file
    text = path.read_text()
    edited = role_edit(text, old, "db_primary", "db_replica")
    edited = role_edit(edited, new, "db_replica", "db_primary") if edited else None
    if edited is None:
        return (f"in {display(path)}: give host {new} the role db_primary instead of "
                f"db_replica, and host {old} the role db_replica instead of db_primary")
    diff = difflib.unified_diff(text.splitlines(keepends=True), edited.splitlines(keepends=True),
                                display(path), display(path))
    return "".join(diff).rstrip("\n")


def fence_node(inventory: Inventory, host: Host, reason: str) -> None:
    """Stop a host's PostgreSQL for good: masked unit, standby.signal, a note for the guard."""
    with_machine(host, inventory,
                 lambda machine: machine.check(f"{HELPER} fence {shell.quote(reason)}"))


def stamp() -> str:
    """Now, for fence notes."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def fence(inventory: Inventory, name: str, out: Out = print) -> None:
    """db.fence: stop one host's PostgreSQL so it cannot act as a primary; refuse the last one."""
    host = inventory.host(name)
    if not host.has("db_primary", "db_replica"):
        raise DifyopsError(f"{name} is not a db host of {display(inventory.file)}")
    nodes = survey(inventory)
    node = next(n for n in nodes if n.host.name == name)
    if node.is_primary and not any(n.is_primary for n in nodes if n is not node):
        raise DifyopsError(f"{name} is the only primary: fencing it stops every write. Promote a "
                           f"standby first (`inv db.failover`)")
    fence_node(inventory, host, f"fenced by db.fence at {stamp()}")
    out(f"{name}: PostgreSQL stopped and masked, standby.signal in place; it cannot come back "
        f"as a primary. To make it a standby again: give it the role db_replica in the inventory "
        f"and run `inv db.deploy` (it is rebuilt with pg_basebackup; its old data directory is "
        f"kept beside the new one)")


def catch_up(inventory: Inventory, nodes: list[Node], final: int, deadline: float) -> None:
    """Wait until the standbys received WAL up to the old primary's shutdown checkpoint."""

    def received() -> tuple[bool, None]:
        nodes[:] = survey(inventory)
        return all(n.lsn > final for n in nodes if n.running and n.in_recovery), None

    poll(received, max(deadline - time.monotonic(), 0), 0.5)


def choose(inventory: Inventory, nodes: list[Node], wanted: str | None) -> Node:
    """The standby to promote: the one asked for, a primary already promoted, or the freshest."""
    old = inventory.with_role("db_primary")[0].name
    if wanted:
        host = inventory.host(wanted)
        if not host.has("db_replica"):
            raise DifyopsError(f"{wanted} is not a db_replica of {display(inventory.file)}")
        return next(n for n in nodes if n.host.name == wanted)
    promoted = [n for n in nodes if n.is_primary and n.host.name != old]
    if promoted:
        return promoted[0]
    candidates = [n for n in nodes if n.running and n.in_recovery and n.host.has("db_replica")]
    if not candidates:
        raise DifyopsError("no running standby to promote: " + "; ".join(
            f"{n.host.name} {n.error or n.state}" for n in nodes if n.host.name != old))
    return max(candidates, key=lambda n: (n.lsn, n.replay_lsn))


def failover(inventory: Inventory, wanted: str | None = None, out: Out = print,
             report: Report | None = None) -> Inventory:
    """db.failover: fence the old primary, promote a standby, re-point the others.

    Returns the inventory as it should now read (the caller may deploy other tiers with it).
    """
    old = inventory.with_role("db_primary")[0]
    if wanted == old.name:
        raise DifyopsError(f"{wanted} is the primary already named by the inventory")
    nodes = survey(inventory)
    old_node = next(n for n in nodes if n.host.name == old.name)
    target = promotable(choose(inventory, nodes, wanted))   # before anything is stopped
    final = 0
    if old_node.error:
        out(f"warning: {old.name} does not answer ({old_node.error}); it cannot be fenced now")
    elif old_node.is_primary:
        out(f"{old.name} still accepts writes: stopping it first, so that its last WAL reaches "
            f"the standbys")
        final = with_machine(old, inventory, lambda m: stop_and_checkpoint(inventory, m))
        catch_up(inventory, nodes, final, time.monotonic() + 30)
        target = promotable(choose(inventory, nodes, wanted))
    if final and target.in_recovery and target.lsn <= final:
        out(f"warning: {target.host.name} did not receive all of {old.name}'s WAL before "
            f"promotion; the last transactions may be missing")
    if not old_node.error and not old_node.fenced:
        fence_node(inventory, old, f"fenced by db.failover at {stamp()}; the primary is now "
                                   f"{target.host.name} ({target.host.address})")
        out(f"{old.name}: fenced (stopped, masked, standby.signal): it cannot come back as a "
            f"second primary")
    promote_node(inventory, target, out)
    after = swapped(inventory, target.host.name)
    plan = TIER.plan(after)
    plan.hosts = [host_plan for host_plan in plan.hosts if host_plan.host.name != old.name]
    out(f"re-pointing the standbys to {target.host.name}:")
    result = execute([plan], report=report or Report(), timeouts=inventory.settings.timeouts)
    app_hosts = [h.name for h in inventory.with_role("api", "worker", "beat", "plugin_daemon")]
    out(f"\nthe inventory must now say so; edit {display(inventory.file)}:\n"
        + inventory_edit(inventory, old.name, target.host.name))
    out("until then `inv db.deploy` refuses to run: its hosts do not match their roles.")
    if app_hosts:
        out(f"then `inv app.deploy` renders DB_HOST={target.host.address} into the environment "
            f"of {', '.join(app_hosts)} and restarts their services")
    out(f"{old.name} stays stopped. The next `inv db.deploy` (after the edit) rebuilds it as a "
        f"standby of {target.host.name} with pg_basebackup; its old data directory is kept.")
    if old_node.error:
        out(f"{old.name} was not reachable: if it boots, its PostgreSQL starts as a primary. As "
            f"soon as it answers, run `inv db.fence --host {old.name}` before anything else.")
    if result.failed:
        raise DifyopsError(f"{target.host.name} accepts writes, but {len(result.failed)} step(s) "
                           f"re-pointing the standbys failed (see above); after the inventory "
                           f"edit, run `inv db.deploy` to finish")
    return after


def promotable(node: Node) -> Node:
    """The node, when it can be promoted now; else an error saying nothing was changed."""
    if node.error or not node.running:
        raise HostError(f"cannot promote {node.host.name}: "
                        f"{node.error or 'PostgreSQL is not running'}; nothing was fenced")
    return node


def stop_and_checkpoint(inventory: Inventory, machine: Machine) -> int:
    """Stop a primary cleanly; return its shutdown checkpoint's WAL position."""
    version = inventory.settings.db.version
    machine.check(f"systemctl stop {unit(inventory)}")
    result = machine.check(f"/usr/lib/postgresql/{version}/bin/pg_controldata "
                           f"/var/lib/postgresql/{version}/main")
    match = re.search(r"^Latest checkpoint location:\s*(\S+)", result.stdout, re.M)
    return lsn(match.group(1)) if match else 0

