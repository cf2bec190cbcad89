"""db tier and its verbs: rendered replication facts, plan order, status rules, failover choices."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from dotenv import dotenv_values

from tasks.core.errors import DifyopsError
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import RunCommand, WaitFor, WriteFile
from tasks.core.report import Report
from tasks.core.tiers import build
from tasks.tiers import TIERS, db_ops
from tasks.tiers.db import HELPER, PASSFILE, ROLE_FILE, TIER, slot_name
from tasks.tiers.db_ops import Node, Slot, Standby, lsn, problems, role_edit, swapped
from tests.unit.fakes import FakeMachine

ROOT = Path(__file__).resolve().parents[2]
CONFD = "/etc/postgresql/15/main/conf.d"


def db_files(inventory: Inventory) -> dict[tuple[str, str], WriteFile]:
    return {(plan.host.name, step.path): step for plan in TIER.plan(inventory).hosts
            for step in plan.files()}


def steps_of(inventory: Inventory, name: str) -> list:
    return next(plan.steps for plan in TIER.plan(inventory).hosts if plan.host.name == name)


def test_standbys_the_postgresql_12_way(load, base) -> None:
    files = db_files(load(base))
    upstream = files[("db2", f"{CONFD}/difyops-upstream.conf")].content
    settings = dict(re.findall(r"^(\w+) = '(.*)'$", upstream, re.M))
    conninfo = dict(item.split("=", 1) for item in settings["primary_conninfo"].split())
    assert conninfo == {"host": "10.0.3.11", "port": "5432", "user": "replicator",
                        "application_name": "db2", "passfile": PASSFILE, "connect_timeout": "5",
                        "sslmode": "verify-full",
                        "sslrootcert": "/etc/postgresql/difyops-tls/ca.crt"}
    assert settings["primary_slot_name"] == "difyops_db2"
    assert "primary_conninfo" not in files[("db1", f"{CONFD}/difyops-upstream.conf")].content
    every = "\n".join(step.content for step in files.values())
    assert "recovery.conf" not in every and "standby_mode" not in every
    conf = files[("db1", f"{CONFD}/difyops.conf")].content
    assert "wal_level = replica" in conf and "max_slot_wal_keep_size = 10GB" in conf


def test_replication_password_only_in_private_files(load, base) -> None:
    inventory = load(base)
    password = inventory.secrets["DB_REPLICATION_PASSWORD"]
    files = db_files(inventory)
    holding = {key for key, step in files.items() if password in step.content}
    assert {path for _, path in holding} == {PASSFILE, "/etc/difyops/postgres-roles.sql"}
    for key in holding:
        assert files[key].secret and files[key].mode == 0o600
        assert files[key].owner == "postgres"
    assert files[("db2", PASSFILE)].content.splitlines()[-1] == \
        f"*:5432:*:replicator:{password}"


def test_no_secret_on_any_command_line(load, base) -> None:
    """Commands and gates show up in `ps`: they read passwords from files, never carry them."""
    inventory = load(base)
    values = [v for v in inventory.secrets.values() if v]
    for tier in build(TIERS, inventory):
        for plan in tier.hosts:
            for step in plan.steps:
                if isinstance(step, RunCommand):
                    texts = [step.command, step.probe]
                elif isinstance(step, WaitFor):
                    texts = [getattr(step.gate, "command", "")]
                else:
                    continue
                assert not any(v in text for v in values for text in texts), step.label


def test_single_primary_without_replicas_has_no_passfile(load, base) -> None:
    for host in base["hosts"]:
        host["roles"] = [r for r in host["roles"] if r != "db_replica"] or ["monitor"]
    files = db_files(load(base))
    assert ("db1", PASSFILE) not in files
    assert "replicator" not in files[("db1", "/etc/difyops/postgres-roles.sql")].content


def test_replica_plan_guards_first_and_clones_only_when_needed(load, base) -> None:
    steps = steps_of(load(base), "db2")
    labels = [step.label for step in steps]
    assert labels[0] == f"file {HELPER}"
    guard = steps[1]
    assert guard.command == f"{HELPER} guard standby db1 10.0.3.11" and guard.changes is False
    assert labels[2] == f"file {ROLE_FILE}"          # written only after the guard accepted
    assert labels[3] == "install postgresql-15"
    clone = next(s for s in steps if isinstance(s, RunCommand) and s.name.startswith("clone"))
    assert clone.command == f"{HELPER} clone" and clone.unless == f"{HELPER} is-standby"
    slot = labels.index("replication slot difyops_db2 on db1")
    assert labels.index("health primary db1 accepts replication from db2") < slot < \
        labels.index(clone.label) < labels.index("enable and start postgresql@15-main")
    assert labels[-1] == "health streaming from db1"
    reload = next(s for s in steps if isinstance(s, RunCommand) and s.name.startswith("reload"))
    tls = "/etc/postgresql/difyops-tls"  # a renewed certificate is reloaded, not restarted
    assert reload.on_change == (f"{CONFD}/difyops-upstream.conf", f"{tls}/ca.crt",
                                f"{tls}/server.crt", f"{tls}/server.key")
    assert labels.index(f"file {tls}/server.key") < labels.index(f"file {CONFD}/difyops.conf")


def test_primary_drops_only_stale_difyops_slots(load, base) -> None:
    sql = db_files(load(base))[("db1", "/etc/difyops/postgres-roles.sql")].content
    assert "slot_name LIKE 'difyops\\_%'" in sql and "NOT active" in sql
    assert "ARRAY['difyops_db2', 'difyops_db3']::name[]" in sql
    labels = [step.label for step in steps_of(load(base), "db1")]
    assert labels.index("health primary accepts writes") < labels.index("create roles and "
                                                                        "databases")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_helper_script_is_valid_bash_and_role_free(load, base) -> None:
    inventory = load(base)
    files = db_files(inventory)
    scripts = {name: files[(name, HELPER)].content for name in ("db1", "db2")}
    for script in scripts.values():
        checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True,
                                 check=False)
        assert checked.returncode == 0, checked.stderr
    # After a failover the helper stays the same: only the role file moves.
    after = db_files(swapped(inventory, "db2"))
    assert after[("db2", HELPER)].content == scripts["db2"]
    assert "PRIMARY=10.0.3.12" in after[("db3", ROLE_FILE)].content
    assert 'PEERS="db1=10.0.3.11 db3=10.0.3.13"' in scripts["db2"]


def test_slot_names_are_valid() -> None:
    from tasks.core.inventory import Host

    assert slot_name(Host(name="db-east-2", address="10.0.0.1")) == "difyops_db_east_2"
    assert len(slot_name(Host(name="a" * 63, address="10.0.0.1"))) == 63


def test_swapped_inventory_moves_db_host_for_the_app(load, base) -> None:
    inventory = load(base)
    after = swapped(inventory, "db3")
    assert [h.name for h in after.with_role("db_primary")] == ["db3"]
    assert [h.name for h in after.with_role("db_replica")] == ["db1", "db2"]
    assert [h.name for h in after.with_role("cache")] == ["db1", "db2", "db3"]
    env = {(p.host.name, s.path): s.content for t in build(TIERS, after) for p in t.hosts
           for s in p.files()}[("api1", "/opt/dify/.env")]
    assert dotenv_values(stream=io.StringIO(env))["DB_HOST"] == "10.0.3.13"


PRODUCTION = ROOT / "config" / "inventories" / "production.yml"


def test_role_edit_on_flow_style_hosts() -> None:
    text = PRODUCTION.read_text()
    edited = role_edit(role_edit(text, "db1", "db_primary", "db_replica"), "db2", "db_replica",
                       "db_primary")
    changed = [(a, b) for a, b in zip(text.splitlines(), edited.splitlines(), strict=True)
               if a != b]
    assert len(changed) == 2
    assert "name: db1" in changed[0][1] and "roles: [db_replica, cache]" in changed[0][1]
    assert "name: db2" in changed[1][1] and "roles: [db_primary, cache]" in changed[1][1]


def test_role_edit_on_block_style_hosts() -> None:
    text = ("hosts:\n- name: db1\n  address: 10.0.0.1\n  roles:\n  - db_primary\n  - cache\n"
            "- name: db10\n  address: 10.0.0.2\n  roles:\n  - db_replica\n")
    assert role_edit(text, "db1", "db_replica", "db_primary") is None  # db10's is not db1's
    edited = role_edit(text, "db10", "db_replica", "db_primary")
    assert edited.splitlines()[-1] == "  - db_primary"
    assert role_edit(text, "db3", "db_replica", "db_primary") is None


def test_inventory_edit_is_a_diff_of_the_file(load, base, write_inventory) -> None:
    inventory = load(base)
    diff = db_ops.inventory_edit(inventory, "db1", "db2")
    assert [line for line in diff.splitlines() if line.startswith(("-  ", "+  "))] == [
        "-  - db_primary", "+  - db_replica", "-  - db_replica", "+  - db_primary"]


def test_lsn() -> None:
    assert lsn("0/3000148") == 0x3000148
    assert lsn("1/0") == 1 << 32
    assert lsn("") == 0


# --- status rules ------------------------------------------------------------------------------

def healthy(inventory: Inventory) -> list[Node]:
    db1, db2, db3 = inventory.with_role("db_primary", "db_replica")
    primary = Node(db1, running=True, timeline="1", lsn=1000, replay_lsn=1000,
                   standbys=[Standby("db2", db2.address, "streaming", 0, 0.0),
                             Standby("db3", db3.address, "streaming", 0, 0.0)],
                   slots=[Slot("difyops_db2", True, "reserved", 0),
                          Slot("difyops_db3", True, "reserved", 0)])
    return [primary] + [Node(h, running=True, in_recovery=True, timeline="1", lsn=1000,
                             replay_lsn=1000, receiver="streaming", upstream=db1.address)
                        for h in (db2, db3)]


def test_healthy_replication_has_no_problem(load, base) -> None:
    inventory = load(base)
    nodes = healthy(inventory)
    assert problems(inventory, nodes) == []
    table = db_ops.status_table(inventory, nodes)
    assert table.splitlines()[2].split()[:3] == ["db2", "db_replica", "standby"]
    assert "difyops_db2 active reserved" in table


@pytest.mark.parametrize(("breakage", "expected"), [
    (lambda n: setattr(n[1], "in_recovery", False), "2 primaries (db1, db2)"),
    (lambda n: setattr(n[0], "running", False), "no primary accepts writes"),
    (lambda n: setattr(n[2], "receiver", "catchup"), "db3: not streaming (catchup)"),
    (lambda n: setattr(n[2], "upstream", "10.0.3.99"), "db3: streams from 10.0.3.99"),
    (lambda n: setattr(n[2], "replay_lsn", 1000 - 67108865), "db3: replays 67108865 bytes"),
    (lambda n: n[0].slots.pop(), "no replication slot difyops_db3 for db3"),
    (lambda n: setattr(n[0].slots[0], "active", False), "slot difyops_db2 of db2 is not in use"),
    (lambda n: setattr(n[0].slots[0], "wal_status", "lost"), "slot difyops_db2 lost WAL"),
    (lambda n: setattr(n[2], "error", "cannot connect to db3"), "db3: cannot connect to db3"),
    (lambda n: (setattr(n[0], "running", False), setattr(n[1], "in_recovery", False)),
     "the primary is db2 but the inventory names db1"),
])
def test_each_problem_is_named(load, base, breakage, expected) -> None:
    inventory = load(base)
    nodes = healthy(inventory)
    breakage(nodes)
    assert any(expected in problem for problem in problems(inventory, nodes)), \
        problems(inventory, nodes)


def test_db_hosts_where_nothing_was_deployed_say_so(load, base, use_machines) -> None:
    inventory = load(base)
    never = {"db2", "db3"}  # no cluster folder there; db1's PostgreSQL is deployed, stopped

    def answer(host: Host, command: str) -> int:
        if command.startswith("test -d /etc/postgresql/"):
            return int(host.name in never)
        return 3 if command.startswith("systemctl is-active") else 0

    use_machines(lambda host, timeouts=None: FakeMachine(host, lambda c: answer(host, c)))
    nodes = db_ops.survey(inventory)
    assert [node.state for node in nodes] == ["stopped", "not deployed", "not deployed"]
    found = problems(inventory, nodes)
    assert "db2: nothing deployed on this host yet: run `inv db.deploy`" in found
    never.add("db1")
    nodes = db_ops.survey(inventory)
    assert problems(inventory, nodes) == [
        "nothing deployed on the db hosts yet: run `inv deploy.all` (or `inv db.deploy`)"]


def test_a_probe_that_cannot_run_is_an_error_not_never_deployed(load, base,
                                                                use_machines) -> None:
    inventory = load(base)
    use_machines(lambda host, timeouts=None: FakeMachine(host, answers=lambda command: 255 * int(
        command.startswith("test -d /etc/postgresql/"))))
    nodes = db_ops.survey(inventory)
    assert all(node.state == "unreachable" and "could not run" in node.error for node in nodes)


def test_status_fails_when_anything_is_wrong(load, base, monkeypatch) -> None:
    inventory = load(base)
    nodes = healthy(inventory)
    nodes[2].receiver = "stopping"
    monkeypatch.setattr(db_ops, "survey", lambda inv: nodes)
    printed: list[str] = []
    with pytest.raises(DifyopsError, match="db3: not streaming"):
        db_ops.status(inventory, out=printed.append)
    assert "db3" in printed[0]


# --- promote and failover ----------------------------------------------------------------------

def test_promote_refuses_while_another_primary_runs(load, base, monkeypatch) -> None:
    inventory = load(base)
    monkeypatch.setattr(db_ops, "survey", lambda inv: healthy(inventory))
    with pytest.raises(DifyopsError, match="db1 still accepts writes: promoting db2 would make "
                                           "two primaries"):
        db_ops.promote(inventory, "db2")


def test_choose_the_standby_that_received_most(load, base) -> None:
    inventory = load(base)
    nodes = healthy(inventory)
    nodes[0].running = False
    nodes[2].lsn = 2000
    assert db_ops.choose(inventory, nodes, None).host.name == "db3"
    assert db_ops.choose(inventory, nodes, "db2").host.name == "db2"
    nodes[1].in_recovery = False                     # promoted earlier: resume with it
    assert db_ops.choose(inventory, nodes, None).host.name == "db2"
    with pytest.raises(DifyopsError, match="api1 is not a db_replica"):
        db_ops.choose(inventory, nodes, "api1")


def test_failover_fences_promotes_and_repoints(load, base, monkeypatch, use_machines) -> None:
    inventory = load(base)
    before = healthy(inventory)
    before[0].running = False                         # the primary's PostgreSQL died
    machines: dict[str, FakeMachine] = {}

    def machine(host, timeouts=None) -> FakeMachine:
        return machines.setdefault(host.name, FakeMachine(host))

    monkeypatch.setattr(db_ops, "survey", lambda inv: before)
    use_machines(machine)
    printed: list[str] = []
    after = db_ops.failover(inventory, None, out=printed.append,
                            report=Report(out=io.StringIO()))
    assert [h.name for h in after.with_role("db_primary")] == ["db2"]
    fence = [c for c in machines["db1"].commands if c.startswith(f"{HELPER} fence")]
    assert len(fence) == 1 and "the primary is now db2 (10.0.3.12)" in fence[0]
    assert any("pg_promote(true, 60)" in c for c in machines["db2"].commands)
    # the old primary is left alone by the re-pointing plan; db3 gets db2 as upstream
    assert machines["db1"].files == {}
    upstream = machines["db3"].files[f"{CONFD}/difyops-upstream.conf"][0].decode()
    assert "host=10.0.3.12 " in upstream
    text = "\n".join(printed)
    assert "-  - db_primary\n+  - db_replica" in text      # db1's roles in the diff
    assert "-  - db_replica\n+  - db_primary" in text      # db2's
    assert "DB_HOST=10.0.3.12" in text and "api1, api2, worker1" in text
    assert "db1: fenced" in text


def test_failover_fences_nothing_when_the_standby_cannot_be_promoted(load, base, monkeypatch,
                                                                    use_machines) -> None:
    inventory = load(base)
    nodes = healthy(inventory)
    nodes[2].error = "cannot connect to db3"
    machines: dict[str, FakeMachine] = {}
    monkeypatch.setattr(db_ops, "survey", lambda inv: nodes)
    use_machines(lambda host, timeouts=None: machines.setdefault(host.name, FakeMachine(host)))
    with pytest.raises(DifyopsError, match="cannot promote db3: cannot connect to db3; nothing "
                                           "was fenced"):
        db_ops.failover(inventory, "db3", out=lambda text: None)
    assert machines == {}                             # not even the old primary was touched


def test_wal_archive_gets_its_folder(load, base) -> None:
    base["db"]["wal_archive"] = True
    inventory = load(base)
    conf = db_files(inventory)[("db1", f"{CONFD}/difyops.conf")].content
    assert "archive_mode = on" in conf and "/var/lib/postgresql/15/archive/%f" in conf
    folder = next(s for s in steps_of(inventory, "db1")
                  if isinstance(s, RunCommand) and s.name.startswith("WAL archive"))
    assert folder.command == "install -d -o postgres -g postgres -m 0700 " \
                             "/var/lib/postgresql/15/archive"
