"""logging tier: Elasticsearch and Kibana on the logging host, rsyslog shipping on every host.

The store (role `logging`): the original plan's ELK by compose, but with security on. The
superuser's password comes from the secrets file; Kibana logs in as kibana_system with a password
of its own; the shippers log in as a user whose role may only add documents to the daily log
indices (create_doc, create_index). A helper script on the host (`es`) talks to the security API
with passwords on stdin: the deploy sets users, role, index template and retention policy when its
`check` says they differ. Ports are published on the host's inventory address only. With
tls.internal (the default) Elasticsearch serves HTTPS with the host's certificate of the
installation's CA (tasks/core/tls.py), which Kibana, the helper and every shipper verify.

The shippers (every Linux host, the logging host too): rsyslog with omelasticsearch, reading the
journal (imjournal) and, where a tier runs Docker, the containers' json logs (imfile), into a
disk-assisted queue that keeps the logs while the store is down. The configuration is written to a
staging file and checked with `rsyslogd -N1` beside the rest of the host's rsyslog configuration
before it replaces the running one: a refused file leaves rsyslog as it was.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.core import shell, tls
from tasks.core.errors import HostError
from tasks.core.gates import CommandGate
from tasks.core.hosts import Machine
from tasks.core.inventory import ROLES, Host, Inventory, endpoint
from tasks.core.netplan import runs_compose
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.render import Renderer, env_quote
from tasks.core.system import packages, reset_failed, service_running
from tasks.core.tiers import Tier
from tasks.core.windows import is_windows
from tasks.tiers.common import wait_bounded

DIRECTORY = "/opt/dify-logging"
PROJECT = "dify-logging"
ES_TOOL = f"{DIRECTORY}/es"
CERTS = f"{DIRECTORY}/certs"  # the CA, the host's certificate and key (tls.internal)
SYSCTL = "/etc/sysctl.d/60-difyops-elasticsearch.conf"
MAX_MAP_COUNT = 262144
RSYSLOG_LIVE = "/etc/rsyslog.d/60-difyops-elasticsearch.conf"
RSYSLOG_STAGED = "/etc/difyops/rsyslog/60-difyops-elasticsearch.conf"
STATS_FILE = "/var/log/difyops-rsyslog-stats.log"
ERROR_FILE = "/var/log/difyops-rsyslog-es-errors.log"
LOGROTATE = "/etc/logrotate.d/difyops-rsyslog"
LOADED_DIR = "/run/difyops"
LOADED = f"{LOADED_DIR}/rsyslog.loaded"  # digest of the configuration rsyslog was restarted with
SPOOL = "/var/spool/rsyslog"
QUEUE = "difyops-es"
STATS_INTERVAL = 10
WRITER_ROLE = "difyops_logs_writer"
# What the shippers may do, and nothing else: add documents (never replace or delete them) and
# create the day's index. No read, no cluster privilege.
WRITER_PRIVILEGES = ("create_doc", "create_index")


def store(inventory: Inventory) -> Host | None:
    """The logging host (the rules allow one), or None when the inventory has none."""
    hosts = inventory.with_role("logging")
    return hosts[0] if hosts else None


def store_url(inventory: Inventory, host: Host) -> str:
    """Elasticsearch's address: https with tls.internal."""
    scheme = "https" if inventory.settings.tls.internal else "http"
    return f"{scheme}://{endpoint(host.address, inventory.settings.logging.es_port)}"


def curl_verifies(inventory: Inventory, ca: str) -> str:
    """curl's option that verifies Elasticsearch with the CA file `ca` (none over http)."""
    return shell.command("--cacert {}", ca) if inventory.settings.tls.internal else ""


def shippers(inventory: Inventory) -> list[Host]:
    """Every host that ships its logs: all Linux hosts once a logging host exists."""
    if store(inventory) is None:
        return []
    return [host for host in inventory.hosts if not is_windows(host)]


def ships_docker(inventory: Inventory, host: Host) -> bool:
    """Whether the host's containers' logs are shipped: where a tier runs Docker."""
    return inventory.settings.logging.ship_docker and runs_compose(inventory, host)


def images(inventory: Inventory) -> dict[str, str]:
    """The store's images as the logging host names them: behind dify.private_registry when one
    is set (inv images.sync pushes them there), else as pulled (behind dify.registry_mirror)."""
    registry = inventory.settings.dify.private_registry.rstrip("/")
    return {name: f"{registry}/{image}" if registry else source
            for (name, image), source in zip(base_images(inventory).items(),
                                             upstream_images(inventory).values(), strict=True)}


def base_images(inventory: Inventory) -> dict[str, str]:
    """The store's images without any registry prefix."""
    logging = inventory.settings.logging
    found = {"elasticsearch": logging.elasticsearch_image}
    if logging.kibana:
        found["kibana"] = logging.kibana_image
    return found


def upstream_images(inventory: Inventory) -> dict[str, str]:
    """The store's images as pulled from upstream (behind dify.registry_mirror)."""
    mirror = inventory.settings.dify.registry_mirror
    return {name: mirror + image for name, image in base_images(inventory).items()}


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """The store on the logging host, then the shipper on every host."""
    plan: list[Step] = []
    if host.has("logging"):
        plan += store_steps(inventory, renderer, host)
    if host in shippers(inventory):
        plan += shipper_steps(inventory, renderer, host)
    return plan


# --- the store ------------------------------------------------------------------------------

def security_bodies(inventory: Inventory) -> dict[str, Any]:
    """The JSON the security and index APIs get, as the helper script sends them."""
    logging = inventory.settings.logging
    pattern = f"{logging.index_prefix}-*"
    role = {"cluster": [], "indices": [{"names": [pattern],
                                        "privileges": list(WRITER_PRIVILEGES)}]}
    privileges = {"index": [{"names": [pattern], "privileges": list(WRITER_PRIVILEGES)}]}
    policy = {"policy": {"phases": {
        "hot": {"min_age": "0ms", "actions": {}},
        "delete": {"min_age": f"{logging.retention_days}d", "actions": {"delete": {}}}}}}
    keyword = {"type": "keyword"}
    template: dict[str, Any] = {
        "index_patterns": [pattern], "priority": 200,
        "template": {
            # One node: no replica (a replica could never be placed and the health stays yellow).
            "settings": {"number_of_shards": 1, "number_of_replicas": 0,
                         "index.lifecycle.name": logging.index_prefix},
            "mappings": {"dynamic": "false", "properties": {
                "@timestamp": {"type": "date"}, "message": {"type": "text"},
                **{name: keyword for name in ("host", "source", "program", "unit", "container",
                                              "stream", "severity")}}}},
    }
    compact = json.dumps(template, sort_keys=True, separators=(",", ":"))
    template["version"] = int(hashlib.sha256(compact.encode()).hexdigest()[:7], 16)
    return {"role_body": role, "privileges_body": privileges, "policy_body": policy,
            "template_body": template, "template_version": template["version"]}


def store_env(inventory: Inventory) -> str:
    """The store's .env (compose and the helper script read it): passwords only."""
    names = ["ELASTIC_PASSWORD", "LOGS_WRITER_PASSWORD"]
    if inventory.settings.logging.kibana:
        names += ["KIBANA_SYSTEM_PASSWORD", "KIBANA_ENCRYPTION_KEY"]
    return "".join(f"{name}={env_quote(inventory.secrets[name])}\n" for name in names)


def publisher(host: Host) -> Callable[[int, int], str]:
    """A compose `ports:` entry that publishes on the host's own address only."""
    return lambda port, target: f"{endpoint(host.address, port)}:{target}"


def store_steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """vm.max_map_count, the compose project, users and roles, then Kibana."""
    logging = inventory.settings.logging
    url = store_url(inventory, host)
    bodies = security_bodies(inventory)
    script = renderer.render("config/logging/es.sh.j2", host, url=url, writer_role=WRITER_ROLE,
                             verify=curl_verifies(inventory, f"{CERTS}/{tls.CA_FILE}"),
                             **{key: json.dumps(value, sort_keys=True, separators=(",", ":"))
                                if isinstance(value, dict) else value
                                for key, value in bodies.items()})
    env = WriteFile(f"{DIRECTORY}/.env", store_env(inventory), mode=0o600, secret=True)
    compose_file = WriteFile(f"{DIRECTORY}/compose.yml",
                             renderer.render("compose/logging.yml.j2", host,
                                             images=images(inventory), publish=publisher(host)))
    compose = f"docker compose --project-directory {DIRECTORY} -p {PROJECT}"
    plan: list[Step] = [packages("curl")]
    if logging.allow_mmap:
        plan += [
            WriteFile(SYSCTL, "# Managed by difyops (logging tier): Elasticsearch maps its index "
                              f"files into memory.\nvm.max_map_count = {MAX_MAP_COUNT}\n"),
            RunCommand(f"raise vm.max_map_count to {MAX_MAP_COUNT} (Elasticsearch)",
                       f"sysctl -q -p {SYSCTL} || {{ echo 'cannot set vm.max_map_count on "
                       f"{host.name} (a container shares its kernel: set it on the machine "
                       f"that runs it), or set logging.allow_mmap: false' >&2; exit 1; }}",
                       unless=f"test \"$(cat /proc/sys/vm/max_map_count)\" -ge {MAX_MAP_COUNT}"),
        ]
    plan += [
        # The image runs Elasticsearch as uid 1000 and gid 0: group root reads the key.
        *tls.service_files(inventory, host, directory=CERTS, owner="root",
                           service="elasticsearch", tier="logging", key_mode=0o640),
        env, compose_file,
        WriteFile(ES_TOOL, script, mode=0o700),
        RunCommand("compose up elasticsearch",
                   wait_bounded(compose, f"{compose} up -d --wait --remove-orphans elasticsearch",
                                logging.health_timeout, "elasticsearch"),
                   on_change=(env.path, compose_file.path)),
        WaitFor(CommandGate(f"elasticsearch _cluster/health on {url} (authenticated)",
                            timeout=logging.health_timeout, interval=2,
                            command=f"{ES_TOOL} health")),
        RunCommand("set users and roles (log writer, kibana_system), index template, retention",
                   f"{ES_TOOL} setup", unless=f"{ES_TOOL} check"),
    ]
    if logging.kibana:
        kibana = f"http://{endpoint(host.address, logging.kibana_port)}/"
        plan += [
            RunCommand("compose up kibana",
                       wait_bounded(compose, f"{compose} up -d --wait --remove-orphans",
                                    logging.health_timeout),
                       on_change=(env.path, compose_file.path)),
            WaitFor(CommandGate(f"kibana on {kibana} (logged in to elasticsearch)",
                                timeout=logging.health_timeout, interval=2,
                                command=shell.command("curl -s -o /dev/null -w '%{{http_code}}' "
                                                      "{} | grep -qx 302", kibana))),
        ]
    return plan


# --- the shippers ---------------------------------------------------------------------------

def rsyslog_check() -> str:
    """rsyslogd -N1 on the host's configuration with the staged file in place of the live one;
    on success the staged file is installed (rsyslog is restarted by the next step)."""
    name = RSYSLOG_LIVE.rsplit("/", 1)[-1]
    return (
        "set -e; work=$(mktemp -d); trap 'rm -rf \"$work\"' EXIT; "
        "mkdir \"$work/d\"; cp -a /etc/rsyslog.d/. \"$work/d/\"; "
        f"install -m 0600 {RSYSLOG_STAGED} \"$work/d/{name}\"; "
        "sed 's#/etc/rsyslog.d/#'\"$work/d/\"'#g' /etc/rsyslog.conf > \"$work/rsyslog.main\"; "
        "if ! out=$(rsyslogd -N1 -f \"$work/rsyslog.main\" 2>&1); then "
        "echo \"$out\" | grep -v 'version .* config validation run' >&2; "
        "echo 'rsyslogd -N1 refused the new configuration; rsyslog keeps the running one' >&2; "
        "exit 1; fi; "
        f"install -m 0600 {RSYSLOG_STAGED} {RSYSLOG_LIVE}"
    )


def writer_login(inventory: Inventory, target: Host) -> str:
    """Probe on a shipper: the store authenticates the writer with the password of the staged
    configuration (read from that file: never on a command line), over a verified TLS link with
    tls.internal."""
    user = inventory.settings.logging.writer_user
    verify = curl_verifies(inventory, tls.HOST_CA)
    script = (f"p=$(sed -n 's/.*pwd=\"\\([^\"]*\\)\".*/\\1/p' {RSYSLOG_STAGED}); "
              f"printf 'user = \"{user}:%s\"\\n' \"$p\" | curl -sf --max-time 5 -K- -o /dev/null "
              f"{verify + ' ' if verify else ''}"
              f"{shell.quote(store_url(inventory, target) + '/_security/_authenticate')}")
    return f"bash -c {shell.quote(script)}"


def rsyslog_current() -> str:
    """Probe: rsyslog runs, restarted by difyops since the live configuration last changed (a
    digest of the file it was restarted with, kept in /run: a reboot starts it with that file)."""
    return (f"systemctl is-active --quiet rsyslog && "
            f"[ \"$(cat {LOADED} 2>/dev/null)\" = \"$(sha256sum < {RSYSLOG_LIVE})\" ]")


def rsyslog_restart() -> str:
    """Restart rsyslog and note which configuration it now runs."""
    return (f"{reset_failed('rsyslog')}systemctl restart rsyslog && mkdir -p {LOADED_DIR} && "
            f"sha256sum < {RSYSLOG_LIVE} > {LOADED}")


def shipper_steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """rsyslog with omelasticsearch, its configuration checked before it goes live."""
    logging = inventory.settings.logging
    target = store(inventory)
    assert target is not None
    config = renderer.render(
        "config/logging/rsyslog-elasticsearch.conf.j2", host, store=target, ca_file=tls.HOST_CA,
        password=inventory.secrets["LOGS_WRITER_PASSWORD"], journal=logging.ship_journal,
        docker=ships_docker(inventory, host), stats_interval=STATS_INTERVAL,
        stats_file=STATS_FILE, error_file=ERROR_FILE, spool=SPOOL)
    rotate = (f"# Managed by difyops (logging tier) for {host.name}.\n"
              f"{STATS_FILE} {ERROR_FILE} {{\n  daily\n  rotate 3\n  maxsize 20M\n"
              f"  missingok\n  notifempty\n  compress\n  copytruncate\n}}\n")
    return [
        packages("rsyslog", "rsyslog-elasticsearch", "curl"),
        *tls.ca_files(inventory, tls.HOST_CA),
        WriteFile(RSYSLOG_STAGED, config, mode=0o600, secret=True),
        # Elasticsearch drops (does not retry) documents it refuses a login for: start shipping
        # only once the store accepts the writer's login (the store host may still be creating it).
        WaitFor(CommandGate(f"the store {target.name} accepts the shippers' login",
                            timeout=logging.health_timeout + 60, interval=2,
                            command=writer_login(inventory, target))),
        RunCommand("check the rsyslog configuration (rsyslogd -N1) and install it",
                   rsyslog_check(), unless=f"cmp -s {RSYSLOG_STAGED} {RSYSLOG_LIVE}"),
        WriteFile(LOGROTATE, rotate),
        service_running("rsyslog"),
        RunCommand("restart rsyslog (new configuration)", rsyslog_restart(),
                   unless=rsyslog_current()),
        WaitFor(CommandGate("rsyslog active", timeout=30, command="systemctl is-active rsyslog")),
    ]


# --- status (read-only) ---------------------------------------------------------------------

@dataclass(frozen=True)
class ShipperState:
    """One host's shipper: rsyslog running, our configuration live, the queue, the store."""

    active: bool
    configured: bool
    queue_size: int | None  # messages waiting (memory + disk), from the last impstats report
    disk_bytes: int  # bytes of the queue on disk (while the store is down for long)
    failed: int | None  # documents Elasticsearch refused (their answers are in the error file)
    reachable: bool  # the store's port answers from this host

    @property
    def ok(self) -> bool:
        """Running with our configuration, and the store reachable."""
        return self.active and self.configured and self.reachable


def parse_stats(text: str) -> dict[str, dict[str, Any]]:
    """The last impstats report per counter set (name -> counters), from the stats file."""
    found: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            entry = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(entry, dict) and "name" in entry:
            found[str(entry["name"])] = entry
    return found


def shipper_state(inventory: Inventory, machine: Machine) -> ShipperState:
    """Ask one host (over its connection): systemd, the live file, the queue, the store."""
    target = store(inventory)
    assert target is not None
    port = inventory.settings.logging.es_port
    active = machine.run("systemctl is-active --quiet rsyslog").ok
    configured = machine.run(f"test -s {RSYSLOG_LIVE}").ok
    stats = parse_stats(machine.run(f"tail -n 200 {STATS_FILE} 2>/dev/null").stdout)
    disk = machine.run(f"cat {SPOOL}/{QUEUE}.* 2>/dev/null | wc -c").stdout.strip()
    probe = shell.quote(f"exec 3<>/dev/tcp/{target.address}/{port}")
    reachable = machine.run(f"timeout 5 bash -c {probe}").ok
    queue = stats.get(f"{QUEUE} queue", {})
    action = stats.get(QUEUE, {})
    return ShipperState(active, configured,
                        int(queue["size"]) if "size" in queue else None,
                        int(disk) if disk.isdigit() else 0,
                        int(action["failed"]) if "failed" in action else None, reachable)


@dataclass(frozen=True)
class StoreState:
    """The store as Elasticsearch answers the superuser."""

    status: str
    nodes: int
    indices: int
    documents: int
    last_document: str  # @timestamp of the newest document ("" when none)
    kibana: str = ""  # HTTP status of Kibana's / ("" when Kibana is off)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Green or yellow, and Kibana (when deployed) ready."""
        return self.status in ("green", "yellow") and self.kibana in ("", "302")


def store_state(inventory: Inventory, machine: Machine) -> StoreState:
    """Cluster health, daily indices and the newest document, through the host's helper."""
    prefix = inventory.settings.logging.index_prefix

    def get(path: str) -> Any:
        result = machine.run(f"{ES_TOOL} get {shell.quote(path)}", timeout=60)
        if not result.ok:
            raise HostError(f"elasticsearch on {machine.host.target}: GET {path} failed: "
                            f"{result.answer}; run `inv logging.deploy`")
        try:
            return json.loads(result.stdout)
        except ValueError as exc:
            raise HostError(f"elasticsearch on {machine.host.target}: GET {path} answered "
                            f"{result.stdout[:120]!r}") from exc

    health = get("/_cluster/health")
    indices = get(f"/_cat/indices/{prefix}-*?format=json&h=index,docs.count")
    newest = get(f"/{prefix}-*/_search?size=1&sort=@timestamp:desc&_source=@timestamp,host")
    hits = newest.get("hits", {}).get("hits", [])
    kibana = ""
    logging = inventory.settings.logging
    if logging.kibana:
        url = f"http://{endpoint(machine.host.address, logging.kibana_port)}/"
        kibana = machine.run(shell.command("curl -s -o /dev/null -w '%{{http_code}}' "
                                           "--max-time 10 {}", url)).stdout.strip() or "-"
    return StoreState(
        status=str(health.get("status", "?")), nodes=int(health.get("number_of_nodes", 0)),
        indices=len(indices),
        documents=sum(int(index.get("docs.count") or 0) for index in indices),
        last_document=str(hits[0].get("_source", {}).get("@timestamp", "")) if hits else "",
        kibana=kibana)


TIER = Tier("logging", "central logging: Elasticsearch + Kibana (security on), rsyslog on every "
                       "host", tuple(ROLES), steps, validate=True)

