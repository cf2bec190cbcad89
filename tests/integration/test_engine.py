"""The engine on real SSH hosts: parallel apply, idempotence, dry run, an unreachable host."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tasks.core.apply import execute
from tasks.core.gates import CommandGate, TcpGate
from tasks.core.inventory import Host, Ssh
from tasks.core.plan import HostPlan, RunCommand, TierPlan, WaitFor, WriteFile
from tasks.core.report import CHANGED, FAILED, NOT_RUN, WOULD_CHANGE, Report
from tests.integration.lab import LabHost

CONF = "/etc/difyops-demo/app.conf"
SECRET = "/etc/difyops-demo/secret.env"
RESTARTS = "/var/tmp/difyops-demo-restarts"


def as_host(lab_host: LabHost, user: str = "root") -> Host:
    return Host(name=lab_host.name, address=lab_host.address, roles=("api",),
                ssh=Ssh(user=user, port=22, key=str(lab_host.key_file)))


def demo_plan(hosts: list[Host], version: int = 1) -> list[TierPlan]:
    """Files, a package-like command with a probe, a triggered restart and two gates per host."""
    return [TierPlan("demo", [HostPlan(host, [
        WriteFile(CONF, f"host = {host.name}\nversion = {version}\n"),
        WriteFile(SECRET, "TOKEN=not-shown-anywhere\n", mode=0o600, secret=True),
        RunCommand("create the service user", "useradd --system demo-svc",
                   unless="id -u demo-svc"),
        RunCommand("restart demo", f"echo restart >> {RESTARTS}", on_change=(CONF, SECRET)),
        WaitFor(CommandGate("demo config", command=f"grep -q 'host = {host.name}' {CONF}",
                            timeout=10)),
        WaitFor(TcpGate("sshd", address=host.address, port=22, timeout=10)),
    ]) for host in hosts])]


def run(plan: list[TierPlan], dry: bool = False, show_diff: bool = False) -> Report:
    return execute(plan, dry=dry, show_diff=show_diff, report=Report(out=io.StringIO()),
                   timeouts={"connect": 5, "command": 120})


def restarts(lab_host: LabHost) -> int:
    _, out = lab_host.exec(f"cat {RESTARTS} 2>/dev/null | wc -l")
    return int(out.strip())


@pytest.fixture(scope="module")
def hosts(ssh_hosts: list[LabHost]) -> list[Host]:
    """h1 and h2 as root, h3 through the `deploy` user and sudo."""
    for lab_host in ssh_hosts:
        lab_host.exec(f"rm -rf /etc/difyops-demo {RESTARTS} /var/lib/difyops; "
                      "userdel demo-svc 2>/dev/null; true")
    h1, h2, h3 = ssh_hosts
    return [as_host(h1), as_host(h2), as_host(h3, user="deploy")]


def test_apply_in_parallel_then_nothing_changes(hosts: list[Host],
                                                ssh_hosts: list[LabHost]) -> None:
    first = run(demo_plan(hosts))
    assert first.failed == []
    assert first.count(CHANGED) == 3 * 4  # 2 files, user, restart on each host
    for lab_host in ssh_hosts:
        code, out = lab_host.exec(f"cat {CONF}; stat -c '%a %U' {SECRET}; id -u demo-svc")
        assert code == 0, out
        assert f"host = {lab_host.name}" in out and "600 root" in out
        assert restarts(lab_host) == 1

    second = run(demo_plan(hosts))
    assert second.failed == []
    assert second.count(CHANGED) == 0
    assert [restarts(h) for h in ssh_hosts] == [1, 1, 1]
    summary = second.summary().splitlines()
    assert [line.split()[0] for line in summary[1:]] == ["h1", "h2", "h3"]


def test_dry_run_changes_nothing_on_the_hosts(hosts: list[Host],
                                              ssh_hosts: list[LabHost]) -> None:
    run(demo_plan(hosts))
    before = [h.exec(f"stat -c '%Y %s' {CONF}; md5sum {CONF}")[1] for h in ssh_hosts]
    report = run(demo_plan(hosts, version=2), dry=True, show_diff=True)
    after = [h.exec(f"stat -c '%Y %s' {CONF}; md5sum {CONF}")[1] for h in ssh_hosts]
    assert before == after
    assert [restarts(h) for h in ssh_hosts] == [1, 1, 1]
    would = [r for r in report.results if r.status == WOULD_CHANGE]
    assert {(r.host, r.step) for r in would} == {
        (h.name, step) for h in hosts for step in (f"file {CONF}", "restart demo")}
    diff = next(r.detail for r in would if r.host == "h3" and r.step == f"file {CONF}")
    assert "-version = 1" in diff and "+version = 2" in diff
    assert "not-shown-anywhere" not in report.out.getvalue()


def test_an_unreachable_host_fails_cleanly(lab, hosts: list[Host],
                                           ssh_hosts: list[LabHost]) -> None:
    (gone,) = lab.start(["gone"])
    target = as_host(gone)
    gone.stop()
    before = [restarts(lab_host) for lab_host in ssh_hosts]
    report = run(demo_plan([*hosts, target], version=3))
    failures = [r for r in report.results if r.status == FAILED]
    assert [r.host for r in failures] == ["gone"]
    assert f"cannot connect to gone (root@{target.address}:22)" in failures[0].detail
    assert {r.status for r in report.results if r.host == "gone"} == {FAILED, NOT_RUN}
    for lab_host, restarted in zip(ssh_hosts, before, strict=True):  # the others applied 3
        assert "version = 3" in lab_host.exec(f"cat {CONF}")[1]
        assert restarts(lab_host) == restarted + 1


def test_inv_deploys_a_real_tier_over_ssh(ssh_hosts: list[LabHost], tmp_path: Path) -> None:
    """`inv cache.deploy` installs and starts Redis on a host; the second run changes nothing."""
    import subprocess
    import sys

    import yaml

    h1, h2, _ = ssh_hosts
    inventory = {
        "name": "engine-lab",
        "cache": {"mode": "standalone"},
        "vector": {"store": "pgvector"},
        "net": {"firewall": "off"},
        "hosts": [h1.inventory_entry(["db_primary", "cache"]),
                  h2.inventory_entry(["dev_backend"], user="deploy")],
    }
    path = tmp_path / "lab.yml"
    path.write_text(yaml.safe_dump(inventory))
    env = {"DIFY_INVENTORY": str(path), "DIFY_SECRETS": str(tmp_path / "lab.env")}
    root = Path(__file__).resolve().parents[2]

    def inv(*args: str) -> subprocess.CompletedProcess:
        import os

        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=root, text=True,
                              capture_output=True, env={**os.environ, **env}, timeout=600,
                              check=False)

    assert inv("config.secrets").returncode == 0
    dry = inv("cache.deploy", "--dry")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert h1.exec("test -e /etc/redis/redis.conf")[0] != 0  # the dry run installed nothing
    assert "new file, " in dry.stdout and "masterauth" not in dry.stdout  # sizes, not contents
    fresh = inv("deploy.status", "--only", "cache")
    assert fresh.returncode == 1
    assert "nothing deployed on this host yet: run `inv deploy.all`" in fresh.stdout
    first = inv("cache.deploy")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[cache] h1: health redis on :6379 ... unchanged: " in first.stdout
    _, out = h1.exec("/usr/local/sbin/difyops-redis cli ping; stat -c %a /etc/redis/redis.conf")
    assert out.split() == ["PONG", "640"]
    second = inv("cache.deploy")
    assert second.returncode == 0, second.stdout + second.stderr
    header, line = second.stdout.split("summary:")[1].strip().splitlines()
    assert header.split() == ["host", "unchanged"]  # no column of changes at all
    assert line.split()[0] == "h1"
    healthy = inv("deploy.status", "--only", "cache")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "h1    cache  redis on :6379  healthy" in healthy.stdout
    h1.exec("systemctl stop redis-server")
    down = inv("deploy.status", "--only", "cache")
    assert down.returncode == 1
    assert "redis on :6379  UNHEALTHY" in down.stdout
    assert "1 component(s) unhealthy: redis on :6379 on h1" in down.stderr
    h1.exec("systemctl start redis-server")
    password = (tmp_path / "lab.env").read_text()
    assert not any(line.split("=", 1)[1] in first.stdout + second.stdout
                   for line in password.splitlines())
