"""Windows hosts (the home lab's workstation): PowerShell command lines, files by content only."""

from __future__ import annotations

import base64
import hashlib

from tasks.core.hosts import Result, SshMachine, connect
from tasks.core.inventory import Host, Ssh
from tasks.core.windows import PRELUDE, WindowsMachine, decode, powershell, ps_quote

WINDOWS = Host(name="workstation", address="192.168.1.102", ssh=Ssh(user="dev"),
               roles=("dev_frontend",), labels={"os": "windows"})


class RecordingWindows(WindowsMachine):
    """A WindowsMachine whose SSH side is a list of answers; records the scripts it sends."""

    def __init__(self, *answers: Result) -> None:
        super().__init__(WINDOWS)
        self.answers = list(answers)
        self.scripts: list[str] = []
        self.uploads: list[bytes] = []

    def _send(self, command_line: str, timeout: float) -> Result:
        assert command_line.startswith("powershell -NoProfile -NonInteractive -ExecutionPolicy "
                                       "Bypass -EncodedCommand ")
        self.scripts.append(decode(command_line))
        return self.answers.pop(0) if self.answers else Result(0, "", "")

    def _upload(self, content: bytes) -> str:
        self.uploads.append(content)
        return "difyops-0123.tmp"


def test_connect_picks_the_windows_machine_by_label() -> None:
    assert type(connect(WINDOWS)) is WindowsMachine
    linux = Host(name="vm", address="192.168.1.101", roles=("dev_backend",))
    assert type(connect(linux)) is SshMachine


def test_commands_are_encoded_powershell_without_sudo() -> None:
    line = powershell("Get-Command pnpm | Out-Null")
    script = base64.b64decode(line.rsplit(" ", 1)[1]).decode("utf-16-le")
    assert script == (PRELUDE + "Get-Command pnpm | Out-Null\n"
                      "if ($LASTEXITCODE) { exit $LASTEXITCODE }")
    assert "$ErrorActionPreference = 'Stop'" in PRELUDE
    machine = RecordingWindows()
    assert machine.run("Get-Command pnpm | Out-Null").ok
    assert machine.scripts == ["Get-Command pnpm | Out-Null"]  # no `sudo -n sh -c` around it


def test_ps_quote_doubles_single_quotes() -> None:
    assert ps_quote("C:\\Users\\o'neil\\dify") == "'C:\\Users\\o''neil\\dify'"


def test_file_state_and_install_compare_content_only() -> None:
    content = b"NEXT_PUBLIC_API_PREFIX=http://192.168.1.101:5001/console/api\n"
    digest = hashlib.sha256(content).hexdigest()
    same = RecordingWindows(Result(0, digest.upper().lower() + "\r\n", ""))
    assert same.install_file("C:\\src\\dify\\web\\.env.local", content) is False
    assert same.scripts == ["if (Test-Path -LiteralPath 'C:\\src\\dify\\web\\.env.local' "
                            "-PathType Leaf) { (Get-FileHash -Algorithm SHA256 -LiteralPath "
                            "'C:\\src\\dify\\web\\.env.local').Hash.ToLower() } else "
                            "{ 'MISSING' }"]
    missing = RecordingWindows(Result(0, "MISSING\r\n", ""), Result(0, "", ""))
    assert missing.install_file("C:\\src\\dify\\web\\.env.local", content) is True
    assert missing.uploads == [content]
    assert missing.scripts[1] == (
        "$target = 'C:\\src\\dify\\web\\.env.local'; $folder = Split-Path -Parent $target; "
        "if ($folder) { New-Item -ItemType Directory -Force -Path $folder | Out-Null }; "
        "Move-Item -Force -LiteralPath (Join-Path $HOME 'difyops-0123.tmp') -Destination $target")
    state = RecordingWindows(Result(0, digest + "\r\n", "")).file_state("C:\\x")
    assert state is not None and (state.sha256, state.mode, state.owner) == (digest, 0o644,
                                                                              "root")


def test_read_file() -> None:
    encoded = base64.b64encode(b"a = 1\n").decode()
    assert RecordingWindows(Result(0, encoded + "\r\n", "")).read_file("C:\\a") == b"a = 1\n"
    assert RecordingWindows(Result(0, "MISSING\r\n", "")).read_file("C:\\a") is None
