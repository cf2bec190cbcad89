"""vector tier: Weaviate by compose on the vector hosts (1 node or a RAFT cluster of 3+)."""

from __future__ import annotations

from tasks.core.gates import HttpGate
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.tiers import Tier
from tasks.tiers.common import compose_up

DIRECTORY = "/opt/dify-vector"


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """Weaviate's compose project and key; ready when /v1/.well-known/ready answers."""
    if inventory.settings["vector"]["store"] != "weaviate":
        return []
    files = [
        WriteFile(f"{DIRECTORY}/.env",
                  f"WEAVIATE_API_KEY={inventory.secrets['WEAVIATE_API_KEY']}\n",
                  mode=0o600, secret=True),
        WriteFile(f"{DIRECTORY}/compose.yml", renderer.render("compose/weaviate.yml.j2", host)),
    ]
    return [
        *files,
        compose_up(DIRECTORY, "dify-vector", *(step.path for step in files)),
        WaitFor(HttpGate("weaviate ready", timeout=180, interval=2,
                         url=f"http://{host.address}:8080/v1/.well-known/ready")),
    ]


TIER = Tier("vector", "Weaviate vector store", ("vector",), steps)
