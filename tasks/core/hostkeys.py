"""SSH host keys: the known_hosts file of an inventory, the only keys an SSH connection trusts.

Each inventory has one known_hosts file (OpenSSH format): `DIFY_KNOWN_HOSTS`, else the
inventory's `ssh_known_hosts` setting, else `<inventory file without .yml>.known_hosts` beside
the inventory. Every SSH connection loads that file and nothing else (no system or user
known_hosts, no automatic adding) and refuses a host whose key is missing from it or differs
from the one recorded, during the key exchange: before authentication, so no command runs and
no file is sent to whoever answered. `inv hosts.trust` records keys (tasks/core/trust.py).
"""

from __future__ import annotations

import binascii
import os
import re
from base64 import b64decode
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core import shell
from tasks.core.errors import HostError, InputError, Problem
from tasks.core.inventory import Host
from tasks.core.project import ROOT, display

if TYPE_CHECKING:  # paramiko is imported where it is used: `inv --list` stays fast
    import paramiko

KNOWN_HOSTS_ENV = "DIFY_KNOWN_HOSTS"
SUFFIX = ".known_hosts"
SSH_PORT = 22
HEADER = (
    "# SSH host keys of the inventory's hosts (OpenSSH known_hosts format). difyops trusts\n"
    "# these keys and no others. Add a host's key with `inv hosts.trust --host NAME` after\n"
    "# checking its fingerprint; a changed key is never replaced: remove its line first.\n"
)


class HostKeyUnknown(HostError):
    """The host offered a key that the known_hosts file does not record for it."""


class HostKeyChanged(HostError):
    """The host offered a key other than the one recorded for it."""


def known_hosts_path(inventory_file: Path, setting: str = "") -> Path:
    """The inventory's known_hosts file: DIFY_KNOWN_HOSTS (relative to the working folder, as
    DIFY_INVENTORY), else the setting (relative to the project, as secrets_file), else the
    inventory's file name with .known_hosts beside it."""
    chosen = os.environ.get(KNOWN_HOSTS_ENV, "").strip()
    if chosen:
        return Path(chosen).expanduser().resolve()
    if setting:
        path = Path(setting).expanduser()
        return (path if path.is_absolute() else ROOT / path).resolve()
    return inventory_file.resolve().with_suffix(SUFFIX)


def file_for(host: Host) -> Path:
    """The known_hosts file a host is checked against (its inventory's, else DIFY_KNOWN_HOSTS);
    a host without one is refused before any connection."""
    chosen = host.ssh.known_hosts or os.environ.get(KNOWN_HOSTS_ENV, "").strip()
    if not chosen:
        raise HostError(f"{host.target}: no known_hosts file to check its SSH host key against; "
                        f"nothing was sent. Load the host from an inventory (its known_hosts "
                        f"file) or set {KNOWN_HOSTS_ENV}=path")
    return Path(chosen).expanduser()


def lookup_name(address: str, port: int) -> str:
    """The name of a host in known_hosts: `address` on port 22, else `[address]:port`."""
    return address if port == SSH_PORT else f"[{address}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    """The key's SHA256 fingerprint as OpenSSH prints it (`SHA256:...`, no padding)."""
    return key.fingerprint


def describe(key: paramiko.PKey) -> str:
    """Key type and fingerprint, e.g. `ssh-ed25519 SHA256:...`."""
    return f"{key.get_name()} {fingerprint(key)}"


def removal(name: str, path: Path) -> str:
    """The command that removes a host's lines from the known_hosts file."""
    return shell.command("ssh-keygen -R {} -f {}", name, display(path))


@dataclass(frozen=True)
class KnownHosts:
    """The keys of one known_hosts file, in file order (none when the file does not exist)."""

    path: Path
    entries: tuple[tuple[str, paramiko.PKey], ...] = ()

    def host_keys(self) -> paramiko.HostKeys:
        """The keys as paramiko looks them up (hashed names stay hashed)."""
        from paramiko import HostKeys

        keys = HostKeys()
        for name, key in self.entries:
            keys.add(name, key.get_name(), key)
        return keys

    def recorded(self, name: str) -> dict[str, paramiko.PKey]:
        """The keys recorded for a name, by key type (plain or hashed entries)."""
        found = self.host_keys().lookup(name)
        return dict(found.items()) if found is not None else {}


LINE_TYPES = re.compile(r"^(ssh-|ecdsa-sha2-|sk-)")


def parse(path: Path) -> tuple[KnownHosts, list[Problem]]:
    """Read a known_hosts file; every line paramiko would silently skip is a problem."""
    from paramiko import PKey, SSHException

    problems: list[Problem] = []
    if not path.exists():
        return KnownHosts(path), problems
    shown = display(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return KnownHosts(path), [Problem(shown, "(file)", f"cannot read it: {exc}",
                                          "make it a readable known_hosts text file")]
    entries: list[tuple[str, paramiko.PKey]] = []
    seen: dict[tuple[str, str], tuple[int, paramiko.PKey]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"line {number}"
        fields = line.split()
        if line.startswith("@"):
            problems.append(Problem(shown, where, f"markers such as {fields[0]} are not "
                                    "supported", "record each host's own key: inv hosts.trust"))
            continue
        if len(fields) < 3 or not LINE_TYPES.match(fields[1]):
            problems.append(Problem(shown, where, "not a known_hosts line",
                                    "write `ADDRESS KEYTYPE BASE64` (or `[ADDRESS]:PORT ...`), "
                                    "as `inv hosts.trust` or `ssh-keyscan` do"))
            continue
        try:
            key = PKey.from_type_string(fields[1], b64decode(fields[2], validate=True))
        except (binascii.Error, ValueError, SSHException) as exc:
            problems.append(Problem(shown, where, f"unreadable {fields[1]} key: {exc}",
                                    "copy the line again from `inv hosts.trust` or the host's "
                                    "/etc/ssh/ssh_host_*_key.pub"))
            continue
        for name in fields[0].split(","):
            earlier = seen.setdefault((name, key.get_name()), (number, key))
            if earlier[1] != key:
                problems.append(Problem(shown, where, f"a second {key.get_name()} key for "
                                        f"{name} (line {earlier[0]} records another one)",
                                        "keep the line of the key the host really has: check "
                                        "its fingerprint on the host, remove the other line"))
                continue
            entries.append((name, key))
    return KnownHosts(path, tuple(entries)), problems


def load(path: Path) -> KnownHosts:
    """The known_hosts file's keys; a malformed file is an input error naming its lines."""
    known, problems = parse(path)
    if problems:
        raise InputError(problems)
    return known


def check_file(path: Path) -> list[Problem]:
    """The problems of a known_hosts file (for the inventory's checks; none when missing)."""
    return parse(path)[1]


def unknown_message(host: Host, path: Path, name: str, key: paramiko.PKey) -> str:
    """Why a host with an unrecorded key is refused, and what to do."""
    return (f"unknown SSH host key: {host.target} offers {describe(key)}, and "
            f"{display(path)} records no key for {name}. Nothing was run or sent.\n"
            f"    fix: check that fingerprint on the host itself (`ssh-keygen -lf "
            f"{public_key_file(host, key)}` on its console), then run "
            f"`inv hosts.trust --host {host.name}` after checking the fingerprint")


def public_key_file(host: Host, key: paramiko.PKey) -> str:
    """Where the host keeps the public host key of that type (OpenSSH on Linux or Windows)."""
    folder = ("C:\\ProgramData\\ssh\\" if host.labels.get("os", "").lower() == "windows"
              else "/etc/ssh/")
    return f"{folder}ssh_host_{key_file_kind(key)}_key.pub"


def changed_message(host: Host, path: Path, name: str, offered: paramiko.PKey,
                    expected: paramiko.PKey) -> str:
    """Why a host whose key changed is refused: loudly, since it may be an attack."""
    return (f"SSH HOST KEY CHANGED for {host.target}: it offers {describe(offered)}, but "
            f"{display(path)} records {describe(expected)} for {name}. Someone may be "
            f"intercepting the connection (man-in-the-middle); nothing was run or sent.\n"
            f"    fix: find out why. Only if the host was really reinstalled: check the new "
            f"fingerprint on its console, remove its line (`{removal(name, path)}`), then run "
            f"`inv hosts.trust --host {host.name}`")


def key_file_kind(key: paramiko.PKey) -> str:
    """The part of /etc/ssh/ssh_host_<kind>_key.pub that holds a key of this type."""
    name = key.get_name()
    for kind in ("ed25519", "ecdsa", "rsa", "dsa"):
        if kind in name:
            return kind
    return "*"


def refuse_unknown(host: Host, path: Path) -> paramiko.MissingHostKeyPolicy:
    """paramiko's RejectPolicy, naming the host, the key offered and what to do."""
    from paramiko import RejectPolicy

    class RefuseUnknown(RejectPolicy):
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                             key: paramiko.PKey) -> None:
            """Called by paramiko after the key exchange, before authentication."""
            client.close()
            raise HostKeyUnknown(unknown_message(host, path, hostname, key))

    return RefuseUnknown()


def verified_client(host: Host, path: Path,
                    policy: paramiko.MissingHostKeyPolicy | None = None) -> paramiko.SSHClient:
    """An SSH client that knows the keys of that file only and rejects any other key."""
    from paramiko import SSHClient

    client = SSHClient()
    for name, key in load(path).entries:
        client.get_host_keys().add(name, key.get_name(), key)
    client.set_missing_host_key_policy(policy or refuse_unknown(host, path))
    return client


def append(path: Path, name: str, key: paramiko.PKey) -> None:
    """Add one line for a host's key to the known_hosts file (made with a header when missing),
    written whole then renamed into place, mode 0644: it holds public keys only."""
    text = path.read_text() if path.exists() else HEADER
    if text and not text.endswith("\n"):
        text += "\n"
    text += f"{name} {key.get_name()} {key.get_base64()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.difyops-new")
    staged.write_text(text)
    staged.chmod(0o644)
    os.replace(staged, path)


def unrecorded(hosts: Iterable[Host]) -> list[tuple[Host, Path]]:
    """The SSH hosts (Linux or Windows) whose known_hosts file records no key for them, with
    that file: a deploy refuses them before it touches any host."""
    missing = []
    for host in hosts:
        if host.connection == "local":
            continue
        path = file_for(host)
        if not load(path).recorded(lookup_name(host.address, host.ssh.port)):
            missing.append((host, path))
    return missing
