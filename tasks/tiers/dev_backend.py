"""dev_backend tier: Dify's api and worker from a checkout on the development VM.

Writes api/.env pointing at the home server (the production environment's database, Redis,
broker, vector store, storage and keys, with development URLs), installs uv and the api's
dependencies (`uv sync --frozen --no-dev`, as the release's own Dockerfile does: the lock file is
used as it is, and the dev group, which from 1.14 needs `dify-agent/` beside `api/`, is left to the
developer), migrates the database, and runs `flask run --debug` (reloading) and a Celery worker
on every queue of the Dify version as systemd units, so they outlive the SSH session.
`dev.python` names the interpreter uv builds the environment with (empty: uv's own choice).
"""

from __future__ import annotations

import re

from tasks.core import facts, shell, tls
from tasks.core.gates import CommandGate, HttpGate
from tasks.core.inventory import Host, Inventory, endpoint
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.system import packages, restart_unit, service_running
from tasks.core.tiers import Tier
from tasks.tiers.dev_common import (
    API_PORT,
    WEB_PORT,
    as_user,
    backend_checkout,
    check,
    clone_steps,
    dev_user,
)

UV = "/usr/local/bin/uv"
UV_HOME = "/opt/difyops/uv"
API_UNIT = "dify-api-dev.service"
WORKER_UNIT = "dify-worker-dev.service"
WORKER_NAME = "dify-dev"
UNIT_DIR = "/etc/systemd/system"
# Keys of the production environment that only the compose deployment reads.
COMPOSE_ONLY = ("SANDBOX_API_KEY", "SERVER_WORKER_AMOUNT", "SERVER_WORKER_CLASS",
                "GUNICORN_TIMEOUT")
ENV_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")
SYNC_STAMP = ".venv/.difyops-synced"
CA_PATH = tls.HOST_CA  # what the api and worker verify PostgreSQL and Redis with
# Debian packages the api needs on the host: venv for the pip that installs uv, libmagic for the
# api's python-magic (what the release's own image installs for it).
PACKAGES = ("python3-venv", "libmagic1")
# Seconds one run of the worker gate may take: it loads the release's whole app first (15-30 s
# for Dify 1.14 on two busy cores), then asks the workers for 5 s.
QUEUE_CHECK_TIMEOUT = 120
# Inside the worker gate: which of the queues named on the command line no worker consumes.
# argv[1] is the release's Celery app (module.attribute, the profile's celery_app), the rest the
# queues.
QUEUE_CHECK = (
    "import importlib, sys\n"
    "module, _, name = sys.argv[1].rpartition('.')\n"
    "celery = getattr(importlib.import_module(module), name)\n"
    "wanted = sys.argv[2:]\n"
    "replies = celery.control.inspect(timeout=5).active_queues() or {}\n"
    "names = {queue['name'] for queues in replies.values() for queue in queues}\n"
    "missing = [queue for queue in wanted if queue not in names]\n"
    "if not replies:\n"
    "    sys.exit('no Celery worker answered')\n"
    "if missing:\n"
    "    sys.exit('no worker consumes: ' + ','.join(missing))\n"
    "print(str(len(wanted)) + ' queues consumed by ' + ','.join(sorted(replies)))\n"
)


def uv_environment(inventory: Inventory) -> str:
    """`env` assignments for uv: the OS certificate store (like pip and git), the index mirror,
    the interpreter (dev.python)."""
    dev = inventory.settings.dev
    assignments = ["UV_NATIVE_TLS=true", "UV_SYSTEM_CERTS=true"]
    if dev.package_index:
        assignments.append(f"UV_INDEX_URL={shell.quote(dev.package_index)}")
    if dev.python:
        assignments.append(f"UV_PYTHON={shell.quote(dev.python)}")
    return "env " + " ".join(assignments)


def sync_stamp(inventory: Inventory) -> str:
    """What the environment was synced from: the project's and lock's hashes, the interpreter
    asked for (a change of either syncs again). A `sh -c` script run in the api folder."""
    python = shell.quote(f"python={inventory.settings.dev.python}")
    return f"sha256sum pyproject.toml uv.lock && echo {python}"


def parse_env(text: str) -> dict[str, str]:
    """KEY=value lines of an env file, in order (comments and blank lines dropped)."""
    return {match[1]: match[2] for line in text.splitlines() if (match := ENV_LINE.match(line))}


def api_env(inventory: Inventory, renderer: Renderer, host: Host) -> str:
    """api/.env: the production environment's values, development URLs and services on top."""
    production = parse_env(renderer.render("config/env/dify.env.j2", host, ca_path=CA_PATH))
    web_urls = [f"http://{endpoint(frontend.address, WEB_PORT)}"
                for frontend in inventory.with_role("dev_frontend")] or [
        f"http://localhost:{WEB_PORT}"]
    development = parse_env(renderer.render("config/dev/api.env.j2", host,
                                            api_url=f"http://{endpoint(host.address, API_PORT)}",
                                            web_urls=web_urls))
    merged = {key: value for key, value in production.items() if key not in COMPOSE_ONLY}
    merged.update(development)
    header = (f"# Managed by difyops (dev.backend) for {host.name}: Dify "
              f"{inventory.profile.version} from source against the home server. Holds secrets: "
              f"mode 0600.\n"
              f"# Values shared with production come from config/env/dify.env.j2; edits are "
              f"overwritten on the next run.\n"
              f"# The sandbox (:8194) and plugin daemon (:5002) are expected on this machine "
              f"when code nodes or plugins are used\n"
              f"# (e.g. from the checkout's docker/docker-compose.middleware.yaml).\n")
    return header + "".join(f"{key}={value}\n" for key, value in merged.items())


def in_api(api_dir: str, user: str, command: str) -> str:
    """A command run in the api folder as the dev user."""
    return f"cd {shell.quote(api_dir)} && {as_user(user)}{command}"


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """Reach the home server; uv; checkout; api/.env; sync; migrate; units; gates."""
    check(inventory)
    user = dev_user(inventory, host)
    root = backend_checkout(inventory)
    api_dir = f"{root}/api"
    uv_env = uv_environment(inventory)
    uv_run = f"{uv_env} {UV} run --no-sync"
    stamp = sync_stamp(inventory)
    env_file = f"{api_dir}/.env"
    units = {unit: f"{UNIT_DIR}/{unit}" for unit in (API_UNIT, WORKER_UNIT)}
    context = {"user": user, "api_dir": api_dir, "uv": UV, "api_port": API_PORT,
               "worker_name": WORKER_NAME, "ca_path": CA_PATH}
    primary = inventory.with_role("db_primary")[0]
    redis = (inventory.with_role("broker") or inventory.with_role("cache"))[0]
    db_port, redis_port = inventory.settings.db.port, inventory.settings.cache.port
    plan: list[Step] = [
        WaitFor(CommandGate(f"postgresql at {primary.name}:{db_port} reachable",
                            timeout=20, interval=2,
                            command=tcp_probe(primary.address, db_port))),
        WaitFor(CommandGate(f"redis at {redis.name}:{redis_port} reachable",
                            timeout=20, interval=2,
                            command=tcp_probe(redis.address, redis_port))),
        packages(*PACKAGES),
        RunCommand("install uv",
                   f"python3 -m venv {UV_HOME} && {pip_environment(inventory)} "
                   f"{UV_HOME}/bin/pip install --quiet uv && ln -sf {UV_HOME}/bin/uv {UV}",
                   unless=facts.all_found(UV)),
    ]
    plan += clone_steps(inventory, root, user)
    plan += [
        RunCommand(f"{api_dir} holds a Dify api", f"test -f {shell.quote(api_dir)}/pyproject.toml "
                   f"|| {{ echo 'no pyproject.toml in {api_dir}: dev.dify_source must be a Dify "
                   f"checkout' >&2; exit 1; }}", changes=False),
        WriteFile(env_file, api_env(inventory, renderer, host), mode=0o600, owner=user,
                  group=user, secret=True),
        *tls.ca_files(inventory, CA_PATH),
        RunCommand("install the api's dependencies (uv sync)",
                   in_api(api_dir, user, f"{uv_env} {UV} sync --frozen --no-dev --quiet")
                   + " && " + in_api(api_dir, user, "sh -c " + shell.quote(
                       f"{{ {stamp}; }} > {SYNC_STAMP}"))
                   + f" && {{ systemctl try-restart {API_UNIT} {WORKER_UNIT} 2>/dev/null; true; }}",
                   unless=in_api(api_dir, user, "sh -c " + shell.quote(
                       f"{{ {stamp}; }} | cmp -s - {SYNC_STAMP}"))),
        RunCommand("migrate the database (flask upgrade-db)",
                   in_api(api_dir, user, f"{uv_run} flask upgrade-db") + " && { "
                   + in_api(api_dir, user, f"{uv_run} flask db current") + " | grep -q '(head)' "
                   "|| { echo 'the database is not at the head revision after flask upgrade-db "
                   "(another process held the migration lock?): run the same command again' "
                   ">&2; exit 1; }; }",
                   unless=in_api(api_dir, user, f"{uv_run} flask db current 2>/dev/null")
                   + " | grep -q '(head)'"),
        *(WriteFile(path, renderer.render(f"config/dev/{unit}.j2", host, **context))
          for unit, path in units.items()),
        service_running(API_UNIT),
        service_running(WORKER_UNIT),
        RunCommand("restart the api and worker", f"systemctl daemon-reload && systemctl restart "
                   f"{API_UNIT} {WORKER_UNIT}", on_change=(env_file, *units.values())),
        WaitFor(HttpGate("api /health", timeout=120, interval=1,
                         url=f"http://{endpoint(host.address, API_PORT)}/health", contains='"ok"'),
                restart=restart_unit(API_UNIT)),
        WaitFor(HttpGate("api /console/api/setup (reads the database)", timeout=60, interval=1,
                         url=f"http://{endpoint(host.address, API_PORT)}/console/api/setup",
                         contains='"step"')),
        WaitFor(CommandGate(f"worker consumes the {len(inventory.profile.queues)} queues of "
                            f"Dify {inventory.profile.version}", timeout=300, interval=2,
                            probe_timeout=QUEUE_CHECK_TIMEOUT,
                            command=in_api(api_dir, user, f"{uv_run} python -c "
                                           f"{shell.quote(QUEUE_CHECK)} "
                                           + " ".join(map(shell.quote, (
                                               inventory.profile.celery_app,
                                               *inventory.profile.queues))))),
                restart=restart_unit(WORKER_UNIT)),
    ]
    return plan


def pip_environment(inventory: Inventory) -> str:
    """`env` for the pip that installs uv: the package index mirror when one is set."""
    index = inventory.settings.dev.package_index
    return f"env PIP_INDEX_URL={shell.quote(index)}" if index else "env"


def tcp_probe(address: str, port: int) -> str:
    """A command that exits 0 when address:port accepts a TCP connection (bash's /dev/tcp)."""
    return f"timeout 3 bash -c {shell.quote(f'exec 3<>/dev/tcp/{address}/{port}')}"


TIER = Tier("dev_backend", "Dify api and worker from a checkout on the development VM",
            ("dev_backend",), steps, depends_on=("db", "cache", "vector"))
