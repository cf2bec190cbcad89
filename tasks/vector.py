"""vector: the vector store Dify indexes documents into (Weaviate, or pgvector in PostgreSQL)."""

from __future__ import annotations

from invoke import Context, task
from invoke.exceptions import Exit

from tasks.core.cli import deploy_task, load, reported
from tasks.core.fleet import each_host, table
from tasks.tiers.vector import TIER, pgvector_hosts, pgvector_state, weaviate_state

deploy = deploy_task(TIER)


@task
@reported
def status(ctx: Context) -> None:
    """Show the vector store: version, nodes, readiness and quorum (Weaviate) or extension."""
    inventory = load(ctx)
    timeouts = inventory.settings.timeouts
    if inventory.settings.vector.store == "weaviate":
        hosts = inventory.with_role("vector")
        outcomes = each_host(hosts, lambda machine: weaviate_state(inventory, machine.host),
                             timeouts)
        rows = [[o.host.name, o.value.version, "yes" if o.value.ready else "NO",
                 f"{o.value.healthy}/{o.value.expected} healthy "
                 f"({', '.join(f'{n}={s}' for n, s in sorted(o.value.nodes.items()))})",
                 "yes" if o.value.quorum else "NO"] if o.ok and o.value else
                [o.host.name, "-", "-", "-", f"error: {o.error}"] for o in outcomes]
        print(f"Weaviate on {len(hosts)} node(s)")
        print(table(["host", "version", "ready", "nodes", "quorum"], rows))
    else:
        hosts = pgvector_hosts(inventory)
        outcomes = each_host(hosts, lambda machine: pgvector_state(inventory, machine), timeouts)
        database = inventory.settings.vector.pgvector_database
        rows = [[o.host.name, o.value.role, o.value.server_version,
                 o.value.extension or "MISSING"] if o.ok and o.value else
                [o.host.name, "-", "-", f"error: {o.error}"] for o in outcomes]
        print(f"pgvector in database {database}")
        print(table(["host", "role", "postgresql", "vector extension"], rows))
    bad = [o.host.name for o in outcomes if not (o.ok and o.value and o.value.ok)]
    if bad:
        raise Exit(f"error: the vector store is not healthy on {', '.join(bad)}; run "
                   f"`inv vector.deploy` (it converges and says which step fails)", code=1)
