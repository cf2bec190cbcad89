"""Host keys: which known_hosts file, what is in it, how a connection refuses a key, and what
`inv hosts.trust` decides. No SSH server: the policy, the files and the messages."""

from __future__ import annotations

import base64
import stat
from pathlib import Path
from typing import Any

import paramiko
import pytest
from paramiko.ssh_exception import BadHostKeyException

from tasks.core import hostkeys, trust
from tasks.core.errors import HostError, InputError
from tasks.core.hosts import SshMachine, connect, ssh_connection
from tasks.core.inventory import Host, Ssh
from tasks.core.project import ROOT

# Keys made with ssh-keygen, with the fingerprints `ssh-keygen -lf` printed for them.
ED1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAo6VZZVhUzjPPgByzIKNlLNS79EZMSXQl1J7DYZIU4Z"
ED1_FP = "SHA256:wvAdZqIMhk2hGPPpcA4Emw4QY6fJZRaUf6vanzfmhmw"
ED2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAjdMoL9Je2eEdOHBRzv7HGjtl1R0+JP5IAu3hLM77zk"
ED2_FP = "SHA256:GdKPps4iuw8owXEzSPfWQb6IC0fvTIJQ72/PurwG7cE"
EC1 = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBP96sYzMSvbVZ"
       "grlqZ54Y8J0vzDPmMYHd4eRus5DpKqPMdVsnYpXY2kiMiUeFDlpH7LqNJlh92hYfJa3VMIkt3Y=")
EC1_FP = "SHA256:R28nxXguc/CIR6lDQj2naXeyorrqmyJ/J/eLikT+T0o"


def key(line: str) -> paramiko.PKey:
    kind, data = line.split()
    return paramiko.PKey.from_type_string(kind, base64.b64decode(data))


def host(name: str = "api1", address: str = "10.0.2.21", port: int = 22,
         known_hosts: Path | str = "") -> Host:
    return Host(name=name, address=address, roles=("api",),
                ssh=Ssh(user="deploy", port=port, known_hosts=str(known_hosts)))


@pytest.fixture(autouse=True)
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests choose the file themselves: no DIFY_KNOWN_HOSTS from the environment."""
    monkeypatch.delenv(hostkeys.KNOWN_HOSTS_ENV, raising=False)


# --- which file ------------------------------------------------------------------------------

def test_the_file_lives_beside_the_inventory_by_default(tmp_path: Path) -> None:
    inventory = tmp_path / "prod.yml"
    assert hostkeys.known_hosts_path(inventory) == tmp_path / "prod.known_hosts"


def test_the_setting_is_relative_to_the_project_and_the_environment_wins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inventory = tmp_path / "prod.yml"
    assert hostkeys.known_hosts_path(inventory, "keys/prod") == ROOT / "keys" / "prod"
    assert hostkeys.known_hosts_path(inventory, str(tmp_path / "k")) == tmp_path / "k"
    monkeypatch.setenv(hostkeys.KNOWN_HOSTS_ENV, str(tmp_path / "ci"))
    assert hostkeys.known_hosts_path(inventory, "keys/prod") == tmp_path / "ci"


def test_every_host_of_an_inventory_carries_its_file(load, base: dict[str, Any]) -> None:
    inventory = load(base)
    expected = inventory.file.with_suffix(".known_hosts")
    assert inventory.known_hosts == expected
    assert {h.ssh.known_hosts for h in inventory.hosts} == {str(expected)}


def test_the_setting_is_part_of_the_schema(load, base: dict[str, Any], tmp_path: Path) -> None:
    base["ssh_known_hosts"] = str(tmp_path / "elsewhere")
    assert load(base).known_hosts == tmp_path / "elsewhere"
    base["ssh_known_hosts"] = 22
    with pytest.raises(InputError, match="ssh_known_hosts: must be a string"):
        load(base)


def test_a_malformed_file_fails_the_inventory_before_any_host(load, base: dict[str, Any],
                                                            tmp_path: Path) -> None:
    (tmp_path / "inventory.known_hosts").write_text(
        f"# comment\n10.0.2.21 {ED1}\n10.0.2.22 ssh-ed25519 not-base64!\n"
        f"@cert-authority * {ED2}\ngarbage\n")
    with pytest.raises(InputError) as raised:
        load(base)
    text = str(raised.value)
    assert "inventory.known_hosts: line 3: unreadable ssh-ed25519 key" in text
    assert "line 4: markers such as @cert-authority are not supported" in text
    assert "line 5: not a known_hosts line" in text
    assert "line 2" not in text


def test_two_keys_of_one_type_for_one_host_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text(f"10.0.2.21 {ED1}\n10.0.2.21 {EC1}\n10.0.2.21,10.0.2.22 {ED2}\n")
    problems = hostkeys.check_file(path)
    assert [p.key for p in problems] == ["line 3"]
    assert "a second ssh-ed25519 key for 10.0.2.21 (line 1 records another one)" in str(
        problems[0])


def test_a_missing_file_records_nothing(tmp_path: Path) -> None:
    known = hostkeys.load(tmp_path / "none")
    assert known.entries == () and known.recorded("10.0.2.21") == {}


def test_plain_hashed_and_port_entries_are_found(tmp_path: Path) -> None:
    hashed = paramiko.HostKeys.hash_host("10.0.2.23")
    path = tmp_path / "k"
    path.write_text(f"10.0.2.21 {ED1}\n[10.0.2.22]:2222 {EC1}\n{hashed} {ED2}\n")
    known = hostkeys.load(path)
    assert known.recorded("10.0.2.21") == {"ssh-ed25519": key(ED1)}
    assert known.recorded(hostkeys.lookup_name("10.0.2.22", 2222)) == {
        "ecdsa-sha2-nistp256": key(EC1)}
    assert known.recorded("10.0.2.22") == {}
    assert known.recorded("10.0.2.23") == {"ssh-ed25519": key(ED2)}


def test_fingerprints_are_the_ones_openssh_prints() -> None:
    assert hostkeys.fingerprint(key(ED1)) == ED1_FP
    assert hostkeys.describe(key(EC1)) == f"ecdsa-sha2-nistp256 {EC1_FP}"


# --- the connection --------------------------------------------------------------------------

def test_the_client_knows_that_file_only_and_rejects_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text(f"10.0.2.21 {ED1}\n")
    connection = ssh_connection(host(known_hosts=path), 5)
    client = connection.client
    assert client.get_host_keys().lookup("10.0.2.21") == {"ssh-ed25519": key(ED1)}
    assert len(client.get_host_keys()) == 1
    assert len(client._system_host_keys) == 0  # no ~/.ssh/known_hosts, no /etc/ssh
    policy = client._policy
    assert isinstance(policy, paramiko.RejectPolicy)
    assert not isinstance(policy, (paramiko.AutoAddPolicy, paramiko.WarningPolicy))


def test_an_unknown_key_is_refused_with_its_fingerprint_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "k"
    target = host(known_hosts=path)
    client = ssh_connection(target, 5).client
    with pytest.raises(hostkeys.HostKeyUnknown) as raised:
        client._policy.missing_host_key(client, "10.0.2.21", key(ED1))
    text = str(raised.value)
    assert "unknown SSH host key: api1 (deploy@10.0.2.21:22) offers ssh-ed25519 " + ED1_FP in text
    assert "records no key for 10.0.2.21. Nothing was run or sent." in text
    assert "run `inv hosts.trust --host api1` after checking the fingerprint" in text
    assert "/etc/ssh/ssh_host_ed25519_key.pub" in text
    assert not path.exists()  # nothing was added


def test_a_changed_key_is_refused_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """paramiko's BadHostKeyException during open() becomes the operator's message; the
    connection is not kept."""
    path = tmp_path / "k"
    path.write_text(f"[10.0.2.21]:2222 {ED1}\n")
    target = host(port=2222, known_hosts=path)
    seen: list[paramiko.SSHClient] = []

    def open_(self) -> None:
        seen.append(self.client)
        raise BadHostKeyException("10.0.2.21", key(ED2), key(ED1))

    monkeypatch.setattr("fabric.Connection.open", open_)
    machine = connect(target, {"connect": 3, "command": 60})
    with pytest.raises(hostkeys.HostKeyChanged) as raised:
        machine.run("touch /etc/should-not-exist")
    text = str(raised.value)
    assert text.startswith("SSH HOST KEY CHANGED for api1 (deploy@10.0.2.21:2222): it offers "
                           f"ssh-ed25519 {ED2_FP}, but ")
    assert f"records ssh-ed25519 {ED1_FP} for [10.0.2.21]:2222" in text
    assert "(man-in-the-middle); nothing was run or sent" in text
    assert f"ssh-keygen -R '[10.0.2.21]:2222' -f {path}" in text
    assert "`inv hosts.trust --host api1`" in text
    assert seen and seen[0].get_host_keys().lookup("[10.0.2.21]:2222") is not None
    assert machine._connection is None


def test_an_unknown_key_stops_the_connection(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def open_(self) -> None:
        self.client._policy.missing_host_key(self.client, "10.0.2.21", key(ED1))

    monkeypatch.setattr("fabric.Connection.open", open_)
    machine = SshMachine(host(known_hosts=tmp_path / "k"))
    with pytest.raises(hostkeys.HostKeyUnknown, match=r"inv hosts\.trust --host api1"):
        machine.run("true")
    assert machine._connection is None


def test_a_host_without_a_known_hosts_file_is_never_connected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fabric.Connection.open", lambda self: pytest.fail("connected"))
    with pytest.raises(HostError, match="no known_hosts file to check its SSH host key"):
        SshMachine(host()).run("true")


def test_the_environment_names_the_file_of_hosts_built_by_hand(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hostkeys.KNOWN_HOSTS_ENV, str(tmp_path / "k"))
    (tmp_path / "k").write_text(f"10.0.2.21 {ED1}\n")
    assert hostkeys.file_for(host()) == tmp_path / "k"
    assert len(ssh_connection(host(), 5).client.get_host_keys()) == 1


# --- trust -----------------------------------------------------------------------------------

def test_decisions() -> None:
    assert trust.decide({}, key(ED1)) == trust.NEW
    assert trust.decide({"ssh-ed25519": key(ED1)}, key(ED1)) == trust.KNOWN
    assert trust.decide({"ssh-ed25519": key(ED1)}, key(ED2)) == trust.DIFFERS
    # Another type than the recorded one: a connection would refuse it as changed.
    assert trust.decide({"ssh-ed25519": key(ED1)}, key(EC1)) == trust.DIFFERS
    assert trust.decide({"ssh-ed25519": key(ED1), "ecdsa-sha2-nistp256": key(EC1)},
                        key(EC1)) == trust.KNOWN


def offering(keys: dict[str, str], asked: list[str] | None = None) -> trust.Probe:
    """A probe answering with the key of each host name (a host missing: unreachable)."""

    def probe(target: Host) -> trust.Offer:
        if asked is not None:
            asked.append(target.name)
        if target.name not in keys:
            raise HostError(f"cannot connect to {target.target}: timed out")
        return trust.Offer(hostkeys.lookup_name(target.address, target.ssh.port),
                           key(keys[target.name]))

    return probe


def test_trust_records_new_keys_once_and_skips_local_hosts(tmp_path: Path) -> None:
    path = tmp_path / "inv.known_hosts"
    hosts = [Host(name="here", address="127.0.0.1", connection="local"),
             host("api1", "10.0.2.21"), host("api2", "10.0.2.22", port=2222)]
    asked: list[str] = []
    probe = offering({"api1": ED1, "api2": EC1}, asked)
    first = trust.trust(hosts, path, probe=probe)
    assert [(r.host.name, r.status) for r in first] == [
        ("here", trust.SKIPPED), ("api1", trust.RECORDED), ("api2", trust.RECORDED)]
    assert sorted(asked) == ["api1", "api2"]  # the local host is never asked
    text = path.read_text()
    assert text.startswith(hostkeys.HEADER)
    assert text.endswith(f"10.0.2.21 {ED1}\n[10.0.2.22]:2222 {EC1}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    second = trust.trust(hosts, path, probe=probe)
    assert [r.status for r in second] == [trust.SKIPPED, trust.KNOWN, trust.KNOWN]
    assert path.read_text() == text
    assert not list(tmp_path.glob(".*difyops-new"))


def test_trust_never_replaces_a_recorded_key(tmp_path: Path) -> None:
    path = tmp_path / "inv.known_hosts"
    path.write_text(f"10.0.2.21 {ED1}\n")
    rows = trust.trust([host("api1", "10.0.2.21"), host("api2", "10.0.2.22")], path,
                       probe=offering({"api1": ED2, "api2": EC1}))
    refused, recorded = rows
    assert (refused.status, refused.failed) == (trust.DIFFERS, True)
    assert recorded.status == trust.RECORDED  # the other host is still recorded
    assert f"records ssh-ed25519 {ED1_FP} for 10.0.2.21, the host now offers ssh-ed25519 " \
           f"{ED2_FP}; the recorded key is never replaced" in refused.detail
    assert f"ssh-keygen -R 10.0.2.21 -f {path}" in refused.detail
    assert "man-in-the-middle" in refused.detail
    assert path.read_text() == f"10.0.2.21 {ED1}\n10.0.2.22 {EC1}\n"


def test_dry_trust_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "inv.known_hosts"
    rows = trust.trust([host()], path, probe=offering({"api1": ED1}), dry=True)
    assert [(r.status, hostkeys.fingerprint(r.key)) for r in rows] == [
        (trust.WOULD_RECORD, ED1_FP)]
    assert not path.exists()


def test_an_unreachable_host_is_reported_and_the_others_recorded(tmp_path: Path) -> None:
    path = tmp_path / "inv.known_hosts"
    rows = trust.trust([host("api1", "10.0.2.21"), host("api2", "10.0.2.22")], path,
                       probe=offering({"api2": ED2}))
    assert [(r.status, r.failed) for r in rows] == [(trust.UNREACHABLE, True),
                                                   (trust.RECORDED, False)]
    assert "cannot connect to api1 (deploy@10.0.2.21:22): timed out" in rows[0].detail
    assert path.read_text().endswith(f"10.0.2.22 {ED2}\n")


def test_trust_stops_on_a_malformed_file_before_asking_any_host(tmp_path: Path) -> None:
    path = tmp_path / "inv.known_hosts"
    path.write_text("nonsense\n")
    asked: list[str] = []
    with pytest.raises(InputError, match="line 1: not a known_hosts line"):
        trust.trust([host()], path, probe=offering({"api1": ED1}, asked))
    assert asked == []


# --- everything else that reaches hosts over SSH ----------------------------------------------

def test_scheduled_runs_check_keys_against_the_same_file(load, base: dict[str, Any]) -> None:
    """The backup and doctor schedules run `inv` later, maybe without DIFY_KNOWN_HOSTS: they
    name the file the inventory used when they were installed."""
    from tasks.backups import schedule
    from tasks.core import doctor_schedule
    from tasks.core.render import Renderer
    from tasks.core.schedule import CONTROL

    inventory = load(base)
    assert doctor_schedule.environment(inventory)["DIFY_KNOWN_HOSTS"] == str(
        inventory.known_hosts)
    steps = schedule.steps(inventory, Renderer(inventory), CONTROL, cron=False)
    wrapper = next(s for s in steps if getattr(s, "path", "").endswith("difyops-backup-unit"))
    assert f"    export DIFY_KNOWN_HOSTS={inventory.known_hosts}\n    exec " in wrapper.content


def test_the_backup_copy_host_is_checked_and_trusted_like_the_others(
        load, base: dict[str, Any]) -> None:
    from tasks.backups import copy
    from tasks.hosts import targets

    base["backup"] = {"copy": {"type": "ssh", "address": "10.0.9.9", "path": "/srv/copies"}}
    inventory = load(base)
    (copy_host,) = copy.ssh_hosts(inventory)
    assert (copy_host.name, copy_host.ssh.known_hosts) == ("backup-copy",
                                                           str(inventory.known_hosts))
    assert [h.name for h in targets(inventory, "backup-copy")] == ["backup-copy"]
    assert len(targets(inventory, "")) == len(inventory.hosts) + 1
    with pytest.raises(InputError, match="no host named 'nope'"):
        targets(inventory, "nope")
    base["backup"] = {}
    assert copy.ssh_hosts(load(base)) == []


def test_the_fix_names_where_the_host_keeps_its_key() -> None:
    windows = Host(name="ws", address="192.168.1.102", labels={"os": "windows"})
    assert hostkeys.public_key_file(windows, key(ED1)) == \
        "C:\\ProgramData\\ssh\\ssh_host_ed25519_key.pub"
    assert hostkeys.public_key_file(host(), key(EC1)) == "/etc/ssh/ssh_host_ecdsa_key.pub"


def test_a_deploy_refuses_hosts_without_a_recorded_key_before_touching_any(
        write_inventory, base: dict[str, Any], monkeypatch) -> None:
    from invoke import Context

    from tasks.core import cli
    from tasks.tiers import cache

    path = write_inventory(base)
    known_hosts = path.with_suffix(".known_hosts")
    known_hosts.write_text("".join(line + "\n" for line in known_hosts.read_text().splitlines()
                                   if not line.startswith("10.0.3.12 ")))
    monkeypatch.setenv("DIFY_INVENTORY", str(path))
    monkeypatch.setattr(cli, "execute", lambda *a, **k: pytest.fail("a host was touched"))
    with pytest.raises(InputError) as refused:
        cli.run_tiers(Context(), [cache.TIER], dry=True)
    assert "db2: no SSH host key recorded for 10.0.3.12:22" in str(refused.value)
    assert "inv hosts.trust --host db2" in str(refused.value)


def test_a_port_that_accepts_but_never_speaks_ssh_is_named_as_such(tmp_path: Path) -> None:
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    known = tmp_path / "known_hosts"
    known.write_text("")
    silent = host("quiet", "127.0.0.1", listener.getsockname()[1], known)
    try:
        with pytest.raises(HostError) as caught:
            trust.offered_key(silent, connect_timeout=1)
    finally:
        for each in (*accepted, listener):
            each.close()
    assert str(caught.value) == (
        f"cannot connect to {silent.target}: no SSH greeting within 1 s: the port accepts "
        "connections but is not answering as an SSH server")
