"""lb tier: nginx from the OS packages in front of Dify's web, api and plugin daemon.

The site is rendered to sites-available; `publish` puts it live in sites-enabled with the servers
of drained hosts marked `down`, and only when `nginx -t` accepts it: a refused site is taken out
again and the previous live file put back, so neither the running nginx nor its next restart sees
it. Which hosts are drained is state on each lb host (/var/lib/difyops/lb/drained, one name a
line): `inv lb.drain` / `inv lb.undrain` change it and publish, a deploy keeps it.

drain, undrain, status and check are plain functions: tasks/lb.py prints them, and the app tier's
rolling upgrade calls drain and undrain around each host it replaces.
"""

from __future__ import annotations

import ipaddress
import re
import secrets as random
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tasks.core import placement
from tasks.core.errors import DifyopsError, HostError, InputError, Problem
from tasks.core.fleet import Outcome, each_host
from tasks.core.gates import HttpGate, poll
from tasks.core.hosts import Machine
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.project import display
from tasks.core.render import Renderer
from tasks.core.tiers import Tier
from tasks.tiers.common import packages, restart_unit, service_running

AVAILABLE = "/etc/nginx/sites-available/dify.conf"  # rendered by the deploy
LIVE = "/etc/nginx/sites-enabled/dify.conf"  # what nginx reads: published from AVAILABLE
WORK = "/etc/nginx/difyops"  # candidate and previous live file (same filesystem as LIVE)
STATE_DIR = "/var/lib/difyops/lb"
DRAINED = f"{STATE_DIR}/drained"
CERT = "/etc/nginx/tls/dify.crt"
KEY = "/etc/nginx/tls/dify.key"
ACME_WEBROOT = "/var/www/acme"
ACCESS_LOG = "/var/log/nginx/dify.access.log"

# (upstream, role, port): who serves what behind the balancer.
UPSTREAMS = (("dify_api", "api", 5001), ("dify_web", "web", 3000),
             ("dify_plugin_daemon", "plugin_daemon", 5002))
WEBSOCKET = "dify_websocket"
HOST_TAG = re.compile(r"; # host=([a-z0-9-]+)$")


# --- the upstreams ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One server line of an upstream: the inventory host and the address:port nginx uses."""

    host: str
    endpoint: str


@dataclass(frozen=True)
class Upstream:
    """An nginx upstream and its members, from the hosts playing its role."""

    name: str
    role: str
    port: int
    members: tuple[Member, ...]
    # A client keeps its server (by address) across requests: socket.io's polling and its
    # upgraded connection must reach the same api_websocket.
    sticky: bool = False

    @property
    def drainable(self) -> bool:
        """Whether its members can be drained (the only member of an upstream never is)."""
        return len(self.members) > 1


def endpoint(address: str, port: int) -> str:
    """address:port as nginx and ss write it ([v6]:port)."""
    try:
        if ipaddress.ip_address(address).version == 6:
            return f"[{address}]:{port}"
    except ValueError:
        pass
    return f"{address}:{port}"


def upstream_table(inventory: Inventory) -> list[tuple[str, str, int]]:
    """(upstream, role, port) of this inventory: UPSTREAMS, plus api_websocket on the api hosts
    when collaboration runs (tasks/core/placement.py)."""
    table = list(UPSTREAMS)
    if placement.websocket_enabled(inventory):
        table.append((WEBSOCKET, "api", inventory.settings["app"]["websocket_port"]))
    return table


def upstreams(inventory: Inventory) -> list[Upstream]:
    """The balancer's upstreams; a role without hosts is refused (nginx would refuse it too)."""
    result, problems = [], []
    for name, role, port in upstream_table(inventory):
        hosts = inventory.with_role(role)
        if not hosts:
            problems.append(Problem(display(inventory.file), "hosts[*].roles",
                                    f"the load balancer needs a host with role {role!r} "
                                    f"(upstream {name})", f"add {role!r} to the roles of a host"))
        result.append(Upstream(name, role, port, tuple(
            Member(h.name, endpoint(h.address, port)) for h in hosts),
            sticky=name == WEBSOCKET and len(hosts) > 1))
    if problems:
        raise InputError(problems)
    return result


# --- publishing the site ------------------------------------------------------------------------

# Marks the tagged server lines of drained hosts `down` and clears the mark from the others.
# `drained` is " name name ... " (spaces around every name).
AWK_DRAIN_STATE = (
    '{ if ($0 ~ /; # host=[a-z0-9-]+$/) { name = $NF; sub(/^host=/, "", name); '
    'sub(/ down; # host=/, "; # host="); '
    'if (index(drained, " " name " ")) sub(/; # host=/, " down; # host=") } print }')


def generate_command(source: str, *, state: str = DRAINED) -> str:
    """Shell printing the live site: `source` with the drained hosts' servers marked down."""
    return (f'awk -v drained=" $(cat {shlex.quote(state)} 2>/dev/null | tr \'\\n\' \' \') " '
            f'{shlex.quote(AWK_DRAIN_STATE)} {shlex.quote(source)}')


def publish_command(source: str = AVAILABLE, *, live: str = LIVE, work: str = WORK,
                    state: str = DRAINED, test: str = "nginx -t",
                    reload: str = "if systemctl is-active --quiet nginx; then "
                                  "systemctl reload nginx; fi") -> str:
    """Shell that makes `live` the drained-state rendering of `source`, if `test` accepts it.

    Prints `unchanged` when the live file is already right (nothing reloaded), else installs the
    candidate, runs `test` (nginx -t) and either reloads nginx (graceful: workers finish their
    requests) and prints `published`, or puts the previous live file back (or removes a first
    one) and exits 1 with nginx's complaint as the last line.
    """
    q = shlex.quote
    candidate, previous = q(f"{work}/dify.conf.next"), q(f"{work}/dify.conf.previous")
    staged = q(f"{work}/dify.conf.staged")
    live_q = q(live)
    return "\n".join([
        "set -u",
        "umask 022",
        f"if [ ! -e {q(source)} ]; then echo 'no site at {source}: deploy the lb tier first "
        f"(inv lb.deploy)' >&2; exit 1; fi",
        f"mkdir -p {q(work)} || exit 1",
        f"{generate_command(source, state=state)} > {candidate} || exit 1",
        f"if cmp -s {candidate} {live_q}; then echo unchanged; exit 0; fi",
        f"if [ -e {live_q} ]; then cp {live_q} {previous} || exit 1; "
        f"else rm -f {previous}; fi",
        f"cp {candidate} {staged} && chmod 0644 {staged} && mv -f {staged} {live_q} || exit 1",
        f"if ! out=$({test} 2>&1); then",
        f"  if [ -e {previous} ]; then mv -f {previous} {live_q}; else rm -f {live_q}; fi",
        '  why=$(printf "%s\\n" "$out" | grep -F "[emerg]" | tail -n 1)',
        '  printf "%s\\n" "$out" >&2',
        '  echo "nginx -t refused the new site; the previous one stays live: '
        '${why:-$(printf "%s\\n" "$out" | tail -n 1)}" >&2',
        "  exit 1",
        "fi",
        f"{reload} || exit 1",
        "echo published",
    ])


# --- TLS ----------------------------------------------------------------------------------------


def is_ip(value: str) -> bool:
    """Whether a domain setting is an IP address."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def reload_if_running() -> str:
    """Shell: validate and reload nginx when it runs a published site (else nothing to do)."""
    return (f"if systemctl is-active --quiet nginx && [ -e {LIVE} ]; then "
            f"nginx -t -q && systemctl reload nginx; fi")


def self_signed_command(domain: str) -> str:
    """Shell generating a self-signed pair for the domain on the lb host (key 0600)."""
    kind = "IP" if is_ip(domain) else "DNS"
    q = shlex.quote
    return (f"install -d -m 0755 {q(str(Path(CERT).parent))} && "
            f"out=$(umask 077 && openssl req -x509 -newkey rsa:2048 -nodes -days 825 "
            f"-subj {q('/CN=' + domain)} -addext {q(f'subjectAltName={kind}:{domain}')} "
            f"-keyout {KEY}.new -out {CERT}.new 2>&1) "
            f"|| {{ printf '%s\\n' \"$out\" | tail -n 3 >&2; exit 1; }}; "
            f"chmod 0600 {KEY}.new && chmod 0644 {CERT}.new && mv -f {KEY}.new {KEY} && "
            f"mv -f {CERT}.new {CERT} && {reload_if_running()}")


def self_signed_probe(domain: str) -> str:
    """Shell exiting 0 when a pair is there whose certificate names the domain."""
    check = "-checkip" if is_ip(domain) else "-checkhost"
    return (f"test -s {KEY} && openssl x509 -noout {check} {shlex.quote(domain)} -in {CERT} "
            f"2>/dev/null | grep -q 'does match'")


def acme_install_command(domain: str) -> str:
    """Shell copying certbot's lineage for the domain to where nginx reads it, then reloading."""
    live = f"/etc/letsencrypt/live/{domain}"
    return (f"install -m 0644 {live}/fullchain.pem {CERT} && "
            f"install -m 0600 {live}/privkey.pem {KEY} && nginx -t -q && systemctl reload nginx")


def acme_command(domain: str, email: str) -> str:
    """certbot http-01 through the webroot nginx serves; renewals rerun the install hook."""
    q = shlex.quote
    hook = acme_install_command(domain)
    return (f"certbot certonly --webroot -w {ACME_WEBROOT} -d {q(domain)} --cert-name {q(domain)} "
            f"--email {q(email)} --agree-tos --non-interactive --keep-until-expiring "
            f"--deploy-hook {q(hook)} && {hook}")


def read_pem(inventory: Inventory, key: str) -> tuple[Path, str]:
    """A PEM file named in tls.<key>: ~ and paths relative to the inventory's folder resolved."""
    raw = inventory.settings["tls"][key]
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (inventory.file.parent / path).resolve()
    try:
        return path, path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError([Problem(display(inventory.file), f"tls.{key}",
                                  f"cannot read {path}: {exc}",
                                  "give the path of a PEM file on this machine")]) from exc


def certificate_files(inventory: Inventory) -> tuple[str, str]:
    """tls mode file: (certificate chain, key), checked to be a matching pair before any host."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    shown = display(inventory.file)
    cert_path, cert_text = read_pem(inventory, "cert_file")
    key_path, key_text = read_pem(inventory, "key_file")
    try:
        certificate = x509.load_pem_x509_certificates(cert_text.encode())[0]
    except ValueError as exc:
        raise InputError([Problem(shown, "tls.cert_file", f"{cert_path} is not a PEM "
                                  f"certificate: {exc}", "give the certificate chain (PEM), "
                                  "the server certificate first")]) from exc
    try:
        private_key = serialization.load_pem_private_key(key_text.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise InputError([Problem(shown, "tls.key_file", f"{key_path} is not an unencrypted PEM "
                                  f"private key: {exc}", "give the key without a passphrase "
                                  "(nginx cannot ask for one)")]) from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (certificate.public_key().public_bytes(serialization.Encoding.PEM, public)
            != private_key.public_key().public_bytes(serialization.Encoding.PEM, public)):
        raise InputError([Problem(shown, "tls.key_file",
                                  f"{key_path} is not the key of the certificate in {cert_path}",
                                  "give the key the certificate was issued for")])
    return cert_text, key_text


def tls_steps(inventory: Inventory) -> list[Step]:
    """The certificate nginx serves: shipped (file), made on the host (self-signed), or ACME."""
    tls, domain = inventory.settings["tls"], inventory.settings["domain"]
    mode = tls["mode"]
    if mode == "file":
        cert, key = certificate_files(inventory)
        return [WriteFile(KEY, key, mode=0o600, secret=True),
                WriteFile(CERT, cert, mode=0o644, secret=True)]
    if mode == "self-signed":
        return [RunCommand(f"self-signed certificate for {domain}", self_signed_command(domain),
                           unless=self_signed_probe(domain))]
    if mode == "acme":
        return [
            # nginx needs a certificate to start: a placeholder until certbot's is installed.
            RunCommand(f"placeholder certificate for {domain} (until ACME issues one)",
                       self_signed_command(domain), unless=f"test -s {KEY} && test -s {CERT}"),
            RunCommand(f"ACME webroot {ACME_WEBROOT}", f"install -d -m 0755 {ACME_WEBROOT}",
                       unless=f"test -d {ACME_WEBROOT}"),
        ]
    return []


# --- the deploy ---------------------------------------------------------------------------------


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """Install nginx, certificate, render the site, publish it past nginx -t, check /health."""
    mode = inventory.settings["tls"]["mode"]
    names = ["nginx", "curl", "iproute2"]
    if mode in ("self-signed", "acme"):
        names.append("openssl")
    if mode == "acme":
        names.append("certbot")
    plan: list[Step] = [
        packages(*names),
        RunCommand("remove the default site", "rm -f /etc/nginx/sites-enabled/default",
                   unless="test ! -e /etc/nginx/sites-enabled/default"),
        *tls_steps(inventory),
        WriteFile(AVAILABLE, renderer.render("nginx/dify.conf.j2", host,
                                             upstreams=upstreams(inventory))),
        RunCommand("publish the site (drained hosts stay down) if nginx -t accepts it",
                   publish_command(), on_change=(AVAILABLE,)),
        RunCommand("validate with nginx -t", "nginx -t -q", changes=False),
        service_running("nginx"),
    ]
    if mode == "file":
        plan.append(RunCommand("reload nginx for the new certificate",
                               "nginx -t -q && systemctl reload nginx", on_change=(CERT, KEY)))
    if mode == "acme":
        domain = inventory.settings["domain"]
        plan.append(RunCommand(f"ACME certificate for {domain} (certbot, http-01)",
                               acme_command(domain, inventory.settings["tls"]["acme_email"]),
                               unless=f"cmp -s /etc/letsencrypt/live/{domain}/fullchain.pem "
                                      f"{CERT}"))
    plan.append(WaitFor(HttpGate("nginx /health", timeout=30, url=f"http://{host.address}/health"),
                        restart=restart_unit("nginx")))
    return plan


TIER = Tier("lb", "nginx load balancer", ("lb",), steps,
            depends_on=("app",), validate=True)


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
            found = machine.run(f"getent ahosts {shlex.quote(address)}").stdout.split()
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
                        wait=inventory.settings["lb"]["drain_wait"] if wait is None else wait,
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
    timeouts = inventory.settings["timeouts"]
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
                     inventory.settings["timeouts"])


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


def routes(inventory: Inventory) -> list[tuple[str, str, str]]:
    """(route, probe path, upstream expected to answer) for every route of the version."""
    profile = inventory.profile.routes
    table = [(p, "dify_api") for p in profile["api"]]
    table += [(p, "dify_plugin_daemon") for p in profile["plugin_daemon"]]
    if placement.websocket_enabled(inventory):
        table += [(p, WEBSOCKET) for p in profile.get("websocket", [])]
    table += [("/_next/static/", "dify_web")]
    table += [(p, "dify_web") for p in profile["web"]]
    return [(route, route if route == "/" else route.rstrip("/") + "/difyops-check", upstream)
            for route, upstream in table]


LOG_LINE = re.compile(r'"\w+ (?P<path>\S+) [^"]*" (?P<status>\d{3}) .*'
                      r'upstream="(?P<upstream>[^"]*)" ustatus="[^"]*"$')


def check_on(inventory: Inventory, machine: Machine, *, timeout: float = 10) -> list[Probe]:
    """Probe every route through nginx on the lb host; read who answered from its access log."""
    token = random.token_hex(6)
    agent = f"difyops-check/{token}"
    domain = inventory.settings["domain"]
    if inventory.settings["tls"]["mode"] == "off":
        base, options = "http://127.0.0.1", f"-H {shlex.quote('Host: ' + domain)}"
    else:
        base = f"https://{endpoint(domain, 443)}"
        options = f"-k --resolve {shlex.quote(f'{domain}:443:127.0.0.1')}"
    table = routes(inventory)
    paths = [path for _, path, _ in table]
    script = "; ".join(
        f"printf '%s %s\\n' {shlex.quote(path)} \"$(curl -s -o /dev/null -w '%{{http_code}}' "
        f"--max-time 30 -A {agent} {options} {shlex.quote(base + path)})\""
        for path in ["/health", *paths])
    answers = dict(line.split(" ", 1) for line in machine.check(script).stdout.splitlines())

    def logged() -> tuple[bool, dict[str, list[str]]]:
        log = machine.run(f"grep -F {shlex.quote(agent)} {ACCESS_LOG}").stdout
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
                     inventory.settings["timeouts"])
