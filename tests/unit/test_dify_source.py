"""Every shipped version profile against its release's own source (tasks/core/dify_source.py).

The sources are the release tarballs kept beside the project (../shared/dify/dify-<v>.tar.gz), or
a Dify checkout or tarball named by DIFYOPS_DIFY_SOURCE (then only that release is checked). A
profile whose source is absent is skipped with that reason: a skip is not a pass.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tasks.core import secrets
from tasks.core.dify_source import SERVICE_NAMES, DifySource, draft_profile, open_source
from tasks.core.inventory import Inventory
from tasks.core.profiles import available_versions, load_profile, version_key
from tasks.core.project import ROOT
from tasks.core.render import Renderer
from tasks.tiers import lb
from tests.unit.conftest import BASE

SHARED = ROOT.parent / "shared" / "dify"
# Keys difyops renders into the api/worker environment that the api does not read itself, and
# who does read them.
READ_ELSEWHERE = {
    "SANDBOX_API_KEY": "docker compose interpolation: the sandbox's API_KEY",
    "OPENDAL_FS_ROOT": "the opendal storage, by its OPENDAL_<SCHEME>_ prefix",
    "DIFY_AGENT_SERVER_SECRET_KEY": "docker compose interpolation: agent_backend's environment",
    "DIFY_AGENT_SHELLCTL_AUTH_TOKEN": "docker compose interpolation: agent_backend, local_sandbox",
    "DIFY_AGENT_REDIS_URL": "docker compose interpolation: agent_backend's environment",
    "GUNICORN_CMD_ARGS": "gunicorn itself, which the api's entrypoint runs",
    "PGSSLMODE": "libpq, under the api's database and pgvector clients (psycopg2)",
    "PGSSLROOTCERT": "libpq, under the api's database and pgvector clients (psycopg2)",
}
# The api's own service names in Dify's compose file, and the profile image each one runs.
IMAGE_OF = {"worker": "api", "worker_beat": "api", "api_websocket": "api"}
# Release keys whose published values are the secrets difyops generates.
SECRET_KEYS = {"SECRET_KEY", "DB_PASSWORD", "REDIS_PASSWORD", "CODE_EXECUTION_API_KEY",
               "SANDBOX_API_KEY", "PLUGIN_DAEMON_KEY", "PLUGIN_DIFY_INNER_API_KEY",
               "INNER_API_KEY_FOR_PLUGIN", "WEAVIATE_API_KEY", "DIFY_AGENT_SERVER_SECRET_KEY",
               "DIFY_AGENT_API_TOKEN", "DIFY_AGENT_SHELLCTL_AUTH_TOKEN"}
SOURCED = [v for v in available_versions() if v != "1.5.1"]  # 1.5.1's source is not kept


def source_path(version: str) -> Path | None:
    """Where the source of a release is: DIFYOPS_DIFY_SOURCE, else the shared tarball."""
    named = os.environ.get("DIFYOPS_DIFY_SOURCE")
    if named:
        return Path(named)
    tarball = SHARED / f"dify-{version}.tar.gz"
    return tarball if tarball.is_file() else None


@pytest.fixture(scope="session")
def release(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], DifySource]:
    """The source of a release, unpacked once per session; skips when it is absent."""
    opened: dict[str, DifySource] = {}

    def get(version: str) -> DifySource:
        if version not in opened:
            path = source_path(version)
            if path is None:
                pytest.skip(f"no source of Dify {version}: neither {SHARED}/dify-{version}."
                            f"tar.gz nor DIFYOPS_DIFY_SOURCE")
            source = open_source(path, tmp_path_factory.mktemp(f"dify-{version}"))
            if source.version != version:
                pytest.skip(f"DIFYOPS_DIFY_SOURCE holds Dify {source.version}, not {version}")
            opened[version] = source
        return opened[version]

    return get


def inventory_for(load: Callable[..., Inventory], version: str) -> Inventory:
    """The unit tests' multi-host inventory on a release."""
    data = copy.deepcopy(BASE)
    data["dify"] = {"version": version}
    return load(data)


@pytest.mark.parametrize("version", SOURCED)
def test_queues_and_celery_app_are_the_entrypoints(release, version: str) -> None:
    source, profile = release(version), load_profile(version)
    assert profile.queues == source.queues
    assert profile.celery_app == source.celery_app


@pytest.mark.parametrize("version", SOURCED)
def test_the_api_env_turns_off_the_control_socket_of_the_releases_gunicorn(
        release, load, version: str) -> None:
    """gunicorn 25.1.0+ forks workers beside its control-socket thread (a worker can hang at
    boot); an older gunicorn would refuse the unknown flag."""
    source, profile = release(version), load_profile(version)
    assert profile.gunicorn == source.gunicorn
    inventory = inventory_for(load, version)
    env = Renderer(inventory).render("config/env/dify.env.j2", inventory.host("api1"))
    has_socket = version_key(source.gunicorn) >= (25, 1, 0)
    assert ("GUNICORN_CMD_ARGS=--no-control-socket" in env.splitlines()) == has_socket
    assert "GUNICORN_CMD_ARGS=" not in source.read("api/docker/entrypoint.sh")


@pytest.mark.parametrize("version", SOURCED)
def test_the_api_keeps_gunicorns_idle_timeout(release, version: str) -> None:
    """The balancer closes idle upstream connections after 1 s because the api's gunicorn
    closes them after its default 2 s: no release sets another (nginx/dify.conf.j2)."""
    source = release(version)
    entrypoint = source.read("api/docker/entrypoint.sh")
    assert "exec gunicorn" in entrypoint
    for text in (entrypoint, source.read("api/Dockerfile"), source.read("api/gunicorn.conf.py")):
        assert not re.search(r"keep-alive|keepalive|GUNICORN_CMD_ARGS", text), version


@pytest.mark.parametrize("version", SOURCED)
def test_services_and_images_are_the_compose_files(release, version: str) -> None:
    source, profile = release(version), load_profile(version)
    shipped = {name for name, facts in source.services.items()
               if name in SERVICE_NAMES and set(facts.profiles) <= {"collaboration"}}
    assert set(profile.services) - {"migration"} == shipped
    for name in shipped:
        assert profile.images[IMAGE_OF.get(name, name)] == source.services[name].image, name
    assert profile.images["weaviate"] == source.services["weaviate"].image


@pytest.mark.parametrize("version", SOURCED)
def test_every_rate_limited_sign_in_route_is_one_the_api_registers(release, version: str) -> None:
    controllers = release(version).root / "api" / "controllers"
    registered = {route for path in controllers.rglob("*.py")
                  for route in re.findall(r'"/([a-z-]+)[/"]', path.read_text())}
    assert [route for route in lb.SIGN_IN_ROUTES if route not in registered] == []


@pytest.mark.parametrize("version", SOURCED)
def test_routes_are_the_nginx_templates(release, version: str) -> None:
    source, profile = release(version), load_profile(version)
    assert set(profile.routes["api"]) == set(source.routes["api"])
    assert set(profile.routes["plugin_daemon"]) == set(source.routes["plugin_daemon"])
    assert set(profile.routes["web"]) == set(source.routes["web"])
    assert set(profile.routes["websocket"]) == set(source.routes.get("api_websocket", ()))


@pytest.mark.parametrize("version", SOURCED)
@pytest.mark.parametrize("host", ["api1", "worker1"])
def test_every_rendered_key_is_read_by_the_release(release, load, version: str,
                                                   host: str) -> None:
    source = release(version)
    inventory = inventory_for(load, version)
    env = Renderer(inventory).render("config/env/dify.env.j2", inventory.host(host))
    keys = [line.split("=", 1)[0] for line in env.splitlines()
            if line and not line.startswith("#")]
    unread = [key for key in keys if key not in source.env_keys_read]
    assert set(unread) <= set(READ_ELSEWHERE), unread
    assert 'prefix: str = "OPENDAL_"' in source.read("api/extensions/storage/opendal_storage.py")
    assert set(inventory.profile.env_required) <= source.env_keys_read


@pytest.mark.parametrize("version", SOURCED)
def test_the_releases_published_secrets_are_refused(release, version: str) -> None:
    source = release(version)
    published = {value for key, values in source.published_secrets.items()
                 if key in SECRET_KEYS for value in values}
    assert published, "the release publishes default secrets: the reader must find them"
    assert published <= secrets.PUBLISHED, published - secrets.PUBLISHED
    # The api's built-in default for the plugin daemon's key (when INNER_API_KEY_FOR_PLUGIN is
    # not set) is public too.
    assert source.setting_default("INNER_API_KEY_FOR_PLUGIN") in secrets.PUBLISHED


@pytest.mark.parametrize("version", SOURCED)
def test_upgrade_steps_are_flask_commands_of_the_release(release, version: str) -> None:
    source, profile = release(version), load_profile(version)
    for step in profile.upgrade_steps:
        assert step.command[0] in source.flask_commands, step.name
    assert "upgrade-db" in source.flask_commands


@pytest.mark.parametrize("version", SOURCED)
def test_a_draft_from_the_source_matches_the_profile(release, version: str) -> None:
    draft, profile = draft_profile(release(version)), load_profile(version)
    assert draft["version"] == profile.version
    assert draft["queues"] == list(profile.queues)
    assert draft["gunicorn"] == profile.gunicorn
    assert set(draft["services"]) == set(profile.services)
    assert {k: set(v) for k, v in draft["routes"].items()} == \
        {k: set(v) for k, v in profile.routes.items()}


def test_profile_draft_task_prints_the_release_facts(tmp_path: Path) -> None:
    path = source_path("1.16.1")
    if path is None:
        pytest.skip("no source of Dify 1.16.1")
    result = subprocess.run([sys.executable, "-m", "invoke", "config.profile-draft", str(path)],
                            cwd=ROOT, text=True, capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    draft = yaml.safe_load(result.stdout)
    if draft["version"] != "1.16.1":
        pytest.skip(f"DIFYOPS_DIFY_SOURCE holds Dify {draft['version']}, not 1.16.1")
    profile = load_profile("1.16.1")
    assert draft["queues"] == list(profile.queues)
    assert draft["images"]["agent_backend"] == profile.images["agent_backend"]


@pytest.mark.parametrize("version", SOURCED)
def test_every_key_of_the_home_lab_api_env_is_read_by_the_release(release, load,
                                                                   version: str) -> None:
    """api/.env of dev.backend (the production keys and config/dev/api.env.j2 on top)."""
    from tasks.tiers.dev_backend import api_env, parse_env

    source = release(version)
    data = copy.deepcopy(BASE)
    data["dify"] = {"version": version}
    data["cache"] = {"mode": "standalone"}
    data["dev"] = {"dify_source": "/home/dev/dify"}
    data["hosts"].append({"name": "vm", "address": "10.0.9.9", "roles": ["dev_backend"]})
    inventory = load(data)
    env = parse_env(api_env(inventory, Renderer(inventory), inventory.host("vm")))
    # FLASK_DEBUG: read by Flask's command line (`flask run`) from .env, not by Dify
    unread = set(env) - source.env_keys_read - {"FLASK_DEBUG"}
    assert unread <= set(READ_ELSEWHERE) - {"SANDBOX_API_KEY"}, sorted(unread)
