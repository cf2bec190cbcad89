"""What the home-lab tiers share: the Dify checkout, the account the dev servers run as, checks.

The home-lab layout (config/inventories/homelab.yml): a home server (role dev_server) runs the
base services with the db, cache, vector and monitor tiers; a VM (dev_backend) runs Dify's api and
worker from a checkout; a workstation (dev_frontend, Linux or Windows) runs the web dev server.
"""

from __future__ import annotations

import getpass
import ipaddress
import ntpath
import posixpath
import re
from dataclasses import replace

from tasks.core import facts, shell
from tasks.core.errors import InputError, Problem
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import RunCommand, Step
from tasks.core.project import display
from tasks.core.system import packages
from tasks.core.tiers import Tier
from tasks.core.windows import is_windows

API_PORT = 5001
WEB_PORT = 3000
# The tiers whose services the home server runs for every development machine.
SERVER_TIERS = ("db", "cache", "vector", "monitor")
GIT_URL = re.compile(r"^(https?|ssh|git|file)://|^[\w.-]+@[\w.-]+:")
WINDOWS_PATH = re.compile(r"^[A-Za-z]:\\")


def is_git_url(source: str) -> bool:
    """Whether dev.dify_source names a repository to clone rather than a path."""
    return bool(GIT_URL.match(source))


def backend_checkout(inventory: Inventory) -> str:
    """The Dify checkout on the backend host: the path given, or where the URL is cloned."""
    dev = inventory.settings.dev
    return dev.checkout_dir if is_git_url(dev.dify_source) else dev.dify_source


def frontend_checkout(inventory: Inventory) -> str:
    """The Dify checkout on the front-end machine (dev.frontend_dir, else the backend's)."""
    return inventory.settings.dev.frontend_dir or backend_checkout(inventory)


def dev_user(inventory: Inventory, host: Host) -> str:
    """The account the dev servers run as: dev.user, else the host's login user."""
    if inventory.settings.dev.user:
        return inventory.settings.dev.user
    return getpass.getuser() if host.connection == "local" else host.ssh.user


def as_user(user: str) -> shell.Command:
    """Prefix that runs a command as the dev user (commands run as root on the host)."""
    return shell.Command("") if user == "root" else shell.command("runuser -u {} -- ", user)


def backend(inventory: Inventory) -> Host:
    """The development machine running the api the front end talks to."""
    return inventory.with_role("dev_backend")[0]


def clone_step_needed(inventory: Inventory) -> bool:
    """Whether the checkout is cloned from dev.dify_source (a URL) rather than given."""
    return is_git_url(inventory.settings.dev.dify_source)


def clone_steps(inventory: Inventory, root: str, user: str) -> list[Step]:
    """git, and dev.dify_source at dev.dify_ref cloned into root as the user, when the source is
    a URL (nothing when it is a checkout already on the machine)."""
    if not clone_step_needed(inventory):
        return []
    dev = inventory.settings.dev
    branch = shell.command("--branch {} ", dev.dify_ref) if dev.dify_ref else shell.Command("")
    return [packages("git"),
            RunCommand(f"clone {dev.dify_source} into {root}", shell.command(
                "install -d -o {user} -g {user} {parent} && {as_user}git clone --quiet "
                "{branch}{source} {root}", user=user, parent=root.rsplit("/", 1)[0] or "/",
                as_user=as_user(user), branch=branch,
                source=dev.dify_source, root=root),
                unless=facts.is_directory(f"{root}/.git"))]


def problems(inventory: Inventory) -> list[Problem]:
    """Everything wrong with the home-lab settings, found before any host is touched."""
    shown, dev = display(inventory.file), inventory.settings.dev
    found: list[Problem] = []
    machines = inventory.with_role("dev_backend", "dev_frontend")
    if machines and not dev.dify_source:
        found.append(Problem(shown, "dev.dify_source", "empty, but the inventory has dev_backend "
                             "or dev_frontend hosts that run Dify from a checkout",
                             "set it to the path of a Dify checkout on the VM, or to a git URL "
                             "(with dev.dify_ref, e.g. a release tag)"))
    elif (dev.dify_source and not is_git_url(dev.dify_source)
          and not posixpath.isabs(dev.dify_source)):
        found.append(Problem(shown, "dev.dify_source",
                             f"{dev.dify_source!r} is neither a git URL nor an absolute path",
                             "give the absolute path of the checkout on the VM (e.g. "
                             "/home/dev/dify) or a URL such as https://github.com/langgenius/"
                             "dify.git"))
    for index, host in enumerate(inventory.hosts):
        if not host.has("dev_frontend"):
            continue
        if is_windows(host) and not WINDOWS_PATH.match(dev.frontend_dir):
            found.append(Problem(shown, "dev.frontend_dir",
                                 f"the front end {host.name} (hosts[{index}]) is Windows, and "
                                 f"{dev.frontend_dir or '(empty)'!r} is not a Windows path",
                                 r"set dev.frontend_dir to the checkout on that machine, e.g. "
                                 r"'C:\src\dify'"))
        if is_windows(host) and host.has("dev_backend", "dev_server"):
            found.append(Problem(shown, f"hosts[{index}].roles", f"{host.name} is Windows: it "
                                 "can only be the dev_frontend", "run the api, worker and base "
                                 "services on Linux hosts (the VM and the home server)"))
    found.extend(network_problems(inventory, shown))
    return found


def network_problems(inventory: Inventory, shown: str) -> list[Problem]:
    """dev.network is a CIDR block holding every home-lab machine that has an IP address."""
    cidr = inventory.settings.dev.network
    if not cidr:
        return []
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return [Problem(shown, "dev.network", f"{cidr!r} is not a network in CIDR notation",
                        "write it like 192.168.1.0/24")]
    found = []
    for index, host in enumerate(inventory.hosts):
        if not host.has("dev_server", "dev_backend", "dev_frontend"):
            continue
        try:
            address = ipaddress.ip_address(host.address)
        except ValueError:
            continue  # a DNS name: where it points is the operator's business
        if address.version != network.version or address not in network:
            found.append(Problem(shown, f"hosts[{index}].address",
                                 f"{host.name} ({host.address}) is outside dev.network {cidr}",
                                 "fix the address, or widen dev.network to the home network "
                                 "that holds every home-lab machine"))
    return found


def server_problems(inventory: Inventory) -> list[Problem]:
    """The home server must exist and carry the roles of the base services it runs."""
    shown = display(inventory.file)
    servers = inventory.with_role("dev_server")
    if not servers:
        return [Problem(shown, "hosts[*].roles", "no host has the role 'dev_server'",
                        "give the home server the roles dev_server, db_primary, cache (and "
                        "vector, monitor)")]
    wanted = ["db_primary", "cache"]
    if inventory.settings.vector.store == "weaviate":
        wanted.append("vector")
    found = []
    for host in servers:
        missing = [role for role in wanted if not host.has(role)]
        if missing:
            index = inventory.hosts.index(host)
            found.append(Problem(shown, f"hosts[{index}].roles",
                                 f"the home server {host.name} lacks {', '.join(missing)}: "
                                 f"dev.server deploys the base services it plays",
                                 f"add {', '.join(missing)} to its roles"))
    return found


def check(inventory: Inventory, *, server: bool = False) -> None:
    """Raise InputError listing every home-lab problem (server: also the home server's)."""
    found = problems(inventory) + (server_problems(inventory) if server else [])
    if found:
        raise InputError(found)


def on_dev_server(tier: Tier) -> Tier:
    """The tier restricted to the hosts with role dev_server (the home server)."""
    original = tier.steps

    def steps(inventory, renderer, host):  # same signature as every tier's step builder
        return original(inventory, renderer, host) if host.has("dev_server") else []

    return replace(tier, steps=steps)


def server_tiers(tiers: tuple[Tier, ...]) -> list[Tier]:
    """The base-service tiers among `tiers`, in their order, on the home server only."""
    return [on_dev_server(tier) for tier in tiers if tier.name in SERVER_TIERS]


def windows_join(*parts: str) -> str:
    """A Windows path from parts (for the front end on a Windows workstation)."""
    return ntpath.join(*parts)
