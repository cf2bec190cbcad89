"""Backups on real hosts: back up, destroy, restore, compare; damage; failing dumps; prune; timer.

Hosts (module scope): bk-db (PostgreSQL primary, deployed with `inv db.deploy`), bk-app (every
app role, reached as the sudo user `deploy`; storage and plugin data created by the test, no
containers), bk-copy (the second place, over SSH as `deploy`). Backups live on this machine,
the control machine, in a temporary backup.dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.core.project import DEFAULTS_FILE
from tasks.core.schema import load_defaults
from tests.integration.lab import LabHost
from tests.integration.support import until

ROOT = Path(__file__).resolve().parents[2]
APP_ROLES = ["api", "worker", "beat", "web", "plugin_daemon", "lb"]
STORAGE = "/srv/dify/storage"
PLUGIN_DIR = "/opt/dify/plugin_daemon"
COPY_DIR = "/home/deploy/dify-backups"
PASSPHRASE = "integration-passphrase-0123456789"
TIMER = "difyops-backup-bk"
# The Dify release the lab's inventory runs: the default one.
DEFAULT_VERSION = load_defaults(DEFAULTS_FILE)[0]["dify"]["version"]

Inv = Callable[..., subprocess.CompletedProcess]


class Env:
    """The module's inventory, secrets and hosts, and helpers to run `inv` against them."""

    def __init__(self, folder: Path, db: LabHost, app: LabHost, copy: LabHost) -> None:
        self.folder, self.db, self.app, self.copy = folder, db, app, copy
        self.backups = folder / "backups"
        self.secrets = folder / "bk.env"
        self.data: dict[str, Any] = {
            "name": "bk",
            "cache": {"mode": "standalone"},
            "vector": {"store": "pgvector"},
            "backup": {"dir": str(self.backups), "encrypt": "secrets",
                       "copy": {"type": "ssh", "address": copy.address, "user": "deploy",
                                "key": str(copy.key_file), "path": COPY_DIR}},
            "net": {"firewall": "off"},
            "hosts": [db.inventory_entry(["db_primary", "cache"]),
                      app.inventory_entry(APP_ROLES, user="deploy")],
        }
        self.inventory = self.write("bk.yml", self.data)

    def write(self, name: str, data: dict[str, Any]) -> Path:
        path = self.folder / name
        path.write_text(yaml.safe_dump(data))
        return path

    def inv(self, *args: str, inventory: Path | None = None,
            secrets: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "DIFY_INVENTORY": str(inventory or self.inventory),
               "DIFY_SECRETS": str(secrets or self.secrets)}
        return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                              capture_output=True, env=env, timeout=600, check=False)

    def sql(self, database: str, statement: str) -> str:
        """SQL as the dify role (tables owned by it, as Dify's are)."""
        password = self.secret("DB_PASSWORD")
        code, out = self.db.exec(f"PGPASSWORD='{password}' psql -h 127.0.0.1 -U dify -d "
                                 f"{database} -X -q -At -v ON_ERROR_STOP=1 -c \"{statement}\"")
        assert code == 0, out
        return out.strip()

    def superuser(self, statement: str) -> str:
        code, out = self.db.exec(f"runuser -u postgres -- psql -X -q -At -c \"{statement}\"")
        assert code == 0, out
        return out.strip()

    def secret(self, name: str) -> str:
        for line in self.secrets.read_text().splitlines():
            if line.startswith(f"{name}="):
                return line.split("=", 1)[1]
        raise KeyError(name)

    def ids(self) -> list[str]:
        """Every entry of backup.dir except the lock and the log."""
        if not self.backups.exists():
            return []
        return sorted(p.name for p in self.backups.iterdir()
                      if p.name not in (".lock", "backup.log"))

    def manifest(self, backup_id: str) -> dict[str, Any]:
        return json.loads((self.backups / backup_id / "manifest.json").read_text())


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def tree_digest(host: LabHost, path: str) -> str:
    """Every file's path, owner, mode and SHA-256 under a folder, independently of difyops."""
    code, out = host.exec(f"cd {path} && find . -printf '%p %U:%G %m\\n' | sort && "
                          f"find . -type f -print0 | sort -z | xargs -0 sha256sum")
    assert code == 0, out
    return out


@pytest.fixture(scope="module")
def env(lab, tmp_path_factory: pytest.TempPathFactory) -> Env:
    db, app, copy = lab.start(["bk-db", "bk-app", "bk-copy"])
    environment = Env(tmp_path_factory.mktemp("backup"), db, app, copy)
    # the passphrase is the operator's own (not generated); the rest is generated
    environment.secrets.write_text(f"BACKUP_PASSPHRASE={PASSPHRASE}\n")
    environment.secrets.chmod(0o600)
    ok(environment.inv("config.secrets"))
    ok(environment.inv("db.deploy"))
    # The app host's state, as Dify would leave it: storage (with the RSA keys that decrypt
    # model credentials) owned by uid 1001, plugin daemon data, the rendered environment.
    code, out = app.exec(
        f"mkdir -p {STORAGE}/privkeys/tenant-1 {STORAGE}/upload_files/tenant-1 {PLUGIN_DIR}/cwd"
        f" && printf 'PRIVATE KEY\\n' > {STORAGE}/privkeys/tenant-1/private.pem"
        f" && chmod 600 {STORAGE}/privkeys/tenant-1/private.pem"
        f" && head -c 200000 /dev/urandom > {STORAGE}/upload_files/tenant-1/report.pdf"
        f" && chown -R 1001:1001 {STORAGE}"
        f" && printf 'plugin\\n' > {PLUGIN_DIR}/cwd/manifest.yaml"
        f" && printf 'DB_PASSWORD={environment.secret('DB_PASSWORD')}\\n' > /opt/dify/.env"
        f" && chmod 600 /opt/dify/.env")
    assert code == 0, out
    environment.sql("dify", "CREATE TABLE accounts (id serial PRIMARY KEY, name text); "
                            "INSERT INTO accounts (name) VALUES ('ada'), ('grace'), ('李雷'); "
                            "CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz "
                            "DEFAULT now())")
    # Made as dify, as an installation did before the plugin daemon had its own role (dify is a
    # member of that role, which owns the database).
    environment.sql("dify_plugin", "CREATE TABLE plugins (id text PRIMARY KEY); "
                                   "INSERT INTO plugins VALUES ('openai'), ('search')")
    return environment


def start_writer(env: Env) -> None:
    """Insert into dify.events in a loop on bk-db until /tmp/stop-writer exists."""
    password = env.secret("DB_PASSWORD")
    env.db.exec("rm -f /tmp/stop-writer /tmp/writer.done; nohup sh -c 'i=0; while [ ! -e "
                "/tmp/stop-writer ] && [ $i -lt 5000 ]; do PGPASSWORD=" + password +
                " psql -h 127.0.0.1 -U dify -d dify -qc \"INSERT INTO events DEFAULT VALUES\"; "
                "i=$((i+1)); done; touch /tmp/writer.done' >/dev/null 2>&1 &")
    until(lambda: env.sql("dify", "SELECT count(*) FROM events") != "0", 60, "the writer")


def stop_writer(env: Env) -> None:
    env.db.exec("touch /tmp/stop-writer")
    until(lambda: env.db.exec("test -e /tmp/writer.done")[0] == 0, 60, "the writer to stop")


def test_backup_destroy_restore_compare(env: Env) -> None:
    storage_before = tree_digest(env.app, STORAGE)
    plugin_before = tree_digest(env.app, PLUGIN_DIR)
    start_writer(env)
    try:
        run = ok(env.inv("backup.run"))
    finally:
        stop_writer(env)
    (backup_id,) = env.ids()
    assert f"backup {backup_id}: complete" in run.stdout
    assert f"verify {backup_id}: ok" in run.stdout
    assert f"copy {backup_id}: 6 files checked on deploy@{env.copy.address}" in run.stdout

    # The manifest, checked against the files independently
    manifest = env.manifest(backup_id)
    assert manifest["dify_version"] == DEFAULT_VERSION
    assert manifest["postgres"]["server_version"].startswith("15.")
    assert manifest["postgres"]["pg_dump"].startswith("pg_dump (PostgreSQL) 15.")
    tables = manifest["databases"]["dify"]["tables"]
    assert tables["public.accounts"] == 3
    assert manifest["databases"]["dify_plugin"]["tables"] == {"public.plugins": 2}
    # the writer went on during the dump: the counts are those of the dump's snapshot
    events_now = int(env.sql("dify", "SELECT count(*) FROM events"))
    assert 0 < tables["public.events"] < events_now
    folder = env.backups / backup_id
    by_path = {entry["path"]: entry for entry in manifest["files"]}
    assert sorted(by_path) == ["config/config.tar.enc", "db/dify.dump", "db/dify_plugin.dump",
                               "files/plugin_daemon.tar.gz", "files/storage.tar.gz"]
    for name, entry in by_path.items():
        data = (folder / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
        assert (folder / name).stat().st_mode & 0o777 == 0o600
    assert by_path["files/storage.tar.gz"]["source"] == {
        "host": "bk-app", "address": env.app.address, "path": STORAGE}
    assert by_path["db/dify.dump"]["source"]["host"] == "bk-db"
    assert (folder / "db/dify.dump").read_bytes()[:5] == b"PGDMP"  # custom format
    assert folder.stat().st_mode & 0o777 == 0o700
    secret = env.secret("DB_PASSWORD").encode()
    assert secret not in (folder / "config/config.tar.enc").read_bytes()  # encrypted
    assert by_path["config/config.tar.enc"]["encrypted"] is True

    # The copy on the second host has the same bytes
    code, out = env.copy.exec(f"cd {COPY_DIR}/{backup_id} && sha256sum db/dify.dump "
                              f"config/config.tar.enc && stat -c '%U %a' .")
    assert code == 0, out
    assert by_path["db/dify.dump"]["sha256"] in out
    assert by_path["config/config.tar.enc"]["sha256"] in out
    assert out.strip().endswith("deploy 700")

    # Destroy: a dropped database, deleted rows, deleted and altered files
    env.superuser("DROP DATABASE dify WITH (FORCE)")
    env.sql("dify_plugin", "DELETE FROM plugins")
    env.app.exec(f"rm -rf {STORAGE}/privkeys {PLUGIN_DIR} && "
                 f"echo changed > {STORAGE}/upload_files/tenant-1/report.pdf")

    restored = ok(env.inv("backup.restore", backup_id))
    assert "bk-app: no app containers" in restored.stdout
    assert "row counts equal those recorded at backup time" in restored.stdout
    assert env.sql("dify", "SELECT string_agg(name, ',' ORDER BY id) FROM accounts") == \
        "ada,grace,李雷"
    assert env.sql("dify", "SELECT count(*) FROM events") == str(tables["public.events"])
    assert env.sql("dify_plugin", "SELECT string_agg(id, ',' ORDER BY id) FROM plugins") == \
        "openai,search"
    assert env.superuser("SELECT string_agg(pg_get_userbyid(datdba), ',' ORDER BY datname) "
                         "FROM pg_database WHERE datname IN ('dify', 'dify_plugin')") == \
        "dify,dify_plugin"
    # the daemon's objects are its own role's after a restore, whoever owned them in the dump
    assert env.sql("dify_plugin", "SELECT tableowner FROM pg_tables WHERE tablename = "
                                  "'plugins'") == "dify_plugin"
    assert env.superuser("SELECT count(*) FROM pg_database WHERE datname LIKE "
                         "'%difyops%'") == "0"  # no scratch or previous database left
    assert tree_digest(env.app, STORAGE) == storage_before
    assert tree_digest(env.app, PLUGIN_DIR) == plugin_before
    listing = ok(env.inv("backup.list")).stdout
    assert f"{backup_id}" in listing and "verified" in listing and "secrets" in listing


def test_restore_refuses_another_dify_version(env: Env) -> None:
    backup_id = env.ids()[-1]
    other = env.write("old.yml", {**env.data, "dify": {"version": "1.5.1"}})
    refused = env.inv("backup.restore", backup_id, inventory=other)
    assert refused.returncode == 1
    assert f"was taken with Dify {DEFAULT_VERSION}, this deployment runs Dify 1.5.1" \
        in refused.stderr
    assert "restore" not in refused.stdout  # nothing was stopped or touched


def test_another_secret_key_needs_config_restore(env: Env) -> None:
    """A deployment whose SECRET_KEY differs cannot decrypt the backup's credentials: refused,
    unless --config puts the backup's secrets file and rendered files back."""
    backup_id = env.ids()[-1]
    original = env.secrets.read_text()
    env.secrets.write_text(original.replace(f"SECRET_KEY={env.secret('SECRET_KEY')}",
                                            "SECRET_KEY=sk-a-new-key-after-a-rebuild-0123456789"))
    env.app.exec("echo 'DB_PASSWORD=edited' > /opt/dify/.env")
    refused = env.inv("backup.restore", backup_id)
    assert refused.returncode == 1 and "another SECRET_KEY" in refused.stderr
    restored = ok(env.inv("backup.restore", backup_id, "--config"))
    assert env.secrets.read_text() == original
    assert env.secrets.stat().st_mode & 0o777 == 0o600
    aside = env.folder / f"bk.env.before-{backup_id}"
    assert "sk-a-new-key-after-a-rebuild" in aside.read_text()
    assert "bk-app: /opt/dify/.env restored" in restored.stdout
    _, out = env.app.exec("cat /opt/dify/.env; stat -c %a /opt/dify/.env")
    assert out.split() == [f"DB_PASSWORD={env.secret('DB_PASSWORD')}", "600"]


def test_a_damaged_file_fails_verify(env: Env) -> None:
    ok(env.inv("backup.run", "--skip-verify"))
    backup_id = env.ids()[-1]
    dump = env.backups / backup_id / "db" / "dify_plugin.dump"
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    verified = env.inv("backup.verify", "--backup-id", backup_id)
    assert verified.returncode == 1
    assert "db/dify_plugin.dump: SHA-256 differs from the manifest" in verified.stdout
    assert "dify_plugin: not restored, its dump is damaged" in verified.stdout
    assert f"backup {backup_id} failed verification" in verified.stderr
    record = json.loads((env.backups / backup_id / "verified.json").read_text())
    assert record["ok"] is False
    assert "verify FAILED" in ok(env.inv("backup.list")).stdout
    refused = env.inv("backup.restore", backup_id)
    assert refused.returncode == 1 and "is damaged, nothing was restored" in refused.stderr


@pytest.mark.parametrize("fault", ["wrong password", "stopped server"])
def test_a_failing_dump_leaves_nothing_that_looks_complete(env: Env, fault: str) -> None:
    before = env.ids()
    secrets = env.secrets
    if fault == "wrong password":
        secrets = env.folder / "wrong.env"
        secrets.write_text(env.secrets.read_text().replace(
            f"DB_PASSWORD={env.secret('DB_PASSWORD')}", "DB_PASSWORD=not-the-password-12345678"))
        secrets.chmod(0o600)
        expected = 'password authentication failed for user "dify"'
    else:
        env.db.exec("systemctl stop postgresql@15-main")
        expected = "Connection refused"
    try:
        failed = env.inv("backup.run", secrets=secrets)
    finally:
        if fault == "stopped server":
            env.db.exec("systemctl start postgresql@15-main")
            until(lambda: env.db.exec("pg_isready -q -h 127.0.0.1")[0] == 0, 60, "PostgreSQL")
    assert failed.returncode == 1
    assert "failed and was discarded (nothing that looks like a backup was kept)" in \
        failed.stderr
    assert expected in failed.stderr
    assert env.ids() == before  # no new folder, no partial one


def test_prune_keeps_the_newest_and_the_newest_verified(env: Env) -> None:
    verified, damaged = env.ids()[:2]  # from the tests above
    ok(env.inv("backup.run", "--skip-verify"))
    newest = env.ids()[-1]
    strict = env.write("strict.yml", {**env.data, "backup": {
        **env.data["backup"], "keep_last": 0, "keep_daily": 0, "keep_weekly": 0,
        "keep_monthly": 0}})
    dry = ok(env.inv("backup.prune", "--dry", inventory=strict))
    assert f"{damaged}  delete" in dry.stdout and len(env.ids()) == 3
    pruned = ok(env.inv("backup.prune", inventory=strict))
    assert f"{verified}  keep (newest verified)" in pruned.stdout
    assert f"{newest}  keep (newest)" in pruned.stdout
    assert env.ids() == [verified, newest]
    # the second place loses what was pruned here, and nothing else
    code, out = env.copy.exec(f"ls {COPY_DIR}")
    assert code == 0 and out.split() == [verified, newest]


def test_schedule_on_a_systemd_host(env: Env) -> None:
    """The timer is installed once (a rerun changes nothing); a failing run is reported:
    non-zero exit, a log line in the journal, a POST to the webhook."""
    hook_port = 8765
    webhook = f"http://127.0.0.1:{hook_port}/hook"
    scheduled = env.write("scheduled.yml", {**env.data, "monitor": {"alert_webhook": webhook}})
    listener = ("import http.server\nclass H(http.server.BaseHTTPRequestHandler):\n"
                "    def do_POST(self):\n"
                "        body = self.rfile.read(int(self.headers['Content-Length']))\n"
                "        open('/tmp/hook.json', 'ab').write(body + b'\\n')\n"
                "        self.send_response(200); self.end_headers()\n"
                f"http.server.HTTPServer(('127.0.0.1', {hook_port}), H).serve_forever()\n")
    env.app.exec(f"cat > /tmp/hook.py <<'EOF'\n{listener}EOF\n"
                 "systemd-run --unit difyops-test-hook python3 /tmp/hook.py")
    dry = ok(env.inv("backup.schedule", "--host", "bk-app", "--dry", inventory=scheduled))
    assert "systemd timer" in dry.stdout
    assert env.app.exec(f"test -e /etc/systemd/system/{TIMER}.timer")[0] != 0
    first = ok(env.inv("backup.schedule", "--host", "bk-app", inventory=scheduled))
    assert "changed" in first.stdout
    second = ok(env.inv("backup.schedule", "--host", "bk-app", inventory=scheduled))
    header, line = second.stdout.split("summary:")[1].strip().splitlines()
    assert header.split() == ["host", "unchanged"] and line.split()[0] == "bk-app"
    code, out = env.app.exec(f"systemd-analyze verify /etc/systemd/system/{TIMER}.service "
                             f"/etc/systemd/system/{TIMER}.timer 2>&1 && "
                             f"sh -n /usr/local/sbin/{TIMER}")
    assert (code, out.strip()) == (0, ""), out  # systemd and sh find nothing to complain about
    code, out = env.app.exec(f"systemctl is-active {TIMER}.timer && systemctl list-timers")
    assert code == 0 and f"{TIMER}.timer" in out, out
    # Run the service now: this host has no difyops checkout, so the run fails.
    env.app.exec(f"systemctl start {TIMER}.service")
    until(lambda: env.app.exec(f"systemctl is-failed --quiet {TIMER}.service")[0] == 0, 60,
          "the service to fail")
    until(lambda: env.app.exec("test -s /tmp/hook.json")[0] == 0, 60, "the webhook POST")
    _, body = env.app.exec("cat /tmp/hook.json")
    assert f"{TIMER} FAILED (exit" in json.loads(body.splitlines()[0])["text"]
    _, journal = env.app.exec(f"journalctl -u {TIMER}.service --no-pager")
    assert f"{TIMER} FAILED (exit" in journal
    # The cron variant on a host without cron: the script is there, nothing claims to run it
    refused = env.inv("backup.schedule", "--host", "bk-app", "--cron", inventory=scheduled)
    assert refused.returncode == 1
    assert "runs neither systemd nor cron, so nothing runs the backup yet" in refused.stderr
    assert f"0 3 * * * /usr/local/sbin/{TIMER}" in refused.stderr
    assert env.app.exec(f"test -e /etc/cron.d/{TIMER}")[0] != 0
    env.app.exec("systemctl stop difyops-test-hook")
