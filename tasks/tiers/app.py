"""app tier: the Dify services of each app host as one compose project, from one environment.

Start order across hosts, enforced by health gates (hosts of the tier run in parallel):
database and Redis reachable from every app host -> the plugin daemon up -> one migration run
on the first api host (the "migration host"), checked against the image's alembic head -> the
first api answering /console/api/setup (which needs a migrated database) -> every other api,
worker, beat and web host. A compose project runs no migration itself: MIGRATION_ENABLED=false
everywhere but in the one-off migration container.

Each app host keeps <deploy_dir>/release.json (the Dify version and images it runs). A deploy
refuses to change a host to another version or api image: that is `inv app.upgrade` (backup,
migration, one host at a time) or `inv app.rollback`.
"""

from __future__ import annotations

import json
import re

from tasks.core import facts, placement, shell, tls
from tasks.core.errors import InputError, Problem
from tasks.core.gates import CommandGate, HttpGate
from tasks.core.inventory import APP_ROLES, Host, Inventory, endpoint
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.project import display
from tasks.core.render import Renderer
from tasks.core.tiers import Tier
from tasks.tiers.cache import serves_tls
from tasks.tiers.common import compose_up, restart_compose, wait_bounded

# The uid the Dify api image runs as: storage must belong to it.
DIFY_UID = 1001
PROJECT = "dify"
MIGRATION_PROJECT = "dify-migration"
# Components that run the api image, and which components each role brings to a host.
ROLE_COMPONENTS = {
    "api": ("api", "sandbox", "ssrf_proxy"),
    "worker": ("api", "sandbox", "ssrf_proxy"),
    "beat": ("api",),
    "web": ("web",),
    "plugin_daemon": ("plugin_daemon",),
    # Only where placement.runs_agent says (a release with agent_backend, one host).
    placement.AGENT_ROLE: placement.AGENT_SERVICES,
}
LIMITED = ("api", "worker", "beat", "plugin_daemon", "web", "sandbox", "ssrf_proxy",
           "api_websocket", *placement.AGENT_SERVICES)
# A Celery ping of the worker of a container, from inside it, by the broker settings of its
# environment (Celery alone, not Dify: about a second). A worker whose ack failed while Redis
# failed over keeps that message counted as in flight, so at its prefetch limit it never asks the
# broker again; its control loop died with the same connection, so it no longer answers pings.
# Three pings of 3 s: a worker still reconnecting after a failover (a few seconds) answers one.
CELERY_PING = """\
import os, socket, sys
from celery import Celery
env = os.environ
app = Celery(broker=env["CELERY_BROKER_URL"])
if env.get("CELERY_USE_SENTINEL", "").lower() == "true":
    app.conf.broker_transport_options = {
        "master_name": env["CELERY_SENTINEL_MASTER_NAME"],
        "sentinel_kwargs": {"password": env.get("CELERY_SENTINEL_PASSWORD") or None}}
me = ["celery@" + socket.gethostname()]
sys.exit(0 if any(app.control.ping(me, timeout=3) for _ in range(3)) else 1)
"""
CPUS = re.compile(r"^\d+(\.\d+)?$")
MEMORY = re.compile(r"^\d+(\.\d+)?[kmgKMG]?[bB]?$")


def deploy_dir(inventory: Inventory) -> str:
    """Where the compose project and its environment live on every app host."""
    return inventory.settings.app.deploy_dir


def compose(directory: str, project: str = PROJECT) -> shell.Command:
    """The docker compose command line of a project in a folder."""
    return shell.compose(directory, project)


def migration_compose(inventory: Inventory) -> str:
    """docker compose of the one-off migration project (on the migration host)."""
    return compose(f"{deploy_dir(inventory)}/migration", MIGRATION_PROJECT)


def migration_host(inventory: Inventory) -> Host:
    """The api host that runs the one migration of a release: the first api host."""
    return inventory.with_role("api")[0]


def runs_redis_proxy(inventory: Inventory, host: Host) -> bool:
    """Whether a host runs redis_proxy (config/haproxy/redis-master.cfg.j2), the one way its
    containers reach Redis that the clients cannot manage themselves:
    - with tls.internal, every container that talks to Redis (Redis serves TLS only; Dify's
      Sentinel and cluster clients have no TLS settings, and the plugin daemon of Dify 1.5.1
      no CA setting: one way for every client and release);
    - in Sentinel mode, wherever a container reads Redis from REDIS_HOST:REDIS_PORT (Dify's
      pub/sub) or a redis:// URL (the agent backend), which cannot follow Sentinel. The plugin
      daemon then asks the sentinels itself."""
    internal_tls = inventory.settings.tls.internal
    if not (internal_tls or inventory.settings.cache.mode == "sentinel"):
        return False
    roles = ("api", "worker", "beat", "plugin_daemon") if internal_tls else ("api", "worker",
                                                                             "beat")
    return host.has(*roles) or placement.runs_agent(inventory, host)


def proxied_redis(inventory: Inventory) -> list[Host]:
    """The hosts redis_proxy forwards to, the one answering role:master taking every connection:
    the cache hosts with Sentinel, the broker with a Redis Cluster (whose nodes Dify's cluster
    client reaches itself), else the one cache host."""
    mode = inventory.settings.cache.mode
    if mode == "sentinel":
        return inventory.with_role("cache")
    return inventory.with_role("broker" if mode == "cluster" else "cache")[:1]


# Services whose compose definition reads nothing of the host's .env (no env_file, no ${...}).
WITHOUT_DIFY_ENV = frozenset({"web", "ssrf_proxy", "redis_proxy"})


def reads_dify_env(inventory: Inventory, host: Host) -> bool:
    """Whether a service of the host reads Dify's environment (a web host's do not)."""
    return not set(services_of(inventory, host)) <= WITHOUT_DIFY_ENV


def environment(inventory: Inventory, renderer: Renderer, host: Host) -> str:
    """The host's .env: Dify's whole environment where a service reads it; a host that runs
    only services that read none of it (a web host) gets none of its secrets."""
    if not reads_dify_env(inventory, host):
        return (f"# Managed by difyops (app tier) for {host.name}: its services "
                f"({', '.join(services_of(inventory, host))}) read none of Dify's environment, "
                "so none of its secrets is kept here.\n")
    return renderer.render("config/env/dify.env.j2", host)


def ca_host_path(inventory: Inventory) -> str:
    """Where the CA certificate of tls.internal lies on an app host."""
    return f"{deploy_dir(inventory)}/tls/{tls.CA_FILE}"


def ca_volume(inventory: Inventory) -> str | None:
    """The CA certificate's read-only mount into the containers that connect to PostgreSQL
    (None without tls.internal)."""
    return f"{ca_host_path(inventory)}:{tls.CONTAINER_CA}:ro" if inventory.settings.tls.internal \
        else None


def volumes(inventory: Inventory) -> dict[str, object]:
    """The mounts the compose templates give Dify's api image (storage, the CA) and the CA's."""
    storage = inventory.settings.storage
    mounts = [f"{storage.path}:/app/api/storage"] if storage.type != "s3" else []
    ca = ca_volume(inventory)
    return {"dify_volumes": mounts + ([ca] if ca else []), "ca_volume": ca}


def host_roles(inventory: Inventory, host: Host) -> tuple[str, ...]:
    """The host's app roles that run something with this release (`agent` only where the
    release has the agent services)."""
    return tuple(role for role in ROLE_COMPONENTS if host.has(role) and (
        role != placement.AGENT_ROLE or placement.runs_agent(inventory, host)))


def host_images(inventory: Inventory, host: Host) -> dict[str, str]:
    """component -> image for every component this host runs (as the host names it);
    api_websocket runs the api image."""
    components = {c for role in host_roles(inventory, host) for c in ROLE_COMPONENTS[role]}
    if runs_redis_proxy(inventory, host):
        components.add("redis_proxy")
    return {component: inventory.image(component) for component in sorted(components)}


def compose_file(inventory: Inventory, renderer: Renderer, host: Host) -> str:
    """The host's compose project (its components decide which services it holds)."""
    return renderer.render("compose/app.yml.j2", host, celery_ping=CELERY_PING,
                           components=host_images(inventory, host), **volumes(inventory))


def worker_services(inventory: Inventory, host: Host) -> list[str]:
    """The compose services of the worker groups this host runs (worker_<group>)."""
    if not host.has("worker"):
        return []
    groups = [g["name"] for g in inventory.settings.app.worker_groups]
    return [f"worker_{name}" for name in groups if name in (host.worker_groups or groups)]


def services_of(inventory: Inventory, host: Host) -> list[str]:
    """The compose services this host runs (what `inv app.status` expects to find)."""
    found = []
    if host.has("api"):
        found.append("api")
        if placement.websocket_enabled(inventory):
            found.append("api_websocket")
    found += worker_services(inventory, host)
    if host.has("beat"):
        found.append("worker_beat")
    if host.has("web"):
        found.append("web")
    if host.has("plugin_daemon"):
        found.append("plugin_daemon")
    if host.has("api", "worker"):
        found += ["sandbox", "ssrf_proxy"]
    if runs_redis_proxy(inventory, host):
        found.append("redis_proxy")
    if placement.runs_agent(inventory, host):
        found += list(placement.AGENT_SERVICES)
    return found


def release(inventory: Inventory, host: Host) -> dict:
    """What a host runs after a deploy: the Dify version and its images."""
    return {"version": inventory.profile.version, "images": host_images(inventory, host)}


def release_text(record: dict) -> str:
    """release.json's content (one key per line: the release check greps it)."""
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def check_limits(inventory: Inventory) -> None:
    """Resource limits must be what compose understands; refused before any host is touched."""
    app, problems = inventory.settings.app, []
    for service in LIMITED:
        cpus, memory = app[service]["cpus"], app[service]["memory"]
        if cpus and not (CPUS.match(cpus) and float(cpus) > 0):
            problems.append(Problem(display(inventory.file), f"app.{service}.cpus",
                                    f"{cpus!r} is not a number of CPUs",
                                    'write it as a quoted number, e.g. cpus: "2" or "0.5"'))
        if memory and not MEMORY.match(memory):
            problems.append(Problem(display(inventory.file), f"app.{service}.memory",
                                    f"{memory!r} is not an amount of memory",
                                    'write a number with a unit, e.g. memory: "4g" or "512m"'))
    if problems:
        raise InputError(problems)


def release_check(inventory: Inventory, host: Host) -> RunCommand:
    """Fail when the host runs another version or api image than the inventory asks for."""
    path = f"{deploy_dir(inventory)}/release.json"
    record = release(inventory, host)
    wanted = [f'"version": "{record["version"]}"']
    if "api" in record["images"]:
        wanted.append(f'"api": "{record["images"]["api"]}"')
    greps = shell.chain(shell.command("grep -qF {} {}", w, path) for w in wanted)
    running = shell.command("$(sed -n 's/^  \"version\": \"\\(.*\\)\"$/\\1/p' {})", path)
    rest = (f" ({path}), not the inventory's {record['version']} with "
            f"{record['images'].get('api', 'its images')}: change releases with inv app.upgrade "
            f"--version {record['version']} (backup, migration, one host at a time) or "
            f"inv app.rollback")
    # Only the running version is expanded by the shell; every other word is quoted.
    message = shell.command('{}"{}"{}', f"{host.name} runs Dify ", running, rest)
    return RunCommand("release check", shell.command(
        "test ! -f {path} || {{ {greps}; }} || {{ echo {message} >&2; exit 1; }}",
        path=path, greps=greps, message=message), changes=False)


def at_head_probe(inventory: Inventory) -> str:
    """Exit 0 when the database's alembic revision is the api image's head (`flask db current`
    marks a revision that is a head of the image's migration scripts with "(head)")."""
    return (f"{migration_compose(inventory)} run --rm -T --entrypoint flask migration "
            f"db current 2>/dev/null | grep -q '(head)'")


def migrate_step(inventory: Inventory) -> RunCommand:
    """One migration run, unless the database is at the image's head already; verified after,
    since `flask upgrade-db` exits 0 even when it skipped (another process held its lock)."""
    probe = at_head_probe(inventory)
    message = ("the migration exited 0 but the database is not at the alembic head of the api "
               "image (skipped because another process held db_upgrade_lock, or failed)")
    run = f"{migration_compose(inventory)} run --rm -T migration"
    return RunCommand("migrate the database (one run)",
                      f"out=$({run} 2>&1) || {{ printf '%s\\n' \"$out\" | tail -n 5 >&2; "
                      f"exit 1; }}; {probe} || {{ echo \"{message}; it printed: "
                      f"$(printf '%s' \"$out\" | tail -n 1); fix the cause and rerun\" >&2; "
                      f"exit 1; }}",
                      unless=probe)


def reachable(name: str, address: str, port: int, timeout: float) -> WaitFor:
    """A TCP port answering from the app host itself (not from the control machine)."""
    return WaitFor(CommandGate(f"{name} reachable at {endpoint(address, port)}", timeout=timeout,
                               interval=2,
                               command=shell.command("timeout 3 bash -c {}",
                                                     f"</dev/tcp/{address}/{port}")))


def redis_endpoint(inventory: Inventory) -> tuple[str, int]:
    """The Redis the app reaches first: a broker host, else the first cache host (Sentinel's
    port in sentinel mode)."""
    cache = inventory.settings.cache
    hosts = inventory.with_role("broker") or inventory.with_role("cache")
    port = cache.sentinel_port if cache.mode == "sentinel" and not \
        inventory.with_role("broker") else cache.port
    return hosts[0].address, port


def steps(inventory: Inventory, renderer: Renderer, host: Host, *,
          release_guard: bool = True, migrate: bool = True) -> list[Step]:
    """Files, checks, storage, images; then the start order with its gates (module doc).

    release_guard=False, migrate=False: the plan of one host in a rolling upgrade or rollback,
    which checks the release and migrates once for all hosts before it replaces any.
    """
    check_limits(inventory)
    if not host_roles(inventory, host):
        return []  # e.g. role `agent` alone with a release that has no agent services
    agent = placement.runs_agent(inventory, host)
    directory = deploy_dir(inventory)
    timeout = inventory.settings.app.health_timeout
    env = environment(inventory, renderer, host)
    files = [
        WriteFile(f"{directory}/.env", env, mode=0o600, secret=True),
        WriteFile(f"{directory}/compose.yml", compose_file(inventory, renderer, host)),
    ]
    if host.has("plugin_daemon"):
        files.append(WriteFile(f"{directory}/plugin_daemon.env",
                               renderer.render("config/env/plugin-daemon.env.j2", host),
                               mode=0o600, secret=True))
    if reads_dify_env(inventory, host):
        files += tls.ca_files(inventory, ca_host_path(inventory))
    if runs_redis_proxy(inventory, host):
        files.append(WriteFile(f"{directory}/redis-proxy.cfg",
                               renderer.render("config/haproxy/redis-master.cfg.j2", host,
                                               servers=[(node, serves_tls(inventory, node))
                                                        for node in proxied_redis(inventory)]),
                               mode=0o600, secret=True))
    if host.has("api", "worker"):
        files.append(WriteFile(f"{directory}/squid.conf",
                               renderer.render("config/squid/squid.conf.j2", host, proxy="ssrf")))
    if agent:
        files.append(WriteFile(f"{directory}/squid-agent.conf",
                               renderer.render("config/squid/squid.conf.j2", host, proxy="agent")))
    triggers = tuple(step.path for step in files)
    migrator = migration_host(inventory)
    is_migrator = host.name == migrator.name
    plan: list[Step] = [release_check(inventory, host)] if release_guard else []
    plan += files
    if is_migrator:
        plan += [
            WriteFile(f"{directory}/migration/.env", env, mode=0o600, secret=True),
            WriteFile(f"{directory}/migration/compose.yml",
                      renderer.render("compose/app-migration.yml.j2", host,
                                      redis_proxy_network=f"{PROJECT}_default"
                                      if runs_redis_proxy(inventory, host) else "",
                                      **volumes(inventory))),
        ]
    plan.append(WriteFile(f"{directory}/release.json", release_text(release(inventory, host))))
    plan.append(RunCommand(
        "docker engine and compose v2",
        "docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1 || { echo "
        "'this host needs a running Docker Engine with the compose v2 plugin (docker.io or "
        "docker-ce, and docker-compose-plugin)' >&2; exit 1; }", changes=False))
    storage = inventory.settings.storage
    if host.has("api", "worker") and storage.type != "s3":
        plan.append(RunCommand(
            f"storage {storage.path} owned by uid {DIFY_UID}",
            shell.command("mkdir -p {0} && chown {1}:{1} {0}", storage.path, DIFY_UID),
            unless=facts.is_directory(storage.path, uid=DIFY_UID)))
    images = sorted(set(host_images(inventory, host).values()))
    plan.append(RunCommand(
        "images present",
        f"{compose(directory)} pull --quiet || {{ echo 'cannot pull the images: where hosts "
        f"reach no registry, ship them with inv images.sync' >&2; exit 1; }}",
        unless=shell.command("{} >/dev/null 2>&1", shell.words("docker", "image", "inspect",
                                                               *images))))
    if host.has("api", "worker", "beat", "plugin_daemon") or agent:
        primary = inventory.with_role("db_primary")[0]
        plan.append(reachable("PostgreSQL", primary.address, inventory.settings.db.port,
                              timeout))
        plan.append(reachable("Redis", *redis_endpoint(inventory), timeout))
    if host.has("plugin_daemon"):
        plan.append(RunCommand("compose up plugin_daemon", wait_bounded(
            compose(directory), f"{compose(directory)} up -d --wait plugin_daemon", timeout,
            "plugin_daemon"), on_change=triggers))
    daemons = [pd for pd in inventory.with_role("plugin_daemon") if pd.name != host.name]
    if is_migrator:
        if runs_redis_proxy(inventory, host):
            # The migration's Redis clients reach Redis through it too (on this project's
            # network, which the migration project joins).
            plan.append(RunCommand("compose up redis_proxy",
                                   f"{compose(directory)} up -d redis_proxy",
                                   on_change=triggers))
        if migrate:
            plan.append(migrate_step(inventory))
    else:
        plan.append(WaitFor(HttpGate(
            f"{migrator.name} api /console/api/setup (database migrated)", timeout=timeout,
            interval=2, url=f"http://{endpoint(migrator.address, 5001)}/console/api/setup")))
    if host.has("api") or agent:  # agent_backend calls the plugin daemon too
        plan += [WaitFor(HttpGate(f"plugin daemon on {pd.name}", timeout=timeout, interval=2,
                                  url=f"http://{endpoint(pd.address, 5002)}/health/check"))
                 for pd in daemons]
    plan.append(compose_up(directory, PROJECT, *triggers, wait_timeout=timeout))
    plan += gates(inventory, host)
    return plan


def gates(inventory: Inventory, host: Host) -> list[WaitFor]:
    """The health answers of the services this host serves (probed from the control machine);
    each worker by a Celery ping and local_sandbox, which only agent_backend reaches, by its
    healthcheck, both on the host."""
    timeout = inventory.settings.app.health_timeout
    api, agent = host.has("api"), placement.runs_agent(inventory, host)
    websocket = api and placement.websocket_enabled(inventory)
    port = inventory.settings.app.websocket_port
    # (service, port, path, answer contains, whether this host runs it)
    probes = [("api", 5001, "/health", "ok", api), ("api", 5001, "/console/api/setup", "", api),
              ("api_websocket", port, "/health", "ok", websocket),
              ("plugin_daemon", 5002, "/health/check", "", host.has("plugin_daemon")),
              ("web", 3000, "/", "", host.has("web")),
              ("agent_backend", placement.AGENT_PORT, placement.AGENT_HEALTH_PATH, "", agent)]
    directory = deploy_dir(inventory)
    found = [WaitFor(HttpGate(f"{service} {path}", timeout=timeout, interval=1,
                              contains=contains,
                              url=f"http://{endpoint(host.address, port)}{path}"),
                     restart=restart_compose(directory, PROJECT, service))
             for service, port, path, contains, runs in probes if runs]
    found += [WaitFor(CommandGate(f"{service} answers a Celery ping", timeout=timeout, interval=2,
                                  command=shell.command("{} exec -T {} python -c {}",
                                                        compose(directory), service,
                                                        CELERY_PING)),
                      restart=restart_compose(directory, PROJECT, service))
              for service in worker_services(inventory, host)]
    if agent:
        found.append(WaitFor(CommandGate(
            f"local_sandbox healthy (:{placement.SHELLCTL_PORT}/healthz)", timeout=timeout,
            interval=1, command=f"{compose(directory)} ps --format '{{{{.Health}}}}' "
                                f"local_sandbox | grep -qx healthy"),
            restart=restart_compose(directory, PROJECT, "local_sandbox")))
    return found


def leaders(inventory: Inventory) -> list[Host]:
    """The hosts the others wait on: the migration host, then the plugin daemon hosts."""
    return [*inventory.with_role("api")[:1], *inventory.with_role("plugin_daemon")]


TIER = Tier("app", "Dify services on the app hosts", APP_ROLES, steps,
            depends_on=("db", "cache", "vector"), leaders=leaders, validate=True)
