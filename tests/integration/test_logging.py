"""The logging tier for real: rsyslog on lab hosts shipping to a secured store deployed by compose.

Elasticsearch and Kibana cannot be pulled here: stand-ins (tests/images/logging_standin.py) that
honour the contract the tier uses (basic auth on every endpoint, the security API, _bulk as
omelasticsearch sends it, _search/_count) run on logs1, a host with its own Docker engine. They
reach it the way an operator's images would: `inv images.sync` over SSH. rsyslog is the real one
from the Debian packages, on logs1 and on ship1. Everything is deployed by the real
`inv logging.deploy`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from dotenv import dotenv_values

from tasks.core import tls
from tasks.tiers import logging as tier
from tests.images import logging_standin, standin
from tests.integration.lab import Lab, LabHost, ensure_base_image
from tests.integration.support import eventually, release

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {"elasticsearch": f"{standin.PREFIX}elasticsearch:8.15.3",
          "kibana": f"{standin.PREFIX}kibana:8.15.3"}
WRITER = "difyops_logs_writer"


class Logging:
    """This module's lab: hosts, inventory, secrets and helpers."""

    def __init__(self, store: LabHost, shipper: LabHost, folder: Path) -> None:
        self.store, self.shipper = store, shipper
        self.inventory = folder / "logging-lab.yml"
        self.secrets_file = folder / "logging-lab.env"
        self.env = {"DIFY_INVENTORY": str(self.inventory), "DIFY_SECRETS": str(self.secrets_file)}
        self.write()

    def write(self, **logging: Any) -> None:
        settings = {"allow_mmap": False,  # the lab hosts share this machine's kernel
                    "heap": "256m", "es_memory": "512m", "kibana_memory": "256m",
                    "health_timeout": 120, **logging}
        self.inventory.write_text(yaml.safe_dump({
            "name": "logging-lab",
            "dify": {"registry_mirror": standin.PREFIX},
            "dev": {"dify_source": "/srv/dify"},  # ship1 stands for a (home-lab) app host
            "cache": {"mode": "standalone"},
            "vector": {"store": "pgvector"},
            "logging": settings,
            "net": {"firewall": "off"},
            "hosts": [self.store.inventory_entry(["logging"]),
                      self.shipper.inventory_entry(["db_primary", "cache", "dev_backend"],
                                                   user="deploy")],
        }, sort_keys=False))

    def inv(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                              capture_output=True, env={**os.environ, **self.env}, timeout=600,
                              check=False)

    def ok(self, *args: str) -> subprocess.CompletedProcess:
        result = self.inv(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def secret(self, name: str) -> str:
        return dotenv_values(self.secrets_file)[name] or ""

    @property
    def ca_file(self) -> str:
        """The installation's CA certificate, to verify the store with (tls.internal)."""
        path = self.inventory.with_name("ca.crt")
        path.write_text(tls.authority(self.secret("INTERNAL_CA_KEY"), "logging-lab"))
        return str(path)

    def es(self, path: str, user: str | None = "elastic", password: str | None = None,
           method: str = "GET", **kwargs: Any) -> requests.Response:
        """A request to the store from this machine, as the tier's users make them."""
        auth = None
        if user:
            auth = (user, password if password is not None else
                    self.secret("ELASTIC_PASSWORD" if user == "elastic" else
                                "LOGS_WRITER_PASSWORD"))
        return requests.request(method, f"https://{self.store.address}:9200{path}", auth=auth,
                                timeout=10, verify=self.ca_file, **kwargs)

    def found(self, text: str) -> list[dict]:
        """Documents whose message holds text (searched as elastic)."""
        answer = self.es("/dify-logs-*/_search", json={"query": {"match_phrase":
                                                                 {"message": text}}})
        answer.raise_for_status()
        return [hit["_source"] for hit in answer.json()["hits"]["hits"]]


def summary(result: subprocess.CompletedProcess) -> dict[str, dict[str, int]]:
    """The per-host summary table at the end of a deploy: host -> {status: count}."""
    header, *lines = result.stdout.split("summary:")[1].strip().splitlines()
    names = header.replace("would change", "would_change").replace("not run", "not_run").split()
    return {line.split()[0]: dict(zip(names[1:], map(int, line.split()[1:len(names)]),
                                      strict=True)) for line in lines}


@pytest.fixture(scope="module")
def lab_logging(lab: Lab, tmp_path_factory) -> Any:
    """logs1 (Docker, the store) and ship1 (plain), the stand-in images shipped to logs1."""
    logging_standin.ensure_images(lab.client, ensure_base_image(lab.client), IMAGES)
    started: dict[str, LabHost] = {}
    try:
        started["logs1"] = lab.start(["logs1"], docker=True)[0]
        started["ship1"] = lab.start(["ship1"])[0]
        env = Logging(started["logs1"], started["ship1"], tmp_path_factory.mktemp("logging"))
        env.ok("config.secrets")
        synced = env.ok("images.sync")
        assert all(image in synced.stdout for image in IMAGES.values()), synced.stdout
        yield env
    finally:
        release(lab, started)


def test_deploy_ships_the_journal_to_a_secured_store(lab_logging: Logging) -> None:
    env = lab_logging
    dry = env.ok("logging.deploy", "--dry")
    assert "would change" in dry.stdout
    assert env.shipper.exec("dpkg -s rsyslog-elasticsearch")[0] != 0  # the dry run installed none
    first = env.ok("logging.deploy")
    assert "set users and roles (log writer, kibana_system)" in first.stdout

    # Security: nothing without a password, nothing with a wrong one; the writer only writes.
    assert env.es("/", user=None).status_code == 401
    assert env.es("/_cluster/health", user="elastic", password="wrong-password").status_code == 401
    health = env.es("/_cluster/health")
    assert health.status_code == 200 and health.json()["status"] in ("green", "yellow")
    assert env.es("/dify-logs-*/_search", user=WRITER).status_code == 403
    assert env.es(f"/_security/user/{WRITER}", method="PUT", user=WRITER,
                  json={"password": "x" * 20, "roles": ["superuser"]}).status_code == 403

    # A line logged on ship1 reaches the store through the journal, rsyslog and the writer.
    marker = f"difyops-logging-{uuid.uuid4().hex}"
    code, out = env.shipper.exec(f"logger -t difyops-test {marker}")
    assert code == 0, out
    docs = eventually(f"{marker} in the store", lambda: env.found(marker), timeout=60)
    assert len(docs) == 1
    assert (docs[0]["host"], docs[0]["program"], docs[0]["source"]) == \
        ("ship1", "difyops-test", "journal")
    assert docs[0]["message"] == marker
    # The store's own containers' logs arrive too (imfile on logs1, where Docker runs).
    eventually("docker logs of logs1 in the store", lambda: env.es(
        "/dify-logs-*/_count", json={"query": {"term": {"source": "docker"}}}).json()["count"])

    # Kibana logs in as kibana_system with its own password.
    code, out = env.store.exec(f"curl -s -o /dev/null -w '%{{http_code}}' "
                               f"http://{env.store.address}:5601/")
    assert out.strip() == "302", out

    # The password file of the shipper is not readable by others.
    code, out = env.shipper.exec("stat -c '%a %U' /etc/rsyslog.d/60-difyops-elasticsearch.conf")
    assert out.strip() == "600 root", out

    second = env.ok("logging.deploy")
    assert {host: set(counts) for host, counts in summary(second).items()} == \
        {"logs1": {"unchanged"}, "ship1": {"unchanged"}}, second.stdout


def test_ports_are_published_on_the_private_address_only(lab_logging: Logging) -> None:
    env = lab_logging
    _, out = env.store.exec("ss -Hltn")
    listening = {line.split()[3] for line in out.splitlines()}
    for port in (9200, 5601):
        assert f"{env.store.address}:{port}" in listening, out
        assert not {f"0.0.0.0:{port}", f"*:{port}", f"[::]:{port}"} & listening, out
    _, out = env.store.exec("curl -sk -o /dev/null -w '%{http_code}' https://127.0.0.1:9200/")
    assert out.strip() == "000", out  # nothing answers on loopback
    _, out = env.shipper.exec(
        f"timeout 5 bash -c 'exec 3<>/dev/tcp/{env.store.address}/9200' && echo open")
    assert out.strip() == "open", out  # ...but the other hosts reach the private address


def test_the_store_serves_https_only_with_the_installations_certificate(
        lab_logging: Logging) -> None:
    """tls.internal: plain http gets no answer, a client without the CA refuses the store, and
    the certificate the shippers verify names the store's address."""
    env = lab_logging
    url = f"https://{env.store.address}:9200/_security/_authenticate"
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, auth=("elastic", env.secret("ELASTIC_PASSWORD")), timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url.replace("https", "http"), timeout=10)
    answer = env.es("/_security/_authenticate")
    assert answer.status_code == 200 and answer.json()["username"] == "elastic", answer.text
    code, out = env.shipper.exec(
        f"openssl s_client -connect {env.store.address}:9200 -CAfile {tls.HOST_CA} "
        f"-verify_ip {env.store.address} -verify_return_error </dev/null")
    assert code == 0 and "Verify return code: 0 (ok)" in out, out


def test_status_reports_store_and_shippers(lab_logging: Logging) -> None:
    env = lab_logging
    status = env.ok("logging.status")
    store_row = next(line.split() for line in status.stdout.splitlines()
                     if line.startswith("logs1") and "green" in line)
    assert int(store_row[3]) >= 1 and int(store_row[4]) >= 1  # indices, documents
    assert store_row[5].startswith("20")  # the newest document's time
    ship_row = next(line.split() for line in status.stdout.splitlines()
                    if line.startswith("ship1") and "active" in line)
    assert ship_row[-1] == "yes"  # the store is reachable from ship1


def queued(env: Logging) -> int:
    """Messages in ship1's queue for the store, from rsyslog's own counters."""
    stats = tier.parse_stats(env.shipper.exec(f"tail -n 50 {tier.STATS_FILE}")[1])
    return int(stats["difyops-es queue"]["size"])


@contextmanager
def store_stopped(env: Logging) -> Iterator[None]:
    """Elasticsearch stopped on logs1 for the block, started again after it whatever happens."""
    container = "dify-logging-elasticsearch-1"
    code, out = env.store.exec(f"docker stop {container}")
    assert code == 0, out
    try:
        yield
    finally:
        code, out = env.store.exec(f"docker start {container}")
        assert code == 0, out


def test_lines_logged_while_the_store_is_down_arrive_later(lab_logging: Logging) -> None:
    env = lab_logging
    with store_stopped(env):
        marker = f"difyops-while-down-{uuid.uuid4().hex}"
        code, out = env.shipper.exec(f"logger -t difyops-test {marker}")
        assert code == 0, out
        down = env.inv("logging.status")
        assert down.returncode == 1, down.stdout
        # The store, and its shippers (logs1 ships too): the store is unreachable for them.
        assert "logs1 (store), logs1, ship1" in down.stderr, down.stderr
        # rsyslog holds the lines meanwhile (its own counters say so).
        eventually("lines waiting in ship1's queue", lambda: queued(env) > 0, timeout=40)
    docs = eventually(f"{marker} in the store after its restart", lambda: env.found(marker),
                      timeout=90)
    assert len(docs) == 1 and docs[0]["host"] == "ship1"


def test_queued_lines_survive_a_restart_of_rsyslog(lab_logging: Logging) -> None:
    """What waits in the queue is saved to disk at shutdown and read back at start. (Not the
    batch the suspended action holds in its hands: `first` may be in it and is not asserted;
    `behind` is logged once the action is suspended and lines wait in the queue.)"""
    env = lab_logging
    with store_stopped(env):
        def more_waiting() -> bool:  # a line more each time: the first ones may be in flight
            env.shipper.exec(f"logger -t difyops-test difyops-first-{uuid.uuid4().hex}")
            return queued(env) > 0

        eventually("lines waiting in ship1's queue", more_waiting, timeout=40)
        behind = f"difyops-behind-{uuid.uuid4().hex}"
        before = queued(env)
        code, out = env.shipper.exec(f"logger -t difyops-test {behind}")
        assert code == 0, out
        eventually("the second line queued", lambda: queued(env) > before, timeout=40)
        code, out = env.shipper.exec("systemctl restart rsyslog")
        assert code == 0, out
        code, out = env.shipper.exec(f"ls {tier.SPOOL}/{tier.QUEUE}.qi")
        assert code == 0, out  # the queue's state on disk
    docs = eventually(f"{behind} in the store after the restarts", lambda: env.found(behind),
                      timeout=90)
    assert len(docs) == 1 and docs[0]["host"] == "ship1"


def test_a_configuration_rsyslogd_refuses_is_not_installed(lab_logging: Logging) -> None:
    env = lab_logging
    live = "/etc/rsyslog.d/60-difyops-elasticsearch.conf"
    _, before = env.shipper.exec(f"sha256sum {live}")
    # Another file of the host's configuration is broken: the new file cannot be checked good.
    env.shipper.exec("echo 'this is not rsyslog' > /etc/rsyslog.d/50-broken.conf")
    try:
        env.write(queue_max_disk="2g")
        refused = env.inv("logging.deploy")
        assert refused.returncode == 1
        assert "rsyslogd -N1 refused the new configuration" in refused.stdout, refused.stdout
        assert env.shipper.exec(f"sha256sum {live}")[1] == before  # the running one stays
        assert env.shipper.exec("systemctl is-active rsyslog")[1].strip() == "active"
    finally:
        env.shipper.exec("rm -f /etc/rsyslog.d/50-broken.conf")
    fixed = env.ok("logging.deploy")
    assert "check the rsyslog configuration (rsyslogd -N1) and install it ... changed" in \
        fixed.stdout
    assert 'queue.maxDiskSpace="2g"' in env.shipper.exec(f"cat {live}")[1]
    env.write()
    env.ok("logging.deploy")
