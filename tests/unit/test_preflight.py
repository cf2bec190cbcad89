"""Preflight: facts parsed from the hosts' answers, judged against the plan, one row per check."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tasks.core import preflight
from tasks.core.hosts import Result
from tasks.core.inventory import Inventory
from tasks.core.preflight import INFO, OK, REFUSE, WARN, Facts, Listener
from tests.unit.fakes import FakeMachine

GIB = 1024 * 1024  # kB


def facts(**changes) -> Facts:
    """The facts of a host that passes everything the unit inventory asks of a db host."""
    values = dict(os_id="debian", os_version="12", os_name="Debian GNU/Linux 12 (bookworm)",
                  cpu=8, memory_kb=32 * GIB,
                  disks=[("/var/lib/postgresql", "/", 600 * 10**9, 400 * 10**9),
                         ("/var/backups/dify", "/", 600 * 10**9, 400 * 10**9),
                         ("/var/lib/redis", "/", 600 * 10**9, 400 * 10**9)],
                  listeners=[], docker="24.0.7", compose="2.26.1", ntp="yes")
    values.update(changes)
    return Facts(**values)


def row(rows, check: str) -> preflight.Row:
    (found,) = [r for r in rows if r.check == check]
    return found


def test_a_host_of_the_planned_size_passes(load, base) -> None:
    inventory = load(base)
    rows = preflight.evaluate(inventory, inventory.host("db1"), facts())
    assert {r.check: r.status for r in rows} == {
        "os": OK, "cpu": OK, "memory": OK, "disk": OK, "ports": OK, "clock": OK,
        "firewall": OK}


@pytest.mark.parametrize("cpu,status", [(8, OK), (6, WARN), (4, WARN), (3, REFUSE)])
def test_cpu_warns_below_the_plan_and_refuses_below_half(load, base, cpu, status) -> None:
    inventory = load(base)
    found = row(preflight.evaluate(inventory, inventory.host("db1"), facts(cpu=cpu)), "cpu")
    assert found.status == status
    assert found.detail.startswith(f"{cpu} core(s); db_primary wants 8")


def test_memory_counts_what_the_kernel_shows_of_a_32_gb_machine(load, base) -> None:
    inventory = load(base)
    db1 = inventory.host("db1")
    assert row(preflight.evaluate(inventory, db1, facts(memory_kb=int(31.2 * GIB))),
               "memory").status == OK
    assert row(preflight.evaluate(inventory, db1, facts(memory_kb=20 * GIB)),
               "memory").status == WARN
    refused = row(preflight.evaluate(inventory, db1, facts(memory_kb=8 * GIB)), "memory")
    assert refused.status == REFUSE
    assert refused.detail == "8.0 GiB; db_primary wants 32 GB (refused below 14.4)"


def test_a_declared_size_larger_than_the_host_is_a_warning(load, base) -> None:
    base["hosts"][5]["size"] = {"memory_gb": 64}
    inventory = load(base)
    found = row(preflight.evaluate(inventory, inventory.host("db1"), facts()), "memory")
    assert found.status == WARN
    assert found.detail.endswith("the inventory declares size.memory_gb = 64, more than the "
                                 "host has")


def test_the_inventory_can_lower_the_sizes(load, base) -> None:
    base["preflight"] = {"sizes": {"db_primary": {"cpu": 1, "memory_gb": 1, "disk_gb": 5},
                                   "cache": {"cpu": 1, "memory_gb": 1, "disk_gb": 5}}}
    inventory = load(base)
    small = facts(cpu=1, memory_kb=2 * GIB, disks=[("/var/lib/postgresql", "/", 20 * 10**9,
                                                    15 * 10**9)])
    rows = preflight.evaluate(inventory, inventory.host("db1"), small)
    assert {r.status for r in rows} == {OK}


def test_a_host_with_several_roles_needs_the_largest_size(load, base) -> None:
    inventory = load(base)
    wanted = preflight.required_size(inventory, inventory.host("api1"))  # api + plugin_daemon
    assert wanted == {"cpu": (8, "api"), "memory_gb": (16, "api"), "disk_gb": (200, "api")}


def test_disk_refused_when_too_small_or_too_full(load, base) -> None:
    inventory = load(base)
    db1 = inventory.host("db1")
    small = facts(disks=[("/var/lib/postgresql", "/srv", 200 * 10**9, 150 * 10**9)])
    found = row(preflight.evaluate(inventory, db1, small), "disk")
    assert found.status == REFUSE
    assert "/srv (/var/lib/postgresql): 200 GB, 150 GB free; db_primary wants 500 GB" in \
        found.detail
    full = facts(disks=[("/var/lib/postgresql", "/", 600 * 10**9, 3 * 10**9)])
    found = row(preflight.evaluate(inventory, db1, full), "disk")
    assert found.status == REFUSE
    assert "less than preflight.min_free_disk_gb = 10 GB free" in found.detail


def test_disk_is_judged_per_filesystem_by_the_roles_using_it(load, base) -> None:
    inventory = load(base)
    split = facts(disks=[("/var/lib/postgresql", "/data", 600 * 10**9, 500 * 10**9),
                         ("/var/lib/redis", "/", 120 * 10**9, 100 * 10**9)])
    found = row(preflight.evaluate(inventory, inventory.host("db1"), split), "disk")
    assert found.status == OK, found.detail  # the cache (100 GB) lives on the small one


def test_a_port_held_by_another_program_is_refused(load, base) -> None:
    inventory = load(base)
    taken = facts(listeners=[Listener(5432, ("python3",), "..."), Listener(22, ("sshd",), "")])
    found = row(preflight.evaluate(inventory, inventory.host("db1"), taken), "ports")
    assert found.status == REFUSE
    assert found.detail == ("5432 (postgresql) is held by python3: stop it or move it, "
                            "postgresql needs this port")


def test_a_port_held_by_our_own_service_is_fine(load, base) -> None:
    inventory = load(base)
    ours = facts(listeners=[Listener(5432, ("postgres",), ""),
                            Listener(6379, ("redis-server",), ""),
                            Listener(9100, ("prometheus-node",), "")])  # ss shows 15 characters
    found = row(preflight.evaluate(inventory, inventory.host("db1"), ours), "ports")
    assert found.status == OK
    assert "ours: 5432 (postgres), 6379 (redis-server), 9100 (prometheus-node)" in found.detail


@pytest.mark.parametrize("docker,compose,message", [
    ("missing", "", "Docker is not installed"),
    ("", "", "the Docker daemon does not answer"),
    ("24.0.7", "", "without compose v2"),
    ("24.0.7", "1.29.2", "compose 1.29.2 is v1"),
])
def test_docker_and_compose_v2_where_compose_runs(load, base, docker, compose, message) -> None:
    inventory = load(base)
    found = row(preflight.evaluate(inventory, inventory.host("api1"),
                                   facts(docker=docker, compose=compose)), "docker")
    assert found.status == REFUSE and message in found.detail
    assert "docker" not in {r.check for r in preflight.evaluate(inventory,
                                                                inventory.host("db1"), facts())}


def test_clock_skew_is_refused_and_missing_ntp_is_a_warning(load, base) -> None:
    inventory = load(base)
    db1 = inventory.host("db1")
    skewed = row(preflight.evaluate(inventory, db1, facts(skew=-7.5, uncertainty=0.1)), "clock")
    assert skewed.status == REFUSE and skewed.detail.startswith("7.5 s behind this machine")
    unsynced = row(preflight.evaluate(inventory, db1, facts(ntp="no", skew=0.3)), "clock")
    assert unsynced.status == WARN and "not synchronized by NTP" in unsynced.detail
    chrony = row(preflight.evaluate(inventory, db1, facts(ntp="", chrony="Normal")), "clock")
    assert chrony.status == OK


def test_unsupported_os_is_refused_except_on_a_dev_workstation(load, base) -> None:
    inventory = load(base)
    found = preflight.check_os(inventory.host("db1"), facts(os_id="centos", os_version="7",
                                                            os_name="CentOS 7"))
    assert found.status == REFUSE and "Debian 12/13, Ubuntu 22.04/24.04" in found.detail
    assert preflight.check_os(inventory.host("db1"), facts(os_id="ubuntu",
                                                           os_version="24.04")).status == OK


def test_another_active_firewall_is_a_warning(load, base) -> None:
    inventory = load(base)
    found = row(preflight.evaluate(inventory, inventory.host("db1"),
                                   facts(ufw="Status: active")), "firewall")
    assert found.status == WARN and found.detail.startswith("ufw active")


def test_facts_are_parsed_from_the_script_output() -> None:
    output = "\n".join([
        "os=ubuntu|24.04|Ubuntu 24.04.1 LTS", "cpu=4", "mem_kb=16310000",
        "disk=/var/lib/docker|/|107374182400|53687091200",
        'listen=LISTEN 0 4096 0.0.0.0:22 0.0.0.0:* users:(("sshd",pid=5,fd=3))',
        'listen=LISTEN 0 511 [::]:80 [::]:* users:(("nginx",pid=7,fd=6),("nginx",pid=8,fd=6))',
        "listen=LISTEN 0 4096 127.0.0.53%lo:53 0.0.0.0:*",
        "docker=27.1.1", "compose=2.29.1", "ntp=yes", "ufw=Status: inactive",
        "resolve=db.example.com|10.0.3.11 ",
    ])
    parsed = preflight.parse_facts(output)
    assert (parsed.os_id, parsed.os_version, parsed.cpu, parsed.memory_kb) == (
        "ubuntu", "24.04", 4, 16310000)
    assert parsed.disks == [("/var/lib/docker", "/", 107374182400, 53687091200)]
    assert [(item.port, item.processes) for item in parsed.listeners] == [
        (22, ("sshd",)), (80, ("nginx",)), (53, ())]
    assert (parsed.docker, parsed.compose, parsed.ntp) == ("27.1.1", "2.29.1", "yes")
    assert parsed.resolved == {"db.example.com": ["10.0.3.11"]}
    assert preflight.parse_facts("docker=missing\nos=debian|12|x").docker == "missing"
    assert preflight.parse_facts("os=debian|12|x\nlisten_tool=missing").listeners is None


def test_the_scripts_are_valid_sh(tmp_path: Path) -> None:
    for text in (preflight.facts_script(["/var/lib/postgresql", "/srv/a b"], ["db.example"]),
                 preflight.probe_script([("db1.example", 5432), ("10.0.3.11", 6379)], 3)):
        script = tmp_path / "check.sh"
        script.write_text(text)
        result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert "probe 10.0.3.11 6379 &" in preflight.probe_script([("10.0.3.11", 6379)], 3)


def test_the_facts_script_runs_here_and_reads_this_machine(tmp_path: Path) -> None:
    result = subprocess.run(["sh", "-c", preflight.facts_script([str(tmp_path / "new" / "x")],
                                                                ["localhost"])],
                            capture_output=True, text=True, timeout=60)
    parsed = preflight.parse_facts(result.stdout)
    assert parsed.os_id and parsed.cpu >= 1 and parsed.memory_kb > 0
    (disk,) = parsed.disks  # the nearest existing parent of a path not made yet
    assert disk[0].endswith("/new/x") and disk[2] > 0
    assert "127.0.0.1" in parsed.resolved["localhost"] or "::1" in parsed.resolved["localhost"]


def reach(inventory: Inventory, name: str, known: dict[str, Facts],
          answers: dict) -> preflight.Row:
    return preflight.check_reach(inventory, inventory.host(name), known, answers)


def test_reach_probes_listening_peers_and_notes_the_others(load, base) -> None:
    base["cache"] = {"mode": "standalone"}
    base["hosts"] = [h for h in base["hosts"] if h["name"] in ("lb1", "web1", "api1",
                                                               "worker1", "db1", "vector1")]
    base["storage"] = {"type": "s3", "s3_endpoint": "http://s3", "s3_bucket": "b"}
    inventory = load(base)
    known = {"db1": facts(listeners=[Listener(5432, ("postgres",), "")]),
             "vector1": facts(listeners=[Listener(8080, ("weaviate",), ""),
                                         Listener(50051, ("weaviate",), "")])}
    api1 = inventory.host("api1")
    targets = preflight.probe_targets(inventory, api1, known)
    assert ("10.0.3.11", 5432) in targets and ("10.0.3.11", 6379) not in targets
    answers = {("10.0.3.11", 5432): (0, ""), ("10.0.3.21", 8080): (0, ""),
               ("10.0.3.21", 50051): (124, "")}
    found = reach(inventory, "api1", known, answers)
    assert found.status == REFUSE
    assert found.detail.startswith("cannot reach vector1:50051 (weaviate grpc): no answer "
                                   "within 3 s")
    assert "reached db1:5432, vector1:8080" in found.detail
    assert "not listening yet: db1:6379" in found.detail
    answers[("10.0.3.21", 50051)] = (0, "")
    found = reach(inventory, "api1", known, answers)
    assert found.status == INFO


def test_the_whole_preflight_in_parallel_with_a_refusal(load, base, use_machines,
                                                       capsys) -> None:
    inventory = load(base)
    hosts = [inventory.host("lb1"), inventory.host("db1")]

    def answers(command: str) -> Result:
        if command.startswith("echo \"os="):
            return Result(0, "os=debian|12|Debian 12\ncpu=1\nmem_kb=1000\n", "")
        if command == "date +%s.%N":
            return Result(0, f"{time.time():.3f}\n", "")
        return Result(0, "", "")

    class Machine(FakeMachine):
        def _execute(self, command: str, timeout: float) -> Result:
            return answers(command)

    use_machines(lambda host, timeouts=None: Machine(host))
    with pytest.raises(preflight.PreflightRefused) as caught:
        preflight.check(inventory, hosts)
    printed = capsys.readouterr().out
    assert "lb1   cpu       REFUSE  1 core(s); lb wants 4 core(s) (refused below 2)" in printed
    assert "preflight refused" in str(caught.value) and "lb1 (cpu)" in str(caught.value)
    assert [line.split()[0] for line in printed.splitlines()[2:]] == \
        ["lb1"] * 9 + ["db1"] * 9


def test_docker_is_only_asked_where_a_compose_tier_runs(load, base) -> None:
    inventory = load(base)
    assert "docker" in {r.check for r in preflight.evaluate(
        inventory, inventory.host("vector1"), facts(docker="missing"))}
    base["vector"] = {"store": "pgvector"}
    inventory = load(base)
    assert "docker" not in {r.check for r in preflight.evaluate(
        inventory, inventory.host("vector1"), facts(docker="missing"))}


def test_a_windows_workstation_gets_a_warning_not_a_refusal(load, use_machines) -> None:
    inventory = load({"name": "lab", "cache": {"mode": "standalone"},
                      "vector": {"store": "pgvector"}, "net": {"management": ["192.168.1.0/24"]},
                      "preflight": {"sizes": {"db_primary": {"cpu": 1, "memory_gb": 1,
                                                             "disk_gb": 1}}},
                      "hosts": [{"name": "server", "address": "192.168.1.100",
                                 "roles": ["db_primary", "cache"]},
                                {"name": "win", "address": "192.168.1.102",
                                 "roles": ["dev_frontend"]}]})

    class Machine(FakeMachine):
        def _execute(self, command: str, timeout: float) -> Result:
            if self.host.name == "win":  # cmd.exe does not understand the script
                return Result(1, "", "'echo' is not recognized as an internal command")
            if command.startswith("echo \"os="):
                return Result(0, "os=debian|12|Debian 12\ncpu=2\nmem_kb=4000000\nntp=yes\n"
                                 "disk=/var/lib/postgresql|/|900000000000|800000000000\n", "")
            if command == "date +%s.%N":
                return Result(0, f"{time.time():.3f}\n", "")
            return Result(0, "", "")

    use_machines(lambda host, timeouts=None: Machine(host))
    rows = preflight.check(inventory, inventory.hosts, out=lambda *a, **k: None)
    (win,) = [r for r in rows if r.host == "win"]
    assert win.check == "os" and win.status == WARN
    assert "no POSIX shell answered the checks (Windows?)" in win.detail


def test_a_monitor_host_without_grafana_needs_no_docker(load, base) -> None:
    from tasks.core import netplan

    base["hosts"].append({"name": "mon2", "address": "10.0.4.11", "roles": ["monitor", "lb"]})
    inventory = load(base)
    assert netplan.runs_compose(inventory, inventory.host("mon2"))  # Grafana runs by compose
    base["monitor"] = {"grafana": False}  # Prometheus & co. come from the OS packages
    inventory = load(base)
    assert not netplan.runs_compose(inventory, inventory.host("mon2"))
    assert netplan.runs_compose(inventory, inventory.host("api1"))
