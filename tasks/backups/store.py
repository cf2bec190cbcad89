"""The backup folder on the control machine: one folder per backup, named by its UTC time.

A backup is written into `.<id>.partial/` and renamed to `<id>/` only when its manifest is
written, so a folder named like a backup is always complete: a crash or a failed dump leaves at
most a hidden `.partial` folder, which `list` shows as incomplete and the next run or prune
removes. Metadata written later (verification result, copy record) sits beside the manifest and
is not part of it. Every file is created 0600 inside a 0700 folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.core.errors import DifyopsError

ID_FORMAT = "%Y%m%dT%H%M%SZ"
ID_PATTERN = re.compile(r"^(\d{8}T\d{6}Z)(?:-(\d+))?$")
PARTIAL = re.compile(r"^\.(\d{8}T\d{6}Z(?:-\d+)?)\.partial$")
MANIFEST = "manifest.json"
VERIFIED = "verified.json"
COPIED = "copy.json"
METADATA = (MANIFEST, VERIFIED, COPIED)
FORMAT = 1
CHUNK = 1 << 20


class StoreError(DifyopsError):
    """The backup folder or one backup in it cannot be used."""


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def backup_time(backup_id: str) -> datetime:
    """The UTC time a backup id names."""
    match = ID_PATTERN.match(backup_id)
    if not match:
        raise StoreError(f"{backup_id!r} is not a backup id (expected e.g. 20250131T030000Z)")
    return datetime.strptime(match.group(1), ID_FORMAT).replace(tzinfo=UTC)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename), mode 0600."""
    staged = path.with_name(f".{path.name}.new")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staged, path)


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Backup:
    """One complete backup folder and what is known about it."""

    id: str
    path: Path
    manifest: dict[str, Any]
    verified: dict[str, Any] | None
    copy: dict[str, Any] | None

    @property
    def created(self) -> datetime:
        """When the backup started (UTC), from its id."""
        return backup_time(self.id)

    @property
    def size(self) -> int:
        """Bytes of every file the manifest lists."""
        return sum(item["size"] for item in self.manifest.get("files", []))

    @property
    def is_verified(self) -> bool:
        """Whether the last verification passed."""
        return bool(self.verified and self.verified.get("ok"))

    @property
    def verify_failed(self) -> bool:
        """Whether the last verification found a problem."""
        return bool(self.verified) and not self.is_verified

    @property
    def state(self) -> str:
        """What list shows: verified, verify FAILED or not verified."""
        if self.is_verified:
            return "verified"
        return "verify FAILED" if self.verify_failed else "not verified"


class Store:
    """The folder that holds every backup (backup.dir on the control machine)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def ensure(self) -> None:
        """Create the folder (0700) when it does not exist."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)

    def new_id(self, now: datetime | None = None) -> str:
        """A fresh id for a backup starting now (a suffix when the second is taken)."""
        base = (now or datetime.now(UTC)).strftime(ID_FORMAT)
        candidate, number = base, 1
        while (self.directory / candidate).exists() or self.partial_path(candidate).exists():
            candidate, number = f"{base}-{number}", number + 1
        return candidate

    def partial_path(self, backup_id: str) -> Path:
        """Where a backup is written until it is complete."""
        return self.directory / f".{backup_id}.partial"

    def start(self, backup_id: str) -> Path:
        """Create the partial folder of a new backup (0700)."""
        path = self.partial_path(backup_id)
        path.mkdir(mode=0o700)
        return path

    def finish(self, backup_id: str) -> Path:
        """Make a partial backup complete: one rename, then fsync of the folder."""
        partial, final = self.partial_path(backup_id), self.directory / backup_id
        if not (partial / MANIFEST).is_file():
            raise StoreError(f"{partial} has no manifest: it is not complete")
        os.rename(partial, final)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final

    def discard(self, backup_id: str) -> None:
        """Remove the partial folder of a backup that failed."""
        shutil.rmtree(self.partial_path(backup_id), ignore_errors=True)

    def backups(self) -> list[Backup]:
        """Every complete backup, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in sorted(self.directory.iterdir()):
            if not (entry.is_dir() and ID_PATTERN.match(entry.name)):
                continue
            manifest = read_json(entry / MANIFEST)
            if not isinstance(manifest, dict):
                continue  # a folder made by hand or damaged: never taken for a backup
            found.append(Backup(entry.name, entry, manifest, read_json(entry / VERIFIED),
                                read_json(entry / COPIED)))
        return sorted(found, key=lambda backup: (backup.created, backup.id))

    def damaged(self) -> list[Path]:
        """Folders named like a backup without a readable manifest."""
        if not self.directory.is_dir():
            return []
        return [entry for entry in sorted(self.directory.iterdir())
                if entry.is_dir() and ID_PATTERN.match(entry.name)
                and not isinstance(read_json(entry / MANIFEST), dict)]

    def partials(self) -> list[Path]:
        """Leftovers of runs that did not finish (crashed, killed, or running now)."""
        if not self.directory.is_dir():
            return []
        return [entry for entry in sorted(self.directory.iterdir())
                if entry.is_dir() and PARTIAL.match(entry.name)]

    def get(self, backup_id: str | None = None) -> Backup:
        """One backup by id; the newest when no id is given."""
        backups = self.backups()
        if backup_id and self.partial_path(backup_id).exists():
            raise StoreError(f"backup {backup_id} is incomplete (its run did not finish): "
                             f"it cannot be used; `inv backup.prune` removes it")
        if not backups:
            raise StoreError(f"no backup in {self.directory}: run `inv backup.run` first")
        if not backup_id:
            return backups[-1]
        for backup in backups:
            if backup.id == backup_id:
                return backup
        recent = ", ".join(backup.id for backup in backups[-5:])
        raise StoreError(f"no backup {backup_id} in {self.directory}; the newest: {recent} "
                         f"(`inv backup.list` shows them all)")

    def remove(self, backup_id: str) -> None:
        """Delete a complete backup: renamed out of the way first, so it never looks valid."""
        path = self.directory / backup_id
        doomed = self.directory / f".{backup_id}.deleting"
        os.rename(path, doomed)
        shutil.rmtree(doomed)

    def remove_leftovers(self) -> list[str]:
        """Delete partial folders and half-deleted ones (call with the lock held)."""
        removed = []
        for entry in sorted(self.directory.iterdir()) if self.directory.is_dir() else []:
            if entry.is_dir() and (PARTIAL.match(entry.name) or
                                   entry.name.endswith(".deleting")):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's lock: one run, prune or restore at a time."""
        self.ensure()
        fd = os.open(self.directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"another backup command holds {self.directory}/.lock "
                                 f"(a run from the timer?): wait for it to finish and try "
                                 f"again") from None
            yield
        finally:
            os.close(fd)
