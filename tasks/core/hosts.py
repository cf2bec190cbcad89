"""One interface over the machines difyops manages: this machine (Invoke) or SSH (Fabric).

A host runs commands (with sudo when the login is not root), reads files and installs files
atomically (temporary file, then rename), reporting whether anything changed. Backends differ
only in how a command is executed and how bytes reach the machine.

Machines come from connect(), which asks one factory held here: the real one, or a stand-in
installed with `using` (tests); no other module makes machines itself.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, TextIO

from invoke import Context
from invoke.exceptions import CommandTimedOut

from tasks.core import hostkeys, shell
from tasks.core.errors import HostError
from tasks.core.inventory import Host

# paramiko logs a transport's failure, traceback included, to stderr through Python's last-resort
# handler (dozens of raw lines when hosts do not answer). Its failures reach the operator once,
# in difyops' own words: connect_error().
logging.getLogger("paramiko").addHandler(logging.NullHandler())

# Exit statuses that say a command could not run at all (timed out, not executable, the SSH
# session failed), as opposed to an answer. Not 127: `command -v` answers "absent" with it.
CANNOT_RUN = frozenset({124, 126, 255})

if TYPE_CHECKING:
    import fabric
    import paramiko


@dataclass(frozen=True)
class Result:
    """What a command answered."""

    exited: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """Whether the command exited 0."""
        return self.exited == 0

    @property
    def answer(self) -> str:
        """The last line the command printed (stderr first), for messages."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return text[-1] if text else f"exit {self.exited}"


@dataclass(frozen=True)
class FileState:
    """What is on the host at a path: content digest, mode and ownership."""

    sha256: str
    mode: int
    owner: str
    group: str


class Machine:
    """Commands and files on one host; subclasses say how commands run and bytes travel."""

    def __init__(self, host: Host, command_timeout: float = 1800) -> None:
        self.host = host
        self.command_timeout = command_timeout
        self.sudo_checked = False

    @property
    def is_root(self) -> bool:
        """Whether commands already run as root (no sudo needed)."""
        raise NotImplementedError

    def _execute(self, command: str, timeout: float) -> Result:
        raise NotImplementedError

    def _upload(self, content: bytes) -> str:
        """Put bytes into a new private temporary file on the host; return its path."""
        raise NotImplementedError

    def _feed(self, command: str, source: BinaryIO, timeout: float) -> Result:
        """Run a command whose standard input is the bytes of source."""
        raise NotImplementedError

    def _attach(self, command: str, pty: bool, stdin: bool, out: TextIO | None) -> int:
        """Run a command whose output is written as it comes (to ``out``, else this process's
        own); with a terminal of its own when pty, reading this process's input when stdin.
        Returns its exit status."""
        raise HostError(f"{self.host.target}: commands cannot be attached to this terminal "
                        f"on this kind of host")

    def close(self) -> None:
        """Release the connection, if any."""

    def as_root(self, command: str, sudo: bool = True) -> str:
        """The command as it runs: through `sudo -n sh -c` when the login is not root."""
        if sudo and not self.is_root:
            return f"sudo -n sh -c {shell.quote(command)}"
        return command

    def run(self, command: str, *, sudo: bool = True, timeout: float | None = None) -> Result:
        """Run a shell command; as root through `sudo -n` when the login is not root."""
        return self._execute(self.as_root(command, sudo), timeout or self.command_timeout)

    def feed(self, command: str, source: BinaryIO, *, sudo: bool = True,
             timeout: float | None = None) -> Result:
        """Run a command that reads its standard input from source until its end, streamed
        (e.g. `docker save ... | <host> docker load`); as root like run()."""
        return self._feed(self.as_root(command, sudo), source, timeout or self.command_timeout)

    def attach(self, command: str, *, interactive: bool = False, hangup: bool = False,
               out: TextIO | None = None, sudo: bool = True) -> int:
        """Run a shell command as run() does, but attached (no timeout: the operator ends it):
        output as it comes, to ``out`` or this process's own; interactive: a terminal of its
        own and this process's input; hangup: a terminal without input, so that closing the
        connection ends the command (the terminal hangs up on it)."""
        return self._attach(self.as_root(command, sudo), interactive or hangup, interactive, out)

    def probe(self, command: str) -> bool:
        """A read-only question to the host: True (exit 0) or False (another answer). A probe
        that cannot run (sudo refused, not executable, timed out, the connection failed)
        raises HostError: it is never read as "missing" or "needed"."""
        self.check_sudo()
        result = self.run(command)
        if result.exited in CANNOT_RUN:
            raise HostError(f"{self.host.target}: the probe `{command}` could not run "
                            f"(exit {result.exited}): {result.answer}")
        return result.ok

    def check_sudo(self) -> None:
        """Once per connection, unless logged in as root: HostError when `sudo -n` is refused,
        saying what to do (before a probe or a fact reads it as an answer)."""
        if not self.is_root and not self.sudo_checked:
            refused = self._execute("sudo -n true", self.command_timeout)
            if not refused.ok:
                raise HostError(f"{self.host.target}: `sudo -n` is refused ({refused.answer}): "
                                f"give {self.host.ssh.user} passwordless sudo, or log in as root")
            self.sudo_checked = True

    def check(self, command: str, *, sudo: bool = True, timeout: float | None = None) -> Result:
        """Run a command that must succeed; a failure raises HostError naming the host."""
        result = self.run(command, sudo=sudo, timeout=timeout)
        if not result.ok:
            raise HostError(f"{self.host.target}: `{command}` failed: {result.answer}")
        return result

    def read_file(self, path: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        result = self.run(shell.command(
            "if [ -f {0} ]; then base64 -w0 {0}; else echo MISSING; fi", path))
        if not result.ok:
            raise HostError(f"{self.host.target}: cannot read {path}: {result.answer}")
        out = result.stdout.strip()
        return None if out == "MISSING" else base64.b64decode(out)

    def file_state(self, path: str) -> FileState | None:
        """Digest, mode and ownership of a file, or None when it does not exist."""
        result = self.run(shell.command(
            "if [ -f {0} ]; then stat -c '%a %U %G' {0} && sha256sum {0}; else echo MISSING; fi",
            path))
        if not result.ok:
            raise HostError(f"{self.host.target}: cannot read the state of {path}: "
                            f"{result.answer}")
        lines = result.stdout.split()
        if lines[:1] == ["MISSING"]:
            return None
        mode, owner, group, digest = lines[0], lines[1], lines[2], lines[3]
        return FileState(digest, int(mode, 8), owner, group)

    def install_file(self, path: str, content: bytes, *, mode: int = 0o644,
                     owner: str = "root", group: str = "root") -> bool:
        """Make the file exactly this; return whether anything had to change."""
        wanted = FileState(hashlib.sha256(content).hexdigest(), mode, owner, group)
        if self.file_state(path) == wanted:
            return False
        temporary = self._upload(content)
        self.check(shell.command(
            "mkdir -p {parent} && install -m {mode} -o {owner} -g {group} {temporary} {staged} "
            "&& mv -f {staged} {path}; status=$?; rm -f {temporary}; exit $status",
            parent=os.path.dirname(path) or "/", mode=f"{mode:04o}", owner=owner, group=group,
            temporary=temporary, staged=f"{path}.difyops-new", path=path))
        return True


class LocalMachine(Machine):
    """This machine, through Invoke."""

    def __init__(self, host: Host, command_timeout: float = 1800,
                 context: Context | None = None) -> None:
        super().__init__(host, command_timeout)
        self.context = context or Context()

    @property
    def is_root(self) -> bool:
        return os.geteuid() == 0

    def _execute(self, command: str, timeout: float) -> Result:
        try:
            result = self.context.run(command, hide=True, warn=True, timeout=timeout,
                                      in_stream=False)
        except CommandTimedOut:
            return Result(124, "", f"timed out after {timeout:g} s")
        return Result(result.exited, result.stdout, result.stderr)

    def _attach(self, command: str, pty: bool, stdin: bool, out: TextIO | None) -> int:
        result = self.context.run(command, pty=pty, warn=True, hide=False, out_stream=out,
                                  err_stream=out, in_stream=None if stdin else False)
        return result.exited

    def _feed(self, command: str, source: BinaryIO, timeout: float) -> Result:
        try:
            result = subprocess.run(["sh", "-c", command], stdin=source, capture_output=True,
                                    timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return Result(124, "", f"timed out after {timeout:g} s")
        return Result(result.returncode, result.stdout.decode(errors="replace"),
                      result.stderr.decode(errors="replace"))

    def _upload(self, content: bytes) -> str:
        fd, path = tempfile.mkstemp(prefix="difyops.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        return path


class SshMachine(Machine):
    """A remote machine, through a Fabric connection opened on first use."""

    def __init__(self, host: Host, command_timeout: float = 1800,
                 connect_timeout: float = 10) -> None:
        super().__init__(host, command_timeout)
        self.connect_timeout = connect_timeout
        self._connection = None

    @property
    def connection(self):  # -> fabric.Connection, imported lazily to keep `inv --list` fast
        """The open connection, to a host whose key the inventory's known_hosts records;
        failures name the host and its address, and a refused key says what to do."""
        if self._connection is None:
            from paramiko.ssh_exception import (
                BadHostKeyException,
                NoValidConnectionsError,
                SSHException,
            )

            connection = ssh_connection(self.host, self.connect_timeout)
            try:
                connection.open()
            except BadHostKeyException as exc:
                connection.client.close()
                path = hostkeys.file_for(self.host)
                name = hostkeys.lookup_name(connection.host, connection.port)
                raise hostkeys.HostKeyChanged(hostkeys.changed_message(
                    self.host, path, name, exc.key, exc.expected_key)) from None
            except hostkeys.HostKeyUnknown:
                connection.client.close()
                raise
            except (TimeoutError, OSError, NoValidConnectionsError, SSHException) as exc:
                error = connect_error(self.host, connection, exc, self.connect_timeout)
                connection.client.close()
                raise error from exc
            self._connection = connection
        return self._connection

    @property
    def is_root(self) -> bool:
        return self.host.ssh.user == "root"

    def _execute(self, command: str, timeout: float) -> Result:
        try:
            result = self.connection.run(command, hide=True, warn=True, timeout=timeout,
                                         in_stream=False)
        except CommandTimedOut:
            return Result(124, "", f"timed out after {timeout:g} s")
        except (OSError, EOFError) as exc:
            raise HostError(f"lost the connection to {self.host.target}: {exc}") from exc
        return Result(result.exited, result.stdout, result.stderr)

    def _attach(self, command: str, pty: bool, stdin: bool, out: TextIO | None) -> int:
        try:
            result = self.connection.run(command, pty=pty, warn=True, hide=False,
                                         out_stream=out, err_stream=out,
                                         in_stream=None if stdin else False)
        except (OSError, EOFError) as exc:
            raise HostError(f"lost the connection to {self.host.target}: {exc}") from exc
        return result.exited

    def _feed(self, command: str, source: BinaryIO, timeout: float) -> Result:
        try:
            channel = self.connection.client.get_transport().open_session()
            channel.settimeout(timeout)
            channel.exec_command(command)
            while chunk := source.read(1 << 20):
                channel.sendall(chunk)
            channel.shutdown_write()
            stdout = channel.makefile("rb").read().decode(errors="replace")
            stderr = channel.makefile_stderr("rb").read().decode(errors="replace")
            exited = channel.recv_exit_status()
        except TimeoutError:
            return Result(124, "", f"timed out after {timeout:g} s")
        except (OSError, EOFError) as exc:
            raise HostError(f"lost the connection to {self.host.target}: {exc}") from exc
        return Result(exited, stdout, stderr)

    def _upload(self, content: bytes) -> str:
        path = self.check("umask 077 && mktemp /tmp/difyops.XXXXXXXX", sudo=False).stdout.strip()
        self.connection.put(io.BytesIO(content), remote=path)
        return path

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


def connect_error(host: Host, connection: fabric.Connection, exc: BaseException,
                  connect_timeout: float) -> HostError:
    """Why an SSH connection could not be opened, naming the host. paramiko says "No existing
    session" when the port accepted the connection but no SSH greeting came in time."""
    transport = connection.client.get_transport()
    if str(exc) == "No existing session" and transport is not None \
            and not transport.remote_version:
        why = (f"no SSH greeting within {connect_timeout:g} s: the port accepts connections "
               f"but is not answering as an SSH server")
    else:
        why = str(exc) or type(exc).__name__
    return HostError(f"cannot connect to {host.target}: {why}")


def ssh_connection(host: Host, connect_timeout: float,
                   policy: paramiko.MissingHostKeyPolicy | None = None) -> fabric.Connection:
    """A Fabric connection to the host (not yet open) whose client trusts the keys of the
    inventory's known_hosts file and no others: Fabric's own client adds any key it is shown.
    policy: what to do with a key the file does not record (default: refuse, naming it)."""
    from fabric import Connection

    kwargs = {"key_filename": os.path.expanduser(host.ssh.key)} if host.ssh.key else {}
    connection = Connection(host.address, user=host.ssh.user, port=host.ssh.port,
                            connect_timeout=connect_timeout, connect_kwargs=kwargs)
    connection.client = hostkeys.verified_client(host, hostkeys.file_for(host), policy)
    return connection


# Makes the machine behind a host, given the inventory's timeouts (None: the defaults).
Factory = Callable[[Host, Mapping[str, int] | None], Machine]


def _real_machine(host: Host, timeouts: Mapping[str, int] | None = None) -> Machine:
    """The real machine behind an inventory host: this machine, a Windows host or an SSH host."""
    timeouts = timeouts or {"connect": 10, "command": 1800}
    if host.connection == "local":
        return LocalMachine(host, timeouts["command"])
    if host.labels.get("os", "").lower() == "windows":
        from tasks.core.windows import WindowsMachine  # PowerShell commands, SFTP uploads

        return WindowsMachine(host, timeouts["command"], timeouts["connect"])
    return SshMachine(host, timeouts["command"], timeouts["connect"])


# What connect() asks for a machine: the real one unless `using` installed another. A plain
# module attribute, not a ContextVar: fleet.each_host's worker threads must see it too.
_factory: Factory = _real_machine


def connect(host: Host, timeouts: Mapping[str, int] | None = None) -> Machine:
    """The machine behind an inventory host, with the inventory's timeouts: every part of
    difyops obtains its machines here, from the installed factory."""
    return _factory(host, timeouts)


@contextmanager
def using(factory: Factory) -> Iterator[Factory]:
    """Make connect() hand out the factory's machines (in every module and thread) until the
    block ends, then put the previous factory back: how tests stand in for hosts."""
    global _factory
    previous, _factory = _factory, factory
    try:
        yield factory
    finally:
        _factory = previous
