"""Unit-test helpers: inventories written to a temporary folder, with valid secrets; fake
machines standing in for hosts."""

from __future__ import annotations

import copy
import ipaddress
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml

from tasks.core import hooks, hosts, secrets
from tasks.core.hostkeys import KNOWN_HOSTS_ENV, SUFFIX, lookup_name
from tasks.core.inventory import Inventory, load_inventory


@pytest.fixture(autouse=True)
def only_loopback_traffic(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Unit tests never reach another machine: a connection to any address but loopback is
    refused and fails the test (also where the code under test swallows the error, e.g. a
    health probe of an inventory address)."""
    refused: list[str] = []
    connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and not _is_loopback(str(address[0])):
            refused.append(str(address))
            raise ConnectionRefusedError(f"unit tests connect to loopback only, not {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    yield
    assert not refused, f"the test tried to connect to {refused}"


@pytest.fixture(autouse=True)
def no_operator_hooks(monkeypatch: pytest.MonkeyPatch,
                      tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty hooks folder (outside the test's tmp_path): hooks an operator keeps in hooks/
    never run from a unit test."""
    folder = tmp_path_factory.mktemp("hooks")
    monkeypatch.setenv(hooks.HOOKS_ENV, str(folder))
    return folder


def _is_loopback(host: str) -> bool:
    """Whether a connect address is this machine (an IP literal; a name only if localhost)."""
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


# A valid multi-host inventory every test starts from and breaks in one place.
BASE: dict[str, Any] = {
    "name": "unit",
    "domain": "dify.test",
    "storage": {"type": "shared-fs"},
    "db": {"max_connections": 400},
    "cache": {"mode": "sentinel"},
    "net": {"management": ["10.0.4.0/24"]},
    "hosts": [
        {"name": "lb1", "address": "10.0.1.10", "roles": ["lb"]},
        {"name": "web1", "address": "10.0.2.11", "roles": ["web"]},
        {"name": "api1", "address": "10.0.2.21", "roles": ["api", "plugin_daemon"]},
        {"name": "api2", "address": "10.0.2.22", "roles": ["api"]},
        {"name": "worker1", "address": "10.0.2.31", "roles": ["worker", "beat"]},
        {"name": "db1", "address": "10.0.3.11", "roles": ["db_primary", "cache"]},
        {"name": "db2", "address": "10.0.3.12", "roles": ["db_replica", "cache"]},
        {"name": "db3", "address": "10.0.3.13", "roles": ["db_replica", "cache"]},
        {"name": "vector1", "address": "10.0.3.21", "roles": ["vector"]},
        {"name": "monitor1", "address": "10.0.4.10", "roles": ["monitor"]},
    ],
}

InventoryFactory = Callable[..., Path]
UseMachines = Callable[[hosts.Factory], hosts.Factory]
# The host key every unit-test host is recorded with (no connection is ever made).
HOST_KEY = paramiko.ECDSAKey.generate()


def with_setting(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """The inventory data with one dotted setting set (its sections made where missing)."""
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


def good_secrets() -> dict[str, str]:
    """A strong, unique value for every secret difyops knows (of the shape it must have)."""
    values = {spec.name: f"unit-test-{spec.name.lower()}-0123456789abcdef"
              for spec in secrets.SPECS}
    # 32 bytes as unpadded base64url, as the agent backend requires.
    values["DIFY_AGENT_SERVER_SECRET_KEY"] = "dW5pdC10ZXN0LWFnZW50LXNlcnZlci1zZWNyZXQtMzI"
    return values


@pytest.fixture
def base() -> dict[str, Any]:
    """A fresh deep copy of the valid inventory, to break in one place."""
    return copy.deepcopy(BASE)


@pytest.fixture
def write_inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> InventoryFactory:
    """Write an inventory, its secrets file (mode 0600) and its known_hosts file (a recorded
    key for every SSH host) under tmp_path; return its path."""
    monkeypatch.delenv(KNOWN_HOSTS_ENV, raising=False)  # the lab's, when integration ran first
    written: set[Path] = set()  # known_hosts files of ours (a test may write its own)

    def write(data: dict[str, Any], secret_values: dict[str, str] | None = None,
              mode: int = 0o600) -> Path:
        path = tmp_path / "inventory.yml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        known_hosts = path.with_suffix(SUFFIX)
        if known_hosts.exists() and known_hosts not in written:
            return finish(path, secret_values, mode)
        written.add(known_hosts)
        known_hosts.write_text("".join(
            f"{lookup_name(host['address'], (host.get('ssh') or {}).get('port', 22))} "
            f"{HOST_KEY.get_name()} {HOST_KEY.get_base64()}\n"
            for host in data.get("hosts") or []
            if isinstance(host, dict) and host.get("connection") != "local"
            and isinstance(host.get("address"), str) and host["address"]))
        return finish(path, secret_values, mode)

    def finish(path: Path, secret_values: dict[str, str] | None, mode: int) -> Path:
        env = tmp_path / "secrets.env"
        values = good_secrets() if secret_values is None else secret_values
        env.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        os.chmod(env, mode)
        monkeypatch.setenv("DIFY_SECRETS", str(env))
        return path

    return write


@pytest.fixture
def load(write_inventory: InventoryFactory) -> Callable[..., Inventory]:
    """Write an inventory and load it through the real loader."""

    def load_data(data: dict[str, Any], secret_values: dict[str, str] | None = None,
                  mode: int = 0o600) -> Inventory:
        return load_inventory(write_inventory(data, secret_values, mode))

    return load_data


@pytest.fixture
def use_machines() -> Iterator[UseMachines]:
    """Install a machine factory until the test ends (a later one replaces it): every module's
    connect() hands out its machines instead of reaching a host."""
    with ExitStack() as stack:
        yield lambda factory: stack.enter_context(hosts.using(factory))
