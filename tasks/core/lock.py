"""One deploy at a time per inventory: a lock file on the control machine, and an audit log.

The lock records who holds it, since when and from which process. A lock whose process no
longer runs on this machine is stale: it is reported and taken over. A live lock, or one taken
on another machine, stops the deploy with who holds it and since when. A command that holds the
lock may take it again (deploy.all holds it from the firewall to the backup schedule, and each
tier run inside takes it too): only the outermost release frees it.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from tasks.core.errors import DifyopsError
from tasks.core.project import ROOT

STATE_DIR = ROOT / ".difyops"
_HELD: dict[Path, dict] = {}  # locks this process holds: path -> holder


class Locked(DifyopsError):
    """Another deploy holds the lock."""


def holder() -> dict[str, object]:
    """Who is deploying: user, machine, process, start time and command line."""
    return {"user": getpass.getuser(), "machine": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv[1:]) or "inv"}


def alive(pid: int) -> bool:
    """Whether a process with that id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(info: dict) -> str:
    """'alice on ops1 (pid 42) since 2026-01-01T10:00:00+00:00 running `deploy.all`'."""
    return (f"{info.get('user')} on {info.get('machine')} (pid {info.get('pid')}) since "
            f"{info.get('since')} running `{info.get('command')}`")


def read_lock(path: Path) -> tuple[dict, bool] | None:
    """A lock file's holder and whether it is stale (its process no longer runs on this
    machine); None when there is no lock."""
    try:
        info = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        info = {}
    return info, info.get("machine") == socket.gethostname() and not alive(
        int(info.get("pid", 0)))


def held(name: str, state_dir: Path = STATE_DIR) -> dict | None:
    """Who holds the inventory's deploy lock now, without taking it; None when it is free or
    stale."""
    found = read_lock(state_dir / "locks" / f"{name}.lock")
    return None if found is None or found[1] else found[0]


@contextlib.contextmanager
def deploy_lock(name: str, state_dir: Path = STATE_DIR) -> Iterator[dict]:
    """Hold the inventory's deploy lock for the duration of the block."""
    path = state_dir / "locks" / f"{name}.lock"
    if path in _HELD:
        yield _HELD[path]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    me = holder()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            found = read_lock(path)
            if found is None:  # released meanwhile
                continue
            info, stale = found
            if not stale:
                raise Locked(f"another deploy of inventory {name} holds the lock: "
                             f"{describe(info)}. Wait for it, or if it is gone, remove "
                             f"{path}") from None
            print(f"warning: taking over a stale deploy lock of {describe(info)} "
                  f"(that process no longer runs)", file=sys.stderr)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    else:
        raise Locked(f"the deploy lock of inventory {name} changed hands while it was taken "
                     f"({path}): run the command again")
    _HELD[path] = me
    try:
        yield me
    finally:
        del _HELD[path]
        path.unlink(missing_ok=True)


def audit(name: str, entry: dict, state_dir: Path = STATE_DIR) -> None:
    """Append one JSON line to the inventory's audit log: who deployed what, when, outcome."""
    path = state_dir / "audit" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
