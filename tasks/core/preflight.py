"""Preflight: check every host before anything is installed on it.

Two rounds, each on every host in parallel. First, facts: OS, cores, memory, the filesystems of
the data paths, the listening ports, Docker and compose, NTP, other firewalls, name resolution;
the clock is compared with this machine's. Then, from each host, a TCP probe to every peer port
its roles need that the first round saw listening (a port nobody listens on yet is reported as
information, not as a failure). Every check yields one row: ok, info, warn or REFUSE.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tasks.core import netplan, placement, shell
from tasks.core.errors import DifyopsError
from tasks.core.fleet import each_host, table
from tasks.core.hosts import Machine
from tasks.core.inventory import APP_ROLES, Host, Inventory
from tasks.core.profiles import version_key

OK, INFO, WARN, REFUSE = "ok", "info", "warn", "REFUSE"
SEVERITY = {OK: 0, INFO: 1, WARN: 2, REFUSE: 3}
CHECKS = ("connect", "os", "kernel", "cpu", "memory", "disk", "ports", "docker", "clock",
          "firewall", "resolve", "reach")
SUPPORTED_OS = {("debian", "12"), ("debian", "13"), ("ubuntu", "22.04"), ("ubuntu", "24.04")}
SUPPORTED_TEXT = "Debian 12/13, Ubuntu 22.04/24.04"
MEMORY_SLACK = 0.9   # an "8 GB" machine shows about 7.7 GiB to the kernel
DISK_SLACK = 0.95    # a "100 GB" disk formats to a little less
VERSION = re.compile(r"^(\d+(?:\.\d+)*)")


class PreflightRefused(DifyopsError):
    """At least one host failed a check that must pass before deploying."""


@dataclass(frozen=True)
class Row:
    """One line of the preflight table."""

    host: str
    check: str
    status: str
    detail: str


@dataclass
class Listener:
    """A listening TCP socket and the processes holding it."""

    port: int
    processes: tuple[str, ...]
    text: str


@dataclass
class Facts:
    """What the first round read on a host."""

    os_id: str = ""
    os_version: str = ""
    os_name: str = ""
    kernel: str = ""          # uname -r
    cpu: int = 0
    memory_kb: int = 0
    disks: list[tuple[str, str, int, int]] = field(default_factory=list)  # path, mount, size, free
    listeners: list[Listener] | None = None
    docker: str = "missing"   # "missing" | "" (daemon not answering) | server version
    compose: str = ""
    ntp: str = ""
    chrony: str = ""
    ufw: str = ""
    firewalld: bool = False
    resolved: dict[str, list[str]] = field(default_factory=dict)
    skew: float = 0.0
    uncertainty: float = 0.0

    def listening(self, port: int) -> list[Listener]:
        """The listeners on a port."""
        return [item for item in self.listeners or [] if item.port == port]


# --- what each role needs --------------------------------------------------------------------


def required_size(inventory: Inventory, host: Host) -> dict[str, tuple[int, str]]:
    """Per resource, the largest size any of the host's roles needs, and which role needs it."""
    sizes = inventory.settings.preflight.sizes
    wanted: dict[str, tuple[int, str]] = {}
    for role in host.roles:
        for key, value in sizes[role].items():
            if value > wanted.get(key, (0, ""))[0]:
                wanted[key] = (value, role)
    return wanted


def data_paths(inventory: Inventory, host: Host) -> dict[str, list[str]]:
    """The directories where the host's roles keep data, and which roles use each."""
    settings = inventory.settings
    app_dir, storage = settings.app.deploy_dir, settings.storage
    by_role: dict[str, list[str]] = {
        "db_primary": ["/var/lib/postgresql", settings.backup.dir],
        "db_replica": ["/var/lib/postgresql"],
        "cache": ["/var/lib/redis"], "broker": ["/var/lib/redis"],
        "vector": ["/var/lib/weaviate", "/var/lib/docker"],
        "lb": ["/var/log/nginx"],
        "monitor": ["/var/lib/prometheus", "/var/lib/docker"],
        "logging": ["/var/lib/docker"],
        "dev_server": ["/var/lib"], "dev_backend": ["/opt"], "dev_frontend": ["/opt"],
    }
    for role in ("api", "worker"):
        by_role[role] = [app_dir, "/var/lib/docker"] + (
            [storage.path] if storage.type != "s3" else [])
    for role in ("web", "beat", "plugin_daemon", "agent"):
        by_role[role] = [app_dir, "/var/lib/docker"]
    paths: dict[str, list[str]] = {}
    for role in host.roles:
        for path in by_role.get(role, []):
            paths.setdefault(path, []).append(role)
    return paths


def names_to_resolve(inventory: Inventory, host: Host) -> list[str]:
    """The DNS names (not IP addresses) this host must resolve: its peers' addresses."""
    names = {peer.address for peer, _ in netplan.needed_peers(inventory, host)}
    return sorted(name for name in names if not is_ip(name))


def is_ip(address: str) -> bool:
    """Whether a string is an IP address."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


# --- round one: facts ------------------------------------------------------------------------


def facts_script(paths: Iterable[str], names: Iterable[str]) -> str:
    """A POSIX shell script printing key=value lines about the host (run as root)."""
    lines = [
        'echo "os=$(. /etc/os-release 2>/dev/null; echo "${ID:-unknown}|${VERSION_ID:-}|'
        '${PRETTY_NAME:-}")"',
        'echo "kernel=$(uname -r 2>/dev/null)"',
        'echo "cpu=$(nproc 2>/dev/null || echo 0)"',
        "echo \"mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null)\"",
    ]
    for path in paths:
        lines.append(shell.command(
            "q={0}; while [ ! -e \"$q\" ]; do q=$(dirname \"$q\"); done; "
            "df -PB1 \"$q\" 2>/dev/null | awk -v p={0} "
            "'NR==2 {{print \"disk=\" p \"|\" $6 \"|\" $2 \"|\" $4}}'", path))
    lines += [
        "if command -v ss >/dev/null 2>&1; then ss -ltnpH 2>/dev/null | sed 's/^/listen=/'; "
        "else echo listen_tool=missing; fi",
        "if command -v docker >/dev/null 2>&1; then "
        "echo \"docker=$(docker version --format '{{.Server.Version}}' 2>/dev/null)\"; "
        "echo \"compose=$(docker compose version --short 2>/dev/null)\"; "
        "else echo docker=missing; fi",
        'echo "ntp=$(timedatectl show -p NTPSynchronized --value 2>/dev/null)"',
        "if command -v chronyc >/dev/null 2>&1; then echo \"chrony=$(chronyc -n tracking "
        "2>/dev/null | sed -n 's/^Leap status *: *//p')\"; fi",
        "if command -v ufw >/dev/null 2>&1; then echo \"ufw=$(ufw status 2>/dev/null | "
        "head -n 1)\"; fi",
        "if systemctl is-active --quiet firewalld 2>/dev/null; then echo firewalld=active; fi",
    ]
    for name in names:
        lines.append(shell.command("echo resolve={0}\"|$(getent ahosts {0} | awk '{{print $1}}' "
                                   "| sort -u | tr '\\n' ' ')\"", name))
    return "\n".join(lines)


def parse_facts(text: str) -> Facts:
    """Facts from the script's output; unknown lines are ignored."""
    facts = Facts()
    listeners: list[Listener] = []
    tool = True
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "os":
            facts.os_id, facts.os_version, facts.os_name = ([*value.split("|"), "", ""])[:3]
        elif key == "kernel":
            facts.kernel = value.strip()
        elif key == "cpu":
            facts.cpu = to_int(value)
        elif key == "mem_kb":
            facts.memory_kb = to_int(value)
        elif key == "disk":
            path, mount, size, free = ([*value.split("|"), "", "", ""])[:4]
            facts.disks.append((path, mount, to_int(size), to_int(free)))
        elif key == "listen":
            listener = parse_listener(value)
            if listener:
                listeners.append(listener)
        elif key == "listen_tool":
            tool = False
        elif key == "docker":
            facts.docker = value.strip()
        elif key == "compose":
            facts.compose = value.strip()
        elif key == "ntp":
            facts.ntp = value.strip()
        elif key == "chrony":
            facts.chrony = value.strip()
        elif key == "ufw":
            facts.ufw = value.strip()
        elif key == "firewalld":
            facts.firewalld = True
        elif key == "resolve":
            name, _, addresses = value.partition("|")
            facts.resolved[name] = addresses.split()
    facts.listeners = listeners if tool and facts.os_id else None
    return facts


def parse_listener(value: str) -> Listener | None:
    """One `ss -ltnpH` line: State Recv-Q Send-Q Local:Port Peer:Port [users:((...))]."""
    fields = value.split()
    if len(fields) < 5:
        return None
    port = to_int(fields[3].rsplit(":", 1)[-1])
    rest = " ".join(fields[5:])
    processes = []
    for chunk in rest.split('(("')[1:] + rest.split(',("')[1:]:
        processes.append(chunk.split('"', 1)[0])
    return Listener(port, tuple(dict.fromkeys(processes)), value.strip())


def to_int(text: str) -> int:
    """An integer, or 0 when the text is not one."""
    try:
        return int(text.strip())
    except ValueError:
        return 0


def gather(inventory: Inventory, machine: Machine) -> Facts:
    """Round one on one host: the facts script, then the clock against this machine's."""
    host = machine.host
    script = facts_script(data_paths(inventory, host), names_to_resolve(inventory, host))
    result = machine.run(script, timeout=60)
    facts = parse_facts(result.stdout)
    if not facts.os_id:
        facts.os_name = f"no POSIX shell answered the checks (Windows?): {result.answer}"
        return facts
    before = time.time()
    answer = machine.run("date +%s.%N", sudo=False, timeout=30)
    after = time.time()
    try:
        remote = float(answer.stdout.strip())
    except ValueError:
        remote = (before + after) / 2
    facts.skew = remote - (before + after) / 2
    facts.uncertainty = (after - before) / 2
    return facts


# --- round one: judging the facts ----------------------------------------------------------


def grade(actual: float, wanted: float, percent: int) -> str:
    """ok at or above what is wanted, warn below, REFUSE below percent of it."""
    if actual >= wanted:
        return OK
    return WARN if actual >= wanted * percent / 100 else REFUSE


def evaluate(inventory: Inventory, host: Host, facts: Facts) -> list[Row]:
    """Every round-one check of a host, as rows."""
    settings = inventory.settings.preflight
    percent = settings.refuse_percent
    wanted = required_size(inventory, host)
    rows = [check_os(host, facts)]
    kernel = check_kernel(inventory, host, facts)
    if kernel:
        rows.append(kernel)

    rows.append(size_row(host, "cpu", facts.cpu, wanted.get("cpu", (0, "")), percent))
    rows.append(size_row(host, "memory", facts.memory_kb / 1024 / 1024,
                         wanted.get("memory_gb", (0, "")), percent))
    rows.append(check_disk(inventory, host, facts, wanted, percent))
    rows.append(check_ports(inventory, host, facts))
    if netplan.runs_compose(inventory, host):
        rows.append(check_docker(host, facts, min_compose(inventory, host)))
    rows.append(check_clock(host, facts, settings.max_clock_skew))
    rows.append(check_firewalls(host, facts))
    return rows


def check_os(host: Host, facts: Facts) -> Row:
    """A supported OS family and release."""
    shown = facts.os_name or f"{facts.os_id} {facts.os_version}"
    if (facts.os_id, facts.os_version) in SUPPORTED_OS:
        return Row(host.name, "os", OK, shown)
    # A development workstation is the operator's own machine: noted, not refused.
    if set(host.roles) <= {"dev_frontend", "dev_backend"}:
        return Row(host.name, "os", WARN, f"{shown}; a development machine: not checked further")
    return Row(host.name, "os", REFUSE, f"{shown} is not supported: difyops supports "
                                        f"{SUPPORTED_TEXT}")


def size_row(host: Host, check: str, actual: float, wanted: tuple[int, str],
             percent: int) -> Row:
    """cpu or memory against the roles' size, and against the size the inventory declares."""
    need, role = wanted
    key, unit, slack = (("cpu", "core(s)", 1.0) if check == "cpu" else
                        ("memory_gb", "GB", MEMORY_SLACK))
    status = grade(actual, need * slack, percent)
    shown = f"{actual:g} core(s)" if check == "cpu" else f"{actual:.1f} GiB"
    detail = shown + (f"; {role} wants {need} {unit}" if need else "")
    if status != OK:
        detail += f" (refused below {need * slack * percent / 100:g})"
    declared = host.size.get(key)
    if declared and actual < declared * slack:
        # Settings are sized from the declaration (PostgreSQL's memory, for one).
        status = max(status, WARN, key=SEVERITY.get)
        detail += f"; the inventory declares size.{key} = {declared}, more than the host has"
    return Row(host.name, check, status, detail)


def check_disk(inventory: Inventory, host: Host, facts: Facts,
               wanted: dict[str, tuple[int, str]], percent: int) -> Row:
    """The filesystems holding the data paths: size by role, and free space."""
    settings = inventory.settings.preflight
    sizes = settings.sizes
    roles_of = data_paths(inventory, host)
    mounts: dict[str, tuple[int, int, list[str]]] = {}
    for path, mount, size, free in facts.disks:
        mounts.setdefault(mount, (size, free, []))[2].append(path)
    if not mounts:
        return Row(host.name, "disk", WARN, "could not read the filesystems (df)")
    worst, notes = OK, []
    for mount, (size, free, paths) in mounts.items():
        roles = {role for path in paths for role in roles_of.get(path, [])}
        need, role = max(((sizes[r]["disk_gb"], r) for r in roles), default=wanted.get(
            "disk_gb", (0, "")))
        size_gb, free_gb = size / 1e9, free / 1e9
        status = grade(size_gb, need * DISK_SLACK, percent)
        note = f"{mount} ({', '.join(paths)}): {size_gb:.0f} GB, {free_gb:.0f} GB free"
        if status != OK:
            note += f"; {role} wants {need} GB (refused below {need * percent / 100:g})"
        if free_gb < settings.min_free_disk_gb:
            status = REFUSE
            note += f"; less than preflight.min_free_disk_gb = {settings.min_free_disk_gb} " \
                    f"GB free"
        worst = max(worst, status, key=SEVERITY.get)
        notes.append(note)
    return Row(host.name, "disk", worst, "; ".join(notes))


def check_ports(inventory: Inventory, host: Host, facts: Facts) -> Row:
    """The ports the host's roles will listen on: free, or held by our own service."""
    if facts.listeners is None:
        return Row(host.name, "ports", WARN, "`ss` is not installed (iproute2): not checked")
    status, notes, ours = OK, [], []
    for service in netplan.served(inventory, host):
        for listener in facts.listening(service.port):
            foreign = [p for p in listener.processes if not service.owned_by(p)]
            if not foreign and listener.processes:
                ours.append(f"{service.port} ({listener.processes[0]})")
                continue
            status = REFUSE
            held = ", ".join(foreign) or "an unknown process"
            notes.append(f"{service.port} ({service.name}) is held by {held}: stop it or move "
                         f"it, {service.name} needs this port")
    ports = sorted({service.port for service in netplan.served(inventory, host)})
    if status == OK:
        notes.append(f"{len(ports)} port(s) free or ours" + (f"; ours: {', '.join(ours)}"
                                                             if ours else ""))
    return Row(host.name, "ports", status, "; ".join(notes))


def min_compose(inventory: Inventory, host: Host) -> str:
    """The compose version the Dify release needs on an app host ("" elsewhere, or none)."""
    return inventory.profile.min_compose if host.has(*APP_ROLES) else ""


def leading_version(text: str) -> str:
    """The dotted number a version string starts with: "6.1.0-18-amd64" -> "6.1.0"."""
    match = VERSION.match(text.strip().lstrip("v"))
    return match.group(1) if match else ""


def check_kernel(inventory: Inventory, host: Host, facts: Facts) -> Row | None:
    """Where local_sandbox runs: a kernel at least the release's min_kernel (Landlock)."""
    if not placement.runs_agent(inventory, host):
        return None
    needed = inventory.profile.min_kernel.get("local_sandbox", "")
    if not needed:
        return None
    found = leading_version(facts.kernel)
    release = inventory.profile.version
    if not found or version_key(found) < version_key(needed):
        return Row(host.name, "kernel", REFUSE,
                   f"Linux {facts.kernel or '(unknown)'} found; local_sandbox of Dify {release} "
                   f"(role agent) needs Linux {needed} or newer for Landlock: boot a newer kernel "
                   f"(e.g. Debian 12 backports, Debian 13, Ubuntu 22.04+) or give the role "
                   f"'agent' to a host that has one")
    return Row(host.name, "kernel", OK, f"Linux {facts.kernel} (local_sandbox needs {needed}+)")


def check_docker(host: Host, facts: Facts, needed: str = "") -> Row:
    """Docker Engine answering, with the compose v2 plugin, where compose tiers run; on app
    hosts, a compose at least the release's min_compose."""
    if facts.docker == "missing":
        return Row(host.name, "docker", REFUSE, "Docker is not installed: its roles run by "
                   "compose; install Docker Engine and the compose v2 plugin")
    if not facts.docker:
        return Row(host.name, "docker", REFUSE, "the Docker daemon does not answer: start it "
                   "(systemctl start docker) and check `docker version`")
    if not facts.compose:
        return Row(host.name, "docker", REFUSE, f"Docker {facts.docker} without compose v2 "
                   f"(`docker compose`): install the docker-compose-plugin package")
    major = to_int(facts.compose.lstrip("v").split(".")[0])
    if major < 2:
        return Row(host.name, "docker", REFUSE, f"compose {facts.compose} is v1: difyops "
                   f"needs compose v2 (`docker compose`)")
    found = leading_version(facts.compose)
    if needed and version_key(found) < version_key(needed):
        return Row(host.name, "docker", REFUSE,
                   f"Docker {facts.docker} with compose {facts.compose}; this Dify release needs "
                   f"compose {needed} or newer: upgrade the docker-compose-plugin package "
                   f"(Docker's apt repository)")
    return Row(host.name, "docker", OK, f"Docker {facts.docker}, compose {facts.compose}")


def check_clock(host: Host, facts: Facts, max_skew: float) -> Row:
    """The host's clock against this machine's, and whether NTP keeps it synchronized."""
    skew = abs(facts.skew) - facts.uncertainty
    direction = "ahead of" if facts.skew > 0 else "behind"
    if skew > max_skew:
        return Row(host.name, "clock", REFUSE,
                   f"{abs(facts.skew):.1f} s {direction} this machine (more than "
                   f"preflight.max_clock_skew = {max_skew} s; TLS, replication and Sentinel need "
                   f"synchronized clocks): enable NTP (timedatectl set-ntp true, or chrony)")
    synced = facts.ntp == "yes" or facts.chrony.lower() == "normal"
    shown = f"{abs(facts.skew):.2f} s from this machine"
    if not synced:
        return Row(host.name, "clock", WARN, f"{shown}, but not synchronized by NTP "
                   f"(NTPSynchronized={facts.ntp or '?'}): enable timesyncd or chrony")
    return Row(host.name, "clock", OK, f"{shown}, NTP synchronized")


def check_firewalls(host: Host, facts: Facts) -> Row:
    """Other firewalls whose rules apply on top of difyops's."""
    others = []
    if facts.ufw.lower().endswith(": active"):
        others.append("ufw")
    if facts.firewalld:
        others.append("firewalld")
    if others:
        return Row(host.name, "firewall", WARN, f"{' and '.join(others)} active: its rules "
                   f"apply too; open the plan's ports there or disable it and use inv net.apply")
    return Row(host.name, "firewall", OK, "no ufw or firewalld active")


def check_resolution(inventory: Inventory, host: Host, facts: Facts) -> Row:
    """The inventory's names resolve here and on the host."""
    names = names_to_resolve(inventory, host)
    if not is_ip(host.address):
        try:
            netplan.resolve(host.address)
        except DifyopsError as exc:
            return Row(host.name, "resolve", REFUSE, f"on this machine: {exc}")
    if not names:
        return Row(host.name, "resolve", OK, "the peers' addresses are IP addresses")
    missing = [name for name in names if not facts.resolved.get(name)]
    if missing:
        return Row(host.name, "resolve", REFUSE, f"{', '.join(missing)} do(es) not resolve on "
                   f"the host: fix DNS or /etc/hosts there")
    return Row(host.name, "resolve", OK, f"{len(names)} name(s) resolve")


# --- round two: can the hosts reach each other -----------------------------------------------


def probe_script(targets: Sequence[tuple[str, int]], timeout: int) -> str:
    """Probe TCP ports in parallel from the host; one `probe=address|port|exit|message` each."""
    lines = [f"probe() {{ out=$(timeout {timeout} bash -c \"exec 3<>/dev/tcp/$1/$2\" 2>&1); "
             "rc=$?; echo \"probe=$1|$2|$rc|$(printf '%s' \"$out\" | tr '\\n' ' ' "
             "| tail -c 200)\"; }"]
    lines += [shell.command("probe {} {} &", address, port) for address, port in targets]
    lines.append("wait")
    return "\n".join(lines)


def parse_probes(text: str) -> dict[tuple[str, int], tuple[int, str]]:
    """(address, port) -> (exit code, message) from the probe script's output."""
    found = {}
    for line in text.splitlines():
        if line.startswith("probe="):
            address, port, code, message = ([*line[6:].split("|", 3), "", "", ""])[:4]
            found[(address, to_int(port))] = (to_int(code), message.strip())
    return found


def check_reach(inventory: Inventory, host: Host, facts: dict[str, Facts],
                answers: dict[tuple[str, int], tuple[int, str]] | None,
                error: str = "") -> Row:
    """The peers' ports this host needs: reached when listening, else noted as not yet."""
    if error:
        return Row(host.name, "reach", REFUSE, f"could not probe: {error}")
    timeout = inventory.settings.preflight.probe_timeout
    status, reached, waiting, failed = OK, [], [], []
    for peer, service in netplan.needed_peers(inventory, host):
        label = f"{peer.name}:{service.port}"
        known = facts.get(peer.name)
        if known is not None and known.listeners is not None and \
                not known.listening(service.port):
            waiting.append(label)
            continue
        code, message = (answers or {}).get((peer.address, service.port), (-1, "not probed"))
        if code == 0:
            reached.append(label)
        elif "refused" in message.lower():
            # Nothing listens on that address yet (or only on loopback): the tier configures it.
            waiting.append(label if known is None else f"{label} (refused)")
        elif code == 124:
            failed.append(f"{label} ({service.name}): no answer within {timeout} s "
                          f"(a firewall drops it?)")
        else:
            failed.append(f"{label} ({service.name}): {message or f'exit {code}'}")
    notes = []
    if failed:
        status = REFUSE
        notes.append("cannot reach " + "; ".join(failed))
    if reached:
        notes.append(f"reached {', '.join(dict.fromkeys(reached))}")
    if waiting:
        status = max(status, INFO, key=SEVERITY.get)
        notes.append(f"not listening yet: {', '.join(dict.fromkeys(waiting))}")
    return Row(host.name, "reach", status, "; ".join(notes) or "needs no peer")


def probe_targets(inventory: Inventory, host: Host, facts: dict[str, Facts]) -> list[tuple[str,
                                                                                           int]]:
    """The (address, port) pairs worth probing from a host: peers listening, or unknown."""
    targets = []
    for peer, service in netplan.needed_peers(inventory, host):
        known = facts.get(peer.name)
        if known is not None and known.listeners is not None and \
                not known.listening(service.port):
            continue
        targets.append((peer.address, service.port))
    return list(dict.fromkeys(targets))


# --- the whole check -------------------------------------------------------------------------


def run(inventory: Inventory, hosts: Sequence[Host]) -> list[Row]:
    """Both rounds on the hosts, in parallel; the rows in host order, then check order."""
    timeouts = inventory.settings.timeouts
    first = each_host(hosts, lambda machine: gather(inventory, machine), timeouts)
    facts = {outcome.host.name: outcome.value for outcome in first
             if outcome.ok and outcome.value.os_id}
    probe_timeout = inventory.settings.preflight.probe_timeout

    def probe(machine: Machine) -> dict[tuple[str, int], tuple[int, str]]:
        targets = probe_targets(inventory, machine.host, facts)
        if not targets:
            return {}
        result = machine.run(probe_script(targets, probe_timeout), sudo=False,
                             timeout=probe_timeout + 30)
        return parse_probes(result.stdout)

    second = {outcome.host.name: outcome for outcome in
              each_host([o.host for o in first if o.host.name in facts], probe, timeouts)}
    rows: list[Row] = []
    for outcome in first:
        host = outcome.host
        if not outcome.ok:
            rows.append(Row(host.name, "connect", REFUSE, outcome.error))
            continue
        if host.name not in facts:  # not a POSIX system: only the OS verdict
            rows.append(check_os(host, outcome.value))
            continue
        rows += evaluate(inventory, host, outcome.value)
        rows.append(check_resolution(inventory, host, outcome.value))
        probed = second[host.name]
        rows.append(check_reach(inventory, host, facts, probed.value, probed.error))
    return rows


def report(rows: Sequence[Row]) -> str:
    """The table, one line per host and check."""
    return table(["host", "check", "result", "detail"],
                 [(row.host, row.check, row.status, row.detail) for row in rows])


def check(inventory: Inventory, hosts: Sequence[Host], out=print) -> list[Row]:
    """Run, print the table and raise PreflightRefused when a check refused."""
    out(f"preflight of {len(hosts)} host(s) on inventory {inventory.name}", flush=True)
    rows = run(inventory, hosts)
    out(report(rows), flush=True)
    refused = [row for row in rows if row.status == REFUSE]
    warned = [row for row in rows if row.status == WARN]
    if refused:
        where = ", ".join(f"{row.host} ({row.check})" for row in refused)
        raise PreflightRefused(f"preflight refused {len(refused)} check(s): {where}. Fix what "
                               f"the table says (or lower the preflight.* settings for a lab) "
                               f"and run it again; nothing was installed.")
    out(f"preflight passed: {len(rows)} check(s), {len(warned)} warning(s)", flush=True)
    return rows
