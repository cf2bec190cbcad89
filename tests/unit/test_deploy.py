"""deploy.all: one host at a time on request, and images synced first when the inventory says so."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from invoke import Context
from invoke.exceptions import Exit

import tasks.deploy as deploy
from tasks.tiers.images import Row

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def calls(monkeypatch, load, base) -> dict:
    """deploy.all with the hosts faked away: what it checked, synced and ran."""
    seen: dict = {"synced": 0}
    state = {"data": base}
    monkeypatch.setattr(deploy, "load", lambda ctx: load(state["data"]))
    monkeypatch.setattr(deploy.checks, "check", lambda inventory, hosts: seen.setdefault(
        "preflight", [h.name for h in hosts]))

    def fake_sync(inventory, parallel):
        seen["synced"] += 1
        seen["sync_parallel"] = parallel
        return [Row("api1", "langgenius/dify-api:1.13.3", "shipped")]

    monkeypatch.setattr(deploy, "sync", fake_sync)
    monkeypatch.setattr(deploy, "apply_firewall",
                        lambda inventory, **kw: seen.setdefault("firewall", []).append(kw))
    monkeypatch.setattr(deploy, "run_tiers", lambda ctx, tiers, **kw: seen.update(
        run=kw, tiers=[tier.name for tier in tiers]))
    monkeypatch.setattr(deploy, "deploy_lock", lambda name: contextlib.nullcontext({}))
    seen["inventory"] = state
    return seen


def test_parallel_reaches_the_executor_and_defaults_to_the_engines_limit(calls) -> None:
    deploy.all.body(Context(), parallel=1)
    assert calls["run"] == {"dry": False, "parallel": 1, "diff": False}
    deploy.all.body(Context())
    assert calls["run"]["parallel"] == deploy.MAX_PARALLEL


def test_the_firewall_comes_first_and_the_tiers_run_without_it(calls, monkeypatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(deploy.checks, "check", lambda inventory, hosts: events.append("preflight"))
    monkeypatch.setattr(deploy, "apply_firewall",
                        lambda inventory, **kw: events.append(f"firewall {kw}"))
    monkeypatch.setattr(deploy, "sync_images_first", lambda *a: events.append("images"))
    monkeypatch.setattr(deploy, "run_tiers", lambda ctx, tiers, **kw: events.append(
        "tiers " + ",".join(tier.name for tier in tiers)))

    @contextlib.contextmanager
    def lock(name: str) -> Iterator[dict]:
        events.append(f"lock {name}")
        yield {}
        events.append("unlock")

    monkeypatch.setattr(deploy, "deploy_lock", lock)
    deploy.all.body(Context())
    assert events == ["lock unit", "preflight", "firewall {'dry': False, 'show_diff': False}",
                      "images",
                      "tiers db,cache,vector,app,lb,monitor,logging,dev_backend,dev_frontend",
                      "unlock"]
    events.clear()
    deploy.all.body(Context(), dry=True, diff=True)  # a dry run takes no lock
    assert events == ["firewall {'dry': True, 'show_diff': True}", "tiers " + ",".join(
        tier.name for tier in deploy.TIERS)]
    events.clear()
    deploy.all.body(Context(), only="db,cache")
    assert events == ["lock unit", "preflight", "images", "tiers db,cache", "unlock"]
    events.clear()
    deploy.all.body(Context(), only="net")
    assert events == ["lock unit", "preflight", "firewall {'dry': False, 'show_diff': False}",
                      "images", "unlock"]


def test_with_the_firewall_off_deploy_all_says_what_is_open(calls, capsys) -> None:
    calls["inventory"]["data"]["net"] = {"firewall": "off", "management": []}
    deploy.all.body(Context())
    out = capsys.readouterr().out
    assert "firewall" not in calls and calls["tiers"][0] == "db"
    assert 'net: no host firewall (net.firewall: "off"): SSH and every port below' in out
    assert "postgresql 5432 (db1, db2, db3); redis 6379 (db1, db2, db3)" in out
    assert "alertmanager 9093 (monitor1)" in out and "http 80" not in out


def test_one_host_gets_no_firewall_unless_asked(calls, capsys) -> None:
    one = {"name": "one", "storage": {"type": "local"}, "cache": {"mode": "standalone"},
           "hosts": [{"name": "solo", "address": "10.0.2.5",
                      "roles": ["db_primary", "cache", "vector", "api", "worker", "beat", "web",
                                "plugin_daemon", "lb"]}]}
    calls["inventory"]["data"] = one
    deploy.all.body(Context())
    assert "firewall" not in calls
    assert "net: no host firewall (one host, net.firewall: auto)" in capsys.readouterr().out
    one["net"] = {"firewall": "on", "management": ["10.0.4.0/24"]}
    deploy.all.body(Context())
    assert calls["firewall"] == [{"dry": False, "show_diff": False}]


def test_parallel_below_one_is_refused_before_any_host(calls) -> None:
    with pytest.raises(Exit, match="--parallel: 0: must be at least 1"):
        deploy.all.body(Context(), parallel=0)
    assert "run" not in calls and "preflight" not in calls


def test_images_are_synced_first_only_when_the_inventory_asks(calls, capsys) -> None:
    deploy.all.body(Context())
    assert calls["synced"] == 0  # dify.sync_images defaults to false: hosts pull themselves
    calls["inventory"]["data"]["dify"] = {"sync_images": True}
    deploy.all.body(Context())
    assert calls["synced"] == 1
    assert "1 transfer(s)" in capsys.readouterr().out
    deploy.all.body(Context(), only="db,cache")  # no tier that runs images
    deploy.all.body(Context(), dry=True)  # a dry run touches nothing
    assert calls["synced"] == 1
    deploy.all.body(Context(), only="app")
    assert calls["synced"] == 2 and calls["sync_parallel"] == 4
    deploy.all.body(Context(), parallel=1)  # one host at a time: images too
    assert calls["synced"] == 3 and calls["sync_parallel"] == 1


def test_parallel_flag_is_refused_by_the_real_cli(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "invoke", "deploy.all", "--parallel", "0"],
                            cwd=ROOT, text=True, capture_output=True, check=False,
                            env={"PATH": "/usr/bin:/bin", "DIFY_SECRETS": str(tmp_path / "x.env")})
    assert result.returncode == 1
    assert "--parallel: 0: must be at least 1" in result.stderr


def test_app_hosts_that_others_wait_on_are_planned_first(load, base) -> None:
    from tasks.tiers import app

    # web1 is listed before api1, the migration and plugin daemon host every other app host
    # waits on: one host at a time (--parallel 1) must start with api1 or wait forever.
    base["hosts"].append({"name": "pd1", "address": "10.0.2.41", "roles": ["plugin_daemon"]})
    base["hosts"][2]["roles"] = ["api"]  # api1: the migration host, no daemon
    inventory = load(base)
    order = [plan.host.name for plan in app.TIER.plan(inventory).hosts]
    assert order == ["api1", "pd1", "web1", "api2", "worker1"]


@pytest.fixture
def installed(calls, monkeypatch) -> list[dict]:
    """The backup schedules deploy.all installed (faked: no machine is touched)."""
    seen: list[dict] = []
    monkeypatch.setattr(deploy.backup_schedule, "install",
                        lambda inventory, **kw: seen.append(kw))
    return seen


def test_backup_schedule_is_left_to_the_operator_by_default(calls, installed, capsys) -> None:
    deploy.all.body(Context())
    assert installed == []
    assert "not scheduled by deploy.all (backup.schedule_on: none)" in capsys.readouterr().out


def test_backup_schedule_comes_last_where_the_inventory_says(calls, installed) -> None:
    calls["inventory"]["data"]["backup"] = {"schedule_on": "control"}
    deploy.all.body(Context(), dry=True)
    assert installed == [{"dry": True, "host_name": ""}] and "run" in calls
    calls["inventory"]["data"]["backup"] = {"schedule_on": "api1"}
    deploy.all.body(Context())
    assert installed[-1] == {"dry": False, "host_name": "api1"}
    deploy.all.body(Context(), only="db")  # a partial deploy leaves the schedule alone
    assert len(installed) == 2


def test_unknown_schedule_host_is_refused_before_any_host(calls, installed) -> None:
    calls["inventory"]["data"]["backup"] = {"schedule_on": "api9"}
    with pytest.raises(Exit, match=r"backup\.schedule_on: 'api9' is neither none, control nor a"):
        deploy.all.body(Context())
    assert "run" not in calls and "preflight" not in calls and installed == []


def test_status_says_where_nothing_was_deployed_instead_of_probing(load, base,
                                                                   use_machines) -> None:
    from tasks.core.health import NOT_DEPLOYED, probe_all
    from tasks.core.tiers import build, select
    from tasks.tiers import TIERS
    from tests.unit.fakes import FakeMachine

    inventory = load(base)
    plans = build(select(TIERS, "db"), inventory)  # gates run on the hosts: no HTTP from here
    machines = {host.name: FakeMachine(host) for host in inventory.with_role("db_primary",
                                                                           "db_replica")}
    written = next(plan for tier in plans for plan in tier.hosts if plan.host.name == "db1")
    machines["db1"].files[written.files()[-1].path] = (b"x", 0o644, "root", "root")
    use_machines(lambda host, timeouts=None: machines[host.name])
    answers = {p.host: p.answer for p in probe_all(plans)}
    assert answers["db2"] == answers["db3"] == NOT_DEPLOYED
    assert answers["db1"] != NOT_DEPLOYED and machines["db1"].commands  # its gates were asked
    assert machines["db2"].commands == []  # none asked where nothing of the tier was written
