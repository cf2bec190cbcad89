"""The network plan and the host firewall: rules rendered from roles, steps, confirmation."""

from __future__ import annotations

import contextlib
import re
import subprocess
from typing import Any

import pytest
from invoke import Context

import tasks.net as net_tasks
from tasks.core import netplan
from tasks.core.errors import HostError, InputError
from tasks.core.gates import wait
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import RunCommand, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.tiers import firewall
from tests.unit.fakes import FakeMachine


def rules_of(inventory: Inventory, name: str, control: str | None = "10.0.9.9") -> str:
    """The rendered nftables file of a host."""
    return firewall.render_rules(inventory, Renderer(inventory), inventory.host(name), control)


def accepted(text: str, port: int, proto: str = "tcp") -> list[str]:
    """The input-chain accept lines for a port (the forward chain left out)."""
    chain = text.split("chain input", 1)[1].split("chain forward", 1)[0]
    return [line.strip() for line in chain.splitlines()
            if re.search(rf"\b{proto} dport {port}\b", line) and "accept" in line]


def sources(line: str) -> set[str]:
    """The addresses of a rule's saddr match."""
    match = re.search(r"saddr (\{ [^}]* \}|\S+)", line)
    return set(match.group(1).strip("{} ").split(", ")) if match else set()


def test_db_accepts_5432_from_app_replicas_and_monitor_only(load, base) -> None:
    text = rules_of(load(base), "db1")
    (line,) = accepted(text, 5432)
    assert sources(line) == {"10.0.2.21", "10.0.2.22", "10.0.2.31", "10.0.3.12", "10.0.3.13",
                             "10.0.4.10"}
    assert "10.0.1.10" not in line and "10.0.2.11" not in line  # not the lb, not web
    assert "policy drop" in text.split("chain input", 1)[1].split("\n", 2)[1]


def test_redis_and_sentinel_from_app_hosts_and_the_other_cache_hosts(load, base) -> None:
    text = rules_of(load(base), "db2")
    for port in (6379, 26379):
        (line,) = accepted(text, port)
        assert sources(line) == {"10.0.2.21", "10.0.2.22", "10.0.2.31", "10.0.3.11",
                                 "10.0.3.13"}


def test_http_only_on_the_load_balancer(load, base) -> None:
    inventory = load(base)
    lb = rules_of(inventory, "lb1")
    assert accepted(lb, 80) == ['tcp dport 80 accept comment "http from anywhere"']
    assert accepted(lb, 443) == ['tcp dport 443 accept comment "https from anywhere"']
    for host in inventory.hosts:
        if host.name != "lb1":
            text = rules_of(inventory, host.name)
            assert accepted(text, 80) == [] and accepted(text, 443) == [], host.name


def test_weaviate_from_api_and_worker_hosts(load, base) -> None:
    text = rules_of(load(base), "vector1")
    for port in (8080, 50051):
        (line,) = accepted(text, port)
        assert sources(line) == {"10.0.2.21", "10.0.2.22", "10.0.2.31"}
    assert accepted(text, 7100) == []  # one node: no cluster ports


def test_exporters_from_the_monitor_host_only(load, base) -> None:
    inventory = load(base)
    for name, port in (("db1", 9187), ("db1", 9121), ("lb1", 9113), ("api1", 9100)):
        (line,) = accepted(rules_of(inventory, name), port)
        assert sources(line) == {"10.0.4.10"}, (name, port)


def test_without_a_monitor_host_exporter_ports_stay_closed(load, base) -> None:
    base["hosts"] = [h for h in base["hosts"] if h["name"] != "monitor1"]
    text = rules_of(load(base), "db1")
    assert accepted(text, 9100) == [] and accepted(text, 9187) == []
    assert "# closed: 9187 (postgres exporter): no client in the inventory" in text


def test_published_compose_ports_are_also_guarded_on_the_forward_hook(load, base) -> None:
    text = rules_of(load(base), "api1")
    forward = text.split("chain forward", 1)[1]
    assert ('ip saddr 10.0.1.10 meta l4proto tcp ct status dnat ct original proto-dst 5001 '
            'accept') in forward
    assert 'meta l4proto tcp ct status dnat ct original proto-dst 5001 drop' in forward
    # api1 is also the plugin daemon: its containers reach its own api through a bridge.
    assert any('iifname "br-*"' in line for line in accepted(text, 5001))


def test_ssh_from_anywhere_with_the_firewall_off_and_no_management_range(load, base) -> None:
    base["net"] = {"firewall": "off", "management": []}
    text = rules_of(load(base), "db1")
    assert accepted(text, 22) == ['tcp dport 22 accept comment "ssh from anywhere"']


def test_ssh_from_the_management_range_and_the_control_machine(load, base) -> None:
    base["net"] = {"management": ["10.0.4.0/24", "fd00::/64"]}
    inventory = load(base)
    lines = accepted(rules_of(inventory, "db1", control="192.168.7.5"), 22)
    assert [sources(line) for line in lines] == [{"10.0.4.0/24", "192.168.7.5"}, {"fd00::/64"}]
    base["net"]["allow_control"] = False
    lines = accepted(rules_of(load(base), "db1", control="192.168.7.5"), 22)
    assert [sources(line) for line in lines] == [{"10.0.4.0/24"}, {"fd00::/64"}]


def test_an_ipv4_mapped_control_address_becomes_ipv4(load, base) -> None:
    base["net"] = {"management": ["10.0.4.0/24"]}
    (line,) = accepted(rules_of(load(base), "db1", control="::ffff:192.168.7.5"), 22)
    assert sources(line) == {"10.0.4.0/24", "192.168.7.5"}


def test_the_ssh_port_of_the_inventory_is_the_one_opened(load, base) -> None:
    base["hosts"][5]["ssh"] = {"port": 2222}
    assert accepted(rules_of(load(base), "db1"), 2222) != []
    assert accepted(rules_of(load(base), "db1"), 22) == []


def test_weaviate_cluster_ports_between_vector_nodes(load, base) -> None:
    base["hosts"] += [{"name": "vector2", "address": "10.0.3.22", "roles": ["vector"]},
                      {"name": "vector3", "address": "10.0.3.23", "roles": ["vector"]}]
    text = rules_of(load(base), "vector1")
    (gossip,) = accepted(text, 7100, "udp")
    assert sources(gossip) == {"10.0.3.22", "10.0.3.23"}
    assert len(accepted(text, 8300)) == 1


def test_the_home_lab_network_reaches_the_dev_backend(load) -> None:
    inventory = load({"name": "lab", "cache": {"mode": "standalone"},
                      "dev": {"network": "192.168.1.0/24"},
                      "net": {"management": ["192.168.1.0/24"]},
                      "hosts": [{"name": "server", "address": "192.168.1.100",
                                 "roles": ["dev_server", "db_primary", "cache", "vector"]},
                                {"name": "vm", "address": "192.168.1.101",
                                 "roles": ["dev_backend"]},
                                {"name": "win", "address": "192.168.1.102",
                                 "roles": ["dev_frontend"]}]})
    (line,) = accepted(rules_of(inventory, "vm"), 5001)
    assert sources(line) == {"192.168.1.0/24", "192.168.1.102"}
    (line,) = accepted(rules_of(inventory, "server"), 5432)
    assert sources(line) == {"192.168.1.101"}
    hosts = [plan.host.name for plan in firewall.TIER.plan(inventory).hosts]
    assert hosts == ["server", "vm"]  # the Windows workstation gets no nftables rules


def test_every_rule_line_is_well_formed(load, base) -> None:
    inventory = load(base)
    for host in inventory.hosts:
        text = rules_of(inventory, host.name)
        assert text.count("{") == text.count("}"), host.name
        assert text.startswith("# Managed by difyops")
        assert "table inet difyops\ndelete table inet difyops\ntable inet difyops {" in text
        for line in text.splitlines():
            if "comment" in line:
                assert len(line.split('comment "', 1)[1]) <= 128
                assert line.rstrip().endswith('"')


@pytest.mark.parametrize("value,message", [
    (["10.0.0.0/33"], "net.management[0]: '10.0.0.0/33' is not an address or a CIDR block"),
    ([7], "net.management[0]: 7 is not an address or a CIDR block"),
])
def test_bad_management_ranges_are_refused(load, base, value: Any, message: str) -> None:
    base["net"] = {"management": value}
    with pytest.raises(InputError) as caught:
        load(base)
    assert message in str(caught.value)


def test_a_rollback_too_short_to_confirm_is_refused(load, base) -> None:
    base["net"] = {"rollback_seconds": 3}
    with pytest.raises(InputError) as caught:
        load(base)
    assert "net.rollback_seconds: 3 is outside 10..3600" in str(caught.value)


def steps(inventory: Inventory, name: str, control: dict | None = None) -> list:
    return firewall.tier(control or {}).steps(inventory, Renderer(inventory),
                                                inventory.host(name))


def test_steps_load_the_rules_then_confirm_over_a_new_connection(load, base) -> None:
    inventory = load(base)
    plan = steps(inventory, "db1", {"db1": "10.9.9.9"})
    labels = [step.label for step in plan]
    assert labels == [
        "install nftables", f"file {firewall.SCRIPT}", f"file {firewall.UNIT}",
        "reload systemd units", f"file {firewall.RULES}",
        "load the rules (rolled back unless confirmed)",
        f"health {firewall.CONFIRM_FIREWALL}", "load the confirmed rules at boot",
        "remove the sshd hardening drop-in"]
    load_step = plan[5]
    assert isinstance(load_step, RunCommand)
    assert load_step.command == "/usr/local/sbin/difyops-net firewall-apply"
    assert load_step.unless == "/usr/local/sbin/difyops-net firewall-in-force"
    gate = plan[6].gate
    assert isinstance(gate, firewall.NewConnectionGate)
    assert gate.command == "/usr/local/sbin/difyops-net firewall-confirm"
    assert gate.timeout == 30 and gate.timeout < inventory.settings["net"]["rollback_seconds"]
    script = next(s for s in plan if isinstance(s, WriteFile) and s.path == firewall.SCRIPT)
    assert script.mode == 0o755 and "ROLLBACK=60\n" in script.content


def test_ssh_hardening_steps_when_asked(load, base) -> None:
    base["net"].update(ssh_hardening=True, rollback_seconds=20)
    plan = steps(load(base), "db1")
    dropin = next(s for s in plan if isinstance(s, WriteFile) and s.path == firewall.SSHD_STAGED)
    settings = dict(line.split(None, 1) for line in dropin.content.splitlines()
                    if line and not line.startswith("#"))
    assert settings == {"PubkeyAuthentication": "yes", "PasswordAuthentication": "no",
                        "KbdInteractiveAuthentication": "no", "PermitEmptyPasswords": "no",
                        "PermitRootLogin": "prohibit-password"}
    install = next(s for s in plan if isinstance(s, RunCommand) and "sshd" in s.name)
    assert install.command.endswith("sshd-apply")
    gate = [s.gate for s in plan if isinstance(s, WaitFor)][-1]
    assert gate.command.endswith("sshd-confirm") and gate.timeout == 10


def test_the_guard_script_is_valid_sh_and_checks_before_loading(load, base,
                                                                 tmp_path) -> None:
    inventory = load(base)
    text = Renderer(inventory).render("config/nftables/difyops-net.sh.j2",
                                      inventory.host("db1"), rollback=45)
    script = tmp_path / "difyops-net"
    script.write_text(text)
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0
    apply = text.split("firewall_apply() {", 1)[1].split("\n}\n", 1)[0]
    # Checked, previous rules saved and the timer armed before anything is loaded.
    order = [apply.index(s) for s in ('nft -c -f "$RULES"', "firewall.previous", "arm firewall",
                                      'nft -f "$RULES"')]
    assert order == sorted(order)
    sshd = text.split("sshd_apply() {", 1)[1].split("\n}\n", 1)[0]
    assert sshd.index("sshd -t") < sshd.index("arm sshd") < sshd.index("reload_sshd")
    assert "--on-active=\"$ROLLBACK\"" in text and "ROLLBACK=45" in text


class Connections:
    """A machine factory: hands out fake machines, some unreachable."""

    def __init__(self, answers=None, unreachable: int = 0) -> None:
        self.opened: list[FakeMachine] = []
        self.answers = answers
        self.unreachable = unreachable

    def __call__(self, host: Host, timeouts=None) -> FakeMachine:
        machine = FakeMachine(host, self.answers, unreachable=len(self.opened) < self.unreachable)
        self.opened.append(machine)
        return machine


def test_confirmation_needs_a_new_connection(use_machines) -> None:
    host = Host(name="db1", address="10.0.3.11")
    connections = Connections(unreachable=2)
    use_machines(connections)
    gate = firewall.NewConnectionGate("confirm", timeout=10, interval=1, command="confirm-it")
    clock = iter(range(100))
    answer = wait(gate, FakeMachine(host), clock=lambda: next(clock), pause=lambda s: None)
    assert len(connections.opened) == 3  # two attempts could not connect, the third confirmed
    assert connections.opened[-1].commands == ["confirm-it"]
    assert answer == "exit 0"


def test_a_confirmation_refused_by_the_host_is_final(use_machines) -> None:
    host = Host(name="db1", address="10.0.3.11")
    connections = Connections(answers=lambda command: 1)
    use_machines(connections)
    gate = firewall.NewConnectionGate("confirm", timeout=10, command="confirm-it")
    with pytest.raises(HostError, match=firewall.REFUSED):
        wait(gate, FakeMachine(host), pause=lambda s: None)
    assert len(connections.opened) == 1


def test_status_compares_the_rules_in_force_with_the_plan(load, base) -> None:
    base["net"] = {"firewall": "off", "management": []}
    inventory = load(base)
    host = inventory.host("db1")
    planned = rules_of(inventory, "db1", control=None)
    listing = "table inet difyops {\n\tchain input {\n\t\ttype filter hook input priority " \
              "filter; policy drop;\n\t\ttcp dport 22 accept\n\t}\n}\n"

    class Host1(FakeMachine):
        live = listing

        def _execute(self, command: str, timeout: float):
            from tasks.core.hosts import Result
            if command.startswith("nft -s list table"):
                return Result(0, self.live, "")
            return super()._execute(command, timeout)

    machine = Host1(host, answers=lambda command: 1)  # no change pending
    machine.files[f"{firewall.STATE}/firewall.nft"] = (planned.encode(), 0o644, "root", "root")
    machine.files[f"{firewall.STATE}/firewall.list"] = (listing.encode(), 0o644, "root", "root")
    state = firewall.read_state(inventory, machine)
    assert state.as_planned and state.firewall == "as planned (1 rules)"
    assert state.rules == ["input: tcp dport 22 accept"]

    machine.live = listing.replace("tcp dport 22 accept", "tcp dport 22 accept\n\t\ttcp dport "
                                                          "8080 accept")
    state = firewall.read_state(inventory, machine)
    assert not state.as_planned and "changed by hand" in state.firewall
    assert "+\t\ttcp dport 8080 accept" in state.diff

    base["net"] = {"management": ["10.0.4.0/24"]}
    state = firewall.read_state(load(base), machine)
    assert "differ from the plan" in state.firewall
    assert '+\t\tip saddr 10.0.4.0/24 tcp dport 22 accept comment "ssh from the management' \
           in state.diff


def test_services_list_the_plans_ports(load, base) -> None:
    inventory = load(base)
    ports = {s.name: s.port for s in netplan.services(inventory)}
    assert {ports[n] for n in ("http", "https", "web", "api", "postgresql", "redis",
                               "weaviate")} == {80, 443, 3000, 5001, 5432, 6379, 8080}
    assert ports["redis sentinel"] == 26379 and ports["weaviate grpc"] == 50051
    api1 = inventory.host("api1")
    assert {(peer.name, s.port) for peer, s in netplan.needed_peers(inventory, api1)} >= {
        ("db1", 5432), ("db2", 5432), ("db1", 6379), ("db1", 26379), ("vector1", 8080),
        ("vector1", 50051)}
    assert ("lb1", 80) not in {(p.name, s.port) for p, s in netplan.needed_peers(inventory,
                                                                                 api1)}


ALL_IN_ONE = ["db_primary", "cache", "vector", "api", "worker", "beat", "web", "plugin_daemon",
              "lb"]


def first_hosts(base: dict, count: int) -> dict:
    """The base inventory cut to its first hosts, the first one running everything."""
    if count < len(base["hosts"]):
        base["hosts"] = base["hosts"][:count]
        base["hosts"][0]["roles"] = ALL_IN_ONE
        base["cache"] = {"mode": "standalone"}
    return base


@pytest.mark.parametrize(("net", "hosts", "key", "message"), [
    ({}, 10, "net.management", "empty while the host firewall is on (net.firewall: auto and more "
                               "than one host)"),
    ({"firewall": "on"}, 1, "net.management", "empty while the host firewall is on "
                                              "(net.firewall: on)"),
    ({"firewall": "maybe"}, 10, "net.firewall", "'maybe' is not one of 'auto', 'on', 'off'"),
    ({"firewall": False}, 10, "net.firewall", "must be a string, not a boolean (False)"),
])
def test_a_firewall_without_a_management_range_is_refused(load, base, net, hosts, key,
                                                          message) -> None:
    base["net"] = {"management": [], **net}
    with pytest.raises(InputError) as refused:
        load(first_hosts(base, hosts))
    (problem,) = refused.value.problems
    assert (problem.key, problem.message[:len(message)]) == (key, message)
    if net.get("firewall") is False:
        assert 'write the word in quotes, as in `firewall: "off"`' in problem.fix
    elif key == "net.management":
        assert 'e.g. `management: [10.0.4.0/24]`; or set `firewall: "off"`' in problem.fix


@pytest.mark.parametrize(("net", "hosts", "on"), [
    ({}, 1, False), ({"management": ["10.0.4.0/24"]}, 2, True),
    ({"firewall": "off"}, 10, False), ({"firewall": "on", "management": ["10.0.4.7"]}, 1, True)])
def test_the_firewall_is_on_for_more_than_one_host_unless_set(load, base, net, hosts,
                                                              on) -> None:
    base["net"] = net
    assert netplan.firewall_on(load(first_hosts(base, hosts))) is on


def test_net_apply_holds_the_deploy_lock_unless_dry(monkeypatch, load, base) -> None:
    events: list[str] = []

    @contextlib.contextmanager
    def lock(name: str):
        events.append(f"lock {name}")
        yield {}
        events.append("unlock")

    monkeypatch.setattr(net_tasks, "load", lambda ctx: load(base))
    monkeypatch.setattr(net_tasks, "deploy_lock", lock)
    monkeypatch.setattr(net_tasks, "apply_firewall",
                        lambda inventory, **kw: events.append(f"firewall dry={kw['dry']}"))
    net_tasks.apply.body(Context())
    net_tasks.apply.body(Context(), dry=True)
    assert events == ["lock unit", "firewall dry=False", "unlock", "firewall dry=True"]
