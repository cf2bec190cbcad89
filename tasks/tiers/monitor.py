"""monitor tier: exporters on every host; Prometheus, Alertmanager and Grafana on the monitor host.

Every exporter comes from the OS packages, runs under systemd and listens on its host's inventory
address only (the address Prometheus scrapes). Prometheus, Alertmanager and the blackbox exporter
run natively from the OS packages on the monitor host too: the same binaries the seed's images
hold, with systemd units, log rotation and security updates from the distribution, and the real
thing in the tests. Grafana, which no distribution package provides, runs by compose as in the
seed, with its admin password from the secrets file and provisioned data sources and dashboards.

The Prometheus/Alertmanager/blackbox configuration is written to a staging folder, checked there
with promtool, amtool and the blackbox exporter's own --config.check, and only then copied to the
folder the services read: a broken rule leaves the running configuration as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import yaml

from tasks.core import facts, shell
from tasks.core.errors import HostError
from tasks.core.gates import CommandGate, HttpGate
from tasks.core.inventory import ROLES, Host, Inventory, endpoint
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.project import CONFIG_DIR
from tasks.core.render import Renderer
from tasks.core.rules import extra_rules_path
from tasks.core.system import packages, restart_unit, service_restart, service_running
from tasks.core.tiers import Tier
from tasks.tiers.cache import CA as REDIS_CA
from tasks.tiers.cache import serves_tls as redis_serves_tls
from tasks.tiers.common import compose_up, restart_compose

PORTS = {"node": 9100, "postgres": 9187, "redis": 9121, "nginx": 9113, "nginx-log": 3903,
         "blackbox": 9115, "prometheus": 9090, "alertmanager": 9093, "weaviate": 2112}
GRAFANA_TIMEOUT = 180  # seconds Grafana may take to answer /api/health
NGINX_STATUS_PORT = 8089  # nginx stub_status, on 127.0.0.1 only, read by the nginx exporter
STAGED = "/etc/prometheus/difyops.next"  # written and checked here ...
LIVE = "/etc/prometheus/difyops"  # ... then copied here, where the services read it
STAGED_FILES = ("prometheus.yml", "rules/dify.yml", "alertmanager.yml", "blackbox.yml")
EXTRA_RULES = "rules/extra.yml"  # monitor.extra_rules, the operator's own, checked the same way
POSTGRES_QUERIES = "/etc/prometheus/postgres-exporter-queries.yml"
MONITOR_ROLE_SQL = "/etc/difyops/monitor-role.sql"
MONITOR_DB_ROLE = "difyops_monitor"
GRAFANA_DIR = "/opt/dify-monitor"
DASHBOARD_SPEC = CONFIG_DIR / "grafana" / "dashboards.yml"
DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_seconds(text: str) -> int:
    """A Prometheus duration (26h, 1h30m) in seconds."""
    return int(sum(int(n) * SECONDS[unit] for n, unit in DURATION_PART.findall(text)))


def watched(inventory: Inventory) -> list[Host]:
    """The hosts that get exporters: all of them when a monitor host exists (not Windows
    workstations, which run only the web front end from source)."""
    if not inventory.with_role("monitor"):
        return []
    return [host for host in inventory.hosts if set(host.roles) != {"dev_frontend"}]


def postgres_hosts(inventory: Inventory) -> list[Host]:
    """Every PostgreSQL difyops runs: the db tier's, and a vector host's when pgvector is there."""
    extra = inventory.with_role("vector") if inventory.settings.vector.store == \
        "pgvector" else []
    return [host for host in inventory.hosts
            if host.has("db_primary", "db_replica") or host in extra]


def writable_postgres(inventory: Inventory, host: Host) -> bool:
    """A PostgreSQL that accepts writes (the primary, or a pgvector host of its own)."""
    return host in postgres_hosts(inventory) and not host.has("db_replica")


def context(inventory: Inventory) -> dict[str, Any]:
    """Names the monitor templates use besides the renderer's own."""
    return {"ports": PORTS, "duration_seconds": duration_seconds,
            "watched": watched(inventory), "postgres_hosts": postgres_hosts(inventory),
            "nginx_status_port": NGINX_STATUS_PORT}


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """The exporters this host's roles need; the monitoring services on the monitor host."""
    if host not in watched(inventory):
        return []
    extra = context(inventory)
    names = ["prometheus-node-exporter"]
    if host in postgres_hosts(inventory):
        names.append("prometheus-postgres-exporter")
    if host.has("cache", "broker"):
        names.append("prometheus-redis-exporter")
    if host.has("lb"):
        names += ["prometheus-nginx-exporter", "mtail"]
    if host.has("monitor"):
        names += ["prometheus", "prometheus-alertmanager", "prometheus-blackbox-exporter"]
    plan: list[Step] = [packages(*names)]
    plan += exporter("prometheus-node-exporter", host, PORTS["node"],
                     f'ARGS="--web.listen-address={endpoint(host.address, PORTS["node"])} '
                     f'--collector.textfile.directory=/var/lib/prometheus/node-exporter"\n')
    if host in postgres_hosts(inventory):
        plan += postgres_exporter(inventory, renderer, host, extra)
    if host.has("cache", "broker"):
        plan += redis_exporter(inventory, host)
    if host.has("lb"):
        plan += nginx_exporters(renderer, host, extra)
    if host.has("monitor"):
        plan += monitoring_services(inventory, renderer, host, extra)
    return plan


def exporter(unit: str, host: Host, port: int, defaults: str, *, secret: bool = False,
             before: tuple[Step, ...] = (), files: tuple[str, ...] = ()) -> list[Step]:
    """An exporter's /etc/default file, its unit enabled, restarted on change, then listening."""
    default = f"/etc/default/{unit}"
    header = f"# Managed by difyops (monitor tier) for {host.name}.\n"
    return [
        WriteFile(default, header + defaults, mode=0o600 if secret else 0o644, secret=secret),
        *before,
        service_running(unit),
        service_restart(unit, default, *files),
        WaitFor(CommandGate(f"{unit} on {endpoint(host.address, port)}", timeout=60,
                            command=listening(host.address, port)), restart=restart_unit(unit)),
    ]


def listening(address: str, port: int) -> str:
    """A probe on the host itself: something accepts TCP connections on address:port."""
    return f"timeout 5 bash -c {shell.quote(f'exec 3<>/dev/tcp/{address}/{port}')}"


def postgres_exporter(inventory: Inventory, renderer: Renderer, host: Host,
                      extra: dict[str, Any]) -> list[Step]:
    """postgres_exporter as a pg_monitor role over the local socket, plus a replication query."""
    port = inventory.settings.db.port
    password = inventory.secrets["MONITOR_DB_PASSWORD"]
    dsn = (f"host=/run/postgresql port={port} dbname=postgres user={MONITOR_DB_ROLE} "
           f"password={password} sslmode=disable")
    address = endpoint(host.address, PORTS["postgres"])
    defaults = (f"DATA_SOURCE_NAME='{dsn}'\n"
                f'ARGS="--web.listen-address={address} '
                f'--extend.query-path={POSTGRES_QUERIES}"\n')
    queries = WriteFile(POSTGRES_QUERIES,
                        renderer.render("config/prometheus/postgres-exporter-queries.yml.j2",
                                        host, **extra))
    role: tuple[Step, ...] = ()
    if writable_postgres(inventory, host):
        # The exporter's own login (never a password prompt: -w, no stdin).
        probe = ("test -r /etc/default/prometheus-postgres-exporter && "
                 ". /etc/default/prometheus-postgres-exporter && "
                 "PGCONNECT_TIMEOUT=5 psql -w \"$DATA_SOURCE_NAME\" -Atc "
                 + shell.quote("SELECT pg_has_role(current_user, 'pg_monitor', 'MEMBER')")
                 + " </dev/null | grep -qx t")
        role = (
            WriteFile(MONITOR_ROLE_SQL, renderer.render("config/prometheus/monitor-role.sql.j2",
                                                        host, role=MONITOR_DB_ROLE),
                      mode=0o600, owner="postgres", group="postgres", secret=True),
            RunCommand("create the metrics role (pg_monitor)",
                       f"runuser -u postgres -- psql -q -p {port} -v ON_ERROR_STOP=1 "
                       f"-f {MONITOR_ROLE_SQL}", unless=probe),
        )
    return [queries, *exporter("prometheus-postgres-exporter", host, PORTS["postgres"], defaults,
                               secret=True, before=role, files=(POSTGRES_QUERIES,))]


def redis_exporter(inventory: Inventory, host: Host) -> list[Step]:
    """redis_exporter against the local Redis as its user monitor (over TLS, verified with the
    CA, where it serves TLS only), the password in the environment file."""
    port = inventory.settings.cache.port
    address = endpoint(host.address, PORTS["redis"])
    target = (f"rediss://127.0.0.1:{port} -tls-ca-cert-file {REDIS_CA}"
              if redis_serves_tls(inventory, host) else f"redis://127.0.0.1:{port}")
    defaults = (f"REDIS_PASSWORD={inventory.secrets['REDIS_MONITOR_PASSWORD']}\n"
                f'ARGS="-web.listen-address {address} -redis.addr {target} '
                f'-redis.user monitor"\n')
    return exporter("prometheus-redis-exporter", host, PORTS["redis"], defaults, secret=True)


def nginx_exporters(renderer: Renderer, host: Host, extra: dict[str, Any]) -> list[Step]:
    """nginx's stub_status on 127.0.0.1 for the nginx exporter; mtail counts answers by status."""
    status_conf = "/etc/nginx/conf.d/difyops-status.conf"
    program = "/etc/mtail/dify-nginx.mtail"
    scrape = f"http://127.0.0.1:{NGINX_STATUS_PORT}/stub_status"
    nginx_defaults = (f'ARGS="-nginx.scrape-uri={scrape} '
                      f'-web.listen-address={endpoint(host.address, PORTS["nginx"])}"\n')
    # Both nginx's own log and the Dify site's (nginx/dify.conf.j2); mtail expands the glob.
    mtail_defaults = (f"LOGS=/var/log/nginx/*access.log\nHOST={host.address}\n"
                      f"PORT={PORTS['nginx-log']}\n")
    return [
        WriteFile(status_conf, renderer.render("config/prometheus/nginx-status.conf.j2", host,
                                               **extra)),
        RunCommand("reload nginx (status endpoint)", "nginx -t -q && systemctl reload nginx",
                   on_change=(status_conf,)),
        *exporter("prometheus-nginx-exporter", host, PORTS["nginx"], nginx_defaults),
        WriteFile(program, renderer.render("config/prometheus/nginx.mtail", host)),
        *exporter("mtail", host, PORTS["nginx-log"], mtail_defaults, files=(program,)),
    ]


def monitoring_services(inventory: Inventory, renderer: Renderer, host: Host,
                        extra: dict[str, Any]) -> list[Step]:
    """Prometheus, Alertmanager, blackbox exporter (checked, then installed), then Grafana."""
    monitor = inventory.settings.monitor
    templates = {"prometheus.yml": "config/prometheus/prometheus.yml.j2",
                 "rules/dify.yml": "config/prometheus/rules.yml.j2",
                 "alertmanager.yml": "config/alertmanager/alertmanager.yml.j2",
                 "blackbox.yml": "config/prometheus/blackbox.yml.j2"}
    staged = [WriteFile(f"{STAGED}/{name}", renderer.render(template, host, **extra),
                        mode=0o640, group="prometheus",
                        secret=name == "alertmanager.yml" and bool(monitor.alert_webhook))
              for name, template in templates.items()]
    extra_rules = f"{STAGED}/{EXTRA_RULES}"
    if monitor.extra_rules:
        staged.append(WriteFile(extra_rules, extra_rules_path(inventory).read_text(),
                                mode=0o640, group="prometheus"))
    staged_paths = tuple(step.path for step in staged)
    listen = {name: endpoint(host.address, PORTS[name])
              for name in ("prometheus", "alertmanager", "blackbox")}
    defaults = {
        "prometheus": f'ARGS="--config.file={LIVE}/prometheus.yml '
                      f'--web.listen-address={listen["prometheus"]} '
                      f'--storage.tsdb.path=/var/lib/prometheus/metrics2/ '
                      f'--storage.tsdb.retention.time={monitor.retention}"\n',
        "prometheus-alertmanager": f'ARGS="--config.file={LIVE}/alertmanager.yml '
                                   f'--web.listen-address={listen["alertmanager"]} '
                                   f'--cluster.listen-address="\n',
        "prometheus-blackbox-exporter": f'ARGS="--config.file={LIVE}/blackbox.yml '
                                        f'--web.listen-address={listen["blackbox"]}"\n',
    }
    plan: list[Step] = [*staged]
    if not monitor.extra_rules:
        plan.append(RunCommand("remove the operator's extra rules (none configured)",
                               f"rm -f {extra_rules}", unless=facts.is_absent(extra_rules)))
    plan += [
        RunCommand("check the configuration (promtool, amtool, blackbox --config.check)",
                   f"promtool check config {STAGED}/prometheus.yml "
                   f"&& amtool check-config {STAGED}/alertmanager.yml "
                   f"&& prometheus-blackbox-exporter --config.check "
                   f"--config.file={STAGED}/blackbox.yml",
                   changes=False),
        RunCommand("install the checked configuration",
                   f"rm -rf {LIVE}.tmp && cp -a {STAGED} {LIVE}.tmp && rm -rf {LIVE} "
                   f"&& mv {LIVE}.tmp {LIVE}",
                   unless=f"diff -r {STAGED} {LIVE} >/dev/null 2>&1"),
    ]
    for unit, text in defaults.items():
        plan.append(WriteFile(f"/etc/default/{unit}",
                              f"# Managed by difyops (monitor tier) for {host.name}.\n{text}"))
    for unit in defaults:
        plan += [service_running(unit), service_restart(unit, f"/etc/default/{unit}")]
    plan += [
        RunCommand("reload prometheus, alertmanager and blackbox exporter",
                   "systemctl reload prometheus prometheus-alertmanager "
                   "prometheus-blackbox-exporter", on_change=staged_paths),
        WaitFor(HttpGate("prometheus ready", timeout=90, interval=1,
                         url=f"http://{listen['prometheus']}/-/ready"),
                restart=restart_unit("prometheus")),
        WaitFor(HttpGate("alertmanager ready", timeout=60, interval=1,
                         url=f"http://{listen['alertmanager']}/-/ready"),
                restart=restart_unit("prometheus-alertmanager")),
        WaitFor(CommandGate(f"blackbox exporter on {listen['blackbox']}", timeout=60,
                            command=listening(host.address, PORTS["blackbox"])),
                restart=restart_unit("prometheus-blackbox-exporter")),
    ]
    if monitor.grafana:
        plan += grafana(inventory, renderer, host, extra)
    return plan


def grafana(inventory: Inventory, renderer: Renderer, host: Host,
            extra: dict[str, Any]) -> list[Step]:
    """Grafana by compose: admin password from secrets, provisioned data sources, dashboards."""
    env = WriteFile(f"{GRAFANA_DIR}/.env",
                    f"GRAFANA_ADMIN_PASSWORD={inventory.secrets['GRAFANA_ADMIN_PASSWORD']}\n",
                    mode=0o600, secret=True)
    files = [
        env,
        WriteFile(f"{GRAFANA_DIR}/compose.yml",
                  renderer.render("compose/monitor.yml.j2", host, **extra)),
        WriteFile(f"{GRAFANA_DIR}/provisioning/datasources/difyops.yml",
                  renderer.render("config/grafana/datasources.yml.j2", host, **extra)),
        WriteFile(f"{GRAFANA_DIR}/provisioning/dashboards/difyops.yml",
                  renderer.render("config/grafana/dashboard-provider.yml.j2", host, **extra)),
        *[WriteFile(f"{GRAFANA_DIR}/dashboards/{name}.json", content)
          for name, content in dashboards().items()],
    ]
    compose = f"docker compose --project-directory {GRAFANA_DIR} -p dify-monitor"
    port = inventory.settings.monitor.grafana_port
    return [
        *files,
        compose_up(GRAFANA_DIR, "dify-monitor", *(step.path for step in files),
                   wait_timeout=GRAFANA_TIMEOUT),
        WaitFor(HttpGate("grafana /api/health", timeout=GRAFANA_TIMEOUT, interval=2,
                         url=f"http://{endpoint(host.address, port)}/api/health"),
                restart=restart_compose(GRAFANA_DIR, "dify-monitor", "grafana")),
        # The environment only seeds the password of a new Grafana database: keep it in step.
        RunCommand("set grafana's admin password from the secrets file",
                   f"{compose} exec -T grafana sh -c 'printf %s \"$GF_SECURITY_ADMIN_PASSWORD\" "
                   f"| grafana cli admin reset-admin-password --password-from-stdin'",
                   on_change=(env.path,)),
    ]


@cache
def dashboards() -> dict[str, str]:
    """Grafana dashboards (JSON) built from config/grafana/dashboards.yml: name -> content."""
    spec = yaml.safe_load(DASHBOARD_SPEC.read_text())
    built = {}
    for name, board in spec.items():
        datasource = {"type": "prometheus", "uid": "prometheus"}
        panels = []
        for index, panel in enumerate(board["panels"]):
            panels.append({
                "id": index + 1, "type": "timeseries", "title": panel["title"],
                "datasource": datasource,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": panel.get("unit", "short")},
                                "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [{"refId": "A", "datasource": datasource, "expr": panel["expr"],
                             "legendFormat": panel.get("legend", "{{host}}")}],
            })
        built[name] = json.dumps({
            "uid": f"difyops-{name}", "title": board["title"], "tags": ["difyops", "dify"],
            "schemaVersion": 39, "version": 1, "editable": False, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"}, "timezone": "browser",
            "templating": {"list": []}, "annotations": {"list": []}, "panels": panels,
        }, indent=2, sort_keys=True) + "\n"
    return built


# --- status (read-only) ---------------------------------------------------------------------

Getter = Callable[..., Any]


@dataclass(frozen=True)
class Target:
    """One scrape target as Prometheus sees it."""

    job: str
    host: str
    instance: str
    health: str  # up | down | unknown
    error: str


@dataclass(frozen=True)
class Alert:
    """One alert Prometheus holds (pending or firing)."""

    name: str
    host: str
    state: str
    severity: str
    since: str
    summary: str


def prometheus_url(inventory: Inventory) -> str:
    """Prometheus' base URL on the (first) monitor host."""
    return f"http://{endpoint(inventory.with_role('monitor')[0].address, PORTS['prometheus'])}"


def query_api(inventory: Inventory, path: str, get: Getter | None = None) -> Any:
    """GET one Prometheus API path from the control machine; its `data`."""
    import requests

    get = get or requests.get
    url = prometheus_url(inventory) + path
    try:
        answer = get(url, timeout=10)
        body = answer.json()
    except (requests.RequestException, ValueError) as exc:
        raise HostError(f"Prometheus at {url} does not answer: {exc}; run "
                        f"`inv monitor.deploy`") from exc
    if answer.status_code != 200 or body.get("status") != "success":
        raise HostError(f"Prometheus at {url}: HTTP {answer.status_code} {body!r:.160}")
    return body["data"]


def targets(inventory: Inventory, get: Getter | None = None) -> list[Target]:
    """Every active target, sorted by job and host."""
    data = query_api(inventory, "/api/v1/targets?state=active", get)
    found = [Target(t["labels"].get("job", "?"), t["labels"].get("host", ""),
                    t["labels"].get("instance", t.get("scrapeUrl", "?")), t.get("health", "?"),
                    t.get("lastError", "")) for t in data["activeTargets"]]
    return sorted(found, key=lambda t: (t.job, t.host, t.instance))


def alerts(inventory: Inventory, get: Getter | None = None) -> list[Alert]:
    """Every pending or firing alert, firing first."""
    data = query_api(inventory, "/api/v1/alerts", get)
    found = [Alert(a["labels"].get("alertname", "?"), a["labels"].get("host", ""),
                   a.get("state", "?"), a["labels"].get("severity", ""),
                   a.get("activeAt", "")[:19], a.get("annotations", {}).get("summary", ""))
             for a in data["alerts"]]
    return sorted(found, key=lambda a: (a.state != "firing", a.name, a.host))


TIER = Tier("monitor", "exporters on every host; Prometheus, Alertmanager, Grafana",
            tuple(ROLES), steps, validate=True)
