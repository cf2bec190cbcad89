"""The inventory's `backup:` settings, checked before any host is touched."""

from __future__ import annotations

from tasks.core.errors import InputError, Problem
from tasks.core.inventory import Host, Inventory
from tasks.core.project import display


def problems(inventory: Inventory) -> list[Problem]:
    """Every problem with the backup settings, in a stable order."""
    shown = display(inventory.file)
    backup = inventory.settings.backup
    found: list[Problem] = []
    if not 0 <= backup.dump_compression <= 9:
        found.append(Problem(shown, "backup.dump_compression",
                             f"{backup.dump_compression} is not a level from 0 to 9",
                             "use 0 (none) to 9 (smallest, slowest); 1 is the default"))
    names = [host.name for host in inventory.hosts]
    if backup.verify_host:
        if backup.verify_host not in names:
            found.append(Problem(shown, "backup.verify_host",
                                 f"no host named {backup.verify_host!r}",
                                 f"use one of: {', '.join(names)} (or leave it empty for the "
                                 f"db primary)"))
        elif inventory.host(backup.verify_host).has("db_replica"):
            found.append(Problem(shown, "backup.verify_host",
                                 f"{backup.verify_host} is a read-only replica: it cannot "
                                 f"create scratch databases",
                                 "use the db primary (leave it empty) or another host with "
                                 "PostgreSQL"))
    if backup.schedule_on not in ("none", "control", *names):
        found.append(Problem(shown, "backup.schedule_on",
                             f"{backup.schedule_on!r} is neither none, control nor a host",
                             f"use none, control or one of: {', '.join(names)}"))
    found.extend(copy_problems(inventory, shown))
    return found


def copy_problems(inventory: Inventory, shown: str) -> list[Problem]:
    """The second place: a known type with the fields it needs."""
    copy = inventory.settings.backup.copy
    needed = {"none": (), "ssh": ("address", "path"), "s3": ("s3_endpoint", "s3_bucket")}
    found = [Problem(shown, f"backup.copy.{key}", f"required when backup.copy.type is "
                     f"{copy.type}", f"set backup.copy.{key}")
             for key in needed[copy.type] if not copy[key]]
    if copy.type == "ssh" and copy.path and not copy.path.startswith("/"):
        found.append(Problem(shown, "backup.copy.path", f"{copy.path!r} is not absolute",
                             "use an absolute directory on the copy host"))
    return found


def check(inventory: Inventory) -> None:
    """Raise InputError when the backup settings have problems."""
    found = problems(inventory)
    if found:
        raise InputError(found)


def db_primary(inventory: Inventory) -> Host:
    """The host whose databases are dumped and restored."""
    primaries = inventory.with_role("db_primary")
    if not primaries:
        raise InputError([Problem(display(inventory.file), "hosts[*].roles",
                                  "no host has the role 'db_primary': nothing to back up",
                                  "give the PostgreSQL primary the role 'db_primary'")])
    return primaries[0]


def verify_host(inventory: Inventory) -> Host:
    """Where scratch restores run: backup.verify_host, else the db primary."""
    name = inventory.settings.backup.verify_host
    return inventory.host(name) if name else db_primary(inventory)


def passphrase(inventory: Inventory) -> str | None:
    """The passphrase when backups are encrypted, else None."""
    if inventory.settings.backup.encrypt == "none":
        return None
    return inventory.secrets["BACKUP_PASSPHRASE"]
