"""The attack table of the bundle's trust, archive side: every hostile bundle is refused with its own
exception, before its content is written, and nothing is left extracted.

The hostile archives are real tar files written with Python's tarfile (or by hand
where tarfile will not write them), read by the same extractor the device uses,
both directly and through a TUF-signed download (a compromised build machine).
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from ota_repo_simulator import SIGNATURE, RepositorySimulator, fake_tflite, leftovers

from edgeship.ota import archive as a
from edgeship.ota import director as d
from edgeship.ota import updater as u
from edgeship.ota.bundle import (
    BundleManifest,
    ExtractionLimits,
    UnsafeBundleError,
    extract_bundle,
    extract_bundle_stream,
    read_manifest,
    scan_bundle,
)
from edgeship.ota.errors import EXIT_REJECTED, BadInputError
from edgeship.ota.offline import open_offline_package

MODEL = fake_tflite(3000)
LABELS = b"zero\none\ntwo\n"
Entry = tuple[tarfile.TarInfo, Optional[bytes]]


def manifest_bytes(contents: dict[str, bytes], **overrides: Any) -> bytes:
    doc = BundleManifest(
        name="digits", version="1.0.0", format="tflite", model_file="model.tflite",
        files={n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in contents.items()},
        signature=SIGNATURE, created="2026-11-23T12:00:00Z",
    ).to_dict()
    doc.update(overrides)
    return json.dumps(doc).encode()


def entry(name: str, data: bytes | None = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "",
          size: int | None = None) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if (data is not None and size is None) else (size or 0)
    info.mode = 0o644
    return info, data


def tar_of(entries: list[Entry], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def good_entries(files: dict[str, bytes] | None = None) -> list[Entry]:
    files = files if files is not None else {"model.tflite": MODEL, "labels.txt": LABELS}
    return [entry("manifest.json", manifest_bytes(files))] + [entry(n, b) for n, b in files.items()]


def raw_header(name: bytes, size: int, kind: bytes = b"0") -> bytes:
    """A ustar header written by hand (for sizes and names tarfile would not write)."""
    header = bytearray(512)
    header[0:len(name)] = name
    header[100:108] = b"0000644\0"
    if size >= 8**11:
        header[124:136] = b"\x80" + size.to_bytes(11, "big")
    else:
        header[124:136] = f"{size:011o}\0".encode()
    header[136:148] = b"00000000000\0"
    header[156:157] = kind
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header)


# -- the table ----------------------------------------------------------------------------------------

def _with_member(extra: Entry) -> bytes:
    return tar_of(good_entries() + [extra])


def _replace_model(info: Entry) -> bytes:
    files = {"model.tflite": MODEL}
    return tar_of([entry("manifest.json", manifest_bytes(files)), info])


def _long_name(fmt: int) -> bytes:
    return tar_of(good_entries() + [entry("m" * 150, b"x")], fmt)


def _declared_bomb(name: bytes = b"model.tflite", kind: bytes = b"0") -> bytes:
    """A member whose header claims 10 GiB (the data is not there: it must never be read)."""
    manifest = manifest_bytes({"model.tflite": MODEL})
    head = tar_of([entry("manifest.json", manifest)])[: 512 + len(manifest) + (-len(manifest) % 512)]
    return head + raw_header(name, 10 * 1024**3, kind) + b"\0" * 4096


def _grows_past_declared() -> bytes:
    big = b"\0" * (3 * 1024 * 1024)
    return tar_of([entry("manifest.json", manifest_bytes({"model.tflite": MODEL})), entry("model.tflite", big)])


def _non_utf8_name() -> bytes:
    return _with_member(entry("mod\udcffel.bin", b"x"))


def _hash_mismatch() -> bytes:
    tampered = bytearray(MODEL)
    tampered[100] ^= 0xFF
    return tar_of([entry("manifest.json", manifest_bytes({"model.tflite": MODEL})),
                   entry("model.tflite", bytes(tampered))])


def _truncated() -> bytes:
    return tar_of(good_entries())[:512 * 3 + 100]


def _trailing_garbage() -> bytes:
    return tar_of(good_entries()) + b"#!/bin/sh\nrm -rf /\n"


def _size_field(name: bytes, field: bytes, kind: bytes = b"0") -> bytes:
    """A hand-written header whose size field holds ``field`` verbatim (checksum fixed)."""
    header = bytearray(raw_header(name, 0, kind))
    header[124:136] = field
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header)


def _bad_manifest_size(field: bytes) -> bytes:
    return _size_field(b"manifest.json", field) + b"\x01" * 4096


def _case_twins() -> bytes:
    files = {"model.tflite": MODEL, "labels.txt": LABELS, "LABELS.txt": LABELS}
    return tar_of([entry("manifest.json", manifest_bytes(files))] + [entry(n, b) for n, b in files.items()])


CASES: list[tuple[str, Callable[[], bytes], type[UnsafeBundleError], str]] = [
    ("absolute path", lambda: _with_member(entry("/etc/cron.d/evil", b"x")),
     a.UnsafeMemberNameError, "absolute path"),
    ("dot-dot", lambda: _with_member(entry("../../home/pi/.bashrc", b"x")),
     a.UnsafeMemberNameError, "climbs out"),
    ("dot-dot inside a path", lambda: _with_member(entry("a/../../evil", b"x")),
     a.UnsafeMemberNameError, "climbs out"),
    ("member in a folder", lambda: _with_member(entry("sub/model.tflite", b"x")),
     a.UnsafeMemberNameError, "flat files"),
    ("symbolic link", lambda: _replace_model(entry("model.tflite", None, tarfile.SYMTYPE, "/etc/shadow")),
     a.UnsafeMemberTypeError, "symbolic link"),
    ("hard link", lambda: _replace_model(entry("model.tflite", None, tarfile.LNKTYPE, "/etc/shadow")),
     a.UnsafeMemberTypeError, "hard link"),
    ("character device", lambda: _with_member(entry("null", None, tarfile.CHRTYPE)),
     a.UnsafeMemberTypeError, "character device"),
    ("block device", lambda: _with_member(entry("sda", None, tarfile.BLKTYPE)),
     a.UnsafeMemberTypeError, "block device"),
    ("fifo", lambda: _with_member(entry("pipe", None, tarfile.FIFOTYPE)),
     a.UnsafeMemberTypeError, "fifo"),
    ("directory", lambda: _with_member(entry("folder", None, tarfile.DIRTYPE)),
     a.UnsafeMemberTypeError, "directory"),
    ("duplicate member", lambda: _with_member(entry("model.tflite", MODEL)),
     a.DuplicateMemberError, "'model.tflite' appears twice"),
    ("second manifest", lambda: _with_member(entry("manifest.json", b"{}")),
     a.DuplicateMemberError, "'manifest.json' appears twice"),
    ("member outside the manifest", lambda: _with_member(entry("install.sh", b"#!/bin/sh\n")),
     a.UnexpectedMemberError, "'install.sh' is not listed"),
    ("member missing", lambda: tar_of([entry("manifest.json", manifest_bytes({"model.tflite": MODEL,
                                                                              "labels.txt": LABELS})),
                                       entry("model.tflite", MODEL)]),
     a.MissingMemberError, "labels.txt"),
    ("member grows past its declared size", _grows_past_declared,
     a.MemberSizeError, "larger than the 3000 bytes its manifest declares; refused before reading it"),
    ("decompression bomb (10 GiB declared)", _declared_bomb,
     a.MemberSizeError, "declares 10737418240 bytes"),
    ("gzip bomb", lambda: gzip.compress(b"\0" * (20 * 1024 * 1024)),
     a.CompressedArchiveError, "gzip-compressed"),
    ("member content altered", _hash_mismatch, a.MemberHashError, "does not match its manifest"),
    ("non-UTF-8 member name", _non_utf8_name, a.UnsafeMemberNameError, "not UTF-8"),
    ("very long name (GNU)", lambda: _long_name(tarfile.GNU_FORMAT), a.UnsafeMemberNameError, "GNU long name"),
    ("very long name (pax)", lambda: _long_name(tarfile.PAX_FORMAT), a.UnsafeMemberTypeError,
     "pax extended header"),
    ("very long name (ustar prefix)", lambda: _with_member(entry("d" * 120 + "/x", b"x")),
     a.UnsafeMemberNameError, "longer than the 100 allowed"),
    ("control characters in a name", lambda: _with_member(entry("model\n.tflite", b"x")),
     a.UnsafeMemberNameError, "control characters"),
    ("manifest not first", lambda: tar_of(list(reversed(good_entries()))),
     a.ManifestError, "first member is 'labels.txt'"),
    ("manifest not JSON", lambda: tar_of([entry("manifest.json", b"\xff\xfe not json")]),
     a.ManifestError, "not valid UTF-8 JSON"),
    ("manifest listing a path", lambda: tar_of([entry("manifest.json", manifest_bytes(
        {"model.tflite": MODEL}, files={"model.tflite": {"size": 1, "sha256": "0" * 64},
                                        "../evil": {"size": 1, "sha256": "0" * 64}}))]),
     a.ManifestError, "'../evil' is not allowed"),
    ("manifest too large", lambda: tar_of([entry("manifest.json", b" " * (1024 * 1024 + 1))]),
     a.MemberSizeError, "at most 1048576"),
    ("truncated archive", _truncated, a.TruncatedArchiveError, "truncated"),
    ("data after the end", _trailing_garbage, a.MalformedArchiveError, "after its end-of-archive marker"),
    ("not a tar file", lambda: b"PKGX" + bytes(range(256)) * 8, a.MalformedArchiveError, "bad checksum"),
    ("empty file", lambda: b"", a.TruncatedArchiveError, "empty"),
    ("negative size", lambda: _bad_manifest_size(b"-0000000001\0"), a.MalformedArchiveError, "unreadable size"),
    ("size with a sign", lambda: _bad_manifest_size(b"+0000000012\0"), a.MalformedArchiveError, "unreadable size"),
    ("size with an underscore", lambda: _bad_manifest_size(b"0000_000012\0"), a.MalformedArchiveError,
     "unreadable size"),
    ("negative base-256 size", lambda: _bad_manifest_size(b"\xff" * 12), a.MalformedArchiveError, "negative size"),
    ("sparse file (GNU)", lambda: _with_member(entry("sparse", None, b"S")), a.UnsafeMemberTypeError,
     "GNU sparse file"),
    ("contiguous file", lambda: _with_member(entry("model.bin", b"x", b"7")), a.UnsafeMemberTypeError,
     "contiguous file"),
    ("pax header claiming 10 GiB", lambda: _declared_bomb(b"././@PaxHeader", b"x"), a.UnsafeMemberTypeError,
     "pax extended header"),
    ("manifest names equal but for case", _case_twins, a.ManifestError, "differ only by case"),
    ("manifest name with a trailing newline", lambda: tar_of([entry("manifest.json", manifest_bytes(
        {"model.tflite": MODEL}, files={"model.tflite": {"size": 1, "sha256": "0" * 64},
                                        "labels.txt\n": {"size": 1, "sha256": "0" * 64}}))]),
     a.ManifestError, "is not allowed"),
]


@pytest.mark.parametrize("label,build,error,message", CASES, ids=[c[0] for c in CASES])
def test_hostile_bundle_is_refused_and_nothing_extracted(
        tmp_path: Path, label: str, build: Callable[[], bytes], error: type[UnsafeBundleError], message: str) -> None:
    bundle = tmp_path / "hostile.bundle"
    bundle.write_bytes(build())
    dest = tmp_path / "out" / "digits"
    with pytest.raises(error, match=message) as info:
        extract_bundle(bundle, dest)
    assert isinstance(info.value, UnsafeBundleError) and info.value.exit_code == EXIT_REJECTED
    assert "\n" not in info.value.message
    assert leftovers(tmp_path / "out") == [], f"{label}: something was left behind"
    with pytest.raises(error):
        scan_bundle(bundle)


def test_good_bundle_extracts(tmp_path: Path) -> None:
    bundle = tmp_path / "good.bundle"
    bundle.write_bytes(tar_of(good_entries()))
    result = extract_bundle(bundle, tmp_path / "out")
    assert result.model_path.read_bytes() == MODEL
    assert result.labels_path is not None and result.labels_path.read_bytes() == LABELS
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["labels.txt", "manifest.json", "model.tflite"]


class CountingStream:
    """A stream that counts what is read from it, optionally endless after ``data``."""

    def __init__(self, data: bytes, endless: bool = False) -> None:
        self._data = io.BytesIO(data)
        self._endless = endless
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        chunk = self._data.read(n)
        if not chunk and self._endless:
            chunk = b"\x01" * max(n, 1)
        self.read_bytes += len(chunk)
        return chunk


def test_oversized_member_is_stopped_before_its_content_streams(tmp_path: Path) -> None:
    stream = CountingStream(_grows_past_declared())
    with pytest.raises(a.MemberSizeError):
        extract_bundle_stream(stream, tmp_path / "out")  # type: ignore[arg-type]
    assert stream.read_bytes < 8192  # the 3 MiB member was never read
    assert leftovers(tmp_path) == []


def test_endless_member_is_cut_at_the_cap(tmp_path: Path) -> None:
    # a header claiming 1 GiB, then an endless stream: refused at the header under a 64 MiB cap
    manifest = manifest_bytes({"model.tflite": MODEL})
    data = tar_of([entry("manifest.json", manifest)])[: 512 + len(manifest) + (-len(manifest) % 512)]
    stream = CountingStream(data + raw_header(b"model.tflite", 1024**3), endless=True)
    with pytest.raises(a.MemberSizeError, match="refused before reading"):
        extract_bundle_stream(stream, tmp_path / "out", limits=ExtractionLimits(max_member_bytes=64 << 20))  # type: ignore[arg-type]
    assert stream.read_bytes < 8192
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("field", [b"-0000000001\0", b" -1        \0"])
def test_negative_size_never_reads_the_stream_at_once(tmp_path: Path, field: bytes) -> None:
    # a size of -1 once turned into read(-1): the whole (endless) stream in one call
    stream = CountingStream(_size_field(b"manifest.json", field) + b"\x01" * (8 << 20))
    with pytest.raises(a.MalformedArchiveError, match="unreadable size"):
        extract_bundle_stream(stream, tmp_path / "out")  # type: ignore[arg-type]
    assert stream.read_bytes < 8192
    assert leftovers(tmp_path) == []


def test_endless_zero_padding_is_cut(tmp_path: Path) -> None:
    stream = CountingStream(tar_of(good_entries()), endless=False)
    stream._data = io.BytesIO(stream._data.getvalue() + b"\0" * (3 << 20))
    with pytest.raises(a.ArchiveTooLargeError, match="after its end-of-archive marker"):
        extract_bundle_stream(stream, tmp_path / "out")  # type: ignore[arg-type]
    assert stream.read_bytes < (2 << 20)
    assert leftovers(tmp_path) == []


def test_limits_cap_members_and_total(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.write_bytes(tar_of(good_entries()))
    with pytest.raises(UnsafeBundleError, match="more than 2 members"):
        extract_bundle(bundle, tmp_path / "o1", limits=ExtractionLimits(max_members=2))
    with pytest.raises(a.MemberSizeError, match="add up to more than 3005"):
        extract_bundle(bundle, tmp_path / "o2", limits=ExtractionLimits(max_total_bytes=3005))
    with pytest.raises(a.MemberSizeError, match="more than the 2000 allowed per member"):
        extract_bundle(bundle, tmp_path / "o3", limits=ExtractionLimits(max_member_bytes=2000))
    assert leftovers(tmp_path) == ["b"]


def test_read_manifest_reads_only_the_manifest(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.write_bytes(_hash_mismatch())  # the model is altered, the manifest is fine
    assert read_manifest(bundle).name == "digits"


def test_extraction_into_a_non_empty_folder_is_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.write_bytes(tar_of(good_entries()))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not empty"):
        extract_bundle(bundle, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# -- hostile bundles signed by the release repository (a compromised build machine) -------------------

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)
SIGNED_CASES = [c for c in CASES if c[0] in ("symbolic link", "dot-dot", "member outside the manifest",
                                             "gzip bomb", "non-UTF-8 member name", "decompression bomb (10 GiB declared)",
                                             "negative size", "pax header claiming 10 GiB",
                                             "manifest names equal but for case")]


@pytest.mark.parametrize("label,build,error,message", SIGNED_CASES, ids=[c[0] for c in SIGNED_CASES])
def test_signed_hostile_bundle_is_refused_on_the_device(
        tmp_path: Path, label: str, build: Callable[[], bytes], error: type[UnsafeBundleError], message: str) -> None:
    sim = RepositorySimulator(NOW)
    hostile = tmp_path / "hostile.bundle"
    hostile.write_bytes(build())
    sim.add_target(hostile, name="digits", version="1.0.0")
    state = d.verify_desired_state(sim.desired(), sim.director_key.public_key(), device="dev-1", fleet="plant",
                                   last_sequence=None, now=NOW)
    work = tmp_path / "work"
    with pytest.raises(error, match=message):
        u.fetch_verified_bundle(trust_dir=sim.provision(tmp_path / "trust"), desired=state, fetcher=sim,
                                work_dir=work, now=NOW)
    assert leftovers(work) == []


# -- offline packages are read with the same care ----------------------------------------------------

@pytest.mark.parametrize("names", [["targets/a", "targets/a/b"], ["targets/a/b", "targets/a"]])
def test_offline_package_with_a_file_and_folder_of_one_name(tmp_path: Path, names: list[str]) -> None:
    # one name used as a file and as a folder: an archive error, not a bare OSError
    package = tmp_path / "p.tar"
    package.write_bytes(tar_of([entry("package.json", b"{}")] + [entry(n, b"x") for n in names]))
    with pytest.raises(a.UnsafeMemberNameError, match="clashes"):
        open_offline_package(package, tmp_path / "usb")
    assert leftovers(tmp_path / "usb") == []


@pytest.mark.parametrize("name,error,message", [
    ("install.sh", a.UnexpectedMemberError, "does not belong in an offline package"),
    ("../desired.json", a.UnsafeMemberNameError, "climbs out"),
    ("metadata/sub/x.json", a.UnexpectedMemberError, "does not belong"),
])
def test_hostile_offline_package(tmp_path: Path, name: str, error: type[UnsafeBundleError], message: str) -> None:
    package = tmp_path / "p.tar"
    package.write_bytes(tar_of([entry("package.json", b"{}"), entry(name, b"x")]))
    with pytest.raises(error, match=message):
        open_offline_package(package, tmp_path / "usb")
    assert leftovers(tmp_path / "usb") == []


class TrickleStream:
    """A stream that returns at most ``step`` bytes per read (a slow transport)."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = io.BytesIO(data)
        self._step = step

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(self._step, n if n >= 0 else self._step))


@pytest.mark.parametrize("step", [1, 7, 511, 513])
def test_streams_delivered_in_small_pieces(tmp_path: Path, step: int) -> None:
    result = extract_bundle_stream(TrickleStream(tar_of(good_entries()), step), tmp_path / f"out{step}")  # type: ignore[arg-type]
    assert result.model_path.read_bytes() == MODEL
    with pytest.raises(a.CompressedArchiveError):
        extract_bundle_stream(TrickleStream(gzip.compress(b"\0" * 1000), step), tmp_path / "gz")  # type: ignore[arg-type]
    assert not (tmp_path / "gz").exists()


def test_broken_end_marker(tmp_path: Path) -> None:
    entries = good_entries()
    data = bytearray(tar_of(entries))
    end = sum(512 + len(body or b"") + (-len(body or b"") % 512) for _, body in entries)  # the end marker
    data[end + 512 + 7] = 1  # inside its second zero block
    bundle = tmp_path / "b"
    bundle.write_bytes(bytes(data))
    with pytest.raises(a.MalformedArchiveError, match="broken end-of-archive marker"):
        extract_bundle(bundle, tmp_path / "out")
    assert leftovers(tmp_path / "out") == []
