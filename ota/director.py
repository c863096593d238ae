"""The director: a device's desired state, signed with the director's ed25519 key.

The director says *which* bundle a device (or every device of a fleet, ``"*"``)
must run; the release repository (TUF) says *what* that bundle's bytes are. A
device installs only when both agree (Uptane's two-repository check, done in
:mod:`edgeship.ota.updater`).

Envelope (what ``edgeship.ota.protocol.DesiredMessage.envelope`` carries)::

    {"signed": {"_type": "edgeship-desired-state", "schema": 1, "fleet": ..., "device": ...,
                "bundle": ..., "version": ..., "target": ..., "length": ..., "hashes": {...},
                "sequence": ..., "expires": "...Z", "issued": "...Z", "deployment": ...,
                "rollout": ..., "action": "install" | "rollback"},
     "signatures": [{"keyid": <sha256 of the raw public key, hex>, "sig": <ed25519 signature, hex>}]}

Schema 2 names the full set of models a device serves: instead of the bundle fields it has
``"models": {<model name>: {"bundle", "version", "serving_version", "target", "length",
"hashes", "deployment", "rollout", "action"}}``; a model name absent from the set is to be
removed. ``DesiredState.models()`` gives the entries of either schema (schema 1: its one
bundle, keyed by the bundle name, the other models left alone), ``schema2`` says which.

The signature covers the canonical JSON (OLPC canonical JSON, as TUF signs) of
``signed``. Verification is a pure function of the envelope, the trusted key, the
device's identity, the last sequence number it accepted and its clock.
"""

from __future__ import annotations

__all__ = [
    "ACTIONS",
    "DESIRED_STATE_SCHEMA",
    "DESIRED_STATE_SCHEMAS",
    "DESIRED_STATE_TYPE",
    "DesiredState",
    "DirectorError",
    "ModelEntry",
    "DirectorKeyError",
    "DirectorSignatureError",
    "ExpiredDesiredStateError",
    "MalformedDesiredStateError",
    "ReplayedDesiredStateError",
    "WrongDeviceError",
    "canonical_json",
    "director_key_id",
    "format_utc",
    "generate_director_key",
    "load_director_private_key",
    "load_director_public_key",
    "parse_utc",
    "sign_desired_state",
    "verify_desired_state",
]

import datetime as _dt
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical

from .atomicfile import atomic_write_bytes
from .errors import BadInputError, EdgeshipError, SecurityError
from .versions import check_name, parse_version

DESIRED_STATE_TYPE = "edgeship-desired-state"
DESIRED_STATE_SCHEMA = 1
"""The single-bundle form; still written for agents that read only it."""
DESIRED_STATE_SCHEMAS = (1, 2)
"""What this code reads: 1 (one bundle) and 2 (the full set of models, by name)."""
ACTIONS = ("install", "rollback")
_HEX = re.compile(r"^[0-9a-f]+$")
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


class DirectorError(SecurityError):
    """A desired-state document was refused (REJECTED on the device)."""


class MalformedDesiredStateError(DirectorError):
    """The envelope or its signed document does not have the expected shape."""


class DirectorKeyError(DirectorError):
    """The document is signed by a key other than the director key the device trusts."""


class DirectorSignatureError(DirectorError):
    """The signature by the trusted director key does not verify (tampered document)."""


class ReplayedDesiredStateError(DirectorError):
    """The document's sequence number is lower than one the device already accepted."""


class ExpiredDesiredStateError(DirectorError):
    """The document expired before the device's clock (a stale retained message)."""


class WrongDeviceError(DirectorError):
    """The document is for another device or another fleet."""


def format_utc(moment: _dt.datetime) -> str:
    """``2026-11-23T14:00:00Z`` (UTC, whole seconds)."""
    if moment.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware (UTC)")
    return moment.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str) -> _dt.datetime:
    """Parse ``YYYY-MM-DDTHH:MM:SSZ``; anything else raises ValueError."""
    if not isinstance(text, str) or not _ISO.fullmatch(text):
        raise ValueError(f"{text!r} is not a UTC time of the form YYYY-MM-DDTHH:MM:SSZ")
    return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)


def canonical_json(obj: Any) -> bytes:
    """OLPC canonical JSON, as TUF signs it (no floats; sorted keys; no spaces)."""
    try:
        return encode_canonical(obj).encode("utf-8")  # type: ignore[union-attr]
    except (FormatError, TypeError, ValueError) as exc:  # floats, non-string keys...
        raise MalformedDesiredStateError(f"desired state cannot be canonicalised: {exc}") from None


@dataclass(frozen=True)
class ModelEntry:
    """One model's line of a desired state: which bundle (and version) it serves.

    ``serving_version`` is the int64 the release repository assigned at publish (TF Serving
    clients address it as ``/versions/N``); None where the document does not carry one (the
    device then numbers the version itself)."""

    bundle: str
    version: str
    target: str
    length: int
    hashes: dict[str, str]
    serving_version: int | None = None
    deployment: str | None = None
    rollout: str | None = None
    action: str = "install"

    @property
    def sha256(self) -> str:
        return self.hashes["sha256"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "version": self.version,
            "serving_version": self.serving_version,
            "target": self.target,
            "length": int(self.length),
            "hashes": dict(self.hashes),
            "deployment": self.deployment,
            "rollout": self.rollout,
            "action": self.action,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "desired state") -> ModelEntry:
        """Validate one entry (``where`` names it in errors: ``desired state model 'digits'``)."""
        if not isinstance(doc, Mapping):
            raise MalformedDesiredStateError(f"{where}: not an object")

        def text(key: str, optional: bool = False) -> str | None:
            return _text(doc, key, where, optional)

        def integer(key: str, optional: bool = False) -> int | None:
            return _integer(doc, key, where, optional)

        hashes = doc.get("hashes")
        if (not isinstance(hashes, Mapping) or "sha256" not in hashes
                or not all(isinstance(k, str) and isinstance(v, str) and _HEX.fullmatch(v) for k, v in hashes.items())):
            raise MalformedDesiredStateError(f"{where}: 'hashes' must map algorithms to hex, sha256 included")
        action = doc.get("action", "install")
        if action not in ACTIONS:
            raise MalformedDesiredStateError(f"{where}: action {action!r} is not one of {list(ACTIONS)}")
        # the bundle and version name a folder on the device (work_dir/<bundle>-<version>): the
        # same rules as the release repository's, never a path
        try:
            check_name(doc.get("bundle"))  # type: ignore[arg-type]
            parse_version(doc.get("version"))  # type: ignore[arg-type]
        except BadInputError as exc:
            raise MalformedDesiredStateError(f"{where}: {exc.message}") from None
        return cls(
            bundle=text("bundle"),  # type: ignore[arg-type]
            version=text("version"),  # type: ignore[arg-type]
            target=text("target"),  # type: ignore[arg-type]
            length=integer("length"),  # type: ignore[arg-type]
            hashes={str(k): str(v) for k, v in hashes.items()},
            serving_version=integer("serving_version", optional=True),
            deployment=text("deployment", optional=True),
            rollout=text("rollout", optional=True),
            action=str(action),
        )


_ENTRY_FIELDS = ("bundle", "version", "target", "length", "hashes", "deployment", "rollout", "action")


def _text(doc: Mapping[str, Any], key: str, where: str, optional: bool = False) -> str | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise MalformedDesiredStateError(f"{where}: {key!r} must be a non-empty string")
    return value


def _integer(doc: Mapping[str, Any], key: str, where: str, optional: bool = False) -> int | None:
    """A non-negative int64 (a bool is no integer here)."""
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= 1 << 63:
        raise MalformedDesiredStateError(f"{where}: {key!r} must be a non-negative integer")
    return value


@dataclass(frozen=True)
class DesiredState:
    """What one device (or ``"*"``: every device of ``fleet``) must run.

    ``sequence`` only grows: the director keeps one counter per fleet, so every
    document a device can receive (its own or the fleet's) has a higher number
    than the ones signed before it. A rollback is a new document with a higher
    sequence whose ``action`` is ``"rollback"``.
    """

    fleet: str
    device: str
    bundle: str
    version: str
    target: str
    length: int
    hashes: dict[str, str]
    sequence: int
    expires: _dt.datetime
    issued: _dt.datetime
    deployment: str | None = None
    rollout: str | None = None
    action: str = "install"
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields of a newer schema minor version this code does not know (kept, signed)."""
    model_entries: Mapping[str, ModelEntry] | None = None
    """Schema 2: the full set of models by name; None for a schema-1 document."""

    @property
    def sha256(self) -> str:
        return self.hashes["sha256"]

    @property
    def schema2(self) -> bool:
        """Whether the document names the device's full set of models (absent = removed)."""
        return self.model_entries is not None

    @classmethod
    def for_models(
        cls,
        *,
        fleet: str,
        device: str,
        models: Mapping[str, ModelEntry],
        sequence: int,
        expires: _dt.datetime,
        issued: _dt.datetime,
    ) -> DesiredState:
        """A schema-2 document: ``models`` is every model the device must serve."""
        return cls(fleet=fleet, device=device, bundle="", version="", target="", length=0, hashes={},
                   sequence=sequence, expires=expires, issued=issued, model_entries=dict(models))

    def models(self) -> dict[str, ModelEntry]:
        """The model entries: schema 2's set, or schema 1's one bundle under its name."""
        if self.model_entries is not None:
            return dict(self.model_entries)
        serving = self.extra.get("serving_version")
        return {self.bundle: ModelEntry(
            bundle=self.bundle, version=self.version, target=self.target, length=self.length,
            hashes=dict(self.hashes),
            serving_version=serving if isinstance(serving, int) and not isinstance(serving, bool) else None,
            deployment=self.deployment, rollout=self.rollout, action=self.action,
        )}

    def for_model(self, name: str) -> DesiredState:
        """The schema-1 view of one model's entry (what the TUF check of its bundle reads)."""
        entry = self.models().get(name)
        if entry is None:
            raise MalformedDesiredStateError(
                f"desired state (sequence {self.sequence}) names no model {name!r} "
                f"(it names {', '.join(sorted(self.models())) or 'none'})"
            )
        return DesiredState(fleet=self.fleet, device=self.device, bundle=entry.bundle, version=entry.version,
                            target=entry.target, length=entry.length, hashes=dict(entry.hashes),
                            sequence=self.sequence, expires=self.expires, issued=self.issued,
                            deployment=entry.deployment, rollout=entry.rollout, action=entry.action)

    def to_dict(self) -> dict[str, Any]:
        if self.model_entries is not None:
            doc2: dict[str, Any] = dict(self.extra)
            doc2.update({
                "_type": DESIRED_STATE_TYPE,
                "schema": 2,
                "fleet": self.fleet,
                "device": self.device,
                "sequence": int(self.sequence),
                "expires": format_utc(self.expires),
                "issued": format_utc(self.issued),
                "models": {name: entry.to_dict() for name, entry in sorted(self.model_entries.items())},
            })
            return doc2
        doc: dict[str, Any] = dict(self.extra)
        doc.update({
            "_type": DESIRED_STATE_TYPE,
            "schema": DESIRED_STATE_SCHEMA,
            "fleet": self.fleet,
            "device": self.device,
            "bundle": self.bundle,
            "version": self.version,
            "target": self.target,
            "length": int(self.length),
            "hashes": dict(self.hashes),
            "sequence": int(self.sequence),
            "expires": format_utc(self.expires),
            "issued": format_utc(self.issued),
            "deployment": self.deployment,
            "rollout": self.rollout,
            "action": self.action,
        })
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> DesiredState:
        """Validate the signed part of a desired-state envelope."""
        if not isinstance(doc, Mapping):
            raise MalformedDesiredStateError("desired state: 'signed' is not an object")
        if doc.get("_type") != DESIRED_STATE_TYPE:
            raise MalformedDesiredStateError(
                f"desired state: _type is {doc.get('_type')!r}, expected {DESIRED_STATE_TYPE!r}"
            )
        schema = doc.get("schema")
        if schema not in DESIRED_STATE_SCHEMAS or isinstance(schema, bool):
            raise MalformedDesiredStateError(
                f"desired state schema {schema!r} is not supported (this device reads "
                f"{', '.join(map(str, DESIRED_STATE_SCHEMAS))}); upgrade the agent"
            )

        def text(key: str, optional: bool = False) -> str | None:
            return _text(doc, key, "desired state", optional)

        def integer(key: str) -> int:
            return _integer(doc, key, "desired state")  # type: ignore[return-value]

        try:
            expires = parse_utc(doc.get("expires"))  # type: ignore[arg-type]
            issued = parse_utc(doc.get("issued"))  # type: ignore[arg-type]
        except ValueError as exc:
            raise MalformedDesiredStateError(f"desired state: {exc}") from None
        if schema == 2:
            models = doc.get("models")
            if not isinstance(models, Mapping):
                raise MalformedDesiredStateError("desired state schema 2: 'models' must be an object")
            entries: dict[str, ModelEntry] = {}
            for name, item in models.items():
                try:
                    check_name(name)
                except BadInputError as exc:
                    raise MalformedDesiredStateError(f"desired state: model {exc.message}") from None
                entries[name] = ModelEntry.from_dict(item, f"desired state model {name!r}")
            known2 = {"_type", "schema", "fleet", "device", "sequence", "expires", "issued", "models"}
            return cls(
                fleet=text("fleet"),  # type: ignore[arg-type]
                device=text("device"),  # type: ignore[arg-type]
                bundle="", version="", target="", length=0, hashes={},
                sequence=integer("sequence"),
                expires=expires,
                issued=issued,
                extra={k: v for k, v in doc.items() if k not in known2},
                model_entries=entries,
            )
        entry = ModelEntry.from_dict({k: doc.get(k) for k in _ENTRY_FIELDS if k in doc})
        known = {"_type", "schema", "fleet", "device", "sequence", "expires", "issued", *_ENTRY_FIELDS}
        return cls(
            fleet=text("fleet"),  # type: ignore[arg-type]
            device=text("device"),  # type: ignore[arg-type]
            bundle=entry.bundle,
            version=entry.version,
            target=entry.target,
            length=entry.length,
            hashes=entry.hashes,
            sequence=integer("sequence"),
            expires=expires,
            issued=issued,
            deployment=entry.deployment,
            rollout=entry.rollout,
            action=entry.action,
            extra={k: v for k, v in doc.items() if k not in known},
        )


# -- keys ------------------------------------------------------------------------------------------

PublicKeyLike = Union[Ed25519PublicKey, bytes, str, "os.PathLike[str]"]


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def director_key_id(public_key: Ed25519PublicKey) -> str:
    """The key's id and fingerprint: sha256 of the raw 32-byte public key, hex."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()


def generate_director_key(private_path: str | os.PathLike[str], public_path: str | os.PathLike[str]) -> str:
    """Create a director key pair (private PEM 0600, public PEM 0644); return its key id."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(private_path, private_pem, mode=0o600)
    atomic_write_bytes(public_path, public_pem, mode=0o644)
    return director_key_id(key.public_key())


def load_director_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read the director's private key (PKCS#8 PEM)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EdgeshipError(f"director key {path} cannot be read: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"director key {path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInputError(f"director key {path} is not an ed25519 key")
    return key


def load_director_public_key(path: str | os.PathLike[str] | bytes) -> Ed25519PublicKey:
    """Read the director's public key (SubjectPublicKeyInfo PEM), from a path or PEM bytes."""
    if isinstance(path, bytes):
        data, where = path, "director public key"
    else:
        where = f"director public key {path}"
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise EdgeshipError(f"{where} cannot be read: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"{where} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadInputError(f"{where} is not an ed25519 key")
    return key


def _as_public_key(public_key: PublicKeyLike) -> Ed25519PublicKey:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    return load_director_public_key(public_key)


# -- sign and verify -------------------------------------------------------------------------------

def sign_desired_state(state: DesiredState, private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed envelope ``{"signed": ..., "signatures": [{"keyid", "sig"}]}``."""
    for name, entry in state.models().items():
        if entry.action not in ACTIONS:
            raise BadInputError(f"model {name}: action {entry.action!r} is not one of {list(ACTIONS)}")
        if "sha256" not in entry.hashes:
            raise BadInputError(f"model {name}: a desired state needs a sha256 hash of its target")
    signed = state.to_dict()
    signature = private_key.sign(canonical_json(signed))
    return {
        "signed": signed,
        "signatures": [{"keyid": director_key_id(private_key.public_key()), "sig": signature.hex()}],
    }


def verify_desired_state(
    envelope: Mapping[str, Any],
    public_key: PublicKeyLike,
    *,
    device: str,
    fleet: str,
    last_sequence: int | None,
    now: _dt.datetime,
) -> DesiredState:
    """Check a director envelope on the device; return the desired state it carries.

    Checks, in order: shape; a signature by the trusted key (any other key id is
    refused); the signature itself; the document's schema; that it is for this
    fleet and this device (or ``"*"``); that it has not expired at ``now``; that
    its sequence is not lower than ``last_sequence`` (equal is the same document
    delivered again, e.g. a retained message after a restart, and is accepted).

    Raises:
        DirectorError: a subclass naming what failed.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    key = _as_public_key(public_key)
    if not isinstance(envelope, Mapping) or not isinstance(envelope.get("signed"), Mapping):
        raise MalformedDesiredStateError("desired state envelope has no 'signed' object")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise MalformedDesiredStateError("desired state envelope is unsigned (no 'signatures')")
    trusted_id = director_key_id(key)
    ours = [s for s in signatures if isinstance(s, Mapping) and s.get("keyid") == trusted_id]
    if not ours:
        others = ", ".join(str(s.get("keyid"))[:16] for s in signatures if isinstance(s, Mapping))
        raise DirectorKeyError(
            f"desired state is signed by key(s) {others or '?'}..., not by the director key this device "
            f"trusts ({trusted_id[:16]}...)"
        )
    payload = canonical_json(dict(envelope["signed"]))
    for signature in ours:
        sig = signature.get("sig")
        try:
            key.verify(bytes.fromhex(sig) if isinstance(sig, str) else b"", payload)
            break
        except (InvalidSignature, ValueError):
            continue
    else:
        raise DirectorSignatureError(
            f"desired state signature by director key {trusted_id[:16]}... does not verify: the document "
            "was altered or the signature is forged"
        )
    state = DesiredState.from_dict(envelope["signed"])
    if state.fleet != fleet:
        raise WrongDeviceError(f"desired state is for fleet {state.fleet!r}, this device is in fleet {fleet!r}")
    if state.device not in ("*", device):
        raise WrongDeviceError(f"desired state is for device {state.device!r}, this device is {device!r}")
    if state.expires <= now:
        raise ExpiredDesiredStateError(
            f"desired state (sequence {state.sequence}) expired at {format_utc(state.expires)}; the device's "
            f"clock says {format_utc(now)}"
        )
    if last_sequence is not None and state.sequence < last_sequence:
        raise ReplayedDesiredStateError(
            f"desired state has sequence {state.sequence}, lower than {last_sequence} already accepted: "
            "a replayed old document"
        )
    return state
