"""The inventory: what should exist and where, read from YAML and checked against the schema.

config/defaults.yml is both the defaults and the schema of the settings; tasks/core/schema.py
reads its value types and freezes the checked settings. Hosts are checked here (shape, names,
addresses, roles); the rules that relate settings to each other live in tasks/core/rules.py and
the secrets in tasks/core/secrets.py. Every problem is collected and reported at once, before
any host is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.core import schema
from tasks.core.errors import InputError, Problem
from tasks.core.profiles import VersionProfile, available_versions, load_profile
from tasks.core.project import DEFAULTS_FILE, ROOT, default_secrets_path, display

ROLES: dict[str, str] = {
    "lb": "nginx load balancer in front of Dify",
    "web": "Dify web front end (Next.js)",
    "api": "Dify api (MODE=api), with its sandbox and SSRF proxy",
    "worker": "Dify Celery workers, with their sandbox and SSRF proxy",
    "beat": "the one Celery beat scheduler of the installation",
    "plugin_daemon": "the one Dify plugin daemon",
    "agent": "Dify's agent backend, local sandbox and its SSRF proxy (1.16.1+; default: the "
             "first api host)",
    "db_primary": "PostgreSQL primary",
    "db_replica": "PostgreSQL streaming replica",
    "cache": "Redis (and Sentinel in sentinel mode)",
    "broker": "standalone Redis for Celery and the plugin daemon when the cache is a Cluster",
    "vector": "Weaviate node",
    "monitor": "Prometheus, Alertmanager, Grafana",
    "logging": "log collection (Elasticsearch stack)",
    "dev_server": "home-lab server with the base services for development",
    "dev_backend": "development machine running the Dify api and worker from source",
    "dev_frontend": "development machine running the Dify web front end from source",
}
APP_ROLES = ("api", "worker", "beat", "web", "plugin_daemon", "agent")
HOST_KEYS = ("name", "address", "connection", "ssh", "roles", "labels", "size", "worker_groups")
SSH_KEYS = {"user": "root", "port": 22, "key": ""}
SIZE_KEYS = ("cpu", "memory_gb", "disk_gb")
WORKER_GROUP_KEYS = {"name": "", "queues": "all", "concurrency": 4}
FREEFORM_MAPS = ("dify.images",)
HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Ssh:
    """How to reach a host over SSH."""

    user: str = "root"
    port: int = 22
    key: str = ""
    # The known_hosts file its host key is checked against: the inventory's (not a host
    # setting; filled in by load_inventory).
    known_hosts: str = field(default="", compare=False)


@dataclass(frozen=True)
class Host:
    """One machine of the inventory and the roles it plays."""

    name: str
    address: str
    connection: str = "ssh"
    ssh: Ssh = field(default_factory=Ssh)
    roles: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    worker_groups: tuple[str, ...] = ()

    def has(self, *roles: str) -> bool:
        """Whether the host plays any of the given roles."""
        return any(role in self.roles for role in roles)

    @property
    def target(self) -> str:
        """How the operator recognises the host in messages: name and address."""
        if self.connection == "local":
            return f"{self.name} (local)"
        return f"{self.name} ({self.ssh.user}@{endpoint(self.address, self.ssh.port)})"


@dataclass
class Inventory:
    """A validated inventory: settings merged over the defaults, hosts, profile and secrets."""

    file: Path
    settings: schema.Section
    hosts: list[Host]
    profile: VersionProfile
    secrets_file: Path
    secrets: dict[str, str] = field(default_factory=dict)
    known_hosts: Path | None = None  # the SSH host keys every connection checks (hostkeys.py)

    @property
    def name(self) -> str:
        """The inventory's name (names the secrets file and the compose projects)."""
        return self.settings.name

    def with_role(self, *roles: str) -> list[Host]:
        """The hosts playing any of the roles, in inventory order."""
        return [host for host in self.hosts if host.has(*roles)]

    def host(self, name: str) -> Host:
        """The host of that name; an unknown name is an input error naming the inventory."""
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts)
        raise InputError([Problem(display(self.file), "hosts", f"no host named {name!r}",
                                  f"use one of: {known}")])

    def image(self, component: str) -> str:
        """The image of a component as hosts name it: behind the private registry when one is
        set, else as pulled from upstream (see upstream_image)."""
        registry = self.settings.dify.private_registry.rstrip("/")
        if registry:
            return f"{registry}/{self.base_image(component)}"
        return self.upstream_image(component)

    def upstream_image(self, component: str) -> str:
        """The image of a component as pulled from upstream: override or profile, mirrored."""
        return self.settings.dify.registry_mirror + self.base_image(component)

    def base_image(self, component: str) -> str:
        """The image name without any registry prefix: inventory override, else the profile
        (difyops' own components: their setting)."""
        own = {"redis_proxy": self.settings.cache.proxy_image}
        return (self.settings.dify.images.get(component) or own.get(component)
                or self.profile.images[component])

    def worker_queues(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        """The queues a worker group consumes in this Dify release: `all` is every queue of the
        release, `rest` every queue of the release that no other group lists by name."""
        queues = group["queues"]
        if queues == "all":
            return self.profile.queues
        if queues == "rest":
            listed = {queue for other in self.settings.app.worker_groups
                      if isinstance(other["queues"], tuple) for queue in other["queues"]}
            return tuple(queue for queue in self.profile.queues if queue not in listed)
        return tuple(queues)

    @property
    def is_dev_layout(self) -> bool:
        """A home-lab inventory: the app runs from source on development machines."""
        return bool(self.with_role("dev_backend", "dev_frontend"))


def read_yaml(path: Path) -> tuple[Any, list[Problem]]:
    """Parse a YAML file, turning a missing file or a syntax error into a problem."""
    shown = display(path)
    if not path.is_file():
        return None, [Problem(shown, "(file)", "the inventory file does not exist",
                              "pass an existing file with DIFY_INVENTORY=path, or create it "
                              "from config/inventories/local.yml")]
    try:
        return yaml.safe_load(path.read_text()) or {}, []
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        return None, [Problem(shown, where, f"not valid YAML: {getattr(exc, 'problem', exc)}",
                              "fix the syntax (indentation, quotes, colons) at that line")]


def load_inventory(path: Path, *, check_secrets: bool = True) -> Inventory:
    """Read, merge, check and return the inventory, or raise InputError listing every problem."""
    from tasks.core import hostkeys, placement, rules, secrets  # they need the model here

    data, problems = read_yaml(path)
    if problems:
        raise InputError(problems)
    shown = display(path)
    if not isinstance(data, dict):
        raise InputError([Problem(shown, "(top level)", "the inventory must be a mapping",
                                  "start from config/inventories/local.yml")])
    defaults, types = schema.load_defaults(DEFAULTS_FILE)
    settings = schema.Section(check_settings(data, defaults, shown, problems))
    problems.extend(schema.problems(settings, defaults, types, shown))
    hosts = check_hosts(data.get("hosts"), settings, shown, problems)
    version = str(settings.dify.version)
    if version not in available_versions():
        problems.append(Problem(shown, "dify.version", f"no profile for Dify {version}",
                                f"use one of {', '.join(available_versions())} or add "
                                f"config/profiles/{version}.yml"))
        raise InputError(problems)
    secrets_file = (
        (ROOT / settings.secrets_file).resolve() if settings.secrets_file
        else default_secrets_path(settings.name)
    )
    profile = load_profile(version)
    known_hosts = hostkeys.known_hosts_path(path, settings.ssh_known_hosts)
    problems.extend(hostkeys.check_file(known_hosts))
    hosts = [dataclasses.replace(host, ssh=dataclasses.replace(host.ssh,
                                                               known_hosts=str(known_hosts)))
             for host in hosts]
    inventory = Inventory(path, settings, placement.place_defaults(hosts, profile), profile,
                          secrets_file, known_hosts=known_hosts)
    if not problems:
        problems.extend(rules.check(inventory))
    if check_secrets:
        inventory.secrets, secret_problems = secrets.read(inventory)
        problems.extend(secret_problems)
    if problems:
        raise InputError(problems)
    return inventory


def check_settings(data: dict, defaults: dict, shown: str, problems: list[Problem]) -> dict:
    """Merge the inventory's settings over the defaults, noting unknown keys and wrong types."""
    # `x-` keys hold YAML anchors for reuse (as in compose files); they are not settings.
    values = {key: value for key, value in data.items()
              if key != "hosts" and not str(key).startswith("x-")}
    return merge(values, defaults, "", shown, problems)


def merge(value: Any, default: Any, path: str, shown: str, problems: list[Problem]) -> Any:
    """The value checked against the default's shape; the default where the value is absent."""
    if path in FREEFORM_MAPS:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            problems.append(Problem(shown, path, "must map names to strings",
                                    f"write it as `{path.rsplit('.', 1)[-1]}: {{name: value}}`"))
            return default
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            problems.append(Problem(shown, path, f"must be a mapping, not {type_name(value)}",
                                    "indent its keys under it, as in config/defaults.yml"))
            return default
        merged = dict(default)
        for key, item in value.items():
            key_path = f"{path}.{key}" if path else str(key)
            if key not in default:
                problems.append(unknown_key(shown, key_path, key, default))
                continue
            merged[key] = merge(item, default[key], key_path, shown, problems)
        return merged
    if path == "app.worker_groups":
        return check_worker_groups(value, shown, problems)
    if not same_type(value, default):
        quoted = isinstance(value, bool) and isinstance(default, str)
        fix = (f"set it like the default: {default!r}" if not quoted else
               f"write the word in quotes, as in `{path.rsplit('.', 1)[-1]}: \"off\"`: YAML "
               f"reads on, off, yes and no unquoted as true or false")
        problems.append(Problem(shown, path, f"must be {type_name(default)}, not "
                                f"{type_name(value)} ({value!r})", fix))
        return default
    return value


def check_worker_groups(value: Any, shown: str, problems: list[Problem]) -> list[dict]:
    """Worker groups: a non-empty list of {name, queues, concurrency} with unique names."""
    path = "app.worker_groups"
    if not isinstance(value, list) or not value:
        problems.append(Problem(shown, path, "must be a non-empty list of worker groups",
                                "list at least one group: `- {name: default, queues: all}`"))
        return []
    groups, seen = [], set()
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        if not isinstance(item, dict):
            problems.append(Problem(shown, item_path, "must be a mapping",
                                    "write `- {name: NAME, queues: [QUEUE, ...]}`"))
            continue
        # queues is `all`, `rest` or a list, which the default's type cannot express.
        group = merge({k: v for k, v in item.items() if k != "queues"}, WORKER_GROUP_KEYS,
                      item_path, shown, problems)
        queues = item.get("queues", "all")
        if queues not in ("all", "rest") and not (isinstance(queues, list) and queues
                                                  and all(isinstance(q, str) for q in queues)):
            problems.append(Problem(shown, f"{item_path}.queues",
                                    "must be `all`, `rest` or a non-empty list of queue names",
                                    "write `queues: all`, `queues: rest` (every queue no other "
                                    "group lists) or `queues: [dataset, mail]`"))
        group["queues"] = queues
        if not group["name"]:
            problems.append(Problem(shown, f"{item_path}.name", "a worker group needs a name",
                                    "add `name: NAME`"))
        elif group["name"] in seen:
            problems.append(Problem(shown, f"{item_path}.name",
                                    f"duplicate worker group {group['name']!r}",
                                    "give every worker group its own name"))
        seen.add(group["name"])
        groups.append(group)
    return groups


def check_hosts(value: Any, settings: schema.Section, shown: str,
                problems: list[Problem]) -> list[Host]:
    """Every host well-formed, with unique names and unique addresses (two SSH ports on one
    address would be one machine deployed twice: one deploy_dir, one upstream entry twice)."""
    if not isinstance(value, list) or not value:
        problems.append(Problem(shown, "hosts", "the inventory lists no hosts",
                                "add at least one host: `hosts: [{name: local, connection: "
                                "local, roles: [...]}]`"))
        return []
    hosts: list[Host] = []
    names: dict[str, int] = {}
    endpoints: dict[str, int] = {}
    groups = {group["name"] for group in settings.app.worker_groups}
    for index, item in enumerate(value):
        host = check_host(item, f"hosts[{index}]", groups, shown, problems)
        if host is None:
            continue
        if host.name in names:
            problems.append(Problem(shown, f"hosts[{index}].name",
                                    f"duplicate host name {host.name!r} "
                                    f"(also hosts[{names[host.name]}])",
                                    "give every host its own name"))
        names.setdefault(host.name, index)
        endpoint = host.address
        if endpoint in endpoints:
            problems.append(Problem(shown, f"hosts[{index}].address",
                                    f"duplicate address {host.address} "
                                    f"(also hosts[{endpoints[endpoint]}])",
                                    "one entry per machine: merge their roles into one host"))
        endpoints.setdefault(endpoint, index)
        hosts.append(host)
    return hosts


def check_host(item: Any, path: str, groups: set[str], shown: str,
               problems: list[Problem]) -> Host | None:
    """One host entry turned into a Host, or None with the problems noted."""
    if not isinstance(item, dict):
        problems.append(Problem(shown, path, "a host must be a mapping",
                                "write `- {name: NAME, address: ADDRESS, roles: [ROLE]}`"))
        return None
    before = len(problems)
    for key in item:
        if key not in HOST_KEYS:
            problems.append(unknown_key(shown, f"{path}.{key}", key, dict.fromkeys(HOST_KEYS)))
    name = item.get("name")
    if not isinstance(name, str) or not HOST_NAME.match(name):
        problems.append(Problem(shown, f"{path}.name",
                                f"missing or invalid host name {name!r}",
                                "use lower-case letters, digits and dashes, e.g. `api1`"))
    connection = item.get("connection", "ssh")
    if connection not in ("local", "ssh"):
        problems.append(Problem(shown, f"{path}.connection",
                                f"unknown connection {connection!r}", "use `local` or `ssh`"))
    default_address = "127.0.0.1" if connection == "local" else None
    address = item.get("address", default_address)
    if not schema.valid_address(address):
        problems.append(Problem(shown, f"{path}.address", f"invalid address {address!r}",
                                "give an IPv4/IPv6 address or a DNS name"))
    ssh = merge(item.get("ssh", {}), SSH_KEYS, f"{path}.ssh", shown, problems)
    if isinstance(ssh["port"], int) and not 1 <= ssh["port"] <= 65535:
        problems.append(Problem(shown, f"{path}.ssh.port", f"invalid port {ssh['port']}",
                                "use a port between 1 and 65535 (SSH listens on 22)"))
    roles = item.get("roles")
    if not isinstance(roles, list) or not roles:
        problems.append(Problem(shown, f"{path}.roles", "a host needs a list of roles",
                                f"add `roles: [...]` with some of: {', '.join(ROLES)}"))
        roles = []
    for role_index, role in enumerate(roles):
        if role not in ROLES:
            problems.append(Problem(shown, f"{path}.roles[{role_index}]",
                                    f"unknown role {role!r}{suggestion(role, ROLES)}",
                                    f"use one of: {', '.join(ROLES)}"))
    labels = item.get("labels", {})
    if not isinstance(labels, dict):
        problems.append(Problem(shown, f"{path}.labels", "labels must be a mapping",
                                "write `labels: {zone: a}`"))
        labels = {}
    size = merge(item.get("size", {}), dict.fromkeys(SIZE_KEYS, 0), f"{path}.size", shown,
                 problems)
    worker_groups = item.get("worker_groups", [])
    if not isinstance(worker_groups, list):
        worker_groups = [worker_groups]
    for group_index, group in enumerate(worker_groups):
        if group not in groups:
            problems.append(Problem(shown, f"{path}.worker_groups[{group_index}]",
                                    f"no worker group named {group!r}",
                                    f"use one of the names in app.worker_groups: "
                                    f"{', '.join(sorted(groups))}"))
    if len(problems) > before:
        return None
    return Host(name=name, address=str(address), connection=connection,
                ssh=Ssh(**ssh), roles=tuple(roles),
                labels={str(k): str(v) for k, v in labels.items()},
                size={k: v for k, v in size.items() if v},
                worker_groups=tuple(worker_groups))


def is_ipv6(address: str) -> bool:
    """Whether an address is an IPv6 address (not an IPv4 address, not a DNS name)."""
    try:
        return ipaddress.ip_address(address).version == 6
    except ValueError:
        return False


def endpoint(address: str, port: int) -> str:
    """address:port as URLs, compose port bindings, nginx, HAProxy and ss write it: an IPv6
    address in brackets ([fd00::1]:5001), an IPv4 address or a DNS name as it is."""
    return f"[{address}]:{port}" if is_ipv6(address) else f"{address}:{port}"


def unknown_key(shown: str, path: str, key: Any, known: dict) -> Problem:
    """A problem for a key the schema does not have, with the nearest known key as a hint."""
    choices = ", ".join(str(k) for k in known) or "(none)"
    return Problem(shown, path, f"unknown key {key!r}{suggestion(str(key), known)}",
                   f"remove it or use one of: {choices}")


def suggestion(word: str, choices: Any) -> str:
    """' (did you mean X?)' when a close match exists."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def same_type(value: Any, default: Any) -> bool:
    """Whether a value has the default's type (bools are not ints, ints are not strings)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, int):
        return isinstance(value, int)
    return isinstance(value, type(default))


def type_name(value: Any) -> str:
    """A YAML-ish name for the type of a value."""
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "empty"}.get(type(value), "a value")
