"""dev.info: connection details for the development machines, secrets only when asked."""

from __future__ import annotations

import pytest
from invoke import Context
from invoke.exceptions import Exit

from tasks import dev

HOMELAB = {
    "name": "lab",
    "cache": {"mode": "standalone"},
    "dev": {"network": "192.168.1.0/24"},
    "net": {"management": ["192.168.1.0/24"]},
    "hosts": [
        {"name": "home-server", "address": "192.168.1.100",
         "roles": ["dev_server", "db_primary", "cache", "vector", "monitor"]},
        {"name": "ubuntu-vm", "address": "192.168.1.101", "roles": ["dev_backend"]},
        {"name": "windows", "address": "192.168.1.102", "roles": ["dev_frontend"]},
    ],
}


def test_info_hides_secrets_unless_asked(write_inventory, monkeypatch, capsys) -> None:
    from tests.unit.conftest import good_secrets

    monkeypatch.setenv("DIFY_INVENTORY", str(write_inventory(HOMELAB)))
    dev.info(Context())
    hidden = capsys.readouterr().out
    assert "192.168.1.100:5432" in hidden and "http://192.168.1.101:5001" in hidden
    assert "password DB_PASSWORD in " in hidden
    assert good_secrets()["DB_PASSWORD"] not in hidden
    dev.info(Context(), secrets=True)
    assert f"password {good_secrets()['DB_PASSWORD']}" in capsys.readouterr().out


def test_info_refuses_an_inventory_without_dev_machines(write_inventory, base,
                                                        monkeypatch) -> None:
    monkeypatch.setenv("DIFY_INVENTORY", str(write_inventory(base)))
    with pytest.raises(Exit, match="has no dev_backend or dev_frontend host"):
        dev.info(Context())
