"""Host keys on real SSH hosts: `inv hosts.trust` records new hosts once, and a host whose key
changed is refused before anything runs on it or is sent to it."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
import yaml

from tasks.core.hostkeys import KNOWN_HOSTS_ENV, fingerprint
from tests.integration.lab import Lab, LabHost
from tests.integration.support import release

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]
NEW_KEYS = "rm -f /etc/ssh/ssh_host_* && ssh-keygen -A && systemctl restart ssh"


@pytest.fixture(scope="module")
def pair(lab: Lab) -> Iterator[tuple[LabHost, LabHost]]:
    """Two hosts of this module's own: one of them gets new host keys."""
    first, second = lab.start(["keys1", "keys2"])
    yield first, second
    release(lab, {"keys1": first, "keys2": second})


class Operator:
    """`inv` on an inventory of the pair, as an operator runs it."""

    def __init__(self, pair: tuple[LabHost, LabHost], folder: Path, **env: str) -> None:
        first, second = pair
        inventory = {"name": "keys-lab", "cache": {"mode": "standalone"},
                     "vector": {"store": "pgvector"},
                     "net": {"firewall": "off"},
                     "hosts": [first.inventory_entry(["db_primary", "cache"]),
                               second.inventory_entry(["dev_backend"], user="deploy")]}
        path = folder / "keys-lab.yml"
        path.write_text(yaml.safe_dump(inventory))
        self.env = {**os.environ, "DIFY_INVENTORY": str(path),
                    "DIFY_SECRETS": str(folder / "keys-lab.env"), **env}

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                                capture_output=True, env=self.env, timeout=600, check=False)
        result.output = result.stdout + result.stderr
        return result


def offered(host: LabHost) -> set[str]:
    """`type SHA256:...` of every host key the host has now (read from its files)."""
    found = set()
    for line in host.host_keys():
        kind, data = line.split()
        key = paramiko.PKey.from_type_string(kind, base64.b64decode(data))
        found.add(f"{key.get_name()} {fingerprint(key)}")
    return found


def logins(host: LabHost) -> int:
    """How many SSH logins sshd has accepted on the host so far."""
    code, out = host.exec("journalctl -u ssh.service -o cat --no-pager "
                          "| grep -c 'Accepted publickey' || true")
    assert code == 0, out
    return int(out.strip().splitlines()[-1])


def test_trust_records_new_hosts_once(pair: tuple[LabHost, LabHost], tmp_path: Path) -> None:
    first, second = pair
    known = tmp_path / "fresh.known_hosts"  # nothing recorded yet
    inv = Operator(pair, tmp_path, **{KNOWN_HOSTS_ENV: str(known)})
    assert inv("config.secrets").returncode == 0

    # Refused before any host is touched: no connection is even opened.
    refused = inv("cache.deploy", "--dry")
    assert refused.returncode == 1, refused.output
    assert f"keys1: no SSH host key recorded for {first.address}:22" in refused.output
    assert "run `inv hosts.trust --host keys1`" in refused.output
    assert "[cache]" not in refused.output

    dry = inv("hosts.trust", "--dry")
    assert dry.returncode == 0, dry.output
    assert dry.output.count("not recorded; would record (--dry)") == 2
    assert not known.exists()

    trusted = inv("hosts.trust")
    assert trusted.returncode == 0, trusted.output
    assert "Trust on first use" in trusted.output
    for host in pair:
        row = next(line for line in trusted.output.splitlines() if line.startswith(host.name))
        assert f"{host.address}:22" in row and "recorded now (trust on first use)" in row
        assert any(" ".join(key.split()) in " ".join(row.split()) for key in offered(host))
    lines = [line for line in known.read_text().splitlines() if not line.startswith("#")]
    assert {line.split()[0] for line in lines} == {first.address, second.address}
    assert all(f"{line.split()[1]} {line.split()[2]}" in (first.host_keys()
                                                            + second.host_keys())
               for line in lines)
    recorded = known.read_bytes()

    again = inv("hosts.trust")
    assert again.returncode == 0, again.output
    assert again.output.count("  already recorded\n") == 2  # one row per host
    assert "every key is already recorded: nothing to do" in again.output
    assert known.read_bytes() == recorded

    allowed = inv("cache.deploy", "--dry")
    assert allowed.returncode == 0, allowed.output


def test_a_changed_key_is_refused_before_anything_runs(pair: tuple[LabHost, LabHost],
                                                       tmp_path: Path) -> None:
    first, _ = pair
    inv = Operator(pair, tmp_path)  # the lab's own file: the keys it recorded at the start
    known = Path(os.environ[KNOWN_HOSTS_ENV])
    assert inv("config.secrets").returncode == 0
    before = logins(first)
    dry = inv("cache.deploy", "--dry")
    assert dry.returncode == 0, dry.output
    assert logins(first) > before  # the journal does count logins
    old = offered(first)

    code, out = first.exec(NEW_KEYS)  # reinstalled, or someone else answers at its address
    assert code == 0, out
    new = offered(first)
    assert not new & old
    before, recorded = logins(first), known.read_bytes()

    deploy = inv("cache.deploy")
    assert deploy.returncode == 1, deploy.output
    assert f"SSH HOST KEY CHANGED for keys1 (root@{first.address}:22): it offers " \
           in deploy.output
    assert any(f"it offers {key}, but" in deploy.output for key in new)
    assert any(f"records {key} for {first.address}" in deploy.output for key in old)
    assert "man-in-the-middle" in deploy.output
    assert f"ssh-keygen -R {first.address} -f " in deploy.output
    # Nothing reached the host: no login, no file of the deploy, no upload, no marker.
    assert logins(first) == before
    code, out = first.exec("ls /etc/redis/redis.conf /var/lib/difyops /tmp/difyops.* 2>&1")
    assert code != 0 and out.count("No such file or directory") == 3, out

    trust = inv("hosts.trust", "--host", "keys1")
    assert trust.returncode == 1, trust.output
    assert "REFUSED: differs from the recorded key" in trust.output
    assert "the recorded key is never replaced" in trust.output
    assert known.read_bytes() == recorded
    assert not first.ssh_ok()  # the lab's own helpers refuse it too

    first.record_host_key()  # the lab knows the host was given new keys
    assert first.ssh_ok()
