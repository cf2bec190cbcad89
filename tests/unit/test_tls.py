"""The private CA (tasks/core/tls.py): certificates the same on every render, renewed by period,
verified by the real openssl against the names clients dial; the db tier's files and settings."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tasks.core import tls
from tasks.core.plan import WriteFile
from tasks.tiers.db import TIER

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)
NAMES = ("10.0.3.11", "db1", "localhost", "127.0.0.1", "::1")


def verify(tmp_path: Path, ca: str, certificate: str, *options: str) -> subprocess.CompletedProcess:
    (tmp_path / "ca.crt").write_text(ca)
    (tmp_path / "server.crt").write_text(certificate)
    return subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), *options,
                           str(tmp_path / "server.crt")], capture_output=True, text=True,
                          check=False)


def test_the_same_secret_gives_the_same_bytes_within_a_period() -> None:
    first = tls.server("secret", "prod", "db1", NAMES, NOW)
    assert tls.server("secret", "prod", "db1", NAMES, NOW + timedelta(days=1)) == first
    assert tls.authority("secret", "prod") == tls.authority("secret", "prod")
    assert tls.server("other", "prod", "db1", NAMES, NOW) != first
    assert tls.server("secret", "prod", "db1", ("10.0.3.12", *NAMES[1:]), NOW) != first


def test_a_new_period_renews_with_a_period_to_spare() -> None:
    start = tls.period_start(NOW)
    old = tls.server("secret", "prod", "db1", NAMES, start + tls.RENEWAL - timedelta(seconds=1))
    new = tls.server("secret", "prod", "db1", NAMES, start + tls.RENEWAL)
    assert new.certificate != old.certificate and new.key != old.key
    for moment in (start, start + tls.RENEWAL - timedelta(seconds=1)):
        certificate = x509.load_pem_x509_certificate(
            tls.server("secret", "prod", "db1", NAMES, moment).certificate.encode())
        assert certificate.not_valid_before_utc <= moment
        assert certificate.not_valid_after_utc - moment >= tls.RENEWAL


def test_openssl_verifies_the_names_clients_dial_and_no_other(tmp_path: Path) -> None:
    ca = tls.authority("secret", "prod")
    issued = tls.server("secret", "prod", "db1", NAMES, datetime.now(UTC))
    assert verify(tmp_path, ca, issued.certificate, "-verify_ip", "10.0.3.11").returncode == 0
    assert verify(tmp_path, ca, issued.certificate, "-verify_hostname", "db1").returncode == 0
    assert verify(tmp_path, ca, issued.certificate, "-verify_ip", "10.0.3.12").returncode != 0
    other_ca = tls.authority("another installation's secret", "prod")
    assert verify(tmp_path, other_ca, issued.certificate).returncode != 0
    key = subprocess.run(["openssl", "pkey", "-pubout"], input=issued.key, capture_output=True,
                         text=True, check=True).stdout
    shown = subprocess.run(["openssl", "x509", "-pubkey", "-noout"], input=issued.certificate,
                           capture_output=True, text=True, check=True).stdout
    assert key == shown  # the key is the certificate's


def test_the_db_tier_serves_tls_to_other_hosts(load, base) -> None:
    inventory = load(base)
    plans = {plan.host.name: plan for plan in TIER.plan(inventory).hosts}
    files = {step.path: step for step in plans["db1"].steps if isinstance(step, WriteFile)}
    folder = "/etc/postgresql/difyops-tls"
    key = files[f"{folder}/server.key"]
    assert (key.mode, key.owner, key.secret) == (0o600, "postgres", True)
    assert files[f"{folder}/ca.crt"].content == tls.authority(
        inventory.secrets["INTERNAL_CA_KEY"], inventory.name)
    certificate = x509.load_pem_x509_certificate(files[f"{folder}/server.crt"].content.encode())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "db1" in names.get_values_for_type(x509.DNSName)
    assert next(str(ip) for ip in names.get_values_for_type(x509.IPAddress)) == \
        inventory.host("db1").address
    conf = files["/etc/postgresql/15/main/conf.d/difyops.conf"].content
    assert f"ssl_cert_file = '{folder}/server.crt'" in conf and "ssl = on" in conf


def test_without_internal_tls_nothing_changes(load, base) -> None:
    base["tls"] = {"internal": False}
    inventory = load(base)
    steps = [s for plan in TIER.plan(inventory).hosts for s in plan.steps]
    assert not any("difyops-tls" in getattr(s, "path", "") for s in steps)
    files = {s.path: s.content for s in steps if isinstance(s, WriteFile)}
    assert "hostssl" not in files["/etc/postgresql/15/main/pg_hba.conf"]
    assert "sslmode" not in files["/etc/postgresql/15/main/conf.d/difyops-upstream.conf"]


@pytest.mark.parametrize("internal", [True, False])
def test_the_ca_secret_is_needed_only_with_internal_tls(load, base, internal: bool) -> None:
    from tasks.core.secrets import needed

    base["tls"] = {"internal": internal}
    assert ("INTERNAL_CA_KEY" in {spec.name for spec in needed(load(base))}) is internal


def test_dify_verifies_postgresql_and_the_daemon_checks_the_chain(load, base) -> None:
    from tasks.tiers.app import TIER as APP

    inventory = load(base)
    plans = {plan.host.name: plan for plan in APP.plan(inventory).hosts}

    def files(name: str) -> dict[str, str]:
        return {s.path: s.content for s in plans[name].steps if isinstance(s, WriteFile)}

    ca = tls.authority(inventory.secrets["INTERNAL_CA_KEY"], inventory.name)
    mount = f"/opt/dify/tls/ca.crt:{tls.CONTAINER_CA}:ro"
    for name in ("api1", "worker1"):
        assert files(name)["/opt/dify/tls/ca.crt"] == ca
        env = dict(line.split("=", 1) for line in files(name)["/opt/dify/.env"].splitlines()
                   if line and not line.startswith("#"))
        assert (env["PGSSLMODE"], env["PGSSLROOTCERT"]) == ("verify-full", tls.CONTAINER_CA)
        services = yaml.safe_load(files(name)["/opt/dify/compose.yml"])["services"]
        using_env = [s for s, spec in services.items() if spec.get("env_file") == [".env"]]
        assert using_env and all(mount in services[s]["volumes"] for s in using_env)
    daemon = yaml.safe_load(files("api1")["/opt/dify/compose.yml"])["services"]["plugin_daemon"]
    assert daemon["environment"]["DB_SSL_MODE"] == "require"  # its strongest mode
    assert mount in daemon["volumes"]
    migration = yaml.safe_load(files("api1")["/opt/dify/migration/compose.yml"])
    assert mount in migration["services"]["migration"]["volumes"]
    assert "/opt/dify/tls/ca.crt" not in files("web1")  # nothing there connects to PostgreSQL


def test_monitoring_sees_when_no_deploy_renewed_a_certificate(load, base, tmp_path) -> None:
    """PostgreSQL and Redis publish their certificate's expiry, each in a file of its own (db1
    serves both); the real promtool fires the alert for the one that expires within
    monitor.cert_days, naming the deploy that renews it, and not for the other."""
    from tasks.tiers import cache, monitor

    inventory = load(base)

    def written(tier, path: str) -> str:
        return next(s.content for plan in tier.plan(inventory).hosts if plan.host.name == "db1"
                    for s in plan.steps if isinstance(s, WriteFile) and s.path.endswith(path))

    expiry = x509.load_pem_x509_certificate(
        written(TIER, "/server.crt").encode()).not_valid_after_utc
    for tier, service, name in ((TIER, "postgresql", "db"), (cache.TIER, "redis", "cache")):
        assert written(tier, tls.expiry_path(service)).splitlines()[-1] == (
            f'difyops_tls_certificate_not_after_seconds{{service="{service}",tier="{name}"}} '
            f"{int(expiry.timestamp())}")
    assert written(cache.TIER, "/redis/tls/server.crt") == written(TIER, "/server.crt")
    rules = next(s.content for plan in monitor.TIER.plan(inventory).hosts
                 if plan.host.name == "monitor1" for s in plan.steps
                 if isinstance(s, WriteFile) and s.path.endswith("rules/dify.yml"))
    (tmp_path / "dify.yml").write_text(rules)
    days = 86400
    name = "difyops_tls_certificate_not_after_seconds"
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["dify.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [
            {"series": f'{name}{{service="redis",tier="cache",host="db1"}}',
             "values": f"{13 * days}x180"},
            {"series": f'{name}{{service="postgresql",tier="db",host="db1"}}',
             "values": f"{20 * days}x180"}],
            "alert_rule_test": [{"eval_time": "2h", "alertname": "InternalCertificateExpiring",
                                 "exp_alerts": [{"exp_labels": {
                                     "severity": "warning", "service": "redis", "tier": "cache",
                                     "host": "db1"}, "exp_annotations": {
                                     "summary": "The redis certificate of db1 expires soon",
                                     "description": "It expires in 12d 22h 0m 0s: no deploy has "
                                     "reached the host for months. Run `inv cache.deploy` (or "
                                     "`inv deploy.all`): it renews the certificates."}}]}]}]}))
    result = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
