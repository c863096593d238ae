"""Building deltas between two bundles (the host side of ``edgeship.ota.delta``).

The builder finds every weight tensor of both bundles' models (a ``.tflite`` flatbuffer's buffers,
an ONNX graph's initializers), pairs them by tensor name, and writes each paired tensor of the new
model as a transform against the old one (XOR in byte planes for floats, subtraction for integers),
everything else as literal bytes compressed with the old bundle's non-tensor bytes as dictionary.
It also makes a plain binary delta (the whole new bundle compressed with the whole old one as
dictionary, zstd's "patch from") and keeps the smaller; a delta that is not smaller than the
zstd-compressed full bundle is not worth a second download path and is not made (docs/deltas.md).
"""

from __future__ import annotations

__all__ = ["BuiltCompanions", "BuiltDelta", "TensorSpan", "build_companions", "build_delta", "compress_bundle",
           "tensor_spans"]

import hashlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeship.ota.archive import TarStreamReader
from edgeship.ota.delta import DeltaHeader, Region, encode_region, write_delta
from edgeship.ota.errors import EdgeshipError, MissingExtraError

DEFAULT_LEVEL = 12
"""zstd level of tensor payloads and the literal stream: measured in docs/benchmarks.md (deltas)."""


@dataclass(frozen=True)
class TensorSpan:
    """One weight tensor's bytes inside a bundle."""

    name: str
    at: int      # offset in the bundle
    length: int
    kind: str    # xor | sub
    width: int


# (kind, element bytes) by dtype
_TFLITE_TYPES = {0: ("xor", 4), 1: ("xor", 2), 10: ("xor", 8), 2: ("sub", 4), 3: ("sub", 1), 4: ("sub", 8),
                 7: ("sub", 2), 9: ("sub", 1)}
_ONNX_TYPES = {1: ("xor", 4), 10: ("xor", 2), 11: ("xor", 8), 16: ("xor", 2), 2: ("sub", 1), 3: ("sub", 1),
               4: ("sub", 2), 5: ("sub", 2), 6: ("sub", 4), 7: ("sub", 8), 12: ("sub", 4), 13: ("sub", 8)}


def _members(bundle: bytes) -> dict[str, tuple[int, int]]:
    """Member name -> (content offset, size) of an uncompressed bundle tar."""
    reader = TarStreamReader(io.BytesIO(bundle))
    found: dict[str, tuple[int, int]] = {}
    while (member := reader.next_member()) is not None:
        found[member.name] = (reader.bytes_read, member.size)
    return found


def _tflite_spans(model: bytes, at: int) -> list[TensorSpan]:
    from edgeship.converters.tflite_flatbuffer import _schema

    schema = _schema()
    root = schema.Model.GetRootAsModel(model, 0)
    spans: dict[int, TensorSpan] = {}
    for g in range(root.SubgraphsLength()):
        graph = root.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            index = tensor.Buffer()
            if index <= 0 or index in spans or tensor.Type() not in _TFLITE_TYPES:
                continue
            buffer = root.Buffers(index)
            field = buffer._tab.Offset(4)  # Buffer.data: a [ubyte] vector inside the flatbuffer
            if not field:
                continue
            start, length = buffer._tab.Vector(field), buffer._tab.VectorLen(field)
            kind, width = _TFLITE_TYPES[tensor.Type()]
            if length and length % width == 0:
                spans[index] = TensorSpan(f"{g}/{tensor.Name().decode('utf-8', 'replace')}", at + start, length, kind,
                                          width)
    return list(spans.values())


def _onnx_spans(model: bytes, at: int) -> list[TensorSpan]:
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("deltas of ONNX bundles need onnx: pip install 'edgeship[convert]'") from None
    proto = onnx.load_model_from_string(model)
    spans = []
    cursor = 0
    for init in proto.graph.initializer:
        raw = init.raw_data
        if not raw or init.data_type not in _ONNX_TYPES:
            continue
        # Initializers are serialized in order: their raw bytes are found from the last one on.
        start = model.find(raw, cursor)
        if start < 0:
            continue
        kind, width = _ONNX_TYPES[init.data_type]
        if len(raw) % width == 0:
            spans.append(TensorSpan(init.name, at + start, len(raw), kind, width))
        cursor = start + len(raw)
    return spans


def tensor_spans(bundle: bytes) -> list[TensorSpan]:
    """The weight tensors of a bundle's model, by offset (empty when the model cannot be parsed:
    then only a plain binary delta is made)."""
    try:
        members = _members(bundle)
    except EdgeshipError:  # not a bundle tar: only a plain binary delta can be made
        return []
    for name, parse in (("model.tflite", _tflite_spans), ("model.onnx", _onnx_spans)):
        if name in members:
            at, size = members[name]
            try:
                return sorted(parse(bundle[at:at + size], at), key=lambda s: s.at)
            except MissingExtraError:
                raise
            except Exception:  # noqa: BLE001 - any parser failure (flatbuffer, protobuf) means: no tensor regions, a binary delta
                return []
    return []


@dataclass(frozen=True)
class BuiltDelta:
    data: bytes | None          # None: no delta is worth sending
    method: str                 # tensor | binary | none
    sizes: dict[str, int]       # delta (chosen), tensor, binary, full_zstd, full
    tensors: int                # tensor regions used
    seconds: float


# The largest window a binary delta asks for: zstd's default decompression limit (128 MiB), so the
# device's decompressor needs no raised limit; past it matches far back are not found (size, not safety).
_MAX_WINDOW_LOG = 27


def _zstd(level: int, dictionary: bytes | None = None, window_for: int = 0) -> Any:
    """A compressor at ``level``; with ``window_for`` (the base plus the new bundle, in bytes) its
    window covers both and long-distance matching is on, which is what ``zstd --patch-from`` does:
    at the level's own window (8 MiB at level 12) a bundle larger than it cannot reach the
    matching bytes of its base, and the binary delta is no better than compressing the file."""
    import zstandard

    zdict = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT) if dictionary else None
    if not window_for:
        return zstandard.ZstdCompressor(level=level, dict_data=zdict, write_content_size=True)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=min(_MAX_WINDOW_LOG, max(10, (window_for - 1).bit_length())), enable_ldm=True,
        write_content_size=True)
    return zstandard.ZstdCompressor(compression_params=params, dict_data=zdict)


def _tensor_delta(old: bytes, new: bytes, level: int, old_hash: str, new_hash: str) -> tuple[bytes, int]:
    old_spans = tensor_spans(old)
    new_spans = tensor_spans(new)
    pairs = pair_tensors(old_spans, new_spans)
    regions: list[Region] = []
    literal = bytearray()
    payloads: list[bytes] = []
    cursor = 0
    compressor = _zstd(level)
    for span in new_spans:
        base = pairs.get(span.at)
        if base is None or span.at < cursor:
            continue
        if span.at > cursor:
            regions.append(Region(cursor, span.at - cursor))
            literal += new[cursor:span.at]
        transformed = encode_region(span.kind, span.width, new[span.at:span.at + span.length],
                                    old[base.at:base.at + base.length])
        payload = compressor.compress(transformed)
        regions.append(Region(span.at, span.length, span.kind, span.width, base.at, len(payload)))
        payloads.append(payload)
        cursor = span.at + span.length
    if cursor < len(new):
        regions.append(Region(cursor, len(new) - cursor))
        literal += new[cursor:]
    # The literal stream's dictionary: the old bundle without its tensors (small, so a device holds it
    # in memory beside one tensor; the tensors themselves are paired above).
    dictionary: list[tuple[int, int]] = []
    start = 0
    for span in old_spans:
        if span.at > start:
            dictionary.append((start, span.at - start))
        start = span.at + span.length
    if start < len(old):
        dictionary.append((start, len(old) - start))
    dict_bytes = b"".join(old[a:a + n] for a, n in dictionary)
    literal_z = _zstd(level, dict_bytes).compress(bytes(literal)) if literal else b""
    header = DeltaHeader(old_hash, len(old), new_hash, len(new), tuple(dictionary), len(literal_z), tuple(regions))
    out = io.BytesIO()
    write_delta(out, header, literal_z, payloads)
    return out.getvalue(), len(payloads)


def pair_tensors(old_spans: list[TensorSpan], new_spans: list[TensorSpan]) -> dict[int, TensorSpan]:
    """Which old tensor each new tensor is diffed against (new tensor offset -> old span). Pure.

    By name first. A tensor whose name is not in the old model is then paired with the next unpaired
    old tensor of the same length, dtype transform and width, in file order: converters rename
    tensors between exports of the same architecture (Keras numbers a cloned or reloaded model's
    layers, ``predictions`` becoming ``predictions_1``), and the weights are still the same tensors
    in the same order. A wrong pairing costs only size, never correctness: the applier checks the
    rebuilt bundle's hash."""
    def signature(span: TensorSpan) -> tuple[int, str, int]:
        return span.length, span.kind, span.width

    by_name = {s.name: s for s in old_spans}
    pairs: dict[int, TensorSpan] = {}
    used: set[int] = set()
    for span in new_spans:
        base = by_name.get(span.name)
        if base is not None and signature(base) == signature(span) and base.at not in used:
            pairs[span.at] = base
            used.add(base.at)
    spare: dict[tuple[int, str, int], list[TensorSpan]] = {}
    for base in old_spans:
        if base.at not in used:
            spare.setdefault(signature(base), []).append(base)
    for span in new_spans:
        if span.at in pairs:
            continue
        candidates = spare.get(signature(span))
        if candidates:
            pairs[span.at] = candidates.pop(0)
    return pairs


def _binary_delta(old: bytes, new: bytes, level: int, old_hash: str, new_hash: str) -> bytes:
    literal_z = _zstd(level, old, window_for=len(old) + len(new)).compress(new)
    header = DeltaHeader(old_hash, len(old), new_hash, len(new), ((0, len(old)),), len(literal_z),
                         (Region(0, len(new)),), method="binary")
    out = io.BytesIO()
    write_delta(out, header, literal_z, [])
    return out.getvalue()


def build_delta(old: bytes, new: bytes, level: int = DEFAULT_LEVEL) -> BuiltDelta:
    """The smaller of the tensor-aware and the plain binary delta from ``old`` to ``new``, or none
    when neither is smaller than the zstd-compressed new bundle."""
    started = time.perf_counter()
    old_hash, new_hash = hashlib.sha256(old).hexdigest(), hashlib.sha256(new).hexdigest()
    tensor, used = _tensor_delta(old, new, level, old_hash, new_hash)
    binary = _binary_delta(old, new, level, old_hash, new_hash)
    full_zstd = len(_zstd(level).compress(new))
    best, method = (tensor, "tensor") if (used and len(tensor) <= len(binary)) else (binary, "binary")
    sizes = {"tensor": len(tensor), "binary": len(binary), "full_zstd": full_zstd, "full": len(new)}
    if len(best) >= full_zstd:
        return BuiltDelta(None, "none", {**sizes, "delta": full_zstd}, 0, time.perf_counter() - started)
    return BuiltDelta(best, method, {**sizes, "delta": len(best)}, used if method == "tensor" else 0,
                      time.perf_counter() - started)


def compress_bundle(source: str | os.PathLike[str], out: str | os.PathLike[str], level: int = DEFAULT_LEVEL) -> int:
    """Write ``source`` as one zstd frame (content size in its header, a checksum at its end) to
    ``out``, streaming; returns the compressed size. What a device reads with
    ``edgeship.ota.compressed``."""
    import zstandard

    size = os.path.getsize(source)
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    with open(source, "rb") as src, open(out, "wb") as dst:
        compressor.copy_stream(src, dst, size=size)
    return os.path.getsize(out)


@dataclass
class BuiltCompanions:
    """What ``build_companions`` made for one published bundle, and what it did not make and why."""

    files: list[Any] = field(default_factory=list)              # edgeship.ota.release.Companion
    sizes: dict[str, int] = field(default_factory=dict)         # file name -> bytes
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {kind, base_version?, reason}


def build_companions(published: list[Any], new: Any, folder: Path, *, bases: int, compress: bool = True,
                     level: int = DEFAULT_LEVEL) -> BuiltCompanions:
    """The compressed copy of bundle ``new`` and deltas to it from the ``bases`` latest versions of
    its name in ``published`` (``TargetInfo`` of a release repository), written into ``folder``.

    A delta no smaller than the compressed bundle is skipped (the builder's rule: the compressed
    bundle is what to send then), and so is a compressed copy no smaller than the bundle; every skip
    names its reason. A missing python-zstandard skips everything (said once per kind).
    """
    from edgeship.ota.delta import zstd_available
    from edgeship.ota.release import Companion

    result = BuiltCompanions()
    older = [t for t in published if t.name == new.name and t.path != new.path]
    older = older[-bases:] if bases > 0 else []
    if not zstd_available():
        reason = "python-zstandard is not installed (pip install 'edgeship[litert]')"
        if compress:
            result.skipped.append({"kind": "compressed", "reason": reason})
        result.skipped += [{"kind": "delta", "base_version": t.version, "reason": reason} for t in older]
        return result
    full_zstd: int | None = None
    if compress:
        out = folder / f"{new.name}-{new.version}.bundle.zst"
        full_zstd = compress_bundle(new.file, out, level)
        if full_zstd >= new.length:
            result.skipped.append({"kind": "compressed", "reason": f"{full_zstd} bytes compressed, not smaller than "
                                                                   f"the bundle's {new.length}"})
        else:
            result.files.append(Companion("compressed", out))
            result.sizes[out.name] = full_zstd
    new_bytes = Path(new.file).read_bytes() if older else b""
    for base in reversed(older):  # the newest base first: what most devices run
        try:
            built = build_delta(Path(base.file).read_bytes(), new_bytes, level)
        except (EdgeshipError, OSError) as exc:
            result.skipped.append({"kind": "delta", "base_version": base.version,
                                   "reason": f"cannot be built: {str(exc)[:160]}"})
            continue
        if built.data is None:
            result.skipped.append({"kind": "delta", "base_version": base.version,
                                   "reason": f"no smaller than the compressed bundle ({built.sizes['tensor']} "
                                             f"tensor-aware, {built.sizes['binary']} binary, "
                                             f"{built.sizes['full_zstd']} compressed)"})
            continue
        out = folder / f"{new.name}-{base.version}-{new.version}.delta"
        out.write_bytes(built.data)
        result.files.append(Companion("delta", out, base_version=base.version))
        result.sizes[out.name] = len(built.data)
    return result
