"""Tests of the lab itself: container hosts that behave like SSH servers."""

from __future__ import annotations

import os
import socket

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.integration.lab import Lab, LabHost

pytestmark = pytest.mark.docker


def test_three_hosts_come_up(ssh_hosts: list[LabHost], lab: Lab) -> None:
    """h1 h2 h3 run, each with its own address on the lab network and its name as hostname."""
    assert [h.name for h in ssh_hosts] == ["h1", "h2", "h3"]
    assert len({h.address for h in ssh_hosts}) == 3
    for host in ssh_hosts:
        code, out = host.exec("hostname")
        assert (code, out.strip()) == (0, host.name)
        networks = host.container.get_wrapped_container().attrs["NetworkSettings"]["Networks"]
        assert list(networks) == [lab.network_name]


def test_exec_gives_the_command_s_own_status_and_output(ssh_hosts: list[LabHost]) -> None:
    host = ssh_hosts[0]
    assert host.exec("printf 'no newline'; exit 3") == (3, "no newline")
    # stdout and stderr come back as two streams: each line whole, in no fixed order between them
    code, both = host.exec("echo \"it's\"; echo err >&2")
    assert (code, sorted(both.splitlines(keepends=True))) == (0, ["err\n", "it's\n"])
    assert host.exec("cat <<'EOF'\n$HOME stays\nEOF") == (0, "$HOME stays\n")
    assert host.exec("id -un", user="deploy") == (0, "deploy\n")


def test_fabric_as_root_sees_systemd(ssh_hosts: list[LabHost]) -> None:
    """Over SSH as root, systemd reports the system as up."""
    with ssh_hosts[0].fabric() as conn:
        result = conn.run("systemctl is-system-running", hide=True, warn=True)
        assert result.stdout.strip() in ("running", "degraded"), result.stdout
        assert conn.run("id -un", hide=True).stdout.strip() == "root"
        assert conn.run("systemctl is-active ssh", hide=True).stdout.strip() == "active"


def test_deploy_user_has_passwordless_sudo(ssh_hosts: list[LabHost]) -> None:
    """The deploy user logs in with the same key and can sudo without a password."""
    with ssh_hosts[1].fabric(user="deploy") as conn:
        assert conn.run("id -un", hide=True).stdout.strip() == "deploy"
        assert conn.run("sudo -n true", hide=True, warn=True).ok
        assert conn.run("sudo -n id -u", hide=True).stdout.strip() == "0"


def test_password_login_is_refused(ssh_hosts: list[LabHost]) -> None:
    """sshd offers public keys only."""
    code, out = ssh_hosts[0].exec("sshd -T | grep -E '^(passwordauthentication|permitrootlogin) '")
    assert code == 0
    assert "passwordauthentication no" in out
    assert "permitrootlogin without-password" in out


def test_hosts_reach_each_other_by_address(ssh_hosts: list[LabHost]) -> None:
    """h1 opens a TCP connection to h2's port 22 and reads the SSH banner."""
    h1, h2 = ssh_hosts[0], ssh_hosts[1]
    code, out = h1.exec(f"timeout 5 bash -c 'exec 3<>/dev/tcp/{h2.address}/22 && head -c 8 <&3'")
    assert code == 0, out
    assert out.startswith("SSH-2.0-")


def test_apt_sources_are_usable(ssh_hosts: list[LabHost]) -> None:
    """The host's apt knows where to get server packages (sources only, no download)."""
    code, out = ssh_hosts[2].exec("apt-cache policy postgresql-15 redis-server nginx")
    assert code == 0, out
    assert "Candidate: (none)" not in out


def test_hardened_units_start(ssh_hosts: list[LabHost]) -> None:
    """A unit with the sandboxing of packaged services (redis-server's) starts as on a server."""
    unit = "\n".join(
        [
            "[Service]",
            "Type=oneshot",
            "User=nobody",
            "PrivateUsers=yes",
            "PrivateTmp=yes",
            "ProtectSystem=strict",
            "ProtectProc=invisible",
            "NoNewPrivileges=yes",
            "ExecStart=/bin/true",
        ]
    )
    host = ssh_hosts[2]
    code, out = host.exec(
        f"printf '%s\\n' '{unit}' > /etc/systemd/system/lab-hardened.service"
        " && systemctl daemon-reload && systemctl start lab-hardened.service"
    )
    assert code == 0, out


def test_inventory_entry_shape(ssh_hosts: list[LabHost]) -> None:
    """inventory_entry() describes the host the way the engine's inventory expects."""
    host = ssh_hosts[0]
    entry = host.inventory_entry(["db"], user="deploy")
    assert entry == {
        "name": "h1",
        "address": host.address,
        "connection": "ssh",
        "ssh": {"user": "deploy", "port": 22, "key": str(host.key_file)},
        "roles": ["db"],
    }
    assert host.key_file.stat().st_mode & 0o077 == 0


def test_stop_then_start(lab: Lab) -> None:
    """stop() makes SSH fail; start() brings the host back (on a host of its own)."""
    (host,) = lab.start(["fault1"])
    assert host.ssh_ok()
    host.stop()
    assert not host.ssh_ok(timeout=2)
    with pytest.raises(OSError), socket.create_connection((host.address, 22), timeout=2):
        pass
    host.start()
    assert host.ssh_ok()
    with host.fabric() as conn:
        assert conn.run("hostname", hide=True).stdout.strip() == "fault1"


def test_host_keys_are_checked_and_a_stale_line_is_rewritten(ssh_hosts: list[LabHost],
                                                            lab: Lab) -> None:
    """The lab's helpers trust the keys it recorded only; recording a host again replaces
    whatever its address had (a removed container that had the address before)."""
    host = ssh_hosts[2]
    mine = {f"{host.address} {key}" for key in host.host_keys()}
    others = [line for line in lab.known_hosts.read_text().splitlines()
              if not line.startswith(f"{host.address} ")]
    assert set(lab.known_hosts.read_text().splitlines()) == mine | set(others)
    assert os.environ["DIFY_KNOWN_HOSTS"] == str(lab.known_hosts)
    stranger = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    lab.known_hosts.write_text("".join(f"{line}\n" for line in
                                       [*others, f"{host.address} {stranger}"]))
    assert not host.ssh_ok()  # another key recorded for its address: refused
    host.record_host_key()
    assert set(lab.known_hosts.read_text().splitlines()) == mine | set(others)
    assert host.ssh_ok()
