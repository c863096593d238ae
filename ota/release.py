"""The release repository on the host: a TUF repository written with ``tuf.api.metadata``,
plus the director's key and sequence counters (see docs/trust.md).

One concept over 500 lines: every write to the repository folder (keys, roles, targets,
rotation, refresh, export) goes through one object that holds its lock and signers.

Layout of a repository folder::

    config.json            expiry of each role (seconds)
    metadata/              as a TUF repository serves it: N.root.json (every version),
                           root.json (the newest), timestamp.json, snapshot.json, targets.json
    targets/<name>/<name>-<version>.bundle
    targets/<name>/<name>-<version>.bundle.zst           the bundle compressed (a companion target)
    targets/<name>/deltas/<version>/<base sha256>.delta  a delta from an older bundle (a companion target)
    keys/                  0700; root.key (encrypted with the root passphrase), targets.key,
                           snapshot.key, timestamp.key (0600, online roles)
    director/              director.key (0600), director.pub, sequences.json (last sequence per fleet)

Every change is made under an exclusive lock (``.lock``) and written atomically;
metadata is written targets -> snapshot -> timestamp, so a reader never follows a
timestamp to a snapshot that is not there yet.

Why one module of this size: it is one concept, the release repository, and most of it is one
class whose operations (publish, re-sign, rotate a key, verify a bundle) share the lock, the
keys and the write order above; splitting them would spread one invariant over several files.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_EXPIRY",
    "MAX_EXPIRY_SECONDS",
    "COMPANION_KINDS",
    "DEFAULT_DELTA_BASES",
    "ROLES",
    "Companion",
    "ReleaseRepository",
    "TargetInfo",
    "companion_path",
    "next_serving_version",
    "VersionNotNewerError",
    "decode_private_key",
    "encode_private_key",
    "key_fingerprint",
    "parse_duration",
]

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from .atomicfile import atomic_write_bytes, atomic_write_json, fsync_dir
from .bundle import CHUNK_SIZE, BundleScan, scan_bundle
from .delivery import companion_path
from .director import (
    DesiredState,
    director_key_id,
    format_utc,
    generate_director_key,
    load_director_private_key,
    load_director_public_key,
    sign_desired_state,
)
from .errors import BadInputError, EdgeshipError
from .fetchers import LocalFolderFetcher
from .hashing import hash_file
from .offline import write_offline_package
from .versions import check_name, compare_versions, parse_version

ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRY: dict[str, int] = {
    "root": 365 * 86400,
    "targets": 365 * 86400,
    "snapshot": 7 * 86400,
    "timestamp": 1 * 86400,
}
"""Seconds each role's metadata stays valid after it is signed (timestamp a day, as
production TUF deployments do; the controller re-signs it with ``refresh``)."""

MAX_EXPIRY_SECONDS = 100 * 365 * 86400
"""The longest validity a role may be given (a century; more cannot even be signed as a date)."""

COMPANION_KINDS = ("compressed", "delta")
"""Targets that carry a published bundle in fewer bytes (docs/deltas.md): the same bundle compressed
with zstd, and deltas from older bundles of the same name. Each is a TUF target of its own (length and
sha256 signed); what it rebuilds is checked against the bundle's own signed hash."""

DEFAULT_DELTA_BASES = 2
"""How many of the latest published versions ``publish`` builds deltas from (``deltas`` in config.json)."""

Passphrase = Union[str, bytes]
ProgressCallback = Callable[[str, int, int], None]
_SERIALIZER = JSONSerializer(compact=False)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdwy]?)$")
_UNITS = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


class VersionNotNewerError(BadInputError):
    """Publishing a version that is not newer than every published version of its name."""


def parse_duration(text: str) -> int:
    """``"30s"``, ``"12h"``, ``"7d"``, ``"2w"``, ``"1y"`` (a bare number is days) -> seconds."""
    match = _DURATION.match(str(text).strip())
    if not match:
        raise BadInputError(f"duration {text!r} is not of the form 30s, 12h, 7d, 2w or 1y")
    seconds = int(float(match.group(1)) * _UNITS[match.group(2)])
    if seconds <= 0:
        raise BadInputError(f"duration {text!r} must be positive")
    if seconds > MAX_EXPIRY_SECONDS:
        raise BadInputError(f"duration {text!r} is longer than 100 years, the most allowed")
    return seconds


def key_fingerprint(key: SSlibKey) -> str:
    """The TUF key id (sha256 of the key's canonical JSON), which is its fingerprint."""
    return str(key.keyid)


def _utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def _as_bytes(passphrase: Passphrase | None, what: str = "root passphrase") -> bytes:
    if passphrase is None:
        raise BadInputError(f"a {what} is needed (prompt, or the EDGESHIP_ROOT_PASSPHRASE environment variable)")
    data = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if len(data) < 8:
        raise BadInputError(f"the {what} must be at least 8 characters")
    return data


@dataclass(frozen=True)
class TargetInfo:
    """A published bundle, as the signed targets metadata lists it."""

    name: str
    version: str
    path: str
    """The TUF target path (``<name>/<name>-<version>.bundle``)."""
    length: int
    sha256: str
    format: str
    runtime: dict[str, Any]
    file: Path
    """Where the bundle lies in the repository."""
    serving_version: int | None = None
    """The model's serving version (an integer that only grows per name; signed in the target's
    custom metadata). None: published before serving versions existed."""
    kind: str = "bundle"
    """``bundle``, or a companion of one: ``compressed`` or ``delta`` (COMPANION_KINDS)."""
    base_version: str | None = None
    """A delta's base: the version of the bundle it is applied to."""
    base_sha256: str | None = None
    """A delta's base: that bundle's sha256 (the device looks the delta up by it)."""
    of: str | None = None
    """A companion's bundle target path (what it rebuilds)."""

    @property
    def hashes(self) -> dict[str, str]:
        return {"sha256": self.sha256}

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "target": self.path,
            "length": self.length,
            "sha256": self.sha256,
            "format": self.format,
            "runtime": self.runtime,
            "file": str(self.file),
            "serving_version": self.serving_version,
            "kind": self.kind,
        }
        if self.kind != "bundle":
            doc.update({"of": self.of, "base_version": self.base_version, "base_sha256": self.base_sha256})
        return doc


@dataclass(frozen=True)
class Companion:
    """A file to publish as a companion of a bundle (``ReleaseRepository.add_companions``)."""

    kind: str
    """``compressed`` or ``delta``."""
    file: Path
    """The file to copy into the repository (a zstd frame, or an ESDELTA1 delta)."""
    base_version: str | None = None
    """A delta's base version (a published version of the same name)."""


def _serving_version(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def next_serving_version(published: Iterable[TargetInfo], name: str) -> int:
    """The serving version a new version of model ``name`` gets at publish (pure).

    The next integer after the highest published for that name. Versions published before serving
    versions existed carry none; they still count (the first signed number is above how many
    versions of the name there already are), so a number never names two versions of a model.
    """
    mine = [t for t in published if t.name == name]
    return max([len(mine), *(t.serving_version or 0 for t in mine)]) + 1


ROOT_KEY_KDF_ROUNDS = 32
"""bcrypt rounds for the encrypted root key (about half a second per use on a small CPU)."""


def encode_private_key(key: Ed25519PrivateKey, passphrase: bytes | None) -> bytes:
    """A private key as PEM: unencrypted PKCS#8, or, with a passphrase, the OpenSSH key format
    encrypted under bcrypt's KDF.

    Why not encrypted PKCS#8: ``cryptography`` writes it with PBKDF2 at 2,048 iterations and no
    way to raise them, which a stolen key file does not survive against a GPU for long. bcrypt
    (``ROOT_KEY_KDF_ROUNDS``) is memory-hard and tunable, and ``ssh-keygen`` reads the file too.
    """
    if not passphrase:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    encryption = serialization.PrivateFormat.OpenSSH.encryption_builder().kdf_rounds(ROOT_KEY_KDF_ROUNDS)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             encryption.build(passphrase))


def decode_private_key(pem: bytes, password: bytes | None) -> Any:
    """Read what ``encode_private_key`` wrote (and encrypted PKCS#8 from earlier repositories).

    Raises ValueError or TypeError when the passphrase is wrong or missing.
    """
    if pem.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
        return serialization.load_ssh_private_key(pem, password=password)
    return serialization.load_pem_private_key(pem, password=password)


class ReleaseRepository:
    """A release repository folder (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.metadata_dir = self.path / "metadata"
        self.targets_dir = self.path / "targets"
        self.keys_dir = self.path / "keys"
        self.director_dir = self.path / "director"

    # -- paths ----------------------------------------------------------------------------------

    @property
    def root_metadata_path(self) -> Path:
        """The trusted root metadata a device is provisioned with (the newest root)."""
        return self.metadata_dir / "root.json"

    @property
    def director_public_key_path(self) -> Path:
        """The director's public key a device is provisioned with."""
        return self.director_dir / "director.pub"

    def _key_path(self, role: str) -> Path:
        return self.keys_dir / f"{role}.key"

    def exists(self) -> bool:
        return (self.metadata_dir / "timestamp.json").is_file()

    def _require(self) -> None:
        if not self.exists():
            raise BadInputError(
                f"{self.path} is not an edgeship release repository (no metadata/timestamp.json); "
                f"create one with: edgeship keys init --repo {self.path}"
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    # -- configuration --------------------------------------------------------------------------

    def expiry(self) -> dict[str, int]:
        """Seconds of validity per role (config.json, defaults for what it lacks)."""
        config_path = self.path / "config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except ValueError as exc:
                raise BadInputError(f"{config_path} is not valid JSON: {exc}") from None
        values = dict(DEFAULT_EXPIRY)
        try:
            values.update({k: int(v) for k, v in (config.get("expiry_seconds") or {}).items() if k in ROLES})
        except (TypeError, ValueError, AttributeError):
            raise BadInputError(f"{config_path}: expiry_seconds must map roles to whole seconds") from None
        for role, seconds in values.items():
            if not 0 < seconds <= MAX_EXPIRY_SECONDS:
                raise BadInputError(f"{config_path}: the expiry of {role} ({seconds} s) must be between 1 second "
                                    "and 100 years; correct it in that file")
        return values

    def _set_expiry(self, changes: Mapping[str, int] | None) -> dict[str, int]:
        values = self.expiry()
        for role, seconds in (changes or {}).items():
            if role not in ROLES:
                raise BadInputError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
            if int(seconds) <= 0:
                raise BadInputError(f"expiry of {role} must be positive")
            if int(seconds) > MAX_EXPIRY_SECONDS:
                raise BadInputError(f"expiry of {role} must be at most {MAX_EXPIRY_SECONDS} seconds (100 years)")
            values[role] = int(seconds)
        if changes:
            atomic_write_json(self.path / "config.json", {**self._config(), "schema": 1, "expiry_seconds": values})
        return values

    def _config(self) -> dict[str, Any]:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            return {}
        try:
            config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise BadInputError(f"{config_path} is not valid JSON: {exc}") from None
        return config if isinstance(config, dict) else {}

    def delta_bases(self) -> int:
        """How many of the latest published versions ``publish`` builds deltas from: ``deltas`` in
        config.json (0: none), default DEFAULT_DELTA_BASES."""
        value = self._config().get("deltas", DEFAULT_DELTA_BASES)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100:
            raise BadInputError(f"{self.path / 'config.json'}: deltas must be a whole number from 0 to 100, "
                                f"got {value!r}")
        return value

    # -- keys -----------------------------------------------------------------------------------

    def _write_key(self, role: str, key: Ed25519PrivateKey, passphrase: bytes | None) -> None:
        atomic_write_bytes(self._key_path(role), encode_private_key(key, passphrase), mode=0o600)

    def _signer(self, role: str, passphrase: Passphrase | None = None) -> CryptoSigner:
        path = self._key_path(role)
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            raise BadInputError(f"the {role} key {path} is missing") from None
        password = _as_bytes(passphrase) if role == "root" else None
        try:
            key = decode_private_key(pem, password)
        except (ValueError, TypeError):
            if role == "root":
                raise BadInputError(f"the root passphrase does not decrypt {path}") from None
            raise BadInputError(f"the {role} key {path} is not a readable PEM private key") from None
        return CryptoSigner(key)

    # -- metadata -------------------------------------------------------------------------------

    def _load(self, role: str) -> Metadata:
        path = self.metadata_dir / f"{role}.json"
        try:
            return Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise BadInputError(f"{path} is missing: the repository is incomplete") from None
        except (DeserializationError, OSError, ValueError) as exc:
            raise EdgeshipError(f"{path} cannot be read as TUF metadata: {exc}") from None

    def _sign_write(self, md: Metadata, signers: list[CryptoSigner], now: _dt.datetime) -> None:
        role = md.signed.type
        md.signed.expires = now + _dt.timedelta(seconds=self.expiry()[role])
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        data = md.to_bytes(_SERIALIZER)
        if role == "root":
            atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.root.json", data, mode=0o644)
        atomic_write_bytes(self.metadata_dir / f"{role}.json", data, mode=0o644)

    def _resign(self, roles: list[str], now: _dt.datetime, *, bump_targets: bool = False) -> None:
        """Re-sign targets (optionally), then snapshot and timestamp, each with a new version."""
        if "targets" in roles or bump_targets:
            targets = self._load("targets")
            targets.signed.version += 1
            self._sign_write(targets, [self._signer("targets")], now)
        targets_version = self._load("targets").signed.version
        if "snapshot" in roles:
            snapshot = self._load("snapshot")
            snapshot.signed.version += 1
            snapshot.signed.meta["targets.json"] = MetaFile(version=targets_version)
            self._sign_write(snapshot, [self._signer("snapshot")], now)
        snapshot_version = self._load("snapshot").signed.version
        timestamp = self._load("timestamp")
        timestamp.signed.version += 1
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot_version)
        self._sign_write(timestamp, [self._signer("timestamp")], now)

    # -- init -----------------------------------------------------------------------------------

    def init(
        self,
        *,
        root_passphrase: Passphrase,
        expiry: Mapping[str, int] | None = None,
        now: _dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Create keys for every role and the director, and version 1 of all metadata.

        Raises:
            BadInputError: the folder already holds a repository, or the passphrase is too short.
        """
        passphrase = _as_bytes(root_passphrase)
        now = now or _utc_now()
        if self.exists() or self._key_path("root").exists():
            raise BadInputError(f"{self.path} already holds a release repository; nothing was changed")
        try:
            self._create(passphrase, expiry, now)
        except OSError as exc:
            raise EdgeshipError(f"cannot create a release repository in {self.path}: {exc.strerror or exc}") from None
        return self.fingerprints()

    def _create(self, passphrase: bytes, expiry: Mapping[str, int] | None, now: _dt.datetime) -> None:
        with self._locked():
            for folder in (self.metadata_dir, self.targets_dir, self.director_dir):
                folder.mkdir(parents=True, exist_ok=True)
            self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.keys_dir, 0o700)
            self._set_expiry(expiry or dict(DEFAULT_EXPIRY))
            root = Root(version=1, consistent_snapshot=False)
            for role in ROLES:
                key = Ed25519PrivateKey.generate()
                self._write_key(role, key, passphrase if role == "root" else None)
                root.add_key(SSlibKey.from_crypto(key.public_key()), role)
            self._sign_write(Metadata(Targets(version=1)), [self._signer("targets")], now)
            self._sign_write(Metadata(Snapshot(version=1)), [self._signer("snapshot")], now)
            self._sign_write(Metadata(Timestamp(version=1)), [self._signer("timestamp")], now)
            self._sign_write(Metadata(root), [self._signer("root", passphrase)], now)
            generate_director_key(self.director_dir / "director.key", self.director_public_key_path)
            atomic_write_json(self.director_dir / "sequences.json", {})
            fsync_dir(self.path)

    def fingerprints(self) -> dict[str, Any]:
        """Key ids of every role and the director, and the two provisioning files."""
        self._require()
        root = self._load("root").signed
        keys = {role: [key_fingerprint(root.get_key(k)) for k in root.roles[role].keyids] for role in ROLES}
        director = load_director_public_key(self.director_public_key_path)
        return {
            "repository": str(self.path),
            "keys": keys,
            "director_key": director_key_id(director),
            "root_metadata": str(self.root_metadata_path),
            "director_public_key": str(self.director_public_key_path),
            "root_version": root.version,
        }

    # -- targets --------------------------------------------------------------------------------

    def _all_targets(self) -> list[TargetInfo]:
        found: list[TargetInfo] = []
        for path, target in self._load("targets").signed.targets.items():
            custom = target.custom if isinstance(target.custom, dict) else {}
            kind = str(custom.get("kind") or "bundle")
            found.append(TargetInfo(
                name=str(custom.get("name", "")),
                version=str(custom.get("version", "")),
                path=path,
                length=target.length,
                sha256=target.hashes.get("sha256", ""),
                format=str(custom.get("format", "")),
                runtime=dict(custom.get("runtime") or {}),
                file=self.targets_dir / path,
                serving_version=_serving_version(custom.get("serving_version")),
                kind=kind,
                base_version=str(custom["base_version"]) if custom.get("base_version") else None,
                base_sha256=str(custom["base_sha256"]) if custom.get("base_sha256") else None,
                of=str(custom["of"]) if custom.get("of") else None,
            ))
        found.sort(key=lambda t: (t.name, parse_version(t.version) if t.version else ((), 0, ()), t.path))
        return found

    def targets(self) -> list[TargetInfo]:
        """Every published bundle, sorted by name then version (companions: ``companions``)."""
        self._require()
        return [t for t in self._all_targets() if t.kind == "bundle"]

    def companions(self, name: str, version: str) -> list[TargetInfo]:
        """The companion targets of bundle ``name`` ``version``: its compressed copy first, then its
        deltas by base version (newest base first)."""
        self._require()
        found = [t for t in self._all_targets() if t.kind in COMPANION_KINDS and t.name == name
                 and t.version and compare_versions(t.version, version) == 0]
        found.sort(key=_companion_order)
        return found

    def target_info(self, name: str, version: str) -> TargetInfo:
        """The published bundle ``name`` ``version``.

        Raises:
            BadInputError: it is not published (the message lists the versions that are).
        """
        matches = [t for t in self.targets() if t.name == name]
        for target in matches:
            if compare_versions(target.version, version) == 0:
                return target
        known = ", ".join(t.version for t in matches) or "none"
        raise BadInputError(f"bundle {name} {version} is not published in {self.path} (published versions: {known})")

    def publish(
        self,
        bundle_path: str | os.PathLike[str],
        *,
        now: _dt.datetime | None = None,
        progress: ProgressCallback | None = None,
    ) -> TargetInfo:
        """Check the bundle, copy it into ``targets/`` and sign new targets, snapshot, timestamp.

        Raises:
            UnsafeBundleError: the bundle does not pass the extraction checks.
            VersionNotNewerError: an equal or newer version of the name is published.
        """
        self._require()
        now = now or _utc_now()
        scan: BundleScan = scan_bundle(bundle_path, progress=progress)
        manifest = scan.manifest
        with self._locked():
            for published in self.targets():
                if published.name == manifest.name and compare_versions(manifest.version, published.version) <= 0:
                    raise VersionNotNewerError(
                        f"{manifest.name} {manifest.version} is not newer than the published "
                        f"{published.name} {published.version}; publish a higher version"
                    )
            path = f"{manifest.name}/{manifest.name}-{manifest.version}.bundle"
            destination = self.targets_dir / path
            destination.parent.mkdir(parents=True, exist_ok=True)
            _copy_verified(Path(bundle_path), destination, scan.length, scan.sha256)
            custom = {"name": manifest.name, "version": manifest.version, "format": manifest.format,
                      "runtime": manifest.runtime,
                      "serving_version": next_serving_version(self.targets(), manifest.name)}
            targets = self._load("targets")
            targets.signed.targets[path] = TargetFile(
                length=scan.length, hashes={"sha256": scan.sha256}, path=path,
                unrecognized_fields={"custom": custom},
            )
            targets.signed.version += 1
            self._sign_write(targets, [self._signer("targets")], now)
            self._resign(["snapshot", "timestamp"], now)
        return self.target_info(manifest.name, manifest.version)

    def add_companions(self, name: str, version: str, files: Sequence[Companion], *,
                       now: _dt.datetime | None = None) -> list[TargetInfo]:
        """Publish ``files`` as companions of the published bundle ``name`` ``version``: each is
        checked to rebuild that bundle bit for bit (a compressed copy decompressed, a delta applied
        to its base, both streaming), copied into ``targets/`` and signed, all with one new version
        of targets, snapshot and timestamp.

        The check is the device's (docs/deltas.md): a companion that does not rebuild the bundle would
        be refused by every device, after costing each its bytes, so it is refused here first.

        Raises:
            BadInputError: the bundle or a delta's base version is not published, or a kind is unknown.
            SecurityError (DeltaError, TargetHashError): a file does not rebuild the bundle.
        """
        self._require()
        now = now or _utc_now()
        if not files:
            return []
        bundle = self.target_info(name, version)
        checked: list[tuple[Companion, str, int, str, dict[str, Any]]] = []
        with tempfile.TemporaryDirectory(prefix="edgeship-companion-", dir=self.path) as scratch:
            for companion in files:
                custom: dict[str, Any] = {"kind": companion.kind, "name": bundle.name, "version": bundle.version,
                                          "of": bundle.path}
                if companion.kind == "compressed":
                    _check_compressed(Path(companion.file), bundle)
                    path = companion_path(bundle.name, bundle.version, "compressed")
                elif companion.kind == "delta":
                    if not companion.base_version:
                        raise BadInputError(f"a delta for {name} {version} needs its base version")
                    base = self.target_info(name, companion.base_version)
                    _check_delta(Path(companion.file), base, bundle, Path(scratch))
                    custom.update({"base_version": base.version, "base_sha256": base.sha256})
                    path = companion_path(bundle.name, bundle.version, "delta", base.sha256)
                else:
                    raise BadInputError(f"unknown companion kind {companion.kind!r} (known: "
                                        f"{', '.join(COMPANION_KINDS)})")
                length, sha256 = _hash_file(Path(companion.file))
                checked.append((companion, path, length, sha256, custom))
        with self._locked():
            targets = self._load("targets")
            for companion, path, length, sha256, custom in checked:
                destination = self.targets_dir / path
                destination.parent.mkdir(parents=True, exist_ok=True)
                _copy_verified(Path(companion.file), destination, length, sha256)
                targets.signed.targets[path] = TargetFile(length=length, hashes={"sha256": sha256}, path=path,
                                                          unrecognized_fields={"custom": custom})
            targets.signed.version += 1
            self._sign_write(targets, [self._signer("targets")], now)
            self._resign(["snapshot", "timestamp"], now)
        published = {path for _, path, _, _, _ in checked}
        return [t for t in self.companions(name, version) if t.path in published]

    def verify_bundle(self, bundle_path: str | os.PathLike[str], *, now: _dt.datetime | None = None,
                      progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Check a bundle file against this repository, offline, as a device would.

        The repository's metadata is verified with python-tuf from its first root
        (every rotation followed; signatures, versions, expiry at ``now``); then the
        bundle's length and sha256 must equal what targets.json signed for its name
        and version, and the bundle must pass every extraction check.
        """
        from .updater import TargetMismatchError, TargetNotFoundError, _refresh

        self._require()
        now = now or _utc_now()
        with tempfile.TemporaryDirectory(prefix="edgeship-verify-") as trust:
            first_root = self.metadata_dir / "1.root.json"
            shutil.copyfile(first_root, Path(trust) / "root.json")
            updater = _refresh(Path(trust), LocalFolderFetcher(self.path), now)
            scan = scan_bundle(bundle_path, progress=progress)
            manifest = scan.manifest
            path = f"{manifest.name}/{manifest.name}-{manifest.version}.bundle"
            info = updater.get_targetinfo(path)
        if info is None:
            raise TargetNotFoundError(
                f"{manifest.name} {manifest.version} is not published in {self.path}: the bundle is not released"
            )
        if info.length != scan.length or info.hashes.get("sha256") != scan.sha256:
            raise TargetMismatchError(
                f"bundle {bundle_path} is not the released {manifest.name} {manifest.version}: sha256 "
                f"{scan.sha256[:16]}... / {scan.length} bytes, signed {info.hashes.get('sha256', '')[:16]}... / "
                f"{info.length} bytes"
            )
        return {"name": manifest.name, "version": manifest.version, "target": path, "length": scan.length,
                "sha256": scan.sha256, "verified": True}

    # -- status and refresh ---------------------------------------------------------------------

    def status(self, *, now: _dt.datetime | None = None) -> dict[str, Any]:
        """Roles (version, expiry, key ids), published targets and the provisioning files."""
        self._require()
        now = now or _utc_now()
        roles: dict[str, Any] = {}
        everything = self._all_targets()
        bundles = [t for t in everything if t.kind == "bundle"]
        companions: dict[tuple[str, str], list[TargetInfo]] = {}
        for target in everything:
            if target.kind in COMPANION_KINDS:
                companions.setdefault((target.name, target.version), []).append(target)
        for listed in companions.values():
            listed.sort(key=_companion_order)
        root = self._load("root").signed
        for role in ROLES:
            signed = self._load(role).signed
            remaining = (signed.expires - now).total_seconds()
            roles[role] = {
                "version": signed.version,
                "expires": format_utc(signed.expires),
                "expires_in_seconds": int(remaining),
                "expired": remaining <= 0,
                "keys": list(root.roles[role].keyids),
                "validity_seconds": self.expiry()[role],
            }
        return {
            "repository": str(self.path),
            "roles": roles,
            "targets": [{**t.to_dict(), "companions": [c.to_dict() for c in companions.get((t.name, t.version), [])]}
                        for t in bundles],
            "root_metadata": str(self.root_metadata_path),
            "director_public_key": str(self.director_public_key_path),
            "director_key": director_key_id(load_director_public_key(self.director_public_key_path)),
            "sequences": self._sequences(),
        }

    def refresh(
        self,
        *,
        now: _dt.datetime | None = None,
        expiry: Mapping[str, int] | None = None,
        targets: bool | None = None,
        root_passphrase: Passphrase | None = None,
    ) -> dict[str, Any]:
        """Re-sign timestamp and snapshot (and targets, root when due or asked) with fresh expiries.

        Args:
            expiry: new validity (seconds) per role, saved in config.json first.
            targets: re-sign targets.json too; None (the default) does it when less than a
                tenth of its validity is left, so a controller calling this daily keeps
                every online role alive.
            root_passphrase: also re-sign root (same key, next version): the root key is
                offline, so this is never automatic.
        """
        self._require()
        now = now or _utc_now()
        with self._locked():
            validity = self._set_expiry(expiry)
            if targets is None:
                left = (self._load("targets").signed.expires - now).total_seconds()
                targets = left < validity["targets"] / 10
            if root_passphrase is not None:
                root = self._load("root")
                root.signed.version += 1
                self._sign_write(root, [self._signer("root", root_passphrase)], now)
            self._resign(["snapshot", "timestamp"] + (["targets"] if targets else []), now)
        return self.status(now=now)

    # -- rotation -------------------------------------------------------------------------------

    def rotate(
        self,
        role: str,
        *,
        root_passphrase: Passphrase | None = None,
        new_root_passphrase: Passphrase | None = None,
        now: _dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Replace ``role``'s key; the old key is revoked (no longer trusted by devices).

        ``root``, ``targets``, ``snapshot`` and ``timestamp`` need the root passphrase:
        a new root version is signed (for root: by the old *and* the new key, so a
        device on the old root follows the chain). ``director`` replaces the
        director's key pair; devices must then be provisioned with the new public key.
        """
        self._require()
        now = now or _utc_now()
        if role == "director":
            with self._locked():
                key_id = generate_director_key(self.director_dir / "director.key", self.director_public_key_path)
            return {"role": "director", "director_key": key_id,
                    "director_public_key": str(self.director_public_key_path),
                    "note": "devices must be provisioned with the new director public key"}
        if role not in ROLES:
            raise BadInputError(f"unknown role {role!r}; roles are {', '.join(ROLES)}, director")
        with self._locked():
            old_root_signer = self._signer("root", root_passphrase)
            root_md = self._load("root")
            root = root_md.signed
            old_keyids = list(root.roles[role].keyids)
            new_key = Ed25519PrivateKey.generate()
            new_public = SSlibKey.from_crypto(new_key.public_key())
            for keyid in old_keyids:
                root.revoke_key(keyid, role)
            root.add_key(new_public, role)
            root.version += 1
            if role == "root":
                new_passphrase = _as_bytes(new_root_passphrase if new_root_passphrase is not None
                                           else root_passphrase)
                new_signer = CryptoSigner(new_key)
                # the new key is kept beside the old one until the new root is written
                pending = self._key_path("root").with_suffix(".key.new")
                atomic_write_bytes(pending, encode_private_key(new_key, new_passphrase), mode=0o600)
                # signed by the old root (trusted by devices) and the new one (self-signed, spec 5.3.4-5)
                self._sign_write(root_md, [old_root_signer, new_signer], now)
                os.replace(pending, self._key_path("root"))
                fsync_dir(self.keys_dir)
            else:
                self._sign_write(root_md, [old_root_signer], now)
                self._write_key(role, new_key, None)
                if role == "targets":
                    self._resign(["targets", "snapshot", "timestamp"], now)
                elif role == "snapshot":
                    self._resign(["snapshot", "timestamp"], now)
                else:
                    self._resign(["timestamp"], now)
        return {"role": role, "revoked": old_keyids, "new_key": new_public.keyid, "root_version": root.version,
                "root_metadata": str(self.root_metadata_path)}

    # -- director -------------------------------------------------------------------------------

    def _sequences(self) -> dict[str, int]:
        path = self.director_dir / "sequences.json"
        if not path.is_file():
            return {}
        try:
            return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError) as exc:
            raise EdgeshipError(f"{path} is corrupt ({exc}); restore it: sequence numbers must only grow") from None

    def next_sequence(self, fleet: str) -> int:
        """The next sequence number of ``fleet`` (one counter per fleet, saved before it is used)."""
        with self._locked():
            sequences = self._sequences()
            value = sequences.get(fleet, 0) + 1
            sequences[fleet] = value
            atomic_write_json(self.director_dir / "sequences.json", sequences)
        return value

    def sign_desired(
        self,
        *,
        fleet: str,
        device: str,
        name: str,
        version: str,
        expires_in: _dt.timedelta = _dt.timedelta(days=7),
        deployment: str | None = None,
        rollout: str | None = None,
        action: str = "install",
        now: _dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Build and sign the desired state for ``device`` (or ``"*"``) with the fleet's next sequence."""
        self._require()
        now = now or _utc_now()
        if not fleet or not device:
            raise BadInputError("a desired state needs a fleet and a device (or '*')")
        target = self.target_info(name, version)
        state = DesiredState(
            fleet=fleet,
            device=device,
            bundle=target.name,
            version=target.version,
            target=target.path,
            length=target.length,
            hashes=target.hashes,
            sequence=self.next_sequence(fleet),
            expires=now + expires_in,
            issued=now,
            deployment=deployment,
            rollout=rollout,
            action=action,
        )
        key = load_director_private_key(self.director_dir / "director.key")
        return sign_desired_state(state, key)

    # -- offline packages -----------------------------------------------------------------------

    def export(
        self,
        name: str,
        version: str,
        out: str | os.PathLike[str],
        *,
        fleet: str = "default",
        expires_in: _dt.timedelta = _dt.timedelta(days=30),
        now: _dt.datetime | None = None,
        also: Sequence[tuple[str, str]] = (),
    ) -> dict[str, Any]:
        """Write an offline update package (see :mod:`edgeship.ota.fetchers`) to ``out``.

        ``also``: more (model name, version) pairs: the package then carries every bundle and a
        schema-2 desired state naming them all (multi-model agents only; one model keeps schema 1,
        which every agent reads).

        It holds the bundle, every root version and the current timestamp, snapshot
        and targets metadata, and a director-signed desired state for device ``"*"``
        of ``fleet`` with the fleet's next sequence number. A device verifies it
        exactly as an online update; the metadata must still be unexpired when the
        stick is plugged in (run ``repo refresh`` with a long enough timestamp
        expiry before exporting for sticks that travel).
        """
        self._require()
        check_name(name)
        now = now or _utc_now()
        target = self.target_info(name, version)
        chosen = [target] + [self.target_info(check_name(n), v) for n, v in also]
        names = [t.name for t in chosen]
        if len(set(names)) != len(names):
            raise BadInputError(f"a package holds one version per model; {sorted(n for n in names if names.count(n) > 1)[0]} "
                                "is named twice")
        if len(chosen) == 1:
            envelope = self.sign_desired(fleet=fleet, device="*", name=target.name, version=target.version,
                                         expires_in=expires_in, now=now)
        else:
            from .desired_sets import ModelEntry, build_desired_set, sign_document

            signed = build_desired_set(
                fleet=fleet, device="*", sequence=self.next_sequence(fleet), issued=now, expires=now + expires_in,
                models={t.name: ModelEntry(bundle=t.name, version=t.version, target=t.path, length=t.length,
                                           hashes=t.hashes, serving_version=t.serving_version) for t in chosen})
            envelope = sign_document(signed, load_director_private_key(self.director_dir / "director.key"))
        roots = sorted(self.metadata_dir.glob("*.root.json"), key=lambda p: int(p.name.split(".")[0]))
        metadata = roots + [self.metadata_dir / f"{role}.json" for role in ("timestamp", "snapshot", "targets")]
        try:
            result = write_offline_package(Path(out), metadata=metadata, envelope=envelope, fleet=fleet, now=now,
                                           targets=[(t.path, t.file) for t in chosen])
        except OSError as exc:
            raise EdgeshipError(f"offline package {out} cannot be written: {exc.strerror or exc}") from None
        # the package is usable until the first of its metadata expires (the timestamp, by default a day)
        role, expires = min(((r, self._load(r).signed.expires) for r in ROLES), key=lambda item: item[1])
        result["metadata_expires"] = format_utc(expires)
        result["metadata_expires_role"] = role
        return result

def _companion_order(target: TargetInfo) -> tuple[bool, tuple[int, ...]]:
    """The compressed copy first, then deltas by base version, newest first."""
    base = tuple(-x for x in parse_version(target.base_version)[0]) if target.base_version else ()
    return target.kind != "compressed", base


def _hash_file(path: Path) -> tuple[int, str]:
    try:
        return hash_file(path)
    except OSError as exc:
        raise BadInputError(f"companion file {path} cannot be read: {exc.strerror or exc}") from None


def _check_compressed(path: Path, bundle: TargetInfo) -> None:
    """``path`` decompresses (one zstd frame, streaming, capped at the bundle's length) to ``bundle``."""
    from .compressed import decompress_to

    digest = hashlib.sha256()
    with open(path, "rb") as source:
        length = decompress_to(source, digest.update, bundle.length)
    if length != bundle.length or digest.hexdigest() != bundle.sha256:
        from .updater import TargetHashError

        raise TargetHashError(f"{path} does not decompress to {bundle.path} (sha256 or length differ)")


def _check_delta(path: Path, base: TargetInfo, bundle: TargetInfo, scratch: Path) -> None:
    """``path`` applied to ``base`` rebuilds ``bundle`` bit for bit (written to ``scratch``, removed)."""
    from .delta import apply_delta

    out = scratch / "rebuilt.bundle"
    try:
        apply_delta(path, base.file, out, expected_target_sha256=bundle.sha256)
        if out.stat().st_size != bundle.length:
            from .delta import DeltaError

            raise DeltaError(f"{path} rebuilds {out.stat().st_size} bytes, {bundle.path} has {bundle.length}")
    finally:
        out.unlink(missing_ok=True)


def _copy_verified(source: Path, destination: Path, length: int, sha256: str) -> None:
    """Copy ``source`` atomically, re-hashing the copy: the file may have changed since it was checked."""

    digest = hashlib.sha256()
    copied = 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    try:
        with open(source, "rb", buffering=0) as src, os.fdopen(fd, "wb") as dst:
            while True:
                chunk = src.read(CHUNK_SIZE)
                if not chunk:
                    break
                digest.update(chunk)
                copied += len(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if digest.hexdigest() != sha256 or copied != length:
            raise EdgeshipError(f"{source} changed while it was being published; publish it again")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, destination)
        fsync_dir(destination.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
