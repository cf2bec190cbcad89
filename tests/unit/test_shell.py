"""tasks/core/shell.py: every value one word, quoted once; built commands compose as they are.
Checked by running the commands with the real sh."""

from __future__ import annotations

import subprocess

import pytest

from tasks.core import shell

HOSTILE = "a b; touch /tmp/pwn $(id) `id` 'q\" {} \\ *"


def sh(command: str) -> list[str]:
    """The words sh hands to printf for the command (one per line)."""
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def test_each_value_is_one_word_whatever_it_holds() -> None:
    built = shell.command("printf '%s\\n' {} {named}", HOSTILE, named="/srv/dify storage")
    assert sh(built) == [HOSTILE, "/srv/dify storage"]
    assert sh(shell.words("printf", "%s\\n", HOSTILE, 5432)) == [HOSTILE, "5432"]


def test_a_built_command_composes_as_it_is_and_quote_makes_it_one_word() -> None:
    inner = shell.command("printf '%s\\n' {}", HOSTILE)
    assert sh(shell.command("{} && {}", inner, inner)) == [HOSTILE, HOSTILE]
    assert sh(shell.command("sh -c {}", shell.quote(inner))) == [HOSTILE]
    assert sh(shell.chain([inner, shell.words("printf", "%s\\n", "end")])) == [HOSTILE, "end"]


def test_a_literal_brace_is_written_twice() -> None:
    assert shell.command("awk '{{print $1}}' {}", "f") == "awk '{print $1}' f"


def test_assignments_stay_assignments_with_any_value() -> None:
    env = shell.assignments({"DIFY_INVENTORY": "/srv/my inventories/prod.yml", "X": HOSTILE})
    assert sh(shell.command("{} sh -c {}", env, "printf '%s\\n' \"$DIFY_INVENTORY\" \"$X\"")) \
        == ["/srv/my inventories/prod.yml", HOSTILE]
    with pytest.raises(ValueError, match="not a shell variable name"):
        shell.assignments({"A;B": "x"})


def test_the_compose_cli_names_its_project_and_folder() -> None:
    assert shell.compose("/opt/my dify", "dify") == \
        "docker compose --project-directory '/opt/my dify' -p dify"
