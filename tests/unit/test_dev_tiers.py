"""The home-lab tiers: api/.env, units, exact commands (Linux and Windows), refusals, dev.server."""

from __future__ import annotations

import configparser
import copy
import io
import subprocess
import sys
from typing import Any

import pytest
from invoke import Context
from invoke.exceptions import Exit

from tasks import dev
from tasks.core import facts
from tasks.core.apply import Executor
from tasks.core.errors import InputError
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.report import CHANGED, Report
from tasks.tiers import TIERS, dev_backend, dev_frontend
from tasks.tiers.dev_backend import api_env, parse_env
from tasks.tiers.dev_common import server_tiers
from tests.unit.conftest import good_secrets
from tests.unit.fakes import FakeMachine

LAB: dict[str, Any] = {
    "name": "lab",
    "cache": {"mode": "standalone"},
    "dev": {"network": "192.168.1.0/24", "dify_source": "/home/dev/dify"},
    "net": {"management": ["192.168.1.0/24"]},
    "hosts": [
        {"name": "home-server", "address": "192.168.1.100",
         "roles": ["dev_server", "db_primary", "cache", "vector", "monitor"]},
        {"name": "ubuntu-vm", "address": "192.168.1.101", "ssh": {"user": "dev"},
         "roles": ["dev_backend"]},
        {"name": "workstation", "address": "192.168.1.102", "ssh": {"user": "dev"},
         "roles": ["dev_frontend"]},
    ],
}
SECRETS = good_secrets()


def lab(**dev_settings: Any) -> dict[str, Any]:
    data = copy.deepcopy(LAB)
    data["dev"].update(dev_settings)
    return data


def windows_lab(**dev_settings: Any) -> dict[str, Any]:
    data = lab(frontend_dir="C:\\src\\dify", **dev_settings)
    data["hosts"][2]["labels"] = {"os": "windows"}
    return data


def steps_of(tier, inventory, host_name: str) -> dict[str, Step]:
    plan = tier.plan(inventory)
    (host_plan,) = [p for p in plan.hosts if p.host.name == host_name]
    return {step.label: step for step in host_plan.steps}


def unit(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # keep the keys' case
    parser.read_string(text)
    return parser


# --- api/.env ------------------------------------------------------------------------------


def test_api_env_has_the_production_values_and_development_urls(load) -> None:
    inventory = load(lab())
    vm = inventory.host("ubuntu-vm")
    renderer = Renderer(inventory)
    env = parse_env(api_env(inventory, renderer, vm))
    production = parse_env(renderer.render("config/env/dify.env.j2", vm,
                                           ca_path=dev_backend.CA_PATH))
    for key in ("SECRET_KEY", "DB_HOST", "DB_PORT", "DB_USERNAME", "DB_PASSWORD", "DB_DATABASE",
                "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "REDIS_USE_SSL",
                "REDIS_SSL_CERT_REQS", "REDIS_SSL_CA_CERTS", "PUBSUB_REDIS_URL",
                "CELERY_BROKER_URL", "CELERY_BACKEND", "VECTOR_STORE", "WEAVIATE_ENDPOINT",
                "WEAVIATE_API_KEY", "WEAVIATE_GRPC_ENDPOINT", "STORAGE_TYPE", "OPENDAL_FS_ROOT",
                "PLUGIN_DAEMON_KEY", "INNER_API_KEY_FOR_PLUGIN", "CODE_EXECUTION_API_KEY"):
        assert env[key] == production[key], key
    assert env["DB_HOST"] == env["REDIS_HOST"] == "192.168.1.100"
    # tls.internal: Dify's own TLS settings (no redis_proxy in the home lab), verified with
    # the CA: its client, its pub/sub (a URL of its own) and Celery (rediss://).
    assert (env["REDIS_USE_SSL"], env["REDIS_SSL_CERT_REQS"], env["REDIS_SSL_CA_CERTS"]) == (
        "true", "CERT_REQUIRED", "/etc/difyops/tls/ca.crt")
    verified = "?ssl_cert_reqs=required&ssl_ca_certs=/etc/difyops/tls/ca.crt"
    # (single-quoted in the file: '?' and '&' are not plain for an env file)
    assert env["CELERY_BROKER_URL"] == (f"'rediss://:{SECRETS['REDIS_PASSWORD']}"
                                        f"@192.168.1.100:6379/1{verified}'")
    assert env["PUBSUB_REDIS_URL"] == (f"'rediss://:{SECRETS['REDIS_PASSWORD']}"
                                       f"@192.168.1.100:6379/0{verified}'")
    assert env["WEAVIATE_ENDPOINT"] == "http://192.168.1.100:8080"
    assert {env[k] for k in ("CONSOLE_API_URL", "SERVICE_API_URL",
                             "FILES_URL")} == {"http://192.168.1.101:5001"}
    assert "APP_API_URL" not in env  # the web's setting: no release's api reads it
    assert env["CONSOLE_WEB_URL"] == env["APP_WEB_URL"] == "http://192.168.1.102:3000"
    assert env["CONSOLE_CORS_ALLOW_ORIGINS"] == "http://192.168.1.102:3000"
    assert env["DEPLOY_ENV"] == "DEVELOPMENT" and env["DEBUG"] == "true"
    assert env["SSRF_PROXY_HTTP_URL"] == env["SSRF_PROXY_HTTPS_URL"] == ""
    assert env["CODE_EXECUTION_ENDPOINT"] == "http://127.0.0.1:8194"
    assert env["PLUGIN_DAEMON_URL"] == "http://127.0.0.1:5002"
    for compose_only in dev_backend.COMPOSE_ONLY:
        assert compose_only not in env
    text = api_env(inventory, renderer, vm)
    keys = [line.split("=", 1)[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(keys) == len(set(keys))  # every key once


def test_api_env_with_pgvector_points_at_the_home_database(load) -> None:
    data = lab()
    data["vector"] = {"store": "pgvector"}
    data["hosts"][0]["roles"].remove("vector")
    inventory = load(data)
    env = parse_env(api_env(inventory, Renderer(inventory), inventory.host("ubuntu-vm")))
    assert env["VECTOR_STORE"] == "pgvector" and env["PGVECTOR_HOST"] == "192.168.1.100"
    assert "WEAVIATE_ENDPOINT" not in env


def test_api_env_is_private_to_the_dev_user(load) -> None:
    steps = steps_of(dev_backend.TIER, load(lab()), "ubuntu-vm")
    env = steps["file /home/dev/dify/api/.env"]
    assert (env.mode, env.owner, env.group, env.secret) == (0o600, "dev", "dev", True)


# --- backend commands and units -------------------------------------------------------------


def test_backend_commands(load) -> None:
    inventory = load(lab(package_index="https://pypi.mirror.test/simple",
                         python="/opt/py 3.12/bin/python3.12"))
    steps = steps_of(dev_backend.TIER, inventory, "ubuntu-vm")
    uv_env = ("env UV_NATIVE_TLS=true UV_SYSTEM_CERTS=true "
              "UV_INDEX_URL=https://pypi.mirror.test/simple "
              "UV_PYTHON='/opt/py 3.12/bin/python3.12'")
    as_dev = "cd /home/dev/dify/api && runuser -u dev -- "
    install_uv = steps["install uv"]
    assert install_uv.command == (
        "python3 -m venv /opt/difyops/uv && env PIP_INDEX_URL=https://pypi.mirror.test/simple "
        "/opt/difyops/uv/bin/pip install --quiet uv && ln -sf /opt/difyops/uv/bin/uv "
        "/usr/local/bin/uv")
    assert install_uv.unless.fact == facts.commands("/usr/local/bin/uv")
    assert install_uv.unless.test({"/usr/local/bin/uv": "/usr/local/bin/uv"})
    assert not install_uv.unless.test({"/usr/local/bin/uv": ""})
    sync = steps["install the api's dependencies (uv sync)"]
    # the release's lock as it is, without the dev group (as the release's Dockerfile does);
    # the stamp holds the interpreter asked for, so changing dev.python syncs again
    stamp = ("sha256sum pyproject.toml uv.lock && echo '\"'\"'python=/opt/py 3.12/bin/"
             "python3.12'\"'\"'")
    assert sync.command == (
        f"{as_dev}{uv_env} /usr/local/bin/uv sync --frozen --no-dev --quiet && {as_dev}sh -c "
        f"'{{ {stamp}; }} > .venv/.difyops-synced' && {{ systemctl try-restart "
        f"dify-api-dev.service dify-worker-dev.service 2>/dev/null; true; }}")
    assert sync.unless == f"{as_dev}sh -c '{{ {stamp}; }} | cmp -s - .venv/.difyops-synced'"
    migrate = steps["migrate the database (flask upgrade-db)"]
    uv_run = f"{uv_env} /usr/local/bin/uv run --no-sync"
    assert migrate.command.startswith(f"{as_dev}{uv_run} flask upgrade-db && {{ "
                                      f"{as_dev}{uv_run} flask db current | grep -q '(head)' ||")
    assert migrate.unless == f"{as_dev}{uv_run} flask db current 2>/dev/null | grep -q '(head)'"
    restart = steps["restart the api and worker"]
    assert restart.command == ("systemctl daemon-reload && systemctl restart "
                               "dify-api-dev.service dify-worker-dev.service")
    assert restart.on_change == ("/home/dev/dify/api/.env",
                                 "/etc/systemd/system/dify-api-dev.service",
                                 "/etc/systemd/system/dify-worker-dev.service")
    assert "clone" not in " ".join(steps)  # a path is used as it is
    assert "install python3-venv libmagic1" in steps  # and git is not needed


def test_backend_without_dev_python_leaves_the_interpreter_to_uv(load) -> None:
    steps = steps_of(dev_backend.TIER, load(lab()), "ubuntu-vm")
    sync = steps["install the api's dependencies (uv sync)"]
    assert "UV_PYTHON" not in sync.command
    assert sync.command.startswith("cd /home/dev/dify/api && runuser -u dev -- env "
                                   "UV_NATIVE_TLS=true UV_SYSTEM_CERTS=true /usr/local/bin/uv "
                                   "sync --frozen --no-dev --quiet && ")
    assert "echo python=; } > .venv/.difyops-synced" in sync.command


def test_backend_order_reaches_the_server_first_and_gates_last(load) -> None:
    labels = list(steps_of(dev_backend.TIER, load(lab()), "ubuntu-vm"))
    assert labels[:2] == ["health postgresql at home-server:5432 reachable",
                          "health redis at home-server:6379 reachable"]
    assert labels.index("file /home/dev/dify/api/.env") < labels.index(
        "install the api's dependencies (uv sync)") < labels.index(
        "migrate the database (flask upgrade-db)") < labels.index(
        "enable and start dify-api-dev.service")
    assert labels[-3:] == ["health api /health",
                           "health api /console/api/setup (reads the database)",
                           "health worker consumes the 21 queues of Dify 1.16.1"]


def test_units_run_flask_debug_and_a_worker_on_every_queue(load) -> None:
    inventory = load(lab())
    steps = steps_of(dev_backend.TIER, inventory, "ubuntu-vm")
    api = unit(steps["file /etc/systemd/system/dify-api-dev.service"].content)["Service"]
    assert api["User"] == "dev" and api["WorkingDirectory"] == "/home/dev/dify/api"
    assert api["ExecStart"] == ("/usr/local/bin/uv run --no-sync flask run --host 0.0.0.0 "
                                "--port 5001 --debug")
    worker = unit(steps["file /etc/systemd/system/dify-worker-dev.service"].content)["Service"]
    command = worker["ExecStart"].split()
    # The release's own Celery entry module (`celery -A celery_entrypoint.celery worker` in its
    # entrypoint), not app.celery.
    assert command[:6] == ["/usr/local/bin/uv", "run", "--no-sync", "celery", "-A",
                           "celery_entrypoint.celery"]
    queues = command[command.index("-Q") + 1].split(",")
    assert queues == list(inventory.profile.queues) and len(queues) == 21
    assert command[command.index("-n") + 1] == "dify-dev@%H"  # systemd puts the host name
    gate = steps["health worker consumes the 21 queues of Dify 1.16.1"]
    # the release's Celery app, then its queues
    assert gate.gate.command.endswith(" celery_entrypoint.celery "
                                      + " ".join(inventory.profile.queues))
    assert "from app import" not in gate.gate.command
    # one run loads the release's whole app before it asks the workers: more than 10 s
    assert (gate.gate.probe_timeout, gate.gate.timeout) == (120, 300)


def test_queue_check_uses_the_named_celery_app(tmp_path, monkeypatch) -> None:
    """The gate's script imports the app named on its command line and names what is missing."""
    (tmp_path / "entry.py").write_text(
        "class Inspect:\n"
        "    def active_queues(self):\n"
        "        return {'w@h': [{'name': 'a'}, {'name': 'b'}]}\n"
        "class Control:\n"
        "    def inspect(self, timeout):\n"
        "        return Inspect()\n"
        "class App:\n"
        "    control = Control()\n"
        "celery = App()\n")
    script = [sys.executable, "-c", dev_backend.QUEUE_CHECK, "entry.celery"]
    done = subprocess.run([*script, "a", "b"], cwd=tmp_path, capture_output=True, text=True,
                          check=False)
    assert (done.returncode, done.stdout) == (0, "2 queues consumed by w@h\n")
    done = subprocess.run([*script, "a", "b", "c"], cwd=tmp_path, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 1 and done.stderr.strip() == "no worker consumes: c"


def test_a_git_source_is_cloned_once_at_the_ref(load) -> None:
    inventory = load(lab(dify_source="https://github.com/langgenius/dify.git",
                         dify_ref="1.16.1"))
    steps = steps_of(dev_backend.TIER, inventory, "ubuntu-vm")
    clone = steps["clone https://github.com/langgenius/dify.git into /srv/dify-dev/dify"]
    assert clone.command == ("install -d -o dev -g dev /srv/dify-dev && runuser -u dev -- git "
                             "clone --quiet --branch 1.16.1 https://github.com/langgenius/dify.git"
                             " /srv/dify-dev/dify")
    assert clone.unless.fact == facts.path("/srv/dify-dev/dify/.git")
    assert clone.unless.test(facts.path_state("directory|1000"))
    assert not clone.unless.test(facts.path_state("missing"))
    assert steps["install git"].unless.fact == facts.packages("git")
    assert list(steps).index("install git") < list(steps).index(clone.name)
    assert "file /srv/dify-dev/dify/api/.env" in steps
    frontend = steps_of(dev_frontend.TIER, inventory, "workstation")  # the same two steps
    assert frontend[clone.name].command == clone.command
    assert frontend["install git"].command == steps["install git"].command


# --- front end -------------------------------------------------------------------------------


def test_linux_frontend(load) -> None:
    inventory = load(lab(npm_registry="https://npm.mirror.test/"))
    steps = steps_of(dev_frontend.TIER, inventory, "workstation")
    env = parse_env(steps["file /home/dev/dify/web/.env.local"].content)
    assert env["NEXT_PUBLIC_API_PREFIX"] == "http://192.168.1.101:5001/console/api"
    assert env["NEXT_PUBLIC_PUBLIC_API_PREFIX"] == "http://192.168.1.101:5001/api"
    assert steps["install pnpm"].command == ("env CI=true npm_config_registry=https://npm.mirror"
                                             ".test/ npm install --global --silent pnpm")
    install = steps["install the web's dependencies (pnpm install)"]
    assert install.command.startswith("cd /home/dev/dify/web && runuser -u dev -- env CI=true "
                                      "npm_config_registry=https://npm.mirror.test/ pnpm install")
    web = unit(steps["file /etc/systemd/system/dify-web-dev.service"].content)["Service"]
    assert (web["User"], web["WorkingDirectory"], web["ExecStart"]) == (
        "dev", "/home/dev/dify/web", "/usr/bin/env pnpm dev")
    assert steps["restart the web dev server"].on_change == (
        "/home/dev/dify/web/.env.local", "/etc/systemd/system/dify-web-dev.service")
    assert steps["health web dev server /"].gate.url == "http://192.168.1.102:3000/"


def test_windows_frontend_commands(load) -> None:
    inventory = load(windows_lab(dify_source="https://github.com/langgenius/dify.git",
                                 dify_ref="1.16.1", npm_registry="https://npm.mirror.test/"))
    steps = steps_of(dev_frontend.TIER, inventory, "workstation")
    assert list(steps) == [
        "install Node.js LTS (winget)", "install pnpm",
        "clone https://github.com/langgenius/dify.git into C:\\src\\dify",
        "C:\\src\\dify\\web holds Dify's web", "file C:\\src\\dify\\web\\.env.local",
        "install the web's dependencies (pnpm install)",
        "file C:\\ProgramData\\difyops\\dify-web-dev.ps1",
        "register the scheduled task dify-web-dev", "(re)start the web dev server",
        "health web dev server /"]
    assert steps["install Node.js LTS (winget)"] == RunCommand(
        "install Node.js LTS (winget)", "winget install --id OpenJS.NodeJS.LTS --exact --silent "
        "--accept-package-agreements --accept-source-agreements",
        unless="Get-Command node, npm | Out-Null")
    assert steps["install pnpm"].command == ("$env:npm_config_registry = 'https://npm.mirror."
                                             "test/'; npm install --global --silent pnpm")
    clone = steps["clone https://github.com/langgenius/dify.git into C:\\src\\dify"]
    assert clone.command == ("git clone --quiet --branch '1.16.1' 'https://github.com/langgenius/"
                             "dify.git' 'C:\\src\\dify'")
    assert clone.unless == "if (-not (Test-Path -LiteralPath 'C:\\src\\dify\\.git')) { exit 1 }"
    hashes = ("(Get-FileHash -LiteralPath package.json, pnpm-lock.yaml -ErrorAction "
              "SilentlyContinue | ForEach-Object Hash) -join ','")
    install = steps["install the web's dependencies (pnpm install)"]
    assert install.command == (
        "Set-Location -LiteralPath 'C:\\src\\dify\\web'; $env:CI = 'true'; "
        "$env:npm_config_registry = 'https://npm.mirror.test/'; pnpm install --reporter=silent; "
        "if ($LASTEXITCODE) { exit $LASTEXITCODE }; New-Item -ItemType Directory -Force -Path "
        "node_modules | Out-Null; Set-Content -LiteralPath 'node_modules/.difyops-installed' "
        f"-Value ({hashes})")
    assert install.unless == (
        "Set-Location -LiteralPath 'C:\\src\\dify\\web'; if (\"$(Get-Content -LiteralPath "
        "'node_modules/.difyops-installed' -ErrorAction SilentlyContinue)\" -ne "
        f"({hashes})) {{ exit 1 }}")
    register = steps["register the scheduled task dify-web-dev"]
    assert ("New-ScheduledTaskAction -Execute 'powershell.exe' -Argument '-NoProfile "
            "-ExecutionPolicy Bypass -File \"C:\\ProgramData\\difyops\\dify-web-dev.ps1\"'"
            in register.command)
    assert "-LogonType S4U; Register-ScheduledTask -TaskName 'dify-web-dev'" in register.command
    assert register.unless == "Get-ScheduledTask -TaskName 'dify-web-dev' | Out-Null"
    start = steps["(re)start the web dev server"]
    assert start.command.startswith("Stop-ScheduledTask -TaskName 'dify-web-dev'; "
                                    "Get-NetTCPConnection -LocalPort 3000 -State Listen")
    assert "Start-ScheduledTask -TaskName 'dify-web-dev'; Set-Content -LiteralPath " \
        "'C:\\ProgramData\\difyops\\dify-web-dev.started'" in start.command
    assert start.unless.startswith("if ((Get-ScheduledTask -TaskName 'dify-web-dev').State "
                                   "-ne 'Running') { exit 1 }")
    gate = steps["health web dev server /"].gate
    assert "Invoke-WebRequest -UseBasicParsing -TimeoutSec 5 -Uri 'http://127.0.0.1:3000/'" \
        in gate.command
    script = steps["file C:\\ProgramData\\difyops\\dify-web-dev.ps1"].content
    assert "Set-Location -LiteralPath 'C:\\src\\dify\\web'\n" in script
    assert "$env:PORT = '3000'" in script
    assert "pnpm dev *>> 'C:\\ProgramData\\difyops\\dify-web-dev.log'" in script
    env = parse_env(steps["file C:\\src\\dify\\web\\.env.local"].content)
    assert env["NEXT_PUBLIC_API_PREFIX"] == "http://192.168.1.101:5001/console/api"
    # POSIX-only machinery stays out of a Windows plan: no on_change markers, default modes
    for step in steps.values():
        if isinstance(step, RunCommand):
            assert step.on_change == ()
            assert "runuser" not in step.command and "systemctl" not in step.command
        if isinstance(step, WriteFile):
            assert (step.mode, step.owner, step.group) == (0o644, "root", "root")


def test_windows_plan_runs_without_posix_commands(load, use_machines) -> None:
    """The executor issues only the plan's own commands to a Windows host (no marker files)."""
    inventory = load(windows_lab())
    plan = dev_frontend.TIER.plan(inventory)
    no_checkout = "Test-Path -LiteralPath 'C:\\src\\dify\\web\\package.json'"
    machine = FakeMachine(inventory.host("workstation"),
                          answers=lambda command: 1 if no_checkout in command else 0)
    use_machines(lambda host, timeouts=None: machine)
    plan.hosts[0].steps = [s for s in plan.hosts[0].steps if not isinstance(s, WaitFor)]
    report = Executor(Report(out=io.StringIO())).run([plan])
    assert [r.step for r in report.failed] == ["C:\\src\\dify\\web holds Dify's web"]
    assert not [c for c in machine.commands if "/var/lib/difyops" in c or "sudo" in c]
    machine.answers = lambda command: 0
    report = Executor(Report(out=io.StringIO())).run([plan])
    assert report.failed == [] and report.count(CHANGED) == 2  # the two files


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "key", "message"), [
    (lab(dify_source=""), "dev.dify_source", "empty, but the inventory has dev_backend"),
    (lab(dify_source="dify"), "dev.dify_source", "'dify' is neither a git URL nor an absolute"),
    (lab(network="192.168.1.0/33"), "dev.network",
     "'192.168.1.0/33' is not a network in CIDR notation"),
    (lab(network="10.0.0.0/24"), "hosts[0].address",
     "home-server (192.168.1.100) is outside dev.network 10.0.0.0/24"),
])
def test_bad_home_lab_settings_are_refused_before_any_host(load, monkeypatch, data, key,
                                                            message) -> None:
    inventory = load(data)
    with pytest.raises(InputError) as caught:
        dev_backend.TIER.plan(inventory)
    assert f": {key}: {message}" in str(caught.value)


def test_windows_front_end_needs_a_windows_checkout_path(load) -> None:
    data = windows_lab()
    data["dev"]["frontend_dir"] = ""
    with pytest.raises(InputError, match=r"dev.frontend_dir: the front end workstation "
                                         r"\(hosts\[2\]\) is Windows, and '\(empty\)' is not a "
                                         r"Windows path"):
        dev_frontend.TIER.plan(load(data))
    data = windows_lab()
    data["hosts"][2]["roles"].append("dev_backend")
    with pytest.raises(InputError, match=r"hosts\[2\].roles: workstation is Windows: it can "
                                         r"only be the dev_frontend"):
        dev_frontend.TIER.plan(load(data))


# --- dev.server and the tasks ----------------------------------------------------------------


def test_server_tiers_run_only_on_the_home_server(load) -> None:
    data = lab()
    data["hosts"].append({"name": "nas", "address": "192.168.1.50", "roles": ["cache"]})
    inventory = load(data)
    tiers = server_tiers(TIERS)
    assert [tier.name for tier in tiers] == [t.name for t in TIERS
                                             if t.name in ("db", "cache", "vector", "monitor")]
    plans = {tier.name: [p.host.name for p in tier.plan(inventory).hosts] for tier in tiers}
    assert plans["db"] == plans["cache"] == plans["vector"] == ["home-server"]


def test_tasks_refuse_inventories_without_their_machines(write_inventory, base,
                                                         monkeypatch) -> None:
    monkeypatch.setenv("DIFY_INVENTORY", str(write_inventory(base)))
    for task, role in ((dev.server, "dev_server"), (dev.backend, "dev_backend"),
                       (dev.frontend, "dev_frontend")):
        with pytest.raises(Exit, match=f"has no host with role {role}: dev.{task.name}"):
            task(Context())


def test_dev_server_refuses_a_home_server_without_the_base_roles(write_inventory,
                                                                 monkeypatch) -> None:
    data = lab()
    data["hosts"][0]["roles"] = ["dev_server", "vector", "monitor"]
    data["hosts"].append({"name": "db", "address": "192.168.1.60",
                          "roles": ["db_primary", "cache"]})
    monkeypatch.setenv("DIFY_INVENTORY", str(write_inventory(data)))
    with pytest.raises(Exit, match=r"hosts\[0\].roles: the home server home-server lacks "
                                   r"db_primary, cache"):
        dev.server(Context())


def test_dry_runs_touch_nothing(write_inventory, monkeypatch, capsys, use_machines) -> None:
    """--dry of each task plans every step; the fake hosts answer 'not there yet' (probes fail,
    facts read nothing: no package, no unit)."""
    data = lab()
    monkeypatch.setenv("DIFY_INVENTORY", str(write_inventory(data)))
    machines: dict[str, FakeMachine] = {}

    def nothing_there(command: str) -> int:
        facts_read = ("dpkg-query ", "if [ -d /run/systemd/system ]", "for name in ")
        return 0 if command.startswith(facts_read) else 1

    def connect(host, timeouts=None):
        return machines.setdefault(host.name, FakeMachine(host, answers=nothing_there))

    use_machines(connect)
    dev.backend(Context(), dry=True)
    out = capsys.readouterr().out
    assert "[dev_backend] ubuntu-vm: migrate the database (flask upgrade-db) ... would change" \
        in out
    assert machines["ubuntu-vm"].files == {}
    assert SECRETS["DB_PASSWORD"] not in out  # the env file is a secret: no diff shown
