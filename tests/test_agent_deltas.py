"""A fleet update that arrives as a delta, through the agent's own path: a real release repository
(bundles of real digits models, fine-tuned, with their compressed copies and deltas published as
the ``edgeship publish`` command makes them), the director source verified in the isolated child,
every byte fetched through this process, the base taken from what the previous update kept.

Each model kind and dtype (TFLite fp32, TFLite int8, ONNX) is rebuilt bit for bit; a corrupted, a
truncated and a mismatched delta are each refused and the compressed bundle taken instead; a
tampered compressed bundle is refused and the plain bundle taken; a device without a base takes
the compressed bundle. The transfer record says which, with the bytes that travelled.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from converters_fixtures import fine_tuned_digits

from edgeship.agent.config import parse_config
from edgeship.agent.isolated import IsolatedSource
from edgeship.agent.sources import DirectorSource, SourceContext, StagedBundle
from edgeship.ota.block_transfer import BlockTransferFailed
from edgeship.ota.bundle_build import build_bundle
from edgeship.ota.delivery import BASE_BUNDLE_NAME, companion_refusal, plan_deliveries
from edgeship.ota.release import ReleaseRepository, TargetInfo
from edgeship.toolkit.deltas import build_companions, build_delta

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)


class RepositoryDownloader:
    """The MqttBlockDownloader interface over a release repository folder; ``serve`` replaces what a
    path returns (what a hostile network or a damaged disk would hand the device)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.serve: dict[str, bytes] = {}
        self.opened: list[str] = []

    def chunks(self, url: str) -> Iterator[bytes]:
        stream = url.removeprefix("edgeship://")
        path = self.root / stream
        if stream not in self.serve and not path.is_file():
            raise BlockTransferFailed(f"{stream} not found on the block server", 404)
        self.opened.append(stream)
        data = self.serve.get(stream)
        return iter([data[i:i + 8192] for i in range(0, len(data), 8192)] if data is not None
                    else [path.read_bytes()])


@pytest.fixture(scope="module")
def digits_models(digits_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits model and the same model fine-tuned one more epoch (every weight moves), as TFLite
    fp32, TFLite int8 and ONNX files."""
    import tensorflow as tf
    import tf2onnx

    folder = tmp_path_factory.mktemp("delta-agent-models")
    old, new, x = fine_tuned_digits(digits_files)
    files: dict[str, Path] = {}
    for tag, model in (("old", old), ("new", new)):
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        files[f"{tag}-tflite-fp32"] = folder / f"{tag}-fp32.tflite"
        files[f"{tag}-tflite-fp32"].write_bytes(converter.convert())
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(64))
        files[f"{tag}-tflite-int8"] = folder / f"{tag}-int8.tflite"
        files[f"{tag}-tflite-int8"].write_bytes(converter.convert())
        spec = [tf.TensorSpec((None, 8, 8, 1), tf.float32, name="image")]
        forward = tf.function(lambda batch, m=model: m(batch, training=False), input_signature=spec)
        proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=13)
        files[f"{tag}-onnx"] = folder / f"{tag}.onnx"
        files[f"{tag}-onnx"].write_bytes(proto.SerializeToString())
    return files


def _release(tmp_path: Path, old_model: Path, new_model: Path) -> ReleaseRepository:
    """digits 1.0.0 (``old_model``) and 1.1.0 (``new_model``) published with their companions, as
    ``edgeship publish`` does it."""
    repo = ReleaseRepository(tmp_path / "repo")
    repo.init(root_passphrase="delta agent passphrase", now=NOW)
    for version, model in (("1.0.0", old_model), ("1.1.0", new_model)):
        out = tmp_path / f"digits-{version}.bundle"
        build_bundle(model, name="digits", version=version, out=out)
        info = repo.publish(out, now=NOW)
        scratch = tmp_path / f"companions-{version}"
        scratch.mkdir()
        built = build_companions(repo.targets(), info, scratch, bases=2)
        repo.add_companions(info.name, info.version, built.files, now=NOW)
    return repo


class Device:
    """One device's data folder and trust, updated through the agent's isolated director source."""

    def __init__(self, folder: Path, repo: ReleaseRepository) -> None:
        self.folder = folder
        self.repo = repo
        self.downloader = RepositoryDownloader(repo.path)
        self.config = parse_config(
            {"device": {"id": "dev-1", "fleet": "plant"}, "paths": {"data": str(folder / "data")},
             "trust": {"root": str(repo.metadata_dir / "1.root.json"),
                       "director_key": str(repo.director_public_key_path)}},
            source=folder / "agent.toml")
        self.base: Path | None = None
        self.base_version: str | None = None
        self.updates = 0

    def update(self, version: str) -> StagedBundle:
        """Fetch ``version`` as the agent does; its kept bundle becomes the next update's base."""
        self.updates += 1
        envelope = self.repo.sign_desired(fleet="plant", device="dev-1", name="digits", version=version, now=NOW)
        source = IsolatedSource(DirectorSource(envelope, self.downloader, {"kind": "mqtt", "envelope": envelope}))
        work = self.folder / f"work-{self.updates}"
        work.mkdir(parents=True)
        ctx = SourceContext(config=self.config, last_sequence=0, now=NOW, work_dir=work,
                            trust_dir=self.folder / "trust", base_bundle=self.base, base_version=self.base_version)
        source.admit(ctx)
        staged = source.fetch(ctx)
        kept = Path(staged.root) / BASE_BUNDLE_NAME
        assert kept.read_bytes() == self.repo.target_info("digits", version).file.read_bytes()  # bit for bit
        self.base, self.base_version = kept, version
        return staged


def _companion(repo: ReleaseRepository, version: str, kind: str) -> TargetInfo:
    return next(c for c in repo.companions("digits", version) if c.kind == kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tflite-fp32", "tflite-int8", "onnx"])
def test_a_fine_tuned_model_arrives_as_a_delta_bit_for_bit(digits_models: dict[str, Path], tmp_path: Path,
                                                           kind: str) -> None:
    repo = _release(tmp_path, digits_models[f"old-{kind}"], digits_models[f"new-{kind}"])
    delta = _companion(repo, "1.1.0", "delta")
    full = repo.target_info("digits", "1.1.0")
    device = Device(tmp_path / "device", repo)
    first = device.update("1.0.0")
    assert first.transfer is not None and first.transfer["kind"] == "compressed"  # no base yet
    assert first.transfer["bytes"] == _companion(repo, "1.0.0", "compressed").length
    staged = device.update("1.1.0")
    assert staged.transfer == {"kind": "delta", "bytes": delta.length, "full_bytes": full.length,
                               "base_version": "1.0.0"}
    model = "model.onnx" if kind == "onnx" else "model.tflite"
    assert (Path(staged.root) / model).read_bytes() == digits_models[f"new-{kind}"].read_bytes()
    assert f"targets/{delta.path}" in device.downloader.opened
    assert f"targets/{full.path}" not in device.downloader.opened  # the full bundle never travelled
    assert delta.length < full.length


@pytest.fixture(scope="module")
def fp32_release(digits_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> ReleaseRepository:
    return _release(tmp_path_factory.mktemp("fp32-release"), digits_models["old-tflite-fp32"],
                    digits_models["new-tflite-fp32"])


def _on_base(repo: ReleaseRepository, folder: Path) -> Device:
    device = Device(folder, repo)
    device.update("1.0.0")
    return device


def _fell_back(device: Device, repo: ReleaseRepository, wasted: int, because: str) -> None:
    """The update took the compressed bundle after the delta try failed, and says so."""
    zst = _companion(repo, "1.1.0", "compressed")
    staged = device.update("1.1.0")
    assert staged.transfer is not None
    assert staged.transfer["kind"] == "compressed", staged.transfer
    assert staged.transfer["bytes"] == wasted + zst.length
    assert staged.transfer["full_bytes"] == repo.target_info("digits", "1.1.0").length
    assert staged.transfer["fallback"].startswith("delta refused: ") and because in staged.transfer["fallback"], \
        staged.transfer
    assert len(staged.transfer["fallback"]) <= 200


@pytest.mark.slow
def test_a_corrupted_delta_is_refused_and_the_compressed_bundle_taken(fp32_release: ReleaseRepository,
                                                                     tmp_path: Path) -> None:
    device = _on_base(fp32_release, tmp_path)
    delta = _companion(fp32_release, "1.1.0", "delta")
    damaged = bytearray(delta.file.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    device.downloader.serve[f"targets/{delta.path}"] = bytes(damaged)
    _fell_back(device, fp32_release, delta.length, "does not match its signed sha256")


@pytest.mark.slow
def test_a_truncated_delta_is_refused_and_the_compressed_bundle_taken(fp32_release: ReleaseRepository,
                                                                     tmp_path: Path) -> None:
    device = _on_base(fp32_release, tmp_path)
    delta = _companion(fp32_release, "1.1.0", "delta")
    device.downloader.serve[f"targets/{delta.path}"] = delta.file.read_bytes()[:-300]
    _fell_back(device, fp32_release, delta.length - 300, "truncated")


@pytest.mark.slow
def test_a_delta_for_another_base_is_refused_and_the_compressed_bundle_taken(fp32_release: ReleaseRepository,
                                                                            tmp_path: Path) -> None:
    """A delta made from another bundle, served where this device's delta is: refused before it is
    applied (its bytes are not the signed ones), and apply_delta would refuse its base anyway."""
    device = _on_base(fp32_release, tmp_path)
    delta = _companion(fp32_release, "1.1.0", "delta")
    other = bytearray(fp32_release.target_info("digits", "1.0.0").file.read_bytes())
    other[-2000] ^= 1  # a bundle this device never had
    built = build_delta(bytes(other), fp32_release.target_info("digits", "1.1.0").file.read_bytes())
    assert built.data is not None
    device.downloader.serve[f"targets/{delta.path}"] = built.data
    _fell_back(device, fp32_release, len(built.data), "delta refused")


@pytest.mark.slow
def test_a_base_that_changed_on_disk_gets_no_delta(fp32_release: ReleaseRepository, tmp_path: Path) -> None:
    """The base's hash is computed, not read from a record: a kept bundle altered on disk names no
    published delta, and the compressed bundle is taken."""
    device = _on_base(fp32_release, tmp_path)
    assert device.base is not None
    data = bytearray(device.base.read_bytes())
    data[600] ^= 1
    device.base.write_bytes(bytes(data))
    staged = device.update("1.1.0")
    assert staged.transfer is not None and staged.transfer["kind"] == "compressed"
    assert "no delta is published from this base" in staged.transfer["fallback"]
    assert not any("/deltas/" in p for p in device.downloader.opened)


@pytest.mark.slow
def test_a_device_without_a_base_takes_the_compressed_bundle(fp32_release: ReleaseRepository,
                                                            tmp_path: Path) -> None:
    device = Device(tmp_path, fp32_release)
    staged = device.update("1.1.0")
    zst = _companion(fp32_release, "1.1.0", "compressed")
    assert staged.transfer == {"kind": "compressed", "bytes": zst.length,
                               "full_bytes": fp32_release.target_info("digits", "1.1.0").length}
    assert not any("/deltas/" in p for p in device.downloader.opened)


@pytest.mark.slow
def test_a_tampered_compressed_bundle_is_refused_and_the_plain_bundle_taken(fp32_release: ReleaseRepository,
                                                                           tmp_path: Path) -> None:
    device = Device(tmp_path, fp32_release)
    zst = _companion(fp32_release, "1.1.0", "compressed")
    damaged = bytearray(zst.file.read_bytes())
    damaged[len(damaged) // 3] ^= 0x01
    device.downloader.serve[f"targets/{zst.path}"] = bytes(damaged)
    staged = device.update("1.1.0")
    full = fp32_release.target_info("digits", "1.1.0")
    assert staged.transfer is not None and staged.transfer["kind"] == "full"
    assert staged.transfer["bytes"] == zst.length + full.length
    assert staged.transfer["fallback"].startswith("compressed refused: ")


@pytest.mark.slow
def test_a_failed_delta_and_a_failed_compressed_bundle_still_end_with_the_plain_one(
        fp32_release: ReleaseRepository, tmp_path: Path) -> None:
    device = _on_base(fp32_release, tmp_path)
    for kind in ("delta", "compressed"):
        companion = _companion(fp32_release, "1.1.0", kind)
        device.downloader.serve[f"targets/{companion.path}"] = companion.file.read_bytes()[:-10]
    staged = device.update("1.1.0")
    assert staged.transfer is not None and staged.transfer["kind"] == "full"
    assert "delta refused" in staged.transfer["fallback"] and "compressed refused" in staged.transfer["fallback"]


# -- the pure decisions ----------------------------------------------------------------------------

BUNDLE = "digits/digits-1.1.0.bundle"
BASE = hashlib.sha256(b"base").hexdigest()
GOOD_DELTA = {"kind": "delta", "name": "digits", "version": "1.1.0", "of": BUNDLE, "base_version": "1.0.0",
              "base_sha256": BASE}


@pytest.mark.parametrize("custom,length,hashes,refusal", [
    (GOOD_DELTA, 100, {"sha256": "x"}, None),
    ({**GOOD_DELTA, "kind": "compressed"}, 100, {"sha256": "x"}, "its signed kind is 'compressed'"),
    ({**GOOD_DELTA, "of": "digits/digits-9.0.0.bundle"}, 100, {"sha256": "x"}, "not of 'digits/digits-1.1.0.bundle'"),
    ({**GOOD_DELTA, "version": "1.0.9"}, 100, {"sha256": "x"}, "signed as a companion of"),
    ({**GOOD_DELTA, "base_sha256": "0" * 64}, 100, {"sha256": "x"}, "another base"),
    (GOOD_DELTA, 100, {"sha512": "x"}, "without a sha256"),
    (GOOD_DELTA, 5000, {"sha256": "x"}, "no smaller than the bundle's 5000"),
    (None, 100, {"sha256": "x"}, "its signed kind is None"),
])
def test_which_listed_delta_may_be_used(custom: Any, length: int, hashes: dict[str, str], refusal: str | None) -> None:
    found = companion_refusal("delta", custom, length, hashes, bundle_target=BUNDLE, bundle_length=5000,
                              name="digits", version="1.1.0", base_sha256=BASE)
    assert found == refusal if refusal is None else refusal in str(found)


def test_a_compressed_companion_in_another_encoding_is_not_used() -> None:
    custom = {"kind": "compressed", "encoding": "brotli", "name": "digits", "version": "1.1.0", "of": BUNDLE}
    assert "not zstd" in str(companion_refusal("compressed", custom, 100, {"sha256": "x"}, bundle_target=BUNDLE,
                                               bundle_length=5000, name="digits", version="1.1.0"))
    assert companion_refusal("compressed", {**custom, "encoding": "zstd"}, 100, {"sha256": "x"}, bundle_target=BUNDLE,
                             bundle_length=5000, name="digits", version="1.1.0") is None


@pytest.mark.parametrize("have_base,zstd,paths", [
    (True, True, ("delta", "compressed", "full")),
    (False, True, ("compressed", "full")),
    (True, False, ("full",)),
    (False, False, ("full",)),
])
def test_the_paths_tried_in_order(have_base: bool, zstd: bool, paths: tuple[str, ...]) -> None:
    assert plan_deliveries(have_base=have_base, can_decompress=zstd) == paths


def test_the_transfer_is_reported_with_the_update_and_on_the_verifying_event() -> None:
    from edgeship.agent.persistence import AgentState, UpdateRecord
    from edgeship.agent.reporter import event_document, state_document, transfer_summary
    from edgeship.agent.state_machine import State

    transfer = {"kind": "delta", "bytes": 2503, "full_bytes": 163840, "base_version": "1.0.0"}
    state = AgentState(update=UpdateRecord(id="u1", kind="install", state="VERIFYING",
                                           bundle={"name": "digits", "version": "1.1.0"}, transfer=transfer))
    config = parse_config({"device": {"id": "dev-1", "fleet": "plant"}, "paths": {"data": "/nonexistent"},
                           "trust": {"root": "/r.json", "director_key": "/d.pub"}}, source=Path("agent.toml"))
    assert state_document(config, state)["update"]["transfer"] == transfer
    assert event_document(state, 3, State.VERIFYING, "fetched")["transfer"] == transfer
    assert "transfer" not in event_document(state, 4, State.PROBATION, "serving")
    assert UpdateRecord.from_dict(state.update.to_dict()).transfer == transfer  # survives a restart
    assert transfer_summary(transfer) == "delta from 1.0.0: 2,503 of 163,840 bytes"
    assert transfer_summary({"kind": "full", "bytes": 9, "full_bytes": 5, "fallback": "compressed refused: x"}) \
        == "full: 9 of 5 bytes; compressed refused: x"
    state.update.transfer = None
    assert "transfer" not in state_document(config, state)["update"]
