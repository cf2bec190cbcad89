"""The monitor tier: exporters, Prometheus/Alertmanager configuration, Grafana, checks, status."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from invoke import Context
from invoke.exceptions import Exit

from tasks.core import cli, validators
from tasks.core.errors import DifyopsError, InputError
from tasks.core.inventory import Inventory
from tasks.core.plan import RunCommand, WaitFor, WriteFile
from tasks.core.project import INVENTORY_DIR
from tasks.tiers import monitor as tier

REQUIRED_ALERTS = {
    # the original plan's three
    "HighCPUUsage", "HighMemoryUsage", "APIServiceDown",
    # the ones a production Dify needs
    "TargetDown", "PostgresDown", "PostgresReplicationLag", "PostgresReplicaNotStreaming",
    "RedisDown", "RedisNoMaster", "RedisSeveralMasters", "NginxDown", "Nginx5xxRate",
    "DiskAlmostFull", "CertificateExpiring", "BackupTooOld", "BackupNeverSucceeded",
    "InternalCertificateExpiring",  # tls.internal, the default
}


def plan_of(inventory: Inventory) -> dict[str, list]:
    """host -> the monitor tier's steps on it."""
    return {plan.host.name: plan.steps for plan in tier.TIER.plan(inventory).hosts}


def files_of(steps: list) -> dict[str, WriteFile]:
    return {step.path: step for step in steps if isinstance(step, WriteFile)}


def names(steps: list) -> list[str]:
    return [step.label for step in steps]


def staged(inventory: Inventory, name: str) -> dict:
    steps = plan_of(inventory)["monitor1"]
    return yaml.safe_load(files_of(steps)[f"{tier.STAGED}/{name}"].content)


def defaults(content: str) -> dict[str, str]:
    """An /etc/default file's assignments (as systemd reads them: quotes removed)."""
    values = {}
    for line in content.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value.strip("'\"")
    return values


# --- where exporters go ---------------------------------------------------------------------

def test_no_monitor_host_means_no_monitoring(load, base) -> None:
    base["hosts"] = [h for h in base["hosts"] if h["name"] != "monitor1"]
    assert plan_of(load(base)) == {}


def test_every_host_gets_a_node_exporter_on_its_own_address(load, base) -> None:
    inventory = load(base)
    plans = plan_of(inventory)
    assert sorted(plans) == sorted(h.name for h in inventory.hosts)
    for host in inventory.hosts:
        steps = plans[host.name]
        assert "prometheus-node-exporter" in steps[0].command  # one apt run per host
        args = defaults(files_of(steps)["/etc/default/prometheus-node-exporter"].content)["ARGS"]
        assert f"--web.listen-address={host.address}:9100" in args
        assert "--collector.textfile.directory=/var/lib/prometheus/node-exporter" in args
        gate = next(s.gate for s in steps if isinstance(s, WaitFor)
                    and "node-exporter" in s.gate.name)
        assert f"/dev/tcp/{host.address}/9100" in gate.command


def test_windows_workstations_get_no_exporter(tmp_path, monkeypatch) -> None:
    from tasks.core import secrets
    from tasks.core.inventory import load_inventory

    monkeypatch.setenv("DIFY_SECRETS", str(tmp_path / "homelab.env"))
    inventory = load_inventory(INVENTORY_DIR / "homelab.yml", check_secrets=False)
    secrets.generate(inventory)
    inventory = load_inventory(INVENTORY_DIR / "homelab.yml")
    assert sorted(plan_of(inventory)) == ["home-server", "ubuntu-vm"]


def test_postgres_exporter_logs_in_as_a_pg_monitor_role(load, base) -> None:
    inventory = load(base)
    plans = plan_of(inventory)
    password = inventory.secrets["MONITOR_DB_PASSWORD"]
    for name, role in (("db1", "primary"), ("db2", "replica"), ("db3", "replica")):
        files = files_of(plans[name])
        env = files["/etc/default/prometheus-postgres-exporter"]
        assert (env.mode, env.secret) == (0o600, True)
        values = defaults(env.content)
        assert values["DATA_SOURCE_NAME"] == (
            f"host=/run/postgresql port=5432 dbname=postgres user=difyops_monitor "
            f"password={password} sslmode=disable")
        assert f"--web.listen-address={inventory.host(name).address}:9187" in values["ARGS"]
        assert f"--extend.query-path={tier.POSTGRES_QUERIES}" in values["ARGS"]
        queries = yaml.safe_load(files[tier.POSTGRES_QUERIES].content)
        assert {"lag_seconds", "is_replica"} == {
            key for metric in queries["dify_pg_replication"]["metrics"] for key in metric}
        has_role = "create the metrics role (pg_monitor)" in names(plans[name])
        assert has_role == (role == "primary")  # replicas get the role by replication
    sql = files_of(plans["db1"])[tier.MONITOR_ROLE_SQL]
    assert (sql.mode, sql.owner, sql.secret) == (0o600, "postgres", True)
    assert "GRANT pg_monitor TO difyops_monitor;" in sql.content
    create = next(s for s in plans["db1"] if isinstance(s, RunCommand)
                  and s.name == "create the metrics role (pg_monitor)")
    assert "psql -w \"$DATA_SOURCE_NAME\"" in create.unless and password not in create.unless
    assert create.unless.endswith("</dev/null | grep -qx t")  # never waits for a prompt
    assert "prometheus-postgres-exporter" not in plans["api1"][0].command


def test_redis_and_nginx_exporters_on_their_tiers(load, base) -> None:
    inventory = load(base)
    plans = plan_of(inventory)
    redis = files_of(plans["db2"])["/etc/default/prometheus-redis-exporter"]
    assert (redis.mode, redis.secret) == (0o600, True)
    values = defaults(redis.content)
    # Redis' user monitor, not Dify's password (config/redis/users.acl.j2).
    assert values["REDIS_PASSWORD"] == inventory.secrets["REDIS_MONITOR_PASSWORD"]
    assert values["ARGS"] == "-web.listen-address 10.0.3.12:9121 -redis.addr " \
                             "rediss://127.0.0.1:6379 -tls-ca-cert-file " \
                             "/etc/difyops/redis/tls/ca.crt -redis.user monitor"
    lb = files_of(plans["lb1"])
    status = lb["/etc/nginx/conf.d/difyops-status.conf"].content
    assert f"listen 127.0.0.1:{tier.NGINX_STATUS_PORT};" in status and "stub_status;" in status
    nginx_args = defaults(lb["/etc/default/prometheus-nginx-exporter"].content)["ARGS"]
    assert f"-nginx.scrape-uri=http://127.0.0.1:{tier.NGINX_STATUS_PORT}/stub_status" in \
        nginx_args and "-web.listen-address=10.0.1.10:9113" in nginx_args
    assert defaults(lb["/etc/default/mtail"].content) == {
        "LOGS": "/var/log/nginx/*access.log", "HOST": "10.0.1.10", "PORT": "3903"}
    assert "counter dify_nginx_http_responses_total by status_class" in \
        lb["/etc/mtail/dify-nginx.mtail"].content
    reload = next(s for s in plans["lb1"] if isinstance(s, RunCommand)
                  and s.name == "reload nginx (status endpoint)")
    assert reload.command == "nginx -t -q && systemctl reload nginx"
    assert reload.on_change == ("/etc/nginx/conf.d/difyops-status.conf",)
    assert "prometheus-redis-exporter" not in plans["lb1"][0].command
    assert "mtail" not in plans["db1"][0].command


# --- the monitor host -------------------------------------------------------------------------

def test_configuration_is_checked_before_it_is_installed_and_reloaded(load, base) -> None:
    steps = plan_of(load(base))["monitor1"]
    order = names(steps)
    check = "check the configuration (promtool, amtool, blackbox --config.check)"
    install, reload = "install the checked configuration", \
        "reload prometheus, alertmanager and blackbox exporter"
    staged_paths = [f"{tier.STAGED}/{name}" for name in tier.STAGED_FILES]
    assert max(order.index(f"file {path}") for path in staged_paths) < order.index(check) \
        < order.index(install) < order.index(reload)
    by_name = {s.name: s for s in steps if isinstance(s, RunCommand)}
    assert by_name[check].changes is False  # runs every time, never counted as a change
    assert f"promtool check config {tier.STAGED}/prometheus.yml" in by_name[check].command
    assert f"amtool check-config {tier.STAGED}/alertmanager.yml" in by_name[check].command
    assert by_name[install].unless == f"diff -r {tier.STAGED} {tier.LIVE} >/dev/null 2>&1"
    assert set(by_name[reload].on_change) == set(staged_paths)
    files = files_of(steps)
    prometheus = defaults(files["/etc/default/prometheus"].content)["ARGS"]
    assert f"--config.file={tier.LIVE}/prometheus.yml" in prometheus
    assert "--web.listen-address=10.0.4.10:9090" in prometheus
    assert "--storage.tsdb.retention.time=15d" in prometheus
    alertmanager = defaults(files["/etc/default/prometheus-alertmanager"].content)["ARGS"]
    assert f"--config.file={tier.LIVE}/alertmanager.yml" in alertmanager
    assert "--web.listen-address=10.0.4.10:9093" in alertmanager
    gates = [s.gate for s in steps if isinstance(s, WaitFor)]
    assert "http://10.0.4.10:9090/-/ready" in [getattr(g, "url", "") for g in gates]


def test_scrape_targets_come_from_the_inventory(load, base) -> None:
    base["tls"] = {"mode": "self-signed"}
    inventory = load(base)
    config = staged(inventory, "prometheus.yml")
    assert config["rule_files"] == ["rules/*.yml"]  # resolved beside the staged file
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == \
        ["10.0.4.10:9093"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    def targets(job: str) -> dict[str, dict]:
        return {group["labels"]["host"]: {"targets": group["targets"], **group["labels"]}
                for group in jobs[job]["static_configs"]}

    assert {h: t["targets"] for h, t in targets("node").items()} == {
        host.name: [f"{host.address}:9100"] for host in inventory.hosts}
    assert {h: t["role"] for h, t in targets("postgres").items()} == {
        "db1": "primary", "db2": "replica", "db3": "replica"}
    assert sorted(targets("redis")) == ["db1", "db2", "db3"]
    assert targets("nginx")["lb1"]["targets"] == ["10.0.1.10:9113"]
    assert targets("nginx-log")["lb1"]["targets"] == ["10.0.1.10:3903"]
    assert targets("weaviate")["vector1"]["targets"] == ["10.0.3.21:2112"]
    api = jobs["dify-api"]
    assert api["params"] == {"module": ["http_2xx"]}
    assert {h: t["targets"] for h, t in targets("dify-api").items()} == {
        "api1": ["http://10.0.2.21:5001/health"], "api2": ["http://10.0.2.22:5001/health"]}
    assert {"target_label": "__address__", "replacement": "10.0.4.10:9115"} in \
        api["relabel_configs"]
    assert targets("dify-tls")["lb1"]["targets"] == ["https://10.0.1.10:443/"]
    blackbox = staged(inventory, "blackbox.yml")["modules"]["tls_certificate"]["http"]
    assert blackbox["tls_config"]["server_name"] == "dify.test"


def test_optional_jobs_follow_the_layout(load, base) -> None:
    base["vector"] = {"store": "pgvector"}
    base["hosts"] = [h for h in base["hosts"] if h["name"] != "vector1"]
    jobs = {job["job_name"] for job in staged(load(base), "prometheus.yml")["scrape_configs"]}
    assert "weaviate" not in jobs and "dify-tls" not in jobs  # pgvector; tls off


def test_alert_rules(load, base) -> None:
    base["monitor"] = {"down_for": "30s", "cpu_percent": 75, "backup_max_age": "8d"}
    inventory = load(base)
    rules = {rule["alert"]: rule
             for rule in staged(inventory, "rules/dify.yml")["groups"][0]["rules"]}
    assert set(rules) == REQUIRED_ALERTS
    assert rules["HighCPUUsage"]["expr"].endswith("> 75") and rules["HighCPUUsage"]["for"] == "5m"
    assert rules["HighMemoryUsage"]["expr"].endswith("> 90")
    for down in ("APIServiceDown", "TargetDown", "PostgresDown", "RedisDown", "RedisNoMaster",
                 "NginxDown"):
        assert rules[down]["for"] == "30s", down
        assert rules[down]["labels"]["severity"] == "critical"
    assert rules["APIServiceDown"]["expr"] == 'probe_success{job="dify-api"} == 0'
    assert rules["PostgresReplicaNotStreaming"]["expr"].endswith("< 2")  # 2 replicas
    assert rules["BackupTooOld"]["expr"].endswith(f"> {8 * 86400}")
    assert rules["BackupNeverSucceeded"]["for"] == "8d"
    for rule in rules.values():
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_layout_specific_alerts(load, base) -> None:
    base["cache"] = {"mode": "standalone"}
    base["hosts"] = [{**h, "roles": ["cache"]} if h["name"] == "db1" else h
                     for h in base["hosts"] if h["name"] not in ("db2", "db3")]
    base["hosts"].append({"name": "db9", "address": "10.0.3.19", "roles": ["db_primary"]})
    rules = {rule["alert"] for rule in staged(load(base), "rules/dify.yml")["groups"][0]["rules"]}
    assert "PostgresReplicaNotStreaming" not in rules and "RedisSeveralMasters" not in rules


@pytest.mark.parametrize("webhook, fmt, receiver", [
    ("", "alertmanager", "none"),
    ("http://hooks.internal.test/dify", "alertmanager", "webhook"),
    ("http://hooks.internal.test/T000/B000/XXX", "slack", "slack"),
])
def test_alertmanager_routes_to_the_webhook(load, base, webhook, fmt, receiver) -> None:
    base["monitor"] = {"alert_webhook": webhook, "webhook_format": fmt, "group_wait": "5s"}
    config = staged(load(base), "alertmanager.yml")
    assert config["route"]["receiver"] == receiver
    assert config["route"]["group_wait"] == "5s"
    (entry,) = config["receivers"]
    assert entry["name"] == receiver
    if receiver == "webhook":
        assert entry["webhook_configs"] == [{"url": webhook, "send_resolved": True}]
    if receiver == "slack":
        assert entry["slack_configs"][0]["api_url"] == webhook


def test_operators_extra_rules_are_staged_and_checked_too(load, base, tmp_path) -> None:
    rules = tmp_path / "mine.yml"
    rules.write_text("groups: [{name: mine, rules: [{alert: Mine, expr: vector(1)}]}]\n")
    base["monitor"] = {"extra_rules": str(rules)}
    steps = plan_of(load(base))["monitor1"]
    extra = files_of(steps)[f"{tier.STAGED}/{tier.EXTRA_RULES}"]
    assert extra.content == rules.read_text()
    reload = next(s for s in steps if isinstance(s, RunCommand) and s.name.startswith("reload"))
    assert extra.path in reload.on_change
    base["monitor"] = {}
    steps = plan_of(load(base))["monitor1"]
    remove = next(s for s in steps if isinstance(s, RunCommand) and "extra rules" in s.name)
    assert remove.command == f"rm -f {tier.STAGED}/{tier.EXTRA_RULES}"
    names_ = names(steps)
    assert names_.index(remove.name) < names_.index(
        "check the configuration (promtool, amtool, blackbox --config.check)")
    base["monitor"] = {"extra_rules": "missing.yml"}
    with pytest.raises(InputError) as error:
        load(base)
    assert "monitor.extra_rules: no such file: " in str(error.value)


@pytest.mark.parametrize("settings, message", [
    ({"down_for": "5 minutes"}, "monitor.down_for: '5 minutes' is not a duration"),
    ({"webhook_format": "teams"}, "'teams' is not one of 'alertmanager', 'slack'"),
    ({"webhook_format": "slack"}, "monitor.alert_webhook: required when webhook_format is slack"),
    ({"disk_free_percent": 0}, "monitor.disk_free_percent: 0 is not a percentage"),
])
def test_bad_monitor_settings_are_refused(load, base, settings, message) -> None:
    base["monitor"] = settings
    with pytest.raises(InputError) as error:
        load(base)
    assert message in str(error.value)


# --- Grafana ----------------------------------------------------------------------------------

def test_grafana_by_compose_with_provisioning(load, base) -> None:
    base["dify"] = {"registry_mirror": "mirror.example.com/"}
    inventory = load(base)
    steps = plan_of(inventory)["monitor1"]
    files = files_of(steps)
    env = files[f"{tier.GRAFANA_DIR}/.env"]
    password = inventory.secrets["GRAFANA_ADMIN_PASSWORD"]
    assert (env.mode, env.secret, env.content) == (0o600, True,
                                                   f"GRAFANA_ADMIN_PASSWORD={password}\n")
    compose = yaml.safe_load(files[f"{tier.GRAFANA_DIR}/compose.yml"].content)
    grafana = compose["services"]["grafana"]
    assert grafana["image"] == "mirror.example.com/grafana/grafana:11.1.0"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:?}"
    assert grafana["environment"]["GF_SERVER_HTTP_ADDR"] == "10.0.4.10"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert password not in files[f"{tier.GRAFANA_DIR}/compose.yml"].content
    mounts = dict(volume.rsplit(":", 2)[:2] if volume.count(":") == 2 else volume.split(":")
                  for volume in grafana["volumes"])
    sources = yaml.safe_load(
        files[f"{tier.GRAFANA_DIR}/provisioning/datasources/difyops.yml"].content)
    prometheus = next(s for s in sources["datasources"] if s["type"] == "prometheus")
    assert (prometheus["uid"], prometheus["url"], prometheus["isDefault"]) == \
        ("prometheus", "http://10.0.4.10:9090", True)
    provider = yaml.safe_load(
        files[f"{tier.GRAFANA_DIR}/provisioning/dashboards/difyops.yml"].content)
    assert mounts["./dashboards"] == provider["providers"][0]["options"]["path"]
    boards = {path.rsplit("/", 1)[1]: json.loads(step.content) for path, step in files.items()
              if path.startswith(f"{tier.GRAFANA_DIR}/dashboards/")}
    assert sorted(boards) == ["api.json", "hosts.json", "nginx.json", "postgresql.json",
                              "redis.json"]
    for board in boards.values():
        assert board["uid"].startswith("difyops-") and board["panels"]
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "prometheus" and panel["targets"][0]["expr"]
    order = names(steps)
    assert order.index("compose up dify-monitor") < order.index(
        "health grafana /api/health") < order.index(
        "set grafana's admin password from the secrets file")
    reset = next(s for s in steps if isinstance(s, RunCommand) and s.name.startswith("set graf"))
    assert reset.on_change == (env.path,) and password not in reset.command


def test_grafana_can_be_left_out(load, base) -> None:
    base["monitor"] = {"grafana": False}
    steps = plan_of(load(base))["monitor1"]
    assert not any(path.startswith(tier.GRAFANA_DIR) for path in files_of(steps))


@pytest.mark.skipif(not shutil.which("docker"), reason="the docker CLI is not installed")
def test_docker_compose_accepts_the_grafana_project(load, base, tmp_path) -> None:
    if subprocess.run(["docker", "compose", "version"], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("docker compose v2 is not installed")
    files = files_of(plan_of(load(base))["monitor1"])
    for name in (".env", "compose.yml"):
        (tmp_path / name).write_text(files[f"{tier.GRAFANA_DIR}/{name}"].content)
    result = subprocess.run(["docker", "compose", "config", "-q"], cwd=tmp_path,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# --- offline checks before any host ------------------------------------------------------------

def fake_tool(folder: Path, name: str, fail_on: str = "") -> Path:
    """A stand-in for promtool/amtool that logs its arguments (and fails on a word)."""
    log = folder / f"{name}.log"
    script = folder / name
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                      + (f"case \"$*\" in *{fail_on}*) echo 'bad rule' >&2; exit 1;; esac\n"
                         if fail_on else "") + "exit 0\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return log


def test_validators_check_config_rules_and_alertmanager(load, base, tmp_path,
                                                        monkeypatch) -> None:
    from tasks.core.render import write_tree
    from tasks.core.tiers import build

    tools = tmp_path / "bin"
    tools.mkdir()
    promtool_log, amtool_log = fake_tool(tools, "promtool"), fake_tool(tools, "amtool")
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    tree = tmp_path / "tree"
    write_tree(build([tier.TIER], load(base)), tree)
    verdicts = validators.promtool(tree) + validators.amtool(tree)
    assert {(v.tool, v.target, v.status) for v in verdicts} == {
        ("promtool check config", f"monitor1:{tier.STAGED}/prometheus.yml", "passed"),
        ("promtool check rules", f"monitor1:{tier.STAGED}/rules/dify.yml", "passed"),
        ("amtool check-config", f"monitor1:{tier.STAGED}/alertmanager.yml", "passed"),
    }  # blackbox.yml and the exporter's queries are not Prometheus configuration
    assert promtool_log.read_text().splitlines() == [
        f"check config {tree}/monitor1{tier.STAGED}/prometheus.yml",
        f"check rules {tree}/monitor1{tier.STAGED}/rules/dify.yml"]
    assert "check-config" in amtool_log.read_text()


def test_missing_tools_are_skipped_not_passed(load, base, tmp_path, monkeypatch) -> None:
    from tasks.core.render import write_tree
    from tasks.core.tiers import build

    monkeypatch.setattr(validators.shutil, "which", lambda name: None)
    write_tree(build([tier.TIER], load(base)), tmp_path)
    verdicts = validators.promtool(tmp_path) + validators.amtool(tmp_path)
    assert verdicts and {v.status for v in verdicts} == {"skipped"}


def test_a_broken_rule_stops_the_deploy_before_any_host(load, base, write_inventory, tmp_path,
                                                         monkeypatch) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    fake_tool(tools, "promtool", fail_on="rules/dify.yml")
    fake_tool(tools, "amtool")
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DIFY_INVENTORY", str(write_inventory(base)))
    touched = []
    monkeypatch.setattr(cli, "execute", lambda *args, **kwargs: touched.append(args))
    with pytest.raises(DifyopsError) as error:
        cli.run_tiers(Context(), [tier.TIER], dry=False)
    assert touched == []
    assert "rendered files fail validation; no host was touched" in str(error.value)
    assert f"promtool check rules   monitor1:{tier.STAGED}/rules/dify.yml: bad rule" in \
        str(error.value)


def test_tiers_without_the_flag_are_not_validated(load, base, write_inventory,
                                                  monkeypatch) -> None:
    from tasks.tiers import cache

    monkeypatch.setenv("DIFY_INVENTORY", str(write_inventory(base)))
    monkeypatch.setattr(cli, "validate", lambda root: pytest.fail("validated"))
    monkeypatch.setattr(cli, "execute", lambda *a, **k: SimpleNamespace(failed=[]))
    cli.run_tiers(Context(), [cache.TIER], dry=True)


# --- monitor.status ---------------------------------------------------------------------------

TARGETS = {"status": "success", "data": {"activeTargets": [
    {"labels": {"job": "node", "host": "db1", "instance": "10.0.3.11:9100"}, "health": "up",
     "lastError": ""},
    {"labels": {"job": "redis", "host": "db1", "instance": "10.0.3.11:9121"}, "health": "down",
     "lastError": "connection refused"},
]}}
ALERTS = {"status": "success", "data": {"alerts": [
    {"labels": {"alertname": "TargetDown", "host": "db1", "severity": "critical"},
     "state": "firing", "activeAt": "2025-01-01T10:00:00.123Z",
     "annotations": {"summary": "redis on db1 is down"}},
    {"labels": {"alertname": "HighCPUUsage", "host": "api1", "severity": "warning"},
     "state": "pending", "activeAt": "2025-01-01T10:01:00Z", "annotations": {}},
]}}


def fake_prometheus(targets: dict, alerts: dict):
    asked = []

    def get(url: str, timeout: float = 0):
        asked.append(url)
        body = targets if "/targets" in url else alerts
        return SimpleNamespace(status_code=200, json=lambda: body)

    return get, asked


def test_targets_and_alerts_from_prometheus_api(load, base) -> None:
    inventory = load(base)
    get, asked = fake_prometheus(TARGETS, ALERTS)
    found = tier.targets(inventory, get)
    assert [(t.job, t.host, t.health, t.error) for t in found] == [
        ("node", "db1", "up", ""), ("redis", "db1", "down", "connection refused")]
    held = tier.alerts(inventory, get)
    assert [(a.name, a.state, a.since) for a in held] == [
        ("TargetDown", "firing", "2025-01-01T10:00:00"), ("HighCPUUsage", "pending",
                                                          "2025-01-01T10:01:00")]
    assert asked == ["http://10.0.4.10:9090/api/v1/targets?state=active",
                     "http://10.0.4.10:9090/api/v1/alerts"]


def test_status_task_fails_on_a_down_target_or_firing_alert(load, base, write_inventory,
                                                            monkeypatch, capsys) -> None:
    import tasks.monitor as task_module

    monkeypatch.setenv("DIFY_INVENTORY", str(write_inventory(base)))
    get, _ = fake_prometheus(TARGETS, ALERTS)
    monkeypatch.setattr(task_module, "targets", lambda inv: tier.targets(inv, get))
    monkeypatch.setattr(task_module, "alerts", lambda inv: tier.alerts(inv, get))
    with pytest.raises(Exit) as stopped:
        task_module.status(Context())
    assert "target(s) down: redis@db1" in stopped.value.message
    assert "alert(s) firing: TargetDown@db1" in stopped.value.message
    out = capsys.readouterr().out
    assert "connection refused" in out and "HighCPUUsage" in out
    healthy = {"status": "success", "data": {"activeTargets": TARGETS["data"]["activeTargets"][:1]}}
    get, _ = fake_prometheus(healthy, {"status": "success", "data": {"alerts": []}})
    task_module.status(Context())


def test_helpers() -> None:
    assert tier.duration_seconds("26h") == 93600
    assert tier.duration_seconds("1h30m") == 5400


def test_the_metrics_role_has_its_own_secret(load, base) -> None:
    from tasks.core.secrets import needed

    assert "MONITOR_DB_PASSWORD" in [spec.name for spec in needed(load(base))]
    base["hosts"] = [h for h in base["hosts"] if h["name"] != "monitor1"]
    assert "MONITOR_DB_PASSWORD" not in [spec.name for spec in needed(load(base))]
