"""lb tier: nginx from the OS packages in front of Dify's web, api and plugin daemon."""

from __future__ import annotations

from tasks.core.gates import HttpGate
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.tiers import Tier
from tasks.tiers.common import packages, service_running

SITE = "/etc/nginx/sites-enabled/dify.conf"


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """Install nginx, write the site, validate with nginx -t, reload, check /health."""
    return [
        packages("nginx"),
        RunCommand("remove the default site", "rm -f /etc/nginx/sites-enabled/default",
                   unless="test ! -e /etc/nginx/sites-enabled/default"),
        WriteFile(SITE, renderer.render("nginx/dify.conf.j2", host)),
        RunCommand("validate with nginx -t", "nginx -t -q", changes=False),
        service_running("nginx"),
        RunCommand("reload nginx", "systemctl reload nginx", on_change=(SITE,)),
        WaitFor(HttpGate("nginx /health", timeout=30, url=f"http://{host.address}/health")),
    ]


TIER = Tier("lb", "nginx load balancer", ("lb",), steps,
            depends_on=("app",))
