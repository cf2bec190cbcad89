"""The backup folder: complete only after the rename, leftovers never taken for backups."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks.backups.store import (
    MANIFEST,
    Store,
    StoreError,
    backup_time,
    read_json,
    write_json,
)

NOW = datetime(2025, 1, 31, 3, 0, 5, tzinfo=UTC)


def complete(store: Store, backup_id: str, **manifest: object) -> Path:
    folder = store.start(backup_id)
    (folder / "db").mkdir()
    (folder / "db" / "dify.dump").write_bytes(b"dump")
    write_json(folder / MANIFEST, {"id": backup_id, "files": [
        {"path": "db/dify.dump", "size": 4, "sha256": "x"}], **manifest})
    return store.finish(backup_id)


def test_ids_are_utc_timestamps_with_a_suffix_when_taken(tmp_path: Path) -> None:
    store = Store(tmp_path)
    first = store.new_id(NOW)
    assert first == "20250131T030005Z"
    store.start(first)
    assert store.new_id(NOW) == "20250131T030005Z-1"
    complete(store, "20250131T030005Z-1")
    assert store.new_id(NOW) == "20250131T030005Z-2"
    assert backup_time("20250131T030005Z-2") == NOW
    with pytest.raises(StoreError, match="not a backup id"):
        backup_time("yesterday")


def test_a_backup_is_complete_only_after_finish(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    folder = store.start("20250131T030005Z")
    assert folder.name == ".20250131T030005Z.partial"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert store.backups() == []
    assert [p.name for p in store.partials()] == [".20250131T030005Z.partial"]
    with pytest.raises(StoreError, match="incomplete"):
        store.get("20250131T030005Z")
    with pytest.raises(StoreError, match="no manifest"):
        store.finish("20250131T030005Z")
    write_json(folder / MANIFEST, {"files": []})
    final = store.finish("20250131T030005Z")
    assert final == tmp_path / "20250131T030005Z" and not folder.exists()
    assert [b.id for b in store.backups()] == ["20250131T030005Z"]
    assert store.partials() == []


def test_folders_named_like_backups_without_manifest_are_damaged_not_backups(
        tmp_path: Path) -> None:
    store = Store(tmp_path)
    (tmp_path / "20250101T000000Z").mkdir(parents=True)
    (tmp_path / "20250102T000000Z").mkdir()
    (tmp_path / "20250102T000000Z" / MANIFEST).write_text("{not json")
    (tmp_path / "notes").mkdir()
    assert store.backups() == []
    assert [p.name for p in store.damaged()] == ["20250101T000000Z", "20250102T000000Z"]


def test_backups_are_sorted_and_get_defaults_to_the_newest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    for backup_id in ("20250103T030000Z", "20250101T030000Z", "20250103T030000Z-1"):
        complete(store, backup_id)
    assert [b.id for b in store.backups()] == ["20250101T030000Z", "20250103T030000Z",
                                                "20250103T030000Z-1"]
    assert store.get().id == "20250103T030000Z-1"
    assert store.get("20250101T030000Z").size == 4
    with pytest.raises(StoreError, match=r"no backup 20990101T000000Z .* the newest: "):
        store.get("20990101T000000Z")


def test_get_without_backups_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"run `inv backup.run` first"):
        Store(tmp_path / "none").get()


def test_states_from_the_verification_record(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    folder = complete(store, "20250101T030000Z")
    assert store.get().state == "not verified"
    write_json(folder / "verified.json", {"ok": False, "problems": ["x"]})
    assert store.get().state == "verify FAILED" and store.get().verify_failed
    write_json(folder / "verified.json", {"ok": True, "problems": []})
    assert store.get().state == "verified" and store.get().is_verified


def test_remove_and_leftovers(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure()
    complete(store, "20250101T030000Z")
    complete(store, "20250102T030000Z")
    store.start("20250103T030000Z")
    (tmp_path / ".20241231T030000Z.deleting").mkdir()
    store.remove("20250101T030000Z")
    assert [b.id for b in store.backups()] == ["20250102T030000Z"]
    assert sorted(store.remove_leftovers()) == [".20241231T030000Z.deleting",
                                                ".20250103T030000Z.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20250102T030000Z"]


def test_the_lock_admits_one_command_at_a_time(tmp_path: Path) -> None:
    store = Store(tmp_path / "b")
    with store.lock(), pytest.raises(StoreError, match="another backup command holds"), \
            Store(tmp_path / "b").lock():
        pass
    with store.lock():  # released after the first one ended
        pass
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o700


def test_json_is_written_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    assert read_json(path) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_json(tmp_path / "missing.json") is None
    assert os.listdir(tmp_path) == ["x.json"]
