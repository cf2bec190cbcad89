"""The vector tier for real: pgvector on a Debian 13 host, Weaviate's compose checked by compose.

pgvector: PostgreSQL 17 and postgresql-17-pgvector from Debian 13's packages (Debian 12 ships no
pgvector) on vec1, deployed by `inv db.deploy` and `inv vector.deploy`; a second host plays the
Dify client and uses exactly the PGVECTOR_* settings rendered for Dify to create a vector table
and query nearest neighbours. Weaviate: no image can be pulled here, so its rendered compose
project is checked by `docker compose config`, and run only where the image is present.
"""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dotenv import dotenv_values

from tests.integration.lab import Lab, LabHost
from tests.integration.support import eventually

ROOT = Path(__file__).resolve().parents[2]
WEAVIATE_IMAGE = "semitechnologies/weaviate:1.27.0"


def inv(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `inv` from the project root with this inventory and secrets file."""
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=timeout,
                          check=False)


def summary(result: subprocess.CompletedProcess) -> dict[str, dict[str, int]]:
    """The per-host summary table at the end of a deploy: host -> {status: count}."""
    header, *lines = result.stdout.split("summary:")[1].strip().splitlines()
    columns = header.replace("would change", "would_change").replace("not run", "not_run")
    names = columns.split()[1:]
    return {line.split()[0]: dict(zip(names, map(int, line.split()[1:len(names) + 1]),
                                      strict=True)) for line in lines}


def write_inventory(tmp: Path, data: dict) -> dict[str, str]:
    # A dev_backend host stands in for the app (no app tier is deployed here): it needs a source.
    data = {"dev": {"dify_source": "/srv/dify"}, **data}
    path = tmp / f"{data['name']}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return {"DIFY_INVENTORY": str(path), "DIFY_SECRETS": str(tmp / f"{data['name']}.env")}


# --- pgvector -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg_hosts(lab: Lab) -> tuple[LabHost, LabHost]:
    """vec1 on Debian 13 (PostgreSQL 17 + pgvector), vecapp on Debian 12 (the Dify client)."""
    with_trixie = lab.start(["vec1"], suite="trixie")
    return with_trixie[0], lab.start(["vecapp"])[0]


@pytest.fixture(scope="module")
def pg_lab(pg_hosts, tmp_path_factory) -> dict[str, str]:
    vec1, vecapp = pg_hosts
    data = {
        "name": "vector-lab",
        "db": {"version": 17},
        "cache": {"mode": "standalone"},
        "vector": {"store": "pgvector"},
        "net": {"firewall": "off"},
        "hosts": [vec1.inventory_entry(["db_primary", "cache"]),
                  vecapp.inventory_entry(["dev_backend"], user="deploy")],
    }
    env = write_inventory(tmp_path_factory.mktemp("vector"), data)
    generated = inv(env, "config.secrets")
    assert generated.returncode == 0, generated.stdout + generated.stderr
    db = inv(env, "db.deploy")
    assert db.returncode == 0, db.stdout + db.stderr
    return env


def dify_env(env: dict[str, str], client: str) -> dict[str, str]:
    """The environment difyops renders for Dify (config/env/dify.env.j2), as Dify reads it."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        from tasks.core.inventory import load_inventory
        from tasks.core.project import inventory_path
        from tasks.core.render import Renderer

        inventory = load_inventory(inventory_path())
        text = Renderer(inventory).render("config/env/dify.env.j2", inventory.host(client))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {k: v or "" for k, v in dotenv_values(stream=io.StringIO(text)).items()}


def psql_as_dify(client: LabHost, settings: dict[str, str], sql: str) -> tuple[int, str]:
    """Run SQL on the client host with Dify's PGVECTOR_* credentials, over the network."""
    return client.exec(
        f"PGPASSWORD={shlex.quote(settings['PGVECTOR_PASSWORD'])} PGCONNECT_TIMEOUT=5 "
        f"psql -X -v ON_ERROR_STOP=1 -At -h {settings['PGVECTOR_HOST']} "
        f"-p {settings['PGVECTOR_PORT']} -U {settings['PGVECTOR_USER']} "
        f"-d {settings['PGVECTOR_DATABASE']} -c {shlex.quote(sql)}")


def test_pgvector_serves_nearest_neighbours_with_difys_credentials(pg_lab, pg_hosts) -> None:
    vec1, vecapp = pg_hosts
    dry = inv(pg_lab, "vector.deploy", "--dry")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert vec1.exec("dpkg -s postgresql-17-pgvector")[0] != 0  # the dry run installed nothing
    first = inv(pg_lab, "vector.deploy")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "[vector] vec1: create the pgvector role, database and extension ... changed" in \
        first.stdout

    settings = dify_env(pg_lab, "vecapp")
    assert settings["VECTOR_STORE"] == "pgvector"
    assert (settings["PGVECTOR_HOST"], settings["PGVECTOR_USER"],
            settings["PGVECTOR_DATABASE"]) == (vec1.address, "dify_vector", "dify_vector")
    code, out = vecapp.exec("DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                            "--no-install-recommends postgresql-client >/dev/null 2>&1 "
                            "|| (apt-get update -q >/dev/null && apt-get install -y -q "
                            "--no-install-recommends postgresql-client >/dev/null)")
    assert code == 0, out
    code, out = psql_as_dify(vecapp, settings, """
        CREATE TABLE embeddings (id int PRIMARY KEY, doc text, embedding vector(3));
        INSERT INTO embeddings VALUES (1, 'apple', '[1,0,0]'), (2, 'pear', '[0.9,0.1,0]'),
                                      (3, 'stone', '[0,0,1]'), (4, 'plum', '[0.7,0.3,0.1]');
        CREATE INDEX ON embeddings USING hnsw (embedding vector_cosine_ops);
        SELECT doc FROM embeddings ORDER BY embedding <=> '[1,0.05,0]' LIMIT 3;""")
    assert code == 0, out
    assert out.split()[-3:] == ["apple", "pear", "plum"]

    code, out = psql_as_dify(vecapp, {**settings, "PGVECTOR_PASSWORD": "wrong-password"},
                             "SELECT 1")
    assert code != 0 and "password authentication failed" in out
    code, out = vec1.exec(f"PGPASSWORD={shlex.quote(settings['PGVECTOR_PASSWORD'])} "
                          f"psql -X -h {vec1.address} -U dify_vector -d dify_vector -c 'SELECT 1'")
    assert code != 0 and "no pg_hba.conf entry" in out  # vec1 is no Dify client

    status = inv(pg_lab, "vector.status")
    assert status.returncode == 0, status.stdout + status.stderr
    _, role, server, extension = next(
        line.split() for line in status.stdout.splitlines() if line.startswith("vec1"))
    assert (role, server.split(".")[0]) == ("primary", "17")
    assert extension[0].isdigit()  # the extension's version, e.g. 0.8.0

    second = inv(pg_lab, "vector.deploy")
    assert second.returncode == 0, second.stdout + second.stderr
    assert summary(second) == {"vec1": {"unchanged": 4}}


def test_a_dropped_vector_database_is_reported_and_restored(pg_lab, pg_hosts) -> None:
    vec1, vecapp = pg_hosts
    code, out = vec1.exec("runuser -u postgres -- psql -X -c 'DROP DATABASE dify_vector'")
    assert code == 0, out
    status = inv(pg_lab, "vector.status")
    assert status.returncode == 1
    assert "MISSING" in status.stdout and "not healthy on vec1" in status.stderr
    repaired = inv(pg_lab, "vector.deploy")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert summary(repaired)["vec1"].get("changed") == 1  # the database, role and extension
    code, out = psql_as_dify(vecapp, dify_env(pg_lab, "vecapp"),
                             "SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector")
    assert (code, out.strip()) == (0, "1")


def test_debian_12_is_refused_with_the_reason(pg_hosts, tmp_path) -> None:
    """No pgvector package for PostgreSQL 15 in Debian 12: the deploy stops and says why."""
    _, vecapp = pg_hosts
    env = write_inventory(tmp_path, {
        "name": "vector-bookworm", "cache": {"mode": "standalone"},
        "vector": {"store": "pgvector"},
        "hosts": [vecapp.inventory_entry(["db_primary", "cache", "dev_backend"])]})
    assert inv(env, "config.secrets").returncode == 0
    result = inv(env, "vector.deploy")
    assert result.returncode == 1
    assert "postgresql-15-pgvector is not in the apt sources of this host (Debian 12 does not " \
           "ship pgvector" in result.stdout
    assert vecapp.exec("dpkg -s postgresql-15")[0] != 0  # nothing was installed


# --- Weaviate -----------------------------------------------------------------------------------

WEAVIATE_HOSTS = [{"name": f"vector{i}", "address": f"10.0.3.{20 + i}", "roles": ["vector"]}
                  for i in (1, 2, 3)]


def weaviate_inventory(tmp: Path, name: str, **vector) -> dict[str, str]:
    return write_inventory(tmp, {
        "name": name, "cache": {"mode": "standalone"}, "vector": vector,
        "net": {"firewall": "off"},
        "hosts": [{"name": "home", "address": "10.0.3.10",
                   "roles": ["db_primary", "cache", "dev_backend"]}, *WEAVIATE_HOSTS]})


def test_weaviate_compose_passes_compose_and_our_checks(tmp_path) -> None:
    env = weaviate_inventory(tmp_path, "weaviate-3", replication_factor=2)
    assert inv(env, "config.secrets").returncode == 0
    checked = inv(env, "config.check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for node in WEAVIATE_HOSTS:
        assert f"passed  docker compose config  {node['name']}:/opt/dify-vector/compose.yml" in \
            checked.stdout
    out = tmp_path / "out"
    assert inv(env, "config.render", "--out", str(out)).returncode == 0
    project = out / "vector2" / "opt" / "dify-vector"
    result = subprocess.run(["docker", "compose", "config", "--format", "json"], cwd=project,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load(result.stdout)["services"]["weaviate"]
    assert service["image"] == WEAVIATE_IMAGE and service["network_mode"] == "host"
    assert service["command"][service["command"].index("--port") + 1] == "8080"
    env_of = service["environment"]
    assert env_of["GRPC_PORT"] == "50051" and env_of["RAFT_BOOTSTRAP_EXPECT"] == "3"
    assert env_of["CLUSTER_JOIN"] == "10.0.3.21:7100,10.0.3.23:7100"
    assert env_of["AUTHENTICATION_APIKEY_ALLOWED_KEYS"] == dotenv_values(
        project / ".env")["WEAVIATE_API_KEY"]


@pytest.mark.parametrize("vector, hosts, message", [
    ({"weaviate_version": "1.19.0"}, 1, "Weaviate 1.19.0 is too old for Dify 1.16.1"),
    ({}, 2, "a 2-node Weaviate cluster has no RAFT quorum"),
])
def test_weaviate_refusals_before_any_host(tmp_path, vector, hosts, message) -> None:
    env = write_inventory(tmp_path, {
        "name": "weaviate-bad", "cache": {"mode": "standalone"}, "vector": vector,
        "net": {"firewall": "off"},
        "hosts": [{"name": "home", "address": "10.0.3.10",
                   "roles": ["db_primary", "cache", "dev_backend"]}, *WEAVIATE_HOSTS[:hosts]]})
    result = inv(env, "vector.deploy", "--dry")
    assert result.returncode == 1 and message in result.stderr
    assert "found before touching any host" in result.stderr


def weaviate_image_present() -> bool:
    return subprocess.run(["docker", "image", "inspect", WEAVIATE_IMAGE], capture_output=True,
                          check=False).returncode == 0


@pytest.fixture
def weaviate_project(tmp_path) -> Iterator[Path]:
    """The rendered one-node project, started on this machine's engine (127.0.0.1)."""
    env = write_inventory(tmp_path, {
        "name": "weaviate-1", "cache": {"mode": "standalone"},
        "hosts": [{"name": "home", "address": "10.0.3.10",
                   "roles": ["db_primary", "cache", "dev_backend"]},
                  {"name": "local", "connection": "local", "roles": ["vector"]}]})
    assert inv(env, "config.secrets").returncode == 0
    out = tmp_path / "out"
    assert inv(env, "config.render", "--out", str(out)).returncode == 0
    project = out / "local" / "opt" / "dify-vector"
    compose = project / "compose.yml"
    compose.write_text(compose.read_text().replace("/var/lib/weaviate:", f"{tmp_path}/data:"))
    name = f"difyops-test-weaviate-{os.getpid()}"
    try:
        up = subprocess.run(["docker", "compose", "-p", name, "up", "-d", "--wait"],
                            cwd=project, capture_output=True, text=True, check=False,
                            timeout=300)
        assert up.returncode == 0, up.stderr
        yield project
    finally:
        subprocess.run(["docker", "compose", "-p", name, "down", "-v"], cwd=project,
                       capture_output=True, check=False, timeout=120)


@pytest.mark.skipif(not weaviate_image_present(),
                    reason=f"{WEAVIATE_IMAGE} is not on this machine and no registry answers "
                           "here; the compose project is still checked above")
def test_weaviate_runs_where_the_image_exists(weaviate_project) -> None:
    import requests

    key = dotenv_values(weaviate_project / ".env")["WEAVIATE_API_KEY"]
    eventually("weaviate ready", lambda: requests.get(
        "http://127.0.0.1:8080/v1/.well-known/ready", timeout=5).status_code == 200, 120, 1)
    assert requests.get("http://127.0.0.1:8080/v1/meta", timeout=5).status_code == 401
    meta = requests.get("http://127.0.0.1:8080/v1/meta", timeout=5,
                        headers={"Authorization": f"Bearer {key}"}).json()
    assert meta["version"] == WEAVIATE_IMAGE.rsplit(":", 1)[1]
    nodes = requests.get("http://127.0.0.1:8080/v1/nodes", timeout=5,
                         headers={"Authorization": f"Bearer {key}"}).json()["nodes"]
    assert [node["status"] for node in nodes] == ["HEALTHY"]
