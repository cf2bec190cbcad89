"""net tier: the host firewall (nftables) planned from the roles, and optional SSH hardening.

Every host accepts only what the network plan (tasks/core/netplan.py) says: established traffic,
loopback, ICMP, SSH from the management range and the control machine, 80/443 on the load
balancers, and each internal port from the roles that use it. The rules live in one nftables
table of their own (`inet difyops`), so Docker's tables are left alone.

A change never locks the operator out: the host script keeps the previous rules aside, loads the
new ones and arms a rollback timer; a NEW SSH connection from this machine must then confirm
them, or the previous rules come back by themselves. The sshd hardening drop-in goes the same way
after `sshd -t` accepted it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from tasks.core import facts, netplan
from tasks.core.errors import DifyopsError, HostError
from tasks.core.gates import Gate
from tasks.core.hosts import Machine, connect
from tasks.core.inventory import ROLES, Host, Inventory
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.system import packages
from tasks.core.tiers import Tier

RULES = "/etc/difyops/firewall.nft"
SCRIPT = "/usr/local/sbin/difyops-net"
UNIT = "/etc/systemd/system/difyops-firewall.service"
SSHD_STAGED = "/etc/difyops/sshd-hardening.conf"
SSHD_DROPIN = "/etc/ssh/sshd_config.d/00-difyops-hardening.conf"
STATE = "/var/lib/difyops/net"
# A Windows workstation running the web front end from source gets no nftables rules.
FIREWALLED_ROLES = tuple(role for role in ROLES if role != "dev_frontend")
DOCKER_INTERFACES = ("docker0", "br-*")
# Roles whose compose services run on Docker bridge networks (Weaviate uses the host network).
BRIDGED_ROLES = ("api", "worker", "beat", "web", "plugin_daemon", "agent", "monitor", "logging")
CONFIRM_FIREWALL = "new SSH connection confirming the firewall"
CONFIRM_SSHD = "new key-based SSH login confirming the sshd hardening"
REFUSED = "the host refused the confirmation"


@dataclass(frozen=True)
class Sources:
    """Who may connect: anyone, or these addresses and networks (and local containers)."""

    anywhere: bool = False
    v4: tuple[str, ...] = ()
    v6: tuple[str, ...] = ()
    interfaces: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """Nobody may connect."""
        return not (self.anywhere or self.v4 or self.v6 or self.interfaces)


@dataclass
class Ruleset:
    """The rule lines of a host's input and forward chains, and the ports left closed."""

    input: list[str] = field(default_factory=list)
    forward: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)


def networks(entries: list[str]) -> tuple[list[str], list[str]]:
    """Addresses and CIDR blocks split into IPv4 and IPv6 (loopback left out: always allowed)."""
    v4, v6 = [], []
    for entry in entries:
        network = ipaddress.ip_network(entry, strict=False)
        if network.is_loopback:
            continue
        if isinstance(network, ipaddress.IPv6Network) and network.prefixlen == 128 and \
                network.network_address.ipv4_mapped:
            network = ipaddress.ip_network(network.network_address.ipv4_mapped)
        text = str(network.network_address) if network.num_addresses == 1 else str(network)
        (v4 if network.version == 4 else v6).append(text)
    return sorted(set(v4), key=sort_key), sorted(set(v6), key=sort_key)


def sort_key(text: str) -> tuple:
    """Addresses and networks in numeric order."""
    network = ipaddress.ip_network(text, strict=False)
    return (network.version, int(network.network_address), network.prefixlen)


def service_sources(inventory: Inventory, host: Host, service: netplan.Service) -> Sources:
    """Who may reach a service of this host, from the plan and the settings."""
    if netplan.PUBLIC in service.clients:
        return Sources(anywhere=True)
    management = inventory.settings.net.management
    if netplan.MANAGEMENT in service.clients and not management:
        return Sources(anywhere=True)
    entries: list[str] = []
    if netplan.MANAGEMENT in service.clients:
        entries += management
    if netplan.DEV_NETWORK in service.clients and inventory.settings.dev.network:
        entries.append(inventory.settings.dev.network)
    for peer in netplan.clients(inventory, host, service):
        entries += netplan.resolve(peer.address)
    v4, v6 = networks(entries)
    # Containers of this host that play a client role reach it through a Docker bridge.
    local = host.has(*(role for role in service.clients if role in BRIDGED_ROLES))
    return Sources(v4=tuple(v4), v6=tuple(v6),
                   interfaces=DOCKER_INTERFACES if local else ())


def ssh_sources(inventory: Inventory, control: str | None) -> Sources:
    """SSH: the management range (anywhere when empty), and the control machine's address."""
    net = inventory.settings.net
    if not net.management:
        return Sources(anywhere=True)
    entries = list(net.management)
    if net.allow_control and control:
        entries.append(control)
    v4, v6 = networks(entries)
    return Sources(v4=tuple(v4), v6=tuple(v6))


def who(service: netplan.Service) -> str:
    """The clients of a service, for a rule's comment."""
    names = {netplan.PUBLIC: "anywhere", netplan.MANAGEMENT: "the management range",
             netplan.EVERY_HOST: "every host", netplan.DEV_NETWORK: "the dev network"}
    return ", ".join(names.get(client, client) for client in service.clients)[:100]


def accept_lines(sources: Sources, match: str, comment: str) -> list[str]:
    """Input rules accepting `match` (e.g. `tcp dport 5432`) from the sources."""
    tail = f'accept comment "{comment}"'
    if sources.anywhere:
        return [f"{match} {tail}"]
    lines = [f"ip saddr {set_of(sources.v4)} {match} {tail}"] if sources.v4 else []
    lines += [f"ip6 saddr {set_of(sources.v6)} {match} {tail}"] if sources.v6 else []
    lines += [f'iifname "{name}" {match} {tail}' for name in sources.interfaces]
    return lines


def set_of(items: tuple[str, ...]) -> str:
    """One element, or an anonymous nftables set."""
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def ruleset(inventory: Inventory, host: Host, control: str | None) -> Ruleset:
    """The host's rules: SSH, then every service its roles listen on, from its clients only."""
    rules = Ruleset()
    port = host.ssh.port if host.connection == "ssh" else 22
    net = inventory.settings.net
    if not net.management:
        comment = "ssh from anywhere"
    elif net.allow_control and control:
        comment = "ssh from the management range and the control machine"
    else:
        comment = "ssh from the management range"
    rules.input += accept_lines(ssh_sources(inventory, control), f"tcp dport {port}", comment)
    for service in netplan.served(inventory, host):
        sources = service_sources(inventory, host, service)
        if sources.empty:
            rules.closed.append(f"{service.port} ({service.name}): no client in the inventory "
                                f"({who(service)})")
            continue
        comment = f"{service.name} from {who(service)}"
        for proto in ("tcp", "udp") if service.udp else ("tcp",):
            rules.input += accept_lines(sources, f"{proto} dport {service.port}", comment)
            if service.published and not sources.anywhere:
                match = (f"meta l4proto {proto} ct status dnat ct original proto-dst "
                         f"{service.port}")
                rules.forward += accept_lines(sources, match, comment)
                rules.forward.append(f'{match} drop comment "{service.name}: nobody else"')
    rules.input = list(dict.fromkeys(rules.input))
    rules.forward = list(dict.fromkeys(rules.forward))
    return rules


def render_rules(inventory: Inventory, renderer: Renderer, host: Host,
                 control: str | None) -> str:
    """The nftables file of a host."""
    rules = ruleset(inventory, host, control)
    return renderer.render("config/nftables/difyops.nft.j2", host, input_rules=rules.input,
                           forward_rules=rules.forward, closed=rules.closed)


@dataclass(frozen=True)
class NewConnectionGate(Gate):
    """Passes when a NEW connection from this machine reaches the host and runs the command.

    The executor's own connection was opened before the change and survives it (established
    traffic stays allowed, sshd keeps running sessions); only a new one proves the operator can
    still get in. A failed probe leaves the host's rollback timer armed.
    """

    command: str = ""
    connect_timeout: float = 10

    def probe(self, machine: Machine) -> tuple[bool, str]:
        """Connect anew and run the command; a refusal by the command itself is final."""
        fresh = connect(machine.host, {"connect": self.connect_timeout, "command": 60})
        try:
            result = fresh.run(self.command, timeout=60)
        except DifyopsError as exc:
            return False, str(exc)  # no new connection (yet): try again until the deadline
        finally:
            fresh.close()
        if not result.ok:
            raise HostError(f"{machine.host.target}: {REFUSED}: {result.answer}")
        return True, result.answer


def confirm_window(inventory: Inventory) -> tuple[float, float]:
    """(seconds to keep trying a new connection, connect timeout): well inside the rollback."""
    window = max(5, inventory.settings.net.rollback_seconds // 2)
    return window, min(inventory.settings.timeouts.connect, window)


def steps_for(control: Mapping[str, str | None]):
    """The tier's step builder, given each host's view of the control machine's address."""

    def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
        """nftables, the guard script and boot unit, the rules with rollback, SSH hardening."""
        window, connect_timeout = confirm_window(inventory)
        rollback = inventory.settings.net.rollback_seconds
        plan: list[Step] = [
            packages("nftables"),
            WriteFile(SCRIPT, renderer.render("config/nftables/difyops-net.sh.j2", host,
                                              rollback=rollback), mode=0o755),
            WriteFile(UNIT, renderer.render("config/nftables/difyops-firewall.service.j2",
                                            host)),
            RunCommand("reload systemd units", "systemctl daemon-reload", on_change=(UNIT,)),
            WriteFile(RULES, render_rules(inventory, renderer, host, control.get(host.name)),
                      mode=0o640),
            RunCommand("load the rules (rolled back unless confirmed)",
                       f"{SCRIPT} firewall-apply", unless=f"{SCRIPT} firewall-in-force"),
            WaitFor(NewConnectionGate(CONFIRM_FIREWALL, timeout=window, interval=1,
                                      command=f"{SCRIPT} firewall-confirm",
                                      connect_timeout=connect_timeout)),
            RunCommand("load the confirmed rules at boot",
                       "systemctl enable --quiet difyops-firewall.service",
                       unless=facts.enabled("difyops-firewall.service")),
        ]
        if inventory.settings.net.ssh_hardening:
            plan += [
                WriteFile(SSHD_STAGED, renderer.render("config/ssh/hardening.conf.j2", host)),
                RunCommand("install the sshd hardening (sshd -t, reload; rolled back unless "
                           "confirmed)", f"{SCRIPT} sshd-apply", unless=f"{SCRIPT} sshd-in-force"),
                WaitFor(NewConnectionGate(CONFIRM_SSHD, timeout=window, interval=1,
                                          command=f"{SCRIPT} sshd-confirm",
                                          connect_timeout=connect_timeout)),
            ]
        else:
            plan.append(RunCommand("remove the sshd hardening drop-in", f"{SCRIPT} sshd-remove",
                                   unless=facts.is_absent(SSHD_DROPIN)))
        return plan

    return steps


def tier(control: Mapping[str, str | None] | None = None) -> Tier:
    """The net tier for these control addresses (host name -> address as the host sees us)."""
    return Tier("net", "host firewall (nftables) and SSH hardening", FIREWALLED_ROLES,
                steps_for(control or {}))


TIER = tier()


def control_address(machine: Machine) -> str | None:
    """This machine's address as the host sees it ($SSH_CLIENT), None for a local host."""
    if machine.host.connection == "local":
        return None
    answer = machine.run('printf "%s" "${SSH_CLIENT%% *}"', sudo=False, timeout=30)
    text = answer.stdout.strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


# --- what is in force --------------------------------------------------------------------------


@dataclass
class HostState:
    """A host's firewall and SSH hardening against the plan."""

    firewall: str
    ssh: str
    as_planned: bool
    rules: list[str] = field(default_factory=list)
    diff: str = ""


def rule_lines(listing: str) -> list[str]:
    """The rules of an `nft list table` listing, each prefixed with its chain."""
    lines, chain = [], ""
    for raw in listing.splitlines():
        line = raw.strip()
        if line.startswith("chain "):
            chain = line.split()[1]
        elif line and not line.startswith(("table ", "type ", "}")):
            lines.append(f"{chain}: {line}")
    return lines


def unified(before: str, after: str, label_before: str, label_after: str) -> str:
    """A unified diff of two texts."""
    import difflib

    return "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(), label_before,
                                          label_after, lineterm=""))


def read_state(inventory: Inventory, machine: Machine) -> HostState:
    """Compare the rules in force and the sshd drop-in on a host with the plan."""
    host = machine.host
    renderer = Renderer(inventory)
    planned = render_rules(inventory, renderer, host, control_address(machine))
    live = machine.run("nft -s list table inet difyops 2>/dev/null", timeout=60).stdout
    applied = (machine.read_file(f"{STATE}/firewall.nft") or b"").decode()
    recorded = (machine.read_file(f"{STATE}/firewall.list") or b"").decode()
    pending = machine.run(f"test -e {STATE}/firewall.pending").ok
    rules = rule_lines(live)
    if not live.strip():
        firewall, ok, diff = "no difyops rules in force: run inv net.apply", False, ""
    elif pending:
        firewall, ok, diff = "a change awaits confirmation (its rollback timer is armed)", False, ""
    elif applied != planned:
        firewall, ok = "the rules in force differ from the plan: run inv net.apply", False
        diff = unified(applied, planned, f"{host.name}:applied", "planned")
    elif recorded.strip() != live.strip():
        firewall, ok = "changed by hand since inv net.apply: run it again", False
        diff = unified(recorded, live, f"{host.name}:applied", f"{host.name}:in force")
    else:
        firewall, ok, diff = f"as planned ({len(rules)} rules)", True, ""
    dropin = machine.read_file(SSHD_DROPIN)
    if inventory.settings.net.ssh_hardening:
        wanted = renderer.render("config/ssh/hardening.conf.j2", host).encode()
        if dropin == wanted:
            ssh = "key-only login in force"
        else:
            ssh, ok = "hardening planned, not in force: run inv net.apply", False
    elif dropin is not None:
        ssh, ok = "hardening drop-in present but not planned: inv net.apply removes it", False
    else:
        ssh = "hardening off (net.ssh_hardening)"
    return HostState(firewall, ssh, ok, rules, diff)
