"""hosts: the SSH host keys of the inventory's hosts (recorded on first use, never replaced)."""

from __future__ import annotations

from functools import partial

from invoke import Context, task

from tasks.backups.copy import ssh_hosts as backup_ssh_hosts
from tasks.core import hostkeys
from tasks.core import trust as trust_engine
from tasks.core.cli import load, reported
from tasks.core.errors import DifyopsError, InputError, Problem
from tasks.core.fleet import table
from tasks.core.inventory import Host, Inventory, endpoint
from tasks.core.project import display


def targets(inventory: Inventory, name: str) -> list[Host]:
    """Every host reached over SSH or locally (the backup copy host too), or the named one;
    an unknown name is refused before any host is asked."""
    hosts = [*inventory.hosts, *backup_ssh_hosts(inventory)]
    if not name:
        return hosts
    chosen = [host for host in hosts if host.name == name]
    if not chosen:
        raise InputError([Problem(display(inventory.file), "hosts", f"no host named {name!r}",
                                  f"use one of: {', '.join(h.name for h in hosts)}")])
    return chosen


def address(host: Host) -> str:
    """Where the host is reached, for the tables."""
    return "local" if host.connection == "local" else endpoint(host.address, host.ssh.port)


@task(help={"host": "only this host (a host name of the inventory, or backup-copy)",
            "dry": "show each host's key and fingerprint; write nothing"})
@reported
def trust(ctx: Context, host: str = "", dry: bool = False) -> None:
    """Record the SSH host keys of the inventory's hosts (trust on first use; never replaces)."""
    inventory = load(ctx, check_secrets=False)
    hosts = targets(inventory, host)
    path = inventory.known_hosts
    print(f"SSH host keys of inventory {inventory.name} -> {display(path)}", flush=True)
    print("Trust on first use: a key recorded now is trusted from then on, so compare each "
          "fingerprint with the host's own (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` "
          "on its console) before relying on it.", flush=True)
    probe = partial(trust_engine.offered_key,
                    connect_timeout=inventory.settings.timeouts.connect)
    rows = trust_engine.trust(hosts, path, probe=probe, dry=dry)
    print(table(["host", "address", "key type", "fingerprint", "status"],
                [(r.host.name, address(r.host), r.key.get_name() if r.key else "-",
                  hostkeys.fingerprint(r.key) if r.key else "-", r.status) for r in rows]))
    recorded = [r for r in rows if r.status == trust_engine.RECORDED]
    ssh_rows = [r for r in rows if r.status != trust_engine.SKIPPED]
    if not ssh_rows:
        print("no host of this inventory is reached over SSH: no key to record")
    elif all(r.status == trust_engine.KNOWN for r in ssh_rows):
        print("every key is already recorded: nothing to do")
    elif recorded:
        print(f"{len(recorded)} key(s) recorded in {display(path)}: commit that file")
    failed = [r for r in rows if r.failed]
    if failed:
        raise DifyopsError("\n".join(
            [f"{len(failed)} host key(s) not recorded:"]
            + [f"  {r.detail or r.host.name}" for r in failed]))


@task
@reported
def keys(ctx: Context) -> None:
    """Show the SSH host key recorded for each host of the inventory (no host is asked)."""
    inventory = load(ctx, check_secrets=False)
    known = hostkeys.load(inventory.known_hosts)
    rows = []
    for host in targets(inventory, ""):
        if host.connection == "local":
            rows.append((host.name, "local", "-", "skipped: connection local"))
            continue
        name = hostkeys.lookup_name(host.address, host.ssh.port)
        recorded = known.recorded(name)
        rows.extend((host.name, address(host), key.get_name(), hostkeys.fingerprint(key))
                    for key in recorded.values())
        if not recorded:
            rows.append((host.name, address(host), "-",
                         f"none: check it, then inv hosts.trust --host {host.name}"))
    print(f"SSH host keys of inventory {inventory.name} in {display(inventory.known_hosts)}")
    print(table(["host", "address", "key type", "fingerprint"], rows))
