"""lb tier: nginx from the OS packages in front of Dify's web, api and plugin daemon.

The site is rendered to sites-available; `publish` puts it live in sites-enabled with the servers
of drained hosts marked `down`, and only when `nginx -t` accepts it: a refused site is taken out
again and the previous live file put back, so neither the running nginx nor its next restart sees
it. Which hosts are drained is state on each lb host (/var/lib/difyops/lb/drained, one name a
line): `inv lb.drain` / `inv lb.undrain` change it and publish (tasks/tiers/lb_ops.py), a deploy
keeps it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from tasks.core import facts, placement, shell
from tasks.core.errors import InputError, Problem
from tasks.core.gates import HttpGate
from tasks.core.inventory import Host, Inventory, endpoint
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.project import display
from tasks.core.render import Renderer
from tasks.core.system import packages, restart_unit, service_running
from tasks.core.tiers import Tier

AVAILABLE = "/etc/nginx/sites-available/dify.conf"  # rendered by the deploy
LIVE = "/etc/nginx/sites-enabled/dify.conf"  # what nginx reads: published from AVAILABLE
WORK = "/etc/nginx/difyops"  # candidate and previous live file (same filesystem as LIVE)
STATE_DIR = "/var/lib/difyops/lb"
DRAINED = f"{STATE_DIR}/drained"
CERT = "/etc/nginx/tls/dify.crt"
KEY = "/etc/nginx/tls/dify.key"
ACME_WEBROOT = "/var/www/acme"
# `inv lb.maintenance`'s pages (tasks/tiers/lb_ops.py): the HTML one's existence is the switch
# nginx checks on every request. Outside the deploy's files, so a deploy keeps the mode.
MAINTENANCE = {"dir": "/var/www/difyops-maintenance", "html": "maintenance.html",
               "json": "maintenance.json"}

# (upstream, role, port): who serves what behind the balancer.
UPSTREAMS = (("dify_api", "api", 5001), ("dify_web", "web", 3000),
             ("dify_plugin_daemon", "plugin_daemon", 5002))
WEBSOCKET = "dify_websocket"
# The api's sign-in, sign-up, password and setup routes, under /console/api and /api (every
# release's controllers register them: tests/unit/test_lb.py reads the sources): their POSTs are
# rate limited per client address (lb.sign_in_rate_per_minute).
SIGN_IN_ROUTES = ("login", "setup", "init", "forgot-password", "email-code-login",
                  "email-register", "reset-password", "activate")


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


def upstream_table(inventory: Inventory) -> list[tuple[str, str, int]]:
    """(upstream, role, port) of this inventory: UPSTREAMS, plus api_websocket on the api hosts
    when collaboration runs (tasks/core/placement.py)."""
    table = list(UPSTREAMS)
    if placement.websocket_enabled(inventory):
        table.append((WEBSOCKET, "api", inventory.settings.app.websocket_port))
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


def routes(inventory: Inventory) -> list[tuple[str, str, str]]:
    """(route, probe path, upstream expected to answer) for every route of the version, as the
    site routes them: config.check lists them, lb.check probes them."""
    profile = inventory.profile.routes
    table = [(p, "dify_api") for p in profile["api"]]
    table += [(p, "dify_plugin_daemon") for p in profile["plugin_daemon"]]
    if placement.websocket_enabled(inventory):
        table += [(p, WEBSOCKET) for p in profile.get("websocket", [])]
    table += [("/_next/static/", "dify_web")]
    table += [(p, "dify_web") for p in profile["web"]]
    return [(route, route if route == "/" else route.rstrip("/") + "/difyops-check", upstream)
            for route, upstream in table]


# --- publishing the site ------------------------------------------------------------------------

# Marks the tagged server lines of drained hosts `down` and clears the mark from the others.
# `drained` is " name name ... " (spaces around every name).
AWK_DRAIN_STATE = (
    '{ if ($0 ~ /; # host=[a-z0-9-]+$/) { name = $NF; sub(/^host=/, "", name); '
    'sub(/ down; # host=/, "; # host="); '
    'if (index(drained, " " name " ")) sub(/; # host=/, " down; # host=") } print }')


def generate_command(source: str, *, state: str = DRAINED) -> str:
    """Shell printing the live site: `source` with the drained hosts' servers marked down."""
    return shell.command('awk -v drained=" $(cat {} 2>/dev/null | tr \'\\n\' \' \') " {} {}',
                         state, AWK_DRAIN_STATE, source)


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
    q = shell.quote
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
    q = shell.quote
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
    return shell.command("test -s {} && openssl x509 -noout {} {} -in {} 2>/dev/null "
                         "| grep -q 'does match'", KEY, check, domain, CERT)


def acme_install_command(domain: str) -> str:
    """Shell copying certbot's lineage for the domain to where nginx reads it, then reloading."""
    live = f"/etc/letsencrypt/live/{domain}"
    return shell.command("install -m 0644 {} {cert} && install -m 0600 {} {key} && nginx -t -q "
                         "&& systemctl reload nginx", f"{live}/fullchain.pem",
                         f"{live}/privkey.pem", cert=CERT, key=KEY)


def acme_command(domain: str, email: str) -> str:
    """certbot http-01 through the webroot nginx serves; renewals rerun the install hook."""
    q = shell.quote
    hook = acme_install_command(domain)
    return (f"certbot certonly --webroot -w {ACME_WEBROOT} -d {q(domain)} --cert-name {q(domain)} "
            f"--email {q(email)} --agree-tos --non-interactive --keep-until-expiring "
            f"--deploy-hook {q(hook)} && {hook}")


def read_pem(inventory: Inventory, key: str) -> tuple[Path, str]:
    """A PEM file named in tls.<key>: ~ and paths relative to the inventory's folder resolved."""
    raw = inventory.settings.tls[key]
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
    tls, domain = inventory.settings.tls, inventory.settings.domain
    mode = tls.mode
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
                       unless=facts.is_directory(ACME_WEBROOT)),
        ]
    return []


# --- the deploy ---------------------------------------------------------------------------------


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """Install nginx, certificate, render the site, publish it past nginx -t, check /health."""
    mode = inventory.settings.tls.mode
    names = ["nginx", "curl", "iproute2"]
    if mode in ("self-signed", "acme"):
        names.append("openssl")
    if mode == "acme":
        names.append("certbot")
    plan: list[Step] = [
        packages(*names),
        RunCommand("remove the default site", "rm -f /etc/nginx/sites-enabled/default",
                   unless=facts.is_absent("/etc/nginx/sites-enabled/default")),
        *tls_steps(inventory),
        WriteFile(AVAILABLE, renderer.render("nginx/dify.conf.j2", host,
                                             upstreams=upstreams(inventory),
                                             sign_in_routes=SIGN_IN_ROUTES,
                                             maintenance=MAINTENANCE)),
        RunCommand("publish the site (drained hosts stay down) if nginx -t accepts it",
                   publish_command(), on_change=(AVAILABLE,)),
        RunCommand("validate with nginx -t", "nginx -t -q", changes=False),
        service_running("nginx"),
    ]
    if mode == "file":
        plan.append(RunCommand("reload nginx for the new certificate",
                               "nginx -t -q && systemctl reload nginx", on_change=(CERT, KEY)))
    if mode == "acme":
        domain = inventory.settings.domain
        plan.append(RunCommand(f"ACME certificate for {domain} (certbot, http-01)",
                               acme_command(domain, inventory.settings.tls.acme_email),
                               unless=shell.command("cmp -s {} {}", f"/etc/letsencrypt/live/"
                                                    f"{domain}/fullchain.pem", CERT)))
    plan.append(WaitFor(HttpGate("nginx /health", timeout=30,
                                 url=f"http://{endpoint(host.address, 80)}/health"),
                        restart=restart_unit("nginx")))
    return plan


TIER = Tier("lb", "nginx load balancer", ("lb",), steps,
            depends_on=("app",), validate=True)
