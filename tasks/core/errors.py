"""Errors that carry enough context for an operator to fix the cause without reading code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the operator's input: where it is, what is wrong, how to fix it."""

    file: str
    key: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message}\n    fix: {self.fix}"


class DifyopsError(Exception):
    """Base class of every error difyops reports to the operator."""


class InputError(DifyopsError):
    """The inventory, the secrets file or a flag is wrong; nothing has touched a host yet."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        count = len(problems)
        header = f"{count} problem{'s' if count != 1 else ''} found before touching any host:"
        super().__init__("\n".join([header, *(f"- {problem}" for problem in problems)]))


class HostError(DifyopsError):
    """A host could not be reached or a command on it failed."""


class GateTimeout(DifyopsError):
    """A health gate did not pass before its deadline."""
