"""The broker folder, its registry of issued identities, and device credentials.

One concept over 500 lines: the broker folder and everything written into it, under one lock.

A broker folder (``edgeship broker config --out DIR``) holds::

    broker.json        the settings (BrokerSettings)
    identities.json    the registry: every identity issued, its certificate serial, revocations
    mosquitto.conf     acl    passwd     generated; rewritten on every change
    ca/ca.crt  ca/ca.key (0600)  ca/crl.pem
    server/server.crt  server/server.key (0600)
    controller/        the controller's own credentials (same layout as a device's)
    data/              Mosquitto's persistence (retained desired state) and mosquitto.pid

When Mosquitto runs as another account (``BrokerSettings.run_as``, e.g. the
``mosquitto`` user a root-started Mosquitto drops to), the files it reads
(server key, passwd) and data/ are handed to that account; the CA key never is.

Issuing or revoking rewrites the ACL, the password file and the CRL, then
sends SIGHUP to the Mosquitto that runs this folder (found through its pid
file), which reloads all three: a revoked device is refused at its next
connection (CRL, or its password entry gone) and loses every right on a
connection that is still open (its ACL block gone).

Credentials written for one identity (``device credentials --out DIR``)::

    ca.crt             the fleet CA: what the client trusts the broker with
    client.crt  client.key (0600)            (certificate auth)
    password (0600)                          (password auth)
    connection.json    url, user name, fleet, prefix and the files above

Why one module of this size: it is one concept, the broker folder; its registry, the files
generated from it and the reload of the running broker change together under one lock, so they
stay in one class (the pure rendering is in :mod:`.broker_config`, the PKI in :mod:`.fleet_pki`).
"""

from __future__ import annotations

__all__ = [
    "REGISTRY_FILE",
    "SETTINGS_FILE",
    "CONNECTION_FILE",
    "IdentityRecord",
    "IssuedCredentials",
    "RevokeResult",
    "BrokerFolder",
    "issue_device_credentials",
    "revoke_device",
    "read_connection",
]

import datetime as dt
import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeship.ota.atomicfile import atomic_write_bytes, atomic_write_text
from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.topics import validate_identifier

from . import broker_config as bc
from . import fleet_pki as pki

REGISTRY_FILE = "identities.json"
SETTINGS_FILE = "broker.json"
CONNECTION_FILE = "connection.json"
PROVISIONER = "edgeship-provisioner"
"""The identity `device provision` watches devices come online with (a controller's rights)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class IdentityRecord:
    """One issued identity in the registry (no secret is kept: only the password's hash)."""

    name: str
    kind: str  # "device" | "controller"
    fleet: str
    auth: str  # "cert" | "password"
    issued: str
    serial: str = ""  # hex serial of the client certificate ("" for password auth)
    fingerprint: str = ""  # sha256 of the certificate, hex
    not_after: str = ""
    password_entry: str = ""  # the password file line ($7$ hash)
    revoked: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "fleet": self.fleet, "auth": self.auth,
            "issued": self.issued, "serial": self.serial, "fingerprint": self.fingerprint,
            "not_after": self.not_after, "password_entry": self.password_entry, "revoked": self.revoked,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IdentityRecord:
        return cls(
            name=str(data["name"]), kind=str(data["kind"]), fleet=str(data.get("fleet", "")),
            auth=str(data["auth"]), issued=str(data["issued"]), serial=str(data.get("serial", "")),
            fingerprint=str(data.get("fingerprint", "")), not_after=str(data.get("not_after", "")),
            password_entry=str(data.get("password_entry", "")),
            revoked=None if data.get("revoked") is None else str(data["revoked"]),
        )


@dataclass(frozen=True)
class IssuedCredentials:
    """What ``device credentials`` wrote."""

    record: IdentityRecord
    out: Path
    files: dict[str, str]
    url: str
    replaced_serial: str | None = None
    broker_reloaded: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": self.record.to_dict(), "out": str(self.out), "files": self.files, "url": self.url,
            "replaced_serial": self.replaced_serial, "broker_reloaded_pid": self.broker_reloaded,
        }


@dataclass(frozen=True)
class RevokeResult:
    """What ``device revoke`` did."""

    name: str
    changed: bool
    serial: str
    broker_reloaded: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.name, "changed": self.changed, "serial": self.serial,
                "broker_reloaded_pid": self.broker_reloaded}


@dataclass
class _Registry:
    identities: dict[str, IdentityRecord] = field(default_factory=dict)
    revoked_serials: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "identities": {k: v.to_dict() for k, v in sorted(self.identities.items())},
            "revoked_serials": self.revoked_serials,
        }


class BrokerFolder:
    """The files of one broker (see the module docstring); the only writer of them."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()

    # -- paths ---------------------------------------------------------------------------
    @property
    def ca_cert_path(self) -> Path:
        return self.path / "ca" / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.path / "ca" / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.path / "ca" / "crl.pem"

    @property
    def conf_path(self) -> Path:
        return self.path / "mosquitto.conf"

    @property
    def pid_path(self) -> Path:
        return self.path / "data" / "mosquitto.pid"

    @property
    def controller_dir(self) -> Path:
        return self.path / "controller"

    @property
    def provisioner_dir(self) -> Path:
        return self.path / "provisioner"

    def provisioner_credentials(self) -> dict[str, Any]:
        """The credentials provisioning watches devices come online with (issued on first use).

        Not the controller's: the broker names each client by its identity, so a provisioning
        run that connected as the controller would take the running controller's session.
        """
        record = self.record(PROVISIONER)
        if record is None or not record.active or not (self.provisioner_dir / CONNECTION_FILE).is_file():
            if record is not None and record.active:  # its folder is gone: a fresh identity
                reg = self._registry()
                self._revoke_in(reg, reg.identities[PROVISIONER])
                self._save_registry(reg)
            self.issue_controller(PROVISIONER, self.provisioner_dir)
        return read_connection(self.provisioner_dir)

    def exists(self) -> bool:
        return (self.path / SETTINGS_FILE).is_file() and self.ca_key_path.is_file()

    def require(self) -> BrokerFolder:
        if not self.exists():
            raise BadInputError(
                f"{self.path} is not a broker folder (no {SETTINGS_FILE} or CA); "
                f"create it with `edgeship broker config --out {self.path}`"
            )
        return self

    # -- settings and registry -----------------------------------------------------------
    def settings(self) -> bc.BrokerSettings:
        return bc.BrokerSettings.from_dict(self._read_json(self.path / SETTINGS_FILE))

    def records(self) -> dict[str, IdentityRecord]:
        return dict(self._registry().identities)

    def record(self, name: str) -> IdentityRecord | None:
        return self._registry().identities.get(name)

    def _read_json(self, p: Path) -> dict[str, Any]:
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise BadInputError(f"{p} does not exist; is {self.path} a broker folder?") from None
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{p} cannot be read as JSON: {exc}") from None
        if not isinstance(data, dict):
            raise BadInputError(f"{p} must hold a JSON object")
        return data

    def _registry(self) -> _Registry:
        p = self.path / REGISTRY_FILE
        if not p.exists():
            return _Registry()
        data = self._read_json(p)
        try:
            return _Registry(
                identities={k: IdentityRecord.from_dict(v) for k, v in dict(data.get("identities", {})).items()},
                revoked_serials=[dict(x) for x in data.get("revoked_serials", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"{p} is malformed ({exc}); restore it from a backup") from None

    def _save_registry(self, reg: _Registry) -> None:
        atomic_write_text(self.path / REGISTRY_FILE, json.dumps(reg.to_dict(), indent=2, sort_keys=True) + "\n",
                          mode=0o600)

    # -- creation ------------------------------------------------------------------------
    def create_or_update(self, settings: bc.BrokerSettings) -> dict[str, Any]:
        """Create the folder (CA, server certificate, controller identity) or bring it up to date.

        Never replaces the CA or an identity that exists; re-issues the server
        certificate only when its names changed. Returns what changed.
        """
        changed: list[str] = []
        for sub in ("ca", "server", "data"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.path / "ca", 0o755)
        if not self.ca_key_path.exists():
            ca_key, ca_cert = pki.create_ca()
            atomic_write_bytes(self.ca_key_path, pki.private_key_pem(ca_key), mode=0o600)
            atomic_write_bytes(self.ca_cert_path, pki.certificate_pem(ca_cert), mode=0o644)
            changed.append("fleet CA created")
        ca_key, ca_cert = self._ca()
        old = self._read_json(self.path / SETTINGS_FILE) if (self.path / SETTINGS_FILE).exists() else None
        if old != settings.to_dict():
            atomic_write_text(self.path / SETTINGS_FILE, json.dumps(settings.to_dict(), indent=2) + "\n")
            changed.append("settings written")
        server_crt = self.path / "server" / "server.crt"
        if not server_crt.exists() or self._server_names(server_crt) != set(pki.server_names(settings.names)):
            key, cert = pki.issue_server_certificate(ca_key, ca_cert, settings.names)
            atomic_write_bytes(self.path / "server" / "server.key", pki.private_key_pem(key), mode=0o600)
            atomic_write_bytes(server_crt, pki.certificate_pem(cert), mode=0o644)
            changed.append("server certificate issued for " + ", ".join(pki.server_names(settings.names)))
        reg = self._registry()
        ctl = reg.identities.get(settings.controller)
        if ctl is not None and ctl.kind != "controller":
            raise BadInputError(f"controller identity {settings.controller!r} is already a device's id; choose another")
        if ctl is None or not ctl.active:
            auth = "password" if settings.auth == "password" else "cert"
            self._issue(reg, settings.controller, "controller", "", auth, self.controller_dir, settings)
            changed.append(f"controller identity {settings.controller} issued")
        self.render()
        if self._render_changed:
            changed.append("mosquitto.conf, acl, passwd, crl written")
        pid = self.reload_broker()
        if pid:
            changed.append(f"broker (pid {pid}) reloaded")
        warnings: list[str] = []
        if settings.run_as and os.geteuid() == 0:
            blocked = bc.unreachable_folder(self.path, settings.run_as)
            if blocked is not None:
                warnings.append(
                    f"Mosquitto drops from root to the account {settings.run_as!r}, which cannot enter {blocked} "
                    f"(mode {oct(blocked.stat().st_mode & 0o777)[2:]}): it would stop with \"Unable to write pid "
                    "file\". Make the broker folder where that account can reach it (e.g. "
                    f"`edgeship broker config --out /srv/edgeship/broker`), or `chmod o+x {blocked}`, or pass "
                    "--run-as root")
        return {"folder": str(self.path), "changed": changed, "settings": settings.to_dict(),
                "conf": str(self.conf_path), "controller": str(self.controller_dir),
                "run": f"mosquitto -c {self.conf_path}", "warnings": warnings}

    def _server_names(self, path: Path) -> set[str]:
        from cryptography import x509

        cert = pki.load_certificate(path)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return set()
        return {str(n.value) for n in san}

    def _ca(self) -> tuple[Any, Any]:
        return pki.load_private_key(self.ca_key_path), pki.load_certificate(self.ca_cert_path)

    # -- issue / revoke ------------------------------------------------------------------
    def _issue(self, reg: _Registry, name: str, kind: str, fleet: str, auth: str, out: Path,
               settings: bc.BrokerSettings) -> tuple[IdentityRecord, dict[str, str]]:
        """Create the credentials of one identity into ``out`` and record them in ``reg`` (saved)."""
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        files: dict[str, str] = {"ca": "ca.crt"}
        atomic_write_bytes(out / "ca.crt", self.ca_cert_path.read_bytes(), mode=0o644)
        record = IdentityRecord(name=name, kind=kind, fleet=fleet, auth=auth, issued=_iso(_now()))
        if auth == "cert":
            ca_key, ca_cert = self._ca()
            key, cert = pki.issue_client_certificate(ca_key, ca_cert, name)
            atomic_write_bytes(out / "client.key", pki.private_key_pem(key), mode=0o600)
            atomic_write_bytes(out / "client.crt", pki.certificate_pem(cert), mode=0o644)
            files.update(cert="client.crt", key="client.key")
            record = replace(record, serial=format(cert.serial_number, "x"),
                             fingerprint=pki.certificate_fingerprint(cert),
                             not_after=_iso(cert.not_valid_after_utc))
        else:
            password = bc.generate_password()
            atomic_write_text(out / "password", password + "\n", mode=0o600)
            files.update(password="password")
            record = replace(record, password_entry=bc.password_file_entry(name, password))
        url = self.url_for(auth, settings)
        conn = {"schema": 1, "identity": name, "kind": kind, "fleet": fleet, "prefix": settings.prefix,
                "url": url, "username": name, **files}
        atomic_write_text(out / CONNECTION_FILE, json.dumps(conn, indent=2, sort_keys=True) + "\n", mode=0o644)
        reg.identities[name] = record
        self._save_registry(reg)
        return record, {k: str(out / v) for k, v in {**files, "connection": CONNECTION_FILE}.items()}

    def issue_controller(self, name: str, out: str | os.PathLike[str]) -> IssuedCredentials:
        """Issue credentials for another controller replica, an identity of its own.

        Mosquitto names each client by its identity (``use_username_as_clientid``), so two
        replicas that shared one identity would take each other's session in turn.
        """
        self.require()
        validate_identifier(name, "controller identity")
        settings = self.settings()
        reg = self._registry()
        old = reg.identities.get(name)
        if old is not None and old.active:
            raise BadInputError(f"identity {name!r} already exists ({old.kind}); choose another name")
        auth = "password" if settings.auth == "password" else "cert"
        record, files = self._issue(reg, name, "controller", "", auth, Path(out).resolve(), settings)
        self.render()
        pid = self.reload_broker()
        return IssuedCredentials(record=record, out=Path(out).resolve(), files=files,
                                 url=self.url_for(auth, settings), replaced_serial=None, broker_reloaded=pid)

    def url_for(self, auth: str, settings: bc.BrokerSettings | None = None) -> str:
        """The URL a client of ``auth`` connects to (the first server name, else localhost)."""
        s = settings or self.settings()
        host = s.names[0] if s.names else "localhost"
        port = s.cert_port if auth == "cert" else s.pass_port
        if port is None:
            raise BadInputError(f"this broker has no {auth} listener (auth mode {s.auth!r})")
        return f"mqtts://{host}:{port}"

    def issue_device(self, device_id: str, fleet: str, out: str | os.PathLike[str], *, auth: str | None = None,
                     reissue: bool = False) -> IssuedCredentials:
        """Issue one device's credentials into ``out`` (see issue_device_credentials)."""
        self.require()
        validate_identifier(device_id, "device id")
        validate_identifier(fleet, "fleet")
        settings = self.settings()
        if auth is None:
            auth = "password" if settings.auth == "password" else "cert"
        if auth not in ("cert", "password"):
            raise BadInputError(f"unknown credential kind {auth!r}; choose cert or password")
        if (auth == "cert" and settings.cert_port is None) or (auth == "password" and settings.pass_port is None):
            raise BadInputError(
                f"the broker in {self.path} has no {auth} listener (auth {settings.auth!r}); "
                f"choose --auth {'password' if auth == 'cert' else 'cert'} or re-run `broker config --auth both`"
            )
        reg = self._registry()
        old = reg.identities.get(device_id)
        replaced: str | None = None
        if old is not None:
            if old.kind != "device":
                raise BadInputError(f"{device_id!r} is the controller's identity, not a device id")
            if old.active and old.fleet != fleet:
                raise BadInputError(
                    f"device {device_id} has active credentials in fleet {old.fleet}; "
                    f"revoke them first (`edgeship device revoke {device_id} --broker-dir {self.path}`)"
                )
            if old.active and not reissue:
                raise BadInputError(
                    f"device {device_id} already has active credentials (issued {old.issued}"
                    + (f", serial {old.serial}" if old.serial else "")
                    + "); pass --reissue to replace them (the old ones are revoked)"
                )
            if old.active:
                self._revoke_in(reg, old)
                replaced = old.serial or "password"
        record, files = self._issue(reg, device_id, "device", fleet, auth, Path(out).resolve(), settings)
        self.render()
        pid = self.reload_broker()
        return IssuedCredentials(record=record, out=Path(out).resolve(), files=files,
                                 url=self.url_for(auth, settings), replaced_serial=replaced, broker_reloaded=pid)

    def _revoke_in(self, reg: _Registry, record: IdentityRecord) -> None:
        when = _iso(_now())
        if record.serial:
            reg.revoked_serials.append({"serial": record.serial, "name": record.name, "revoked": when})
        reg.identities[record.name] = replace(record, revoked=when)

    def revoke(self, device_id: str) -> RevokeResult:
        """Revoke a device: CRL, password file and ACL rewritten, then the broker reloaded."""
        self.require()
        reg = self._registry()
        record = reg.identities.get(device_id)
        if record is None or record.kind != "device":
            known = sorted(k for k, v in reg.identities.items() if v.kind == "device")
            raise BadInputError(
                f"no device {device_id!r} in {self.path / REGISTRY_FILE} (known: {', '.join(known) or 'none'})"
            )
        if not record.active:
            pid = self.reload_broker()
            return RevokeResult(device_id, False, record.serial, pid)
        self._revoke_in(reg, record)
        self._save_registry(reg)
        self.render()
        pid = self.reload_broker()
        return RevokeResult(device_id, True, record.serial, pid)

    # -- rendering and reload ------------------------------------------------------------
    _render_changed: bool = False

    def render(self) -> None:
        """Rewrite mosquitto.conf, acl, passwd and the CRL from the settings and the registry."""
        settings = self.settings()
        reg = self._registry()
        active = [r for r in reg.identities.values() if r.active]
        acl = bc.render_acl([bc.AclIdentity(r.name, r.kind, r.fleet) for r in active], prefix=settings.prefix)
        passwd = bc.render_password_file(r.password_entry for r in active if r.auth == "password")
        conf = bc.render_mosquitto_conf(settings, self.path)
        ca_key, ca_cert = self._ca()
        revoked = [(int(x["serial"], 16), _parse_iso(x["revoked"])) for x in reg.revoked_serials]
        changed = False
        for path, text, mode in ((self.conf_path, conf, 0o644), (self.path / "acl", acl, 0o644),
                                 (self.path / "passwd", passwd, 0o600)):
            if not path.exists() or path.read_text() != text:
                atomic_write_text(path, text, mode=mode)
                changed = True
        # The CRL is re-signed every time (its next-update must stay in the future).
        old_crl = self._crl_serials()
        atomic_write_bytes(self.crl_path, pki.certificate_pem(pki.build_crl(ca_key, ca_cert, revoked)), mode=0o644)
        if old_crl != {s for s, _ in revoked}:
            changed = True
        self._hand_to_broker_account(settings)
        self._render_changed = changed

    def _hand_to_broker_account(self, settings: bc.BrokerSettings) -> None:
        """chown what Mosquitto reads or writes to its account (only possible, and needed, as root)."""
        if not settings.run_as or os.geteuid() != 0:
            return
        import pwd

        try:
            entry = pwd.getpwnam(settings.run_as)
        except KeyError:
            raise BadInputError(
                f"the broker's account {settings.run_as!r} does not exist on this machine; "
                "create it or pass --run-as with an existing user"
            ) from None
        for p in (self.path / "data", self.path / "server" / "server.key", self.path / "passwd"):
            if p.exists():
                os.chown(p, entry.pw_uid, entry.pw_gid)

    def _crl_serials(self) -> set[int] | None:
        from cryptography import x509

        if not self.crl_path.exists():
            return None
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except ValueError:
            return None
        return {r.serial_number for r in crl}

    def running_broker_pid(self) -> int | None:
        """The pid of a live Mosquitto started with this folder's config, if any."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if not any(b"mosquitto" in Path(a.decode(errors="replace")).name.encode() for a in cmdline[:1]):
            return None  # a stale pid file whose pid was reused
        return pid

    def reload_broker(self) -> int | None:
        """SIGHUP the running Mosquitto of this folder (it reloads ACL, passwords, CRL); its pid or None."""
        pid = self.running_broker_pid()
        if pid is None:
            return None
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return None
        except PermissionError:
            raise EdgeshipError(
                f"cannot signal the broker (pid {pid}) to reload: permission denied; "
                f"run `kill -HUP {pid}` as its user"
            ) from None
        return pid

    def status(self) -> dict[str, Any]:
        reg = self._registry()
        return {
            "folder": str(self.path), "settings": self.settings().to_dict(),
            "identities": [r.to_dict() for r in reg.identities.values()],
            "broker_pid": self.running_broker_pid(),
        }


def issue_device_credentials(broker_dir: str | os.PathLike[str], device_id: str, fleet: str,
                             out: str | os.PathLike[str], *, auth: str | None = None,
                             reissue: bool = False) -> IssuedCredentials:
    """Issue one device's broker credentials into ``out`` and allow it at the broker.

    ``auth`` is "cert" (a client certificate, CN = device id) or "password"; by
    default the broker's own mode ("cert" when it runs both). A device with
    active credentials is refused unless ``reissue`` (the old ones are revoked).
    """
    return BrokerFolder(broker_dir).issue_device(device_id, fleet, out, auth=auth, reissue=reissue)


def revoke_device(broker_dir: str | os.PathLike[str], device_id: str) -> RevokeResult:
    """Revoke a device's credentials at the broker (idempotent)."""
    return BrokerFolder(broker_dir).revoke(device_id)


TRUST_FILES = {"root": "root.json", "director_key": "director.pub"}
"""The trust anchors a device credentials folder may carry, and their file names in it."""


def add_trust_anchors(folder: str | os.PathLike[str], *, root: str | os.PathLike[str],
                      director_key: str | os.PathLike[str]) -> dict[str, str]:
    """Copy the release repository's root metadata and the director's public key into a
    credentials folder and name them in its connection.json, so that one folder is all a
    device needs (``edgeship-agent init --credentials FOLDER``).

    Raises:
        BadInputError: a trust anchor is missing or unreadable (named), or the folder has no
            connection.json.
    """
    d = Path(folder)
    conn_path = d / CONNECTION_FILE
    conn = read_connection(d)
    raw = json.loads(conn_path.read_text())
    copied: dict[str, str] = {}
    for key, source, what in (("root", root, "trusted root metadata (root.json)"),
                              ("director_key", director_key, "director's public key")):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise BadInputError(f"the {what} {source} cannot be read: {exc.strerror or exc}") from None
        atomic_write_bytes(d / TRUST_FILES[key], data, mode=0o644)
        raw[key] = TRUST_FILES[key]
        copied[key] = str(d / TRUST_FILES[key])
    del conn
    atomic_write_text(conn_path, json.dumps(raw, indent=2, sort_keys=True) + "\n", mode=0o644)
    return copied


def read_connection(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a credentials folder's connection.json, with its file names made absolute."""
    d = Path(folder)
    p = d / CONNECTION_FILE
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{d} holds no {CONNECTION_FILE}; issue credentials with `edgeship device credentials`") from None
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{p} cannot be read: {exc}") from None
    for key in ("ca", "cert", "key", "password", *TRUST_FILES):
        if key in data:
            data[key] = str((d / data[key]).resolve())
    return data
