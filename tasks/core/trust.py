"""Trust on first use: record the SSH host keys of an inventory's hosts (`inv hosts.trust`).

Each SSH host is asked for its key the way every connection reaches it (same address, port and
route); the key's type and SHA256 fingerprint are shown, and a key the known_hosts file does not
hold yet is appended to it. A recorded key that differs is never replaced: the host is refused
with the command that removes its line. Hosts reached locally have no host key and are skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core import hostkeys
from tasks.core.errors import DifyopsError
from tasks.core.hosts import connect_error, ssh_connection
from tasks.core.inventory import Host

if TYPE_CHECKING:
    import paramiko

NEW = "new"
KNOWN = "already recorded"
DIFFERS = "REFUSED: differs from the recorded key"
RECORDED = "recorded now (trust on first use)"
WOULD_RECORD = "not recorded; would record (--dry)"
SKIPPED = "skipped: connection local (no SSH, no host key)"
UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class Offer:
    """The key a host offered, and its name in known_hosts (`address` or `[address]:port`)."""

    name: str
    key: paramiko.PKey


@dataclass(frozen=True)
class Row:
    """What happened to one host's key."""

    host: Host
    status: str
    name: str = ""
    key: paramiko.PKey | None = None
    detail: str = ""

    @property
    def failed(self) -> bool:
        """Whether the host's key could not be recorded (refused or unreachable)."""
        return self.status in (DIFFERS, UNREACHABLE)


Probe = Callable[[Host], Offer]


def decide(recorded: dict[str, paramiko.PKey], offered: paramiko.PKey) -> str:
    """NEW when nothing is recorded for the host, KNOWN when the offered key is the recorded
    one of its type, DIFFERS otherwise (another key of that type, or keys of other types only:
    connections would refuse it as changed)."""
    if not recorded:
        return NEW
    if recorded.get(offered.get_name()) == offered:
        return KNOWN
    return DIFFERS


class _Offered(Exception):
    """A signal, not an error: the key a host offered, caught before any login."""

    def __init__(self, name: str, key: paramiko.PKey) -> None:
        super().__init__(name)
        self.name, self.key = name, key


def offered_key(host: Host, connect_timeout: float) -> Offer:
    """The key the host offers, read during the key exchange. A host whose key is recorded is
    logged in to as every connection does (or refused at authentication: the key was checked
    before); nothing is run."""
    from paramiko import MissingHostKeyPolicy
    from paramiko.ssh_exception import (
        AuthenticationException,
        BadHostKeyException,
        NoValidConnectionsError,
        SSHException,
    )

    class Capture(MissingHostKeyPolicy):
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                             key: paramiko.PKey) -> None:
            raise _Offered(hostname, key)

    connection = ssh_connection(host, connect_timeout, Capture())
    name = hostkeys.lookup_name(connection.host, connection.port)
    try:
        # A refused login still means the key matched the recorded one: it is checked first.
        with contextlib.suppress(AuthenticationException):
            connection.open()
        return Offer(name, connection.client.get_transport().get_remote_server_key())
    except _Offered as offered:
        return Offer(offered.name, offered.key)
    except BadHostKeyException as exc:
        return Offer(name, exc.key)
    except (TimeoutError, OSError, NoValidConnectionsError, SSHException) as exc:
        raise connect_error(host, connection, exc, connect_timeout) from exc
    finally:
        connection.client.close()


def trust(hosts: Sequence[Host], path: Path, *, probe: Probe, dry: bool = False,
          parallel: int = 16) -> list[Row]:
    """Ask every SSH host for its key (in parallel), then record the new ones (unless dry),
    in the hosts' order. Never replaces or removes a line."""
    known = hostkeys.load(path)  # a malformed file stops here, before any host is asked
    remote = [host for host in hosts if host.connection != "local"]

    def ask(host: Host) -> Offer | str:
        try:
            return probe(host)
        except DifyopsError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(remote)))) as pool:
        offers = dict(zip((h.name for h in remote), pool.map(ask, remote), strict=True))
    rows = []
    for host in hosts:
        if host.connection == "local":
            rows.append(Row(host, SKIPPED))
            continue
        offer = offers[host.name]
        if isinstance(offer, str):
            rows.append(Row(host, UNREACHABLE, detail=offer))
            continue
        recorded = known.recorded(offer.name)
        status = decide(recorded, offer.key)
        if status == NEW:
            if not dry:
                hostkeys.append(path, offer.name, offer.key)
            rows.append(Row(host, WOULD_RECORD if dry else RECORDED, offer.name, offer.key))
        elif status == KNOWN:
            rows.append(Row(host, KNOWN, offer.name, offer.key))
        else:
            expected = recorded.get(offer.key.get_name()) or next(iter(recorded.values()))
            rows.append(Row(host, DIFFERS, offer.name, offer.key, detail=(
                f"{host.name}: {hostkeys.display(path)} records {hostkeys.describe(expected)} "
                f"for {offer.name}, the host now offers {hostkeys.describe(offer.key)}; the "
                f"recorded key is never replaced. Possible man-in-the-middle: find out why. "
                f"Only if the host was really reinstalled: check the new fingerprint on its "
                f"console, remove the old line (`{hostkeys.removal(offer.name, path)}`), then "
                f"run `inv hosts.trust --host {host.name}` again")))
    return rows
