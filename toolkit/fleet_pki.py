"""The fleet PKI, made with ``cryptography`` in memory: the fleet CA, the broker's server
certificate, each client's certificate (its common name is its MQTT user name), the CRL of
revoked ones, and reading them back. Files are written by
``edgeship.toolkit.identities.BrokerFolder``, which owns the broker folder; docs/security.md
says what each certificate is for.
"""

from __future__ import annotations

__all__ = [
    "build_crl",
    "certificate_fingerprint",
    "certificate_pem",
    "create_ca",
    "issue_client_certificate",
    "issue_server_certificate",
    "load_certificate",
    "load_private_key",
    "new_private_key",
    "private_key_pem",
    "server_names",
]

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeship.ota.errors import BadInputError
from edgeship.ota.topics import validate_identifier


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_private_key() -> ec.EllipticCurvePrivateKey:
    """An ECDSA P-256 key: small, fast on a Raspberry Pi, and supported by every TLS stack we meet."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, org: str = "edgeship") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(common_name: str = "edgeship fleet CA", *, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed fleet CA (key, certificate) that signs the server and every client."""
    key = new_private_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def server_names(extra: Sequence[str] = ()) -> list[str]:
    """The server certificate's names: localhost, 127.0.0.1 and ``extra``, without duplicates."""
    out: list[str] = []
    for n in ("localhost", "127.0.0.1", *extra):
        if n not in out:
            out.append(n)
    return out


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
          common_name: str, days: int, usage: x509.ObjectIdentifier, serial: int | None) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(serial or x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )


def issue_server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                             names: Sequence[str] = (), *, days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The broker's certificate, valid for localhost, 127.0.0.1 and ``names``."""
    key = new_private_key()
    alt: list[x509.GeneralName] = []
    for n in server_names(names):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    cert = (
        _leaf(ca_key, ca_cert, key, server_names(names)[-1] if names else "localhost", days,
              ExtendedKeyUsageOID.SERVER_AUTH, None)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def issue_client_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
                             *, days: int = 3650, serial: int | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A client certificate whose CN (a device id, or the controller's name) is its MQTT user name."""
    validate_identifier(common_name, "identity")
    key = new_private_key()
    cert = _leaf(ca_key, ca_cert, key, common_name, days, ExtendedKeyUsageOID.CLIENT_AUTH, serial).sign(
        ca_key, hashes.SHA256())
    return key, cert


def build_crl(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
              revoked: Iterable[tuple[int, dt.datetime]], *, days: int = 365) -> x509.CertificateRevocationList:
    """A CRL naming the revoked serials.

    OpenSSL refuses every client once the CRL's next update has passed, so the
    CRL is re-signed whenever the broker folder is rendered (``broker config``,
    ``device credentials``, ``device revoke``); ``days`` bounds how long a broker
    can run without that.
    """
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=days))
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    return builder.sign(ca_key, hashes.SHA256())


def certificate_pem(cert: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (written 0600; a device must read it unattended)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_certificate(path: str | Path) -> x509.Certificate:
    p = Path(path)
    try:
        return x509.load_pem_x509_certificate(p.read_bytes())
    except FileNotFoundError:
        raise BadInputError(f"certificate {p} does not exist") from None
    except ValueError as exc:
        raise BadInputError(f"certificate {p} is not a PEM certificate: {exc}") from None


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    p = Path(path)
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except FileNotFoundError:
        raise BadInputError(f"private key {p} does not exist") from None
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"private key {p} cannot be loaded: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BadInputError(f"private key {p} is not an EC key")
    return key


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, hex."""
    return cert.fingerprint(hashes.SHA256()).hex()
