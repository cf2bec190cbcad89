"""Reading a Dify release's own source: the facts a version profile must agree with.

A release is a folder (a Dify checkout, or a release tarball unpacked) holding `api/` and
`docker/`. Everything here is read from the files the release ships, by code: the worker's queue
list and Celery app from `api/docker/entrypoint.sh`, the api's gunicorn from `api/uv.lock`,
services and images from `docker/docker-compose.yaml`, routes from the nginx template, the
environment keys the api reads from its settings classes (`api/configs/`) and its own
`os.environ` reads, published default secrets from the example env files and the compose file's
`${VAR:-default}` defaults, and flask commands from `api/commands/`. Used by the profile test and
by `inv config.profile-draft`.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

from tasks.core.errors import DifyopsError

ASSIGNMENT = re.compile(r'^\s*DEFAULT_QUEUES="([^"$]*)"\s*$')
CELERY_WORKER = re.compile(r"celery -A (\S+) worker")
LOCATION = re.compile(r"location\s+(\S+)\s*\{(.*?)\n\s*\}", re.S)
PROXY_PASS = re.compile(r"proxy_pass\s+http://([^;:/$]+)(?::\d+)?;")
SETTING = re.compile(r"^\s+([A-Z][A-Z0-9_]+)\s*:\s*[^=\n]", re.M)
ALIAS = re.compile(r'(?:AliasChoices\(|validation_alias=|alias=)([^)\n]*)')
QUOTED_KEY = re.compile(r'"([A-Z][A-Z0-9_]+)"')
ENV_READ = re.compile(r'(?:os\.environ\.get|os\.getenv|os\.environ\[)\(?\s*"([A-Z][A-Z0-9_]+)"')
SHELL_VAR = re.compile(r"\$\{([A-Z][A-Z0-9_]+)")
COMPOSE_DEFAULT = re.compile(r"\$\{([A-Z][A-Z0-9_]+):-([^}$]*)\}")
CLICK_COMMAND = re.compile(r'@click\.command\(\s*"([a-z0-9-]+)"')
VERSION = re.compile(r'^version\s*=\s*"([^"]+)"', re.M)
LOCKED_GUNICORN = re.compile(r'^\[\[package\]\]\nname = "gunicorn"\nversion = "([^"]+)"', re.M)
# Keys whose published values are secrets (a deployment must never keep them).
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|_KEY$|API_KEY|TOKEN$|ALLOWED_KEYS)")


class SourceError(DifyopsError):
    """The folder is not a Dify release's source, or a file in it has an unknown shape."""


@dataclass(frozen=True)
class ServiceFacts:
    """One service of the release's compose file."""

    name: str
    image: str
    profiles: tuple[str, ...]


class DifySource:
    """One Dify release's source folder (holding api/ and docker/)."""

    def __init__(self, root: Path) -> None:
        if not (root / "api" / "docker" / "entrypoint.sh").is_file():
            raise SourceError(f"{root} is not a Dify source folder (no api/docker/entrypoint.sh)")
        self.root = root

    def read(self, relative: str) -> str:
        """A file of the release, as text."""
        path = self.root / relative
        if not path.is_file():
            raise SourceError(f"{self.root}: the release has no {relative}")
        return path.read_text(encoding="utf-8", errors="replace")

    @cached_property
    def version(self) -> str:
        """The release's version, from api/pyproject.toml."""
        found = VERSION.search(self.read("api/pyproject.toml"))
        if not found:
            raise SourceError(f"{self.root}: no version in api/pyproject.toml")
        return found.group(1)

    @cached_property
    def queues(self) -> tuple[str, ...]:
        """The worker's default queue list of a self-hosted installation: the literal list the
        entrypoint assigns outside its `EDITION == CLOUD` branch."""
        lists: list[tuple[bool, tuple[str, ...]]] = []
        cloud = False
        for line in self.read("api/docker/entrypoint.sh").splitlines():
            if "EDITION" in line and "CLOUD" in line and line.strip().startswith("if"):
                cloud = True
            elif line.strip() in ("else", "fi"):
                cloud = False
            found = ASSIGNMENT.match(line)
            if found:
                lists.append((cloud, tuple(q for q in found.group(1).split(",") if q)))
        self_hosted = [queues for in_cloud, queues in lists if not in_cloud]
        if len(self_hosted) != 1:
            raise SourceError(f"{self.root}: expected one self-hosted DEFAULT_QUEUES list in "
                              f"api/docker/entrypoint.sh, found {len(self_hosted)}")
        return self_hosted[0]

    @cached_property
    def celery_app(self) -> str:
        """The Celery application the worker starts (`celery -A <app> worker`)."""
        found = CELERY_WORKER.search(self.read("api/docker/entrypoint.sh"))
        if not found:
            raise SourceError(f"{self.root}: no `celery -A ... worker` in the entrypoint")
        return found.group(1)

    @cached_property
    def gunicorn(self) -> str:
        """The gunicorn version the api image installs (api/uv.lock)."""
        found = LOCKED_GUNICORN.search(self.read("api/uv.lock"))
        if not found:
            raise SourceError(f"{self.root}: no gunicorn package in api/uv.lock")
        return found.group(1)

    @cached_property
    def compose(self) -> dict:
        """docker/docker-compose.yaml, parsed."""
        return yaml.safe_load(self.read("docker/docker-compose.yaml"))

    @cached_property
    def services(self) -> dict[str, ServiceFacts]:
        """Every service of the compose file with its image and compose profiles."""
        return {name: ServiceFacts(name, str(body.get("image", "")),
                                   tuple(body.get("profiles") or ()))
                for name, body in self.compose["services"].items()}

    @cached_property
    def routes(self) -> dict[str, tuple[str, ...]]:
        """upstream service -> location prefixes, from the release's nginx template; a location
        whose upstream is a variable (Socket.IO) is keyed by the service the variable defaults to
        in the compose file."""
        text = self.read("docker/nginx/conf.d/default.conf.template")
        routes: dict[str, list[str]] = {}
        for prefix, body in LOCATION.findall(text):
            found = PROXY_PASS.search(body)
            if found:
                upstream = found.group(1)
            elif "proxy_pass" in body and "$" in body:
                upstream = self.variable_upstream(body)
            else:
                continue
            routes.setdefault(upstream, []).append(prefix)
        return {upstream: tuple(prefixes) for upstream, prefixes in routes.items()}

    def variable_upstream(self, body: str) -> str:
        """The service a `set $x ${NGINX_...}` location points at by the compose default."""
        variable = re.search(r"set\s+\$\w+\s+\$\{(\w+)\}", body)
        default = variable and re.search(r"\$\{" + variable.group(1) + r":-([^}:]+)",
                                         self.read("docker/docker-compose.yaml"))
        if not default:
            raise SourceError(f"{self.root}: an nginx location whose upstream has no default")
        return default.group(1)

    @cached_property
    def env_keys_read(self) -> frozenset[str]:
        """Every environment key the api/worker/beat image reads: the settings classes' fields
        and aliases, the api's own os.environ reads, and the variables its entrypoint and
        gunicorn configuration use."""
        keys: set[str] = set()
        for path in (self.root / "api" / "configs").rglob("*.py"):
            text = path.read_text(encoding="utf-8", errors="replace")
            keys.update(SETTING.findall(text))
            for aliases in ALIAS.findall(text):
                keys.update(QUOTED_KEY.findall(aliases))
        for path in (self.root / "api").rglob("*.py"):
            if "tests" in path.parts or ".venv" in path.parts:
                continue
            keys.update(ENV_READ.findall(path.read_text(encoding="utf-8", errors="replace")))
        keys.update(SHELL_VAR.findall(self.read("api/docker/entrypoint.sh")))
        for name in ("api/gunicorn.conf.py", "api/docker/gunicorn.conf.py"):
            if (self.root / name).is_file():
                keys.update(ENV_READ.findall(self.read(name)))
        return frozenset(keys)

    def setting_default(self, key: str) -> str:
        """The default the api's settings give a key (`KEY: str = Field(..., default="...")`)."""
        for path in (self.root / "api" / "configs").rglob("*.py"):
            text = path.read_text(encoding="utf-8", errors="replace")
            found = re.search(r"^\s+" + key + r"\s*:[^\n]*?Field\((.*?)\n\s{4}\)?[A-Z#\n]",
                              text, re.M | re.S)
            default = found and re.search(r'default\s*=\s*"([^"]*)"', found.group(1))
            if default:
                return default.group(1)
        raise SourceError(f"{self.root}: no string default for {key} in api/configs")

    @cached_property
    def published_secrets(self) -> dict[str, frozenset[str]]:
        """key -> the values the release publishes for it, for every secret-like key: from its
        example env files and its compose file's `${KEY:-default}` defaults."""
        found: dict[str, set[str]] = {}
        docker = self.root / "docker"
        examples = [p for p in docker.rglob("*.env.example")] + \
            [p for p in (docker / ".env.example",) if p.is_file()]
        for path in examples:
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                key, sep, value = line.partition("=")
                if sep and not key.startswith("#") and SECRET_NAME.search(key.strip()):
                    value = value.strip().strip("'\"")
                    if value:
                        found.setdefault(key.strip(), set()).add(value)
        for key, value in COMPOSE_DEFAULT.findall(self.read("docker/docker-compose.yaml")):
            if SECRET_NAME.search(key) and value:
                found.setdefault(key, set()).add(value)
        return {key: frozenset(values) for key, values in found.items()}

    @cached_property
    def flask_commands(self) -> frozenset[str]:
        """The names of the release's flask commands (api/commands)."""
        names: set[str] = set()
        for path in (self.root / "api" / "commands").rglob("*.py"):
            names.update(CLICK_COMMAND.findall(path.read_text(encoding="utf-8",
                                                              errors="replace")))
        if (self.root / "api" / "commands.py").is_file():
            names.update(CLICK_COMMAND.findall(self.read("api/commands.py")))
        return frozenset(names)


def open_source(path: Path, scratch: Path) -> DifySource:
    """A Dify release from a checkout folder, or from a release tarball unpacked into scratch."""
    if path.is_dir():
        return DifySource(path)
    if not tarfile.is_tarfile(path):
        raise SourceError(f"{path} is neither a Dify checkout nor a release tarball")
    with tarfile.open(path) as archive:
        archive.extractall(scratch, filter="data")
    tops = [child for child in scratch.iterdir() if child.is_dir()]
    root = tops[0] if len(tops) == 1 and not (scratch / "api").is_dir() else scratch
    return DifySource(root)


def draft_profile(source: DifySource) -> dict:
    """A profile's facts as the release states them (images of the services difyops runs,
    queues, Celery app, gunicorn, routes): a maintainer reviews and completes it."""
    services = source.services
    images = {name: services[name].image for name in
              ("api", "web", "plugin_daemon", "sandbox", "ssrf_proxy", "agent_backend",
               "local_sandbox", "agent_ssrf_proxy", "weaviate") if name in services}
    routes = source.routes
    return {
        "version": source.version,
        "images": images,
        "queues": list(source.queues),
        "celery_app": source.celery_app,
        "gunicorn": source.gunicorn,
        "services": [name for name in services if name in SERVICE_NAMES] + ["migration"],
        "routes": {
            "api": list(routes.get("api", ())),
            "plugin_daemon": list(routes.get("plugin_daemon", ())),
            "websocket": list(routes.get("api_websocket", ())),
            "web": list(routes.get("web", ())),
        },
    }


# Services of Dify's compose file that difyops deploys (the rest are databases, vector stores,
# nginx and helpers that difyops replaces with tiers of its own).
SERVICE_NAMES = frozenset({"api", "api_websocket", "worker", "worker_beat", "web",
                           "plugin_daemon", "sandbox", "ssrf_proxy", "agent_backend",
                           "local_sandbox", "agent_ssrf_proxy"})
