"""The deploy lock: one deploy at a time, stale locks reported and taken over; the audit log."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tasks.core.lock import Locked, audit, deploy_lock, held, holder


def test_a_second_deploy_is_refused_with_who_and_since(tmp_path) -> None:
    other = {**holder(), "pid": os.getppid()}  # another process of this machine, alive
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "prod.lock").write_text(json.dumps(other))
    with pytest.raises(Locked) as caught, deploy_lock("prod", tmp_path):
        pass
    assert f"{other['user']} on {other['machine']} (pid {os.getppid()}) since " \
           f"{other['since']}" in str(caught.value)
    (tmp_path / "locks" / "prod.lock").unlink()  # that deploy ended: free again
    with deploy_lock("prod", tmp_path):
        pass


def test_the_holder_may_take_it_again_and_only_the_outermost_release_frees_it(
        tmp_path) -> None:
    lock_file = tmp_path / "locks" / "prod.lock"
    with deploy_lock("prod", tmp_path) as outer:
        with deploy_lock("prod", tmp_path) as inner:  # deploy.all, then a tier run inside it
            assert inner is outer
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(RuntimeError), deploy_lock("prod", tmp_path):
            raise RuntimeError("a tier failed")
        assert lock_file.exists()
    assert not lock_file.exists()


def test_other_inventories_are_independent(tmp_path) -> None:
    with deploy_lock("prod", tmp_path), deploy_lock("staging", tmp_path):
        assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["prod.lock",
                                                                         "staging.lock"]


def test_a_stale_lock_is_reported_and_taken_over(tmp_path, capsys) -> None:
    dead = {**holder(), "pid": 2 ** 22 + 12345, "since": "2026-01-01T00:00:00+00:00"}
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "prod.lock").write_text(json.dumps(dead))
    with deploy_lock("prod", tmp_path):
        pass
    err = capsys.readouterr().err
    assert "taking over a stale deploy lock" in err and "since 2026-01-01T00:00:00" in err


def test_a_lock_from_another_machine_is_never_taken_over(tmp_path) -> None:
    other = {**holder(), "machine": "elsewhere", "pid": 1}
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "prod.lock").write_text(json.dumps(other))
    with pytest.raises(Locked, match="on elsewhere"), deploy_lock("prod", tmp_path):
        pass


def test_held_names_a_live_holder_and_ignores_free_or_stale_locks(tmp_path) -> None:
    assert held("prod", tmp_path) is None
    with deploy_lock("prod", tmp_path) as me:
        assert held("prod", tmp_path) == me
        assert held("staging", tmp_path) is None
    assert held("prod", tmp_path) is None
    (tmp_path / "locks" / "prod.lock").write_text(json.dumps({**holder(), "pid": 2 ** 22 + 1}))
    assert held("prod", tmp_path) is None  # its process is gone: a deploy would take it over
    other = {**holder(), "machine": "elsewhere", "pid": 1}
    (tmp_path / "locks" / "prod.lock").write_text(json.dumps(other))
    assert held("prod", tmp_path) == other


def test_audit_appends_private_json_lines(tmp_path) -> None:
    audit("prod", {"tiers": ["db"], "changed": 3}, tmp_path)
    audit("prod", {"tiers": ["lb"], "changed": 0}, tmp_path)
    path = tmp_path / "audit" / "prod.log"
    assert [json.loads(line)["tiers"] for line in path.read_text().splitlines()] == [["db"],
                                                                                    ["lb"]]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
