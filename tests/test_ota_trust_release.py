"""The release repository on disk (python-tuf metadata, keys at rest, publish, refresh,
rotation, offline packages) verified end to end by the device-side client."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from ota_repo_simulator import leftovers, make_bundle

from edgeship.ota import director as d
from edgeship.ota import updater as u
from edgeship.ota.archive import MemberHashError, UnsafeBundleError
from edgeship.ota.errors import BadInputError
from edgeship.ota.fetchers import LocalFolderFetcher
from edgeship.ota.offline import open_offline_package
from edgeship.ota.release import ReleaseRepository, VersionNotNewerError, parse_duration

PASS = "correct horse battery"
NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    repository = ReleaseRepository(tmp_path / "repo")
    repository.init(root_passphrase=PASS, now=NOW)
    return repository


def _device_update(repo: ReleaseRepository, tmp: Path, name: str, version: str, *, trust: Path | None = None,
                   now: dt.datetime = NOW, device: str = "dev-1", last: int | None = None) -> u.VerifiedBundle:
    if trust is None:
        trust = tmp / f"trust-{device}"
        trust.mkdir(exist_ok=True)
        shutil.copy(repo.metadata_dir / "1.root.json", trust / "root.json")
    envelope = repo.sign_desired(fleet="plant", device=device, name=name, version=version, now=now)
    state = d.verify_desired_state(envelope, d.load_director_public_key(repo.director_public_key_path),
                                   device=device, fleet="plant", last_sequence=last, now=now)
    return u.fetch_verified_bundle(trust_dir=trust, desired=state, fetcher=LocalFolderFetcher(repo.path),
                                   work_dir=tmp / f"work-{device}", now=now)


def test_init_writes_keys_at_rest(repo: ReleaseRepository) -> None:
    assert stat.S_IMODE(repo.keys_dir.stat().st_mode) == 0o700
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert stat.S_IMODE((repo.keys_dir / f"{role}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((repo.director_dir / "director.key").stat().st_mode) == 0o600
    root_pem = (repo.keys_dir / "root.key").read_bytes()
    assert root_pem.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")  # bcrypt KDF, not PBKDF2
    with pytest.raises(TypeError):  # encrypted: no key without the passphrase
        serialization.load_ssh_private_key(root_pem, password=None)
    with pytest.raises(ValueError):
        serialization.load_ssh_private_key(root_pem, password=b"not the passphrase")
    serialization.load_ssh_private_key(root_pem, password=PASS.encode())
    info = repo.fingerprints()
    assert info["root_metadata"].endswith("metadata/root.json")
    assert info["director_public_key"].endswith("director/director.pub")
    assert all(len(ids) == 1 and len(ids[0]) == 64 for ids in info["keys"].values())
    metadata = sorted(p.name for p in repo.metadata_dir.iterdir())
    assert metadata == ["1.root.json", "root.json", "snapshot.json", "targets.json", "timestamp.json"]


def test_init_refuses_an_existing_repository_and_a_short_passphrase(repo: ReleaseRepository, tmp_path: Path) -> None:
    before = (repo.metadata_dir / "root.json").read_bytes()
    with pytest.raises(BadInputError, match="already holds a release repository"):
        repo.init(root_passphrase=PASS)
    assert (repo.metadata_dir / "root.json").read_bytes() == before
    with pytest.raises(BadInputError, match="at least 8 characters"):
        ReleaseRepository(tmp_path / "other").init(root_passphrase="short")


def test_publish_and_device_update(repo: ReleaseRepository, tmp_path: Path) -> None:
    info = repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0"), now=NOW)
    assert info.path == "digits/digits-1.0.0.bundle" and info.file.is_file()
    targets = json.loads((repo.metadata_dir / "targets.json").read_text())["signed"]["targets"]
    assert targets[info.path]["custom"] == {"name": "digits", "version": "1.0.0", "format": "tflite",
                                            "runtime": info.runtime, "serving_version": 1}
    result = _device_update(repo, tmp_path, "digits", "1.0.0")
    assert result.sha256 == info.sha256 and result.manifest.version == "1.0.0"


def test_publishing_an_older_or_equal_version_is_refused(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.2.0"), now=NOW)
    versions_before = json.loads((repo.metadata_dir / "targets.json").read_text())["signed"]["version"]
    for version in ("1.2.0", "1.2", "1.1.9", "1.2.0-rc.1"):
        with pytest.raises(VersionNotNewerError, match=f"digits {version} is not newer than the published"):
            repo.publish(make_bundle(tmp_path / f"b-{version}", "digits", version), now=NOW)
    assert json.loads((repo.metadata_dir / "targets.json").read_text())["signed"]["version"] == versions_before
    repo.publish(make_bundle(tmp_path / "b3", "digits", "1.10.0"), now=NOW)  # numeric, not string, order
    repo.publish(make_bundle(tmp_path / "b4", "other", "0.1.0"), now=NOW)  # another name is independent
    assert [(t.name, t.version) for t in repo.targets()] == [("digits", "1.2.0"), ("digits", "1.10.0"),
                                                             ("other", "0.1.0")]


def test_publishing_a_hostile_bundle_is_refused(repo: ReleaseRepository, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", "digits", "1.0.0")
    data = bytearray(bundle.read_bytes())
    data[data.index(b"TFL3") + 100] ^= 0xFF  # inside the model member
    bundle.write_bytes(bytes(data))
    with pytest.raises(MemberHashError):
        repo.publish(bundle, now=NOW)
    assert repo.targets() == [] and leftovers(repo.targets_dir) == []


def test_refresh_re_signs_with_configurable_expiry(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0"), now=NOW)
    before = repo.status(now=NOW)["roles"]
    later = NOW + dt.timedelta(hours=20)
    after = repo.refresh(now=later, expiry={"timestamp": parse_duration("2h")})["roles"]
    assert after["timestamp"]["version"] == before["timestamp"]["version"] + 1
    assert after["snapshot"]["version"] == before["snapshot"]["version"] + 1
    assert after["targets"]["version"] == before["targets"]["version"]
    assert after["timestamp"]["expires"] == "2026-11-24T10:00:00Z"
    assert repo.expiry()["timestamp"] == 7200  # saved for the next refresh


@pytest.mark.parametrize("text", ["99999999999y", "1e9", "200y"])
def test_absurd_expiry_is_refused_and_the_repository_still_works(repo: ReleaseRepository, text: str) -> None:
    # once saved to config.json before signing failed (OverflowError): every later publish broke
    config = (repo.path / "config.json").read_bytes()
    with pytest.raises(BadInputError):
        repo.refresh(expiry={"timestamp": parse_duration(text)}, now=NOW)
    with pytest.raises(BadInputError, match="at most"):
        repo.refresh(expiry={"timestamp": 10**19}, now=NOW)
    assert (repo.path / "config.json").read_bytes() == config
    assert repo.refresh(now=NOW)["roles"]["timestamp"]["version"] == 2
    (repo.path / "config.json").write_text(json.dumps({"expiry_seconds": {"timestamp": 10**19}}))
    with pytest.raises(BadInputError, match="config.json: the expiry of timestamp"):
        repo.refresh(now=NOW)


def test_freeze_then_refresh(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0"), now=NOW)
    two_days = NOW + dt.timedelta(days=2)  # the timestamp (1 day) has expired
    with pytest.raises(u.MetadataExpiredError, match="timestamp.json is expired"):
        _device_update(repo, tmp_path, "digits", "1.0.0", now=two_days)
    repo.refresh(now=two_days)
    assert _device_update(repo, tmp_path, "digits", "1.0.0", now=two_days, device="dev-2").manifest.name == "digits"


def test_status_lists_targets_roles_and_provisioning_files(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0"), now=NOW)
    status = repo.status(now=NOW)
    assert status["roles"]["timestamp"]["expires"] == "2026-11-24T12:00:00Z"
    assert status["roles"]["root"]["expires_in_seconds"] == 365 * 86400
    assert [t["version"] for t in status["targets"]] == ["1.0.0"]
    assert Path(status["root_metadata"]).is_file() and Path(status["director_public_key"]).is_file()


@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp"])
def test_rotation_is_followed_by_a_device_on_the_old_root(repo: ReleaseRepository, tmp_path: Path, role: str) -> None:
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0"), now=NOW)
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(repo.root_metadata_path, trust / "root.json")
    _device_update(repo, tmp_path, "digits", "1.0.0", trust=trust)
    old_key = (repo.keys_dir / f"{role}.key").read_bytes()
    result = repo.rotate(role, root_passphrase=PASS, now=NOW)
    assert (repo.keys_dir / f"{role}.key").read_bytes() != old_key
    assert result["root_version"] == 2 and (repo.metadata_dir / "2.root.json").is_file()
    repo.publish(make_bundle(tmp_path / "b2", "digits", "1.1.0"), now=NOW)
    assert _device_update(repo, tmp_path, "digits", "1.1.0", trust=trust).manifest.version == "1.1.0"
    assert (trust / "root_history" / "2.root.json").is_file()


def test_rotation_needs_the_root_passphrase(repo: ReleaseRepository) -> None:
    with pytest.raises(BadInputError, match="does not decrypt"):
        repo.rotate("targets", root_passphrase="wrong passphrase", now=NOW)
    assert not (repo.metadata_dir / "2.root.json").exists()


def test_root_rotation_with_a_new_passphrase(repo: ReleaseRepository) -> None:
    repo.rotate("root", root_passphrase=PASS, new_root_passphrase="a brand new one", now=NOW)
    with pytest.raises(BadInputError, match="does not decrypt"):
        repo.rotate("root", root_passphrase=PASS, now=NOW)
    repo.rotate("root", root_passphrase="a brand new one", now=NOW)
    assert repo.fingerprints()["root_version"] == 3


def test_director_sequences_grow_per_fleet(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0"), now=NOW)
    seqs = [repo.sign_desired(fleet="plant", device=dev, name="digits", version="1.0.0", now=NOW)["signed"]["sequence"]
            for dev in ("a", "b", "*")]
    assert seqs == [1, 2, 3]
    assert repo.sign_desired(fleet="lab", device="a", name="digits", version="1.0")["signed"]["sequence"] == 1
    assert json.loads((repo.director_dir / "sequences.json").read_text()) == {"plant": 3, "lab": 1}
    with pytest.raises(BadInputError, match="digits 2.0.0 is not published"):
        repo.sign_desired(fleet="plant", device="a", name="digits", version="2.0.0")


def test_rotating_the_director_key(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0"), now=NOW)
    old_public = d.load_director_public_key(repo.director_public_key_path)
    repo.rotate("director")
    envelope = repo.sign_desired(fleet="plant", device="a", name="digits", version="1.0.0", now=NOW)
    with pytest.raises(d.DirectorKeyError):
        d.verify_desired_state(envelope, old_public, device="a", fleet="plant", last_sequence=None, now=NOW)


def test_verify_bundle_against_the_repository(repo: ReleaseRepository, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", "digits", "1.0.0")
    repo.publish(bundle, now=NOW)
    assert repo.verify_bundle(bundle, now=NOW)["verified"] is True
    impostor = make_bundle(tmp_path / "c", "digits", "1.0.0", size=6000)  # same name and version, other bytes
    with pytest.raises(u.TargetMismatchError, match="is not the released digits 1.0.0"):
        repo.verify_bundle(impostor, now=NOW)
    unreleased = make_bundle(tmp_path / "d", "digits", "3.0.0")
    with pytest.raises(u.TargetNotFoundError, match="not published"):
        repo.verify_bundle(unreleased, now=NOW)
    with pytest.raises(u.MetadataExpiredError):
        repo.verify_bundle(bundle, now=NOW + dt.timedelta(days=3))


def test_offline_package(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0"), now=NOW)
    repo.rotate("root", root_passphrase=PASS, now=NOW)  # a device on root v1 must follow v2 from the stick
    package = tmp_path / "usb.tar"
    info = repo.export("digits", "1.0.0", package, fleet="plant", now=NOW)
    assert info["device"] == "*"
    opened = open_offline_package(package, tmp_path / "usb")
    state = d.verify_desired_state(opened.desired_envelope, d.load_director_public_key(repo.director_public_key_path),
                                   device="dev-7", fleet="plant", last_sequence=None, now=NOW)
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(repo.metadata_dir / "1.root.json", trust / "root.json")
    result = u.fetch_verified_bundle(trust_dir=trust, desired=state, fetcher=opened.fetcher,
                                     work_dir=tmp_path / "work", now=NOW)
    assert result.manifest.name == "digits"
    opened.cleanup()
    assert leftovers(tmp_path / "usb") == []


def test_tampered_offline_package_is_refused(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0"), now=NOW)
    package = tmp_path / "usb.tar"
    repo.export("digits", "1.0.0", package, fleet="plant", now=NOW)
    data = bytearray(package.read_bytes())
    offset = data.index(b"TFL3") + 200  # inside the bundle inside the package
    data[offset] ^= 0xFF
    package.write_bytes(bytes(data))
    opened = open_offline_package(package, tmp_path / "usb")
    state = d.verify_desired_state(opened.desired_envelope, d.load_director_public_key(repo.director_public_key_path),
                                   device="dev-7", fleet="plant", last_sequence=None, now=NOW)
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(repo.root_metadata_path, trust / "root.json")
    with pytest.raises(u.TargetHashError):
        u.fetch_verified_bundle(trust_dir=trust, desired=state, fetcher=opened.fetcher, work_dir=tmp_path / "work",
                                now=NOW)
    assert leftovers(tmp_path / "work") == []


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="is not an edgeship release repository"):
        ReleaseRepository(tmp_path).status()


def test_unsafe_bundle_error_is_the_contract_name() -> None:
    from edgeship.ota import bundle

    assert bundle.UnsafeBundleError is UnsafeBundleError


@pytest.mark.parametrize("url", [
    "edgeship://metadata/../keys/root.key",
    "edgeship://targets/..%2Fkeys%2Froot.key",
    "edgeship://keys/root.key",
    "edgeship://targets//etc/passwd",
    "https://example.com/metadata/root.json",
])
def test_local_fetcher_serves_only_metadata_and_targets(repo: ReleaseRepository, url: str) -> None:
    from tuf.api.exceptions import DownloadHTTPError

    with pytest.raises(DownloadHTTPError) as info:
        list(LocalFolderFetcher(repo.path).fetch(url))
    assert info.value.status_code == 400


def test_local_fetcher_answers_404_for_missing_files(repo: ReleaseRepository) -> None:
    from tuf.api.exceptions import DownloadHTTPError

    with pytest.raises(DownloadHTTPError) as info:
        list(LocalFolderFetcher(repo.path).fetch("edgeship://metadata/2.root.json"))
    assert info.value.status_code == 404
    data = b"".join(LocalFolderFetcher(repo.path).fetch("edgeship://metadata/1.root.json"))
    assert data == (repo.metadata_dir / "1.root.json").read_bytes()


def test_refresh_re_signs_targets_when_due_and_root_when_asked(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(make_bundle(tmp_path / "b", "digits", "1.0.0"), now=NOW)
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(repo.root_metadata_path, trust / "root.json")
    versions = repo.status(now=NOW)["roles"]
    repo.refresh(now=NOW + dt.timedelta(days=300))  # 65 days of 365 left: not due
    assert repo.status(now=NOW)["roles"]["targets"]["version"] == versions["targets"]["version"]
    late = NOW + dt.timedelta(days=340)  # 25 days left: due
    repo.refresh(now=late)
    assert repo.status(now=late)["roles"]["targets"]["version"] == versions["targets"]["version"] + 1
    root_late = NOW + dt.timedelta(days=364)
    repo.refresh(now=root_late, root_passphrase=PASS)
    status = repo.status(now=root_late)
    assert status["roles"]["root"]["version"] == 2 and status["roles"]["root"]["expires"] == "2028-11-21T12:00:00Z"
    # a device provisioned at the start follows, a year later, without re-provisioning
    after_a_year = NOW + dt.timedelta(days=365, hours=1)
    repo.refresh(now=after_a_year)
    assert _device_update(repo, tmp_path, "digits", "1.0.0", trust=trust, now=after_a_year).manifest.name == "digits"


def test_root_keys_of_earlier_repositories_still_open(tmp_path: Path) -> None:
    """Repositories made before the bcrypt change keep an encrypted PKCS#8 root key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgeship.ota.release import decode_private_key

    key = Ed25519PrivateKey.generate()
    legacy = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(PASS.encode()))
    assert decode_private_key(legacy, PASS.encode()).public_key() == key.public_key()
    with pytest.raises((ValueError, TypeError)):
        decode_private_key(legacy, b"wrong passphrase")


def test_serving_versions_grow_per_model_name_and_are_signed(repo: ReleaseRepository, tmp_path: Path) -> None:
    """Each name counts on its own; the number is in the signed custom metadata."""
    got = {}
    for name, version in (("digits", "1.0.0"), ("kws", "0.1.0"), ("digits", "1.1.0"), ("digits", "2.0.0"),
                          ("kws", "0.2.0")):
        info = repo.publish(make_bundle(tmp_path / f"{name}-{version}", name, version), now=NOW)
        got[(name, version)] = info.serving_version
    assert got == {("digits", "1.0.0"): 1, ("kws", "0.1.0"): 1, ("digits", "1.1.0"): 2, ("digits", "2.0.0"): 3,
                   ("kws", "0.2.0"): 2}
    signed = json.loads((repo.metadata_dir / "targets.json").read_text())["signed"]["targets"]
    assert signed["digits/digits-2.0.0.bundle"]["custom"]["serving_version"] == 3


@pytest.mark.parametrize("published,expected", [
    ([], 1),
    ([("digits", None), ("digits", None)], 3),  # published before serving versions: still counted
    ([("digits", 7), ("kws", 9)], 8),
    ([("digits", None), ("digits", 1)], 3),
])
def test_next_serving_version(published: list[tuple[str, int | None]], expected: int) -> None:
    from edgeship.ota.release import TargetInfo, next_serving_version

    targets = [TargetInfo(n, f"1.0.{i}", "p", 1, "0" * 64, "tflite", {}, Path("x"), serving_version=s)
               for i, (n, s) in enumerate(published)]
    assert next_serving_version(targets, "digits") == expected


def test_an_offline_package_can_carry_several_models(repo: ReleaseRepository, tmp_path: Path) -> None:
    """Two model names in one package: a schema-2 desired state naming both, signed by the director,
    and each bundle verified from the stick through TUF as an online update would be."""

    repo.publish(make_bundle(tmp_path / "b1", "digits", "1.0.0"), now=NOW)
    repo.publish(make_bundle(tmp_path / "b2", "kws", "0.3.0"), now=NOW)
    package = tmp_path / "usb.tar"
    info = repo.export("digits", "1.0.0", package, fleet="plant", now=NOW, also=[("kws", "0.3.0")])
    assert [(m["bundle"], m["version"], m["serving_version"]) for m in info["models"]] == \
        [("digits", "1.0.0", 1), ("kws", "0.3.0", 1)]
    opened = open_offline_package(package, tmp_path / "usb")
    assert opened.info["schema"] == 2 and len(opened.info["models"]) == 2
    signed = opened.desired_envelope["signed"]
    assert signed["schema"] == 2 and signed["device"] == "*" and sorted(signed["models"]) == ["digits", "kws"]
    public = d.load_director_public_key(repo.director_public_key_path)
    public.verify(bytes.fromhex(opened.desired_envelope["signatures"][0]["sig"]), d.canonical_json(signed))
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(repo.metadata_dir / "1.root.json", trust / "root.json")
    for name, entry in signed["models"].items():
        # what the device checks per model: the director's entry and TUF name the same bytes
        state = d.DesiredState(fleet="plant", device="dev-7", bundle=entry["bundle"], version=entry["version"],
                               target=entry["target"], length=entry["length"], hashes=entry["hashes"],
                               sequence=signed["sequence"], expires=d.parse_utc(signed["expires"]),
                               issued=d.parse_utc(signed["issued"]))
        result = u.fetch_verified_bundle(trust_dir=trust, desired=state, fetcher=opened.fetcher,
                                         work_dir=tmp_path / f"work-{name}", now=NOW)
        assert result.manifest.name == name
    opened.cleanup()
    # one model: schema 1 as before, which every agent reads
    single = repo.export("digits", "1.0.0", tmp_path / "one.tar", fleet="plant", now=NOW)
    assert "models" not in single
    with pytest.raises(BadInputError, match="named twice"):
        repo.export("digits", "1.0.0", tmp_path / "dup.tar", fleet="plant", now=NOW, also=[("digits", "1.0.0")])


def test_companions_are_signed_targets_that_must_rebuild_their_bundle(repo: ReleaseRepository, tmp_path: Path) -> None:
    from edgeship.ota.compressed import CompressedBundleError
    from edgeship.ota.delta import DeltaError
    from edgeship.ota.release import Companion
    from edgeship.toolkit.deltas import build_delta, compress_bundle

    v1 = repo.publish(make_bundle(tmp_path / "b", version="1.0.0", size=30_000), now=NOW)
    v2 = repo.publish(make_bundle(tmp_path / "b", version="1.1.0", size=30_000), now=NOW)
    compress_bundle(v2.file, tmp_path / "v2.zst")
    backwards = build_delta(v2.file.read_bytes(), v1.file.read_bytes())  # rebuilds 1.0.0, not 1.1.0
    assert backwards.data is not None
    (tmp_path / "wrong.delta").write_bytes(backwards.data)
    with pytest.raises(DeltaError):
        repo.add_companions("digits", "1.1.0", [Companion("delta", tmp_path / "wrong.delta", base_version="1.0.0")],
                            now=NOW)
    bad = bytearray((tmp_path / "v2.zst").read_bytes())
    bad[40] ^= 0xFF
    (tmp_path / "bad.zst").write_bytes(bytes(bad))
    with pytest.raises((CompressedBundleError, u.TargetHashError)):
        repo.add_companions("digits", "1.1.0", [Companion("compressed", tmp_path / "bad.zst")], now=NOW)
    with pytest.raises(BadInputError, match="not published"):
        repo.add_companions("digits", "9.0.0", [Companion("compressed", tmp_path / "v2.zst")], now=NOW)
    version_before = json.loads((repo.metadata_dir / "targets.json").read_text())["signed"]["version"]
    assert repo.companions("digits", "1.1.0") == []  # nothing was signed by the refusals

    forward = build_delta(v1.file.read_bytes(), v2.file.read_bytes())
    assert forward.data is not None
    (tmp_path / "right.delta").write_bytes(forward.data)
    added = repo.add_companions("digits", "1.1.0", [Companion("compressed", tmp_path / "v2.zst"),
                                                    Companion("delta", tmp_path / "right.delta", base_version="1.0.0")],
                                now=NOW)
    assert [(c.kind, c.path) for c in added] == [("compressed", "digits/digits-1.1.0.bundle.zst"),
                                                 ("delta", f"digits/deltas/1.1.0/{v1.sha256}.delta")]
    assert json.loads((repo.metadata_dir / "targets.json").read_text())["signed"]["version"] == version_before + 1
    assert [t.version for t in repo.targets()] == ["1.0.0", "1.1.0"]  # bundles only, as every caller expects
    # a device's TUF client sees each companion with its signed length, hash and custom fields
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(repo.metadata_dir / "1.root.json", trust / "root.json")
    updater = u._refresh(trust, LocalFolderFetcher(repo.path), NOW)
    info = updater.get_targetinfo(added[1].path)
    assert info is not None and info.length == added[1].length
    assert info.custom == {"kind": "delta", "name": "digits", "version": "1.1.0", "of": v2.path,
                           "base_version": "1.0.0", "base_sha256": v1.sha256}
