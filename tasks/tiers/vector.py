"""vector tier: Weaviate by compose (1 node or a RAFT cluster of 3+), or pgvector in PostgreSQL.

Weaviate: a compose project per vector host, the API key from the secrets file, readiness on
/v1/.well-known/ready. pgvector (vector.store: pgvector): the OS package of the extension on every
PostgreSQL that serves it (the db primary and its replicas, or the one host with role `vector`,
which then gets its own PostgreSQL from the db tier's steps), and on the primary a role and a
database of their own with the extension created in it. The deploy proves the result the way
Dify will use it: a login with the PGVECTOR_* credentials that finds the extension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.core import facts, shell
from tasks.core.errors import HostError
from tasks.core.gates import HttpGate
from tasks.core.hosts import Machine
from tasks.core.inventory import Host, Inventory, endpoint
from tasks.core.plan import RunCommand, Step, WaitFor, WriteFile
from tasks.core.render import Renderer
from tasks.core.tiers import Tier
from tasks.tiers import db
from tasks.tiers.common import compose_up, restart_compose

DIRECTORY = "/opt/dify-vector"
PGVECTOR_SQL = "/etc/difyops/pgvector.sql"
PGVECTOR_ENV = "/etc/difyops/pgvector.env"
READY_TIMEOUT = 180  # seconds a Weaviate node may take to become ready
REST_PORT, GRPC_PORT, METRICS_PORT = 8080, 50051, 2112


def steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """Weaviate on vector hosts, or pgvector on the PostgreSQL hosts that serve it."""
    if inventory.settings.vector.store == "pgvector":
        return pgvector_steps(inventory, renderer, host)
    if not host.has("vector"):
        return []
    files = [
        WriteFile(f"{DIRECTORY}/.env",
                  f"WEAVIATE_API_KEY={inventory.secrets['WEAVIATE_API_KEY']}\n",
                  mode=0o600, secret=True),
        WriteFile(f"{DIRECTORY}/compose.yml", renderer.render("compose/weaviate.yml.j2", host)),
    ]
    return [
        *files,
        compose_up(DIRECTORY, "dify-vector", *(step.path for step in files),
                   wait_timeout=READY_TIMEOUT),
        WaitFor(HttpGate("weaviate ready", timeout=READY_TIMEOUT, interval=2,
                         url=f"http://{endpoint(host.address, REST_PORT)}/v1/.well-known/ready"),
                restart=restart_compose(DIRECTORY, "dify-vector", "weaviate")),
    ]


def pgvector_hosts(inventory: Inventory) -> list[Host]:
    """The PostgreSQL hosts that serve pgvector: the vector host, else the primary + replicas."""
    return inventory.with_role("vector") or inventory.with_role("db_primary", "db_replica")


def pgvector_home(inventory: Inventory) -> Host:
    """The writable PostgreSQL that holds the pgvector database (PGVECTOR_HOST)."""
    return (inventory.with_role("vector") or inventory.with_role("db_primary"))[0]


def pgvector_steps(inventory: Inventory, renderer: Renderer, host: Host) -> list[Step]:
    """The extension's package; on the writable server, the role, database and extension."""
    if host not in pgvector_hosts(inventory):
        return []
    version = inventory.settings.db.version
    package = f"postgresql-{version}-pgvector"
    plan: list[Step] = []
    if host.has("vector") and not host.has("db_primary", "db_replica"):
        plan += db.steps(inventory, renderer, host)  # a PostgreSQL of its own
    plan.append(RunCommand(
        f"install {package}",
        "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && "
        f"if ! apt-cache show {package} >/dev/null 2>&1; then echo '{package} is not in the "
        f"apt sources of this host (Debian 12 does not ship pgvector; Debian 13 ships "
        f"postgresql-17-pgvector): set db.version to a PostgreSQL whose pgvector package your "
        f"release ships, or add an apt repository that has it' >&2; exit 1; fi; "
        f"apt-get install -y -q --no-install-recommends {package}",
        unless=facts.all_installed(package)))
    if host != pgvector_home(inventory):
        return plan  # a replica: the extension's files only; the database arrives by replication
    port = inventory.settings.db.port
    plan += [
        WriteFile(PGVECTOR_SQL, renderer.render("config/pgvector/pgvector.sql.j2", host),
                  mode=0o600, owner="postgres", group="postgres", secret=True),
        WriteFile(PGVECTOR_ENV, pgvector_env(inventory), mode=0o600, secret=True),
        RunCommand("create the pgvector role, database and extension",
                   f"runuser -u postgres -- psql -q -p {port} -v ON_ERROR_STOP=1 "
                   f"-f {PGVECTOR_SQL}",
                   unless=pgvector_probe()),
    ]
    return plan


def pgvector_env(inventory: Inventory) -> str:
    """The PGVECTOR_* credentials as Dify gets them, for the deploy's own login probe."""
    vector = inventory.settings.vector
    return (f"PGVECTOR_PORT={inventory.settings.db.port}\n"
            f"PGVECTOR_USER={vector.pgvector_user}\n"
            f"PGVECTOR_PASSWORD={inventory.secrets['PGVECTOR_PASSWORD']}\n"
            f"PGVECTOR_DATABASE={vector.pgvector_database}\n")


def pgvector_probe() -> str:
    """Log in with Dify's credentials over TCP and find the extension (the password in env)."""
    query = shell.quote("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    return (f". {PGVECTOR_ENV} && PGPASSWORD=\"$PGVECTOR_PASSWORD\" PGCONNECT_TIMEOUT=5 "
            f"psql -w -h 127.0.0.1 -p \"$PGVECTOR_PORT\" -U \"$PGVECTOR_USER\" "
            f"-d \"$PGVECTOR_DATABASE\" -Atc {query} </dev/null | grep -q .")


# --- status (read-only) ---------------------------------------------------------------------

Getter = Callable[..., Any]


@dataclass(frozen=True)
class WeaviateState:
    """What one Weaviate node answers: readiness, version, the cluster's nodes as it sees them."""

    ready: bool
    version: str
    nodes: dict[str, str]  # node name -> status (HEALTHY, UNHEALTHY, UNAVAILABLE ...)
    expected: int

    @property
    def healthy(self) -> int:
        """How many nodes report HEALTHY."""
        return sum(1 for status in self.nodes.values() if status == "HEALTHY")

    @property
    def quorum(self) -> bool:
        """A RAFT majority of the inventory's vector hosts is healthy."""
        return self.healthy >= self.expected // 2 + 1

    @property
    def ok(self) -> bool:
        """Ready, with quorum."""
        return self.ready and self.quorum


def weaviate_state(inventory: Inventory, host: Host, get: Getter | None = None) -> WeaviateState:
    """Ask one Weaviate node (from the control machine, as the deploy's gate does)."""
    import requests

    get = get or requests.get
    base = f"http://{endpoint(host.address, REST_PORT)}/v1"
    headers = {"Authorization": f"Bearer {inventory.secrets['WEAVIATE_API_KEY']}"}
    try:
        ready = get(f"{base}/.well-known/ready", timeout=5).status_code == 200
        meta = get(f"{base}/meta", headers=headers, timeout=5)
        nodes = get(f"{base}/nodes", headers=headers, timeout=5)
    except requests.RequestException as exc:
        raise HostError(f"weaviate on {host.target} does not answer: {exc}") from exc
    for answer in (meta, nodes):
        if answer.status_code != 200:
            raise HostError(f"weaviate on {host.target}: {answer.url} answered HTTP "
                            f"{answer.status_code} {answer.text[:120]!r}")
    return WeaviateState(
        ready=ready, version=str(meta.json().get("version", "?")),
        nodes={node.get("name", "?"): node.get("status", "?")
               for node in nodes.json().get("nodes", [])},
        expected=len(inventory.with_role("vector")))


@dataclass(frozen=True)
class PgvectorState:
    """One PostgreSQL that serves pgvector: its role, version and the extension's version."""

    role: str  # primary | replica
    server_version: str
    extension: str  # "" when the extension is missing from the pgvector database

    @property
    def ok(self) -> bool:
        """The extension is there."""
        return bool(self.extension)


def pgvector_state(inventory: Inventory, machine: Machine) -> PgvectorState:
    """Ask the PostgreSQL on a host, as its superuser, over the local socket."""
    port = inventory.settings.db.port
    database = inventory.settings.vector.pgvector_database
    psql = f"runuser -u postgres -- psql -X -p {port} -At"
    server = machine.check(f"{psql} -c {shell.quote(SERVER_QUERY)}").stdout.strip()
    version, _, recovery = server.partition("|")
    extension = machine.run(f"{psql} -d {shell.quote(database)} -c {shell.quote(EXTENSION_QUERY)}")
    return PgvectorState("replica" if recovery == "t" else "primary", version.split(" ")[0],
                         extension.stdout.strip() if extension.ok else "")


SERVER_QUERY = "SELECT current_setting('server_version'), pg_is_in_recovery()"
EXTENSION_QUERY = "SELECT extversion FROM pg_extension WHERE extname = 'vector'"


TIER = Tier("vector", "vector store (Weaviate, or pgvector in PostgreSQL)",
            ("vector", "db_primary", "db_replica"), steps)
