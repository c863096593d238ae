"""What a locked-down Mosquitto needs, generated: its configuration, its ACL, its
password file entries, and the fleet PKI (made with ``cryptography``).

One concept over 500 lines: what the broker is given, rendered from one set of settings.

Rendering is pure (settings and identities in, text out); the PKI helpers create
keys, certificates and CRLs in memory. Files are written by
``edgeship.toolkit.identities.BrokerFolder``, which owns the broker folder.

The rules (docs/security.md):

- one TLS listener where each client presents a certificate signed by the fleet
  CA; its common name is its MQTT user name (``use_identity_as_username``), and
  revoked certificates are refused through the CRL (``crlfile``); optionally a
  second TLS listener where clients log in with a user name and a password;
- no anonymous clients;
- an ACL with one ``user`` block per issued identity, generated from
  ``edgeship.ota.topics.DEVICE_PUBLISHES``/``DEVICE_SUBSCRIBES``: a device writes
  only its own reported state, status, events, telemetry and block requests, and
  reads only its own desired state, block data and reported state; the
  controller has its own identity with the whole topic tree. An identity without
  a block (a revoked device, or a certificate the CA signed outside the registry)
  may connect on the password-less listener but can neither publish nor read.
"""

from __future__ import annotations

__all__ = [
    "client_id_allowed",
    "unreachable_folder",
    "AUTH_MODES",
    "DEVICE_READS_BACK",
    "BrokerSettings",
    "AclIdentity",
    "device_topic_access",
    "render_acl",
    "render_mosquitto_conf",
    "render_amqtt_topic_acl",
    "password_file_entry",
    "verify_password_entry",
    "render_password_file",
    "generate_password",
    "new_private_key",
    "create_ca",
    "issue_server_certificate",
    "issue_client_certificate",
    "build_crl",
    "certificate_pem",
    "private_key_pem",
    "load_certificate",
    "load_private_key",
    "certificate_fingerprint",
    "server_names",
]

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeship.ota.errors import BadInputError
from edgeship.ota.topics import (
    DEFAULT_PREFIX,
    DEVICE_KINDS,
    DEVICE_PUBLISHES,
    DEVICE_SUBSCRIBES,
    REPORTED,
    validate_identifier,
)

AUTH_MODES = ("cert", "password", "both")
"""cert: client certificates only; password: user name + password over TLS; both: two listeners."""

DEVICE_READS_BACK: frozenset[str] = frozenset({REPORTED})
"""Topics a device may also read on its own subtree: its retained reported state
(to converge after a restart, see edgeship.ota.topics.DEVICE_SUBSCRIBES)."""

_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes ($7$: PBKDF2-SHA512)



def check_bind_address(bind: str) -> None:
    """A listener address Mosquitto takes on its ``listener`` line: an IP address or a
    host name (BadInputError otherwise; whitespace or a newline would add options to
    the generated mosquitto.conf)."""
    import ipaddress

    try:
        ipaddress.ip_address(bind)
        return
    except ValueError:
        pass
    labels = bind.rstrip(".").split(".")
    if not bind or len(bind) > 253 or not all(
        label and len(label) <= 63 and label[0] != "-" and all(c.isalnum() or c == "-" for c in label)
        and label.isascii() for label in labels
    ):
        raise BadInputError(f"bind address {bind!r} is neither an IP address nor a host name")

@dataclass(frozen=True)
class BrokerSettings:
    """How one broker is set up; saved as ``broker.json`` in its folder.

    Attributes:
        prefix: the MQTT topic prefix of the fleet's topic tree.
        bind: the address the listeners bind to.
        port: the certificate listener's port (or the password listener's when auth is "password").
        password_port: the password listener's port when auth is "both".
        auth: one of AUTH_MODES.
        names: extra DNS names / IP addresses of the server certificate
            (``localhost`` and ``127.0.0.1`` are always in it).
        controller: the controller's identity (certificate CN / user name).
        persistence: keep retained messages (desired state) across broker restarts.
        run_as: the account Mosquitto runs as (its ``user`` option: a Mosquitto
            started as root drops to it); the files it reads are given to it.
            "" leaves Mosquitto's default.
    """

    prefix: str = DEFAULT_PREFIX
    bind: str = "127.0.0.1"
    port: int = 8883
    password_port: int = 8884
    auth: str = "cert"
    names: tuple[str, ...] = ()
    controller: str = "edgeship-controller"
    persistence: bool = True
    run_as: str = ""

    def __post_init__(self) -> None:
        validate_identifier(self.prefix, "topic prefix")
        validate_identifier(self.controller, "controller identity")
        if self.auth not in AUTH_MODES:
            raise BadInputError(f"unknown broker auth mode {self.auth!r}; choose one of {list(AUTH_MODES)}")
        for name, port in (("port", self.port), ("password port", self.password_port)):
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise BadInputError(f"broker {name} {port!r} must be within 1-65535")
        check_bind_address(self.bind)
        if self.run_as and not all(c.isalnum() or c in "._-" for c in self.run_as):
            raise BadInputError(f"account name {self.run_as!r} is not a user name")
        if self.auth == "both" and self.port == self.password_port:
            raise BadInputError(f"the certificate and password listeners need two ports (both are {self.port})")
        for name in self.names:
            if not name or any(c in name for c in " /\t\n,"):
                raise BadInputError(f"server name {name!r} is not a DNS name or an IP address")

    @property
    def cert_port(self) -> int | None:
        """The port of the certificate listener (None when auth is "password")."""
        return None if self.auth == "password" else self.port

    @property
    def pass_port(self) -> int | None:
        """The port of the password listener (None when auth is "cert")."""
        if self.auth == "cert":
            return None
        return self.port if self.auth == "password" else self.password_port

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1, "prefix": self.prefix, "bind": self.bind, "port": self.port,
            "password_port": self.password_port, "auth": self.auth, "names": list(self.names),
            "controller": self.controller, "persistence": self.persistence, "run_as": self.run_as,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BrokerSettings:
        try:
            return cls(
                prefix=str(data.get("prefix", DEFAULT_PREFIX)), bind=str(data.get("bind", "127.0.0.1")),
                port=int(data.get("port", 8883)), password_port=int(data.get("password_port", 8884)),
                auth=str(data.get("auth", "cert")), names=tuple(str(n) for n in data.get("names", ())),
                controller=str(data.get("controller", "edgeship-controller")),
                persistence=bool(data.get("persistence", True)), run_as=str(data.get("run_as", "")),
            )
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"broker settings are malformed: {exc}") from None


@dataclass(frozen=True)
class AclIdentity:
    """One identity the ACL grants rights to: a device of a fleet, or the controller."""

    name: str
    kind: str  # "device" | "controller"
    fleet: str = ""

    def __post_init__(self) -> None:
        validate_identifier(self.name, "identity")
        if self.kind == "device":
            validate_identifier(self.fleet, "fleet")
        elif self.kind != "controller":
            raise BadInputError(f"unknown identity kind {self.kind!r}")


def device_topic_access(kind: str) -> str | None:
    """Mosquitto's access word for a device on its own topic of ``kind`` (None: no access)."""
    read = kind in DEVICE_SUBSCRIBES or kind in DEVICE_READS_BACK
    write = kind in DEVICE_PUBLISHES
    if read and write:
        return "readwrite"
    if read:
        return "read"
    if write:
        return "write"
    return None


def render_acl(identities: Iterable[AclIdentity], *, prefix: str = DEFAULT_PREFIX) -> str:
    """The Mosquitto ACL file: one ``user`` block per identity, nothing else.

    Mosquitto denies whatever no line grants, so an identity without a block,
    ``$SYS`` and every other topic are closed. Devices get explicit topics (no
    ``%u`` patterns) so that a device id is bound to its fleet and a revocation
    (dropping the block, then SIGHUP) also cuts a connection that is still open.
    """
    validate_identifier(prefix, "topic prefix")
    lines = [
        "# edgeship broker ACL: generated by `edgeship broker config` / `edgeship device credentials`.",
        "# Do not edit: it is rewritten from the identity registry (identities.json).",
        "# Whatever no line grants is denied.",
        "",
    ]
    seen: set[str] = set()
    for ident in sorted(identities, key=lambda i: (i.kind != "controller", i.fleet, i.name)):
        if ident.name in seen:
            raise BadInputError(f"identity {ident.name!r} appears twice in the ACL")
        seen.add(ident.name)
        if ident.kind == "controller":
            lines += ["# the controller", f"user {ident.name}", f"topic readwrite {prefix}/#", ""]
            continue
        lines += [f"# device {ident.name} of fleet {ident.fleet}", f"user {ident.name}"]
        for kind in DEVICE_KINDS:
            access = device_topic_access(kind)
            if access is not None:
                lines.append(f"topic {access} {prefix}/{ident.fleet}/devices/{ident.name}/{kind}")
        lines.append("")
    return "\n".join(lines)


def render_amqtt_topic_acl(identities: Iterable[AclIdentity], *, prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """The same rules for amqtt's ``TopicAccessControlListPlugin`` (amqtt >= 0.12): per user name,
    the topics it may publish (``publish-acl``), subscribe to (``subscribe-acl``) and be sent
    (``receive-acl``). Anonymous clients (amqtt's user ``anonymous``) get nothing.

    What amqtt cannot do that Mosquitto does: identify a client by its TLS
    certificate (the user name comes from CONNECT, so the embedded broker needs
    password authentication to mean anything), read Mosquitto's ``$7$``
    password file, or take a CRL. See docs/security.md.
    """
    validate_identifier(prefix, "topic prefix")
    publish: dict[str, list[str]] = {"anonymous": []}
    subscribe: dict[str, list[str]] = {"anonymous": []}
    for ident in identities:
        if ident.kind == "controller":
            publish[ident.name] = subscribe[ident.name] = [f"{prefix}/#"]
            continue
        base = f"{prefix}/{ident.fleet}/devices/{ident.name}"
        publish[ident.name] = [f"{base}/{k}" for k in DEVICE_KINDS if "write" in (device_topic_access(k) or "")]
        subscribe[ident.name] = [f"{base}/{k}" for k in DEVICE_KINDS if "read" in (device_topic_access(k) or "")]
    return {"publish-acl": publish, "subscribe-acl": subscribe, "receive-acl": dict(subscribe)}


def client_id_allowed(kind: str, identity: str, client_id: str) -> bool:
    """Whether an identity may connect with ``client_id`` (the embedded broker's check; Mosquitto
    replaces the client id with the identity, ``use_username_as_clientid``).

    A device is exactly its id, so a stolen or misused credential cannot take another device's
    session. A controller replica is its identity, or the identity, ``-`` and a replica name
    (``edgeship-controller-HOST-PID``), so replicas share one identity without clashing.
    """
    if kind == "controller":
        return client_id == identity or (client_id.startswith(identity + "-") and len(client_id) > len(identity) + 1)
    return client_id == identity


def unreachable_folder(folder: str | Path, account: str) -> Path | None:
    """The first folder on the way to ``folder`` that ``account`` cannot enter (no ``x`` for it),
    or None. Mosquitto started as root drops to its account before it writes its pid file and
    persistence and re-reads the ACL and CRL: a broker folder under a 0700 home fails there."""
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(account)
    except KeyError:
        return None
    if entry.pw_uid == 0:
        return None
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if account in g.gr_mem}
    path = Path(folder).resolve()
    for current in [*reversed(path.parents), path]:
        try:
            st = current.stat()
        except FileNotFoundError:
            return None  # made later, with modes we choose
        except OSError:
            return current
        if st.st_uid == entry.pw_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return current
    return None


def render_mosquitto_conf(settings: BrokerSettings, folder: str | Path) -> str:
    """mosquitto.conf (Mosquitto 2.0) for a broker folder laid out by BrokerFolder.

    Paths are absolute (Mosquitto resolves relative ones against its working
    directory): regenerate the file after moving the folder.
    """
    d = Path(folder).resolve()
    lines = [
        "# edgeship broker: generated by `edgeship broker config`; regenerate rather than edit.",
        "# Run: mosquitto -c " + str(d / "mosquitto.conf"),
        "per_listener_settings false",
        *([f"user {settings.run_as}"] if settings.run_as else []),
        "allow_anonymous false",
        f"acl_file {d / 'acl'}",
        # Block transfer is request/reply: without this, Nagle's algorithm holds small
        # replies back and halves throughput on a default broker (docs/benchmarks.md, blocks).
        "set_tcp_nodelay true",
    ]
    if settings.pass_port is not None:
        lines.append(f"password_file {d / 'passwd'}")
    lines += [f"pid_file {d / 'data' / 'mosquitto.pid'}"]
    if settings.persistence:
        lines += ["persistence true", f"persistence_location {d / 'data'}/"]
    else:
        lines += ["persistence false"]
    lines += ["log_dest stderr", "log_type error", "log_type warning", "log_type notice",
              "log_type information", "connection_messages true", ""]
    tls = [
        f"cafile {d / 'ca' / 'ca.crt'}",
        f"certfile {d / 'server' / 'server.crt'}",
        f"keyfile {d / 'server' / 'server.key'}",
        "tls_version tlsv1.2",
    ]
    if settings.cert_port is not None:
        lines += [
            "# devices and the controller: a client certificate signed by the fleet CA; its CN is the user name",
            f"listener {settings.cert_port} {settings.bind}",
            *tls,
            "require_certificate true",
            "use_identity_as_username true",
            # the client id is the identity: a device cannot take another's session (and knock it offline)
            "use_username_as_clientid true",
            f"crlfile {d / 'ca' / 'crl.pem'}",
            "",
        ]
    if settings.pass_port is not None:
        lines += [
            "# devices and the controller: user name and password (passwd) over TLS",
            f"listener {settings.pass_port} {settings.bind}",
            *tls,
            "require_certificate false",
            "use_username_as_clientid true",
            "",
        ]
    return "\n".join(lines)


# -- passwords ---------------------------------------------------------------------------------


def generate_password() -> str:
    """A random password of 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def password_file_entry(username: str, password: str, *, salt: bytes | None = None,
                        iterations: int = _PBKDF2_ITERATIONS) -> str:
    """One line of a Mosquitto 2.0 password file (``$7$``: PBKDF2-SHA512), as mosquitto_passwd writes it."""
    validate_identifier(username, "user name")
    if not password:
        raise BadInputError(f"the password of {username!r} is empty")
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return f"{username}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password_entry(entry: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$`` password file line."""
    try:
        _user, hashed = entry.strip().split(":", 1)
        _, seven, iterations, salt, digest = hashed.split("$")
        if seven != "7":
            return False
        got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), base64.b64decode(salt), int(iterations), 64)
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


def render_password_file(entries: Iterable[str]) -> str:
    """The password file from ready-made entries (one per identity)."""
    lines = sorted(e.strip() for e in entries if e.strip())
    return "\n".join(lines) + ("\n" if lines else "")


# -- PKI -----------------------------------------------------------------------------------------


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

