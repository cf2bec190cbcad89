"""One-off commands in app containers (tasks/tiers/app_ops.py): the exact compose command, the
host it runs on, the deploy lock, and the words after `--`."""

from __future__ import annotations

import json
import os
import socket

import pytest

from tasks.core import lock
from tasks.core.cli import words_after_dashes
from tasks.core.errors import InputError
from tasks.core.inventory import Inventory
from tasks.tiers import app_ops
from tests.unit.fakes import FakeMachine

COMPOSE = "docker compose --project-directory /opt/dify -p dify"


def test_the_first_word_is_the_entrypoint_and_every_word_is_quoted_once(load, base) -> None:
    words = ["flask", "reset-password", "--email", "a b@x.y", "--new-password", "it's;$(id)"]
    assert app_ops.one_off_command(load(base), "api", words, interactive=False) == (
        f"{COMPOSE} run --rm --no-deps -T --entrypoint flask api reset-password --email "
        "'a b@x.y' --new-password 'it'\"'\"'s;$(id)'")


def test_an_interactive_command_gets_a_terminal(load, base) -> None:
    assert app_ops.one_off_command(load(base), "worker_all", ["bash"], interactive=True) == (
        f"{COMPOSE} run --rm --no-deps --entrypoint bash worker_all")


def test_no_command_is_refused(load, base) -> None:
    with pytest.raises(InputError, match="no command after `--`"):
        app_ops.one_off_command(load(base), "api", [], interactive=False)


def test_the_host_is_the_first_that_runs_the_service_unless_named(load, base) -> None:
    inventory = load(base)
    assert app_ops.host_running(inventory, "api").name == "api1"
    assert app_ops.host_running(inventory, "api", "api2").name == "api2"
    assert app_ops.host_running(inventory, "worker_beat").name == "worker1"
    with pytest.raises(InputError, match="web1 does not run api") as refused:
        app_ops.host_running(inventory, "api", "web1")
    assert "use one of: api1, api2" in str(refused.value)
    with pytest.raises(InputError, match="no host runs the service 'nginx'"):
        app_ops.host_running(inventory, "nginx")
    with pytest.raises(InputError, match="no host named 'nope'"):
        app_ops.host_running(inventory, "api", "nope")


def machines(use_machines) -> dict[str, FakeMachine]:
    """Fake machines handed out by connect(), by host name."""
    made: dict[str, FakeMachine] = {}
    use_machines(lambda host, timeouts=None: made.setdefault(
        host.name, FakeMachine(host, answers=lambda command: 3)))
    return made


def test_the_command_runs_on_the_host_and_its_status_is_returned(load, base, use_machines,
                                                                 capsys) -> None:
    made = machines(use_machines)
    code = app_ops.run_one_off(load(base), ["flask", "reset-password", "--new-password", "s3"],
                               host="api2")
    assert code == 3
    assert made["api2"].commands == [
        f"{COMPOSE} run --rm --no-deps -T --entrypoint flask api reset-password "
        "--new-password s3"]
    assert set(made) == {"api2"}
    said = capsys.readouterr().err
    assert "api2: `flask` in a fresh api container" in said and "s3" not in said


def hold_lock(inventory: Inventory, tmp_path, monkeypatch) -> None:
    """This process holds the inventory's deploy lock (a live holder on this machine), kept in
    tmp_path instead of the project's state folder."""
    monkeypatch.setattr(app_ops, "held", lambda name: lock.held(name, tmp_path))
    path = tmp_path / "locks" / f"{inventory.name}.lock"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"user": "ops", "machine": socket.gethostname(),
                                "pid": os.getpid(), "since": "2026-12-07T01:00:00+00:00",
                                "command": "deploy.all"}))


def test_a_running_deploy_refuses_the_command_unless_forced(load, base, use_machines, tmp_path,
                                                            monkeypatch) -> None:
    inventory = load(base)
    made = machines(use_machines)
    hold_lock(inventory, tmp_path, monkeypatch)
    with pytest.raises(lock.Locked, match="a deploy of inventory unit is running: ops on "):
        app_ops.run_one_off(inventory, ["flask", "--help"])
    assert made == {}
    assert app_ops.run_one_off(inventory, ["flask", "--help"], force=True) == 3
    assert len(made["api1"].commands) == 1


@pytest.mark.parametrize(("argv", "words"), [
    (["inv", "app.exec", "--host", "api2", "--", "ls", "-l", "a b"], ["ls", "-l", "a b"]),
    (["inv", "app.flask", "--", "--help"], ["--help"]),
    (["inv", "app.exec"], []),
    (["inv", "app.exec", "--", "echo", "--"], ["echo", "--"])])
def test_the_words_after_the_first_double_dash_are_kept_as_given(argv, words) -> None:
    assert words_after_dashes(argv) == words
