"""The monitor tier for real: Prometheus, Alertmanager and exporters from the OS packages.

Two hosts: mon1 (the monitor host) and mdata1 (PostgreSQL and Redis deployed by the db and cache
tiers, and an nginx standing in for the load balancer). `inv monitor.deploy` installs the
exporters and the monitoring services; Prometheus must then report every target up. Faults: a
broken rule is refused and nothing is applied; a stopped exporter and a stopped PostgreSQL make
their alerts fire, and Alertmanager posts them to the configured webhook. Short intervals come
from the inventory's monitor settings, so the whole module runs in a couple of minutes.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.integration.lab import Lab, LabHost
from tests.integration.support import eventually

ROOT = Path(__file__).resolve().parents[2]
STAGED, LIVE = "/etc/prometheus/difyops.next", "/etc/prometheus/difyops"
SINK = "/tmp/alerts.jsonl"
SINK_PORT = 9999
EXPECTED_TARGETS = {("prometheus", "mon1"), ("alertmanager", "mon1"), ("blackbox", "mon1"),
                    ("node", "mon1"), ("node", "mdata1"), ("postgres", "mdata1"),
                    ("redis", "mdata1"), ("nginx", "mdata1"), ("nginx-log", "mdata1")}

SINK_SERVER = f"""
import http.server

class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with open("{SINK}", "ab") as out:
            out.write(body.replace(b"\\n", b" ") + b"\\n")
        self.send_response(200)
        self.end_headers()

http.server.HTTPServer(("127.0.0.1", {SINK_PORT}), Sink).serve_forever()
"""


class Monitor:
    """The lab of this module: its hosts, inventory and helpers."""

    def __init__(self, mon: LabHost, data: LabHost, folder: Path) -> None:
        self.mon, self.data, self.folder = mon, data, folder
        self.inventory = folder / "monitor-lab.yml"
        self.env = {"DIFY_INVENTORY": str(self.inventory),
                    "DIFY_SECRETS": str(folder / "monitor-lab.env")}
        self.write()

    def write(self, **monitor: Any) -> None:
        """The inventory, with monitor settings on top of the fast ones the tests use."""
        settings = {"scrape_interval": "2s", "evaluation_interval": "2s", "down_for": "4s",
                    "group_wait": "1s", "grafana": False,
                    "alert_webhook": f"http://127.0.0.1:{SINK_PORT}/alerts", **monitor}
        self.inventory.write_text(yaml.safe_dump({
            "name": "monitor-lab",
            "cache": {"mode": "standalone"},
            "vector": {"store": "pgvector"},
            "monitor": settings,
            "net": {"firewall": "off"},
            "hosts": [self.data.inventory_entry(["db_primary", "cache", "lb"]),
                      self.mon.inventory_entry(["monitor", "dev_backend"], user="deploy")],
        }, sort_keys=False))

    def inv(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                              capture_output=True, env={**os.environ, **self.env, **(env or {})},
                              timeout=600, check=False)

    def api(self, path: str, **params: str) -> Any:
        """Prometheus' HTTP API on mon1 (as monitor.status reads it)."""
        answer = requests.get(f"http://{self.mon.address}:9090/api/v1/{path}", params=params,
                              timeout=10)
        answer.raise_for_status()
        return answer.json()["data"]

    def targets(self) -> dict[tuple[str, str], str]:
        return {(t["labels"]["job"], t["labels"].get("host", "")): t["health"]
                for t in self.api("targets", state="active")["activeTargets"]}

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]


def summary(result: subprocess.CompletedProcess) -> dict[str, dict[str, int]]:
    """The per-host summary table at the end of a deploy: host -> {status: count}."""
    header, *lines = result.stdout.split("summary:")[1].strip().splitlines()
    names = header.replace("would change", "would_change").replace("not run", "not_run").split()
    return {line.split()[0]: dict(zip(names[1:], map(int, line.split()[1:len(names)]),
                                      strict=True)) for line in lines}


@pytest.fixture(scope="module")
def lab_monitor(lab: Lab, tmp_path_factory) -> Monitor:
    """mon1 and mdata1 with PostgreSQL, Redis and nginx running, and a webhook sink on mon1."""
    mon, data = lab.start(["mon1", "mdata1"])
    monitor = Monitor(mon, data, tmp_path_factory.mktemp("monitor"))
    assert monitor.inv("config.secrets").returncode == 0
    # The lab hosts are far smaller than the planned sizes the preflight enforces.
    tiers = monitor.inv("deploy.all", "--only", "db,cache", "--no-preflight")
    assert tiers.returncode == 0, tiers.stdout + tiers.stderr
    # nginx stands in for the lb tier (Dify's upstreams do not exist here); one test server
    # answers 502 so that the load balancer's 5xx counting can be seen.
    code, out = data.exec(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx "
        ">/dev/null && printf 'server { listen 127.0.0.1:8098; location / { return 502; } }\\n' "
        "> /etc/nginx/conf.d/test-502.conf && systemctl reload nginx")
    assert code == 0, out
    script = base64.b64encode(SINK_SERVER.encode()).decode()
    code, out = mon.exec(f"echo {script} | base64 -d > /usr/local/bin/alert-sink.py && "
                         f"systemd-run --unit=alert-sink python3 /usr/local/bin/alert-sink.py")
    assert code == 0, out
    return monitor


@pytest.fixture(scope="module")
def deployed(lab_monitor: Monitor) -> subprocess.CompletedProcess:
    """The first `inv monitor.deploy`, after a dry run that must install nothing."""
    dry = lab_monitor.inv("monitor.deploy", "--dry")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert lab_monitor.mon.exec("test -e /usr/bin/prometheus")[0] != 0  # nothing installed
    first = lab_monitor.inv("monitor.deploy")
    assert first.returncode == 0, first.stdout + first.stderr
    return first


def test_deploy_scrapes_every_exporter(lab_monitor: Monitor,
                                       deployed: subprocess.CompletedProcess) -> None:
    monitor, data = lab_monitor, lab_monitor.data
    assert "[monitor] mon1: health prometheus ready ... unchanged" in deployed.stdout

    targets = eventually("every target up", lambda: (lambda t: t if set(t.values()) == {"up"}
                                                     else None)(monitor.targets()))
    assert set(targets) == EXPECTED_TARGETS
    # Exporters listen on the host's inventory address only, where Prometheus reaches them.
    _, listening = data.exec("ss -Hltn")
    for port in (9100, 9187, 9121, 9113, 3903):
        sockets = [line.split()[3] for line in listening.splitlines()
                   if line.split()[3].endswith(f":{port}")]
        assert sockets == [f"{data.address}:{port}"], (port, sockets)
    # The postgres exporter logs in as its pg_monitor role and sees PostgreSQL.
    pg = monitor.api("query", query='pg_up{host="mdata1"}')["result"]
    assert [sample["value"][1] for sample in pg] == ["1"]
    # The Redis exporter reaches a Redis that serves TLS only (tls.internal), verifying the CA,
    # as Redis' user monitor: it reads the settings (CONFIG GET) and nothing it asks is refused.
    eventually("redis_up 1", lambda: [
        sample["value"][1] for sample in
        monitor.api("query", query='redis_up{host="mdata1"}')["result"]] == ["1"])
    eventually("redis_config_maxclients", lambda: monitor.api(
        "query", query='redis_config_maxclients{host="mdata1"}')["result"])
    code, refused = data.exec("/usr/local/sbin/difyops-redis cli acl log 128")
    assert (code, refused.strip()) == (0, ""), refused

    # The load balancer's answers are counted by status class from nginx's access log.
    code, out = data.exec("for i in 1 2 3 4 5; do curl -s -o /dev/null 127.0.0.1:8098/x; "
                          "curl -s -o /dev/null 127.0.0.1/; done")
    assert code == 0, out
    five_xx = 'dify_nginx_http_responses_total{status_class="5xx", host="mdata1"} >= 5'
    eventually("5xx answers counted", lambda: monitor.api("query", query=five_xx)["result"])

    status = monitor.inv("monitor.status")
    assert status.returncode == 0, status.stdout + status.stderr  # nothing down, none firing
    assert "9 target(s)" in status.stdout

    second = monitor.inv("monitor.deploy")
    assert second.returncode == 0, second.stdout + second.stderr
    assert {host: set(counts) for host, counts in summary(second).items()} == {
        "mdata1": {"unchanged"}, "mon1": {"unchanged"}}


def test_every_alert_rule_passes_promtools_unit_tests(lab_monitor: Monitor, deployed,
                                                      tmp_path) -> None:
    """The rules rendered for the production inventory, against promtool's rule tests."""
    env = {"DIFY_INVENTORY": str(ROOT / "config" / "inventories" / "production.yml"),
           "DIFY_SECRETS": str(tmp_path / "production.env")}
    assert lab_monitor.inv("config.secrets", env=env).returncode == 0
    rendered = lab_monitor.inv("config.render", "--out", str(tmp_path / "out"), env=env)
    assert rendered.returncode == 0, rendered.stderr
    rules = (tmp_path / "out" / "monitor1" / STAGED.lstrip("/") / "rules" / "dify.yml")
    tests = Path(__file__).with_name("monitor_rules_test.yml")
    files = {"dify.yml": rules.read_bytes(), "test.yml": tests.read_bytes()}
    copy = " && ".join(f"echo {base64.b64encode(content).decode()} | base64 -d > /tmp/rt/{name}"
                       for name, content in files.items())
    code, out = lab_monitor.mon.exec(f"mkdir -p /tmp/rt && {copy} && cd /tmp/rt && "
                                     f"promtool test rules test.yml")
    assert code == 0, out
    assert "SUCCESS" in out


def test_a_broken_rule_is_refused_and_nothing_is_applied(lab_monitor: Monitor, deployed,
                                                         tmp_path) -> None:
    monitor, mon = lab_monitor, lab_monitor.mon
    before = mon.exec(f"find {LIVE} -type f | sort | xargs md5sum")[1]
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: mine\n    rules:\n      - alert: Broken\n"
                      "        expr: up ==\n")
    monitor.write(extra_rules=str(broken))
    try:
        refused = monitor.inv("monitor.deploy")
        assert refused.returncode == 1
        output = refused.stdout + refused.stderr
        if "no host was touched" in output:  # promtool on this machine refused it first
            assert mon.exec(f"test -e {STAGED}/rules/extra.yml")[0] != 0
        else:  # refused on the monitor host, in the staging folder
            assert "check the configuration (promtool, amtool, blackbox --config.check) ... " \
                   "failed" in refused.stdout
            assert "install the checked configuration ... not run" in refused.stdout
            assert mon.exec(f"test -e {STAGED}/rules/extra.yml")[0] == 0
        assert mon.exec(f"find {LIVE} -type f | sort | xargs md5sum")[1] == before
        groups = [g["name"] for g in monitor.api("rules")["groups"]]
        assert groups == ["dify-alerts"]  # Prometheus still runs the checked rules
    finally:
        monitor.write()
    fixed = monitor.inv("monitor.deploy")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert mon.exec(f"test -e {STAGED}/rules/extra.yml")[0] != 0
    assert mon.exec(f"find {LIVE} -type f | sort | xargs md5sum")[1] == before


def firing(monitor: Monitor, name: str, **labels: str) -> list[dict]:
    return [a for a in monitor.alerts() if a["labels"]["alertname"] == name
            and a["state"] == "firing"
            and all(a["labels"].get(k) == v for k, v in labels.items())]


def posted(monitor: Monitor, name: str) -> list[dict]:
    """Alerts Alertmanager posted to the webhook sink on mon1."""
    _, out = monitor.mon.exec(f"cat {SINK} 2>/dev/null")
    return [alert for line in out.splitlines() if line.strip()
            for alert in json.loads(line)["alerts"]
            if alert["labels"]["alertname"] == name and alert["status"] == "firing"]


def test_stopped_exporter_and_postgresql_fire_alerts_to_the_webhook(lab_monitor: Monitor,
                                                                   deployed) -> None:
    monitor, data = lab_monitor, lab_monitor.data
    code, out = data.exec("systemctl stop prometheus-redis-exporter")
    assert code == 0, out
    seen_pending = False

    def redis_target_alert() -> list[dict]:
        nonlocal seen_pending
        alerts = [a for a in monitor.alerts() if a["labels"]["alertname"] == "TargetDown"
                  and a["labels"].get("job") == "redis"]
        seen_pending |= any(a["state"] == "pending" for a in alerts)
        return [a for a in alerts if a["state"] == "firing"]

    (alert,) = eventually("TargetDown for the redis exporter firing", redis_target_alert)
    assert alert["labels"]["host"] == "mdata1" and alert["labels"]["severity"] == "critical"
    assert seen_pending  # pending first, for down_for, then firing
    eventually("RedisNoMaster firing", lambda: firing(monitor, "RedisNoMaster"))
    (sent, *_) = eventually("TargetDown posted to the webhook",
                            lambda: posted(monitor, "TargetDown"), timeout=30)
    assert sent["labels"]["job"] == "redis"
    assert sent["annotations"]["summary"] == "redis on mdata1 is down"

    code, out = data.exec("systemctl stop postgresql@15-main")
    assert code == 0, out
    eventually("PostgresDown firing", lambda: firing(monitor, "PostgresDown", host="mdata1"))
    eventually("PostgresDown posted to the webhook", lambda: posted(monitor, "PostgresDown"),
               timeout=30)

    status = monitor.inv("monitor.status")
    assert status.returncode == 1
    assert "target(s) down: redis@mdata1" in status.stderr
    assert "PostgresDown@mdata1" in status.stderr and "TargetDown@mdata1" in status.stderr

    # PostgreSQL is the db tier's to restart; then a deploy brings the stopped exporter back.
    code, out = data.exec("systemctl start postgresql@15-main")
    assert code == 0, out
    repaired = monitor.inv("monitor.deploy")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "[monitor] mdata1: enable and start prometheus-redis-exporter ... changed" in \
        repaired.stdout
    eventually("every target up again", lambda: set(monitor.targets().values()) == {"up"}
               and not firing(monitor, "TargetDown"))
