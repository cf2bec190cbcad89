"""Placement of the Dify services newer releases add: where they run, decided once.

- api_websocket (Dify 1.14.2+, the "collaboration" feature): on every api host when
  `app.collaboration` is true and the release has it; nginx sends /socket.io/ there.
- agent_backend, local_sandbox, agent_ssrf_proxy (Dify 1.16.1+): together on the one host with
  the role `agent`; when no host has that role, on the first api host (given the role at load, so
  every tier, the network plan and the preflight see the same placement).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.core.inventory import Host, Inventory
    from tasks.core.profiles import VersionProfile

AGENT_ROLE = "agent"
AGENT_SERVICES = ("agent_backend", "local_sandbox", "agent_ssrf_proxy")
AGENT_PORT = 5050          # agent_backend's uvicorn (the image's CMD)
SHELLCTL_PORT = 5004       # local_sandbox's shellctl server, inside its internal networks only
# agent_backend has no health route of its own: FastAPI's schema answers once uvicorn serves.
AGENT_HEALTH_PATH = "/openapi.json"


def websocket_enabled(inventory: Inventory) -> bool:
    """Whether api_websocket runs (on every api host) and nginx routes /socket.io/ to it."""
    return bool(inventory.settings.app.collaboration
                and inventory.profile.has("api_websocket"))


def agent_enabled(inventory: Inventory) -> bool:
    """Whether this release runs the agent services (Dify 1.16.1+)."""
    return inventory.profile.has("agent_backend")


def agent_host(inventory: Inventory) -> Host | None:
    """The host of agent_backend, local_sandbox and agent_ssrf_proxy (None: not this release)."""
    if not agent_enabled(inventory):
        return None
    hosts = inventory.with_role(AGENT_ROLE)
    return hosts[0] if hosts else None


def runs_agent(inventory: Inventory, host: Host) -> bool:
    """Whether this host runs the agent services."""
    chosen = agent_host(inventory)
    return chosen is not None and chosen.name == host.name


def place_defaults(hosts: list[Host], profile: VersionProfile) -> list[Host]:
    """The hosts with the default placement applied: with a release that has agent_backend and
    no host with the role `agent`, the first api host gets it."""
    if not profile.has("agent_backend") or any(h.has(AGENT_ROLE) for h in hosts):
        return hosts
    for index, host in enumerate(hosts):
        if host.has("api"):
            placed = dataclasses.replace(host, roles=(*host.roles, AGENT_ROLE))
            return [*hosts[:index], placed, *hosts[index + 1:]]
    return hosts
