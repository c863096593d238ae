"""The attack table of the bundle's trust, trust side: each attack against the release repository,
the director or the transport raises its own exception, and nothing is left in the
device's work folder.

Driven by tests/ota_repo_simulator.py (an in-memory TUF repository that signs on
demand and serves through a FetcherInterface).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ota_repo_simulator import RepositorySimulator, leftovers, make_bundle

from edgeship.ota import director as d
from edgeship.ota import updater as u
from edgeship.ota.errors import EXIT_FAILURE, EXIT_REJECTED, SecurityError

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)


class Device:
    """One device: its trust folder, work folder, and the director key it trusts."""

    def __init__(self, tmp: Path, sim: RepositorySimulator, name: str = "dev-1") -> None:
        self.sim = sim
        self.name = name
        self.trust = sim.provision(tmp / f"{name}-trust")
        self.work = tmp / f"{name}-work"
        self.last_sequence: int | None = None

    def update(self, envelope: dict, *, now: dt.datetime = NOW, fetcher: object = None) -> u.VerifiedBundle:
        state = d.verify_desired_state(envelope, self.sim.director_key.public_key(), device=self.name,
                                       fleet="plant", last_sequence=self.last_sequence, now=now)
        result = u.fetch_verified_bundle(trust_dir=self.trust, desired=state, fetcher=fetcher or self.sim,
                                         work_dir=self.work, now=now)
        self.last_sequence = state.sequence
        return result


@pytest.fixture
def sim(tmp_path: Path) -> RepositorySimulator:
    simulator = RepositorySimulator(NOW)
    simulator.add_target(make_bundle(tmp_path / "bundles", "digits", "1.0.0"), name="digits", version="1.0.0")
    return simulator


@pytest.fixture
def device(tmp_path: Path, sim: RepositorySimulator) -> Device:
    return Device(tmp_path, sim)


def _refused(device: Device, envelope: dict, error: type[Exception], match: str, **kwargs: object) -> Exception:
    with pytest.raises(error, match=match) as info:
        device.update(envelope, **kwargs)  # type: ignore[arg-type]
    assert leftovers(device.work) == [], "a refused update left files behind"
    return info.value


# -- the good path, and the clock -------------------------------------------------------------------

def test_verified_bundle_is_extracted(device: Device, sim: RepositorySimulator) -> None:
    result = device.update(sim.desired())
    assert result.manifest.name == "digits" and result.manifest.version == "1.0.0"
    assert result.model_path.read_bytes()[4:8] == b"TFL3"
    assert result.target == "digits/digits-1.0.0.bundle"
    assert result.sha256 == sim.targets.signed.targets[result.target].hashes["sha256"]
    assert sorted(p.name for p in device.work.iterdir()) == ["digits-1.0.0"]  # no partial download left


def test_clock_is_the_fixed_update_time_not_the_wall_clock(tmp_path: Path) -> None:
    # Metadata signed in 2020 that expired long before today's wall clock: valid at the
    # update's fixed time, so only `now` decides (python-tuf would use its own clock).
    past = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    sim = RepositorySimulator(past)
    sim.add_target(make_bundle(tmp_path / "b"), name="digits", version="1.0.0")
    device = Device(tmp_path, sim)
    assert device.update(sim.desired(), now=past + dt.timedelta(minutes=30)).manifest.version == "1.0.0"


def test_metadata_valid_at_start_does_not_expire_midway(tmp_path: Path, sim: RepositorySimulator) -> None:
    # Timestamp expires one second after the fixed start: the whole update uses the start time.
    sim.publish(targets=False, timestamp_expires=NOW + dt.timedelta(seconds=1))
    device = Device(tmp_path, sim)
    assert device.update(sim.desired()).manifest.name == "digits"


# -- the bundle in transit --------------------------------------------------------------------------

def _served_bundle(sim: RepositorySimulator) -> bytes:
    return sim.target_bytes["digits/digits-1.0.0.bundle"]


def test_byte_flipped_in_bundle(device: Device, sim: RepositorySimulator) -> None:
    data = bytearray(_served_bundle(sim))
    data[3000] ^= 0x01
    sim.serve_override["targets/digits/digits-1.0.0.bundle"] = bytes(data)
    _refused(device, sim.desired(), u.TargetHashError, "does not match its signed sha256")


def test_header_altered_in_transit_is_reported_as_transport_tampering(device: Device, sim: RepositorySimulator) -> None:
    # the downloaded file is checked against its signed hash before the archive rules read a byte
    # of it, so the report names the real cause (bytes that are not the signed ones), not the
    # bad header checksum they would meet first
    data = bytearray(_served_bundle(sim))
    data[5] ^= 0x01  # inside manifest.json's tar header
    sim.serve_override["targets/digits/digits-1.0.0.bundle"] = bytes(data)
    err = _refused(device, sim.desired(), u.TargetHashError, "does not match its signed sha256")
    assert "checksum" not in str(err)


def test_truncated_bundle(device: Device, sim: RepositorySimulator) -> None:
    sim.serve_override["targets/digits/digits-1.0.0.bundle"] = _served_bundle(sim)[:-700]
    _refused(device, sim.desired(), u.TargetTruncatedError, "is truncated")


def test_endless_bundle_stream_is_cut_at_the_signed_length(device: Device, sim: RepositorySimulator) -> None:
    sent = {"bytes": 0}

    def endless() -> Iterator[bytes]:
        while True:
            sent["bytes"] += 65536
            yield b"\0" * 65536

    sim.serve_override["targets/digits/digits-1.0.0.bundle"] = endless
    _refused(device, sim.desired(), u.TargetTooLongError, "went past its signed length")
    assert sent["bytes"] <= len(_served_bundle(sim)) + 65536


# -- the release repository's metadata --------------------------------------------------------------

def test_wrong_root(tmp_path: Path, sim: RepositorySimulator) -> None:
    other = RepositorySimulator(NOW)  # a device provisioned for another repository
    device = Device(tmp_path, sim)
    other.provision(device.trust)
    _refused(device, sim.desired(), u.UntrustedMetadataError, "timestamp was signed by 0/1 keys")


def test_expired_timestamp_freeze(device: Device, sim: RepositorySimulator) -> None:
    sim.publish(targets=False, timestamp_expires=NOW + dt.timedelta(hours=1))
    later = NOW + dt.timedelta(hours=2)
    envelope = sim.desired(expires_in=dt.timedelta(days=1))
    err = _refused(device, envelope, u.MetadataExpiredError, "timestamp.json is expired", now=later)
    assert err.exit_code == EXIT_REJECTED


@pytest.mark.parametrize("role", ["root", "snapshot", "targets"])
def test_expired_role_is_refused(tmp_path: Path, role: str) -> None:
    # every role's expiry counts, not only the timestamp's
    sim = RepositorySimulator(NOW, expiry={role: dt.timedelta(hours=1)})
    sim.add_target(make_bundle(tmp_path / "b"), name="digits", version="1.0.0")
    device = Device(tmp_path, sim)
    later = NOW + dt.timedelta(hours=2)
    _refused(device, sim.desired(expires_in=dt.timedelta(days=1)), u.MetadataExpiredError,
             rf"{role}(\.json)? is expired", now=later)


def test_rollback_to_an_older_timestamp(device: Device, sim: RepositorySimulator, tmp_path: Path) -> None:
    device.update(sim.desired())  # the device now trusts timestamp v2
    old_timestamp = sim.history["timestamp"][1]
    sim.add_target(make_bundle(tmp_path / "b2", "digits", "1.1.0"), name="digits", version="1.1.0")
    device.update(sim.desired("digits", "1.1.0"))  # ... and now v3
    sim.serve_override["metadata/timestamp.json"] = old_timestamp
    _refused_work_kept(device, sim.desired("digits", "1.1.0"), u.MetadataRollbackError, "New timestamp version 1 must be >= 3")


def _refused_work_kept(device: Device, envelope: dict, error: type[Exception], match: str) -> None:
    """Like _refused, for a device that already holds an earlier verified bundle."""
    before = leftovers(device.work)
    with pytest.raises(error, match=match):
        device.update(envelope)
    assert leftovers(device.work) == before


def test_rollback_to_an_older_snapshot(device: Device, sim: RepositorySimulator) -> None:
    device.update(sim.desired())
    sim.publish(targets=False)  # snapshot v3 trusted next
    device.update(sim.desired())
    sim.publish(targets=False, timestamp_snapshot_version=1)  # a timestamp naming the old snapshot
    _refused_work_kept(device, sim.desired(), u.MetadataRollbackError, "New snapshot version must be >= 3, got version 1")


def test_rollback_to_older_targets(device: Device, sim: RepositorySimulator, tmp_path: Path) -> None:
    sim.add_target(make_bundle(tmp_path / "b2", "digits", "1.1.0"), name="digits", version="1.1.0")
    device.update(sim.desired("digits", "1.1.0"))  # trusts targets v3
    sim.publish(targets=False, snapshot_targets_version=1)  # a snapshot naming the old targets
    _refused_work_kept(device, sim.desired("digits", "1.1.0"), u.MetadataRollbackError, "targets.json version")


def test_mixed_metadata_versions(device: Device, sim: RepositorySimulator) -> None:
    sim.publish(targets=False)  # snapshot v3, timestamp v3
    sim.serve_override["metadata/snapshot.json"] = sim.history["snapshot"][1]  # a mirror half-way through
    _refused(device, sim.desired(), u.MixedMetadataError, "Expected snapshot version 3, got 1")


def test_oversized_metadata_is_cut(device: Device, sim: RepositorySimulator) -> None:
    def endless() -> Iterator[bytes]:
        while True:
            yield b" " * 4096

    sim.serve_override["metadata/timestamp.json"] = endless
    _refused(device, sim.desired(), u.MetadataTooLargeError, "exceeding the maximum allowed length")


def test_rotated_root_is_followed(device: Device, sim: RepositorySimulator) -> None:
    device.update(sim.desired())
    sim.rotate_root()
    sim.rotate_root()
    sim.publish()
    assert device.update(sim.desired()).manifest.name == "digits"
    history = sorted(p.name for p in (device.trust / "root_history").iterdir())
    assert history == ["1.root.json", "2.root.json", "3.root.json"]


def test_rotated_targets_key_is_followed_and_the_revoked_one_refused(
        device: Device, sim: RepositorySimulator) -> None:
    revoked = sim.rotate_key("targets")
    sim.publish()
    device.update(sim.desired())  # follows root v2 and the new targets key
    # an attacker holding the revoked key signs a newer targets version
    sim.sign_role("targets", signer=revoked)
    sim.publish(targets=False)
    _refused_work_kept(device, sim.desired(), u.UntrustedMetadataError, "targets was signed by 0/1 keys")


def test_root_not_signed_by_the_trusted_root_is_refused(device: Device, sim: RepositorySimulator) -> None:
    # root v2 signed only by a new key, as an attacker without the root key would
    new_root_signer = __import__("securesystemslib.signer", fromlist=["CryptoSigner"]).CryptoSigner.generate_ed25519()
    root = sim.root.signed
    root.revoke_key(sim.signers["root"].public_key.keyid, "root")
    root.add_key(new_root_signer.public_key, "root")
    root.version += 1
    sim.signers["root"] = new_root_signer
    sim._sign_root()
    _refused(device, sim.desired(), u.UntrustedMetadataError, "root was signed by 0/1 keys")


# -- the director -----------------------------------------------------------------------------------

def test_director_replay_of_a_lower_sequence(device: Device, sim: RepositorySimulator) -> None:
    old = sim.desired()
    device.update(sim.desired())
    with pytest.raises(d.ReplayedDesiredStateError, match="sequence 1, lower than 2"):
        device.update(old)
    assert leftovers(device.work) == ["digits-1.0.0", *[f"digits-1.0.0/{n}" for n in  # the bundle kept as a base
                                                        (".edgeship-bundle", "manifest.json", "model.tflite",
                                                         "report.json")]]


def test_same_sequence_delivered_again_is_accepted(device: Device, sim: RepositorySimulator) -> None:
    envelope = sim.desired()
    device.update(envelope)
    assert device.update(envelope).manifest.version == "1.0.0"  # a retained message after a restart


def test_director_expired(device: Device, sim: RepositorySimulator) -> None:
    envelope = sim.desired(expires_in=dt.timedelta(minutes=5))
    _refused(device, envelope, d.ExpiredDesiredStateError, "expired at 2026-11-23T12:05:00Z",
             now=NOW + dt.timedelta(minutes=6))


def test_director_signed_by_the_wrong_key(device: Device, sim: RepositorySimulator) -> None:
    _refused(device, sim.desired(key=Ed25519PrivateKey.generate()), d.DirectorKeyError,
             "not by the director key this device trusts")


def test_director_document_altered(device: Device, sim: RepositorySimulator) -> None:
    envelope = sim.desired()
    envelope["signed"]["version"] = "0.9.0"
    _refused(device, envelope, d.DirectorSignatureError, "does not verify")


def test_director_names_hashes_the_repository_does_not(device: Device, sim: RepositorySimulator) -> None:
    envelope = sim.desired(hashes={"sha256": "ab" * 32})
    _refused(device, envelope, u.TargetMismatchError, "director and release repository disagree")


def test_director_names_a_length_the_repository_does_not(device: Device, sim: RepositorySimulator) -> None:
    envelope = sim.desired(length=123)
    _refused(device, envelope, u.TargetMismatchError, "length 123")


def test_director_names_an_unpublished_target(device: Device, sim: RepositorySimulator) -> None:
    _refused(device, sim.desired("digits", "9.9.9"), u.TargetNotFoundError, "does not list")


def test_director_document_for_another_device(device: Device, sim: RepositorySimulator) -> None:
    _refused(device, sim.desired(device="dev-2"), d.WrongDeviceError, "for device 'dev-2'")


def test_director_document_for_another_fleet(device: Device, sim: RepositorySimulator) -> None:
    _refused(device, sim.desired(fleet="lab"), d.WrongDeviceError, "fleet 'lab'")


def test_fleet_wide_document_is_accepted(device: Device, sim: RepositorySimulator) -> None:
    assert device.update(sim.desired(device="*")).manifest.name == "digits"


def test_signed_bundle_holding_another_model_is_refused(tmp_path: Path, sim: RepositorySimulator,
                                                         device: Device) -> None:
    # the repository signs, under digits 2.0.0's path, a bundle whose manifest says 1.0.0
    other = make_bundle(tmp_path / "b3", "digits", "1.0.0", size=5000)
    sim.add_target(other, name="digits", version="2.0.0")
    _refused(device, sim.desired("digits", "2.0.0"), u.BundleIdentityError, "director ordered digits 2.0.0")


def test_transport_failure_is_not_a_security_error(device: Device, sim: RepositorySimulator) -> None:
    def broken() -> Iterator[bytes]:
        yield b"x" * 100
        raise ConnectionResetError("link dropped")

    sim.serve_override["targets/digits/digits-1.0.0.bundle"] = broken
    err = _refused(device, sim.desired(), u.FetchError, "link dropped")
    assert not isinstance(err, SecurityError) and err.exit_code == EXIT_FAILURE


def test_unprovisioned_device(tmp_path: Path, sim: RepositorySimulator) -> None:
    state = d.DesiredState.from_dict(sim.desired()["signed"])
    with pytest.raises(u.EdgeshipError, match="not provisioned"):
        u.fetch_verified_bundle(trust_dir=tmp_path / "empty", desired=state, fetcher=sim,
                                work_dir=tmp_path / "w", now=NOW)


# -- every trust failure is a SecurityError with exit status 4 --------------------------------------

@pytest.mark.parametrize("error", [
    u.UntrustedMetadataError, u.MetadataExpiredError, u.MetadataRollbackError, u.MixedMetadataError,
    u.BadMetadataError, u.MetadataTooLargeError, u.TargetNotFoundError, u.TargetMismatchError,
    u.TargetTooLongError, u.TargetTruncatedError, u.TargetHashError, u.BundleIdentityError,
    d.DirectorKeyError, d.DirectorSignatureError, d.ReplayedDesiredStateError, d.ExpiredDesiredStateError,
    d.WrongDeviceError, d.MalformedDesiredStateError,
])
def test_trust_errors_are_security_errors(error: Callable[[str], Exception]) -> None:
    instance = error("x")
    assert isinstance(instance, SecurityError) and instance.exit_code == EXIT_REJECTED  # type: ignore[attr-defined]
