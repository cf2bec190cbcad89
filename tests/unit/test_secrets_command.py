"""secrets.source: command: the secrets printed by the operator's command (one run of dotenv
lines, or one run per secret with {name}), held in memory, checked like file secrets; a
failure names the secret and the command's message, never a value."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from invoke import Context

from tasks import config
from tasks.core import secrets
from tasks.core.errors import InputError
from tasks.core.inventory import load_inventory
from tests.unit.conftest import good_secrets


def vault(folder: Path, values: dict[str, str]) -> Path:
    """A folder with one file per secret, as a vault CLI would answer (a newline after each)."""
    folder.mkdir()
    for name, value in values.items():
        (folder / name).write_text(value + "\n")
    return folder


def with_command(base: dict, command: str) -> dict:
    base["secrets"] = {"source": "command", "command": command}
    return base


def test_one_run_per_secret_with_the_name_in_its_place(write_inventory, base,
                                                       tmp_path: Path) -> None:
    good = good_secrets()
    folder = vault(tmp_path / "vault", good)
    # The secrets file holds nothing: every value must come from the command.
    path = write_inventory(with_command(base, f"cat {shlex.quote(str(folder))}/{{name}}"),
                           secret_values={})
    inventory = load_inventory(path)
    assert inventory.secrets == {spec.name: good[spec.name]
                                 for spec in secrets.needed(inventory)}


def test_one_run_printing_dotenv_lines(write_inventory, base, tmp_path: Path) -> None:
    good = good_secrets()
    listing = tmp_path / "printed.env"
    listing.write_text("".join(f"{k}={v}\n" for k, v in good.items()))
    inventory = load_inventory(write_inventory(
        with_command(base, f"cat {shlex.quote(str(listing))}"), secret_values={}))
    assert inventory.secrets == good


def test_a_failing_command_names_the_secret_and_its_message_not_a_value(
        write_inventory, base, tmp_path: Path) -> None:
    good = good_secrets()
    folder = vault(tmp_path / "vault", {k: v for k, v in good.items() if k != "DB_PASSWORD"})
    command = f"cat {shlex.quote(str(folder))}/{{name}} || {{ echo 'item not found' >&2; exit 3; }}"
    with pytest.raises(InputError) as refused:
        load_inventory(write_inventory(with_command(base, command), secret_values={}))
    message = str(refused.value)
    assert "secrets.command (DB_PASSWORD): failed (exit 3): item not found" in message
    assert "signed in to the vault" in message
    assert not any(value in message for value in good.values())


def test_a_weak_value_from_the_command_is_refused_like_one_from_the_file(
        write_inventory, base, tmp_path: Path) -> None:
    values = {**good_secrets(), "REDIS_PASSWORD": "difyai123456"}
    folder = vault(tmp_path / "vault", values)
    with pytest.raises(InputError) as refused:
        load_inventory(write_inventory(
            with_command(base, f"cat {shlex.quote(str(folder))}/{{name}}"), secret_values={}))
    message = str(refused.value)
    assert "secrets.command: REDIS_PASSWORD: is a published default" in message
    assert "store a value of your own (16+ random characters) as REDIS_PASSWORD where " \
           "secrets.command reads it" in message
    assert "difyai123456" not in message


@pytest.mark.parametrize(("settings", "error"), [
    ({"source": "command", "command": " "}, "secrets.command: is empty, and secrets.source is "
                                            "command"),
    ({"source": "vault"}, "secrets.source: 'vault' is not one of 'file', 'command'")])
def test_bad_settings_are_refused(write_inventory, base, settings, error) -> None:
    base["secrets"] = settings
    with pytest.raises(InputError, match=error):
        load_inventory(write_inventory(base))


def test_a_slow_command_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "COMMAND_TIMEOUT", 0.2)
    assert secrets.run_secret_command("sleep 5") == ("", "did not finish within 0.2 s")


def test_config_secrets_writes_nothing_with_a_command(write_inventory, base, tmp_path: Path,
                                                      capsys, monkeypatch) -> None:
    folder = vault(tmp_path / "vault", good_secrets())
    path = write_inventory(with_command(base, f"cat {shlex.quote(str(folder))}/{{name}}"),
                           secret_values={})
    monkeypatch.setenv("DIFY_INVENTORY", str(path))
    before = (tmp_path / "secrets.env").read_text()
    config.generate_secrets(Context())
    assert "secrets come from secrets.command: nothing is generated" in capsys.readouterr().out
    assert (tmp_path / "secrets.env").read_text() == before
