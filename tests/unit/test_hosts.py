"""Exact commands the local backend sends, through Invoke's MockContext."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from invoke import MockContext, Result

from tasks.core.errors import HostError
from tasks.core.hosts import LocalMachine, connect
from tasks.core.inventory import Host, Ssh

LOCAL = Host(name="local", address="127.0.0.1", connection="local")


def machine(run: dict, *, root: bool, monkeypatch: pytest.MonkeyPatch) -> LocalMachine:
    monkeypatch.setattr(os, "geteuid", lambda: 0 if root else 1000)
    return LocalMachine(LOCAL, context=MockContext(run=run))


def test_commands_run_through_sudo_when_not_root(monkeypatch) -> None:
    command = "sudo -n sh -c 'systemctl restart nginx'"
    local = machine({command: Result(exited=0)}, root=False, monkeypatch=monkeypatch)
    assert local.run("systemctl restart nginx").ok


def test_commands_run_directly_as_root(monkeypatch) -> None:
    local = machine({"systemctl restart nginx": Result(exited=0)}, root=True,
                    monkeypatch=monkeypatch)
    assert local.run("systemctl restart nginx").ok


def test_unchanged_file_is_not_uploaded(monkeypatch) -> None:
    digest = hashlib.sha256(b"x\n").hexdigest()
    probe = ("if [ -f /etc/a.conf ]; then stat -c '%a %U %G' /etc/a.conf && sha256sum "
             "/etc/a.conf; else echo MISSING; fi")
    local = machine({probe: Result(stdout=f"644 root root\n{digest}  /etc/a.conf\n")},
                    root=True, monkeypatch=monkeypatch)
    assert local.install_file("/etc/a.conf", b"x\n") is False


def test_changed_file_is_installed_atomically(monkeypatch, tmp_path) -> None:
    probe = ("if [ -f /etc/a.conf ]; then stat -c '%a %U %G' /etc/a.conf && sha256sum "
             "/etc/a.conf; else echo MISSING; fi")
    temporary = tmp_path / "upload"
    monkeypatch.setattr(LocalMachine, "_upload", lambda self, content: str(temporary))
    install = (f"mkdir -p /etc && install -m 0600 -o root -g redis {temporary} "
               f"/etc/a.conf.difyops-new && mv -f /etc/a.conf.difyops-new /etc/a.conf; "
               f"status=$?; rm -f {temporary}; exit $status")
    local = machine({probe: Result(stdout="MISSING\n"), install: Result(exited=0)}, root=True,
                    monkeypatch=monkeypatch)
    assert local.install_file("/etc/a.conf", b"x\n", mode=0o600, group="redis") is True


def test_read_missing_file(monkeypatch) -> None:
    command = "if [ -f /nope ]; then base64 -w0 /nope; else echo MISSING; fi"
    local = machine({command: Result(stdout="MISSING\n")}, root=True, monkeypatch=monkeypatch)
    assert local.read_file("/nope") is None


def test_local_install_for_real(tmp_path) -> None:
    """The real local backend installs, reports changed, then unchanged."""
    local = LocalMachine(LOCAL)
    if not local.is_root:
        pytest.skip("the local backend test installs files with chown, which needs root")
    target = str(tmp_path / "sub" / "f.conf")
    assert local.install_file(target, b"one\n", mode=0o640) is True
    assert local.install_file(target, b"one\n", mode=0o640) is False
    assert oct(os.stat(target).st_mode & 0o777) == "0o640"
    assert local.read_file(target) == b"one\n"
    assert local.install_file(target, b"two\n", mode=0o640) is True
    assert Path(target).read_text() == "two\n"
    assert not any(p.name.endswith(".difyops-new") for p in (tmp_path / "sub").iterdir())


def test_ssh_hosts_get_the_ssh_backend() -> None:
    remote = connect(Host(name="r", address="10.1.1.1", ssh=Ssh(user="deploy")),
                     {"connect": 3, "command": 60})
    assert type(remote).__name__ == "SshMachine"
    assert remote.is_root is False
    assert remote.connect_timeout == 3


def test_a_file_whose_state_cannot_be_read_is_an_error_not_missing(monkeypatch) -> None:
    probe = ("sudo -n sh -c 'if [ -f /etc/a.conf ]; then stat -c '\"'\"'%a %U %G'\"'\"' "
             "/etc/a.conf && sha256sum /etc/a.conf; else echo MISSING; fi'")
    local = machine({probe: Result(exited=1, stderr="sudo: a password is required")},
                    root=False, monkeypatch=monkeypatch)
    with pytest.raises(HostError, match=r"cannot read the state of /etc/a\.conf: .*password"):
        local.file_state("/etc/a.conf")
