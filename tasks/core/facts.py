"""Facts: typed answers read from a host by fixed read-only commands, decided on in Python.

A `Fact` is a command that only reads (it exits 0 whenever it could run, whatever it found) and
a parser that turns its output into a typed value. A step's `unless` may be a `Holds`: the
executor reads the fact and decides in Python whether the command is needed, and a dry run says
what it found. A fact that cannot be read is an error naming the host, never "missing". The
parsers are tested from real outputs (tests/unit/test_facts.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.core import shell
from tasks.core.errors import HostError

if TYPE_CHECKING:
    from tasks.core.hosts import Machine


@dataclass(frozen=True)
class Fact:
    """What to read (`name`), how (`command`, read-only) and how to parse the answer."""

    name: str
    command: shell.Command
    parse: Callable[[str], Any]

    def read(self, machine: Machine) -> Any:
        """The fact's value on the machine; HostError when it cannot be read."""
        machine.check_sudo()
        result = machine.run(self.command)
        if not result.ok:
            raise HostError(f"{machine.host.target}: cannot read {self.name}: {result.answer}")
        try:
            return self.parse(result.stdout)
        except ValueError:
            raise HostError(f"{machine.host.target}: cannot read {self.name}: unexpected answer "
                            f"{result.stdout.strip()[:200]!r}") from None


@dataclass(frozen=True)
class Holds:
    """A step's `unless` decided in Python: the command is not needed when `test(value)`."""

    fact: Fact
    test: Callable[[Any], bool]

    def check(self, machine: Machine) -> tuple[bool, str]:
        """(whether it holds, what was found, for the report)."""
        value = self.fact.read(machine)
        return bool(self.test(value)), f"{self.fact.name}: {value}"


# --- packages -------------------------------------------------------------------------------


def installed_packages(text: str) -> frozenset[str]:
    """dpkg-query's `name<TAB>status` lines: the names whose status is `installed`."""
    found = [line.split("\t") for line in text.splitlines() if line.strip()]
    if any(len(fields) != 2 for fields in found):
        raise ValueError("not dpkg-query's name<TAB>status lines")
    return frozenset(name for name, status in found if status.strip() == "installed")


def packages(*names: str) -> Fact:
    """Which of the OS packages are installed (dpkg-query exits 1 for an unknown name)."""
    return Fact(f"installed packages of {', '.join(names)}", shell.command(
        "dpkg-query -W -f='${{Package}}\\t${{db:Status-Status}}\\n' {} 2>/dev/null; "
        "[ $? -le 1 ]", shell.words(*names)), installed_packages)


def all_installed(*names: str) -> Holds:
    """Every one of the packages is installed."""
    return Holds(packages(*names), lambda installed: set(names) <= installed)


# --- systemd units ----------------------------------------------------------------------------

# `systemctl is-enabled` answers 0 for these unit file states.
ENABLED_STATES = frozenset({"enabled", "enabled-runtime", "static", "alias", "indirect",
                            "generated", "transient"})


@dataclass(frozen=True)
class UnitState:
    """A systemd unit's ActiveState and UnitFileState (empty for a unit that does not exist)."""

    active: str
    file_state: str

    @property
    def enabled(self) -> bool:
        """Whether it starts at boot (as `systemctl is-enabled` answers)."""
        return self.file_state in ENABLED_STATES

    @property
    def running(self) -> bool:
        """Whether it is active now."""
        return self.active == "active"

    def __str__(self) -> str:
        return f"{self.active or 'unknown'}, {self.file_state or 'no unit file'}"


NO_SYSTEMD = "no systemd"


def unit_state(text: str) -> UnitState:
    """`systemctl show -p ActiveState -p UnitFileState` output as a UnitState."""
    if text.strip() == NO_SYSTEMD:
        return UnitState(NO_SYSTEMD, "")
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if "ActiveState" not in values:
        raise ValueError("no ActiveState in systemctl's answer")
    return UnitState(values["ActiveState"], values.get("UnitFileState", ""))


def unit(name: str) -> Fact:
    """A systemd unit's state (a unit that does not exist reads as inactive, no unit file; on a
    host that was not booted with systemd, "no systemd": nothing of it runs there)."""
    return Fact(f"unit {name}", shell.command(
        "if [ -d /run/systemd/system ]; then systemctl show -p ActiveState -p UnitFileState {}; "
        "else echo {}; fi", name, NO_SYSTEMD), unit_state)


def running_and_enabled(name: str) -> Holds:
    """The unit is active and starts at boot."""
    return Holds(unit(name), lambda state: state.running and state.enabled)


def enabled(name: str) -> Holds:
    """The unit starts at boot."""
    return Holds(unit(name), lambda state: state.enabled)


def not_enabled(name: str) -> Holds:
    """The unit does not start at boot (or does not exist)."""
    return Holds(unit(name), lambda state: not state.enabled)


def stopped_and_disabled(name: str) -> Holds:
    """The unit neither runs nor starts at boot (or does not exist)."""
    return Holds(unit(name), lambda state: not state.running and not state.enabled)


# --- paths ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathState:
    """What is at a path: its kind (`directory`, `regular file`, ...) and its owner's uid."""

    kind: str
    uid: int

    def __str__(self) -> str:
        return f"{self.kind} of uid {self.uid}"


def path_state(text: str) -> PathState | None:
    """`stat -c '%F|%u'` output as a PathState; None for `missing`."""
    line = text.strip()
    if line == "missing":
        return None
    kind, uid = line.rsplit("|", 1)
    return PathState(kind, int(uid))


def path(target: str) -> Fact:
    """What is at a path on the host, symbolic links followed (as `test -d` does; a dangling
    one reads as a symbolic link), or None (a stat that fails on an existing path is an error,
    not "missing")."""
    return Fact(f"path {target}", shell.command(
        "if [ -e {0} ]; then stat -L -c '%F|%u' {0}; elif [ -L {0} ]; then stat -c '%F|%u' {0}; "
        "else echo missing; fi", target), path_state)


def is_directory(target: str, uid: int | None = None) -> Holds:
    """A directory is there (owned by uid, when given)."""
    return Holds(path(target), lambda found: found is not None and found.kind == "directory"
                 and (uid is None or found.uid == uid))


def is_absent(target: str) -> Holds:
    """Nothing is at the path."""
    return Holds(path(target), lambda found: found is None)


# --- commands ---------------------------------------------------------------------------------


def found_commands(text: str) -> dict[str, str]:
    """`name<TAB>path` lines as {name: path}, the path empty for a command not found."""
    found = [line.split("\t", 1) for line in text.splitlines() if line.strip()]
    if any(len(fields) != 2 for fields in found):
        raise ValueError("not name<TAB>path lines")
    return {name: path for name, path in found}


def commands(*names: str) -> Fact:
    """Where each command (a name looked up in PATH, or an absolute path) is, as root's shell
    finds it: an executable file, or nothing."""
    return Fact(f"commands {', '.join(names)}", shell.command(
        "for name in {}; do found=$(command -v \"$name\"); [ -x \"$found\" ] || found=; "
        "printf '%s\\t%s\\n' \"$name\" \"$found\"; done", shell.words(*names)), found_commands)


def all_found(*names: str) -> Holds:
    """Every one of the commands is there."""
    return Holds(commands(*names), lambda found: all(found.get(name) for name in names))
