"""logging: Elasticsearch + Kibana (security on) on the logging host, rsyslog on every host.

The namespace is `logging`; the file is logs.py so that no file of this folder is called
logging.py, which would shadow the standard library's module for anything run from here.
"""

from __future__ import annotations

from invoke import Context, task
from invoke.exceptions import Exit

from tasks.core.cli import deploy_task, load, reported
from tasks.core.errors import InputError, Problem
from tasks.core.fleet import each_host, table
from tasks.core.project import display
from tasks.tiers.logging import TIER, shipper_state, shippers, store, store_state

deploy = deploy_task(TIER)


@task
@reported
def status(ctx: Context) -> None:
    """Show the log store (health, indices, newest document) and every host's shipper queue."""
    inventory = load(ctx)
    home = store(inventory)
    if home is None:
        raise InputError([Problem(display(inventory.file), "hosts[*].roles",
                                  "no host has the role 'logging'",
                                  "add 'logging' to the roles of a host, then run "
                                  "`inv logging.deploy`")])
    timeouts = inventory.settings.timeouts
    [found] = each_host([home], lambda machine: store_state(inventory, machine), timeouts)
    print(f"Elasticsearch on {home.name}")
    if found.ok and found.value:
        s = found.value
        print(table(["host", "health", "nodes", "indices", "documents", "newest document",
                     "kibana"],
                    [[home.name, s.status, s.nodes, s.indices, s.documents,
                      s.last_document or "-", s.kibana or "off"]]))
    else:
        print(table(["host", "error"], [[home.name, found.error]]))
    hosts = shippers(inventory)
    outcomes = each_host(hosts, lambda machine: shipper_state(inventory, machine), timeouts)
    print(f"\nrsyslog on {len(hosts)} host(s)")
    rows = [[o.host.name, "active" if o.value.active else "INACTIVE",
             "yes" if o.value.configured else "NO",
             "-" if o.value.queue_size is None else o.value.queue_size, o.value.disk_bytes,
             "-" if o.value.failed is None else o.value.failed,
             "yes" if o.value.reachable else "NO"]
            if o.ok and o.value else [o.host.name, f"error: {o.error}", "", "", "", "", ""]
            for o in outcomes]
    print(table(["host", "rsyslog", "configured", "queued", "queue on disk (bytes)",
                 "refused docs", "store reachable"], rows))
    bad = [o.host.name for o in outcomes if not (o.ok and o.value and o.value.ok)]
    if not (found.ok and found.value and found.value.ok):
        bad.insert(0, f"{home.name} (store)")
    if bad:
        raise Exit(f"error: logging is not healthy on {', '.join(bad)}; see the tables above "
                   f"and run `inv logging.deploy` (it converges and says which step fails)",
                   code=1)
