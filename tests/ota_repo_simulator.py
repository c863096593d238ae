"""An in-memory release repository for trust tests, in the spirit of python-tuf's
tests/repository_simulator.py: metadata is signed on demand with real ed25519
keys and served through a real ``FetcherInterface``; a test changes what is
served (expired, rolled back, re-keyed, hostile bytes) and asserts the exact
exception ``fetch_verified_bundle`` raises.

No file or network I/O happens here except writing the bundles the tests build.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Union

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import FetcherInterface

from edgeship.ota.bundle_build import build_bundle
from edgeship.ota.director import DesiredState, sign_desired_state

ROLES = ("root", "targets", "snapshot", "timestamp")
SIGNATURE = {
    "inputs": [{"name": "x", "shape": [1, 64], "dtype": "float32", "scale": 0.0, "zero_point": 0}],
    "outputs": [{"name": "y", "shape": [1, 10], "dtype": "float32", "scale": 0.0, "zero_point": 0}],
}
Served = Union[bytes, Callable[[], Iterator[bytes]]]


def fake_tflite(size: int = 4096, seed: bytes = b"") -> bytes:
    """Bytes that carry the TFLite file identifier (enough for bundle building)."""
    body = hashlib.sha256(seed).digest() * (size // 32 + 1)
    return (b"\x1c\x00\x00\x00TFL3" + body)[:size]


def make_bundle(folder: Path, name: str = "digits", version: str = "1.0.0", size: int = 4096,
                labels: list[str] | None = None) -> Path:
    """A real bundle file built with build_bundle from a small fake TFLite model."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / f"{name}-{version}.tflite"
    model.write_bytes(fake_tflite(size, f"{name}{version}".encode()))
    labels_path = None
    if labels:
        labels_path = folder / f"{name}-{version}.labels.txt"
        labels_path.write_text("\n".join(labels) + "\n")
    out = folder / f"{name}-{version}.bundle"
    build_bundle(model, name=name, version=version, out=out, labels=labels_path,
                 report={"signature": SIGNATURE, "quality": {"accuracy": 0.97}})
    return out


class RepositorySimulator(FetcherInterface):
    """A TUF repository in memory that also acts as the transport.

    ``publish()`` signs new targets/snapshot/timestamp versions (each version's
    bytes are kept in ``history`` so a test can replay an old one);
    ``serve_override[url_suffix]`` replaces what a URL returns (bytes, or a
    callable returning a chunk iterator, e.g. an endless stream).
    """

    def __init__(self, now: dt.datetime, *, expiry: dict[str, dt.timedelta] | None = None) -> None:
        self.now = now
        self.expiry = {"root": dt.timedelta(days=365), "targets": dt.timedelta(days=365),
                       "snapshot": dt.timedelta(days=7), "timestamp": dt.timedelta(days=1)}
        self.expiry.update(expiry or {})
        self.signers: dict[str, CryptoSigner] = {r: CryptoSigner.generate_ed25519() for r in ROLES}
        root = Root(version=1, expires=now + self.expiry["root"], consistent_snapshot=False)
        for role in ROLES:
            root.add_key(self.signers[role].public_key, role)
        self.root = Metadata(root)
        self.targets = Metadata(Targets(version=1, expires=now))
        self.snapshot = Metadata(Snapshot(version=1, expires=now))
        self.timestamp = Metadata(Timestamp(version=1, expires=now))
        self.signed_roots: list[bytes] = []
        self.served: dict[str, bytes] = {}
        self.history: dict[str, dict[int, bytes]] = {r: {} for r in ("targets", "snapshot", "timestamp")}
        self.target_bytes: dict[str, bytes] = {}
        self.serve_override: dict[str, Served] = {}
        self.fetched: list[str] = []
        self.director_key = Ed25519PrivateKey.generate()
        self.sequence = 0
        self._sign_root()
        self.publish()

    # -- signing ---------------------------------------------------------------------------------

    def _serialize(self, md: Metadata, signers: list[CryptoSigner]) -> bytes:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        return md.to_bytes(JSONSerializer(compact=False))

    def _sign_root(self, extra_signers: list[CryptoSigner] | None = None) -> None:
        data = self._serialize(self.root, [self.signers["root"], *(extra_signers or [])])
        self.signed_roots.append(data)
        self.served["root.json"] = data

    def sign_role(self, role: str, *, signer: CryptoSigner | None = None, bump: bool = True,
                  expires: dt.datetime | None = None) -> bytes:
        md = {"targets": self.targets, "snapshot": self.snapshot, "timestamp": self.timestamp}[role]
        if bump and self.history[role]:  # the first signature is version 1
            md.signed.version += 1
        md.signed.expires = expires or (self.now + self.expiry[role])
        data = self._serialize(md, [signer or self.signers[role]])
        self.history[role][md.signed.version] = data
        self.served[f"{role}.json"] = data
        return data

    def publish(self, *, targets: bool = True, snapshot_targets_version: int | None = None,
                timestamp_snapshot_version: int | None = None,
                timestamp_expires: dt.datetime | None = None) -> None:
        """Sign new versions: targets (optional), snapshot, timestamp."""
        if targets:
            self.sign_role("targets")
        self.snapshot.signed.meta["targets.json"] = MetaFile(
            version=snapshot_targets_version or self.targets.signed.version)
        self.sign_role("snapshot")
        self.timestamp.signed.snapshot_meta = MetaFile(
            version=timestamp_snapshot_version or self.snapshot.signed.version)
        self.sign_role("timestamp", expires=timestamp_expires)

    def add_target(self, bundle_file: Path, *, name: str, version: str, publish: bool = True) -> TargetFile:
        data = bundle_file.read_bytes()
        path = f"{name}/{name}-{version}.bundle"
        target = TargetFile.from_data(path, data, ["sha256"])
        target.unrecognized_fields["custom"] = {"name": name, "version": version, "format": "tflite"}
        self.targets.signed.targets[path] = target
        self.target_bytes[path] = data
        if publish:
            self.publish()
        return target

    def rotate_root(self) -> CryptoSigner:
        """New root key; root N+1 signed by the old and the new key (a device follows it)."""
        old = self.signers["root"]
        new = CryptoSigner.generate_ed25519()
        root = self.root.signed
        root.revoke_key(old.public_key.keyid, "root")
        root.add_key(new.public_key, "root")
        root.version += 1
        self.signers["root"] = new
        self._sign_root(extra_signers=[old])
        return old

    def rotate_key(self, role: str) -> CryptoSigner:
        """New key for an online role (root N+1 signed by root); returns the revoked signer."""
        old = self.signers[role]
        new = CryptoSigner.generate_ed25519()
        root = self.root.signed
        root.revoke_key(old.public_key.keyid, role)
        root.add_key(new.public_key, role)
        root.version += 1
        self.signers[role] = new
        self._sign_root()
        return old

    # -- director --------------------------------------------------------------------------------

    def desired(self, name: str = "digits", version: str = "1.0.0", *, device: str = "dev-1",
                fleet: str = "plant", sequence: int | None = None, expires_in: dt.timedelta = dt.timedelta(hours=1),
                hashes: dict[str, str] | None = None, length: int | None = None,
                key: Ed25519PrivateKey | None = None, action: str = "install") -> dict:
        path = f"{name}/{name}-{version}.bundle"
        target = self.targets.signed.targets.get(path)
        if sequence is None:
            self.sequence += 1
            sequence = self.sequence
        state = DesiredState(
            fleet=fleet, device=device, bundle=name, version=version, target=path,
            length=length if length is not None else (target.length if target else 1),
            hashes=hashes or (dict(target.hashes) if target else {"sha256": "0" * 64}),
            sequence=sequence, expires=self.now + expires_in, issued=self.now, action=action,
        )
        return sign_desired_state(state, key or self.director_key)

    # -- transport -------------------------------------------------------------------------------

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.fetched.append(url)
        prefix_metadata, prefix_targets = "edgeship://metadata/", "edgeship://targets/"
        for suffix, served in self.serve_override.items():
            if url.endswith(suffix):
                return served() if callable(served) else iter([served])
        if url.startswith(prefix_metadata):
            name = url[len(prefix_metadata):]
            head, _, rest = name.partition(".")
            if rest == "root.json" and head.isdigit():
                version = int(head)
                if 1 <= version <= len(self.signed_roots):
                    return iter([self.signed_roots[version - 1]])
                raise DownloadHTTPError(f"{url} not found", 404)
            if name in self.served:
                return iter([self.served[name]])
        elif url.startswith(prefix_targets):
            path = url[len(prefix_targets):]
            if path in self.target_bytes:
                data = self.target_bytes[path]
                return iter([data[i:i + 65536] for i in range(0, len(data), 65536)])
        raise DownloadHTTPError(f"{url} not found", 404)

    def provision(self, trust_dir: Path) -> Path:
        """Give a device this repository's first root as its trusted root."""
        trust_dir.mkdir(parents=True, exist_ok=True)
        (trust_dir / "root.json").write_bytes(self.signed_roots[0])
        return trust_dir


def leftovers(folder: Path) -> list[str]:
    """Everything under ``folder`` (for 'nothing left behind' assertions)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

