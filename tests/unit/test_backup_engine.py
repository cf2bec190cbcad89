"""Backup settings, checksums, row-count parsing, S3 commands and the refusals of restore."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tasks.backups import copy, engine, postgres, settings
from tasks.backups.store import MANIFEST, Store, write_json
from tasks.core import secrets
from tasks.core.errors import InputError
from tasks.core.inventory import Host, Inventory
from tests.unit.conftest import UseMachines, good_secrets
from tests.unit.fakes import FakeMachine

# --- settings -------------------------------------------------------------------------------


def messages(inventory: Inventory) -> list[str]:
    return [f"{p.key}: {p.message}" for p in settings.problems(inventory)]


def test_defaults_are_valid(load: Callable[..., Inventory], base: dict) -> None:
    assert messages(load(base)) == []


def test_bad_settings_are_named(load: Callable[..., Inventory], base: dict) -> None:
    base["backup"] = {"dir": "backups", "keep_daily": -1, "encrypt": "yes", "time": "3am",
                      "verify_host": "db9", "copy": {"type": "ftp"}, "dump_compression": 12}
    with pytest.raises(InputError) as refused:  # the types, by the loader
        load(base)
    assert [f"{p.key}: {p.message}" for p in refused.value.problems] == [
        "backup.dir: 'backups' is not a plain absolute path",
        "backup.keep_daily: -1 is not a whole number of 0 or more",
        "backup.encrypt: 'yes' is not one of 'secrets', 'none', 'all'",
        "backup.time: '3am' is not a time of day (HH:MM)",
        "backup.copy.type: 'ftp' is not one of 'none', 'ssh', 's3'",
    ]
    base["backup"] = {"verify_host": "db9", "dump_compression": 12}
    assert messages(load(base)) == [
        "backup.dump_compression: 12 is not a level from 0 to 9",
        "backup.verify_host: no host named 'db9'",
    ]


def test_a_replica_cannot_host_scratch_restores(load, base) -> None:
    base["backup"] = {"verify_host": "db2"}
    assert messages(load(base)) == [
        "backup.verify_host: db2 is a read-only replica: it cannot create scratch databases"]


def test_copy_targets_need_their_fields(load, base) -> None:
    base["backup"] = {"copy": {"type": "ssh", "path": "relative"}}
    assert messages(load(base)) == ["backup.copy.address: required when backup.copy.type is ssh",
                                    "backup.copy.path: 'relative' is not absolute"]
    base["backup"] = {"copy": {"type": "s3"}}
    assert messages(load(base)) == [
        "backup.copy.s3_endpoint: required when backup.copy.type is s3",
        "backup.copy.s3_bucket: required when backup.copy.type is s3"]


def test_encryption_is_on_by_default_with_a_generated_passphrase(load, base) -> None:
    values = good_secrets()
    del values["BACKUP_PASSPHRASE"]
    with pytest.raises(InputError, match=r"BACKUP_PASSPHRASE: missing .*\n.*fix: run `inv "
                                         r"config.secrets` to generate it"):
        load(base, values)
    values["BACKUP_PASSPHRASE"] = "short"
    with pytest.raises(InputError, match="BACKUP_PASSPHRASE: shorter than 16 characters"):
        load(base, values)
    values["BACKUP_PASSPHRASE"] = "x" * 16
    assert settings.passphrase(load(base, values)) == "x" * 16
    spec = next(s for s in secrets.SPECS if s.name == "BACKUP_PASSPHRASE")
    assert spec.generated is True


def test_no_passphrase_needed_without_encryption(load, base) -> None:
    base["backup"] = {"encrypt": "none"}
    values = good_secrets()
    del values["BACKUP_PASSPHRASE"]
    inventory = load(base, values)
    assert settings.passphrase(inventory) is None
    assert "BACKUP_PASSPHRASE" not in [s.name for s in secrets.needed(inventory)]


def test_verify_host_defaults_to_the_primary(load, base) -> None:
    assert settings.verify_host(load(base)).name == "db1"
    base["backup"] = {"verify_host": "monitor1"}
    assert settings.verify_host(load(base)).name == "monitor1"


# --- what is backed up from where ------------------------------------------------------------


def test_sources_follow_the_inventory(load, base) -> None:
    plan = engine.Plan(load(base))
    assert plan.primary.name == "db1"
    assert [(name, host.name, path) for name, host, path in plan.archives()] == [
        ("storage", "api1", "/srv/dify/storage"),
        ("plugin_daemon", "api1", "/opt/dify/plugin_daemon")]
    base["storage"] = {"type": "s3", "s3_endpoint": "https://s3.example", "s3_bucket": "b"}
    assert [name for name, _, _ in engine.Plan(load(base)).archives()] == ["plugin_daemon"]


@pytest.mark.parametrize(("mode", "dump", "config"), [("none", "", ""), ("secrets", "", ".enc"),
                                                      ("all", ".enc", ".enc")])
def test_which_files_are_encrypted(load, base, mode: str, dump: str, config: str) -> None:
    base["backup"] = {"encrypt": mode}
    plan = engine.Plan(load(base))
    assert (plan.suffix(secret=False), plan.suffix(secret=True)) == (dump, config)


# --- postgres -------------------------------------------------------------------------------


def test_row_counts_are_parsed_from_the_conversation() -> None:
    output = ("SNAPSHOT:00000003-0000001B-1\nVERSION:15.20 (Debian 15.20-0+deb12u1)\n"
              "ALEMBIC:4f3a\nTABLE:public.accounts|3\nTABLE:public.odd|name|7\n"
              "TABLE:public.empty|0\nDIFYOPS-COUNTS-DONE\n")
    values, tables = postgres.parse_counts(output)
    assert values["SNAPSHOT"] == "00000003-0000001B-1"
    assert values["VERSION"].startswith("15.20") and values["ALEMBIC"] == "4f3a"
    assert tables == {"public.accounts": 3, "public.odd|name": 7, "public.empty": 0}


def test_row_count_comparison_names_every_difference() -> None:
    assert postgres.compare({"a": 1, "b": 2}, {"a": 1, "b": 2}, "dify") == []
    assert postgres.compare({"a": 1, "b": 2, "c": 0}, {"a": 1, "b": 3, "d": 0}, "dify") == [
        "dify: b has 3 rows, the backup recorded 2",
        "dify: table c is missing after the restore",
        "dify: table d was not in the backup"]


def test_password_file_line_escapes_separators() -> None:
    assert postgres.pgpass_line(5432, "a:b\\c") == "127.0.0.1:5432:*:dify:a\\:b\\\\c\n"


def test_identifiers_and_literals_are_quoted() -> None:
    assert postgres.quote_ident('we"ird') == '"we""ird"'
    assert postgres.quote_literal("it's") == "'it''s'"


# --- checksums ------------------------------------------------------------------------------


def make_backup(store: Store, backup_id: str = "20250101T030000Z",
                **manifest: Any) -> Path:
    """A complete backup with a dump, a storage archive and a config archive."""
    store.ensure()
    folder = store.start(backup_id)
    contents: dict[str, bytes] = {"db/dify.dump": b"PGDMP fake dump"}
    storage = io.BytesIO()
    with tarfile.open(fileobj=storage, mode="w:gz") as archive:
        info = tarfile.TarInfo("./privkeys/t1/private.pem")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"key"))
    contents["files/storage.tar.gz"] = storage.getvalue()
    config = io.BytesIO()
    with tarfile.open(fileobj=config, mode="w") as archive:
        text = manifest.pop("secrets_env", b"SECRET_KEY=unit-test-secret_key-0123456789abcdef\n")
        info = tarfile.TarInfo("secrets.env")
        info.size = len(text)
        archive.addfile(info, io.BytesIO(text))
    contents["config/config.tar"] = config.getvalue()
    entries = []
    for name, data in contents.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
        entries.append({"path": name, "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "encrypted": False})
    write_json(folder / MANIFEST, {"id": backup_id, "dify_version": "1.16.1", "files": entries,
                                   "databases": {"dify": {"file": "db/dify.dump",
                                                          "tables": {"public.t": 3}}},
                                   **manifest})
    return store.finish(backup_id)


def test_checksums_find_damaged_missing_and_unlisted_files(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = make_backup(store)
    assert engine.check_files(store.get()) == ([], set())
    data = bytearray((folder / "db/dify.dump").read_bytes())
    data[0] ^= 0xFF
    (folder / "db/dify.dump").write_bytes(bytes(data))
    (folder / "config/config.tar").unlink()
    (folder / "files/extra.bin").write_bytes(b"?")
    problems, bad = engine.check_files(store.get())
    assert problems == ["db/dify.dump: SHA-256 differs from the manifest (the file is damaged)",
                        "config/config.tar: missing", "files/extra.bin: not in the manifest"]
    assert bad == {"db/dify.dump", "config/config.tar"}


def test_truncated_file_is_reported_by_size(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = make_backup(store)
    (folder / "files/storage.tar.gz").write_bytes(b"x")
    problems, _ = engine.check_files(store.get())
    assert problems[0].startswith("files/storage.tar.gz: 1 bytes, the manifest says ")


def test_archives_are_read_to_the_end(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = make_backup(store)
    engine.check_archive(folder / "files/storage.tar.gz", None)
    whole = (folder / "files/storage.tar.gz").read_bytes()
    (folder / "broken.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(engine.BackupError, match="not a readable archive"):
        engine.check_archive(folder / "broken.tar.gz", None)


# --- restore refusals and the app tier around it ----------------------------------------------


@pytest.fixture
def hosts_log(use_machines: UseMachines) -> dict[str, list[str]]:
    """connect() gives fake machines; every command is logged per host."""
    log: dict[str, list[str]] = {}
    answers: dict[str, Callable[[str], int]] = {}

    def fake_connect(host: Host, timeouts: Any = None) -> FakeMachine:
        machine = FakeMachine(host, answers=answers.get(host.name, lambda command: 0))
        machine.commands = log.setdefault(host.name, [])
        return machine

    use_machines(fake_connect)
    log["__answers__"] = answers  # type: ignore[assignment]
    return log


def restore_inventory(load, base, tmp_path: Path) -> Inventory:
    base["backup"] = {"dir": str(tmp_path / "backups")}
    return load(base)


def test_restore_refuses_another_dify_version_before_touching_a_host(
        load, base, tmp_path, hosts_log) -> None:
    inventory = restore_inventory(load, base, tmp_path)
    make_backup(engine.store_of(inventory), dify_version="1.5.1")
    with pytest.raises(engine.BackupError, match=r"taken with Dify 1\.5\.1, this deployment "
                                                 r"runs Dify 1\.16\.1.*--force"):
        engine.restore_one(inventory, "20250101T030000Z", force=False, with_config=False,
                           out=lambda text: None)
    assert hosts_log == {"__answers__": {}}


def test_restore_refuses_a_damaged_backup(load, base, tmp_path, hosts_log) -> None:
    inventory = restore_inventory(load, base, tmp_path)
    folder = make_backup(engine.store_of(inventory))
    (folder / "db/dify.dump").write_bytes(b"tampered")
    with pytest.raises(engine.BackupError, match="is damaged, nothing was restored"):
        engine.restore_one(inventory, "20250101T030000Z", force=True, with_config=False,
                           out=lambda text: None)
    assert hosts_log == {"__answers__": {}}


def test_restore_refuses_another_secret_key_unless_told(load, base, tmp_path,
                                                         hosts_log) -> None:
    inventory = restore_inventory(load, base, tmp_path)
    make_backup(engine.store_of(inventory), secrets_env=b"SECRET_KEY=sk-another-key-of-old\n")
    with pytest.raises(engine.BackupError, match=r"another SECRET_KEY.*--config"):
        engine.restore_one(inventory, "20250101T030000Z", force=False, with_config=False,
                           out=lambda text: None)
    assert hosts_log == {"__answers__": {}}


def test_restore_refuses_an_encrypted_backup_without_passphrase(load, base, tmp_path,
                                                                hosts_log) -> None:
    base["backup"] = {"dir": str(tmp_path / "backups"), "encrypt": "none"}
    values = good_secrets()
    del values["BACKUP_PASSPHRASE"]
    inventory = load(base, values)
    folder = make_backup(engine.store_of(inventory))
    manifest = engine.store_of(inventory).get().manifest
    manifest["files"][0]["encrypted"] = True
    write_json(folder / MANIFEST, manifest)
    with pytest.raises(engine.BackupError, match=r"db/dify.dump is encrypted and "
                                                 r"BACKUP_PASSPHRASE is not in"):
        engine.restore_one(inventory, "20250101T030000Z", force=True, with_config=False,
                           out=lambda text: None)
    assert hosts_log == {"__answers__": {}}


def test_app_is_stopped_where_it_runs_and_started_even_when_the_restore_fails(
        load, base, tmp_path, hosts_log) -> None:
    inventory = restore_inventory(load, base, tmp_path)
    make_backup(engine.store_of(inventory))
    answers = hosts_log["__answers__"]
    # api1 runs the app containers; the other app hosts have no compose project
    for name in ("web1", "api2", "worker1"):
        answers[name] = lambda command: 1 if command.startswith("test -f") else 0
    answers["db1"] = lambda command: 1 if "CREATE DATABASE" in command else 0
    said: list[str] = []
    with pytest.raises(engine.BackupError, match=r"restore of 20250101T030000Z failed: SQL on "
                                                 r"db1 .* failed"):
        engine.restore_one(inventory, "20250101T030000Z", force=False, with_config=False,
                           out=said.append)
    compose = "docker compose --project-directory /opt/dify -p dify"
    api1 = [c for c in hosts_log["api1"] if c.startswith("docker")]
    assert api1 == [f"{compose} stop", f"{compose} start"]
    for name in ("web1", "api2", "worker1"):
        assert not any(c.startswith("docker") for c in hosts_log[name])
    assert "  web1: no app containers (/opt/dify/compose.yml or docker missing): nothing to " \
           "stop" in said
    # the current database was never touched: the restore goes into a new one first
    assert not any("RENAME" in c or "DROP DATABASE IF EXISTS \"dify\"" in c
                   for c in hosts_log["db1"])


# --- S3 copies ------------------------------------------------------------------------------


def test_s3_copy_uploads_files_then_the_manifest(load, base, tmp_path) -> None:
    base["backup"] = {"dir": str(tmp_path / "b"), "copy": {
        "type": "s3", "s3_endpoint": "https://s3.example:9000", "s3_bucket": "dify-backups",
        "path": "/prod/", "s3_region": "eu-1"}}
    inventory = load(base)
    make_backup(engine.store_of(inventory))
    calls: list[tuple[list[str], dict[str, str]]] = []

    def runner(command: list[str], env: dict[str, str], **_: Any) -> subprocess.CompletedProcess:
        calls.append((command, env))
        return subprocess.CompletedProcess(command, 0, "", "")

    record = copy.s3_copy(inventory, engine.store_of(inventory).get(), runner)
    folder = str(tmp_path / "b" / "20250101T030000Z")
    prefix = ["aws", "--endpoint-url", "https://s3.example:9000", "--region", "eu-1", "s3", "cp"]
    url = "s3://dify-backups/prod/20250101T030000Z/"
    assert [command for command, _ in calls] == [
        [*prefix, "--recursive", "--only-show-errors", folder, url, "--exclude", "manifest.json",
         "--exclude", "verified.json", "--exclude", "copy.json"],
        [*prefix, "--only-show-errors", f"{folder}/manifest.json", f"{url}manifest.json"]]
    env = calls[0][1]
    assert env["AWS_ACCESS_KEY_ID"] == good_secrets()["BACKUP_S3_ACCESS_KEY"]
    assert env["AWS_SECRET_ACCESS_KEY"] == good_secrets()["BACKUP_S3_SECRET_KEY"]
    assert record["files"] == 4 and record["type"] == "s3"


def test_s3_failure_says_which_command(load, base, tmp_path) -> None:
    base["backup"] = {"copy": {"type": "s3", "s3_endpoint": "https://s3", "s3_bucket": "b"}}
    inventory = load(base)

    def runner(command: list[str], **_: Any) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(command, 1, "", "upload failed: AccessDenied\n")

    with pytest.raises(copy.CopyError, match="aws s3 rm failed: upload failed: AccessDenied"):
        copy.aws(inventory, ["s3", "rm", "s3://b/x"], runner)


def test_success_is_recorded_for_the_monitor_hosts(load, base, monkeypatch,
                                                   use_machines) -> None:
    from tasks.backups import engine as backup_engine
    from tests.unit.fakes import FakeMachine

    machines: dict[str, FakeMachine] = {}

    def fake_connect(host, timeouts=None):
        return machines.setdefault(host.name, FakeMachine(host))

    use_machines(fake_connect)
    monkeypatch.setattr(backup_engine.time, "time", lambda: 1767225600.5)
    backup_engine.record_success(load(base), out=lambda text: None)
    assert list(machines) == ["monitor1"]
    content = machines["monitor1"].files[backup_engine.SUCCESS_METRIC][0].decode()
    assert content.endswith("dify_backup_last_success_timestamp_seconds 1767225600\n")
