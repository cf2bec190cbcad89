"""The vector tier: Weaviate's compose project and pgvector's plan, read back from the plans."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dotenv import dotenv_values
from invoke import Context
from invoke.exceptions import Exit

from tasks.core.errors import InputError
from tasks.core.hosts import Machine, Result
from tasks.core.inventory import Inventory
from tasks.core.plan import RunCommand, WriteFile
from tasks.core.profiles import version_key
from tasks.core.tiers import build
from tasks.tiers import TIERS
from tasks.tiers import vector as tier


def plan_of(inventory: Inventory) -> dict[str, list]:
    """host -> the vector tier's steps on it."""
    return {plan.host.name: plan.steps for plan in tier.TIER.plan(inventory).hosts}


def file_of(steps: list, path: str) -> WriteFile:
    return next(step for step in steps if isinstance(step, WriteFile) and step.path == path)


def command(steps: list, name: str) -> RunCommand:
    return next(step for step in steps if isinstance(step, RunCommand) and step.name == name)


def three_nodes(base: dict) -> dict:
    base["hosts"] += [{"name": "vector2", "address": "10.0.3.22", "roles": ["vector"]},
                      {"name": "vector3", "address": "10.0.3.23", "roles": ["vector"]}]
    base["vector"] = {"replication_factor": 2}
    return base


# --- Weaviate -----------------------------------------------------------------------------------

def test_single_weaviate_node(load, base) -> None:
    inventory = load(base)
    steps = plan_of(inventory)
    assert list(steps) == ["vector1"]
    compose = yaml.safe_load(file_of(steps["vector1"], f"{tier.DIRECTORY}/compose.yml").content)
    weaviate = compose["services"]["weaviate"]
    image, version = weaviate["image"].rsplit(":", 1)
    assert image == "semitechnologies/weaviate"
    assert version_key(version) >= version_key(inventory.profile.weaviate_min_version)
    assert weaviate["command"][weaviate["command"].index("--port") + 1] == "8080"
    env = weaviate["environment"]
    assert env["GRPC_PORT"] == "50051"
    assert env["AUTHENTICATION_ANONYMOUS_ACCESS_ENABLED"] == "false"
    assert env["AUTHENTICATION_APIKEY_ALLOWED_KEYS"] == "${WEAVIATE_API_KEY:?}"
    assert env["RAFT_BOOTSTRAP_EXPECT"] == "1" and env["RAFT_JOIN"] == "vector1"
    assert "CLUSTER_JOIN" not in env
    assert env["PROMETHEUS_MONITORING_ENABLED"] == "true"
    assert "/v1/.well-known/ready" in " ".join(weaviate["healthcheck"]["test"])
    secret = file_of(steps["vector1"], f"{tier.DIRECTORY}/.env")
    assert (secret.mode, secret.secret) == (0o600, True)
    assert secret.content == f"WEAVIATE_API_KEY={inventory.secrets['WEAVIATE_API_KEY']}\n"
    gate = steps["vector1"][-1].gate
    assert gate.url == "http://10.0.3.21:8080/v1/.well-known/ready"


def test_three_weaviate_nodes_form_a_raft_cluster(load, base) -> None:
    steps = plan_of(load(three_nodes(base)))
    assert sorted(steps) == ["vector1", "vector2", "vector3"]
    env = yaml.safe_load(file_of(steps["vector2"], f"{tier.DIRECTORY}/compose.yml").content)[
        "services"]["weaviate"]["environment"]
    assert env["RAFT_BOOTSTRAP_EXPECT"] == "3"
    assert env["RAFT_JOIN"] == "vector1,vector2,vector3"
    assert env["CLUSTER_HOSTNAME"] == "vector2"
    assert env["CLUSTER_ADVERTISE_ADDR"] == "10.0.3.22"
    assert env["CLUSTER_JOIN"] == "10.0.3.21:7100,10.0.3.23:7100"
    assert env["REPLICATION_MINIMUM_FACTOR"] == "2"


def test_weaviate_version_setting_picks_the_image(load, base) -> None:
    base["vector"] = {"weaviate_version": "1.28.2"}
    base["dify"] = {"registry_mirror": "mirror.example.com/"}
    steps = plan_of(load(base))
    compose = yaml.safe_load(file_of(steps["vector1"], f"{tier.DIRECTORY}/compose.yml").content)
    assert compose["services"]["weaviate"]["image"] == \
        "mirror.example.com/semitechnologies/weaviate:1.28.2"


@pytest.mark.parametrize("change, message", [
    (lambda b: b["hosts"][9]["roles"].append("vector"),
     "2 hosts have role 'vector': a 2-node Weaviate cluster has no RAFT quorum"),
    (lambda b: b.update(vector={"weaviate_version": "1.19.0"}),
     "Weaviate 1.19.0 is too old for Dify 1.16.1"),
    (lambda b: b.update(vector={"replication_factor": 3}),
     "replication factor 3 with 1 Weaviate node(s)"),
])
def test_weaviate_refusals(load, base, change, message) -> None:
    change(base)
    with pytest.raises(InputError) as error:
        load(base)
    assert message in str(error.value)


@pytest.mark.skipif(not shutil.which("docker"), reason="the docker CLI is not installed")
def test_docker_compose_accepts_the_rendered_weaviate_project(load, base, tmp_path) -> None:
    """`docker compose config` (the real parser, no engine needed) on a 3-node rendering."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("docker compose v2 is not installed")
    steps = plan_of(load(three_nodes(base)))["vector3"]
    for name in (".env", "compose.yml"):
        (tmp_path / name).write_text(file_of(steps, f"{tier.DIRECTORY}/{name}").content)
    result = subprocess.run(["docker", "compose", "config", "--format", "json"], cwd=tmp_path,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load(result.stdout)["services"]["weaviate"]
    assert service["environment"]["AUTHENTICATION_APIKEY_ALLOWED_KEYS"].startswith("unit-test-")
    (tmp_path / ".env").write_text("")
    missing = subprocess.run(["docker", "compose", "config", "-q"], cwd=tmp_path,
                             capture_output=True, text=True, check=False)
    assert missing.returncode != 0 and "WEAVIATE_API_KEY" in missing.stderr


# --- pgvector -----------------------------------------------------------------------------------

def pgvector(base: dict, dedicated: bool = False) -> dict:
    base["vector"] = {"store": "pgvector"}
    if not dedicated:
        base["hosts"] = [h for h in base["hosts"] if h["name"] != "vector1"]
    return base


def env_of(inventory: Inventory) -> dict[str, str]:
    content = next(step.content for t in build(TIERS, inventory) for p in t.hosts
                   if p.host.name == "api1" for step in p.files() if step.path == "/opt/dify/.env")
    return dotenv_values(stream=io.StringIO(content))


def test_pgvector_on_the_db_primary_and_its_replicas(load, base) -> None:
    inventory = load(pgvector(base))
    steps = plan_of(inventory)
    assert sorted(steps) == ["db1", "db2", "db3"]
    for replica in ("db2", "db3"):  # the extension's files, nothing to create there
        assert [step.name for step in steps[replica]] == ["install postgresql-15-pgvector"]
    install = command(steps["db1"], "install postgresql-15-pgvector")
    assert "apt-get install -y -q --no-install-recommends postgresql-15-pgvector" in \
        install.command
    assert "Debian 13 ships postgresql-17-pgvector" in install.command
    assert install.probe.startswith("dpkg-query ") and "postgresql-15-pgvector" in install.probe
    sql = file_of(steps["db1"], tier.PGVECTOR_SQL)
    assert (sql.mode, sql.owner, sql.secret) == (0o600, "postgres", True)
    password = inventory.secrets["PGVECTOR_PASSWORD"]
    assert f"ALTER ROLE dify_vector WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD " \
           f"'{password}';" in sql.content
    assert "CREATE DATABASE dify_vector OWNER dify_vector" in sql.content
    assert "\\connect dify_vector\nCREATE EXTENSION IF NOT EXISTS vector;" in sql.content
    create = command(steps["db1"], "create the pgvector role, database and extension")
    assert create.command == (f"runuser -u postgres -- psql -q -p 5432 -v ON_ERROR_STOP=1 "
                              f"-f {tier.PGVECTOR_SQL}")
    # Converged means: Dify's own credentials log in over TCP and find the extension.
    assert create.unless.startswith(f". {tier.PGVECTOR_ENV} && PGPASSWORD=")
    assert "-h 127.0.0.1" in create.unless and "FROM pg_extension WHERE extname" in create.unless
    assert "psql -w " in create.unless and "</dev/null" in create.unless  # never prompts
    assert password not in create.unless + create.command
    probe_env = dotenv_values(stream=io.StringIO(file_of(steps["db1"], tier.PGVECTOR_ENV).content))
    env = env_of(inventory)
    for key in ("PGVECTOR_PORT", "PGVECTOR_USER", "PGVECTOR_PASSWORD", "PGVECTOR_DATABASE"):
        assert probe_env[key] == env[key]
    assert env["VECTOR_STORE"] == "pgvector" and env["PGVECTOR_HOST"] == "10.0.3.11"
    assert env["PGVECTOR_USER"] == "dify_vector" and env["PGVECTOR_PASSWORD"] == password
    assert env["PGVECTOR_PASSWORD"] != inventory.secrets["DB_PASSWORD"]


def test_pgvector_clients_are_let_in_by_pg_hba(load, base) -> None:
    inventory = load(pgvector(base))
    hba = next(step.content for t in build(TIERS, inventory) for p in t.hosts
               if p.host.name == "db1" for step in p.files()
               if step.path.endswith("pg_hba.conf"))
    lines = [line.split() for line in hba.splitlines() if line.startswith("host")]
    vector = [line for line in lines if line[1] == "dify_vector"]
    assert sorted(line[3] for line in vector) == ["10.0.2.21/32", "10.0.2.22/32",
                                                  "10.0.2.31/32"]
    assert {line[2] for line in vector} == {"dify_vector"}


def test_pgvector_on_a_vector_host_of_its_own(load, base) -> None:
    inventory = load(pgvector(base, dedicated=True))
    steps = plan_of(inventory)
    assert sorted(steps) == ["vector1"]  # the db hosts' PostgreSQL is left alone
    names = [getattr(step, "name", getattr(step, "path", "")) for step in steps["vector1"]]
    assert names.index("install postgresql-15") < names.index("install postgresql-15-pgvector")
    assert "create the pgvector role, database and extension" in names
    assert env_of(inventory)["PGVECTOR_HOST"] == "10.0.3.21"


def test_pgvector_refusals(load, base) -> None:
    data = pgvector(base, dedicated=True)
    data["hosts"][-1]["roles"].append("vector")
    with pytest.raises(InputError, match=r"2 hosts have role 'vector' with vector.store pgvector"):
        load(data)
    data["vector"]["pgvector_database"] = "dify-vector"
    with pytest.raises(InputError, match=r"vector\.pgvector_database: 'dify-vector' is not a "
                                         r"PostgreSQL identifier"):
        load(data)


def test_pgvector_needs_its_own_password(load, base, write_inventory) -> None:
    from tasks.core.secrets import needed

    names = [spec.name for spec in needed(load(pgvector(base)))]
    assert "PGVECTOR_PASSWORD" in names and "WEAVIATE_API_KEY" not in names


# --- vector.status ------------------------------------------------------------------------------

def answer(status: int, body: dict | None = None, url: str = "") -> SimpleNamespace:
    return SimpleNamespace(status_code=status, json=lambda: body or {}, text=str(body), url=url)


def fake_weaviate(statuses: list[str], ready: int = 200, version: str = "1.27.0"):
    seen: list[dict] = []

    def get(url: str, headers: dict | None = None, timeout: float = 0) -> SimpleNamespace:
        seen.append({"url": url, "headers": headers})
        if url.endswith("/ready"):
            return answer(ready)
        if url.endswith("/meta"):
            return answer(200, {"version": version})
        return answer(200, {"nodes": [{"name": f"vector{i + 1}", "status": s}
                                      for i, s in enumerate(statuses)]})

    return get, seen


def test_weaviate_state_counts_quorum_over_the_inventory(load, base) -> None:
    inventory = load(three_nodes(base))
    host = inventory.host("vector1")
    get, seen = fake_weaviate(["HEALTHY", "HEALTHY", "UNAVAILABLE"])
    state = tier.weaviate_state(inventory, host, get)
    assert (state.version, state.healthy, state.expected, state.quorum, state.ok) == \
        ("1.27.0", 2, 3, True, True)
    key = inventory.secrets["WEAVIATE_API_KEY"]
    assert seen[1] == {"url": "http://10.0.3.21:8080/v1/meta",
                       "headers": {"Authorization": f"Bearer {key}"}}
    get, _ = fake_weaviate(["HEALTHY", "UNAVAILABLE", "UNAVAILABLE"])
    assert not tier.weaviate_state(inventory, host, get).quorum
    get, _ = fake_weaviate(["HEALTHY", "HEALTHY", "HEALTHY"], ready=503)
    assert not tier.weaviate_state(inventory, host, get).ok


class AnsweringMachine(Machine):
    """Answers commands by the first matching fragment."""

    def __init__(self, host, answers: dict[str, Result]) -> None:
        super().__init__(host)
        self.answers = answers

    @property
    def is_root(self) -> bool:
        return True

    def _execute(self, command: str, timeout: float) -> Result:
        return next((r for key, r in self.answers.items() if key in command), Result(1, "", "?"))


def test_pgvector_state_reads_role_and_extension(load, base) -> None:
    inventory = load(pgvector(base))
    machine = AnsweringMachine(inventory.host("db2"), {
        "pg_is_in_recovery": Result(0, "15.8|t\n", ""),
        "extname": Result(0, "0.8.0\n", "")})
    state = tier.pgvector_state(inventory, machine)
    assert (state.role, state.server_version, state.extension, state.ok) == \
        ("replica", "15.8", "0.8.0", True)
    machine.answers["extname"] = Result(2, "", 'database "dify_vector" does not exist')
    assert not tier.pgvector_state(inventory, machine).ok


def test_status_task_exits_non_zero_without_quorum(load, base, write_inventory, monkeypatch,
                                                  capsys) -> None:
    import tasks.vector as task_module

    path = write_inventory(three_nodes(base))
    monkeypatch.setenv("DIFY_INVENTORY", str(path))
    states = {"vector1": ["HEALTHY", "UNAVAILABLE", "UNAVAILABLE"]}

    def state(inventory, host):
        get, _ = fake_weaviate(states.get(host.name, ["HEALTHY"] * 3))
        return tier.weaviate_state(inventory, host, get)

    monkeypatch.setattr(task_module, "weaviate_state", state)
    with pytest.raises(Exit) as stopped:
        task_module.status(Context())
    assert "not healthy on vector1" in str(stopped.value.message)
    out = capsys.readouterr().out
    assert "1/3 healthy" in out and "3/3 healthy" in out
    states.clear()
    task_module.status(Context())


def test_status_task_names_a_missing_extension(load, base, write_inventory, monkeypatch) -> None:
    import tasks.vector as task_module

    path = write_inventory(pgvector(base))
    monkeypatch.setenv("DIFY_INVENTORY", str(path))

    def state(inventory, machine) -> tier.PgvectorState:
        name = machine.host.name
        return tier.PgvectorState("primary" if name == "db1" else "replica", "15.8",
                                  "" if name == "db3" else "0.8.0")

    monkeypatch.setattr(task_module, "pgvector_state", state)
    with pytest.raises(Exit) as stopped:
        task_module.status(Context())
    assert "not healthy on db3" in str(stopped.value.message)


def test_repo_has_no_leftover_weaviate_seed_version() -> None:
    """The seed's Weaviate 1.19 appears nowhere as a default."""
    root = Path(__file__).resolve().parents[2]
    assert "1.19" not in (root / "compose" / "weaviate.yml.j2").read_text()
