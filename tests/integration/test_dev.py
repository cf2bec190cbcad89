"""The home-lab layout on three container hosts, deployed by the real `inv dev.*` tasks over SSH.

home-server runs PostgreSQL and Redis (dev.server); ubuntu-vm runs the api and worker of a
Dify-shaped project (tests/fixtures/dify_api_shaped, copied onto it) with uv, flask --debug and
Celery (dev.backend); workstation runs the web dev server with pnpm (dev.frontend, Linux variant).
The vector store is pgvector (nothing to run on a vector host: Weaviate's image is not available
here), and the home server has no monitor role (the monitor tier is tested on its own).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from dotenv import dotenv_values

from tasks.core.profiles import load_profile
from tests.integration.lab import Lab, LabHost

ROOT = Path(__file__).resolve().parents[2]
# The home server's vector store is not deployed here: pgvector has no Debian 12 package and the
# Weaviate image cannot be obtained (tests/integration/test_vector.py covers both as far as this
# machine allows). PostgreSQL and Redis, which the backend needs, are deployed for real.
COMMANDS = {"dev.server": ("dev.server", "--only", "db,cache")}
FIXTURE = ROOT / "tests" / "fixtures" / "dify_api_shaped"
CHECKOUT = "/home/deploy/dify"
API = f"{CHECKOUT}/api"
UNITS = ("dify-api-dev.service", "dify-worker-dev.service")
WEB_UNIT = "dify-web-dev.service"
VERSION = "1.14.2"
PROFILE = load_profile(VERSION)


def wait_until(what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll until probe() returns something truthy; fail with the last answer at the deadline."""
    deadline = time.monotonic() + timeout
    answer = None
    while time.monotonic() < deadline:
        try:
            answer = probe()
        except requests.RequestException as exc:
            answer = exc
        if answer and not isinstance(answer, Exception):
            return answer
        time.sleep(0.5)
    pytest.fail(f"{what}: not true after {timeout} s; last answer: {answer!r}")


def copy_checkout(host: LabHost) -> None:
    """Put the Dify-shaped project at CHECKOUT on the host, owned by the user deploy."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(FIXTURE, arcname="dify", filter=lambda info: None if any(
            part in ("__pycache__", ".venv", "node_modules") for part in
            Path(info.name).parts) else info)
    host.container.get_wrapped_container().put_archive("/home/deploy", buffer.getvalue())
    code, out = host.exec(f"chown -R deploy:deploy {CHECKOUT}")
    assert code == 0, out


class Lab3:
    """The three hosts, the inventory and a way to run `inv` against it."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.server, self.vm, self.workstation = lab.start(
            ["home-server", "ubuntu-vm", "workstation"])
        subnet = lab.client.networks.get(lab.network_name).attrs["IPAM"]["Config"][0]["Subnet"]
        self.inventory = {
            "name": "devlab",
            "dify": {"version": VERSION},
            "cache": {"mode": "standalone"},
            "vector": {"store": "pgvector"},
            "dev": {"network": subnet, "dify_source": CHECKOUT},
            "hosts": [self.server.inventory_entry(["dev_server", "db_primary", "cache"]),
                      self.vm.inventory_entry(["dev_backend"], user="deploy"),
                      self.workstation.inventory_entry(["dev_frontend"], user="deploy")],
        }
        self.path = tmp / "devlab.yml"
        self.path.write_text(yaml.safe_dump(self.inventory, sort_keys=False))
        # The front end's operator (on the workstation) keeps a copy of the inventory under its
        # own name: its deploy lock is its own, so its first deploy overlaps the VM's.
        self.web_path = tmp / "devlab-web.yml"
        self.web_path.write_text(yaml.safe_dump({**self.inventory, "name": "devlab-web"},
                                                sort_keys=False))
        self.secrets_file = tmp / "devlab.env"
        self.runs: dict[str, subprocess.CompletedProcess] = {}
        self.timings: list[tuple[str, float]] = []

    def inv(self, *args: str, inventory: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "DIFY_INVENTORY": str(inventory or self.path),
               "DIFY_SECRETS": str(self.secrets_file)}
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                                capture_output=True, env=env, timeout=900, check=False)
        self.timings.append((" ".join(args), time.monotonic() - started))
        return result

    def deploy(self, task: str, inventory: Path | None = None) -> subprocess.CompletedProcess:
        result = self.inv(*COMMANDS.get(task, (task,)), inventory=inventory)
        assert result.returncode == 0, f"{task} failed:\n{result.stdout}\n{result.stderr}"
        return result

    @property
    def secrets(self) -> dict[str, str]:
        return {k: v or "" for k, v in dotenv_values(self.secrets_file).items()}

    def api_url(self, path: str) -> str:
        return f"http://{self.vm.address}:5001{path}"


def summary(result: subprocess.CompletedProcess) -> list[list[str]]:
    """The per-host summary table of a run: header then one row per host."""
    table = result.stdout.split("summary:\n")[1].split("\n\n")[0]
    return [line.split() for line in table.splitlines()]


def unit_starts(host: LabHost, *units: str) -> list[str]:
    """When each unit last entered the active state (changes on every restart)."""
    _, out = host.exec("systemctl show -p ActiveEnterTimestampMonotonic --value "
                       + " ".join(units))
    return out.split()


@pytest.fixture(scope="module")
def devlab(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab3]:
    """The home lab deployed once: secrets, dev.server, dev.backend, dev.frontend."""
    setup = Lab3(lab, tmp_path_factory.mktemp("devlab"))
    copy_checkout(setup.vm)
    copy_checkout(setup.workstation)
    assert setup.inv("config.secrets").returncode == 0
    with ThreadPoolExecutor(max_workers=1) as pool:  # the front end needs nothing of the others
        web = pool.submit(setup.deploy, "dev.frontend", setup.web_path)
        for task in ("dev.server", "dev.backend"):
            setup.runs[task] = setup.deploy(task)
        setup.runs["dev.frontend"] = web.result()
    yield setup
    print("\ntest_dev timings: " + ", ".join(f"{what} {seconds:.1f} s"
                                            for what, seconds in setup.timings))


def test_dev_server_runs_the_base_services_for_the_lab(devlab: Lab3) -> None:
    out = devlab.runs["dev.server"].stdout
    assert "applying db, cache on inventory devlab" in out  # base tiers, home server only
    rows = [row[0] for row in summary(devlab.runs["dev.server"])[1:]]
    assert rows == ["home-server"]
    # the connection details follow, without secrets
    assert f"{devlab.server.address}:5432" in out and "password DB_PASSWORD in " in out
    assert devlab.secrets["DB_PASSWORD"] not in out
    _, hba = devlab.server.exec("cat /etc/postgresql/15/main/pg_hba.conf")
    assert f"dify,dify_plugin    dify        {devlab.vm.address}/32" in hba, hba
    _, listening = devlab.server.exec("ss -ltn")
    assert f"{devlab.server.address}:5432" in listening
    assert f"{devlab.server.address}:6379" in listening
    # an address pg_hba does not name (here the server's own LAN address) is refused
    code, out = devlab.server.exec(f"PGPASSWORD={devlab.secrets['DB_PASSWORD']} psql -h "
                                   f"{devlab.server.address} -U dify -d dify -c 'select 1'")
    assert code != 0 and "no pg_hba.conf entry" in out, out


def test_backend_env_points_at_the_home_server(devlab: Lab3) -> None:
    code, out = devlab.vm.exec(f"stat -c '%a %U' {API}/.env && cat {API}/.env")
    assert code == 0, out
    mode_owner, _, text = out.partition("\n")
    assert mode_owner == "600 deploy"
    env = dotenv_values(stream=io.StringIO(text))
    server, secrets = devlab.server.address, devlab.secrets
    assert env["DB_HOST"] == server and env["DB_PORT"] == "5432"
    assert env["DB_USERNAME"] == "dify" and env["DB_DATABASE"] == "dify"
    assert env["DB_PASSWORD"] == secrets["DB_PASSWORD"]
    assert env["REDIS_HOST"] == server and env["REDIS_PASSWORD"] == secrets["REDIS_PASSWORD"]
    assert env["CELERY_BROKER_URL"] == f"redis://:{secrets['REDIS_PASSWORD']}@{server}:6379/1"
    assert env["SECRET_KEY"] == secrets["SECRET_KEY"]
    assert env["PLUGIN_DAEMON_KEY"] == secrets["PLUGIN_DAEMON_KEY"]
    assert env["VECTOR_STORE"] == "pgvector" and env["PGVECTOR_HOST"] == server
    assert env["STORAGE_TYPE"] == "opendal" and env["OPENDAL_FS_ROOT"] == "storage"
    assert env["CONSOLE_API_URL"] == f"http://{devlab.vm.address}:5001"
    assert env["CONSOLE_WEB_URL"] == f"http://{devlab.workstation.address}:3000"
    assert env["DEPLOY_ENV"] == "DEVELOPMENT" and env["SSRF_PROXY_HTTP_URL"] == ""
    assert "SANDBOX_API_KEY" not in env  # compose-only keys stay out


def test_backend_installed_with_uv_and_migrated_the_home_database(devlab: Lab3) -> None:
    code, out = devlab.vm.exec(f"/usr/local/bin/uv --version && stat -c %U {API}/.venv "
                               f"&& test -f {API}/uv.lock")
    assert code == 0, out
    assert out.split()[-1] == "deploy"
    code, out = devlab.server.exec(
        "runuser -u postgres -- psql -d dify -tAc "
        "\"select version_num from alembic_version; select tableowner from pg_tables "
        "where tablename = 'dify_setups'\"")
    assert code == 0, out
    assert out.split() == ["0001", "dify"]


def test_api_answers_through_the_real_database_and_redis(devlab: Lab3) -> None:
    health = requests.get(devlab.api_url("/health"), timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    setup = requests.get(devlab.api_url("/console/api/setup"), timeout=10)
    assert setup.json() == {"step": "not_started"}
    _, out = devlab.vm.exec("systemctl show -p User --value dify-api-dev; "
                               "journalctl -u dify-api-dev --no-pager | grep -c 'Debugger is "
                               "active'")
    assert out.split()[0] == "deploy" and int(out.split()[1]) >= 1, out  # flask --debug


def test_worker_consumes_every_queue_of_the_version(devlab: Lab3) -> None:
    code, out = devlab.vm.exec(f"cd {API} && runuser -u deploy -- /usr/local/bin/uv run "
                               f"--no-sync celery -A {PROFILE.celery_app} inspect "
                               "active_queues --json -t 10")
    assert code == 0, out
    replies = json.loads(out.strip().splitlines()[-1])
    consumed = {queue["name"] for queues in replies.values() for queue in queues}
    assert consumed == set(PROFILE.queues), sorted(set(PROFILE.queues) ^ consumed)
    assert list(replies) == ["dify-dev@ubuntu-vm"]
    count = len(PROFILE.queues)
    assert (f"worker consumes the {count} queues of Dify {VERSION} ... unchanged: {count} "
            f"queues consumed") in devlab.runs["dev.backend"].stdout


def test_frontend_serves_pages_pointing_at_the_vm_api(devlab: Lab3) -> None:
    page = requests.get(f"http://{devlab.workstation.address}:3000/", timeout=10).json()
    assert page["NEXT_PUBLIC_API_PREFIX"] == f"http://{devlab.vm.address}:5001/console/api"
    assert page["NEXT_PUBLIC_PUBLIC_API_PREFIX"] == f"http://{devlab.vm.address}:5001/api"
    _, out = devlab.workstation.exec(
        f"systemctl show -p User --value dify-web-dev; stat -c %U {CHECKOUT}/web/node_modules "
        f"{CHECKOUT}/web/.env.local; command -v pnpm")
    assert out.split() == ["deploy", "deploy", "deploy", "/usr/local/bin/pnpm"], out


def test_second_run_changes_nothing_and_restarts_nothing(devlab: Lab3) -> None:
    before = unit_starts(devlab.vm, *UNITS), unit_starts(devlab.workstation, WEB_UNIT)
    for task in ("dev.server", "dev.backend", "dev.frontend"):
        again = devlab.deploy(task)
        header = summary(again)[0]
        assert header == ["host", "unchanged"], f"{task}:\n{again.stdout}"
    after = unit_starts(devlab.vm, *UNITS), unit_starts(devlab.workstation, WEB_UNIT)
    assert after == before and "0" not in before[0] + before[1]


def test_api_health_fails_while_the_home_database_is_down(devlab: Lab3) -> None:
    code, out = devlab.server.exec("systemctl stop postgresql@15-main")
    assert code == 0, out
    try:
        down = wait_until("api /health reports the database",
                          lambda: (answer := requests.get(devlab.api_url("/health"), timeout=10))
                          .status_code == 503 and answer.json(), timeout=30)
        assert down["errors"] == {"database": "OperationalError"}
        status = devlab.inv("deploy.status", "--only", "dev_backend")
        assert status.returncode == 1
        assert "api /health on ubuntu-vm" in status.stderr
    finally:
        devlab.server.exec("systemctl start postgresql@15-main")
    wait_until("api /health back to ok", lambda: requests.get(
        devlab.api_url("/health"), timeout=10).status_code == 200, timeout=60)
