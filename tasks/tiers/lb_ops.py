"""lb operations beyond a deploy: drain, undrain, status and check of the nginx balancer.

Plain functions: tasks/lb.py prints them, and the app tier's rolling upgrade
(tasks/tiers/app_release.py) calls drain and undrain around each host it replaces. They read and
change the drain state a deploy keeps (tasks/tiers/lb.py) and publish the site past `nginx -t`.
"""

from __future__ import annotations

import re
import secrets as random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tasks.core import shell
from tasks.core.errors import DifyopsError, HostError, InputError, Problem
from tasks.core.fleet import Outcome, each_host
from tasks.core.gates import poll
from tasks.core.hosts import Machine
from tasks.core.inventory import Inventory, endpoint
from tasks.core.project import display
from tasks.tiers.lb import (
    AVAILABLE,
    DRAINED,
    LIVE,
    UPSTREAMS,
    Upstream,
    generate_command,
    is_ip,
    publish_command,
    routes,
    upstreams,
)

ACCESS_LOG = "/var/log/nginx/dify.access.log"
HOST_TAG = re.compile(r"; # host=([a-z0-9-]+)$")


# --- reading the live site ----------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A server line of the live site."""

    upstream: str
    endpoint: str
    host: str  # the inventory host behind the endpoint ("?" when unknown)
    down: bool


def live_servers(text: str, inventory: Inventory) -> list[Server]:
    """The server lines of every upstream block of a live site."""
    by_endpoint = {m.endpoint: m.host for u in upstreams(inventory) for m in u.members}
    servers, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        match = re.match(r"upstream (\S+) \{", stripped)
        if match:
            current = match.group(1)
        elif stripped == "}":
            current = None
        elif current and stripped.startswith("server "):
            words = stripped.split("#")[0].rstrip("; ").split()
            tag = HOST_TAG.search(stripped)
            servers.append(Server(current, words[1],
                                  tag.group(1) if tag else by_endpoint.get(words[1], "?"),
                                  "down" in words[2:]))
    return servers


def read_drained(machine: Machine) -> list[str]:
    """The hosts drained on this lb host, in the order they were drained."""
    text = (machine.read_file(DRAINED) or b"").decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


# --- drain and undrain --------------------------------------------------------------------------


@dataclass(frozen=True)
class DrainResult:
    """What drain/undrain did on one lb host."""

    lb: str
    changed: bool
    upstreams: tuple[str, ...]  # where the host is out of (drain) or back in (undrain) rotation
    kept_in: tuple[str, ...]  # where it is the only member, so it always serves
    open_connections: int = 0  # to the drained host when the wait ended
    waited: float = 0.0


def member_upstreams(inventory: Inventory, name: str) -> list[Upstream]:
    """The upstreams a host serves in; an unknown or non-member host is refused."""
    host = inventory.host(name)  # InputError naming the known hosts
    found = [u for u in upstreams(inventory) if any(m.host == name for m in u.members)]
    if not found:
        roles = ", ".join(role for _, role, _ in UPSTREAMS)
        raise InputError([Problem(display(inventory.file), "hosts", f"{name} is not behind "
                                  f"the load balancer (roles: {', '.join(host.roles)})",
                                  f"drain a host with one of the roles {roles}")])
    return found


def open_connections(machine: Machine, endpoints: set[str]) -> int:
    """Established connections from this host to any of the endpoints (address:port)."""
    result = machine.check("ss -Htn state established")
    count = 0
    for line in result.stdout.splitlines():
        fields = line.split()
        if fields and fields[-1] in endpoints:
            count += 1
    return count


def resolved_endpoints(machine: Machine, upstreams_out: list[Upstream], name: str) -> set[str]:
    """The host's endpoints as ss prints them (DNS names resolved on the lb host)."""
    endpoints = set()
    for upstream in upstreams_out:
        for member in upstream.members:
            if member.host != name:
                continue
            address, port = member.endpoint.rsplit(":", 1)
            if address.startswith("[") or is_ip(address):
                endpoints.add(member.endpoint)
                continue
            found = machine.run(f"getent ahosts {shell.quote(address)}").stdout.split()
            addresses = {w for w in found if is_ip(w)} or {address}
            endpoints |= {endpoint(a, int(port)) for a in addresses}
    return endpoints


def drain(inventory: Inventory, name: str, *, wait: float | None = None,
          clock: Callable[[], float] = time.monotonic,
          pause: Callable[[float], None] = time.sleep) -> list[DrainResult]:
    """Take a host out of every upstream on every lb host; wait for its requests in flight.

    Refused before any host changes: an unknown host, a host behind no upstream, and a drain
    that would leave an upstream with no server in service. nginx reloads gracefully, so requests
    in flight finish on the old workers; this waits (up to `wait` seconds, default lb.drain_wait)
    until no connection to the host is left, and fails when some remain.
    """
    return _set_drained(inventory, name, drained=True,
                        wait=inventory.settings.lb.drain_wait if wait is None else wait,
                        clock=clock, pause=pause)


def undrain(inventory: Inventory, name: str) -> list[DrainResult]:
    """Put a drained host back into every upstream on every lb host (graceful reload)."""
    return _set_drained(inventory, name, drained=False, wait=0)


def _set_drained(inventory: Inventory, name: str, *, drained: bool, wait: float,
                 clock: Callable[[], float] = time.monotonic,
                 pause: Callable[[float], None] = time.sleep) -> list[DrainResult]:
    serving = member_upstreams(inventory, name)
    movable = [u for u in serving if u.drainable]
    kept = tuple(u.name for u in serving if not u.drainable)
    lbs = inventory.with_role("lb")
    if not lbs:
        raise InputError([Problem(display(inventory.file), "hosts[*].roles",
                                  "no host has the role 'lb'", "nothing to drain from")])
    timeouts = inventory.settings.timeouts
    if drained:  # every lb answers first: refuse before touching any of them
        states = each_host(lbs, read_drained, timeouts)
        failed = [o for o in states if not o.ok]
        if failed:
            raise HostError("cannot read the drain state, nothing changed: "
                            + "; ".join(o.error for o in failed))
        for outcome in states:
            out = set(outcome.value or []) | {name}
            for upstream in movable:
                if all(m.host in out for m in upstream.members):
                    others = ", ".join(sorted(m.host for m in upstream.members if m.host != name))
                    raise DifyopsError(
                        f"refused, nothing changed: draining {name} would leave {upstream.name} "
                        f"on {outcome.host.name} with no server in service ({others} drained "
                        f"already); undrain one of them first")

    def apply(machine: Machine) -> DrainResult:
        before = read_drained(machine)
        after = [n for n in before if n != name]
        if drained and movable:  # a host that is the only server everywhere is never recorded
            after = before if name in before else [*before, name]
        state_changed = after != before and machine.install_file(
            DRAINED, "".join(f"{n}\n" for n in after).encode())
        result = machine.run(publish_command(LIVE))
        if not result.ok:
            if state_changed:  # the live site did not change: neither does the state
                machine.install_file(DRAINED, "".join(f"{n}\n" for n in before).encode())
            raise HostError(f"{machine.host.target}: cannot publish the site: {result.answer}")
        changed = state_changed or result.stdout.strip().endswith("published")
        count, started = 0, clock()
        if drained and wait > 0 and movable:
            endpoints = resolved_endpoints(machine, movable, name)

            def closed() -> tuple[bool, int]:
                still = open_connections(machine, endpoints)
                return still == 0, still

            _, count = poll(closed, wait, 0.5, clock=clock, pause=pause)
        return DrainResult(machine.host.name, changed, tuple(u.name for u in movable), kept,
                           count, clock() - started)

    outcomes = each_host(lbs, apply, timeouts)
    problems = [f"{o.host.name}: {o.error}" for o in outcomes if not o.ok]
    problems += [f"{o.value.lb}: {name} is out of rotation but {o.value.open_connections} "
                 f"connection(s) to it are still open after {wait:g} s (a long stream?): wait "
                 f"longer with --wait, or go on and cut them"
                 for o in outcomes if o.ok and o.value and o.value.open_connections]
    if problems:
        done = [o.host.name for o in outcomes if o.ok]
        raise HostError(f"{'drain' if drained else 'undrain'} {name}: " + "; ".join(problems)
                        + (f" (done on {', '.join(done)})" if done else ""))
    return [o.value for o in outcomes if o.value is not None]


# --- status -------------------------------------------------------------------------------------


@dataclass
class LbStatus:
    """One lb host as lb.status shows it."""

    lb: str
    nginx: str = "?"
    config: str = "?"
    published: str = "?"
    health: str = "?"
    servers: list[Server] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nginx runs a valid, published configuration and answers /health."""
        return (self.nginx, self.config, self.published, self.health) == (
            "active", "ok", "yes", "200")


def status_of(inventory: Inventory, machine: Machine) -> LbStatus:
    """nginx, config test, published site, /health and upstream members of one lb host."""
    status = LbStatus(machine.host.name)
    status.nginx = machine.run("systemctl is-active nginx").stdout.strip() or "unknown"
    test = machine.run("nginx -t 2>&1")
    emerg = [line for line in test.stdout.splitlines() if "[emerg]" in line]
    status.config = "ok" if test.ok else (emerg[-1] if emerg else test.answer)
    same = machine.run(f"test -e {AVAILABLE} && {generate_command(AVAILABLE)} | cmp -s - {LIVE}")
    status.published = "yes" if same.ok else (
        f"no: {AVAILABLE} is not live (a deploy that nginx -t refused?)")
    health = machine.run("curl -s -o /dev/null -w '%{http_code}' --max-time 5 "
                         "http://127.0.0.1/health")
    status.health = health.stdout.strip() or "no answer"
    live = machine.read_file(LIVE)
    status.servers = live_servers(live.decode(), inventory) if live else []
    status.drained = read_drained(machine)
    return status


def status(inventory: Inventory) -> list[Outcome[LbStatus]]:
    """Every lb host's status, in parallel."""
    return each_host(inventory.with_role("lb"), lambda m: status_of(inventory, m),
                     inventory.settings.timeouts)


# --- check --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One request sent through the balancer and who answered it."""

    lb: str
    route: str
    path: str
    expected: str  # the upstream that must answer, or "nginx"
    status: int
    answered_by: tuple[str, ...]  # hosts tried, in order (the last one answered)
    ok: bool


LOG_LINE = re.compile(r'"\w+ (?P<path>\S+) [^"]*" (?P<status>\d{3}) .*'
                      r'upstream="(?P<upstream>[^"]*)" ustatus="[^"]*"$')


def check_on(inventory: Inventory, machine: Machine, *, timeout: float = 10) -> list[Probe]:
    """Probe every route through nginx on the lb host; read who answered from its access log."""
    token = random.token_hex(6)
    agent = f"difyops-check/{token}"
    domain = inventory.settings.domain
    if inventory.settings.tls.mode == "off":
        base, options = "http://127.0.0.1", f"-H {shell.quote('Host: ' + domain)}"
    else:
        base = f"https://{endpoint(domain, 443)}"
        options = f"-k --resolve {shell.quote(f'{domain}:443:127.0.0.1')}"
    table = routes(inventory)
    paths = [path for _, path, _ in table]
    script = "; ".join(
        f"printf '%s %s\\n' {shell.quote(path)} \"$(curl -s -o /dev/null -w '%{{http_code}}' "
        f"--max-time 30 -A {agent} {options} {shell.quote(base + path)})\""
        for path in ["/health", *paths])
    answers = dict(line.split(" ", 1) for line in machine.check(script).stdout.splitlines())

    def logged() -> tuple[bool, dict[str, list[str]]]:
        log = machine.run(f"grep -F {shell.quote(agent)} {ACCESS_LOG}").stdout
        found: dict[str, list[str]] = {}
        for line in log.splitlines():
            match = LOG_LINE.search(line)
            if match:
                found[match["path"]] = [e.strip() for e in re.split(r"[,:] (?=\S)",
                                                                    match["upstream"])
                                        if e.strip()]
        return all(p in found for p in paths), found

    # nginx logs a request as it ends: wait for every line, never for a fixed time
    _, seen = poll(logged, timeout, 0.2)
    members = {u.name: {m.endpoint: m.host for m in u.members} for u in upstreams(inventory)}
    every = {e: h for group in members.values() for e, h in group.items()}
    probes = [Probe(machine.host.name, "/health", "/health", "nginx",
                    int(answers.get("/health", "0") or 0), (), answers.get("/health") == "200")]
    for route, path, expected in table:
        code = int(answers.get(path, "0") or 0)
        tried = seen.get(path, [])
        last = tried[-1] if tried else ""
        probes.append(Probe(machine.host.name, route, path, expected, code,
                            tuple(every.get(e, e) for e in tried),
                            0 < code < 500 and last in members[expected]))
    return probes


def check(inventory: Inventory) -> list[Outcome[list[Probe]]]:
    """Every route probed through every lb host, in parallel."""
    return each_host(inventory.with_role("lb"), lambda m: check_on(inventory, m),
                     inventory.settings.timeouts)
