"""The app tier without hosts: rendered compose facts, step order, release rules, the rolling
replacement, image shipping decisions and the hooks other tiers plug into."""

from __future__ import annotations

import copy
import io
import re
import shlex
from typing import Any

import pytest
import yaml

from tasks.core import rollout
from tasks.core.errors import DifyopsError, InputError
from tasks.core.gates import CommandGate, HttpGate
from tasks.core.hosts import LocalMachine, Result
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import HostPlan, RunCommand, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.report import Report
from tasks.tiers import app as tier
from tasks.tiers import app_release
from tasks.tiers import images as images_tier
from tests.unit.fakes import FakeMachine


def plan_of(inventory: Inventory, name: str, **kwargs: Any) -> list:
    return tier.steps(inventory, Renderer(inventory), inventory.host(name), **kwargs)


def file_of(inventory: Inventory, name: str, path: str) -> str:
    return next(s.content for s in plan_of(inventory, name)
                if isinstance(s, WriteFile) and s.path == path)


def compose_of(inventory: Inventory, name: str) -> dict:
    return yaml.safe_load(file_of(inventory, name, "/opt/dify/compose.yml"))


def labels(plan: list) -> list[str]:
    return [step.label for step in plan]


# --- rendered facts ------------------------------------------------------------------------


def test_resource_limits_come_from_the_inventory(load, base) -> None:
    base["app"] = {"api": {"cpus": "2", "memory": "4g"}, "sandbox": {"memory": "512m"}}
    services = compose_of(load(base), "api1")["services"]
    assert services["api"]["deploy"]["resources"]["limits"] == {"cpus": "2", "memory": "4g"}
    assert services["sandbox"]["deploy"]["resources"]["limits"] == {"memory": "512m"}
    assert "deploy" not in services["plugin_daemon"]


def test_the_plugin_daemon_gets_only_what_it_reads(load, base) -> None:
    inventory = load(base)
    daemon = compose_of(inventory, "api1")["services"]["plugin_daemon"]
    # Every plugin it runs inherits its environment: only its own file, never Dify's .env.
    assert daemon["env_file"] == ["plugin_daemon.env"]
    environment = daemon["environment"]
    assert set(environment) == {
        "DB_HOST", "DB_PORT", "DB_USERNAME", "DB_DATABASE", "DB_MAX_OPEN_CONNS",
        "REDIS_HOST", "REDIS_PORT", "REDIS_USERNAME", "REDIS_DB",
        "SERVER_PORT", "SERVER_KEY", "DIFY_INNER_API_URL", "DIFY_INNER_API_KEY",
        "PLUGIN_WORKING_PATH", "PLUGIN_REMOTE_INSTALLING_ENABLED", "PIP_MIRROR_AUTO_DETECT",
        "LOG_LEVEL", "DB_SSL_MODE", "PGSSLROOTCERT"}
    # Without a host and port for it, remote installing (on by default) stops the daemon.
    assert environment["PLUGIN_REMOTE_INSTALLING_ENABLED"] == "false"
    # Plugins' dependencies from PyPI, not from whichever public mirror answered fastest.
    assert environment["PIP_MIRROR_AUTO_DETECT"] == "false"
    # Secrets only by reference to .env names that exist there; no value is written here.
    env = dict(line.split("=", 1) for line in file_of(inventory, "api1", "/opt/dify/.env")
               .splitlines() if line and not line.startswith("#"))
    references = {name: re.fullmatch(r"\$\{(\w+):\?\}", value)
                  for name, value in environment.items()}
    assert all(match.group(1) in env for match in references.values() if match)
    assert not set(environment.values()) & set(inventory.secrets.values())
    assert {"SERVER_KEY", "DIFY_INNER_API_KEY"} <= {
        name for name, match in references.items() if match}
    # Its own database role and Redis user, not Dify's (config/postgres/roles.sql.j2,
    # config/redis/users.acl.j2), whose passwords are in a 0600 file of its own: the api,
    # workers and beat, which read .env whole, never see them.
    assert (environment["DB_USERNAME"], environment["REDIS_USERNAME"]) == (
        "dify_plugin", "plugin_daemon")
    own = next(step for step in plan_of(inventory, "api1")
               if isinstance(step, WriteFile) and step.path == "/opt/dify/plugin_daemon.env")
    assert (own.mode, own.secret) == (0o600, True)
    assert [line for line in own.content.splitlines() if not line.startswith("#")] == [
        "DB_PASSWORD=" + inventory.secrets["DB_PLUGIN_PASSWORD"],
        "REDIS_PASSWORD=" + inventory.secrets["REDIS_PLUGIN_DAEMON_PASSWORD"]]
    assert not {inventory.secrets["DB_PLUGIN_PASSWORD"],
                inventory.secrets["REDIS_PLUGIN_DAEMON_PASSWORD"]} & set(env.values())
    assert env["REDIS_PASSWORD"] == inventory.secrets["REDIS_PASSWORD"]


def test_the_plugin_daemon_installs_from_the_index_the_inventory_names(load, base) -> None:
    mirror = "https://pypi.internal/simple/?token=$HOME#x"
    base["app"] = {"plugin_daemon": {"pip_mirror_url": mirror}}
    environment = compose_of(load(base), "api1")["services"]["plugin_daemon"]["environment"]
    # `$` doubled: compose hands the daemon the URL as written, not $HOME's value.
    assert environment["PIP_MIRROR_URL"] == mirror.replace("$", "$$")
    assert environment["PIP_MIRROR_AUTO_DETECT"] == "false"
    base["app"] = {"plugin_daemon": {"pip_mirror_url": "pypi.internal"}}
    with pytest.raises(InputError, match=r"app.plugin_daemon.pip_mirror_url: 'pypi.internal' "
                                         r"is not an http\(s\) URL"):
        load(base)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("cpus", "two", "app.api.cpus: 'two' is not a number of CPUs"),
    ("cpus", "0", "app.api.cpus: '0' is not a number of CPUs"),
    ("memory", "4 GB", "app.api.memory: '4 GB' is not an amount of memory")])
def test_bad_limits_are_refused_before_any_host(load, base, key, value, message) -> None:
    base["app"] = {"api": {key: value}}
    with pytest.raises(InputError, match=message):
        plan_of(load(base), "api1")


def test_healthchecks_where_an_endpoint_exists_restart_everywhere(load, base) -> None:
    inventory = load(base)
    services = {**compose_of(inventory, "api1")["services"],
                **compose_of(inventory, "worker1")["services"],
                **compose_of(inventory, "web1")["services"]}
    probes = {name: " ".join(s["healthcheck"]["test"]) for name, s in services.items()
              if "healthcheck" in s}
    # Dify 1.16.1: api_websocket on the api hosts, the agent services on the first api host.
    assert set(probes) == {"api", "api_websocket", "plugin_daemon", "sandbox", "web",
                           "agent_backend", "local_sandbox", "worker_default"}
    assert services["worker_default"]["healthcheck"]["test"] == ["CMD", "python", "-c",
                                                             tier.CELERY_PING]
    assert services["worker_default"]["healthcheck"]["interval"] == "30s"
    assert "http://127.0.0.1:5001/health" in probes["api"]
    assert "http://127.0.0.1:5001/health" in probes["api_websocket"]
    assert "http://127.0.0.1:5050/openapi.json" in probes["agent_backend"]
    assert "http://127.0.0.1:5004/healthz" in probes["local_sandbox"]
    assert "http://127.0.0.1:5002/health/check" in probes["plugin_daemon"]
    assert "http://127.0.0.1:8194/health" in probes["sandbox"]
    assert "http://127.0.0.1:3000/" in probes["web"]
    assert {s["restart"] for s in services.values()} == {"always"}
    assert all(s["logging"]["options"] == {"max-size": "50m", "max-file": "5",
                                           "labels": "com.docker.compose.service"}
               for s in services.values())
    assert services["api"]["depends_on"]["plugin_daemon"] == {"condition": "service_healthy"}


def test_each_worker_is_pinged_on_its_host_and_restarted_by_doctor(load, base) -> None:
    base["app"] = {"worker_groups": [{"name": "fast", "queues": "all", "concurrency": 2},
                                     {"name": "slow", "queues": ["dataset"], "concurrency": 1}]}
    base["hosts"][4]["worker_groups"] = ["slow"]
    base["hosts"][3].update(roles=["api", "worker"], worker_groups=["fast"])
    inventory = load(base)
    pings = [s for s in tier.gates(inventory, inventory.host("worker1"))
             if isinstance(s.gate, CommandGate)]
    assert [s.gate.name for s in pings] == ["worker_slow answers a Celery ping"]
    assert pings[0].gate.command == (
        "docker compose --project-directory /opt/dify -p dify exec -T worker_slow python -c "
        + shlex.quote(tier.CELERY_PING))
    assert pings[0].restart.what == "dify/worker_slow"
    assert "Celery(broker=env[\"CELERY_BROKER_URL\"])" in tier.CELERY_PING
    assert "$" not in tier.CELERY_PING  # compose would interpolate it in the healthcheck
    assert [s.gate.name for s in tier.gates(inventory, inventory.host("api2"))
            if isinstance(s.gate, CommandGate)] == ["worker_fast answers a Celery ping"]
    assert not [s for s in tier.gates(inventory, inventory.host("api1"))
                if "Celery" in s.gate.name]


def test_only_the_one_off_container_migrates(load, base) -> None:
    inventory = load(base)
    assert "MIGRATION_ENABLED=false" in file_of(inventory, "api1", "/opt/dify/.env")
    migration = yaml.safe_load(file_of(inventory, "api1", "/opt/dify/migration/compose.yml"))
    service = migration["services"]["migration"]
    assert service["environment"] == {"MODE": "migration", "MIGRATION_ENABLED": "true"}
    assert service["restart"] == "no"
    assert service["image"] == "langgenius/dify-api:1.16.1"
    paths = {s.path for s in plan_of(inventory, "api2") if isinstance(s, WriteFile)}
    assert not any("/migration/" in path for path in paths)


def test_a_release_without_migration_mode_runs_the_command_itself(load, base) -> None:
    base["dify"] = {"version": "1.5.1"}
    base["app"] = {"worker_groups": [{"name": "all", "queues": "all"}]}
    migration = yaml.safe_load(file_of(load(base), "api1", "/opt/dify/migration/compose.yml"))
    service = migration["services"]["migration"]
    assert service["entrypoint"] == ["flask", "upgrade-db"]
    assert "environment" not in service


def test_private_registry_names_every_image(load, base) -> None:
    base["dify"] = {"registry_mirror": "mirror.example/", "private_registry": "reg.lan:5000/"}
    inventory = load(base)
    assert compose_of(inventory, "api1")["services"]["api"]["image"] == \
        "reg.lan:5000/langgenius/dify-api:1.16.1"
    assert inventory.upstream_image("api") == "mirror.example/langgenius/dify-api:1.16.1"
    assert images_tier.upstream(inventory)["reg.lan:5000/langgenius/dify-web:1.16.1"] == \
        "mirror.example/langgenius/dify-web:1.16.1"
    assert compose_of(inventory, "api1")["services"]["agent_backend"]["image"] == \
        "reg.lan:5000/langgenius/dify-agent-backend:1.16.1"


# --- the start order -----------------------------------------------------------------------


def test_the_migration_host_migrates_before_it_starts_anything(load, base) -> None:
    plan = plan_of(load(base), "api1")
    names = labels(plan)
    assert names[0] == "release check"
    assert names.index("compose up plugin_daemon") < names.index(
        "migrate the database (one run)") < names.index("compose up dify")
    assert names.index("health PostgreSQL reachable at 10.0.3.11:5432") < names.index(
        "migrate the database (one run)")
    migrate = next(s for s in plan if s.label == "migrate the database (one run)")
    assert migrate.unless.endswith("run --rm -T --entrypoint flask migration db current "
                                   "2>/dev/null | grep -q '(head)'")
    assert migrate.command.startswith("out=$(docker compose --project-directory "
                                      "/opt/dify/migration -p dify-migration run --rm -T "
                                      "migration 2>&1) || {")
    assert migrate.command.count(migrate.unless) == 1  # verified after the run
    assert names[-6:] == ["health api /health", "health api /console/api/setup",
                          "health api_websocket /health", "health plugin_daemon /health/check",
                          "health agent_backend /openapi.json",
                          "health local_sandbox healthy (:5004/healthz)"]


def test_other_hosts_wait_for_the_migrated_api_and_the_plugin_daemon(load, base) -> None:
    inventory = load(base)
    names = labels(plan_of(inventory, "api2"))
    setup = "health api1 api /console/api/setup (database migrated)"
    daemon = "health plugin daemon on api1"  # labels of WaitFor steps start with "health"
    assert names.index(setup) < names.index(daemon) < names.index("compose up dify")
    gate = next(s.gate for s in plan_of(inventory, "api2") if s.label == daemon)
    assert isinstance(gate, HttpGate) and gate.url == "http://10.0.2.21:5002/health/check"
    web = labels(plan_of(inventory, "web1"))
    assert web.index(setup) < web.index("compose up dify")
    assert not any("reachable" in name for name in web)  # web talks to neither
    redis = next(s.gate for s in plan_of(inventory, "worker1")
                 if isinstance(s, WaitFor) and "Redis" in s.gate.name)
    assert isinstance(redis, CommandGate)
    assert redis.command == "timeout 3 bash -c '</dev/tcp/10.0.3.11/26379'"  # Sentinel


def test_the_release_check_names_the_way_to_change_releases(load, base) -> None:
    check = plan_of(load(base), "api2")[0]
    assert isinstance(check, RunCommand) and not check.changes
    assert check.command.startswith("test ! -f /opt/dify/release.json || { grep -qF "
                                    "'\"version\": \"1.16.1\"' /opt/dify/release.json && "
                                    "grep -qF '\"api\": \"langgenius/dify-api:1.16.1\"' ")
    assert "inv app.upgrade --version 1.16.1" in check.command
    assert "release check" not in labels(plan_of(load(base), "api2", release_guard=False))


def test_a_web_host_keeps_none_of_dify_s_secrets(load, base) -> None:
    inventory = load(base)
    web_env = file_of(inventory, "web1", "/opt/dify/.env")
    values = [v for v in inventory.secrets.values() if v]
    assert values and not [v for v in values if v in web_env]
    assert web_env.startswith("# Managed by difyops") and len(web_env.splitlines()) == 1
    # What makes that safe: nothing of web1's compose file reads the .env.
    text = file_of(inventory, "web1", "/opt/dify/compose.yml")
    assert "${" not in text and "env_file" not in text
    assert f"SECRET_KEY={inventory.secrets['SECRET_KEY']}" in file_of(inventory, "api1",
                                                                      "/opt/dify/.env")


def test_release_json_holds_the_version_and_images(load, base) -> None:
    record = yaml.safe_load(file_of(load(base), "web1", "/opt/dify/release.json"))
    assert record == {"version": "1.16.1", "images": {"web": "langgenius/dify-web:1.16.1"}}


# --- release rules -------------------------------------------------------------------------


def test_upgrades_go_forward_and_may_cross_releases() -> None:
    with pytest.raises(InputError, match=r"go back with inv app\.rollback"):
        app_release.check_step("1.14.2", "1.13.3")
    app_release.check_step("1.13.3", "1.16.1")  # the target's migration chain holds every revision


def upgraded(load, base, monkeypatch, use_machines, history: list[dict], answers=lambda c: 0):
    """app_release.upgrade to 1.16.1 with hosts replaced by fakes; returns (migration host's
    commands, history as last written, report text)."""
    base["dify"] = {"version": "1.13.3"}
    inventory = load(base)
    machine = FakeMachine(inventory.host("api1"), answers=answers)
    written: list[list[dict]] = []
    monkeypatch.setattr(app_release, "read_history", lambda inv: copy.deepcopy(history))
    monkeypatch.setattr(app_release, "write_history",
                        lambda inv, h: written.append(copy.deepcopy(h)) or [])
    monkeypatch.setattr(app_release, "ensure_images", lambda *a: None)
    use_machines(lambda host, timeouts=None: machine)
    monkeypatch.setattr(app_release, "migrate", lambda target, report: app_release.Migration(
        "aaa", "bbb", "bbb", ran=True))
    monkeypatch.setattr(app_release, "replace", lambda *a: rollout.Outcome(replaced=["api1"]))
    out = io.StringIO()
    app_release.upgrade(inventory, "1.16.1", Report(out=out), app_release.Hooks(backup=None))
    return machine.commands, written[-1], out.getvalue()


def test_an_upgrade_across_releases_runs_each_release_step_once(load, base, monkeypatch,
                                                                  use_machines) -> None:
    start = [{"version": "1.13.3", "images": {}, "alembic": "aaa", "action": "deployed",
              "backup": "", "at": "t0"}]
    commands, history, text = upgraded(load, base, monkeypatch, use_machines, start)
    step = ("docker compose --project-directory /opt/dify/migration -p dify-migration run --rm "
            "-T --entrypoint flask migration backfill-plugin-auto-upgrade")
    assert commands == [step]
    assert history[-1]["steps"] == ["1.15.0:backfill-plugin-auto-upgrade"]
    assert history[-1]["complete"] and history[-1]["version"] == "1.16.1"
    assert "release step of Dify 1.15.0: flask backfill-plugin-auto-upgrade" in text
    # A resumed upgrade (stopped after the step) does not run it again.
    resumed = [*start, {**history[-1], "complete": False}]
    commands, history, _ = upgraded(load, base, monkeypatch, use_machines, resumed)
    assert commands == [] and history[-1]["steps"] == ["1.15.0:backfill-plugin-auto-upgrade"]


def test_a_failed_release_step_stops_before_any_host_is_replaced(load, base, monkeypatch,
                                                                   use_machines) -> None:
    start = [{"version": "1.14.2", "images": {}, "alembic": "aaa", "action": "deployed",
              "backup": "", "at": "t0"}]
    with pytest.raises(app_release.ReleaseError, match=r"release step backfill-plugin-auto-upgrade "
                                                   r"of Dify 1\.15\.0 failed.*no host was "
                                                   r"replaced yet"):
        upgraded(load, base, monkeypatch, use_machines, start, answers=lambda c: 1)


def test_a_target_version_must_satisfy_the_rules(load, base) -> None:
    base["dify"] = {"version": "1.5.1"}
    base["app"] = {"worker_groups": [{"name": "few", "queues": ["dataset", "mail", "ops_trace",
                                                                 "app_deletion"]}]}
    with pytest.raises(InputError, match="no worker consumes the queue"):
        app_release.with_release(load(base), "1.13.3")


def test_rollback_across_a_migration_names_the_backup(load, base, monkeypatch) -> None:
    history = [{"version": "1.5.1", "images": {}, "alembic": "aaa", "action": "deployed",
                "backup": "", "at": "t0"},
               {"version": "1.13.3", "images": {}, "alembic": "bbb", "action": "upgrade",
                "backup": "db1-20250101T0000", "at": "t1"}]
    monkeypatch.setattr(app_release, "read_history", lambda inventory: history)
    monkeypatch.setattr(app_release, "database_revision", lambda inventory: "bbb")
    monkeypatch.setattr(app_release, "replace", lambda *a: pytest.fail("must not replace"))
    with pytest.raises(app_release.ReleaseError) as caught:
        app_release.rollback(load(base), Report(out=io.StringIO()), app_release.Hooks())
    message = str(caught.value)
    assert "needs the database at alembic revision aaa, but it is at bbb" in message
    assert "restore backup db1-20250101T0000" in message
    history[-1]["backup"] = ""
    with pytest.raises(app_release.ReleaseError, match="a backup taken before t1"):
        app_release.rollback(load(base), Report(out=io.StringIO()), app_release.Hooks())


def test_upgrade_drains_through_the_lb_tier_only_hosts_that_share_an_upstream(
        load, base, monkeypatch) -> None:
    from tasks.tiers import lb_ops

    calls = []
    monkeypatch.setattr(lb_ops, "drain", lambda inv, name: calls.append(("drain", name)))
    monkeypatch.setattr(lb_ops, "undrain", lambda inv, name: calls.append(("undrain", name)))
    inventory = load(base)
    bound = app_release.Hooks.for_inventory(inventory)
    assert bound.drainable(inventory.host("api1"))  # two api hosts: api1 can leave
    assert not bound.drainable(inventory.host("web1"))  # the only web host stays
    bound.drain("api1")
    bound.undrain("api1")
    assert calls == [("drain", "api1"), ("undrain", "api1")]
    assert bound.load_balanced and bound.backup is not None


# --- rolling replacement -------------------------------------------------------------------


def rolling_plans(*names: str, content: str = "v2\n") -> list[HostPlan]:
    return [HostPlan(Host(name=name, address=f"10.9.0.{i}"), [
        WriteFile("/opt/dify/compose.yml", content),
        RunCommand("compose up dify", "docker compose up -d --wait",
                   on_change=("/opt/dify/compose.yml",)),
    ]) for i, name in enumerate(names, start=1)]


def rolled(use_machines, machines: dict[str, FakeMachine], plans: list[HostPlan], **kwargs):
    use_machines(lambda host, timeouts=None: machines[host.name])
    events: list[str] = []
    for machine in machines.values():
        original = machine._execute

        def spy(command, timeout, original=original, name=machine.host.name):
            if command.startswith("docker compose"):
                events.append(f"up {name}")
            return original(command, timeout)

        machine._execute = spy
    outcome = rollout.roll("app", plans, report=Report(out=io.StringIO()),
                           drain=lambda name: events.append(f"drain {name}"),
                           undrain=lambda name: events.append(f"undrain {name}"), **kwargs)
    return outcome, events


def test_hosts_are_replaced_one_at_a_time_behind_the_load_balancer(use_machines) -> None:
    plans = rolling_plans("api1", "api2", "api3")
    machines = {p.host.name: FakeMachine(p.host) for p in plans}
    machines["api2"].files["/opt/dify/compose.yml"] = (b"v2\n", 0o644, "root", "root")
    outcome, events = rolled(use_machines, machines, plans)
    assert events == ["drain api1", "up api1", "undrain api1",
                      "drain api3", "up api3", "undrain api3"]
    assert outcome.ok and outcome.replaced == ["api1", "api3"] and outcome.unchanged == ["api2"]


def test_a_host_that_fails_stops_the_rollout_and_gets_its_release_back(use_machines) -> None:
    plans = rolling_plans("api1", "api2", "api3")
    machines = {p.host.name: FakeMachine(p.host) for p in plans}
    machines["api2"] = FakeMachine(plans[1].host, answers=lambda c: 1 if "--wait" in c else 0)
    back = rolling_plans("api2", content="v1\n")[0]
    back.steps[1] = RunCommand("compose up dify", "docker compose up -d",
                               on_change=("/opt/dify/compose.yml",))
    outcome, events = rolled(use_machines, machines, plans, restore=lambda host: back)
    assert events == ["drain api1", "up api1", "undrain api1",
                      "drain api2", "up api2", "up api2", "undrain api2"]
    assert outcome.failed == "api2" and "compose up dify" in outcome.reason
    assert outcome.untouched == ["api3"] and outcome.restored and not outcome.left_drained
    assert machines["api2"].files["/opt/dify/compose.yml"][0] == b"v1\n"
    assert "/opt/dify/compose.yml" not in machines["api3"].files


def test_a_failed_host_without_a_way_back_stays_drained(use_machines) -> None:
    plans = rolling_plans("web1", "web2")
    machines = {p.host.name: FakeMachine(p.host, answers=lambda c: 1 if "--wait" in c else 0)
                for p in plans}
    outcome, events = rolled(use_machines, machines, plans)
    assert events == ["drain web1", "up web1"]
    assert outcome.left_drained and outcome.untouched == ["web2"] and not outcome.restored
    text = app_release.describe(outcome, *[type("I", (), {"profile": type("P", (), {
        "version": v})})() for v in ("1.13.3", "1.5.1")])
    assert "not touched, still serving Dify 1.5.1: web2" in text
    assert "web1 is out of the load balancer" in text


def test_workers_are_not_drained(use_machines) -> None:
    plans = rolling_plans("worker1")
    machines = {"worker1": FakeMachine(plans[0].host)}
    _, events = rolled(use_machines, machines, plans, behind_lb=lambda host: False)
    assert events == ["up worker1"]


def test_a_drain_that_fails_touches_nothing(use_machines) -> None:
    plans = rolling_plans("api1")
    machines = {"api1": FakeMachine(plans[0].host)}
    use_machines(lambda host, timeouts=None: machines[host.name])

    def drain(name: str) -> None:
        raise DifyopsError("nginx on lb1 did not reload")

    outcome = rollout.roll("app", plans, report=Report(out=io.StringIO()), drain=drain)
    assert outcome.failed == "api1" and "nginx on lb1 did not reload" in outcome.reason
    assert machines["api1"].files == {}


# --- images --------------------------------------------------------------------------------


class Docker(images_tier.ControlDocker):
    """The control machine's engine, answering from a dict; saves return fixed bytes."""

    def __init__(self, ids: dict[str, str]) -> None:
        super().__init__()
        self.ids = ids
        self.saved: list[list[str]] = []

    def image_id(self, name: str) -> str | None:
        return self.ids.get(name)

    def save(self, names):
        self.saved.append(list(names))

        class Saver:
            stdout = io.BytesIO(b"tar-bytes")
            stderr = io.BytesIO(b"")
            returncode = 0

            def wait(self) -> int:
                return 0

        return Saver()


class ImageHost(FakeMachine):
    """A host engine: image IDs it holds; `docker load` adds what the control machine sent."""

    def __init__(self, host: Host, held: dict[str, str], control: Docker) -> None:
        super().__init__(host)
        self.held, self.control, self.fed = held, control, []

    def _execute(self, command: str, timeout: float) -> Result:
        images = [part.split(" ", 1)[0].strip("'")
                  for part in command.split("docker image inspect -f '{{.Id}}' ")[1:]]
        return Result(0, "\n".join(self.held.get(i, "-") for i in images), "")

    def _feed(self, command: str, source, timeout: float) -> Result:
        self.fed.append((command, source.read()))
        for image in self.control.saved[-1]:
            self.held[image] = self.control.ids[image]
        return Result(0, "Loaded image", "")


def test_ship_sends_only_missing_or_different_images(load, base) -> None:
    inventory = load(base)
    web = inventory.host("web1")
    name = inventory.image("web")
    docker = Docker({name: "sha256:new"})
    machine = ImageHost(web, {name: "sha256:old"}, docker)
    rows = images_tier.ship(inventory, docker, web, machine, refresh=False)
    assert [(r.image, r.status) for r in rows] == [(name, "shipped")]
    assert docker.saved == [[name]] and machine.fed == [("docker load -q", b"tar-bytes")]
    again = images_tier.ship(inventory, docker, web, machine, refresh=False)
    assert [r.status for r in again] == ["present"] and len(docker.saved) == 1


def test_images_per_host_follow_roles(load, base) -> None:
    inventory = load(base)
    assert images_tier.host_images(inventory, inventory.host("web1")) == [
        "langgenius/dify-web:1.16.1"]
    # api1, the first api host, runs the agent services too (no host has the role `agent`).
    assert images_tier.host_images(inventory, inventory.host("api1")) == [
        "haproxy:2.8", "langgenius/dify-agent-backend:1.16.1",
        "langgenius/dify-agent-local-sandbox:1.16.1", "langgenius/dify-api:1.16.1",
        "langgenius/dify-plugin-daemon:0.6.3-local", "langgenius/dify-sandbox:0.2.15",
        "ubuntu/squid:latest"]
    assert images_tier.host_images(inventory, inventory.host("api2")) == [
        "haproxy:2.8", "langgenius/dify-api:1.16.1", "langgenius/dify-sandbox:0.2.15",
        "ubuntu/squid:latest"]
    assert images_tier.host_images(inventory, inventory.host("vector1")) == [
        "semitechnologies/weaviate:1.27.0"]
    assert images_tier.host_images(inventory, inventory.host("db1")) == []


def test_a_local_machine_streams_bytes_into_a_command(tmp_path) -> None:
    machine = LocalMachine(Host(name="here", address="127.0.0.1", connection="local"))
    source = tmp_path / "data"
    source.write_bytes(b"x" * (3 << 20))
    with source.open("rb") as handle:
        result = machine.feed("wc -c", handle, sudo=False)
    assert result.ok and result.stdout.strip() == str(3 << 20)


class RegistryDocker(images_tier.ControlDocker):
    """A control engine that records docker commands; `pushed` after a push of that name."""

    def __init__(self, ids: dict[str, str]) -> None:
        super().__init__()
        self.ids, self.commands, self.pushes = dict(ids), [], set()

    def image_id(self, name: str) -> str | None:
        return self.ids.get(name)

    def pushed(self, name: str) -> bool:
        return name in self.pushes

    def check(self, *args: str) -> None:
        self.commands.append(" ".join(args))
        if args[0] == "pull":
            self.ids[args[-1]] = f"id-{args[-1]}"
        if args[0] == "tag":
            self.ids[args[2]] = self.ids[args[1]]
        if args[0] == "push":
            self.pushes.add(args[-1])


def test_a_private_registry_gets_every_image_once(load, base) -> None:
    base["dify"] = {"registry_mirror": "mirror.example/", "private_registry": "reg.lan:5000"}
    base["vector"] = {"store": "pgvector"}
    base["hosts"] = [h for h in base["hosts"] if h["name"] != "vector1"]
    inventory = load(base)
    upstream = "mirror.example/langgenius/dify-api:1.16.1"
    docker = RegistryDocker({upstream: "id-api"})  # already pulled once
    rows = images_tier.prepare(inventory, docker, refresh=False)
    assert f"pull -q {upstream}" not in docker.commands
    assert "pull -q mirror.example/langgenius/dify-web:1.16.1" in docker.commands
    assert "pull -q mirror.example/langgenius/dify-agent-backend:1.16.1" in docker.commands
    assert f"tag {upstream} reg.lan:5000/langgenius/dify-api:1.16.1" in docker.commands
    pushes = [c for c in docker.commands if c.startswith("push")]
    # api, web, plugin daemon, sandbox, squid (both proxies), the Redis proxy (Sentinel mode),
    # agent backend, local sandbox
    assert len(pushes) == 8 and all(" reg.lan:5000/" in c for c in pushes)
    assert {r.status for r in rows if r.where == "reg.lan:5000"} == {"pushed"}
    docker.commands.clear()
    again = images_tier.prepare(inventory, docker, refresh=False)
    assert docker.commands == []
    assert {r.status for r in again} == {"present"}


def test_rolling_plans_neither_check_the_release_nor_migrate(load, base) -> None:
    plan = labels(plan_of(load(base), "api1", release_guard=False, migrate=False))
    assert "release check" not in plan and "migrate the database (one run)" not in plan
    assert plan.index("compose up plugin_daemon") < plan.index("compose up dify")


# --- a host that never gets healthy --------------------------------------------------------


def test_the_compose_wait_is_bounded_by_the_health_timeout(load, base) -> None:
    base["app"] = {"health_timeout": 42}
    steps = {s.label: s for s in plan_of(load(base), "api1") if isinstance(s, RunCommand)}
    for label in ("compose up dify", "compose up plugin_daemon"):
        assert " up -d --wait" in steps[label].command
        assert "--wait-timeout 42 ||" in steps[label].command
        assert "not healthy after 42 s" in steps[label].command
    api = compose_of(load(base), "api1")["services"]["api"]["healthcheck"]["test"]
    assert "--fail-with-body" in api and "-o" not in api  # the health log keeps the answer


FAKE_DOCKER = """#!/bin/sh
case "$*" in
  *" up -d --wait"*) echo "application not healthy after 30s" >&2; exit 1 ;;
  *" ps -aq"*) printf 'c-api\\nc-web\\nc-worker\\n' ;;
  "logs --tail 3 c-api") printf 'booting\\n\\nstill booting\\n' ;;
  logs*) echo "worker: cannot reach the broker" ;;
  inspect*)
    case "$3" in
      *State.Status*)
        case "$4" in
          c-api) echo "running starting" ;;
          c-web) echo "running healthy" ;;
          *) echo "restarting" ;;
        esac ;;
      *compose.service*) echo "${4#c-}" ;;
      *Health*)
        [ "$4" = c-api ] && printf '%s\\n' \\
          '"curl: (22) error: 503\\n{\\"status\\": \\"error\\"}"' \\
          '"curl: (22) error: 503\\n{\\"problems\\": [\\"database: no driver\\"]}"' && echo ;;
    esac ;;
esac
"""


def test_a_compose_wait_that_times_out_names_each_unhealthy_service(tmp_path) -> None:
    import subprocess

    fake = tmp_path / "docker"
    fake.write_text(FAKE_DOCKER)
    fake.chmod(0o755)
    from tasks.tiers.common import compose_up

    step = compose_up("/opt/dify", "dify", wait_timeout=30)
    result = subprocess.run(["sh", "-c", step.command], capture_output=True, text=True,
                            env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, check=False)
    assert result.returncode == 1
    assert Result(1, result.stdout, result.stderr).answer == (
        'not healthy after 30 s: api (running starting) last health check: curl: (22) '
        'error: 503 {"problems": ["database: no driver"]}, last log lines: booting | still '
        'booting; worker (restarting) last log lines: worker: cannot reach the broker')


def test_a_restore_that_fails_too_is_reported(use_machines) -> None:
    plans = rolling_plans("api1", "api2")
    machines = {p.host.name: FakeMachine(p.host, answers=lambda c: 1 if "--wait" in c else 0)
                for p in plans}
    back = rolling_plans("api1", content="v1\n")[0]
    outcome, events = rolled(use_machines, machines, plans, restore=lambda host: back)
    assert events == ["drain api1", "up api1", "up api1"]  # never undrained, api2 untouched
    assert outcome.failed == "api1" and not outcome.restored and outcome.left_drained
    assert "compose up dify" in outcome.restore_error and outcome.untouched == ["api2"]
    text = app_release.describe(outcome, *[type("I", (), {"profile": type("P", (), {
        "version": v})})() for v in ("1.13.3", "1.5.1")])
    assert "putting Dify 1.5.1 back on api1 failed too: compose up dify" in text
    assert "api1 is out of the load balancer" in text


def test_a_stopped_upgrade_says_where_things_stand_and_what_to_do(load, base,
                                                                    monkeypatch) -> None:
    base["dify"] = {"version": "1.5.1"}
    inventory = load(base)
    monkeypatch.setattr(app_release, "read_history", lambda inv: [{
        "version": "1.5.1", "images": app_release.components(inventory), "alembic": "aaa",
        "action": "deployed", "backup": "", "at": "t0"}])
    monkeypatch.setattr(app_release, "ensure_images", lambda *a: None)
    monkeypatch.setattr(app_release, "write_history", lambda *a: [])
    monkeypatch.setattr(app_release, "migrate", lambda target, report: app_release.Migration(
        "aaa", "bbb", "bbb", ran=True))
    reason = ("compose up dify: `compose up dify` failed on root@10.0.0.12: not healthy after "
              "30 s: api (running starting) last health check: \"HTTP 503\"")
    monkeypatch.setattr(app_release, "replace", lambda *a: rollout.Outcome(
        replaced=["api1"], failed="api2", reason=reason, untouched=["api3", "worker1"],
        restored=True, drained=True))
    hooks = app_release.Hooks(backup=lambda why: "db1-20250101T0000", load_balanced=True)
    with pytest.raises(app_release.ReleaseError) as caught:
        app_release.upgrade(inventory, "1.13.3", Report(out=io.StringIO()), hooks)
    message = str(caught.value)
    assert f"stopped at api2: {reason}" in message
    assert "on Dify 1.13.3: api1" in message
    assert "not touched, still serving Dify 1.5.1: api3, worker1" in message
    assert ("api2 was put back on Dify 1.5.1 and is back in service (healthy again before it "
            "re-entered the load balancer)") in message
    assert "rerun inv app.upgrade --version 1.13.3: it resumes at api2" in message
    assert "restored first" in message and "backup db1-20250101T0000" in message
