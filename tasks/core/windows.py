"""Windows hosts over OpenSSH: commands run in PowerShell, files travel by SFTP.

A host with the label `os: windows` is reached through WindowsMachine. A plan for such a host
writes its commands (and `unless` probes) in PowerShell. They run as the login user (Windows has
no sudo), from any default shell of the OpenSSH server (cmd or PowerShell), with the PATH re-read
from the registry so that a tool installed by an earlier step is found by the next one.

Windows has no POSIX modes or owners: a file is compared by its content only, and file_state
reports the defaults of WriteFile (0644 root:root), so plans for Windows hosts leave mode and
owner at their defaults. Plans for Windows hosts use `unless` probes, never `on_change` (the
executor's markers are POSIX commands).
"""

from __future__ import annotations

import base64
import hashlib
import io
import secrets

from tasks.core.errors import HostError
from tasks.core.hosts import FileState, Result, SshMachine
from tasks.core.inventory import Host

# Every command starts with this: stop on the first error, no progress records on stderr, and
# the PATH as a new logon would see it.
PRELUDE = ("$ErrorActionPreference = 'Stop'; $ProgressPreference = 'SilentlyContinue'; "
           "$env:Path = [Environment]::GetEnvironmentVariable('Path', 'Machine') + ';' + "
           "[Environment]::GetEnvironmentVariable('Path', 'User')\n")
# After it: a native program's failure is the command's failure.
EPILOGUE = "\nif ($LASTEXITCODE) { exit $LASTEXITCODE }"
POSIX_DEFAULTS = (0o644, "root", "root")


def is_windows(host: Host) -> bool:
    """Whether the inventory marks the host as Windows (label `os: windows`)."""
    return host.labels.get("os", "").lower() == "windows"


def ps_quote(text: str) -> str:
    """A PowerShell single-quoted string literal (no expansion; quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


def powershell(script: str) -> str:
    """The command line that runs a PowerShell script, whatever the SSH server's shell is."""
    encoded = base64.b64encode((PRELUDE + script + EPILOGUE).encode("utf-16-le")).decode()
    return ("powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass "
            f"-EncodedCommand {encoded}")


def decode(command_line: str) -> str:
    """The script inside a command line made by powershell() (for tests and debugging)."""
    encoded = command_line.rsplit(" ", 1)[1]
    return base64.b64decode(encoded).decode("utf-16-le")[len(PRELUDE):-len(EPILOGUE)]


class WindowsMachine(SshMachine):
    """A Windows machine with the OpenSSH server: PowerShell commands, SFTP uploads."""

    @property
    def is_root(self) -> bool:
        return True  # no sudo: commands run with the login user's rights

    def _send(self, command_line: str, timeout: float) -> Result:
        """Run a command line through the SSH connection."""
        return super()._execute(command_line, timeout)

    def _execute(self, command: str, timeout: float) -> Result:
        return self._send(powershell(command), timeout)

    def _upload(self, content: bytes) -> str:
        """SFTP the bytes into the login user's home folder; return the file's name there."""
        name = f"difyops-{secrets.token_hex(8)}.tmp"
        self.connection.put(io.BytesIO(content), remote=name)
        return name

    def read_file(self, path: str) -> bytes | None:
        quoted = ps_quote(path)
        result = self.run(f"if (Test-Path -LiteralPath {quoted} -PathType Leaf) "
                          f"{{ [Convert]::ToBase64String([IO.File]::ReadAllBytes({quoted})) }} "
                          f"else {{ 'MISSING' }}")
        if not result.ok:
            raise HostError(f"{self.host.target}: cannot read {path}: {result.answer}")
        out = result.stdout.strip()
        return None if out == "MISSING" else base64.b64decode(out)

    def file_state(self, path: str) -> FileState | None:
        quoted = ps_quote(path)
        result = self.run(f"if (Test-Path -LiteralPath {quoted} -PathType Leaf) "
                          f"{{ (Get-FileHash -Algorithm SHA256 -LiteralPath {quoted}).Hash"
                          f".ToLower() }} else {{ 'MISSING' }}")
        digest = result.stdout.strip()
        if not result.ok or digest == "MISSING" or not digest:
            return None
        return FileState(digest, *POSIX_DEFAULTS)

    def install_file(self, path: str, content: bytes, *, mode: int = 0o644,
                     owner: str = "root", group: str = "root") -> bool:
        """Make the file exactly this content (mode and owner do not apply on Windows)."""
        state = self.file_state(path)
        if state is not None and state.sha256 == hashlib.sha256(content).hexdigest():
            return False
        uploaded = ps_quote(self._upload(content))
        self.check(f"$target = {ps_quote(path)}; $folder = Split-Path -Parent $target; "
                   f"if ($folder) {{ New-Item -ItemType Directory -Force -Path $folder "
                   f"| Out-Null }}; Move-Item -Force -LiteralPath (Join-Path $HOME {uploaded}) "
                   f"-Destination $target")
        return True
