"""X.509 pieces of a fleet's broker credentials: EC P-256 keys, the CA, leaf certificates, the CRL, key files."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.agent.core.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

CA_DAYS = 3650
LEAF_DAYS = 1825


def utc_now() -> datetime:
    """Now in UTC, to the second (certificates and the state file carry whole seconds)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def iso_time(moment: datetime) -> str:
    """`moment` as an ISO-8601 UTC timestamp (`2026-01-31T12:00:00Z`)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def write_secret(path: Path, data: bytes) -> None:
    """Write a private file: created 0600 (mkstemp) and renamed into place, never readable by others."""
    atomic_write_bytes(path, data, mode=0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (certificate, CRL, ACL): 0644, renamed into place."""
    atomic_write_bytes(path, data, mode=0o644)


def private_dir(path: Path) -> None:
    """A folder that holds private keys: 0700."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def new_key() -> EllipticCurvePrivateKey:
    """A new EC P-256 private key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: EllipticCurvePrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM (written 0600 by the caller)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def x509_name(common_name: str, fleet: str) -> x509.Name:
    """The subject of an edgefleet certificate: O=edgefleet, OU=the fleet, CN=the identity."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, fleet),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(fleet: str, days: int, label: str = "CA") -> tuple[EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed CA for `fleet`, valid `days` days (from five minutes ago); `label` ends its CN."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = new_key()
    # Distinct subjects ("... CA", "... host CA"): OpenSSL looks issuers up by name.
    name = x509_name(f"edgefleet {fleet} {label}", fleet)
    start = utc_now() - timedelta(minutes=5)  # tolerate a device clock a little behind
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_cert(
    ca_key: EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    fleet: str,
    *,
    server_names: Sequence[str] = (),
    days: int = LEAF_DAYS,
) -> tuple[EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate: a client one (CN = identity), or a server one with SANs when `server_names`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = new_key()
    start = utc_now() - timedelta(minutes=5)
    # A leaf must not outlive its CA: OpenSSL would refuse the chain after the CA expires anyway.
    end = min(start + timedelta(days=days), ca_cert.not_valid_after_utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509_name(common_name, fleet))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([san(n) for n in server_names]), critical=False
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def san(name: str) -> x509.GeneralName:
    """A subject alternative name: an IP address when `name` parses as one, else a DNS name."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_crl(
    ca_key: EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: Iterable[tuple[int, datetime]],
    number: int,
) -> bytes:
    """The CRL in PEM, valid until the CA expires.

    OpenSSL refuses every client once a CRL's nextUpdate has passed, so it is set to the CA's own end
    of validity: revocations still take effect as soon as the CRL is re-issued and the broker reloads it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    now = utc_now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - timedelta(minutes=5))
        .next_update(ca_cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for serial, when in sorted(revoked):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
