"""db tier: PostgreSQL from the OS packages under systemd, a primary and streaming standbys.

Standbys are made the PostgreSQL 12+ way: pg_basebackup with a replication slot, standby.signal
in the data directory and primary_conninfo in a conf.d file (never recovery.conf). A standby is
cloned only when its data directory is not already a standby: a second deploy changes nothing.
Before anything is touched, each host checks that its state matches its role in the inventory
(a fenced old primary, a promoted standby): a deploy never undoes a failover.
"""

from __future__ import annotations

from tasks.core import facts, shell, tls
from tasks.core.gates import CommandGate
from tasks.core.inventory import Host, Inventory
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.system import packages, restart_unit, service_restart, service_running
from tasks.core.tiers import Tier

HELPER = "/usr/local/sbin/difyops-pg"
PASSFILE = "/var/lib/postgresql/.pgpass"
ROLES_SQL = "/etc/difyops/postgres-roles.sql"
FENCE = "/etc/difyops/postgres-fenced"
ROLE_FILE = "/etc/difyops/postgres-role.env"
TLS_DIR = "/etc/postgresql/difyops-tls"  # the CA, this host's certificate and key (tls.internal)


def slot_name(host: Host) -> str:
    """The physical replication slot of a standby (slot names allow [a-z0-9_], 63 at most)."""
    return f"difyops_{host.name.replace('-', '_')}"[:63]


def unit(inventory: Inventory) -> str:
    """The systemd unit of the cluster difyops manages (Debian's postgresql@VERSION-main)."""
    return f"postgresql@{inventory.settings.db.version}-main"


def conf_dir(inventory: Inventory) -> str:
    """Debian's configuration folder of the cluster."""
    return f"/etc/postgresql/{inventory.settings.db.version}/main"


def psql(inventory: Inventory, sql: str) -> str:
    """psql as the postgres superuser on the host itself (peer authentication, no password),
    unaligned with fields split by |."""
    port = inventory.settings.db.port
    return (f"cd / && runuser -u postgres -- psql -XAtq -F '|' -p {port} -v ON_ERROR_STOP=1 "
            f"-c {shell.quote(sql)}")


def writable_gate(inventory: Inventory) -> CommandGate:
    """Passes when the server accepts writes: out of recovery and able to assign an xid."""
    timeout = inventory.settings.db.promote_timeout
    return CommandGate("primary accepts writes", timeout=timeout,
                       command=psql(inventory, "SELECT pg_is_in_recovery()") + " | grep -qx f && "
                       + psql(inventory, "SELECT pg_current_xact_id()") + " >/dev/null")


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """Guard, install, configure, clone (standbys), start; roles and databases on the primary."""
    db = inventory.settings.db
    version, port = db.version, db.port
    confdir, service = conf_dir(inventory), unit(inventory)
    settings, hba = f"{confdir}/conf.d/difyops.conf", f"{confdir}/pg_hba.conf"
    upstream = f"{confdir}/conf.d/difyops-upstream.conf"
    primary = inventory.with_role("db_primary")[0]
    replicas = inventory.with_role("db_replica")
    peers = [peer for peer in inventory.with_role("db_primary", "db_replica")
             if peer.name != host.name]
    extra = {"primary": primary, "slot": slot_name(host), "passfile": PASSFILE, "fence": FENCE,
             "slots": [slot_name(replica) for replica in replicas], "peers": peers,
             "upstream_conf": upstream, "role_file": ROLE_FILE, "tls_dir": TLS_DIR}

    def render(template: str) -> str:
        return renderer.render(f"config/postgres/{template}", host, **extra)

    role = "primary" if host.has("db_primary") else "standby"
    plan: list[Step] = [
        WriteFile(HELPER, render("difyops-pg.sh.j2"), mode=0o755),
        RunCommand(f"state fits the role {role} of the inventory",
                   f"{HELPER} guard {role} {primary.name} {primary.address}", changes=False),
        WriteFile(ROLE_FILE, f"# Managed by difyops (db tier): this host's place in replication.\n"
                             f"ROLE={role}\nPRIMARY_NAME={primary.name}\n"
                             f"PRIMARY={primary.address}\n"),
        packages(f"postgresql-{version}"),
        *tls.service_files(inventory, host, directory=TLS_DIR, owner="postgres",
                           service="postgresql", tier="db"),
        WriteFile(settings, render("postgresql.conf.j2"), owner="postgres", group="postgres"),
        WriteFile(upstream, render("upstream.conf.j2"), owner="postgres", group="postgres"),
        WriteFile(hba, render("pg_hba.conf.j2"), mode=0o640, owner="postgres", group="postgres"),
    ]
    if db.wal_archive:
        archive = f"/var/lib/postgresql/{version}/archive"
        plan.append(RunCommand(f"WAL archive {archive}",
                               f"install -d -o postgres -g postgres -m 0700 {archive}",
                               unless=facts.is_directory(archive)))
    if replicas:
        plan.append(WriteFile(PASSFILE, render("pgpass.j2"), mode=0o600, owner="postgres",
                              group="postgres", secret=True))
    if host.has("db_replica"):
        plan += [
            WaitFor(CommandGate(f"primary {primary.name} accepts replication from {host.name}",
                                timeout=300, interval=2, command=f"{HELPER} upstream-ok")),
            RunCommand(f"replication slot {slot_name(host)} on {primary.name}",
                       f"{HELPER} slot-create", unless=f"{HELPER} slot-ok"),
            RunCommand(f"clone from {primary.name} (pg_basebackup)", f"{HELPER} clone",
                       unless=f"{HELPER} is-standby"),
        ]
    plan += [
        service_running(service),
        service_restart(service, settings, hba),
        RunCommand(f"reload {service}", f"systemctl reload {service}",
                   on_change=(upstream, *(f"{TLS_DIR}/{name}" for name in
                                          (tls.CA_FILE, tls.CERT_FILE, tls.KEY_FILE)))),
        WaitFor(CommandGate(f"postgresql on :{port}", timeout=60,
                            command=f"pg_isready -q -h 127.0.0.1 -p {port}"),
                restart=restart_unit(service)),  # doctor restarts, never promotes
    ]
    if host.has("db_primary"):
        plan += [
            WaitFor(writable_gate(inventory)),
            WriteFile(ROLES_SQL, render("roles.sql.j2"), mode=0o600, owner="postgres",
                      group="postgres", secret=True),
            RunCommand("create roles and databases",
                       f"cd / && runuser -u postgres -- psql -q -p {port} -v ON_ERROR_STOP=1 "
                       f"-f {ROLES_SQL}", on_change=(ROLES_SQL,)),
        ]
    else:
        plan.append(WaitFor(CommandGate(f"streaming from {primary.name}", timeout=120,
                                        interval=2, command=f"{HELPER} streaming")))
    return plan


TIER = Tier("db", "PostgreSQL primary and replicas", ("db_primary", "db_replica"), steps)
