"""deploy.doctor on a real host: PostgreSQL and Redis deployed by the real tasks on dr1, then
stopped, broken and repaired behind doctor's back.

The alert webhook is a small HTTP server in this test process: doctor posts from the control
machine (where `inv` runs), so loopback reaches it. The tests run in order and share the host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tasks.tiers.cache import HELPER as REDIS_HELPER
from tests.integration.lab import Lab, LabHost
from tests.integration.support import release, summary_columns, until

ROOT = Path(__file__).resolve().parents[2]
NAME = "doctor-lab"
HISTORY = ROOT / ".difyops" / "doctor" / f"{NAME}.json"
LOCK = ROOT / ".difyops" / "locks" / f"{NAME}.lock"
BAD_LINE = "difyops-doctor-test-not-a-directive yes"


@dataclass
class DoctorLab:
    host: LabHost
    inventory: Path
    secrets: Path
    posts: list[dict] = field(default_factory=list)

    def inv(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "DIFY_INVENTORY": str(self.inventory),
               "DIFY_SECRETS": str(self.secrets)}
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                              capture_output=True, env=env, timeout=900, check=False)

    def doctor(self, *flags: str) -> subprocess.CompletedProcess:
        return self.inv("deploy.doctor", "--only", "db,cache", *flags)

    def redis_answers(self) -> bool:
        code, out = self.host.exec(f"{REDIS_HELPER} cli -p 6379 ping")
        return code == 0 and "PONG" in out

    def postgres_answers(self) -> bool:
        return self.host.exec("pg_isready -q -h 127.0.0.1 -p 5432")[0] == 0

    def starts_of(self, unit: str) -> int:
        """How often systemd tried to start the unit (its journal)."""
        _, out = self.host.exec(f"journalctl -u {unit} --no-pager -o cat | "
                                f"grep -c '^Starting' || true")
        return int(out.strip().splitlines()[-1])


class Sink(BaseHTTPRequestHandler):
    """Keeps every JSON body POSTed to it."""

    posts: list[dict]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.posts.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def doc(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoctorLab]:
    posts: list[dict] = []
    handler = type("Handler", (Sink,), {"posts": posts})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (host,) = lab.start(["dr1"])
    folder = tmp_path_factory.mktemp("doctor")
    inventory = folder / f"{NAME}.yml"
    inventory.write_text(yaml.safe_dump({
        "name": NAME, "cache": {"mode": "standalone"}, "vector": {"store": "pgvector"},
        "monitor": {"alert_webhook": f"http://127.0.0.1:{server.server_port}/doctor"},
        "doctor": {"max_restarts": 2, "window": 3600},
        # dev_backend only satisfies the inventory rules: doctor looks at db and cache here.
        "hosts": [host.inventory_entry(["db_primary", "cache", "dev_backend"])],
    }, sort_keys=False))
    HISTORY.unlink(missing_ok=True)  # a previous run's restarts are not this run's
    made = DoctorLab(host, inventory, folder / f"{NAME}.env", posts)
    assert made.inv("config.secrets").returncode == 0
    for tier in ("db", "cache"):  # one by one: Invoke would dedupe two `deploy` tasks in one call
        deployed = made.inv(f"{tier}.deploy")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    yield made
    server.shutdown()
    HISTORY.unlink(missing_ok=True)
    LOCK.unlink(missing_ok=True)
    release(lab, {"dr1": host})


def test_all_healthy_exits_zero_and_posts_nothing(doc: DoctorLab) -> None:
    result = doc.doctor()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "component(s) healthy" in result.stdout
    assert doc.posts == []
    assert not HISTORY.exists()


@dataclass
class Visit:
    """One doctor run of the story and the webhook posts it made."""

    result: subprocess.CompletedProcess
    posts: list[dict]


def _visit(doc: DoctorLab) -> Visit:
    """A doctor run with the posts it made (and only those)."""
    doc.posts.clear()
    result = doc.doctor()
    return Visit(result, list(doc.posts))


@pytest.fixture(scope="module")
def restarted(doc: DoctorLab) -> Visit:
    """Redis and PostgreSQL stopped behind doctor's back; a doctor refused by a deploy's lock
    and a dry doctor first (both must leave them stopped), then the doctor that restarts them."""
    doc.host.exec("systemctl stop redis-server postgresql@15-main")
    assert not doc.redis_answers() and not doc.postgres_answers()
    # A deploy holds the lock (taken on another machine): doctor touches nothing.
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    LOCK.write_text(json.dumps({"user": "ci", "machine": "elsewhere", "pid": 1,
                                "since": "2026-01-01T00:00:00+00:00", "command": "deploy.all"}))
    try:
        locked = doc.doctor()
    finally:
        LOCK.unlink()
    assert locked.returncode == 75, locked.stdout + locked.stderr
    assert "ci on elsewhere" in locked.stderr and "nothing was checked" in locked.stderr
    dry = doc.doctor("--dry")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert "would restart redis-server" in dry.stdout
    assert "would restart postgresql@15-main" in dry.stdout
    assert not doc.redis_answers() and doc.posts == [] and not HISTORY.exists()
    return _visit(doc)


def test_stopped_services_are_restarted_once_and_reported(doc: DoctorLab,
                                                          restarted: Visit) -> None:
    result = restarted.result
    assert result.returncode == 0, result.stdout + result.stderr
    assert doc.redis_answers() and doc.postgres_answers()
    assert "redis on :6379 healthy again after restarting redis-server" in result.stdout
    # db first, then cache: the tiers' order
    assert result.stdout.index("restarting postgresql@15-main") < \
        result.stdout.index("restarting redis-server")
    (post,) = restarted.posts
    did = {(f["host"], f["component"], f["state"], f["restart"])
           for f in post["difyops"]["did"]}
    assert did == {("dr1", "postgresql on :5432", "restarted", "postgresql@15-main"),
                   ("dr1", "redis on :6379", "restarted", "redis-server"),
                   # no restart of its own: it came back with the PostgreSQL restart
                   ("dr1", "primary accepts writes", "recovered", "")}
    assert post["difyops"]["needs_person"] == []
    assert "restarted redis-server on dr1" in post["text"]
    # The restarts changed nothing a deploy manages.
    for tier in ("db", "cache"):
        again = doc.inv(f"{tier}.deploy")
        assert again.returncode == 0, again.stdout + again.stderr
        assert summary_columns(again.stdout) == ["host", "unchanged"], again.stdout


@pytest.fixture(scope="module")
def broken(doc: DoctorLab, restarted: Visit) -> Visit:
    """After one restart of redis-server (of two allowed): a redis.conf it cannot start with,
    Redis stopped, and doctor run."""
    doc.host.exec(f"echo '{BAD_LINE}' >> /etc/redis/redis.conf && systemctl stop redis-server")
    assert not doc.redis_answers()
    return _visit(doc)


def test_a_redis_that_cannot_start_needs_a_person(doc: DoctorLab, broken: Visit) -> None:
    result = broken.result
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("; restarting redis-server (") == 1  # tried once
    assert "restarting redis-server (restart 2 of 2" in result.stdout
    assert "needs a person: restarting redis-server failed" in result.stdout
    assert "redis on :6379 on dr1" in result.stderr
    assert not doc.redis_answers()
    (post,) = broken.posts
    assert [(f["host"], f["component"]) for f in post["difyops"]["needs_person"]] == [
        ("dr1", "redis on :6379")]
    assert post["status"] == "firing"


@pytest.fixture(scope="module")
def beyond(doc: DoctorLab, broken: Visit) -> tuple[Visit, int]:
    """Once systemd gave the broken Redis up: doctor run again (with the unit's start count
    before it)."""
    # Debian's unit restarts Redis itself (Restart=always) until systemd's start limit stops it.
    until(lambda: doc.host.exec("systemctl is-failed --quiet redis-server")[0] == 0, 60,
          "redis-server given up by systemd")
    starts = doc.starts_of("redis-server")
    return _visit(doc), starts


def test_beyond_the_limit_doctor_no_longer_restarts(doc: DoctorLab,
                                                    beyond: tuple[Visit, int]) -> None:
    visit, starts = beyond
    result = visit.result
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not restarted: redis-server was restarted 2 time(s) within 3600 s" in result.stdout
    assert doc.starts_of("redis-server") == starts
    assert len(json.loads(HISTORY.read_text())["dr1/redis-server"]) == 2
    assert [f["component"] for f in visit.posts[0]["difyops"]["needs_person"]] == [
        "redis on :6379"]


def test_repaired_by_a_person_all_healthy_again(doc: DoctorLab,
                                                beyond: tuple[Visit, int]) -> None:
    doc.host.exec(f"sed -i '/^{BAD_LINE}$/d' /etc/redis/redis.conf && "
                  f"systemctl reset-failed redis-server; systemctl start redis-server")
    until(doc.redis_answers, 30, "redis answers after the repair")
    visit = _visit(doc)
    assert visit.result.returncode == 0, visit.result.stdout + visit.result.stderr
    assert visit.posts == []


def test_an_unreachable_host_is_reported_not_acted_on(doc: DoctorLab) -> None:
    doc.posts.clear()
    doc.host.exec("systemctl stop ssh")
    until(lambda: socket.socket().connect_ex((doc.host.address, 22)) != 0, 30, "ssh down")
    try:
        result = doc.doctor()
    finally:
        doc.host.exec("systemctl start ssh")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "host unreachable, not acted on" in result.stdout
    assert [(f["host"], f["component"]) for f in doc.posts[0]["difyops"]["needs_person"]] == [
        ("dr1", "(host)")]
