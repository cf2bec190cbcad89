"""Preflight and the host firewall on real hosts (containers with NET_ADMIN) through `inv`.

Three hosts: net-lb (lb), net-app (every app role) and net-db (PostgreSQL primary and Redis).
Stand-ins instead of the real services, enough to tell an accepted connection from a dropped
one: a listener named `postgres` on net-db:5432 (python's http.server run through a link of
that name, so `ss` shows it as PostgreSQL would be shown), and a `docker` command on net-app
answering the version questions (no Docker engine runs inside these hosts).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.lab import Lab, LabHost
from tests.integration.support import until

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("lb", "web", "api", "worker", "beat", "plugin_daemon", "db_primary", "db_replica",
         "cache", "broker", "vector", "monitor", "logging", "dev_server", "dev_backend",
         "dev_frontend")
APP = ["api", "worker", "beat", "web", "plugin_daemon"]
DOCKER_SHIM = """#!/bin/sh
# Test stand-in: answers the version questions the preflight asks.
case "$*" in
    "compose version --short") echo 2.26.1 ;;
    version*) echo 24.0.7 ;;
    *) exit 1 ;;
esac
"""
Inv = Callable[..., subprocess.CompletedProcess]


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def listen(host: LabHost, unit: str, port: int, program: str = "python3") -> None:
    """Start a TCP listener as a transient unit and wait until it accepts."""
    code, out = host.exec(f"systemd-run --quiet --unit {unit} {program} -m http.server {port}")
    assert code == 0, out
    until(lambda: f":{port} " in host.exec("ss -ltnH")[1], 20, f"{unit} on {host.name}")


def stop(host: LabHost, unit: str) -> None:
    host.exec(f"systemctl stop {unit}; systemctl reset-failed {unit} 2>/dev/null; true")


def probe(source: LabHost, target: LabHost, port: int) -> tuple[int, float]:
    """(exit code, seconds) of a TCP connect from one host to another; 124 = no answer in 2 s."""
    started = time.monotonic()
    code, _ = source.exec(f"timeout 2 bash -c 'exec 3<>/dev/tcp/{target.address}/{port}'")
    return code, time.monotonic() - started


# Every port the network plan knows (its defaults), and SSH.
PLANNED_PORTS = (22, 80, 443, 3000, 5001, 5002, 5006, 5050, 5432, 6379, 26379, 8080, 50051, 9100,
                 9113, 9121, 9187, 9090, 9093, 3001, 9200, 5601)


def reached(source: LabHost, targets: dict[str, LabHost]) -> set[tuple[str, int]]:
    """(target, port) of every planned port a host's TCP connection gets an answer from (a
    connection or a refusal) rather than silence, all probed at once."""
    probes = " ".join(f"{name},{host.address},{port}" for name, host in targets.items()
                      for port in PLANNED_PORTS)
    script = (f"for p in {probes}; do IFS=, read -r n a port <<< \"$p\"; "
              "( timeout 3 bash -c \"exec 3<>/dev/tcp/$a/$port\" 2>/dev/null; "
              "echo \"$n $port $?\" ) & done; wait")
    code, out = source.exec(f"bash -c {shlex.quote(script)}")
    assert code == 0, out
    answers = [line.split() for line in out.splitlines()]
    assert len(answers) == len(targets) * len(PLANNED_PORTS), out
    return {(name, int(port)) for name, port, status in answers if status != "124"}


def live_rules(host: LabHost) -> str:
    return host.exec("nft -s list table inet difyops")[1]


@pytest.fixture(scope="module")
def net_hosts(lab: Lab) -> dict[str, LabHost]:
    # With two machines that are not inventory hosts (see outsiders), started at the same time.
    lb, app, db, *_ = lab.start(["net-lb", "net-app", "net-db", "net-admin", "net-stranger"],
                                cap_add=("NET_ADMIN",))
    code, out = app.exec(f"cat > /usr/local/bin/docker <<'EOF'\n{DOCKER_SHIM}EOF\n"
                         "chmod 755 /usr/local/bin/docker")
    assert code == 0, out
    db.exec("ln -sf /usr/bin/python3 /usr/local/bin/postgres")
    listen(db, "stand-in-postgres", 5432, program="/usr/local/bin/postgres")
    return {"lb": lb, "app": app, "db": db}


@pytest.fixture(scope="module")
def outsiders(lab: Lab, net_hosts: dict[str, LabHost]) -> dict[str, LabHost]:
    """Two machines on the lab network that are not inventory hosts: an operator's machine in
    net.management, and a stranger."""
    return {"admin": lab.host("net-admin"), "stranger": lab.host("net-stranger")}


@pytest.fixture(scope="module")
def inv(net_hosts: dict[str, LabHost], outsiders: dict[str, LabHost],
        tmp_path_factory: pytest.TempPathFactory) -> Inv:
    """Run `inv` on an inventory of the three hosts, with settings merged in for one call."""
    folder = tmp_path_factory.mktemp("net")
    small = {"cpu": 1, "memory_gb": 1, "disk_gb": 5}
    base = {
        "name": "net-lab",
        "cache": {"mode": "standalone"},
        "vector": {"store": "pgvector"},
        "timeouts": {"connect": 5, "command": 300},
        "preflight": {"sizes": {role: small for role in ROLES}, "probe_timeout": 2},
        # Long enough for a loaded machine to confirm in time (the confirmation gets half).
        # SSH (and the monitoring UIs) from the operator's machine and from this machine
        # (net.allow_control).
        "net": {"rollback_seconds": 20, "management": [outsiders["admin"].address]},
        "hosts": [net_hosts["lb"].inventory_entry(["lb"]),
                  net_hosts["app"].inventory_entry(APP, user="deploy"),
                  net_hosts["db"].inventory_entry(["db_primary", "cache"])],
    }
    env = {"DIFY_SECRETS": str(folder / "secrets.env")}

    def run(*args: str, settings: dict[str, Any] | None = None) -> subprocess.CompletedProcess:
        path = folder / "inventory.yml"
        path.write_text(yaml.safe_dump(merge(base, settings or {})))
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                              capture_output=True, env={**os.environ, **env,
                                                        "DIFY_INVENTORY": str(path)},
                              timeout=300, check=False)

    assert run("config.secrets").returncode == 0
    return run


def table_row(output: str, host: str, check: str) -> str:
    """The preflight table's line for a host and check."""
    (line,) = [line for line in output.splitlines()
               if re.match(rf"^{re.escape(host)}\s+{check}\s", line)]
    return line


def summary_columns(result: subprocess.CompletedProcess) -> list[str]:
    """The column names of a run's summary: only `unchanged` when nothing changed."""
    return result.stdout.split("summary:")[1].strip().splitlines()[0].split()


def status_row(output: str, host: str) -> str:
    """net.status's table line for a host (the first line that starts with its name)."""
    return next(line for line in output.splitlines() if re.match(rf"^{host}\s", line))


def test_preflight_passes_on_ready_hosts(inv: Inv) -> None:
    result = inv("deploy.preflight")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REFUSE" not in result.stdout
    assert "ours: 5432 (postgres)" in table_row(result.stdout, "net-db", "ports")
    assert "Docker 24.0.7, compose 2.26.1" in table_row(result.stdout, "net-app", "docker")
    reach = table_row(result.stdout, "net-app", "reach")
    assert " info " in reach and "reached net-db:5432" in reach
    assert "not listening yet: net-db:6379" in reach
    # Dify 1.16.1 runs local_sandbox on net-app (the agent services' default host): its kernel
    # is checked there (5.13 or newer), the 29th row.
    assert table_row(result.stdout, "net-app", "kernel").split()[2] == "ok"
    assert len([line for line in result.stdout.splitlines() if line.startswith("net-")]) == 29


def test_preflight_refuses_a_taken_port_and_too_little_disk(inv: Inv,
                                                           net_hosts: dict[str, LabHost]) -> None:
    lb = net_hosts["lb"]
    listen(lb, "squatter-80", 80)
    try:
        result = inv("deploy.preflight",
                     settings={"preflight": {"sizes": {"db_primary": {"disk_gb": 10**6}}}})
        assert result.returncode == 1, result.stdout + result.stderr
        ports = table_row(result.stdout, "net-lb", "ports")
        assert " REFUSE " in ports and "80 (http) is held by python3" in ports
        disk = table_row(result.stdout, "net-db", "disk")
        assert " REFUSE " in disk and "db_primary wants 1000000 GB" in disk
        assert "preflight refused 2 check(s): net-lb (ports), net-db (disk)" in result.stderr

        # deploy.all runs the preflight first and stops there: nothing installed.
        result = inv("deploy.all", "--only", "lb")
        assert result.returncode == 1
        assert "preflight refused 1 check(s): net-lb (ports)" in result.stderr
        assert "[lb]" not in result.stdout
        assert lb.exec("test -e /etc/nginx")[0] != 0
        # --dry touches nothing and skips the preflight.
        dry = inv("deploy.all", "--dry", "--only", "lb")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "preflight" not in dry.stdout and "[lb] net-lb: install nginx" in dry.stdout
    finally:
        stop(lb, "squatter-80")


def test_firewall_allows_the_plan_and_drops_the_rest(inv: Inv,
                                                     net_hosts: dict[str, LabHost]) -> None:
    lb, app, db = net_hosts["lb"], net_hosts["app"], net_hosts["db"]
    listen(db, "stand-in-other", 8080)
    lb.exec("ln -sf /usr/bin/python3 /usr/local/bin/nginx")
    listen(lb, "stand-in-nginx", 80, program="/usr/local/bin/nginx")
    try:
        assert probe(lb, db, 5432)[0] == 0  # open before: the firewall is what closes it
        dry = inv("net.apply", "--dry")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        assert "tcp dport 5432 accept" in dry.stdout
        assert db.exec("nft list table inet difyops")[0] != 0  # the dry run loaded nothing

        # deploy.all applies it first (net.firewall: auto, three hosts), after its preflight.
        first = inv("deploy.all", "--only", "net")
        assert first.returncode == 0, first.stdout + first.stderr
        assert first.stdout.index("preflight") < first.stdout.index("applying the host firewall")
        assert ("net-db: health new SSH connection confirming the firewall ... unchanged: "
                "confirmed over a new connection") in first.stdout
        assert probe(app, db, 5432)[0] == 0          # api host -> PostgreSQL: accepted
        code, seconds = probe(lb, db, 5432)          # lb host -> PostgreSQL: dropped
        assert code == 124 and seconds < 10  # `timeout 2` ended it: dropped, no answer
        assert probe(app, db, 8080)[0] == 124        # a port the plan does not open
        assert probe(db, lb, 80)[0] == 0             # the load balancer is public
        assert all(host.ssh_ok() for host in (lb, app, db))

        second = inv("net.apply")
        assert second.returncode == 0, second.stdout + second.stderr
        assert summary_columns(second) == ["host", "unchanged"], second.stdout

        status = inv("net.status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "as planned" in status_row(status.stdout, "net-db")
        assert f"input: ip saddr {app.address} tcp dport 5432 accept" in status.stdout

        # After the firewall, the hosts still reach each other where the plan says.
        after = inv("deploy.preflight")
        assert after.returncode == 0, after.stdout + after.stderr
        assert "reached net-db:5432" in table_row(after.stdout, "net-app", "reach")
    finally:
        stop(db, "stand-in-other")
        stop(lb, "stand-in-nginx")


def test_a_stranger_reaches_only_the_web_and_the_operator_also_ssh(
        inv: Inv, net_hosts: dict[str, LabHost], outsiders: dict[str, LabHost]) -> None:
    assert inv("net.apply").returncode == 0
    web = {("lb", 80), ("lb", 443)}
    assert reached(outsiders["stranger"], net_hosts) == web
    assert reached(outsiders["admin"], net_hosts) == web | {(name, 22) for name in net_hosts}


def test_a_hand_made_rule_is_reported_and_repaired(inv: Inv,
                                                   net_hosts: dict[str, LabHost]) -> None:
    app, db = net_hosts["app"], net_hosts["db"]
    assert inv("net.apply").returncode == 0
    db.exec("nft add rule inet difyops input tcp dport 8080 accept")
    status = inv("net.status")
    assert status.returncode == 1
    assert "changed by hand" in status_row(status.stdout, "net-db")
    assert "+\t\ttcp dport 8080 accept" in status.stdout
    assert "net-db" in status.stderr and "net-lb" not in status.stderr

    repaired = inv("net.apply")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "net-db: load the rules (rolled back unless confirmed) ... changed" in repaired.stdout
    assert "tcp dport 8080" not in live_rules(db)
    assert inv("net.status").returncode == 0
    assert probe(app, db, 5432)[0] == 0


def test_a_change_that_cuts_ssh_is_rolled_back(inv: Inv, net_hosts: dict[str, LabHost]) -> None:
    app, db = net_hosts["app"], net_hosts["db"]
    assert inv("net.apply").returncode == 0
    before = {name: live_rules(host) for name, host in net_hosts.items()}
    # SSH only from a range this machine is not in, and not from this machine either.
    cut = inv("net.apply", settings={"net": {"management": ["192.0.2.0/24"],
                                             "allow_control": False, "rollback_seconds": 10}})
    assert cut.returncode == 1, cut.stdout + cut.stderr
    assert "net-db: health new SSH connection confirming the firewall ... failed" in cut.stdout
    assert "net-db: the change cut new SSH connections from this machine and was rolled back " \
           "by the host's timer; it answers again, the rules confirmed earlier are back" \
           in cut.stderr
    for name, host in net_hosts.items():
        assert host.ssh_ok(), name
        assert live_rules(host) == before[name], name
    assert probe(app, db, 5432)[0] == 0
    status = inv("net.status", settings={"net": {"management": ["192.0.2.0/24"],
                                                 "allow_control": False}})
    assert "differ from the plan" in status_row(status.stdout, "net-db")
    assert "+\t\tip saddr 192.0.2.0/24 tcp dport 22 accept" in status.stdout


def test_ssh_hardening_without_locking_anyone_out(inv: Inv,
                                                  net_hosts: dict[str, LabHost]) -> None:
    lb, app = net_hosts["lb"], net_hosts["app"]
    hardened = {"net": {"ssh_hardening": True}}
    dropin = "/etc/ssh/sshd_config.d/00-difyops-hardening.conf"
    # A file read before ours lets passwords in: the hardening cannot take effect there.
    lb.exec("echo 'PasswordAuthentication yes' > /etc/ssh/sshd_config.d/00-aaa.conf")
    try:
        result = inv("net.apply", settings=hardened)
        assert result.returncode == 1
        assert "sshd does not apply 'passwordauthentication no'" in result.stdout
        assert "cut new SSH connections" not in result.stderr
        assert lb.exec(f"test -e {dropin}")[0] != 0  # rolled back at once
        assert lb.ssh_ok()
    finally:
        lb.exec("rm -f /etc/ssh/sshd_config.d/00-aaa.conf")

    result = inv("net.apply", settings=hardened)
    assert result.returncode == 0, result.stdout + result.stderr
    for host in net_hosts.values():
        _, effective = host.exec("sshd -T")
        assert {"passwordauthentication no", "kbdinteractiveauthentication no",
                "permitrootlogin without-password"} <= set(effective.splitlines())
        assert host.ssh_ok() and host.ssh_ok(user="deploy")
    again = inv("net.apply", settings=hardened)
    assert summary_columns(again) == ["host", "unchanged"], again.stdout
    assert "key-only login in force" in status_row(inv("net.status", settings=hardened).stdout,
                                                   "net-app")

    off = inv("net.apply")
    assert off.returncode == 0
    assert "net-app: remove the sshd hardening drop-in ... changed" in off.stdout
    assert app.exec(f"test -e {dropin}")[0] != 0 and app.ssh_ok(user="deploy")
