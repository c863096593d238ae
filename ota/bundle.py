"""Model bundles: one uncompressed POSIX tar file holding a model and what a device needs
to trust, test and serve it (see docs/bundle-format.md).

One concept over 500 lines: the bundle format, written and read (safe extraction) in one place.

Layout: ``manifest.json`` first, then the model (``model.tflite`` or ``model.onnx``),
then optionally ``golden.npz``, ``labels.txt`` and ``report.json``. The manifest
lists every other member with its size and sha256; extraction refuses anything
the manifest does not list, checks sizes while the bytes stream, and writes into
a temporary folder that is renamed into place only when every check passed.
"""

from __future__ import annotations

__all__ = [
    "MANIFEST_NAME",
    "MODEL_FILES",
    "SCHEMA_VERSION",
    "BundleManifest",
    "BundleScan",
    "ExtractedBundle",
    "ExtractionLimits",
    "UnsafeBundleError",
    "build_bundle",
    "extract_bundle",
    "extract_bundle_stream",
    "read_labels",
    "read_manifest",
    "scan_bundle",
    "sidecar_files",
]

import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .archive import (
    CHUNK_SIZE,
    DuplicateMemberError,
    ExtractionLimits,
    ManifestError,
    MemberHashError,
    MemberSizeError,
    MissingMemberError,
    TarStreamReader,
    UnexpectedMemberError,
    UnsafeBundleError,
)
from .atomicfile import atomic_output_path, fsync_dir
from .errors import BadInputError, EdgeshipError
from .hashing import hash_file
from .manifest import (
    GOLDEN_NAME,
    LABELS_NAME,
    MANIFEST_NAME,
    MODEL_FILES,
    REPORT_NAME,
    SCHEMA_VERSION,
    BundleManifest,
)
from .versions import check_name, parse_version

_MAX_LABELS_BYTES = 4 * 1024**2
_MAX_REPORT_BYTES = 4 * 1024**2

ProgressCallback = Callable[[str, int, int], None]


def _utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def _iso(moment: _dt.datetime) -> str:
    return moment.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ExtractedBundle:
    """A bundle extracted and checked member by member against its manifest."""

    root: Path
    manifest: BundleManifest
    model_path: Path
    golden_path: Path | None
    labels_path: Path | None
    report_path: Path | None = None


@dataclass(frozen=True)
class BundleScan:
    """The result of reading a whole bundle without writing it anywhere."""

    manifest: BundleManifest
    length: int
    sha256: str


# -- building --------------------------------------------------------------------------------------

def sidecar_files(model_path: str | os.PathLike[str]) -> dict[str, Path | None]:
    """The converter's files beside a model: ``MODEL.golden.npz`` and ``MODEL.report.json``.

    ``digits.tflite`` -> ``digits.tflite.golden.npz`` (or ``digits.golden.npz``).
    """
    model = Path(model_path)
    found: dict[str, Path | None] = {}
    for key, suffix in (("golden", ".golden.npz"), ("report", ".report.json")):
        candidates = [model.with_name(model.name + suffix), model.with_name(model.stem + suffix)]
        found[key] = next((c for c in candidates if c.is_file()), None)
    return found


class _ProgressReader:
    """A file wrapper that reports how much of it was read (tarfile copies through ``read``)."""

    def __init__(self, handle: BinaryIO, progress: ProgressCallback | None, total: int) -> None:
        self._handle = handle
        self._progress = progress
        self._total = total
        self._done = 0

    def read(self, n: int = -1) -> bytes:
        data = self._handle.read(n)
        self._done += len(data)
        if self._progress is not None:
            self._progress("pack", self._done, self._total)
        return data


def _load_report(report: Any) -> dict[str, Any]:
    if report is None:
        return {}
    if isinstance(report, Mapping):
        return dict(report)
    path = Path(report)
    try:
        if path.stat().st_size > _MAX_REPORT_BYTES:
            raise BadInputError(f"report {path} is larger than {_MAX_REPORT_BYTES} bytes")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInputError(f"report {path} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise BadInputError(f"report {path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadInputError(f"report {path} is not a JSON object")
    return doc


def read_labels(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Class names, one per line in class-index order (the converter and the bundle
    read the same file the same way). Blank lines at the end are ignored; a blank
    line before a name would shift every later class, so it is refused."""
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_LABELS_BYTES:
            raise BadInputError(f"labels file {path} is larger than {_MAX_LABELS_BYTES} bytes")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise BadInputError(f"labels file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BadInputError(f"labels file {path} is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise BadInputError(f"labels file {path} has no labels (one per line)")
    if "" in lines:
        raise BadInputError(
            f"labels file {path}: line {lines.index('') + 1} is blank (one class name per line, "
            "in class-index order)"
        )
    return tuple(lines)


def _first(report: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if report.get(key) is not None:
            return report[key]
    return None


def _derive_signature(model: Path) -> tuple[dict[str, Any], str, str, list]:
    """Load the model through the runtimes to read its signature (no report given)."""
    from edgeship.agent.runtimes import ModelLoadError, RuntimeUnavailableError, open_model

    try:
        with open_model(model) as runner:
            operators = runner.operators() if hasattr(runner, "operators") else []
            return runner.signature.to_dict(), runner.runtime, runner.runtime_version, list(operators)
    except RuntimeUnavailableError as exc:
        raise BadInputError(
            f"{model}: no converter report was given and the model cannot be loaded here to read its "
            f"signature ({exc.message}); pass --report MODEL.report.json"
        ) from None
    except ModelLoadError:
        raise


def _runtime_requirements(report: Mapping[str, Any], fmt: str, signature: Mapping[str, Any],
                          loaded: tuple[str, str, list] | None) -> dict[str, Any]:
    given = _first(report, "runtime_requirements", "runtime", "requirements")
    runtime: dict[str, Any] = dict(given) if isinstance(given, Mapping) else {}
    # the converter's report names the runtime "name"; the manifest calls it "runtime"
    runtime["runtime"] = runtime.get("runtime") or runtime.get("name") or (
        "tflite" if fmt == "tflite" else "onnxruntime")
    runtime.setdefault("min_version", None)
    runtime.setdefault("architectures", [])
    tensors = list(signature.get("inputs", [])) + list(signature.get("outputs", []))
    runtime.setdefault("int8_io", any(t.get("dtype") in ("int8", "uint8") for t in tensors))
    operators = report.get("operators")
    if operators is None and loaded is not None:
        operators = sorted(set(loaded[2]))
    if isinstance(operators, Mapping):  # {"counts": {"op": n}, ...} or {"op": n}
        counts = operators.get("counts")
        operators = sorted(counts) if isinstance(counts, Mapping) else sorted(
            k for k, v in operators.items() if isinstance(v, int) and not isinstance(v, bool))
    runtime.setdefault("operators", list(operators or []))
    runtime.setdefault("delegates", [])
    return runtime


def build_bundle(
    model_path: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    out: str | os.PathLike[str],
    golden: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    meta: Mapping[str, str] | None = None,
    tags: Sequence[str] | None = None,
    created: _dt.datetime | None = None,
    progress: ProgressCallback | None = None,
) -> BundleManifest:
    """Pack a converted model into a bundle file at ``out`` (written atomically).

    Args:
        model_path: the ``.tflite`` or ``.onnx`` model.
        golden: golden vectors (edgeship.ota.golden format).
        labels: a text file, one class label per line.
        report: the converter's ``.report.json`` (path or dict): signature, preprocessing,
            quality, operators, runtime requirements, golden tolerance. Without it the
            signature is read by loading the model through ``edgeship.agent.runtimes``.
        meta: free ``key -> value`` strings kept in the manifest.
        tags: the device tags the bundle is meant for.
        progress: called as ``(step, done, total)`` while large files are hashed,
            packed and re-checked (steps ``hash``, ``pack``, ``verify``).

    Raises:
        BadInputError: an input file is missing, unreadable or malformed.
    """
    from edgeship.agent.runtimes import detect_model_format

    model = Path(model_path)
    check_name(name)
    parse_version(version)
    if not model.is_file():
        raise BadInputError(f"model {model}: no such file")
    fmt = detect_model_format(model)
    report_doc = _load_report(report)
    members: dict[str, Path] = {MODEL_FILES[fmt]: model}

    signature = report_doc.get("signature")
    loaded: tuple[str, str, list] | None = None
    if not isinstance(signature, Mapping):
        signature, runtime_name, runtime_version, operators = _derive_signature(model)
        loaded = (runtime_name, runtime_version, operators)

    golden_info: dict[str, Any] | None = None
    if golden is not None:
        from .golden import GoldenVectors, check_against_signature

        vectors = GoldenVectors.load(golden)
        check_against_signature(vectors, signature)  # by name and dtype, before anything is packed
        tolerance = _first(report_doc, "golden_tolerance", "golden")
        atol, rtol = vectors.atol, vectors.rtol
        if isinstance(tolerance, Mapping):
            try:
                atol = float(tolerance.get("atol", atol))
                rtol = float(tolerance.get("rtol", rtol))
            except (TypeError, ValueError):
                raise BadInputError("the report's golden atol and rtol must be numbers") from None
            if not (math.isfinite(atol) and math.isfinite(rtol) and atol >= 0 and rtol >= 0):
                raise BadInputError("the report's golden atol and rtol must be finite numbers >= 0")
        golden_info = {"file": GOLDEN_NAME, "atol": atol, "rtol": rtol, "count": int(vectors.inputs[0].shape[0])
                       if vectors.inputs and vectors.inputs[0].ndim else 1}
        members[GOLDEN_NAME] = Path(golden)
    label_list: tuple[str, ...] = ()
    generated: dict[str, bytes] = {}
    if labels is not None:
        label_list = read_labels(labels)
        members[LABELS_NAME] = Path(labels)
    elif isinstance(report_doc.get("labels"), list) and report_doc["labels"]:
        label_list = tuple(str(x) for x in report_doc["labels"])
        generated[LABELS_NAME] = ("\n".join(label_list) + "\n").encode("utf-8")

    if report_doc:
        generated[REPORT_NAME] = (json.dumps(report_doc, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")

    files: dict[str, dict[str, Any]] = {}
    for member, path in members.items():
        try:
            size, digest = hash_file(path, progress)
        except OSError as exc:
            raise BadInputError(f"{path} cannot be read: {exc.strerror or exc}") from None
        files[member] = {"size": size, "sha256": digest}
    for member, payload in generated.items():
        files[member] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

    quality = report_doc.get("quality")
    if not isinstance(quality, Mapping):
        quality = {k: report_doc[k] for k in ("accuracy", "agreement", "size", "size_bytes", "max_abs_error")
                   if k in report_doc}
    preprocessing = report_doc.get("preprocessing")
    moment = created or _utc_now()
    manifest = BundleManifest(
        name=name,
        version=version,
        format=fmt,
        model_file=MODEL_FILES[fmt],
        files=files,
        runtime=_runtime_requirements(report_doc, fmt, signature, loaded),
        signature=dict(signature),
        preprocessing=dict(preprocessing) if isinstance(preprocessing, Mapping) else {},
        golden=golden_info,
        labels=label_list,
        quality=dict(quality),
        tags=tuple(tags or ()),
        meta={str(k): str(v) for k, v in (meta or {}).items()},
        created=_iso(moment),
    )
    manifest = BundleManifest.from_dict(json.loads(manifest.to_json_bytes()))  # what a reader will see
    mtime = int(moment.timestamp())
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise BadInputError(f"output folder {out_path.parent} does not exist")
    try:
        with atomic_output_path(out_path, mode=0o644) as tmp:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                _add_bytes(tar, MANIFEST_NAME, manifest.to_json_bytes(), mtime)
                for member, path in members.items():
                    info = _tarinfo(member, files[member]["size"], mtime)
                    with open(path, "rb") as handle:
                        tar.addfile(info, _ProgressReader(handle, progress, files[member]["size"]))
                for member, payload in generated.items():
                    _add_bytes(tar, member, payload, mtime)
            # a file changed while it was packed would not match its manifest entry
            scan_bundle(tmp, progress=progress)
    except OSError as exc:
        raise EdgeshipError(f"bundle {out_path} cannot be written: {exc.strerror or exc}") from None
    return manifest


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes, mtime: int) -> None:
    import io

    tar.addfile(_tarinfo(name, len(payload), mtime), io.BytesIO(payload))


# -- reading ---------------------------------------------------------------------------------------

def _open_bundle(path: Path) -> BinaryIO:
    try:
        return open(path, "rb", buffering=CHUNK_SIZE)
    except FileNotFoundError:
        raise BadInputError(f"bundle {path}: no such file") from None
    except IsADirectoryError:
        raise BadInputError(f"bundle {path} is a folder, not a bundle file") from None
    except OSError as exc:
        raise EdgeshipError(f"bundle {path} cannot be read: {exc.strerror or exc}") from None


def _read_manifest_member(reader: TarStreamReader) -> BundleManifest:
    member = reader.next_member()
    if member is None:
        raise ManifestError("the bundle is empty: it has no manifest.json")
    if member.name != MANIFEST_NAME:
        raise ManifestError(f"the bundle's first member is {member.name!r}; it must be {MANIFEST_NAME!r}")
    data = reader.read_small(member, reader.limits.max_manifest_bytes)
    return BundleManifest.from_json_bytes(data)


def read_manifest(bundle_path: str | os.PathLike[str], *, limits: ExtractionLimits | None = None) -> BundleManifest:
    """Read only the manifest (the first member) of a bundle. Nothing is verified but its shape."""
    with _open_bundle(Path(bundle_path)) as stream:
        return _read_manifest_member(TarStreamReader(stream, limits))


class _HashingReader:
    """A read-only stream wrapper that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO, progress: ProgressCallback | None = None, total: int = 0) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.length = 0
        self._progress = progress
        self._total = total
        self._next_report = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self.digest.update(data)
            self.length += len(data)
            if self._progress is not None and self.length >= self._next_report:
                self._progress("verify", self.length, self._total)
                self._next_report = self.length + 8 * CHUNK_SIZE
        return data


def _walk_members(
    reader: TarStreamReader,
    manifest: BundleManifest,
    sink: Callable[[str], BinaryIO | None],
) -> None:
    """Check every member after the manifest against it; stream each into ``sink(name)``."""
    seen = set()
    limits = reader.limits
    total = 0
    while True:
        member = reader.next_member()
        if member is None:
            break
        if member.name in seen or member.name == MANIFEST_NAME:
            raise DuplicateMemberError(f"member {member.name!r} appears twice in the bundle")
        expected = manifest.files.get(member.name)
        if expected is None:
            raise UnexpectedMemberError(f"member {member.name!r} is not listed in the bundle's manifest")
        seen.add(member.name)
        declared = int(expected["size"])
        if member.size > declared:
            raise MemberSizeError(
                f"member {member.name!r} is {member.size} bytes in the archive, larger than the {declared} bytes "
                "its manifest declares; refused before reading it"
            )
        if member.size < declared:
            raise MemberSizeError(
                f"member {member.name!r} is {member.size} bytes in the archive, the manifest declares {declared}"
            )
        total += member.size
        if total > limits.max_total_bytes:
            raise MemberSizeError(
                f"the bundle's members add up to more than {limits.max_total_bytes} bytes, the configured cap"
            )
        digest = hashlib.sha256()
        target = sink(member.name)
        try:
            for chunk in reader.read_content(member, cap=declared):
                digest.update(chunk)
                if target is not None:
                    target.write(chunk)
        finally:
            if target is not None:
                target.close()
        if digest.hexdigest() != expected["sha256"]:
            raise MemberHashError(
                f"member {member.name!r} does not match its manifest: sha256 {digest.hexdigest()}, "
                f"expected {expected['sha256']}"
            )
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise MissingMemberError(f"the bundle lacks member(s) its manifest lists: {', '.join(missing)}")
    reader.finish()


def scan_bundle(
    bundle_path: str | os.PathLike[str],
    *,
    limits: ExtractionLimits | None = None,
    progress: ProgressCallback | None = None,
) -> BundleScan:
    """Read a whole bundle once, checking it as extraction would, writing nothing.

    Returns the manifest with the length and sha256 of the whole file (what the
    release repository signs), computed in the same pass.
    """
    path = Path(bundle_path)
    with _open_bundle(path) as raw:
        total = os.fstat(raw.fileno()).st_size
        hashing = _HashingReader(raw, progress, total)
        reader = TarStreamReader(hashing, limits)  # type: ignore[arg-type]
        manifest = _read_manifest_member(reader)
        _walk_members(reader, manifest, lambda name: None)
        if progress is not None:
            progress("verify", hashing.length, total)
        return BundleScan(manifest=manifest, length=hashing.length, sha256=hashing.digest.hexdigest())


def extract_bundle(
    bundle_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    limits: ExtractionLimits | None = None,
) -> ExtractedBundle:
    """Extract a bundle into ``dest_dir`` (which must not exist, or be empty), safely.

    Every member is checked against the manifest while it streams into a
    temporary folder beside ``dest_dir``; only when all checks pass is that folder
    renamed to ``dest_dir``. On any failure nothing is left behind.

    Raises:
        UnsafeBundleError: (a subclass naming the problem) hostile or corrupt archive.
        BadInputError: ``bundle_path`` is missing or ``dest_dir`` is not empty.
    """
    with _open_bundle(Path(bundle_path)) as stream:
        return extract_bundle_stream(stream, dest_dir, limits=limits)


def extract_bundle_stream(
    stream: BinaryIO,
    dest_dir: str | os.PathLike[str],
    *,
    limits: ExtractionLimits | None = None,
) -> ExtractedBundle:
    """Like :func:`extract_bundle`, from an open binary stream."""
    dest = Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BadInputError(f"extraction folder {dest} exists and is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        reader = TarStreamReader(stream, limits)
        manifest = _read_manifest_member(reader)
        (staging / MANIFEST_NAME).write_bytes(manifest.to_json_bytes())

        def sink(name: str) -> BinaryIO:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(staging / name, flags, 0o644)
            return os.fdopen(fd, "wb")

        _walk_members(reader, manifest, sink)
        for name in manifest.files:
            with open(staging / name, "rb+") as handle:
                os.fsync(handle.fileno())
        if dest.exists():
            dest.rmdir()
        os.replace(staging, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _extracted(dest, manifest)


def _extracted(root: Path, manifest: BundleManifest) -> ExtractedBundle:
    golden = root / manifest.golden["file"] if manifest.golden else None
    labels = root / LABELS_NAME if LABELS_NAME in manifest.files else None
    report = root / REPORT_NAME if REPORT_NAME in manifest.files else None
    return ExtractedBundle(
        root=root,
        manifest=manifest,
        model_path=root / manifest.model_file,
        golden_path=golden,
        labels_path=labels,
        report_path=report,
    )
