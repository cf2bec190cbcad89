"""The second place: each complete backup copied to another host over SSH, or to a bucket.

SSH: the files go into `<path>/.<id>.partial/` on that host as its login (no sudo), their
SHA-256 are checked there with `sha256sum --check`, then the folder is renamed to `<path>/<id>/`.
S3-compatible: the AWS CLI (`aws s3 cp`) on the control machine uploads the files, then the
manifest last: a prefix without manifest.json is an unfinished copy. Prune removes from the
second place the backups it removes here, and no others.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.backups.store import (
    COPIED,
    MANIFEST,
    VERIFIED,
    Backup,
    sha256_file,
    utc_now,
    write_json,
)
from tasks.backups.stream import last_line, upload
from tasks.core import shell
from tasks.core.errors import DifyopsError
from tasks.core.hosts import connect
from tasks.core.inventory import Host, Inventory, Ssh
from tasks.core.schema import Section

Runner = Callable[..., subprocess.CompletedProcess]
COPY_HOST = "backup-copy"  # the copy host's name in messages and for `inv hosts.trust --host`


class CopyError(DifyopsError):
    """The second place could not be written or cleaned."""


def settings_of(inventory: Inventory) -> Section:
    """The inventory's backup.copy settings."""
    return inventory.settings.backup.copy


def describe(inventory: Inventory) -> str:
    """Where copies go, for messages."""
    copy = settings_of(inventory)
    if copy.type == "ssh":
        return f"{copy.user}@{copy.address}:{copy.port}{copy.path}"
    if copy.type == "s3":
        return f"{s3_url(inventory, '')} at {copy.s3_endpoint}"
    return "nowhere"


def copy_host(inventory: Inventory) -> Host:
    """The copy host as an engine Host (not part of the inventory's roles)."""
    copy = settings_of(inventory)
    return Host(name=COPY_HOST, address=copy.address,
                ssh=Ssh(user=copy.user, port=copy.port, key=copy.key,
                        known_hosts=str(inventory.known_hosts or "")))


def ssh_hosts(inventory: Inventory) -> list[Host]:
    """The hosts backups reach over SSH besides the inventory's own: the copy host, if any."""
    return [copy_host(inventory)] if settings_of(inventory)["type"] == "ssh" else []


def copy_backup(inventory: Inventory, backup: Backup, say: Callable[[str], None]) -> None:
    """Copy a complete backup to the second place and record it in copy.json."""
    copy = settings_of(inventory)
    if copy.type == "ssh":
        record = ssh_copy(inventory, backup)
    elif copy.type == "s3":
        record = s3_copy(inventory, backup)
    else:
        return
    write_json(backup.path / COPIED, record)
    say(f"copy {backup.id}: {record['files']} files checked on {record['target']}")


def remove_copies(inventory: Inventory, ids: Sequence[str]) -> list[str]:
    """Remove backups from the second place; the errors, one per backup."""
    copy = settings_of(inventory)
    if copy.type == "none" or not ids:
        return []
    errors = []
    if copy.type == "ssh":
        machine = connect(copy_host(inventory), inventory.settings.timeouts)
        try:
            for backup_id in ids:
                path = shell.quote(f"{copy.path}/{backup_id}")
                result = machine.run(f"rm -rf {path}", sudo=False)
                if not result.ok:
                    errors.append(f"{backup_id} on {describe(inventory)}: {result.answer}")
        except DifyopsError as exc:
            errors.append(str(exc))
        finally:
            machine.close()
        return errors
    for backup_id in ids:
        try:
            aws(inventory, ["s3", "rm", "--recursive", "--only-show-errors",
                            s3_url(inventory, f"{backup_id}/")])
        except DifyopsError as exc:
            errors.append(f"{backup_id}: {exc}")
    return errors


def listed(backup: Backup) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of the manifest's files, then the manifest itself (last)."""
    files = [(e["path"], e["size"], e["sha256"]) for e in backup.manifest.get("files", [])]
    manifest = backup.path / MANIFEST
    return [*files, (MANIFEST, manifest.stat().st_size, sha256_file(manifest))]


def ssh_copy(inventory: Inventory, backup: Backup) -> dict[str, Any]:
    """Upload into a partial folder, check every SHA-256 there, rename."""
    copy = settings_of(inventory)
    base = copy.path.rstrip("/") or "/"
    partial, final = f"{base}/.{backup.id}.partial", f"{base}/{backup.id}"
    files = listed(backup)
    machine = connect(copy_host(inventory), inventory.settings.timeouts)
    where = describe(inventory)
    try:
        machine.check(f"umask 077 && mkdir -p {shell.quote(base)} && rm -rf "
                      f"{shell.quote(partial)} && mkdir {shell.quote(partial)}", sudo=False)
        for name, size, _ in files:
            destination = f"{partial}/{name}"
            folder = shell.quote(os.path.dirname(destination))
            with (backup.path / name).open("rb") as source:
                transfer = upload(machine, f"umask 077 && mkdir -p {folder} && cat > "
                                           f"{shell.quote(destination)}", source, sudo=False)
            if not transfer.ok or transfer.size != size:
                raise CopyError(f"copy of {name} to {where} failed: "
                                f"{last_line(transfer.stderr)}")
        sums = "".join(f"{digest}  {name}\n" for name, _, digest in files).encode()
        check = upload(machine, f"cd {shell.quote(partial)} && sha256sum --check --quiet -",
                       io.BytesIO(sums), sudo=False)
        if not check.ok:
            raise CopyError(f"the copy on {where} does not match the manifest: "
                            f"{last_line(check.stderr)}")
        machine.check(f"rm -rf {shell.quote(final)} && mv {shell.quote(partial)} "
                      f"{shell.quote(final)}", sudo=False)
    finally:
        machine.close()
    return {"type": "ssh", "target": f"{copy.user}@{copy.address}:{copy.port}{final}",
            "files": len(files), "bytes": sum(size for _, size, _ in files),
            "at": utc_now()}


def s3_url(inventory: Inventory, key: str) -> str:
    """s3://bucket/prefix/key."""
    copy = settings_of(inventory)
    prefix = copy.path.strip("/")
    return f"s3://{copy.s3_bucket}/" + (f"{prefix}/" if prefix else "") + key


def aws_command(inventory: Inventory, arguments: list[str]) -> list[str]:
    """The AWS CLI command line for the configured endpoint (credentials go in the env)."""
    copy = settings_of(inventory)
    region = ["--region", copy.s3_region] if copy.s3_region else []
    return ["aws", "--endpoint-url", copy.s3_endpoint, *region, *arguments]


def aws(inventory: Inventory, arguments: list[str], runner: Runner = subprocess.run) -> None:
    """Run the AWS CLI with the backup bucket's keys; raise CopyError on failure."""
    if runner is subprocess.run and not shutil.which("aws"):
        raise CopyError("backup.copy.type is s3 and the AWS CLI (`aws`) is not installed on "
                        "this machine: install it (Debian package awscli)")
    env = {**os.environ,
           "AWS_ACCESS_KEY_ID": inventory.secrets["BACKUP_S3_ACCESS_KEY"],
           "AWS_SECRET_ACCESS_KEY": inventory.secrets["BACKUP_S3_SECRET_KEY"]}
    result = runner(aws_command(inventory, arguments), env=env, capture_output=True, text=True,
                    check=False)
    if result.returncode != 0:
        raise CopyError(f"aws {' '.join(arguments[:2])} failed: "
                        f"{last_line(result.stderr or result.stdout)}")


def s3_copy(inventory: Inventory, backup: Backup,
            runner: Runner = subprocess.run) -> dict[str, Any]:
    """Upload the files, then the manifest (a prefix with a manifest is a complete copy)."""
    files = listed(backup)
    url = s3_url(inventory, f"{backup.id}/")
    excluded = [arg for name in (MANIFEST, VERIFIED, COPIED) for arg in ("--exclude", name)]
    aws(inventory, ["s3", "cp", "--recursive", "--only-show-errors", str(backup.path), url,
                    *excluded], runner)
    aws(inventory, ["s3", "cp", "--only-show-errors", str(Path(backup.path) / MANIFEST),
                    url + MANIFEST], runner)
    return {"type": "s3", "target": f"{url} ({settings_of(inventory)['s3_endpoint']})",
            "files": len(files), "bytes": sum(size for _, size, _ in files), "at": utc_now()}
