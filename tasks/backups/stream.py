"""Binary streams from and into commands on a host: `pg_dump` out, `pg_restore` in, tar both ways.

The engine's Machine.run returns decoded text and reads files into memory, which suits
configuration files but not a database dump of many gigabytes. A Session runs one command with
binary stdin and stdout, chunk by chunk, over the host's SSH connection (paramiko channel) or as
a local process; stderr is collected in the background for the error message. Commands run as
root (`sudo -n` when the login is not root), as Machine.run does.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import threading
from dataclasses import dataclass
from typing import BinaryIO

from tasks.core import shell
from tasks.core.errors import HostError
from tasks.core.hosts import LocalMachine, Machine, SshMachine

CHUNK = 1 << 20
STDERR_LIMIT = 64 * 1024


def as_root(machine: Machine, command: str) -> str:
    """The command wrapped in `sudo -n` when the login is not root."""
    return command if machine.is_root else f"sudo -n sh -c {shell.quote(command)}"


class Session:
    """One command with binary stdin/stdout; stderr gathered by a thread."""

    def __init__(self) -> None:
        self._stderr = bytearray()
        self._stderr_thread: threading.Thread | None = None

    def _gather_stderr(self, read) -> None:
        def pump() -> None:
            while True:
                try:
                    data = read()
                except TimeoutError:
                    if self._finished():
                        return
                    continue
                except (OSError, ValueError):
                    return
                if not data:
                    return
                if len(self._stderr) < STDERR_LIMIT:
                    self._stderr.extend(data[:STDERR_LIMIT - len(self._stderr)])

        self._stderr_thread = threading.Thread(target=pump, daemon=True)
        self._stderr_thread.start()

    def _finished(self) -> bool:
        raise NotImplementedError

    @property
    def stderr(self) -> str:
        """What the command wrote to stderr (the first 64 KiB)."""
        return self._stderr.decode(errors="replace")

    def write(self, data: bytes) -> None:
        """Send bytes to the command's stdin."""
        raise NotImplementedError

    def close_stdin(self) -> None:
        """Tell the command its input has ended."""
        raise NotImplementedError

    def read(self, size: int = CHUNK) -> bytes:
        """Up to size bytes of stdout; b"" at the end."""
        raise NotImplementedError

    def wait(self) -> int:
        """The command's exit status (after stdout was read to the end)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the channel or process (killing it if still running)."""

    def read_until(self, marker: bytes, limit: int = 16 << 20) -> bytes:
        """Read stdout up to and including a marker line (for conversations with psql)."""
        buffer = bytearray()
        while marker not in buffer:
            data = self.read(65536)
            if not data:
                raise HostError(f"the command ended before printing {marker.decode()!r}: "
                                f"{last_line(self.stderr)}")
            buffer.extend(data)
            if len(buffer) > limit:
                raise HostError(f"no {marker.decode()!r} in the first {limit} bytes of output")
        return bytes(buffer)


class SshSession(Session):
    """A command on an SSH host, on its own channel of the host's connection."""

    def __init__(self, machine: SshMachine, command: str, timeout: float) -> None:
        super().__init__()
        transport = machine.connection.client.get_transport()
        self.channel = transport.open_session()
        self.channel.settimeout(timeout)
        self.channel.exec_command(command)
        self.timeout = timeout
        self._gather_stderr(lambda: self.channel.recv_stderr(65536))

    def _finished(self) -> bool:
        return self.channel.closed or self.channel.exit_status_ready()

    def write(self, data: bytes) -> None:
        self.channel.sendall(data)

    def close_stdin(self) -> None:
        self.channel.shutdown_write()

    def read(self, size: int = CHUNK) -> bytes:
        try:
            return self.channel.recv(size)
        except TimeoutError:
            raise HostError(f"no output for {self.timeout:g} s (timeouts.command)") from None

    def wait(self) -> int:
        status = self.channel.recv_exit_status()
        if self._stderr_thread:
            self._stderr_thread.join(timeout=10)
        return status

    def close(self) -> None:
        self.channel.close()


class LocalSession(Session):
    """A command on this machine."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.process = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._gather_stderr(lambda: self.process.stderr.read1(65536))

    def _finished(self) -> bool:
        return self.process.poll() is not None

    def write(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def close_stdin(self) -> None:
        if not self.process.stdin.closed:
            self.process.stdin.close()

    def read(self, size: int = CHUNK) -> bytes:
        return self.process.stdout.read1(size)

    def wait(self) -> int:
        status = self.process.wait()
        if self._stderr_thread:
            self._stderr_thread.join(timeout=10)
        return status

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe and not pipe.closed:
                pipe.close()


def open_session(machine: Machine, command: str, timeout: float | None = None, *,
                 sudo: bool = True) -> Session:
    """Start a command on the machine's host, as root (as the login with sudo=False)."""
    command = as_root(machine, command) if sudo else command
    if isinstance(machine, SshMachine):
        try:
            return SshSession(machine, command, timeout or machine.command_timeout)
        except (OSError, EOFError) as exc:
            raise HostError(f"lost the connection to {machine.host.target}: {exc}") from exc
    if isinstance(machine, LocalMachine):
        return LocalSession(command)
    raise HostError(f"{machine.host.target}: streaming needs an SSH or local connection")


@dataclass(frozen=True)
class Transfer:
    """How a streamed command ended and what went through."""

    exited: int
    stderr: str
    size: int
    sha256: str

    @property
    def ok(self) -> bool:
        """Whether the command exited 0."""
        return self.exited == 0


def download(machine: Machine, command: str, sink: BinaryIO, timeout: float | None = None, *,
             sudo: bool = True) -> Transfer:
    """Run a command and write its stdout to sink; the digest is of the bytes received."""
    digest, size = hashlib.sha256(), 0
    session = open_session(machine, command, timeout, sudo=sudo)
    try:
        session.close_stdin()
        while data := session.read():
            sink.write(data)
            digest.update(data)
            size += len(data)
        status = session.wait()
    except (OSError, EOFError) as exc:
        raise HostError(f"lost the connection to {machine.host.target}: {exc}") from exc
    finally:
        session.close()
    return Transfer(status, session.stderr, size, digest.hexdigest())


def upload(machine: Machine, command: str, source: BinaryIO, timeout: float | None = None, *,
           sudo: bool = True) -> Transfer:
    """Run a command with source as its stdin; stdout is kept with stderr for messages."""
    digest, size = hashlib.sha256(), 0
    session = open_session(machine, command, timeout, sudo=sudo)
    output = bytearray()

    def drain() -> None:
        try:
            while data := session.read(65536):
                if len(output) < STDERR_LIMIT:
                    output.extend(data[:STDERR_LIMIT - len(output)])
        except (OSError, EOFError, HostError):
            return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        try:
            while data := source.read(CHUNK):
                session.write(data)
                digest.update(data)
                size += len(data)
        except (OSError, EOFError):
            pass  # the command stopped reading: its exit status and stderr say why
        with contextlib.suppress(OSError, EOFError):
            session.close_stdin()
        reader.join()
        status = session.wait()
    finally:
        session.close()
    messages = session.stderr + output.decode(errors="replace")
    return Transfer(status, messages, size, digest.hexdigest())


def last_line(text: str) -> str:
    """The line of a command's output that says why it failed: the first error line
    (`FATAL:`, `ERROR:`, `error:`), else the last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in lines:
        if any(mark in line for mark in ("FATAL:", "ERROR:", "error:")):
            return line
    return lines[-1] if lines else "(no message)"
