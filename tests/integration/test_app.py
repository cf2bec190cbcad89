"""The app tier on real hosts: stand-in Dify images on Docker-capable lab hosts, with the real
PostgreSQL, Redis and nginx tiers, deployed, upgraded and rolled back by the real tasks (the hosts
and the inventory: tests/integration/app_lab.py).

The tests share the hosts and run in file order: images, deploy, the rolling upgrade, the
rollback (back on 1.5.1), then an upgrade stopped by an api that never gets healthy (a build
without its database driver). Stand-ins here, because images that ship in seconds let one module
drive the orchestration through a whole cycle of upgrade, rollback and a failed upgrade; what
depends on Dify's own behaviour (a deploy of another release refused, the migration lock, the
real upgrade with its migrations and the refused rollback) runs on the real api in
test_real_dify.py.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from dotenv import dotenv_values

from tests.images import standin
from tests.integration.app_lab import DEPLOY, A, App, B, start_app
from tests.integration.lab import Lab, ensure_base_image
from tests.integration.support import SteadyLoad, release, summary_counts, until


@pytest.fixture(scope="module")
def app(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """Stand-in images built here, four hosts started, PostgreSQL, Redis and nginx deployed."""
    the_app = start_app(lab, tmp_path_factory.mktemp("app"))
    yield the_app
    release(lab, the_app.hosts)


def test_images_sync_ships_over_ssh_then_does_nothing(app: App, lab: Lab) -> None:
    first = app.ok("images.sync")
    control = {name: lab.client.images.get(name).id
               for name in standin.ensure_images(lab.client, ensure_base_image(lab.client),
                                                 (A,))[A].values()}
    for host, wanted in (("app-api1", ["api", "plugin_daemon", "sandbox", "ssrf_proxy"]),
                         ("app-work", ["api", "web", "sandbox", "ssrf_proxy"])):
        for component in wanted:
            name = standin.image_name(A, component)
            code, out = app.hosts[host].exec(f"docker image inspect -f '{{{{.Id}}}}' {name}")
            assert (code, out.strip()) == (0, control[name]), (host, name, out)
    assert "shipped" in first.stdout
    assert app.hosts["app-db"].exec("command -v docker")[0] != 0  # no images for the db host
    second = app.ok("images.sync")
    statuses = {line.split()[2] for line in second.stdout.splitlines()[2:-1]
                if line.startswith("app-")}
    assert statuses == {"present"}, second.stdout
    assert "nothing to do" in second.stdout


def test_deploy_starts_every_service_healthy_then_changes_nothing(app: App) -> None:
    first = app.ok("app.deploy")
    # Order: the migration ran once, on the first api host, before any api started.
    assert "[app] app-api1: migrate the database (one run) ... changed" in first.stdout
    assert "migrate the database" not in first.stdout.replace("app-api1: migrate", "")
    assert app.sql("SELECT version_num FROM alembic_version") == standin.head(A)
    for name in ("app-api1", "app-api2"):
        host = app.hosts[name]
        health = requests.get(f"http://{host.address}:5001/health", timeout=5).json()
        assert health["status"] == "ok" and health["version"] == A
        _, out = host.exec(f"stat -c '%a %U' {DEPLOY}/.env; stat -c %u /srv/dify/storage; "
                           f"grep -c '^MIGRATION_ENABLED=false$' {DEPLOY}/.env")
        assert out.split() == ["600", "root", "1001", "1"], out
        _, out = host.exec("docker inspect -f '{{.HostConfig.Memory}} "
                           "{{.HostConfig.NanoCpus}} {{.HostConfig.RestartPolicy.Name}} "
                           "{{.State.Health.Status}}' dify-api-1")
        assert out.split() == [str(256 * 1024 * 1024), str(10**9), "always", "healthy"], out
    assert requests.get(f"http://{app.hosts['app-api1'].address}:5002/health/check",
                        timeout=5).json()["code"] == 0
    assert requests.get(f"http://{app.hosts['app-work'].address}:3000/",
                        timeout=5).status_code == 200
    # Workers consume every queue between them, through the broker; one beat.
    workers = [json.loads(app.redis("GET", key))
               for key in app.redis("KEYS", "'standin:worker:*'").split()]
    assert len(workers) == 2
    assert set().union(*(w["queues"] for w in workers)) >= {"dataset", "mail", "ops_trace"}
    assert json.loads(app.redis("GET", "standin:beat"))["version"] == A
    # The sandbox has no way out but the SSRF proxy.
    _, out = app.hosts["app-api1"].exec(
        "docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "
        "dify-sandbox-1; docker network inspect -f '{{.Internal}}' dify_ssrf_proxy_network")
    assert out.split() == ["dify_ssrf_proxy_network", "true"], out
    # The plugin daemon's passwords reach the daemon alone (its own env file), and every plugin
    # it runs inherits them: its database role made its tables and owns them, and cannot even
    # connect to Dify's database.
    secrets = dotenv_values(app.env["DIFY_SECRETS"])
    own = {"DB_PASSWORD": secrets["DB_PLUGIN_PASSWORD"],
           "REDIS_PASSWORD": secrets["REDIS_PLUGIN_DAEMON_PASSWORD"]}
    api1 = app.hosts["app-api1"]
    daemon_env = api1.exec("docker exec dify-plugin_daemon-1 env")[1].splitlines()
    assert {f"{name}={value}" for name, value in own.items()} <= set(daemon_env)
    api_env = api1.exec("docker exec dify-api-1 env")[1]
    assert not [name for name, value in own.items() if value in api_env]
    _, owner = app.hosts[app.primary].exec(
        "runuser -u postgres -- psql -d dify_plugin -AtX -c "
        "\"SELECT tableowner FROM pg_tables WHERE tablename = 'plugins'\"")
    assert owner.strip() == "dify_plugin", owner
    connect = ("import os, psycopg2; e = os.environ; psycopg2.connect(host=e['DB_HOST'], "
               "port=e['DB_PORT'], user=e['DB_USERNAME'], password=e['DB_PASSWORD'], "
               "dbname='dify', sslmode=e.get('DB_SSL_MODE', 'disable'), connect_timeout=5)")
    code, out = api1.exec(f"docker exec dify-plugin_daemon-1 python3 -c {shlex.quote(connect)}")
    assert code != 0 and 'user "dify_plugin", database "dify"' in out, out
    status = app.ok("app.status")
    assert "dataset" in status.stdout and "healthy" in status.stdout

    second = app.ok("app.deploy")
    counts = summary_counts(second.stdout)
    assert set(counts) == {"app-api1", "app-api2", "app-work"}
    assert all(c.get("changed", 0) == 0 for c in counts.values()), second.stdout


def test_secrets_from_a_vault_command_deploy_the_same_values(app: App) -> None:
    secrets_file = Path(app.env["DIFY_SECRETS"])
    values = {k: v for k, v in dotenv_values(secrets_file).items() if v}
    vault = app.tmp / "vault"
    vault.mkdir(exist_ok=True)
    for name, value in values.items():
        (vault / name).write_text(value + "\n")
    aside = secrets_file.rename(secrets_file.with_suffix(".aside"))  # the file is not read
    try:
        app.write_inventory(secrets_command=f"cat {shlex.quote(str(vault))}/{{name}}")
        same = app.ok("app.deploy")
        counts = summary_counts(same.stdout)
        assert all(c.get("changed", 0) == 0 for c in counts.values()), same.stdout
        assert not secrets_file.exists()  # nothing written on the control machine
        env = app.hosts["app-api1"].exec(f"cat {DEPLOY}/.env")[1]
        assert f"DB_PASSWORD={values['DB_PASSWORD']}" in env
        # A secret the vault does not hold stops the run before any host, naming it.
        (vault / "REDIS_PASSWORD").unlink()
        missing = app.inv("app.deploy")
        assert missing.returncode == 1, missing.stdout
        assert "secrets.command (REDIS_PASSWORD): failed (exit 1)" in missing.stdout + \
            missing.stderr
        assert "[app]" not in missing.stdout
        assert values["REDIS_PASSWORD"] not in missing.stdout + missing.stderr
    finally:
        aside.rename(secrets_file)
        app.write_inventory()


def test_rolling_upgrade_keeps_an_api_answering(app: App) -> None:
    apis = [app.hosts["app-api1"].address, app.hosts["app-api2"].address]
    through_lb = f"http://{app.hosts['app-db'].address}/console/api/setup"
    rounds: list[tuple[float, list[str]]] = []
    balanced: list[int] = []  # status of each steady request through nginx (0: no answer)
    stop = threading.Event()

    def poll() -> None:
        session = requests.Session()
        while not stop.is_set():
            answers = []
            for address in apis:
                try:
                    body = session.get(f"http://{address}:5001/health", timeout=2).json()
                    answers.append(body["version"] if body["status"] == "ok" else "")
                except (requests.RequestException, ValueError):
                    answers.append("")
            rounds.append((time.monotonic(), answers))
            try:
                balanced.append(session.get(through_lb, timeout=5).status_code)
            except requests.RequestException:
                balanced.append(0)
            time.sleep(0.1)

    app.ok("images.sync", "--version", B)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        result = app.inv("app.upgrade", "--version", B)
    finally:
        stop.set()
        poller.join()
    assert result.returncode == 0, result.stdout + result.stderr
    down = [answers for _, answers in rounds if not any(answers)]
    assert down == [], f"{len(down)} of {len(rounds)} polls found no api answering"
    failed = [status for status in balanced if status != 200]
    assert failed == [], f"{len(failed)} of {len(balanced)} requests through nginx failed"
    # Each api was replaced in turn: some polls saw one on B while the other was still on A.
    assert any(set(answers) == {A, B} for _, answers in rounds)
    assert rounds[-1][1] == [B, B]
    assert app.sql("SELECT version_num FROM alembic_version") == standin.head(B)
    assert app.images("app-work")["web"] == standin.image_name(B, "web")
    assert json.loads(app.redis("GET", "standin:beat"))["version"] == B
    order = [line for line in result.stdout.splitlines() if "compose up dify ... changed" in line]
    assert [line.split()[1] for line in order] == ["app-api1:", "app-api2:", "app-work:"]
    history = json.loads(app.hosts["app-api2"].exec(
        "cat /var/lib/difyops/dify-releases.json")[1])
    assert [(h["version"], h["alembic"]) for h in history] == [(A, standin.head(A)),
                                                               (B, standin.head(B))]
    assert "set `dify.version: \"1.13.3\"`" in result.stdout
    # A verified backup came first; each api host left the balancer while it was replaced.
    assert re.search(r"\[app\] backup \d{8}T\d{6}Z taken", result.stdout), result.stdout
    assert "app-api1: drained" in result.stdout and "app-api2: drained" in result.stdout
    assert "app-work: drained" not in result.stdout  # the only web host stays in its upstream


def test_rollback_across_the_migration_needs_a_restore(app: App) -> None:
    refused = app.inv("app.rollback")
    assert refused.returncode == 1
    assert "A rollback across a migration is a restore" in refused.stderr
    assert f"alembic revision {standin.head(A)}" in refused.stderr
    assert app.images("app-api1")["api"] == standin.image_name(B, "api")
    # What a restore of the pre-upgrade backup does to the schema, then the rollback goes on.
    app.sql(f"UPDATE alembic_version SET version_num = '{standin.head(A)}'")
    result = app.ok("app.rollback")
    assert "rolled back to Dify 1.5.1" in result.stdout
    for name in ("app-api1", "app-api2"):
        assert app.images(name)["api"] == standin.image_name(A, "api")
        assert requests.get(f"http://{app.hosts[name].address}:5001/health",
                            timeout=5).json()["version"] == A
    # The inventory says 1.5.1 again, so a deploy agrees with the hosts and changes nothing.
    counts = summary_counts(app.ok("app.deploy").stdout)
    assert all(c.get("changed", 0) == 0 for c in counts.values()), counts


def test_an_upgrade_whose_api_never_gets_healthy_puts_the_old_one_back(app: App,
                                                                        lab: Lab) -> None:
    # After the rollback every host runs 1.5.1. On app-api2, the 1.13.3 api image is a broken
    # build (its PostgreSQL driver left out): the api starts, but /health answers 503 forever.
    broken = standin.broken_api(lab.client, ensure_base_image(lab.client), B)
    app.put_image("app-api2", broken, standin.image_name(B, "api"))
    work = app.hosts["app-work"].exec(f"cat {DEPLOY}/compose.yml")[1]
    work_images = app.images("app-work")
    app.write_inventory(health_timeout=30)  # seconds, not the default minutes
    try:
        with SteadyLoad(f"{app.balancer}/console/api/setup", rate=10, threads=2) as load:
            result = app.inv("app.upgrade", "--version", B)
    finally:
        app.write_inventory()
    assert result.returncode == 1, result.stdout
    message = result.stderr
    # Where it stopped, the component, its last health answer, what was done, what to do.
    assert "the upgrade to Dify 1.13.3 stopped" in message
    # The facts, whichever 30 s deadline notices first on a loaded machine (compose's wait or
    # the gate) and however curl words its error: the host, the api, the deadline, the body's
    # problem.
    stop = re.search(r"stopped at app-api2: (compose up dify|health api /health):(.*)", message)
    assert stop, message
    assert "api" in stop.group(2) or stop.group(1).startswith("health api"), message
    assert "30 s" in stop.group(2) and "No module named 'psycopg2'" in stop.group(2), message
    assert "on Dify 1.13.3: app-api1" in message
    assert "not touched, still serving Dify 1.5.1: app-work" in message
    assert ("app-api2 was put back on Dify 1.5.1 and is back in service (healthy again before "
            "it re-entered the load balancer)") in message
    assert "rerun inv app.upgrade --version 1.13.3: it resumes at app-api2" in message
    # The old release serves on app-api2 again; app-work was never touched.
    assert app.images("app-api2")["api"] == standin.image_name(A, "api")
    health = requests.get(f"http://{app.hosts['app-api2'].address}:5001/health",
                          timeout=5).json()
    assert (health["status"], health["version"]) == ("ok", A)
    assert app.hosts["app-work"].exec(f"cat {DEPLOY}/compose.yml")[1] == work
    assert app.images("app-work") == work_images
    # Requests through nginx kept succeeding, and app-api2 is back in its upstream: nginx
    # answers from both releases.
    assert load.failed == [], f"{len(load.failed)} of {len(load.records)} requests failed"
    assert len(load.records) > 100
    seen: set[str] = set()

    def both_releases_answer() -> bool:
        seen.add(requests.get(f"{app.balancer}/console/api/setup", timeout=5).json()["version"])
        return seen == {A, B}

    until(both_releases_answer, 30, "nginx answering from app-api1 (1.13.3) and app-api2 "
                                    "(1.5.1)")
