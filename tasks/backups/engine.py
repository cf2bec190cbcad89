"""Run, verify and restore backups of the deployment an inventory describes.

What a backup holds, and from where (the hosts of the current inventory):
- db/dify.dump, db/dify_plugin.dump: pg_dump -Fc on the db primary, with row counts per table;
- files/storage.tar.gz: the api storage (uploads, `privkeys/` that decrypt model credentials),
  from the first api/worker host, unless storage is in S3;
- files/plugin_daemon.tar.gz: <app.deploy_dir>/plugin_daemon from the plugin daemon host;
- config/config.tar: the secrets file and the inventory from this machine, and the rendered
  files of every app host (<app.deploy_dir>/.env, compose.yml, squid.conf).
Every file is 0600; with backup.encrypt `secrets` the config archive is encrypted, with `all`
every file is. manifest.json lists each file with its size, SHA-256 and source.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from tasks.backups import copy, crypto, postgres, settings
from tasks.backups.retention import Candidate, Policy, decide
from tasks.backups.store import (
    FORMAT,
    MANIFEST,
    METADATA,
    VERIFIED,
    Backup,
    Store,
    sha256_file,
    utc_now,
    write_json,
)
from tasks.backups.stream import download, last_line, upload
from tasks.core import secrets, shell
from tasks.core.errors import DifyopsError
from tasks.core.fleet import table
from tasks.core.hosts import Machine, connect
from tasks.core.inventory import APP_ROLES, Host, Inventory
from tasks.core.project import display

Say = Callable[[str], None]
APP_FILES = (".env", "compose.yml", "squid.conf")
COMPOSE_PROJECT = "dify"


class BackupError(DifyopsError):
    """A backup could not be made, verified, copied or restored."""


def say(text: str) -> None:
    """Progress on stdout, flushed (the timer's log shows it as it happens)."""
    print(text, flush=True)


def now() -> str:
    """The current UTC time, ISO 8601."""
    return utc_now()


def megabytes(size: int) -> str:
    """A size for people."""
    return f"{size / 1e6:.1f} MB"


@dataclass
class Item:
    """One file of a backup: its name in the backup folder and where it came from."""

    name: str
    source: dict[str, Any]
    encrypted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Plan:
    """What the current inventory's backup holds and where each part lives."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self.primary = settings.db_primary(inventory)
        self.port = inventory.settings.db.port
        self.mode = inventory.settings.backup.encrypt
        self.passphrase = settings.passphrase(inventory)
        self.deploy_dir = inventory.settings.app.deploy_dir
        self.timeouts = inventory.settings.timeouts

    def suffix(self, secret: bool) -> str:
        """`.enc` when this kind of file is encrypted."""
        return crypto.SUFFIX if self.encrypts(secret) else ""

    def encrypts(self, secret: bool) -> bool:
        """Whether a file is encrypted: all files, or the secret ones, or none."""
        return self.mode == "all" or (self.mode == "secrets" and secret)

    def key(self, secret: bool) -> str | None:
        """The passphrase for a kind of file, or None when it is written plain."""
        return self.passphrase if self.encrypts(secret) else None

    def storage_host(self) -> Host | None:
        """The host whose storage folder is backed up (None: S3 storage or no app host)."""
        if self.inventory.settings.storage.type == "s3":
            return None
        hosts = self.inventory.with_role("api", "worker")
        return hosts[0] if hosts else None

    def plugin_host(self) -> Host | None:
        """The plugin daemon's host."""
        hosts = self.inventory.with_role("plugin_daemon")
        return hosts[0] if hosts else None

    def archives(self) -> list[tuple[str, Host, str]]:
        """(name, host, folder) of each folder archived."""
        found = []
        storage = self.storage_host()
        if storage:
            found.append(("storage", storage, self.inventory.settings.storage.path))
        plugin = self.plugin_host()
        if plugin:
            found.append(("plugin_daemon", plugin, f"{self.deploy_dir}/plugin_daemon"))
        return found

    def connect(self, host: Host) -> Machine:
        """A connection with the inventory's timeouts."""
        return connect(host, self.timeouts)


# --- run ------------------------------------------------------------------------------------


def run(inventory: Inventory, store: Store, out: Say = say) -> Backup:
    """Make one complete backup (call with the store's lock held)."""
    plan = Plan(inventory)
    for leftover in store.remove_leftovers():
        out(f"removed {leftover}: left by a run that did not finish")
    backup_id = store.new_id()
    folder = store.start(backup_id)
    started, clock = now(), time.monotonic()
    out(f"backup {backup_id}: into {display(folder)} (complete only once renamed to "
        f"{backup_id}/)")
    try:
        items, meta = collect(plan, folder, out)
        manifest = {
            "format": FORMAT,
            "id": backup_id,
            "inventory": inventory.name,
            "created": started,
            "finished": now(),
            "seconds": round(time.monotonic() - clock, 1),
            "dify_version": inventory.profile.version,
            "control_host": os.uname().nodename,
            "encryption": {"mode": plan.mode,
                           "cipher": crypto.DESCRIPTION if plan.mode != "none" else ""},
            **meta,
            "files": [describe(folder, item) for item in items],
        }
        write_json(folder / MANIFEST, manifest)
        final = store.finish(backup_id)
    except DifyopsError as exc:
        store.discard(backup_id)
        raise BackupError(f"backup {backup_id} failed and was discarded (nothing that looks "
                          f"like a backup was kept): {exc}. Fix the cause and run `inv "
                          f"backup.run` again") from None
    except BaseException:
        store.discard(backup_id)
        raise
    backup = store.get(backup_id)
    out(f"backup {backup_id}: complete, {len(items)} files, {megabytes(backup.size)} in "
        f"{manifest['seconds']:g} s ({display(final)})")
    return backup


def describe(folder: Path, item: Item) -> dict[str, Any]:
    """A manifest entry: size and SHA-256 of the file as stored, and its source."""
    path = folder / item.name
    return {"path": item.name, "size": path.stat().st_size, "sha256": sha256_file(path),
            "source": item.source, "encrypted": item.encrypted, **item.extra}


def collect(plan: Plan, folder: Path, out: Say) -> tuple[list[Item], dict[str, Any]]:
    """Fetch every part (databases and folders in parallel); the items and manifest facts."""
    for sub in ("db", "files", "config"):
        (folder / sub).mkdir(mode=0o700)
    jobs: list[Callable[[], tuple[Item, dict[str, Any]]]] = []
    for database in postgres.DATABASES:
        jobs.append(lambda database=database: dump_database(plan, folder, database, out))
    for name, host, path in plan.archives():
        jobs.append(lambda name=name, host=host, path=path:
                    archive_folder(plan, folder, name, host, path, out))
    results, errors = [], []
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            try:
                results.append(future.result())
            except DifyopsError as exc:
                errors.append(str(exc))
    if errors:
        raise BackupError("; ".join(errors))
    items = [item for item, _ in results]
    meta: dict[str, Any] = {"databases": {}, "warnings": []}
    for _item, facts in results:
        if "database" in facts:
            meta["databases"][facts.pop("database")] = facts
            meta.setdefault("postgres", {}).update(facts.pop("postgres"))
        meta["warnings"].extend(facts.get("warnings", []))
    if plan.storage_host() is None:
        storage = plan.inventory.settings.storage
        meta["warnings"].append(
            f"storage is in the bucket {storage.s3_bucket} at {storage.s3_endpoint}: not "
            f"in this backup (use the bucket's versioning or replication)"
            if storage.type == "s3" else "no api/worker host: no storage in this backup")
    items.append(config_archive(plan, folder, out))
    return items, meta


def dump_database(plan: Plan, folder: Path, database: str,
                  out: Say) -> tuple[Item, dict[str, Any]]:
    """pg_dump of one database on the primary, streamed into the backup with its row counts."""
    name = f"db/{database}.dump{plan.suffix(secret=False)}"
    level = plan.inventory.settings.backup.dump_compression
    machine = plan.connect(plan.primary)
    clock = time.monotonic()
    try:
        with postgres.password_file(machine, plan.port,
                                    plan.inventory.secrets["DB_PASSWORD"]) as pgpass, \
                crypto.writer(folder / name, plan.key(secret=False)) as sink:
            dump = postgres.dump(machine, database, plan.port, pgpass, sink,
                                 plan.timeouts["command"], level)
        tool = postgres.pg_dump_version(machine)
    finally:
        machine.close()
    rows = sum(dump.tables.values())
    out(f"  {database}: pg_dump -Fc on {plan.primary.name}, {len(dump.tables)} tables, {rows} "
        f"rows, {megabytes(dump.transfer.size)} in {time.monotonic() - clock:.1f} s")
    item = Item(name, {"host": plan.primary.name, "address": plan.primary.address,
                       "database": database, "command": f"pg_dump -Fc -Z {level}"},
                encrypted=plan.encrypts(secret=False),
                extra={"content": "pg_dump custom format",
                       **({"plain_sha256": dump.transfer.sha256, "plain_size": dump.transfer.size}
                          if plan.encrypts(secret=False) else {})})
    facts = {"database": database, "file": name, "tables": dump.tables, "rows": rows,
             "alembic_revision": dump.alembic,
             "postgres": {"host": plan.primary.name, "server_version": dump.server_version,
                          "pg_dump": tool}}
    return item, facts


def archive_folder(plan: Plan, folder: Path, name: str, host: Host, path: str,
                   out: Say) -> tuple[Item, dict[str, Any]]:
    """tar (gzip) of a folder on a host, streamed into the backup."""
    target = f"files/{name}.tar.gz{plan.suffix(secret=False)}"
    quoted = shell.quote(path)
    machine = plan.connect(host)
    clock = time.monotonic()
    warnings = []
    try:
        if not machine.run(f"test -d {quoted}").ok:
            raise BackupError(f"{path} does not exist on {host.target}: nothing to back up "
                              f"for {name}. Deploy the app tier (`inv app.deploy`) or create "
                              f"the folder, then run `inv backup.run` again")
        with crypto.writer(folder / target, plan.key(secret=False)) as sink:
            transfer = download(machine, f"tar -C {quoted} --numeric-owner -czf - .", sink,
                                plan.timeouts["command"])
    finally:
        machine.close()
    if transfer.exited == 1:  # GNU tar: a file changed while it was read
        warnings.append(f"{name}: {last_line(transfer.stderr)}")
    elif not transfer.ok:
        raise BackupError(f"tar of {path} failed on {host.target}: {last_line(transfer.stderr)}")
    out(f"  {name}: {path} on {host.name}, {megabytes(transfer.size)} in "
        f"{time.monotonic() - clock:.1f} s")
    item = Item(target, {"host": host.name, "address": host.address, "path": path},
                encrypted=plan.encrypts(secret=False),
                extra={"content": "tar.gz (numeric owners)"})
    return item, {"warnings": warnings}


def config_archive(plan: Plan, folder: Path, out: Say) -> Item:
    """The secrets file, the inventory and the app hosts' rendered files, as one tar."""
    inventory = plan.inventory
    buffer = io.BytesIO()
    members = []
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        def add(name: str, content: bytes, mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), mode, int(time.time())
            archive.addfile(info, io.BytesIO(content))
            members.append(name)

        if not secrets.from_command(inventory):  # else the vault keeps them, not a backup
            add("secrets.env", inventory.secrets_file.read_bytes(), 0o600)
        add("inventory.yml", inventory.file.read_bytes(), 0o644)
        for host in inventory.with_role(*APP_ROLES):
            machine = plan.connect(host)
            try:
                for filename in APP_FILES:
                    path = f"{plan.deploy_dir}/{filename}"
                    content = machine.read_file(path)
                    if content is not None:
                        mode = 0o600 if filename == ".env" else 0o644
                        add(f"hosts/{host.name}{path}", content, mode)
            finally:
                machine.close()
    name = f"config/config.tar{plan.suffix(secret=True)}"
    with crypto.writer(folder / name, plan.key(secret=True)) as sink:
        sink.write(buffer.getvalue())
    state = "encrypted" if plan.encrypts(secret=True) else "mode 0600, not encrypted"
    kept = "secrets file, " if "secrets.env" in members else "(secrets kept by secrets.command) "
    rendered = [member for member in members if member.startswith("hosts/")]
    out(f"  config: {kept}inventory and {len(rendered)} rendered file(s) ({state})")
    return Item(name, {"host": "control", "secrets_file": str(inventory.secrets_file),
                       "inventory_file": str(inventory.file), "members": members},
                encrypted=plan.encrypts(secret=True), extra={"content": "tar"})


# --- verify ---------------------------------------------------------------------------------


def passphrase_for(inventory: Inventory, entry: dict[str, Any]) -> str | None:
    """The passphrase an encrypted file needs (None for a plain file)."""
    if not entry.get("encrypted"):
        return None
    value = inventory.secrets.get("BACKUP_PASSPHRASE", "")
    if not value:
        raise BackupError(f"{entry['path']} is encrypted and BACKUP_PASSPHRASE is not in "
                          f"{display(inventory.secrets_file)}: add the passphrase the backup "
                          f"was made with")
    return value


def check_files(backup: Backup) -> tuple[list[str], set[str]]:
    """Every listed file present with its size and SHA-256; nothing unlisted. (problems, bad)"""
    problems, bad = [], set()
    listed = {entry["path"]: entry for entry in backup.manifest.get("files", [])}
    for name, entry in listed.items():
        path = backup.path / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says "
                            f"{entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: SHA-256 differs from the manifest (the file is damaged)")
        else:
            continue
        bad.add(name)
    for path in sorted(backup.path.rglob("*")):
        name = path.relative_to(backup.path).as_posix()
        if path.is_file() and name not in listed and name not in METADATA \
                and not name.startswith("."):
            problems.append(f"{name}: not in the manifest")
    return problems, bad


def check_archive(path: Path, passphrase: str | None) -> None:
    """Read a tar (or tar.gz) to the end through decryption: every member and checksum."""
    mode = "r|gz" if ".tar.gz" in path.name else "r|"
    with crypto.reader(path, passphrase) as data:
        try:
            with tarfile.open(fileobj=data, mode=mode) as archive:
                for member in archive:
                    if member.isfile():
                        archive.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BackupError(f"{path.name}: not a readable archive: {exc}") from None


def verify(inventory: Inventory, backup: Backup, out: Say = say) -> list[str]:
    """Checksums, readable archives, and every dump restored into a scratch database whose row
    counts must equal those recorded; the result is saved beside the manifest."""
    plan = Plan(inventory)
    clock = time.monotonic()
    out(f"verify {backup.id}: checksums of {len(backup.manifest.get('files', []))} files")
    problems, bad = check_files(backup)
    for entry in backup.manifest.get("files", []):
        if entry["path"] in bad or ".tar" not in entry["path"]:
            continue
        try:
            check_archive(backup.path / entry["path"], passphrase_for(inventory, entry))
        except DifyopsError as exc:
            problems.append(str(exc))
    host = settings.verify_host(inventory)
    files = {entry["path"]: entry for entry in backup.manifest.get("files", [])}
    databases = backup.manifest.get("databases", {})
    if databases:
        machine = plan.connect(host)
        try:
            for database, facts in databases.items():
                if facts["file"] in bad:
                    problems.append(f"{database}: not restored, its dump is damaged")
                    continue
                problems.extend(scratch_restore(plan, machine, backup, database, facts,
                                                files[facts["file"]], out))
        finally:
            machine.close()
    seconds = round(time.monotonic() - clock, 1)
    write_json(backup.path / VERIFIED, {"ok": not problems, "at": now(), "seconds": seconds,
                                        "host": host.name, "problems": problems})
    if problems:
        out(f"verify {backup.id}: FAILED ({len(problems)} problem(s)) in {seconds:g} s")
        for problem in problems:
            out(f"  - {problem}")
    else:
        out(f"verify {backup.id}: ok in {seconds:g} s (checksums, archives, "
            f"{len(databases)} database(s) restored on {host.name} with equal row counts)")
    return problems


def scratch_restore(plan: Plan, machine: Machine, backup: Backup, database: str,
                    facts: dict[str, Any], entry: dict[str, Any], out: Say) -> list[str]:
    """Restore one dump into a scratch database, compare row counts, drop it."""
    scratch = f"difyops_verify_{database}"
    clock = time.monotonic()
    try:
        postgres.drop(machine, plan.port, scratch)
        postgres.create(machine, plan.port, scratch)
        with crypto.reader(backup.path / entry["path"],
                           passphrase_for(plan.inventory, entry)) as source:
            postgres.restore(machine, plan.port, scratch, source, scratch=True,
                             timeout=plan.timeouts["command"])
        counts = postgres.count_rows(machine, plan.port, scratch)
        where = f"{database} (restored into {scratch} on {machine.host.name})"
        problems = postgres.compare(facts["tables"], counts, where)
        if not problems:
            out(f"  {database}: restored into {scratch} on {machine.host.name}, "
                f"{len(counts)} tables, {sum(counts.values())} rows as recorded, in "
                f"{time.monotonic() - clock:.1f} s")
        return problems
    except DifyopsError as exc:
        return [f"{database}: {exc}"]
    finally:
        try:
            postgres.drop(machine, plan.port, scratch)
        except DifyopsError as exc:
            out(f"  warning: could not drop {scratch} on {machine.host.name}: {exc}")


# --- restore --------------------------------------------------------------------------------


def read_config(inventory: Inventory, backup: Backup) -> dict[str, bytes]:
    """The members of the backup's config archive, by name."""
    entry = next((e for e in backup.manifest.get("files", [])
                  if e["path"].startswith("config/")), None)
    if entry is None:
        return {}
    with crypto.reader(backup.path / entry["path"], passphrase_for(inventory, entry)) as data:
        content = data.read()
    with tarfile.open(fileobj=io.BytesIO(content), mode="r") as archive:
        return {member.name: archive.extractfile(member).read()
                for member in archive if member.isfile()}


def secret_key_differs(inventory: Inventory, config: dict[str, bytes]) -> bool:
    """Whether the backup's SECRET_KEY differs from the current one."""
    if "secrets.env" not in config:
        return False
    saved = dotenv_values(stream=io.StringIO(config["secrets.env"].decode()))
    return bool(saved.get("SECRET_KEY")) and \
        saved.get("SECRET_KEY") != inventory.secrets.get("SECRET_KEY")


def compose(directory: str) -> str:
    """The app tier's compose command on a host."""
    return f"docker compose --project-directory {shell.quote(directory)} -p {COMPOSE_PROJECT}"


def stop_app(plan: Plan, out: Say) -> list[Host]:
    """Stop the app tier's containers where they exist; the hosts that were stopped."""
    stopped = []
    for host in plan.inventory.with_role(*APP_ROLES):
        machine = plan.connect(host)
        try:
            probe = machine.run(f"test -f {shell.quote(plan.deploy_dir)}/compose.yml && "
                                f"command -v docker >/dev/null")
            if not probe.ok:
                out(f"  {host.name}: no app containers ({plan.deploy_dir}/compose.yml or docker "
                    f"missing): nothing to stop")
                continue
            machine.check(f"{compose(plan.deploy_dir)} stop")
            stopped.append(host)
            out(f"  {host.name}: app containers stopped")
        finally:
            machine.close()
    return stopped


def start_app(plan: Plan, hosts: list[Host], out: Say) -> list[str]:
    """Start the containers stopped before; the errors (a restore must not hide them)."""
    errors = []
    for host in hosts:
        machine = plan.connect(host)
        try:
            machine.check(f"{compose(plan.deploy_dir)} start")
            out(f"  {host.name}: app containers started")
        except DifyopsError as exc:
            errors.append(f"{host.name}: could not start the app containers again: {exc}")
        finally:
            machine.close()
    return errors


def restore(inventory: Inventory, backup: Backup, *, force: bool = False,
            with_config: bool = False, out: Say = say) -> None:
    """Put a backup back onto the current deployment (call with the store's lock held)."""
    plan = Plan(inventory)
    manifest = backup.manifest
    version = manifest.get("dify_version", "?")
    if version != inventory.profile.version and not force:
        raise BackupError(
            f"backup {backup.id} was taken with Dify {version}, this deployment runs Dify "
            f"{inventory.profile.version}: its database schema would not match the code. Set "
            f"dify.version to {version} and deploy it first, or pass --force to restore anyway")
    problems, _ = check_files(backup)
    if problems:
        raise BackupError(f"backup {backup.id} is damaged, nothing was restored: "
                          + "; ".join(problems))
    for entry in manifest.get("files", []):
        passphrase_for(inventory, entry)  # an encrypted backup without its passphrase: refused
    config = read_config(inventory, backup)
    if secret_key_differs(inventory, config) and not (with_config or force):
        raise BackupError(
            f"backup {backup.id} was made with another SECRET_KEY than the one in "
            f"{display(inventory.secrets_file)}: the restored model credentials could not be "
            f"decrypted. Pass --config to restore the backup's secrets and rendered files too "
            f"(then run `inv deploy.all`), or --force to restore with the current key")
    clock = time.monotonic()
    out(f"restore {backup.id} (Dify {version}) onto inventory {inventory.name}")
    stopped = stop_app(plan, out)
    errors: list[str] = []
    try:
        for database, facts in manifest.get("databases", {}).items():
            entry = next(e for e in manifest["files"] if e["path"] == facts["file"])
            restore_database(plan, backup, database, facts, entry, out)
        for entry in manifest.get("files", []):
            if entry["path"].startswith("files/"):
                restore_folder(plan, backup, entry, out)
        if with_config:
            restore_config(plan, backup, config, out)
    except DifyopsError as exc:
        errors.append(str(exc))
    finally:
        errors.extend(start_app(plan, stopped, out))
    if errors:
        raise BackupError(f"restore of {backup.id} failed: " + "; ".join(errors))
    out(f"restore {backup.id}: done in {time.monotonic() - clock:.1f} s; row counts equal "
        f"those recorded at backup time")


def restore_database(plan: Plan, backup: Backup, database: str, facts: dict[str, Any],
                     entry: dict[str, Any], out: Say) -> None:
    """Restore into a new database, check its row counts, then swap it in for the current one."""
    restored = f"{database}__difyops_restore"
    clock = time.monotonic()
    machine = plan.connect(plan.primary)
    try:
        postgres.drop(machine, plan.port, restored)
        owner = postgres.OWNERS[database]
        postgres.create(machine, plan.port, restored, owner=owner)
        try:
            with crypto.reader(backup.path / entry["path"],
                               passphrase_for(plan.inventory, entry)) as source:
                postgres.restore(machine, plan.port, restored, source,
                                 owner=owner if database in postgres.RESTORED_AS_OWNER else None,
                                 timeout=plan.timeouts["command"])
            counts = postgres.count_rows(machine, plan.port, restored)
            problems = postgres.compare(facts["tables"], counts, database)
            if problems:
                raise BackupError("; ".join(problems))
        except BaseException:
            postgres.drop(machine, plan.port, restored)
            raise
        postgres.swap_in(machine, plan.port, restored, database)
    finally:
        machine.close()
    out(f"  {database}: restored on {plan.primary.name}, {len(counts)} tables, "
        f"{sum(counts.values())} rows as recorded, in {time.monotonic() - clock:.1f} s")


def restore_folder(plan: Plan, backup: Backup, entry: dict[str, Any], out: Say) -> None:
    """Unpack an archive beside the folder, then swap it in for the current folder."""
    name = entry["path"].split("/", 1)[1].split(".tar", 1)[0]
    targets = {name: (host, path) for name, host, path in plan.archives()}
    if name not in targets:
        out(f"  {name}: not restored: the current inventory has no host for it")
        return
    host, path = targets[name]
    target, new = shell.quote(path), shell.quote(f"{path}.difyops-restore")
    old = shell.quote(f"{path}.difyops-previous")
    clock = time.monotonic()
    machine = plan.connect(host)
    try:
        machine.check(f"rm -rf {new} {old} && mkdir -p {new}")
        with crypto.reader(backup.path / entry["path"],
                           passphrase_for(plan.inventory, entry)) as source:
            transfer = upload(machine, f"tar -C {new} --numeric-owner -xpzf -", source,
                              plan.timeouts["command"])
        if not transfer.ok:
            machine.run(f"rm -rf {new}")
            raise BackupError(f"unpacking {entry['path']} into {path} failed on "
                              f"{host.target}: {last_line(transfer.stderr)}")
        machine.check(f"if [ -e {target} ]; then mv {target} {old}; fi && mv {new} {target} "
                      f"&& rm -rf {old}")
    finally:
        machine.close()
    out(f"  {name}: {path} on {host.name} replaced by the backup's, in "
        f"{time.monotonic() - clock:.1f} s")


def restore_config(plan: Plan, backup: Backup, config: dict[str, bytes], out: Say) -> None:
    """The backup's secrets file and the app hosts' rendered files (current ones kept aside)."""
    inventory = plan.inventory
    if "secrets.env" in config:
        target = inventory.secrets_file
        if target.exists():
            aside = target.with_name(f"{target.name}.before-{backup.id}")
            os.replace(target, aside)
            out(f"  secrets: the current file is kept as {display(aside)}")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(config["secrets.env"])
        out(f"  secrets: {display(target)} restored (mode 0600)")
    names = {host.name: host for host in inventory.hosts}
    for member, content in config.items():
        if not member.startswith("hosts/"):
            continue
        _, host_name, path = member.split("/", 2)
        if host_name not in names:
            out(f"  {member}: not restored, no host {host_name} in the inventory")
            continue
        machine = plan.connect(names[host_name])
        try:
            mode = 0o600 if path.endswith("/.env") else 0o644
            machine.install_file(f"/{path}", content, mode=mode)
        finally:
            machine.close()
        out(f"  {host_name}: /{path} restored")


# --- the commands -----------------------------------------------------------------------------


def store_of(inventory: Inventory) -> Store:
    """The backup folder of an inventory."""
    return Store(inventory.settings.backup.dir)


def backup_now(inventory: Inventory, *, skip_verify: bool = False, out: Say = say) -> Backup:
    """backup.run: a complete backup, then (per settings) verified and copied."""
    settings.check(inventory)
    store = store_of(inventory)
    with store.lock():
        backup = run(inventory, store, out)
        problems = []
        if inventory.settings.backup.verify_after_run and not skip_verify:
            problems = verify(inventory, backup, out)
        if inventory.settings.backup.copy.type != "none":
            try:
                copy.copy_backup(inventory, backup, out)
            except DifyopsError as exc:
                problems.append(f"copy to {copy.describe(inventory)} failed: {exc}")
    if problems:
        raise BackupError(f"backup {backup.id} is complete in {display(backup.path)}, but: "
                          + "; ".join(problems))
    record_success(inventory, out)
    return backup


# Read by the monitor host's node exporter (textfile collector): the BackupTooOld and
# BackupNeverSucceeded alerts watch this metric.
SUCCESS_METRIC = "/var/lib/prometheus/node-exporter/dify_backup.prom"


def record_success(inventory: Inventory, out: Say = say) -> None:
    """Tell monitoring when the last complete backup finished (a failure here is a warning)."""
    text = ("# HELP dify_backup_last_success_timestamp_seconds End of the last complete backup.\n"
            "# TYPE dify_backup_last_success_timestamp_seconds gauge\n"
            f"dify_backup_last_success_timestamp_seconds {int(time.time())}\n").encode()
    for monitor in inventory.with_role("monitor"):
        machine = connect(monitor, inventory.settings.timeouts)
        try:
            machine.install_file(SUCCESS_METRIC, text)
        except DifyopsError as exc:
            out(f"warning: could not record the backup's success on {monitor.name}: {exc}")
        finally:
            machine.close()


def verify_one(inventory: Inventory, backup_id: str | None, out: Say = say) -> Backup:
    """backup.verify: one backup (the newest by default); raise when it has problems."""
    settings.check(inventory)
    store = store_of(inventory)
    with store.lock():
        backup = store.get(backup_id)
        problems = verify(inventory, backup, out)
    if problems:
        raise BackupError(f"backup {backup.id} failed verification ({len(problems)} "
                          f"problem(s), listed above): do not rely on it; `inv backup.list` "
                          f"shows the newest verified backup")
    return backup


def restore_one(inventory: Inventory, backup_id: str, *, force: bool, with_config: bool,
                out: Say = say) -> None:
    """backup.restore: one backup by id onto the current deployment."""
    settings.check(inventory)
    store = store_of(inventory)
    with store.lock():
        restore(inventory, store.get(backup_id), force=force, with_config=with_config, out=out)


def listing(inventory: Inventory) -> str:
    """backup.list: every backup with its state, and the leftovers of unfinished runs."""
    store = store_of(inventory)
    rows = []
    for backup in reversed(store.backups()):
        copied = "yes" if backup.copy else "-"
        rows.append([backup.id, megabytes(backup.size), backup.manifest.get("dify_version", "?"),
                     backup.manifest.get("encryption", {}).get("mode", "none"), copied,
                     backup.state])
    for path in store.partials():
        rows.append([path.name, "-", "-", "-", "-", "INCOMPLETE (a run that did not finish, "
                     "or one running now): never used"])
    for path in store.damaged():
        rows.append([path.name, "-", "-", "-", "-", "DAMAGED: no readable manifest"])
    if not rows:
        return f"no backup in {store.directory} yet: `inv backup.run` makes one"
    return (f"backups in {store.directory} (newest first):\n"
            + table(["id", "size", "dify", "encrypt", "copied", "state"], rows))


def policy_of(inventory: Inventory) -> Policy:
    """The retention policy of the inventory."""
    backup = inventory.settings.backup
    return Policy(last=backup.keep_last, daily=backup.keep_daily,
                  weekly=backup.keep_weekly, monthly=backup.keep_monthly)


def prune(inventory: Inventory, *, dry: bool = False, out: Say = say) -> list[str]:
    """backup.prune: delete what retention does not keep (here and at the second place)."""
    settings.check(inventory)
    store = store_of(inventory)
    with store.lock():
        backups = store.backups()
        reasons = decide([Candidate(b.id, b.created, b.is_verified, b.verify_failed)
                          for b in backups], policy_of(inventory))
        doomed = [b.id for b in backups if not reasons[b.id]]
        for backup in reversed(backups):
            why = ", ".join(reasons[backup.id])
            out(f"  {backup.id}  {'keep (' + why + ')' if why else 'delete'}")
        if dry:
            leftovers = [p.name for p in store.partials()]
            out(f"dry run: would delete {len(doomed)} backup(s)"
                + (f" and {len(leftovers)} unfinished run(s)" if leftovers else "")
                + "; nothing changed")
            return doomed
        for leftover in store.remove_leftovers():
            out(f"removed {leftover}: left by a run that did not finish")
        for backup_id in doomed:
            store.remove(backup_id)
        errors = copy.remove_copies(inventory, doomed)
    out(f"pruned {len(doomed)} backup(s), kept {len(backups) - len(doomed)}")
    if errors:
        raise BackupError("could not remove from the second place: " + "; ".join(errors))
    return doomed
