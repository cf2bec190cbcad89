"""The installation's private certificate authority, for TLS on the links inside it.

Everything is derived from one secret, INTERNAL_CA_KEY (the secrets file, or the vault of
`secrets.source: command`), so nothing else needs keeping and a render is a pure function:
- the CA is an ECDSA P-256 key made from that secret, with a certificate that never changes;
- each host's key and certificate are made from the secret, the host's names and the current
  renewal period, signed deterministically (RFC 6979), so rendering twice gives the same bytes
  (a second deploy changes nothing), and a deploy in a new period renews every certificate.
Not Ed25519: libpq's SCRAM channel binding needs the certificate's signature digest, and an
Ed25519 certificate has none ("could not find digest for NID UNDEF").

A certificate is valid for two periods from the start of the one it was made in: whenever a
deploy runs, the certificates it leaves have at least one period (RENEWAL) to go.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tasks.core.inventory import Host, Inventory
from tasks.core.plan import WriteFile

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
RENEWAL = timedelta(days=90)  # a deploy in a new period of this length renews the certificates
CA_VALID_UNTIL = datetime(2124, 1, 1, tzinfo=UTC)
SKEW = timedelta(hours=1)  # valid a little before the period starts: clocks differ
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "server.crt", "server.key"  # in a server's folder
CONTAINER_CA = "/difyops-tls/ca.crt"  # the CA certificate mounted into containers
HOST_CA = "/etc/difyops/tls/ca.crt"  # the CA certificate for clients on a host (not in containers)
# Read by the node exporter's textfile collector: the InternalCertificateExpiring alert.
EXPIRY_FOLDER = "/var/lib/prometheus/node-exporter"


@dataclass(frozen=True)
class Issued:
    """A host's certificate (PEM) and private key (PEM, PKCS#8)."""

    certificate: str
    key: str


def derived_key(secret: str, purpose: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 key made from the secret for one purpose (HKDF-SHA256 to a scalar)."""
    material = HKDF(algorithm=SHA256(), length=48, salt=b"difyops internal tls",
                    info=purpose.encode()).derive(secret.encode())
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256's n
    return ec.derive_private_key(int.from_bytes(material, "big") % (order - 1) + 1,
                                 ec.SECP256R1())


def signed(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The certificate signed with ECDSA-SHA256, deterministically (the same bytes each time)."""
    return builder.sign(key, SHA256(), ecdsa_deterministic=True)


def serial(*parts: str) -> int:
    """A positive serial number below 2**159, the same for the same parts."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:19], "big") + 1


def ca_name(installation: str) -> x509.Name:
    """The CA's subject: the installation's name."""
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "difyops"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"difyops {installation} CA")])


def authority(secret: str, installation: str) -> str:
    """The CA certificate (PEM) that every client trusts."""
    key = derived_key(secret, "ca")
    name = ca_name(installation)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial("ca", installation))
        .not_valid_before(EPOCH).not_valid_after(CA_VALID_UNTIL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False))
    return signed(builder, key).public_bytes(serialization.Encoding.PEM).decode()


def period_start(now: datetime) -> datetime:
    """The start of the renewal period `now` falls in."""
    return EPOCH + RENEWAL * ((now - EPOCH) // RENEWAL)


def alternative_names(names: tuple[str, ...]) -> list[x509.GeneralName]:
    """Each name as an IP address entry or a DNS entry (what clients verify against)."""
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def server(secret: str, installation: str, host: str, names: tuple[str, ...],
           now: datetime | None = None) -> Issued:
    """The server certificate of a host for the names clients reach it by, for the period of
    `now` (default: this moment)."""
    start = period_start(now or datetime.now(UTC))
    purpose = "\0".join(("server", host, start.isoformat(), *names))
    key = derived_key(secret, purpose)
    ca_key = derived_key(secret, "ca")
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name(installation))
        .public_key(key.public_key())
        .serial_number(serial(purpose))
        .not_valid_before(start - SKEW).not_valid_after(start + 2 * RENEWAL)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alternative_names(names)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False))
    return Issued(signed(builder, ca_key).public_bytes(serialization.Encoding.PEM).decode(),
                  key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode())


def host_names(host: Host) -> tuple[str, ...]:
    """The names a host's certificate is valid for: its inventory address (what every client
    dials), its name, and loopback."""
    return tuple(dict.fromkeys((host.address, host.name, "localhost", "127.0.0.1", "::1")))


def host_certificate(inventory: Inventory, host: Host) -> Issued:
    """The host's certificate and key for this period (the same for every service on it)."""
    return server(inventory.secrets["INTERNAL_CA_KEY"], inventory.name, host.name,
                  host_names(host))


def server_files(inventory: Inventory, host: Host, directory: str, owner: str,
                 key_mode: int = 0o600) -> list[WriteFile]:
    """The CA certificate, the host's certificate and its key (`key_mode`, secret) in
    `directory`, readable by the service that serves TLS (`owner`, its group)."""
    issued = host_certificate(inventory, host)
    return [WriteFile(f"{directory}/{CA_FILE}",
                      authority(inventory.secrets["INTERNAL_CA_KEY"], inventory.name)),
            WriteFile(f"{directory}/{CERT_FILE}", issued.certificate, owner=owner, group=owner),
            WriteFile(f"{directory}/{KEY_FILE}", issued.key, mode=key_mode, owner=owner,
                      group=owner, secret=True)]


def expiry_path(service: str) -> str:
    """The textfile of one service's certificate expiry (one per service: a host may serve
    several)."""
    return f"{EXPIRY_FOLDER}/difyops_tls_{service}.prom"


def expiry_file(inventory: Inventory, host: Host, service: str, tier: str) -> WriteFile:
    """When the host's certificate expires, for monitoring: it only changes when the
    certificate is renewed, so a host no deploy reached for a period shows up in time. `tier`
    names the deploy that renews it (the alert's fix)."""
    issued = host_certificate(inventory, host)
    expiry = x509.load_pem_x509_certificate(issued.certificate.encode()).not_valid_after_utc
    return WriteFile(expiry_path(service), (
        "# HELP difyops_tls_certificate_not_after_seconds When the certificate of the "
        "installation's CA that a service presents expires.\n"
        "# TYPE difyops_tls_certificate_not_after_seconds gauge\n"
        f'difyops_tls_certificate_not_after_seconds{{service="{service}",tier="{tier}"}} '
        f"{int(expiry.timestamp())}\n"))


def service_files(inventory: Inventory, host: Host, *, directory: str, owner: str,
                  service: str, tier: str, key_mode: int = 0o600) -> list[WriteFile]:
    """What a TLS service needs on its host with tls.internal: its files in `directory` and,
    where something monitors, its certificate's expiry. Nothing without tls.internal."""
    if not inventory.settings.tls.internal:
        return []
    monitored = [expiry_file(inventory, host, service, tier)] if inventory.with_role("monitor") \
        else []
    return [*server_files(inventory, host, directory, owner, key_mode), *monitored]


def ca_files(inventory: Inventory, path: str) -> list[WriteFile]:
    """The CA certificate that clients verify servers with, at `path`, with tls.internal
    (nothing without it)."""
    if not inventory.settings.tls.internal:
        return []
    return [WriteFile(path, authority(inventory.secrets["INTERNAL_CA_KEY"], inventory.name))]
