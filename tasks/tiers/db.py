"""db tier: PostgreSQL from the OS packages under systemd, configured from the inventory."""

from __future__ import annotations

from tasks.core.gates import CommandGate
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.tiers import Tier
from tasks.tiers.common import packages, service_restart, service_running


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """Install, configure and start PostgreSQL; on the primary, the roles and databases."""
    version = inventory.settings["db"]["version"]
    confdir = f"/etc/postgresql/{version}/main"
    unit = f"postgresql@{version}-main"
    settings = f"{confdir}/conf.d/difyops.conf"
    hba = f"{confdir}/pg_hba.conf"
    port = inventory.settings["db"]["port"]
    plan: list[Step] = [
        packages(f"postgresql-{version}"),
        WriteFile(settings, renderer.render("config/postgres/postgresql.conf.j2", host),
                  owner="postgres", group="postgres"),
        WriteFile(hba, renderer.render("config/postgres/pg_hba.conf.j2", host), mode=0o640,
                  owner="postgres", group="postgres"),
        service_running(unit),
        service_restart(unit, settings, hba),
        WaitFor(CommandGate(f"postgresql on :{port}", timeout=60,
                            command=f"pg_isready -q -h 127.0.0.1 -p {port}")),
    ]
    if host.has("db_primary"):
        roles = "/etc/difyops/postgres-roles.sql"
        plan += [
            WriteFile(roles, renderer.render("config/postgres/roles.sql.j2", host), mode=0o600,
                      owner="postgres", group="postgres", secret=True),
            RunCommand("create roles and databases",
                       f"runuser -u postgres -- psql -q -p {port} -v ON_ERROR_STOP=1 -f {roles}",
                       on_change=(roles,)),
        ]
    return plan


TIER = Tier("db", "PostgreSQL primary and replicas", ("db_primary", "db_replica"), steps)
