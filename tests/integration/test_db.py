"""db tier on real hosts: a primary and two streaming standbys, promotion, failover, rejoin.

db1 db2 db3 run PostgreSQL; dbapp is an application host (role dev_backend) that pg_hba admits.
The tests run in order and share the hosts: deploy, redeploy, pg_hba, stop the primary and
promote, finish the failover, refuse the unedited inventory, edit it, rejoin the old primary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tasks.core import shell, tls
from tests.integration.lab import Lab, LabHost
from tests.integration.support import release, summary_columns, until

ROOT = Path(__file__).resolve().parents[2]
DATA = "/var/lib/postgresql/15/main"
UNIT = "postgresql@15-main"


@dataclass
class DbLab:
    """The hosts, the inventory file and a way to run `inv` on it."""

    hosts: dict[str, LabHost]
    inventory: Path
    secrets: Path
    client_ready: threading.Event

    def inv(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "DIFY_INVENTORY": str(self.inventory),
               "DIFY_SECRETS": str(self.secrets)}
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                              capture_output=True, env=env, timeout=900, check=False)

    def secret(self, name: str) -> str:
        for line in self.secrets.read_text().splitlines():
            if line.startswith(f"{name}="):
                return line.split("=", 1)[1]
        raise KeyError(name)

    def query(self, host: str, query: str, database: str = "dify") -> tuple[int, str]:
        """A query as the postgres superuser on the host itself (docker exec, not the engine)."""
        code, out = self.hosts[host].exec(
            f"cd / && runuser -u postgres -- psql -XAtq -d {database} -c \"{query}\"")
        return code, out.strip()

    def sql(self, host: str, query: str, database: str = "dify") -> str:
        """The answer of a query that must succeed."""
        code, out = self.query(host, query, database)
        assert code == 0, f"{host}: {query}: {out}"
        return out

    def write_roles(self, roles: dict[str, list[str]]) -> None:
        data = yaml.safe_load(self.inventory.read_text())
        for entry in data["hosts"]:
            entry["roles"] = roles[entry["name"]]
        self.inventory.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def db(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DbLab]:
    hosts = dict(zip(["db1", "db2", "db3", "dbapp"],
                     lab.start(["db1", "db2", "db3", "dbapp"]), strict=True))
    folder = tmp_path_factory.mktemp("db")
    inventory = folder / "db-lab.yml"
    inventory.write_text(yaml.safe_dump({
        "name": "db-lab",
        "cache": {"mode": "standalone"},
        "vector": {"store": "pgvector"},
        "net": {"firewall": "off"},
        "hosts": [hosts["db1"].inventory_entry(["db_primary"]),
                  hosts["db2"].inventory_entry(["db_replica"]),
                  hosts["db3"].inventory_entry(["db_replica"], user="deploy"),
                  hosts["dbapp"].inventory_entry(["dev_backend", "cache"])],
    }, sort_keys=False))
    ready = threading.Event()

    def install_client() -> None:  # the app host's psql, while the db hosts deploy
        hosts["dbapp"].exec("DEBIAN_FRONTEND=noninteractive apt-get update -q && "
                            "apt-get install -y -q --no-install-recommends postgresql-client-15")
        ready.set()

    threading.Thread(target=install_client, daemon=True).start()
    yield DbLab(hosts, inventory, folder / "db-lab.env", ready)
    release(lab, hosts)


def test_deploy_streams_to_every_standby(db: DbLab) -> None:
    assert db.inv("config.secrets").returncode == 0
    first = db.inv("db.deploy")
    assert first.returncode == 0, first.stdout + first.stderr
    db.sql("db1", "CREATE TABLE probe (id int PRIMARY KEY, note text)")
    db.sql("db1", "INSERT INTO probe VALUES (1, 'written on the primary')")
    for standby in ("db2", "db3"):
        until(lambda s=standby: db.query(s, "SELECT note FROM probe WHERE id = 1")
              == (0, "written on the primary"), 30, f"row 1 on {standby}")
        code, _ = db.hosts[standby].exec(f"test -f {DATA}/standby.signal && "
                                         f"! test -e {DATA}/recovery.conf")
        assert code == 0, f"{standby} is not a PostgreSQL 12+ standby"
    streaming = db.sql("db1", "SELECT application_name, state FROM pg_stat_replication "
                              "ORDER BY 1", "postgres")
    assert streaming.splitlines() == ["db2|streaming", "db3|streaming"]
    slots = db.sql("db1", "SELECT slot_name, active FROM pg_replication_slots ORDER BY 1",
                   "postgres")
    assert slots.splitlines() == ["difyops_db2|t", "difyops_db3|t"]
    encrypted = db.sql("db1", "SELECT r.application_name, s.ssl FROM pg_stat_replication r "
                              "JOIN pg_stat_ssl s USING (pid) ORDER BY 1", "postgres")
    assert encrypted.splitlines() == ["db2|t", "db3|t"]  # replication over TLS (verify-full)
    replication, database = db.secret("DB_REPLICATION_PASSWORD"), db.secret("DB_PASSWORD")
    for name in ("db1", "db2", "db3"):
        _, processes = db.hosts[name].exec("ps -eo args")
        assert replication not in processes and database not in processes
        _, conf = db.hosts[name].exec("cat /etc/postgresql/15/main/conf.d/*.conf")
        assert replication not in conf
    assert replication not in first.stdout + first.stderr
    status = db.inv("db.status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "replication healthy" in status.stdout


def test_second_deploy_changes_nothing(db: DbLab) -> None:
    second = db.inv("db.deploy")
    assert second.returncode == 0, second.stdout + second.stderr
    assert summary_columns(second.stdout) == ["host", "unchanged"]


def test_pg_hba_admits_the_app_host_and_refuses_others(db: DbLab) -> None:
    assert db.client_ready.wait(300), "postgresql-client did not install on dbapp"
    address = db.hosts["db1"].address
    environment = {"PGPASSWORD": db.secret("DB_PASSWORD"), "PGCONNECT_TIMEOUT": "5"}

    def connect(host: str, **tls: str) -> tuple[int, str]:
        result = db.hosts[host]._wrapped().exec_run(
            ["psql", "-XAtq", "-h", address, "-U", "dify", "-d", "dify", "-c",
             "SELECT current_user || ' ' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"],
            environment=environment | tls)
        return result.exit_code, result.output.decode()

    ca = tls.authority(db.secret("INTERNAL_CA_KEY"), "db-lab")
    foreign = tls.authority("the secret of another installation", "db-lab")
    assert db.hosts["dbapp"].exec(shell.command("printf %s {} > /tmp/ca.crt && printf %s {} > "
                                                "/tmp/foreign.crt", ca, foreign))[0] == 0
    assert connect("dbapp", PGSSLMODE="verify-full", PGSSLROOTCERT="/tmp/ca.crt") == \
        (0, "dify true\n")
    code, answer = connect("dbapp", PGSSLMODE="disable")  # TLS only from other hosts
    assert code != 0 and "no encryption" in answer, answer
    code, answer = connect("dbapp", PGSSLMODE="verify-full", PGSSLROOTCERT="/tmp/foreign.crt")
    assert code != 0 and "certificate verify failed" in answer, answer
    code, answer = connect("db3")  # a standby: admitted for replication only
    assert code != 0
    assert f'no pg_hba.conf entry for host "{db.hosts["db3"].address}", user "dify", ' \
           f'database "dify"' in answer


def test_stopped_primary_then_promote(db: DbLab) -> None:
    db.sql("db1", "INSERT INTO probe SELECT g, 'before the stop' FROM generate_series(2, 500) g")
    committed = db.sql("db1", "SELECT count(*) FROM probe")
    db.hosts["db1"].exec(f"systemctl stop {UNIT}")
    status = db.inv("db.status")
    assert status.returncode == 1
    assert "db1: PostgreSQL is not running" in status.stderr
    started = time.monotonic()
    promoted = db.inv("db.promote", "--host", "db2")
    elapsed = time.monotonic() - started
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert "db2 promoted: accepts writes" in promoted.stdout
    assert db.sql("db2", "SELECT count(*) FROM probe") == committed
    db.sql("db2", "INSERT INTO probe VALUES (1000, 'written on the promoted standby')")
    assert elapsed < 30


def test_failover_fences_the_old_primary_and_repoints(db: DbLab) -> None:
    failover = db.inv("db.failover", "--host", "db2")
    assert failover.returncode == 0, failover.stdout + failover.stderr
    out = failover.stdout
    assert "db1: fenced" in out
    assert "-  - db_primary\n+  - db_replica" in out and "-  - db_replica\n+  - db_primary" in out
    code, state = db.hosts["db1"].exec(f"systemctl is-enabled {UNIT}; test -f {DATA}/"
                                       f"standby.signal && echo signal")
    assert state.split() == ["masked", "signal"]
    code, answer = db.hosts["db1"].exec(f"systemctl start {UNIT}")  # the old primary comes back?
    assert code != 0 and "masked" in answer
    assert db.sql("db3", "SELECT sender_host FROM pg_stat_wal_receiver", "postgres") == \
        db.hosts["db2"].address
    db.sql("db2", "INSERT INTO probe VALUES (1001, 'after the failover')")
    until(lambda: db.sql("db3", "SELECT count(*) FROM probe WHERE id = 1001") == "1", 30,
          "row 1001 on db3")


def test_deploy_refuses_the_unedited_inventory(db: DbLab) -> None:
    refused = db.inv("db.deploy")
    assert refused.returncode == 1
    assert "db1: fenced (fenced by db.failover at" in refused.stdout
    assert "yet the inventory still names it db_primary" in refused.stdout
    assert "changed" not in summary_columns(refused.stdout)   # nothing was touched
    _, state = db.hosts["db1"].exec(f"systemctl is-enabled {UNIT}; systemctl is-active {UNIT}")
    assert state.split() == ["masked", "inactive"]
    assert db.sql("db3", "SELECT sender_host FROM pg_stat_wal_receiver", "postgres") == \
        db.hosts["db2"].address


def test_after_the_edit_the_old_primary_rejoins_as_a_standby(db: DbLab) -> None:
    db.write_roles({"db1": ["db_replica"], "db2": ["db_primary"], "db3": ["db_replica"],
                    "dbapp": ["dev_backend", "cache"]})
    rejoin = db.inv("db.deploy")
    assert rejoin.returncode == 0, rejoin.stdout + rejoin.stderr
    assert "[db] db1: clone from db2 (pg_basebackup) ... changed" in rejoin.stdout
    assert db.sql("db1", "SELECT sender_host FROM pg_stat_wal_receiver", "postgres") == \
        db.hosts["db2"].address
    _, kept = db.hosts["db1"].exec("ls -d /var/lib/postgresql/15/main.before-clone-*")
    assert kept.strip()  # the old primary's data directory is kept, not deleted
    db.sql("db2", "INSERT INTO probe VALUES (1002, 'after the rejoin')")
    for standby in ("db1", "db3"):
        until(lambda s=standby: db.sql(s, "SELECT count(*) FROM probe WHERE id >= 1000") == "3",
              30, f"rows 1000-1002 on {standby}")
    status = db.inv("db.status")
    assert status.returncode == 0, status.stdout + status.stderr
    again = db.inv("db.deploy")
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary_columns(again.stdout) == ["host", "unchanged"]


def test_switchover_of_a_healthy_primary_loses_nothing(db: DbLab) -> None:
    db.sql("db2", "INSERT INTO probe SELECT g, 'before the switchover' "
                  "FROM generate_series(2000, 2999) g")
    committed = db.sql("db2", "SELECT count(*) FROM probe")
    switchover = db.inv("db.failover")  # no --host: the standby that received the most WAL
    assert switchover.returncode == 0, switchover.stdout + switchover.stderr
    assert "db2 still accepts writes: stopping it first" in switchover.stdout
    new = next(name for name in ("db1", "db3") if f"{name} promoted: accepts writes"
               in switchover.stdout)
    other = "db3" if new == "db1" else "db1"
    assert db.sql(new, "SELECT count(*) FROM probe") == committed
    assert db.sql(other, "SELECT sender_host FROM pg_stat_wal_receiver", "postgres") == \
        db.hosts[new].address
    _, state = db.hosts["db2"].exec(f"systemctl is-enabled {UNIT}; systemctl is-active {UNIT}")
    assert state.split() == ["masked", "inactive"]
