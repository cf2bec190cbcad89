"""The home-lab layout on three container hosts, deployed by the real `inv dev.*` tasks over SSH.

home-server runs PostgreSQL and Redis (dev.server); ubuntu-vm runs the api and Celery worker of
the REAL Dify release (its `api/`, unpacked from the release tarball on this machine and copied
onto the VM) with uv, flask --debug and Celery (dev.backend); workstation runs the web dev server
with pnpm (dev.frontend, Linux variant).

What is real and what is not:
- Dify's api and worker: the release's own source, its own dependencies (`uv sync --frozen
  --no-dev` from the package index, about 2.3 GB), its own migrations (`flask upgrade-db`) on the
  home server's PostgreSQL. The source comes from DIFYOPS_DIFY_SOURCE (a checkout or a release
  tarball of Dify VERSION) or the tarball kept beside the project (../shared/dify); without
  either the module is skipped with that reason.
- Python: Dify 1.14+ needs Python 3.12 and the lab hosts are Debian 12 (3.11); uv cannot
  download an interpreter everywhere. This machine's Python 3.12 (DIFYOPS_PYTHON312, else
  `python3.12` on the PATH, else `pyenv prefix 3.12`) is copied onto the VM and named by
  `dev.python`, as an operator names the interpreter of their VM.
- The web front end is still the look-alike (tests/fixtures/dify_api_shaped/web): a release's
  source holds `api/` and `docker/`, not `web/`, and Dify's Next.js dev server would need its
  whole node_modules from the npm registry.
- The vector store is pgvector (nothing to run on a vector host: Weaviate's image is not
  available here), and is not deployed: Debian 12 has no pgvector. The api connects to its vector
  store only when a dataset is used, so the setup endpoint and the worker answer without it. The
  home server has no monitor role (the monitor tier is tested on its own).

Marked ``real_dify`` (deselect with ``-m "not real_dify"``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from dotenv import dotenv_values

from tasks.core.dify_source import DifySource, SourceError, open_source
from tasks.core.profiles import load_profile
from tasks.tiers.cache import HELPER as REDIS_HELPER
from tests.images import dify_real, dify_source
from tests.integration.lab import Lab, LabHost
from tests.integration.support import eventually

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.real_dify
# The home server's vector store is not deployed here: pgvector has no Debian 12 package and the
# Weaviate image cannot be obtained (tests/integration/test_vector.py covers both as far as this
# machine allows). PostgreSQL and Redis, which the backend needs, are deployed for real.
COMMANDS = {"dev.server": ("dev.server", "--only", "db,cache")}
WEB_FIXTURE = ROOT / "tests" / "fixtures" / "dify_api_shaped" / "web"
CHECKOUT = "/home/deploy/dify"
API = f"{CHECKOUT}/api"
UNITS = ("dify-api-dev.service", "dify-worker-dev.service")
WEB_UNIT = "dify-web-dev.service"
VERSION = "1.14.2"
PROFILE = load_profile(VERSION)
SOURCE_ENV = "DIFYOPS_DIFY_SOURCE"
SHARED_TARBALL = ROOT.parent / "shared" / "dify" / f"dify-{VERSION}.tar.gz"
# Where the interpreter's prefix goes on the VM (its libpython is found through ldconfig there).
VM_PREFIX = "/usr/local"
VM_PYTHON = f"{VM_PREFIX}/bin/python3.12"
# Parts of the interpreter's prefix the api does without: its own tests, GUI, other packages.
PYTHON_SKIP = frozenset({"test", "idlelib", "tkinter", "turtledemo", "__pycache__", "lib2to3",
                         "pkgconfig"})
REVISION = re.compile(r"^(down_revision|revision)\s*(?::[^=]*)?=\s*(.+)$", re.M)


def release_source(scratch: Path) -> DifySource:
    """Dify VERSION's source, unpacked into scratch when a tarball; skips when there is none."""
    named = os.environ.get(SOURCE_ENV, "").strip()
    path = Path(named) if named else SHARED_TARBALL
    if not path.exists():
        pytest.skip(f"no source of Dify {VERSION}: neither {SOURCE_ENV} nor {SHARED_TARBALL} "
                    f"(a skip is not a pass)")
    try:
        source = open_source(path, scratch)
    except SourceError as exc:
        pytest.skip(f"{SOURCE_ENV}: {exc}")
    if source.version != VERSION:
        pytest.skip(f"{path} holds Dify {source.version}; this module runs {VERSION}")
    return source


def python312() -> Path:
    """This machine's Python 3.12 prefix (found as the real image's build finds it); skips
    when there is none."""
    try:
        return dify_real.find_python312().prefix
    except dify_source.Unavailable as exc:
        pytest.skip(f"{exc} (Dify {VERSION})")


def alembic_heads(source: DifySource) -> set[str]:
    """The head revisions of the release's migrations: revisions no other one builds on."""
    revisions, parents = set(), set()
    for path in (source.root / "api" / "migrations" / "versions").glob("*.py"):
        for key, value in REVISION.findall(path.read_text(encoding="utf-8")):
            names = set(re.findall(r"['\"]([0-9A-Za-z_]+)['\"]", value))
            (revisions if key == "revision" else parents).update(names)
    return revisions - parents


def put_tree(host: LabHost, parent: str, items: dict[str, Path], owner: str,
             skip: Callable[[tarfile.TarInfo], bool] = lambda info: False) -> None:
    """Copy local folders or files (name in the archive -> path) under parent on the host."""
    with tempfile.TemporaryFile() as buffer:
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for name, path in items.items():
                archive.add(path, arcname=name, filter=lambda info: None if skip(info) else info)
        buffer.seek(0)
        assert host.container.get_wrapped_container().put_archive(parent, buffer)
    code, out = host.exec(f"chown -R {owner} " + " ".join(f"{parent}/{name.split('/')[0]}"
                                                           for name in items))
    assert code == 0, out


def copy_release(host: LabHost, source: DifySource) -> None:
    """The release's api (with its docker/ and LICENSE) at CHECKOUT, owned by deploy."""
    root = source.root
    host.exec(f"install -d -o deploy -g deploy {CHECKOUT}")
    put_tree(host, CHECKOUT, {name: root / name for name in ("api", "docker", "LICENSE")
                              if (root / name).exists()}, "deploy:deploy",
             skip=lambda info: info.name == "api/.env" or bool(
                 {"__pycache__", ".venv", "node_modules"} & set(Path(info.name).parts)))


def copy_web(host: LabHost) -> None:
    """The look-alike web folder at CHECKOUT/web (a release's source has no web/)."""
    host.exec(f"install -d -o deploy -g deploy {CHECKOUT}")
    put_tree(host, CHECKOUT, {"web": WEB_FIXTURE}, "deploy:deploy",
             skip=lambda info: "node_modules" in Path(info.name).parts)


def copy_python(host: LabHost, prefix: Path) -> None:
    """This machine's Python 3.12 into VM_PREFIX on the host (bin/python3.12, its libpython and
    standard library; not the other interpreters' names, so the host's python3 stays Debian's)."""
    items = {f"bin/{name}": prefix / "bin" / name for name in ("python3.12",)}
    items |= {f"lib/{path.name}": path for path in (prefix / "lib").glob("libpython3*.so*")}
    items |= {"lib/python3.12": prefix / "lib" / "python3.12",
              "include/python3.12": prefix / "include" / "python3.12"}

    def skip(info: tarfile.TarInfo) -> bool:
        parts = Path(info.name).parts
        in_site = "site-packages" in parts[:-1]
        return bool(PYTHON_SKIP & set(parts)) or in_site or info.name.endswith(".a")

    put_tree(host, VM_PREFIX, items, "root:root", skip=skip)
    code, out = host.exec(f"ldconfig && {VM_PYTHON} -c 'import ssl, sqlite3, ctypes, lzma, bz2, "
                          "zlib, uuid; print(ssl.OPENSSL_VERSION)'")
    assert code == 0, f"the copied Python 3.12 does not run on {host.name}:\n{out}"


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
            "dev": {"network": subnet, "dify_source": CHECKOUT, "python": VM_PYTHON},
            "net": {"firewall": "off"},
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
        self.source: DifySource | None = None

    def env(self, inventory: Path | None = None) -> dict[str, str]:
        return {**os.environ, "DIFY_INVENTORY": str(inventory or self.path),
                "DIFY_SECRETS": str(self.secrets_file)}

    def inv(self, *args: str, inventory: Path | None = None) -> subprocess.CompletedProcess:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                                capture_output=True, env=self.env(inventory), timeout=1500,
                                check=False)
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
    source = release_source(tmp_path_factory.mktemp("dify-source"))
    prefix = python312()
    setup = Lab3(lab, tmp_path_factory.mktemp("devlab"))
    setup.source = source
    started = time.monotonic()
    copy_release(setup.vm, source)
    copy_python(setup.vm, prefix)
    copy_web(setup.workstation)
    setup.timings.append(("copy the release and Python 3.12", time.monotonic() - started))
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
    assert "password DB_PLUGIN_PASSWORD in " in out
    assert devlab.secrets["DB_PASSWORD"] not in out
    assert devlab.secrets["DB_PLUGIN_PASSWORD"] not in out
    _, hba = devlab.server.exec("cat /etc/postgresql/15/main/pg_hba.conf")
    assert f"dify                dify        {devlab.vm.address}/32" in hba, hba
    assert f"dify_plugin         dify_plugin {devlab.vm.address}/32" in hba, hba
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
    # tls.internal: Dify's own TLS settings, verified with the installation's CA
    verified = "?ssl_cert_reqs=required&ssl_ca_certs=/etc/difyops/tls/ca.crt"
    assert env["CELERY_BROKER_URL"] == \
        f"rediss://:{secrets['REDIS_PASSWORD']}@{server}:6379/1{verified}"
    assert env["PUBSUB_REDIS_URL"] == \
        f"rediss://:{secrets['REDIS_PASSWORD']}@{server}:6379/0{verified}"
    assert (env["REDIS_USE_SSL"], env["REDIS_SSL_CA_CERTS"]) == ("true", "/etc/difyops/tls/ca.crt")
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
                               f"&& {API}/.venv/bin/python -c 'import sys; print(sys.version)'")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[1] == "deploy" and lines[2].startswith("3.12."), out  # dev.python's interpreter
    # the release's lock file is used as it is (uv sync --frozen)
    _, lock = devlab.vm.exec(f"sha256sum < {API}/uv.lock")
    assert lock.split()[0] == hashlib.sha256(
        (devlab.source.root / "api" / "uv.lock").read_bytes()).hexdigest()
    code, out = devlab.server.exec(
        "runuser -u postgres -- psql -d dify -tAc "
        "\"select version_num from alembic_version; select tableowner from pg_tables "
        "where tablename = 'dify_setups'\"")
    assert code == 0, out
    revision, owner = out.split()
    assert {revision} == alembic_heads(devlab.source), out  # migrated to the release's head
    assert owner == "dify"


def test_api_answers_through_the_real_database_and_redis(devlab: Lab3) -> None:
    health = requests.get(devlab.api_url("/health"), timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["version"] == VERSION  # the release itself answers
    setup = requests.get(devlab.api_url("/console/api/setup"), timeout=10)
    assert setup.status_code == 200 and setup.json()["step"] == "not_started", setup.text
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
    # The worker's broker connections reach the home server's Redis, which serves TLS only.
    code, clients = devlab.server.exec(f"{REDIS_HELPER} cli client list")
    assert code == 0 and f"addr={devlab.vm.address}:" in clients, clients
    code, port = devlab.server.exec(f"{REDIS_HELPER} cli config get port")
    assert port.split() == ["port", "0"], port
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


def test_app_logs_merges_the_units_of_both_machines_in_time_order(devlab: Lab3) -> None:
    shown = devlab.inv("app.logs", "--since", "2h")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    by_source: dict[str, list[str]] = {}
    for line in lines:
        by_source.setdefault(line.split(" | ")[0], []).append(line)
    assert set(by_source) == {"ubuntu-vm api", "ubuntu-vm worker", "workstation web"}, lines
    assert any("Debugger is active" in line for line in by_source["ubuntu-vm api"])
    assert any("dify-dev@ubuntu-vm ready." in line for line in by_source["ubuntu-vm worker"])
    stamps = [line.split(" | ")[1].split()[0] for line in lines]
    assert stamps == sorted(stamps), lines


def test_app_logs_follows_the_api_unit_until_interrupted(devlab: Lab3) -> None:
    # ([j]: the pattern must not match the shell that runs pgrep)
    streaming = "pgrep -f '[j]ournalctl .*--unit dify-api-dev.service.*--follow'"
    follower = subprocess.Popen(
        [sys.executable, "-m", "invoke", "app.logs", "--follow", "--service", "api",
         "--since", "1s"], cwd=ROOT, env=devlab.env(), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
    reader.start()
    try:
        eventually("journalctl --follow on ubuntu-vm",
                   lambda: devlab.vm.exec(streaming)[0] == 0, timeout=30)
        assert requests.get(devlab.api_url("/console/api/setup?followed"),
                            timeout=10).status_code == 200
        eventually("the api's line for the request, streamed",
                   lambda: any("/console/api/setup?followed" in line for line in list(lines)),
                   timeout=30)
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=30)
    reader.join(timeout=10)
    assert all(line.startswith("ubuntu-vm api | ") for line in lines if line.strip()), lines
    # Interrupted, it ended its stream: nothing is left following on the VM.
    eventually("no journalctl left on ubuntu-vm",
               lambda: devlab.vm.exec(streaming)[0] == 1, timeout=15)


def test_second_run_changes_nothing_and_restarts_nothing(devlab: Lab3) -> None:
    before = unit_starts(devlab.vm, *UNITS), unit_starts(devlab.workstation, WEB_UNIT)
    for task in ("dev.server", "dev.backend", "dev.frontend"):
        again = devlab.deploy(task)
        header = summary(again)[0]
        assert header == ["host", "unchanged"], f"{task}:\n{again.stdout}"
    after = unit_starts(devlab.vm, *UNITS), unit_starts(devlab.workstation, WEB_UNIT)
    assert after == before and "0" not in before[0] + before[1]


def test_setup_gate_fails_while_the_home_database_is_down(devlab: Lab3) -> None:
    """Dify's /health says only that the process runs; the setup endpoint reads the database."""
    code, out = devlab.server.exec("systemctl stop postgresql@15-main")
    assert code == 0, out
    try:
        eventually("the setup endpoint fails without its database",
                   lambda: requests.get(devlab.api_url("/console/api/setup"),
                                        timeout=10).status_code >= 500, timeout=30)
        assert requests.get(devlab.api_url("/health"), timeout=10).status_code == 200
        status = devlab.inv("deploy.status", "--only", "dev_backend")
        assert status.returncode == 1, status.stdout
        assert "api /console/api/setup (reads the database) on ubuntu-vm" in status.stderr, (
            status.stdout + status.stderr)
    finally:
        devlab.server.exec("systemctl start postgresql@15-main")
    eventually("the setup endpoint answers again", lambda: requests.get(
        devlab.api_url("/console/api/setup"), timeout=10).status_code == 200, timeout=60)
