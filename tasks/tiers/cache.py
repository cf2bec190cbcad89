"""cache tier: Redis from the OS packages under systemd, password-protected."""

from __future__ import annotations

from tasks.core.gates import CommandGate
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.tiers import Tier
from tasks.tiers.common import packages, service_restart, service_running


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """Install, configure and start redis-server; wait until it answers PING."""
    conf = "/etc/redis/redis.conf"
    port = inventory.settings["cache"]["port"]
    return [
        packages("redis-server"),
        WriteFile(conf, renderer.render("config/redis/redis.conf.j2", host), mode=0o640,
                  owner="redis", group="redis", secret=True),
        service_running("redis-server"),
        service_restart("redis-server", conf),
        WaitFor(CommandGate(f"redis on :{port}", timeout=60,
                            command=f"REDISCLI_AUTH=\"$(sed -n 's/^requirepass //p' {conf})\" "
                                    f"redis-cli -p {port} ping | grep -q PONG")),
    ]


TIER = Tier("cache", "Redis cache and Celery broker", ("cache", "broker"),
            steps)
