"""Shell commands as data: every value goes into a command through one function, quoted once.

`command("mkdir -p {} && chown {owner} {}", path, path, owner=user)` fills each placeholder with
one value as one shell word, as pytest-testinfra's `quote(command, *args)` does (str.format
placeholders; a literal brace is written twice). The template is code, never data: no inventory
value reaches a shell any other way (tests/unit/test_layering.py holds every module to it).

A value that is itself a built `Command` goes in as it is, so commands compose; `quote(cmd)`
makes a command one word again (for `sh -c`, `bash -c`, `sudo -n sh -c`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Command(str):
    """A shell command built by `command` (or `words`): its values are quoted, so it may be
    put into another command as it is."""


def quote(value: object) -> Command:
    """One value as one shell word, never expanded (a Command too: for `sh -c`); the word is
    itself a built piece, so it goes into a template as it is."""
    return Command(shlex.quote(str(value)))


def command(template: str, *values: object, **named: object) -> Command:
    """The template with each placeholder filled by one value, quoted once."""

    def word(value: object) -> Command:
        return value if isinstance(value, Command) else quote(value)

    return Command(template.format(*map(word, values),
                                   **{name: word(value) for name, value in named.items()}))


def words(*values: object) -> Command:
    """A command of words only (`words("docker", "pull", image)`), each quoted once."""
    return Command(" ".join(value if isinstance(value, Command) else quote(value)
                            for value in values))


def assignments(values: Mapping[str, object]) -> Command:
    """`NAME=value ...` before a command: each value quoted once, each name an identifier."""
    for name in values:
        if not NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a shell variable name")
    return Command(" ".join(f"{name}={quote(value)}" for name, value in values.items()))


def chain(commands: Iterable[Command], operator: str = "&&") -> Command:
    """Built commands joined by a shell operator (`&&`, `||`, `;`)."""
    return Command(f" {operator} ".join(commands))


def compose(directory: str, project: str) -> Command:
    """The docker compose CLI for one project, its files in `directory`."""
    return command("docker compose --project-directory {} -p {}", directory, project)
