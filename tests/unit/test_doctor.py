"""deploy.doctor's decisions: restart once, the limit across runs, dry, unreachable hosts, the
deploy lock, the webhook message; and which component each tier's gates say how to restart."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from invoke import Context
from invoke.exceptions import Exit

from tasks import deploy
from tasks.core import doctor
from tasks.core.gates import CommandGate
from tasks.core.hosts import using
from tasks.core.inventory import Host
from tasks.core.lock import holder
from tasks.core.plan import HostPlan, Restart, TierPlan, WaitFor
from tasks.core.tiers import build
from tasks.tiers import TIERS
from tests.unit.conftest import UseMachines
from tests.unit.fakes import FakeMachine

REDIS = Restart("redis-server", "systemctl restart redis-server")


class World:
    """Services up or down per host; `restart X` brings X up unless it is broken."""

    def __init__(self, down: dict[str, set[str]], broken: set[str] = frozenset(),
                 unreachable: set[str] = frozenset()) -> None:
        self.down, self.broken, self.unreachable = down, broken, unreachable
        self.machines: dict[str, FakeMachine] = {}

    def connect(self, host: Host, timeouts=None) -> FakeMachine:
        def answer(command: str) -> int:
            service = command.split()[-1]
            if command.startswith("systemctl restart "):
                if service in self.broken:
                    return 1
                self.down.get(host.name, set()).discard(service)
                return 0
            if command.startswith("probe "):
                return 1 if service in self.down.get(host.name, set()) else 0
            return 0

        machine = FakeMachine(host, answer, unreachable=host.name in self.unreachable)
        self.machines.setdefault(host.name, machine)
        machine.commands = self.machines[host.name].commands  # one log per host across phases
        return machine

    def commands(self, host: str) -> list[str]:
        return [c for c in self.machines[host].commands if c != "exit 0"]


def gate(name: str, service: str, restart: Restart | None = REDIS) -> WaitFor:
    return WaitFor(CommandGate(name, timeout=0.2, interval=0.05, command=f"probe {service}"),
                   restart=restart)


def plans(*hosts: str, steps: list[WaitFor] | None = None) -> list[TierPlan]:
    steps = steps or [gate("redis on :6379", "redis-server")]
    return [TierPlan("cache", [HostPlan(Host(name=h, address=f"10.9.0.{i}"), list(steps))
                               for i, h in enumerate(hosts, 1)])]


@pytest.fixture
def world(use_machines: UseMachines) -> World:
    made = World({})
    use_machines(made.connect)
    return made


def restart_log(tmp_path: Path, limit: int = 2, clock=lambda: 1000.0) -> doctor.RestartLog:
    return doctor.RestartLog(tmp_path / "doctor" / "unit.json", limit, 3600, clock)


def quiet(host: str, message: str) -> None:
    pass


def test_a_down_service_is_restarted_once_and_healthy_again(world, tmp_path) -> None:
    world.down = {"c1": {"redis-server"}}
    both = [gate("redis on :6379", "redis-server"), gate("redis answers PING", "redis-server")]
    log = restart_log(tmp_path)
    found = doctor.run(plans("c1", "c2", steps=both), log, say=quiet)
    assert [(f.host, f.component, f.state, f.restart) for f in found] == [
        ("c1", "redis on :6379", doctor.RESTARTED, "redis-server"),
        ("c1", "redis answers PING", doctor.RESTARTED, "redis-server"),
        ("c2", "redis on :6379", doctor.HEALTHY, ""),
        ("c2", "redis answers PING", doctor.HEALTHY, "")]
    restarts = [c for c in world.commands("c1") if c.startswith("systemctl")]
    assert restarts == ["systemctl restart redis-server"]  # two gates, one restart
    assert not any(c.startswith("systemctl") for c in world.commands("c2"))
    saved = json.loads((tmp_path / "doctor" / "unit.json").read_text())
    assert saved == {"c1/redis-server": [1000.0]}
    assert oct((tmp_path / "doctor" / "unit.json").stat().st_mode & 0o777) == "0o600"


def test_beyond_the_limit_it_reports_and_does_not_restart(world, tmp_path) -> None:
    world.down = {"c1": {"redis-server"}}
    world.broken = {"redis-server"}  # every restart fails
    lines: list[str] = []
    now = [1000.0]
    for _ in range(3):
        found = doctor.run(plans("c1"), restart_log(tmp_path, 2, lambda: now[0]),
                           say=lambda host, text: lines.append(f"{host}: {text}"))
        now[0] += 60
    restarts = [c for c in world.commands("c1") if c.startswith("systemctl")]
    assert len(restarts) == 2  # the third run is refused by the history kept in the file
    assert found[0].state == doctor.NEEDS_PERSON
    assert "restarted 2 time(s) within 3600 s" in found[0].reason
    assert any("needs a person: restarting redis-server failed" in line for line in lines)
    # Once the window has passed, doctor may try again.
    now[0] += 3600
    doctor.run(plans("c1"), restart_log(tmp_path, 2, lambda: now[0]), say=quiet)
    assert len([c for c in world.commands("c1") if c.startswith("systemctl")]) == 3


def test_zero_restarts_means_report_only(world, tmp_path) -> None:
    world.down = {"c1": {"redis-server"}}
    found = doctor.run(plans("c1"), restart_log(tmp_path, 0), say=quiet)
    assert found[0].state == doctor.NEEDS_PERSON
    assert world.commands("c1") == ["probe redis-server"]


def test_dry_restarts_nothing_and_records_nothing(world, tmp_path) -> None:
    world.down = {"c1": {"redis-server"}}
    lines: list[str] = []
    found = doctor.run(plans("c1"), restart_log(tmp_path), dry=True,
                       say=lambda host, text: lines.append(text))
    assert found[0].state == doctor.WOULD_RESTART and found[0].unhealthy
    assert world.commands("c1") == ["probe redis-server"]
    assert not (tmp_path / "doctor" / "unit.json").exists()
    assert lines == ["redis on :6379 UNHEALTHY (probe redis-server failed); "
                     "would restart redis-server"]


def test_an_unreachable_host_is_reported_not_acted_on(world, tmp_path) -> None:
    world.down = {"c1": {"redis-server"}, "c2": {"redis-server"}}
    world.unreachable = {"c1"}
    found = doctor.run(plans("c1", "c2"), restart_log(tmp_path), say=quiet)
    by_host = {f.host: f for f in found}
    assert by_host["c1"].component == "(host)" and by_host["c1"].state == doctor.NEEDS_PERSON
    assert "cannot connect" in by_host["c1"].answer
    assert world.machines["c1"].commands == []
    assert by_host["c2"].state == doctor.RESTARTED  # the other host is still looked after
    assert json.loads((tmp_path / "doctor" / "unit.json").read_text()) == {
        "c2/redis-server": [1000.0]}


def test_a_gate_without_restart_waits_for_restarts_elsewhere_else_needs_a_person(
        world, tmp_path) -> None:
    # The replica streams again once the primary is back: it was never restarted itself.
    world.down = {"c1": {"redis-server"}, "c2": {"link"}}
    steps = [gate("redis on :6379", "redis-server"), gate("replication link up", "link", None)]

    visits: list[str] = []

    def heal_link(host: Host, timeouts=None) -> FakeMachine:
        visits.append(host.name)
        if visits.count("c2") == 2:  # doctor's second look, after its restarts
            world.down["c2"].discard("link")
        return world.connect(host, timeouts)

    with using(heal_link):
        found = doctor.run(plans("c1", "c2", steps=steps), restart_log(tmp_path), say=quiet)
    states = {(f.host, f.component): f.state for f in found}
    assert states[("c2", "replication link up")] == doctor.RECOVERED
    assert not any(c.startswith("systemctl") for c in world.commands("c2"))
    # Nothing restarted anywhere: the same gate is reported at once, without waiting.
    world.down = {"c2": {"link"}}
    found = doctor.run(plans("c2", steps=steps), restart_log(tmp_path), say=quiet)
    link = next(f for f in found if f.component == "replication link up")
    assert link.state == doctor.NEEDS_PERSON and "no restart" in link.reason


def test_message_names_what_was_done_and_what_needs_a_person() -> None:
    found = [doctor.Finding("c1", "cache", "redis on :6379", doctor.RESTARTED, "ok",
                            "redis-server"),
             doctor.Finding("c2", "cache", "sentinel on :26379", doctor.NEEDS_PERSON, "exit 1",
                            "redis-sentinel", "restarting redis-sentinel failed: masked"),
             doctor.Finding("c3", "cache", "redis on :6379", doctor.HEALTHY)]
    slack = doctor.message("prod", found, fmt="slack")
    assert list(slack) == ["text"]
    assert "restarted redis-server on c1" in slack["text"]
    assert "NEEDS A PERSON: sentinel on :26379 on c2: restarting redis-sentinel failed" \
        in slack["text"] and "c3" not in slack["text"]
    am = doctor.message("prod", found, fmt="alertmanager")
    assert am["status"] == "firing" and am["version"] == "4"
    assert [(a["status"], a["labels"]["host"], a["labels"]["component"]) for a in am["alerts"]] \
        == [("resolved", "c1", "redis on :6379"), ("firing", "c2", "sentinel on :26379")]
    assert [f["host"] for f in am["difyops"]["needs_person"]] == ["c2"]
    json.dumps(am)  # serialisable as it is posted


def test_gates_say_how_to_restart_their_component(load, base) -> None:
    base["cache"] = {"mode": "sentinel"}
    inventory = load(base)
    waits = [(plan.host.name, step) for tier in build(TIERS, inventory) for plan in tier.hosts
             for step in plan.steps if isinstance(step, WaitFor)]
    restarts = {(host, step.gate.name): step.restart.what if step.restart else None
                for host, step in waits}
    # Only restarts: a service restarted in place or a container; never a promotion or a move.
    commands = {step.restart.command for _, step in waits if step.restart}
    assert all(c.startswith(("systemctl reset-failed ", "docker compose ")) for c in commands)
    assert not any("promote" in c or "pg_ctl" in c or "failover" in c for c in commands)
    assert restarts[("db1", "postgresql on :5432")] == "postgresql@15-main"
    assert restarts[("db2", "postgresql on :5432")] == "postgresql@15-main"
    assert restarts[("db1", "primary accepts writes")] is None  # never a promotion
    assert restarts[("db2", "streaming from db1")] is None
    assert restarts[("db2", "redis on :6379")] == "redis-server"
    assert restarts[("db2", "sentinel on :26379")] == "redis-sentinel"
    assert restarts[("db2", "replication link up")] is None
    assert restarts[("db2", "sentinels agree on dify-master")] is None
    assert restarts[("vector1", "weaviate ready")] == "dify-vector/weaviate"
    assert restarts[("api1", "api /health")] == "dify/api"
    assert restarts[("api1", "plugin_daemon /health/check")] == "dify/plugin_daemon"
    assert restarts[("web1", "web /")] == "dify/web"
    assert restarts[("api2", "PostgreSQL reachable at 10.0.3.11:5432")] is None
    assert restarts[("lb1", "nginx /health")] == "nginx"
    assert restarts[("monitor1", "prometheus ready")] == "prometheus"
    assert restarts[("monitor1", "alertmanager ready")] == "prometheus-alertmanager"
    assert restarts[("monitor1", "grafana /api/health")] == "dify-monitor/grafana"
    assert restarts[("db1", "prometheus-redis-exporter on 10.0.3.11:9121")] == \
        "prometheus-redis-exporter"


def test_restart_commands() -> None:
    from tasks.core.system import restart_unit
    from tasks.tiers.common import restart_compose

    assert restart_unit("redis-server").command == (
        "systemctl reset-failed redis-server 2>/dev/null; systemctl restart redis-server")
    compose = "docker compose --project-directory /opt/dify -p dify"
    assert restart_compose("/opt/dify", "dify", "api").command == (
        f"{compose} restart api && {compose} up -d --no-recreate api")


class TaskWorld:
    """deploy.doctor through the task itself: a small plan, the lock in tmp_path, posts kept."""

    def __init__(self, monkeypatch, tmp_path: Path, write_inventory, world: World) -> None:
        data = {"name": "unit", "cache": {"mode": "standalone"}, "vector": {"store": "pgvector"},
                "monitor": {"alert_webhook": "http://127.0.0.1:9/hook"},
                "doctor": {"max_restarts": 1},
                "hosts": [{"name": "c1", "address": "10.9.0.1",
                           "roles": ["cache", "db_primary", "dev_backend"]}]}
        monkeypatch.setenv("DIFY_INVENTORY", str(write_inventory(data)))
        monkeypatch.setattr(doctor, "STATE_DIR", tmp_path)
        monkeypatch.setattr(deploy, "build", lambda tiers, inventory: plans("c1"))
        self.posts: list[tuple[str, dict]] = []
        monkeypatch.setattr(doctor, "post", lambda url, payload: self.posts.append(
            (url, payload)) or "")
        self.world = world
        self.exit_message = ""

    def run(self, **flags) -> int:
        try:
            deploy.doctor(Context(), **flags)
        except Exit as exc:
            self.exit_message = str(exc.message)
            return exc.code
        return 0


@pytest.fixture
def task(monkeypatch, tmp_path, write_inventory, world) -> TaskWorld:
    return TaskWorld(monkeypatch, tmp_path, write_inventory, world)


def test_task_exits_zero_and_posts_nothing_when_all_is_healthy(task, capsys) -> None:
    assert task.run() == 0
    assert task.posts == []
    assert "all 1 component(s) healthy" in capsys.readouterr().out


def test_task_posts_and_exits_by_what_is_left(task, tmp_path) -> None:
    task.world.down = {"c1": {"redis-server"}}
    assert task.run() == 0  # restarted and healthy again: reported, not a failure
    assert [p["difyops"]["did"][0]["host"] for _, p in task.posts] == ["c1"]
    task.world.down = {"c1": {"redis-server"}}
    assert task.run() == 1  # max_restarts 1: a person now
    assert task.posts[-1][1]["difyops"]["needs_person"][0]["component"] == "redis on :6379"
    assert "1 component(s) need a person: redis on :6379 on c1" in task.exit_message
    audit = (tmp_path / "audit" / "unit.log").read_text().splitlines()
    assert len(audit) == 2 and "c1 redis on :6379: restarted (redis-server)" in audit[0]


def test_task_dry_shows_and_posts_nothing(task, capsys) -> None:
    task.world.down = {"c1": {"redis-server"}}
    assert task.run(dry=True) == 1
    assert task.posts == [] and task.world.commands("c1") == ["probe redis-server"]
    assert "would restart redis-server" in capsys.readouterr().out


@pytest.mark.parametrize("dry", [False, True])
def test_task_touches_nothing_while_a_deploy_holds_the_lock(task, tmp_path, dry) -> None:
    task.world.down = {"c1": {"redis-server"}}
    (tmp_path / "locks").mkdir(exist_ok=True)  # a deploy.all in another process holds it
    (tmp_path / "locks" / "unit.lock").write_text(json.dumps({**holder(), "pid": os.getppid()}))
    assert task.run(dry=dry) == doctor.LOCKED_EXIT
    assert task.world.machines == {} and task.posts == []
    assert "nothing was checked or restarted" in task.exit_message


def systemd_unit(text: str):
    import configparser

    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def test_schedule_timer_and_service(load, base) -> None:
    from tasks.core import doctor_schedule

    base["doctor"] = {"every": 10}
    inventory = load(base)
    files = {s.path: s.content for s in doctor_schedule.steps(inventory, use_cron=False,
                                                               only="db,cache")
             if hasattr(s, "content")}
    timer = systemd_unit(files["/etc/systemd/system/difyops-doctor-unit.timer"])
    assert dict(timer["Timer"]) == {"OnActiveSec": "10min", "OnUnitInactiveSec": "10min",
                                    "Unit": "difyops-doctor-unit.service"}
    service = systemd_unit(files["/etc/systemd/system/difyops-doctor-unit.service"])["Service"]
    assert service["Type"] == "oneshot" and service["SuccessExitStatus"] == "75"
    assert service["ExecStart"].endswith(" -m invoke deploy.doctor --only db,cache")
    assert f'"DIFY_INVENTORY={inventory.file}"' in files[
        "/etc/systemd/system/difyops-doctor-unit.service"]


def test_schedule_cron_line(load, base) -> None:
    from tasks.core import doctor_schedule

    inventory = load(base)
    plan = doctor_schedule.steps(inventory, use_cron=True)
    (line,) = [line for line in plan[0].content.splitlines() if line.startswith("*/")]
    assert line.startswith("*/5 * * * * root cd ")
    assert f"DIFY_INVENTORY={inventory.file}" in line
    assert line.endswith("-m invoke deploy.doctor >>/var/log/difyops-doctor-unit.log 2>&1")
    assert plan[0].path == "/etc/cron.d/difyops-doctor-unit"


def test_schedule_refuses_a_bad_interval_and_a_machine_without_scheduler(
        load, base, use_machines) -> None:
    from tasks.core import doctor_schedule
    from tasks.core.errors import DifyopsError, InputError
    from tasks.core.schedule import CONTROL

    base["doctor"] = {"every": 90}
    with pytest.raises(InputError, match=r"doctor\.every"):
        doctor_schedule.install(load(base))
    base["doctor"] = {"every": 5}
    inventory = load(base)
    machine = FakeMachine(CONTROL, lambda command: 1)  # no systemd, no cron
    use_machines(lambda host, timeouts=None: machine)
    with pytest.raises(DifyopsError, match="neither systemd nor cron") as caught:
        doctor_schedule.install(inventory)
    assert "-m invoke deploy.doctor" in str(caught.value)
    assert machine.files == {}


def test_task_fails_when_the_webhook_does_not_take_the_message(task, monkeypatch) -> None:
    monkeypatch.setattr(doctor, "post", lambda url, payload: "HTTP 500")
    task.world.down = {"c1": {"redis-server"}}
    assert task.run() == 1  # everything healed, but nobody was told
    assert "could not POST to monitor.alert_webhook (HTTP 500)" in task.exit_message
    assert "http://127.0.0.1:9/hook" not in task.exit_message  # the URL may be a credential
