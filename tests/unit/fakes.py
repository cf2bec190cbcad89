"""An in-memory machine for executor tests: files and a command log, no processes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TextIO

from tasks.core.errors import HostError
from tasks.core.hosts import FileState, Machine, Result
from tasks.core.inventory import Host


class FakeMachine(Machine):
    """Keeps files in a dict; commands answer from `answers` (exit 0 unless told otherwise)."""

    def __init__(self, host: Host, answers: Callable[[str], int] | None = None,
                 unreachable: bool = False) -> None:
        super().__init__(host)
        self.files: dict[str, tuple[bytes, int, str, str]] = {}
        self.markers: set[str] = set()
        self.commands: list[str] = []
        self.answers = answers or (lambda command: 0)
        self.unreachable = unreachable

    @property
    def is_root(self) -> bool:
        return True

    def _execute(self, command: str, timeout: float) -> Result:
        if self.unreachable:
            raise HostError(f"cannot connect to {self.host.target}: timed out")
        self.commands.append(command)
        if command.startswith("mkdir -p /var/lib/difyops/pending && touch "):
            self.markers.add(command.rsplit(" ", 1)[1])
            return Result(0, "", "")
        if command.startswith("test -e /var/lib/difyops/pending/"):
            return Result(0 if command.split()[-1] in self.markers else 1, "", "")
        if command.startswith("rm -f /var/lib/difyops/pending/"):
            self.markers.discard(command.split()[-1])
            return Result(0, "", "")
        exited = self.answers(command)
        return Result(exited, self.output(command) if exited == 0 else "",
                      "" if exited == 0 else f"{command} failed")

    def output(self, command: str) -> str:
        """What a command prints: the facts' answers for "nothing there" (no unit, no path, no
        package), else nothing. A fake host with state answers its own."""
        if "systemctl show -p ActiveState" in command:
            return "ActiveState=inactive\nUnitFileState=\n"
        if "stat -c '%F|%u'" in command:
            return "missing\n"
        return ""

    def _attach(self, command: str, pty: bool, stdin: bool, out: TextIO | None) -> int:
        return self._execute(command, 0).exited

    def file_state(self, path: str) -> FileState | None:
        if self.unreachable:
            raise HostError(f"cannot connect to {self.host.target}: timed out")
        if path not in self.files:
            return None
        content, mode, owner, group = self.files[path]
        return FileState(hashlib.sha256(content).hexdigest(), mode, owner, group)

    def read_file(self, path: str) -> bytes | None:
        return self.files[path][0] if path in self.files else None

    def install_file(self, path: str, content: bytes, *, mode: int = 0o644, owner: str = "root",
                     group: str = "root") -> bool:
        if self.files.get(path) == (content, mode, owner, group):
            return False
        self.files[path] = (content, mode, owner, group)
        return True
