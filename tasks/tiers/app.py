"""app tier: the Dify services of each app host as one compose project, from one environment."""

from __future__ import annotations

from tasks.core.gates import HttpGate
from tasks.core.inventory import APP_ROLES, Host, Inventory
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.tiers import Tier
from tasks.tiers.common import compose_up

# The uid the Dify api image runs as: storage must belong to it.
DIFY_UID = 1001


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """Environment, compose file and proxy config; storage owned by Dify's uid; start; gates."""
    directory = inventory.settings["app"]["deploy_dir"]
    files = [
        WriteFile(f"{directory}/.env", renderer.render("config/env/dify.env.j2", host),
                  mode=0o600, secret=True),
        WriteFile(f"{directory}/compose.yml", renderer.render("compose/app.yml.j2", host)),
    ]
    if host.has("api", "worker"):
        files.append(WriteFile(f"{directory}/squid.conf",
                               renderer.render("config/squid/squid.conf.j2", host)))
    plan: list[Step] = [*files]
    storage = inventory.settings["storage"]
    if host.has("api", "worker") and storage["type"] != "s3":
        plan.append(RunCommand(
            f"storage {storage['path']} owned by uid {DIFY_UID}",
            f"mkdir -p {storage['path']} && chown {DIFY_UID}:{DIFY_UID} {storage['path']}",
            unless=f"test \"$(stat -c %u {storage['path']} 2>/dev/null)\" = {DIFY_UID}"))
    plan.append(compose_up(directory, "dify", *(step.path for step in files)))
    probes = {"api": (5001, "/health"), "plugin_daemon": (5002, "/health/check"),
              "web": (3000, "/")}
    for role, (port, path) in probes.items():
        if host.has(role):
            plan.append(WaitFor(HttpGate(f"{role} {path}", timeout=300, interval=2,
                                         url=f"http://{host.address}:{port}{path}")))
    return plan


TIER = Tier("app", "Dify services on the app hosts", APP_ROLES, steps,
            depends_on=("db", "cache", "vector"))
