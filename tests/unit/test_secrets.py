"""config.secrets: random values, mode 0600, never overwritten, never printed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from dotenv import dotenv_values

from tasks.core import secrets
from tasks.core.inventory import load_inventory


def test_generates_every_needed_secret_with_mode_0600(write_inventory, base, tmp_path) -> None:
    path = write_inventory(base, secret_values={})
    inventory = load_inventory(path, check_secrets=False)
    written = secrets.generate(inventory)
    env = tmp_path / "secrets.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    values = dotenv_values(env)
    assert set(written) == {s.name for s in secrets.needed(inventory) if s.generated}
    assert set(values) == set(written)
    assert len(set(values.values())) == len(values)  # unique per secret
    assert all(len(v) >= 32 for v in values.values())
    assert values["SECRET_KEY"].startswith("sk-")
    load_inventory(path)  # and the result passes validation


def test_existing_values_are_never_overwritten(write_inventory, base, tmp_path) -> None:
    path = write_inventory(base, secret_values={"DB_PASSWORD": "operator-chosen-password-123"})
    inventory = load_inventory(path, check_secrets=False)
    secrets.generate(inventory)
    again = secrets.generate(inventory)
    assert again == []
    assert dotenv_values(tmp_path / "secrets.env")["DB_PASSWORD"] == \
        "operator-chosen-password-123"


def test_secrets_only_for_the_layout(write_inventory, base) -> None:
    base["hosts"] = [h for h in base["hosts"] if h["name"] not in ("db2", "db3", "monitor1")]
    base["cache"]["mode"] = "standalone"
    base["hosts"][5]["roles"] = ["db_primary", "cache"]
    inventory = load_inventory(write_inventory(base, secret_values={}), check_secrets=False)
    names = {s.name for s in secrets.needed(inventory)}
    assert "DB_REPLICATION_PASSWORD" not in names
    assert "GRAFANA_ADMIN_PASSWORD" not in names
    assert "WEAVIATE_API_KEY" in names


def test_s3_keys_are_required_but_not_generated(write_inventory, base) -> None:
    base["storage"] = {"type": "s3", "s3_endpoint": "http://s3.test", "s3_bucket": "dify"}
    inventory = load_inventory(write_inventory(base, secret_values={}), check_secrets=False)
    assert "S3_SECRET_KEY" not in secrets.generate(inventory)
    _, problems = secrets.read(inventory)
    assert [p.key for p in problems] == ["S3_ACCESS_KEY", "S3_SECRET_KEY"]
    assert problems[0].fix == "set S3_ACCESS_KEY to a value of your own"


def test_task_prints_names_not_values(write_inventory, base, tmp_path, capsys,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from invoke import Context

    from tasks import config

    monkeypatch.setenv("DIFY_INVENTORY", str(write_inventory(base, secret_values={})))
    config.generate_secrets(Context())
    out = capsys.readouterr().out
    values = dotenv_values(tmp_path / "secrets.env").values()
    assert "SECRET_KEY" in out
    assert not any(value in out for value in values)
    # Backups are sealed by default: the passphrase is generated, and the operator told to keep
    # a copy elsewhere, once.
    assert "BACKUP_PASSPHRASE" in dotenv_values(tmp_path / "secrets.env")
    assert f"note: {secrets.BACKUP_PASSPHRASE_NOTE}" in out
    config.generate_secrets(Context())
    assert "note:" not in capsys.readouterr().out


def test_loose_mode_is_tightened(write_inventory, base, tmp_path: Path) -> None:
    path = write_inventory(base, mode=0o644)
    secrets.generate(load_inventory(path, check_secrets=False))
    assert stat.S_IMODE(os.stat(tmp_path / "secrets.env").st_mode) == 0o600
