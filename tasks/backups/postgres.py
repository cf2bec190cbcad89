"""PostgreSQL: consistent dumps with their row counts, restores, scratch databases.

A dump runs on the host of the database as Dify's role (`dify` and DB_PASSWORD, the credentials
the application itself uses, through a temporary 0600 password file), streamed to the control
machine. Row counts are taken inside a REPEATABLE READ transaction whose snapshot pg_dump then
uses (`pg_export_snapshot` / `pg_dump --snapshot`): the counts describe exactly the rows in the
dump, even while Dify keeps writing. Restores and scratch databases need the superuser: they
run as the `postgres` system user over the local socket.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from tasks.backups.stream import Transfer, download, last_line, open_session, upload
from tasks.core import shell
from tasks.core.errors import HostError
from tasks.core.hosts import Machine

ROLE = "dify"
DATABASES = ("dify", "dify_plugin")
# The role that owns each database.
OWNERS = {"dify": "dify", "dify_plugin": "dify_plugin"}
# Databases whose every object is restored as their owner's, whoever owned it in the dump: the
# plugin daemon's (a dump taken before it had its own role holds dify's tables).
RESTORED_AS_OWNER = frozenset({"dify_plugin"})
DONE = "DIFYOPS-COUNTS-DONE"
# One `SELECT 'TABLE:<schema.table>|' || count(*)` per table, executed by \gexec.
COUNT_TABLES = (
    "SELECT format('SELECT %L || count(*) FROM %I.%I', "
    "'TABLE:' || n.nspname || '.' || c.relname || '|', n.nspname, c.relname) "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND n.nspname NOT LIKE 'pg\\_%' ORDER BY n.nspname, c.relname \\gexec\n"
)
ALEMBIC = ("SELECT 'SELECT ''ALEMBIC:'' || string_agg(version_num, '','') FROM alembic_version' "
           "WHERE to_regclass('public.alembic_version') IS NOT NULL \\gexec\n")


@dataclass(frozen=True)
class Dump:
    """What a dump recorded: its table row counts, versions, and the transfer."""

    database: str
    tables: dict[str, int]
    server_version: str
    alembic: str
    transfer: Transfer


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier in double quotes."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A PostgreSQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def pgpass_line(port: int, password: str) -> str:
    """The ~/.pgpass line for the dify role on the local server (':' and '\\' escaped)."""
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    return f"127.0.0.1:{port}:*:{ROLE}:{escaped}\n"


@contextmanager
def password_file(machine: Machine, port: int, password: str) -> Iterator[str]:
    """A 0600 password file for the dify role on the host, removed afterwards."""
    path = f"/tmp/difyops-pgpass-{secrets.token_hex(8)}"
    machine.install_file(path, pgpass_line(port, password).encode(), mode=0o600)
    try:
        yield path
    finally:
        machine.run(f"rm -f {shell.quote(path)}")


def client(program: str, pgpass: str, port: int, database: str) -> str:
    """A client command as the dify role over TCP to 127.0.0.1."""
    return (f"PGPASSFILE={shell.quote(pgpass)} PGCONNECT_TIMEOUT=10 {program} -h 127.0.0.1 "
            f"-p {port} -U {ROLE} -d {shell.quote(database)}")


def superuser(program: str, port: int, database: str = "postgres") -> str:
    """A client command as the postgres superuser over the local socket."""
    return f"runuser -u postgres -- {program} -p {port} -d {shell.quote(database)}"


def parse_counts(output: str) -> tuple[dict[str, str], dict[str, int]]:
    """The `KEY:value` lines and the `TABLE:name|count` lines of the counting conversation."""
    values: dict[str, str] = {}
    tables: dict[str, int] = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        if key == "TABLE":
            name, _, count = value.rpartition("|")
            tables[name] = int(count)
        else:
            values[key] = value
    return values, tables


def dump(machine: Machine, database: str, port: int, pgpass: str, sink: BinaryIO,
         timeout: float | None = None, compression: int = 1) -> Dump:
    """pg_dump -Fc of one database into sink, with the row counts of the same snapshot."""
    holder = open_session(machine, client("psql -X -q -A -t -v ON_ERROR_STOP=1", pgpass, port,
                                          database), timeout)
    try:
        holder.write(("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;\n"
                      "SELECT 'SNAPSHOT:' || pg_export_snapshot();\n"
                      "SELECT 'VERSION:' || current_setting('server_version');\n"
                      + ALEMBIC + COUNT_TABLES + f"SELECT '{DONE}';\n").encode())
        try:
            output = holder.read_until(f"{DONE}\n".encode()).decode()
        except HostError as exc:
            with contextlib.suppress(OSError, EOFError):
                holder.close_stdin()
            reason = last_line(holder.stderr) if holder.wait() else str(exc)
            raise HostError(f"cannot read {database} on {machine.host.target}: "
                            f"{reason}") from None
        values, tables = parse_counts(output)
        program = f"pg_dump -Fc -Z {compression} --snapshot={values['SNAPSHOT']}"
        transfer = download(machine, client(program, pgpass, port, database), sink, timeout)
        holder.write(b"COMMIT;\n")
        holder.close_stdin()
        while holder.read():
            pass
        holder.wait()
    finally:
        holder.close()
    if not transfer.ok:
        raise HostError(f"pg_dump of {database} failed on {machine.host.target}: "
                        f"{last_line(transfer.stderr)}")
    return Dump(database, tables, values.get("VERSION", ""), values.get("ALEMBIC", ""), transfer)


def pg_dump_version(machine: Machine) -> str:
    """`pg_dump --version` on the host."""
    return machine.check("pg_dump --version").stdout.strip()


def run_sql(machine: Machine, port: int, sql: str, database: str = "postgres") -> str:
    """SQL as the superuser (psql stops at the first error); its unaligned output."""
    command = (f"{superuser('psql -X -q -A -t -v ON_ERROR_STOP=1', port, database)} "
               f"<<'DIFYOPS_SQL'\n{sql}\nDIFYOPS_SQL")
    result = machine.run(command)
    if not result.ok:
        raise HostError(f"SQL on {machine.host.target} ({database}) failed: {result.answer}")
    return result.stdout


def count_rows(machine: Machine, port: int, database: str) -> dict[str, int]:
    """Rows per table of a database, as the superuser."""
    return parse_counts(run_sql(machine, port, COUNT_TABLES, database))[1]


def exists(machine: Machine, port: int, database: str) -> bool:
    """Whether the database exists on the host's server."""
    found = run_sql(machine, port, f"SELECT 1 FROM pg_database WHERE datname = "
                                   f"{quote_literal(database)};")
    return found.strip() == "1"


def drop(machine: Machine, port: int, database: str) -> None:
    """Drop a database if it exists, disconnecting its sessions."""
    run_sql(machine, port, f"DROP DATABASE IF EXISTS {quote_ident(database)} WITH (FORCE);")


def create(machine: Machine, port: int, database: str, owner: str | None = None) -> None:
    """Create an empty database (from template0)."""
    owned = f" OWNER {quote_ident(owner)}" if owner else ""
    run_sql(machine, port, f"CREATE DATABASE {quote_ident(database)}{owned} TEMPLATE template0;")


def restore(machine: Machine, port: int, database: str, source: BinaryIO, *,
            scratch: bool = False, owner: str | None = None,
            timeout: float | None = None) -> Transfer:
    """pg_restore a custom-format dump from source into an existing empty database: owners and
    grants as dumped; with `scratch`, every object the superuser's and no grants (a copy only
    difyops reads); with `owner`, every object made by and owned by that role."""
    options = "--exit-on-error"
    if scratch:
        options += " --no-owner --no-acl"
    elif owner:
        options += " --no-owner " + shell.quote(f"--role={owner}")
    transfer = upload(machine, superuser(f"pg_restore {options}", port, database), source,
                      timeout)
    if not transfer.ok:
        raise HostError(f"pg_restore into {database} failed on {machine.host.target}: "
                        f"{last_line(transfer.stderr)}")
    return transfer


def swap_in(machine: Machine, port: int, restored: str, database: str) -> None:
    """Put a restored database in the place of the current one (which is then dropped)."""
    previous = f"{database}__difyops_previous"
    drop(machine, port, previous)
    if exists(machine, port, database):
        run_sql(machine, port,
                f"ALTER DATABASE {quote_ident(database)} WITH ALLOW_CONNECTIONS false;\n"
                f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                f"WHERE datname = {quote_literal(database)};\n"
                f"ALTER DATABASE {quote_ident(database)} RENAME TO {quote_ident(previous)};")
    run_sql(machine, port, f"ALTER DATABASE {quote_ident(restored)} "
                           f"RENAME TO {quote_ident(database)};")
    drop(machine, port, previous)


def compare(expected: dict[str, int], found: dict[str, int], where: str) -> list[str]:
    """Differences between recorded and restored row counts, one line each."""
    problems = []
    for table in sorted(set(expected) | set(found)):
        if table not in found:
            problems.append(f"{where}: table {table} is missing after the restore")
        elif table not in expected:
            problems.append(f"{where}: table {table} was not in the backup")
        elif expected[table] != found[table]:
            problems.append(f"{where}: {table} has {found[table]} rows, the backup recorded "
                            f"{expected[table]}")
    return problems
