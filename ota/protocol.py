"""Every message of the MQTT topic tree, as versioned JSON (see docs/protocol.md).

One concept over 500 lines: the schema of every message, with its shared checks, read
side by side with docs/protocol.md (tests/test_ota_protocol_docs.py compares them).

Pure: bytes in, a validated frozen dataclass out (or a ProtocolError), and back.
Nothing here touches a socket. Each payload is capped in size *before* it is
decoded, so a hostile or broken publisher can cost a reader no more than one
bounded ``json.loads``.

Versioning: every document carries ``"v"`` (the major schema version, an
integer) and ``"type"``. A reader refuses a major version it does not know and
ignores fields it does not know (new optional fields are a minor change that
does not bump ``"v"``).

Block data is the one non-JSON-only message: a compact JSON header, one newline
byte, then the raw block bytes (base64 would cost a third more on the wire and
the CPU to encode it on small devices).

Why one module of this size: it is one concept, the wire schema, mirroring docs/protocol.md
section by section, so a reader checks the one against the other in one place; each message is
small and they all share the validators at the top.
"""

from __future__ import annotations

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_PAYLOAD_BYTES",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "ProtocolError",
    "DesiredMessage",
    "ReportedMessage",
    "StatusMessage",
    "EventMessage",
    "TelemetryMessage",
    "BlockRequest",
    "BlockData",
    "BlockInfo",
    "BlockError",
    "Message",
    "parse_message",
    "encode_message",
    "parse_block_reply",
    "encode_block_reply",
    "bitmap_from_indexes",
    "indexes_from_bitmap",
    "blocks_in",
    "MAX_STREAM_BYTES",
    "MAX_BLOCKS_PER_STREAM",
    "STATUS_STATES",
    "BlockReply",
    "MAX_MODELS",
    "ModelTelemetry",
    "TRANSFER_KINDS",
    "MAX_TRANSFER_BYTES",
    "parse_transfer",
]

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import BadInputError
from .telemetry import LatencyHistogram
from .topics import BLOCK_DATA, BLOCK_REQUEST, DESIRED, EVENTS, REPORTED, STATUS, TELEMETRY

PROTOCOL_VERSION = 1
"""The major schema version this code writes and reads."""

MIN_BLOCK_SIZE = 256
MAX_BLOCK_SIZE = 1024 * 1024
"""Block sizes a request may ask for (bytes)."""
MAX_STREAM_BYTES = 8 * 1024 ** 3
"""Largest stream (file) the block protocol describes (bytes)."""

MAX_PAYLOAD_BYTES: dict[str, int] = {
    DESIRED: 64 * 1024,
    REPORTED: 64 * 1024,
    STATUS: 1024,
    EVENTS: 16 * 1024,
    TELEMETRY: 64 * 1024,
    BLOCK_REQUEST: 16 * 1024,
    BLOCK_DATA: MAX_BLOCK_SIZE + 4096,
}
"""Largest payload accepted per topic kind (bytes); larger ones are refused undecoded."""

_MAX_HEADER_BYTES = 4096
_HEX = re.compile(r"^[0-9a-fA-F]*$")
_MAX_STREAM_CHARS = 512
_MAX_BLOCKS = 1 << 20
MAX_BLOCKS_PER_STREAM = _MAX_BLOCKS
"""Highest block count a stream may have (choose a larger block size for larger files)."""


class ProtocolError(BadInputError):
    """A message that is malformed, oversized, of an unknown version, or unsigned."""


# -- small explicit validators ---------------------------------------------------------------

def _where(doc_type: str, key: str) -> str:
    return f"{doc_type} message field '{key}'"


def _get(doc: dict[str, Any], key: str, kinds: tuple[type, ...], doc_type: str, required: bool = True) -> Any:
    if key not in doc or doc[key] is None:
        if required:
            raise ProtocolError(f"{doc_type} message lacks required field '{key}'")
        return None
    value = doc[key]
    # bool is an int in Python; a schema that asks for a number never wants true/false.
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError(f"{_where(doc_type, key)} must be {_kind_names(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise ProtocolError(f"{_where(doc_type, key)} must be {_kind_names(kinds)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(f"{_where(doc_type, key)} must be a finite number")
    return value


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _text(doc: dict[str, Any], key: str, doc_type: str, required: bool = True, limit: int = 256) -> str | None:
    value = _get(doc, key, (str,), doc_type, required)
    if value is not None and (len(value) > limit or (required and not value)):
        raise ProtocolError(f"{_where(doc_type, key)} must be 1-{limit} characters")
    return value


def _count(doc: dict[str, Any], key: str, doc_type: str, required: bool = True, low: int = 0,
           high: int = 2**63 - 1) -> int | None:
    value = _get(doc, key, (int,), doc_type, required)
    if value is not None and not low <= value <= high:
        raise ProtocolError(f"{_where(doc_type, key)} must be within [{low}, {high}], got {value}")
    return value


def _number(doc: dict[str, Any], key: str, doc_type: str, required: bool = True) -> float | None:
    value = _get(doc, key, (int, float), doc_type, required)
    return None if value is None else float(value)


def _object(doc: dict[str, Any], key: str, doc_type: str, required: bool = True) -> dict[str, Any] | None:
    return _get(doc, key, (dict,), doc_type, required)


def _decode(payload: bytes, kind: str, expected_type: str) -> dict[str, Any]:
    """Cap, decode and check the envelope (``v``, ``type``) of one JSON document."""
    if not isinstance(payload, (bytes, bytearray)):
        raise ProtocolError(f"{kind} payload must be bytes, got {type(payload).__name__}")
    cap = MAX_PAYLOAD_BYTES[kind]
    if len(payload) > cap:
        raise ProtocolError(f"{kind} message of {len(payload)} bytes exceeds the {cap}-byte limit")
    try:
        doc = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{kind} message is not UTF-8 JSON ({str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{kind} message must be a JSON object, got {type(doc).__name__}")
    version = _get(doc, "v", (int,), expected_type)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{expected_type} message has schema version {version}; this edgeship reads version "
            f"{PROTOCOL_VERSION} (upgrade the older side)"
        )
    found = _get(doc, "type", (str,), expected_type)
    if found != expected_type:
        raise ProtocolError(f"message on a '{kind}' topic has type {found[:40]!r}, expected {expected_type!r}")
    return doc


def _base(doc_type: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": doc_type}


def _drop_none(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v is not None}


def _bundle_ref(value: dict[str, Any] | None, key: str, doc_type: str) -> dict[str, str] | None:
    """``{"name": ..., "version": ...}`` or None."""
    if value is None:
        return None
    where = f"{doc_type}.{key}"
    return {"name": _text(value, "name", where) or "", "version": _text(value, "version", where, limit=64) or ""}


MAX_MODELS = 64
"""Models one device may report (a reported or telemetry message names at most this many)."""


def _model_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise ProtocolError(f"{where}: a model name must be 1-64 characters")
    return name


TRANSFER_KINDS = ("delta", "compressed", "full")
"""How an update's bundle travelled: a delta from the active bundle, the zstd-compressed full bundle, the full bundle."""
MAX_TRANSFER_BYTES = 2**53 - 1
"""Largest byte count a transfer record may carry (exact in every JSON reader, a double's integer range)."""
_MAX_FALLBACK_CHARS = 200


def parse_transfer(value: Any, where: str) -> dict[str, Any]:
    """An update's ``transfer`` record, checked and reduced to its known fields. Pure.

    ``{"kind": "delta"|"compressed"|"full", "bytes": N, "full_bytes": N, "base_version": "...",
    "fallback": "..."}``: ``base_version`` is required for a delta and refused otherwise (a
    compressed or full bundle has no base), ``fallback`` (why a cheaper path was abandoned) is one
    line of at most 200 characters. Unknown fields are dropped.

    Raises:
        ProtocolError: the record is malformed (the caller drops the record, not the report).
    """
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be an object")
    kind = _text(value, "kind", where, limit=16)
    if kind not in TRANSFER_KINDS:
        raise ProtocolError(f"{_where(where, 'kind')} must be one of {list(TRANSFER_KINDS)}, got {str(kind)[:20]!r}")
    sent = _count(value, "bytes", where, high=MAX_TRANSFER_BYTES)
    full = _count(value, "full_bytes", where, high=MAX_TRANSFER_BYTES)
    base = _text(value, "base_version", where, required=False, limit=64)
    if kind == "delta" and not base:
        raise ProtocolError(f"{where}: a delta transfer names its base_version")
    if kind != "delta" and base is not None:
        raise ProtocolError(f"{where}: a {kind} transfer has no base_version")
    fallback = _text(value, "fallback", where, required=False, limit=_MAX_FALLBACK_CHARS)
    if fallback is not None and ("\n" in fallback or "\r" in fallback):
        raise ProtocolError(f"{_where(where, 'fallback')} must be one line")
    return _drop_none({"kind": kind, "bytes": sent, "full_bytes": full, "base_version": base or None,
                       "fallback": fallback or None})


def _update(value: dict[str, Any] | None, where: str, dropped: list[str]) -> dict[str, Any] | None:
    """A reported ``update`` object: ``state`` checked, ``transfer`` checked and normalized. A
    malformed ``transfer`` is removed (its reason appended to ``dropped``): the record of bytes is
    secondary to the update's state, which must still reach the controller."""
    if value is None:
        return None
    _text(value, "state", where, limit=32)
    if "transfer" not in value:
        return value
    update = dict(value)
    try:
        update["transfer"] = parse_transfer(update["transfer"], f"{where}.transfer")
    except ProtocolError as exc:
        del update["transfer"]
        dropped.append(exc.message)
    return update


def _reported_models(value: dict[str, Any] | None, doc_type: str,
                     dropped: list[str] | None = None) -> dict[str, dict[str, Any]] | None:
    """``{"<name>": {"active", "previous", "serving_version", "update", "labels"}}`` or None."""
    if value is None:
        return None
    if len(value) > MAX_MODELS:
        raise ProtocolError(f"{doc_type}.models names {len(value)} models; at most {MAX_MODELS}")
    models: dict[str, dict[str, Any]] = {}
    for name, entry in value.items():
        where = f"{doc_type}.models.{_model_name(name, f'{doc_type}.models')}"
        if not isinstance(entry, dict):
            raise ProtocolError(f"{where} must be an object")
        update = _update(_object(entry, "update", where, required=False), f"{where}.update",
                         dropped if dropped is not None else [])
        labels = _object(entry, "labels", where, required=False)
        if labels is not None:
            labels = {str(k)[:64]: _count(labels, k, f"{where}.labels") for k in list(labels)[:16]}
        models[name] = _drop_none({
            "active": _bundle_ref(_object(entry, "active", where, required=False), "active", where),
            "previous": _bundle_ref(_object(entry, "previous", where, required=False), "previous", where),
            "serving_version": _count(entry, "serving_version", where, required=False),
            "update": update, "labels": labels})
    return models


# -- messages ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DesiredMessage:
    """Controller -> device, retained: carries the director's signed envelope.

    Only the envelope's shape is checked here (a ``signed`` object and at least
    one ``{keyid, sig}`` signature); the signature itself is verified by the
    director-trust code on the device, which is the only judge of it.
    """

    envelope: dict[str, Any]
    KIND = DESIRED
    TYPE = "desired"

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DesiredMessage:
        envelope = _object(doc, "envelope", cls.TYPE)
        assert envelope is not None
        _object(envelope, "signed", "desired.envelope")
        signatures = _get(envelope, "signatures", (list,), "desired.envelope")
        if not signatures:
            raise ProtocolError("desired message is unsigned: envelope.signatures is empty")
        for index, signature in enumerate(signatures):
            if not isinstance(signature, dict):
                raise ProtocolError(f"desired.envelope.signatures[{index}] must be an object")
            _text(signature, "keyid", f"desired.envelope.signatures[{index}]")
            _text(signature, "sig", f"desired.envelope.signatures[{index}]", limit=4096)
        return cls(envelope)

    def to_dict(self) -> dict[str, Any]:
        return {**_base(self.TYPE), "envelope": self.envelope}


@dataclass(frozen=True)
class ReportedMessage:
    """Device -> controller, retained: what the device runs and where its update stands."""

    device: str
    ts: float
    active: dict[str, str] | None = None
    previous: dict[str, str] | None = None
    update: dict[str, Any] | None = None
    agent_version: str | None = None
    runtime: str | None = None
    models: dict[str, dict[str, Any]] | None = None
    """Every model the device serves (a multi-model agent; None: an agent of one model)."""
    dropped: tuple[str, ...] = ()
    """Why parts of the message were dropped while the rest was accepted (a malformed ``transfer``);
    not sent."""
    KIND = REPORTED
    TYPE = "reported"

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ReportedMessage:
        t = cls.TYPE
        dropped: list[str] = []
        update = _update(_object(doc, "update", t, required=False), "reported.update", dropped)
        models = _reported_models(_object(doc, "models", t, required=False), t, dropped)
        return cls(
            device=_text(doc, "device", t, limit=64) or "",
            ts=_number(doc, "ts", t) or 0.0,
            active=_bundle_ref(_object(doc, "active", t, required=False), "active", t),
            previous=_bundle_ref(_object(doc, "previous", t, required=False), "previous", t),
            update=update,
            agent_version=_text(doc, "agent_version", t, required=False, limit=64),
            runtime=_text(doc, "runtime", t, required=False, limit=64),
            models=models,
            dropped=tuple(dropped),
        )

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({**_base(self.TYPE), "device": self.device, "ts": self.ts, "active": self.active,
                           "previous": self.previous, "update": self.update,
                           "agent_version": self.agent_version, "runtime": self.runtime, "models": self.models})


STATUS_STATES = ("online", "offline")


@dataclass(frozen=True)
class StatusMessage:
    """Device, retained: ``online`` when connected; the last will publishes ``offline``."""

    state: str
    ts: float | None = None
    KIND = STATUS
    TYPE = "status"

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> StatusMessage:
        state = _text(doc, "state", cls.TYPE, limit=16)
        if state not in STATUS_STATES:
            raise ProtocolError(f"status message field 'state' must be one of {list(STATUS_STATES)}, got {state!r}")
        return cls(state, _number(doc, "ts", cls.TYPE, required=False))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({**_base(self.TYPE), "state": self.state, "ts": self.ts})


@dataclass(frozen=True)
class EventMessage:
    """Device -> controller, QoS 1: one update or health event, in order (``seq`` grows)."""

    event: str
    ts: float
    seq: int
    deployment: str | None = None
    bundle: dict[str, str] | None = None
    state: str | None = None
    detail: str | None = None
    model: str | None = None
    """The model name the event concerns (multi-model agents)."""
    transfer: dict[str, Any] | None = None
    """What travelled for the update (``update.verifying``); a malformed record is dropped, the event kept."""
    KIND = EVENTS
    TYPE = "event"

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> EventMessage:
        t = cls.TYPE
        return cls(
            event=_text(doc, "event", t, limit=64) or "",
            ts=_number(doc, "ts", t) or 0.0,
            seq=_count(doc, "seq", t) or 0,
            deployment=_text(doc, "deployment", t, required=False, limit=128),
            bundle=_bundle_ref(_object(doc, "bundle", t, required=False), "bundle", t),
            state=_text(doc, "state", t, required=False, limit=32),
            detail=_text(doc, "detail", t, required=False, limit=4096),
            model=_text(doc, "model", t, required=False, limit=64),
            transfer=_event_transfer(doc.get("transfer")),
        )

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({**_base(self.TYPE), "event": self.event, "ts": self.ts, "seq": self.seq,
                           "deployment": self.deployment, "bundle": self.bundle, "state": self.state,
                           "detail": self.detail, "model": self.model, "transfer": self.transfer})


def _event_transfer(value: Any) -> dict[str, Any] | None:
    """An event's copy of the transfer record, or None when absent or malformed: the event itself
    (its state, detail, sequence) matters more than its copy of a record the report also carries."""
    if value is None:
        return None
    try:
        return parse_transfer(value, "event.transfer")
    except ProtocolError:
        return None


@dataclass(frozen=True)
class ModelTelemetry:
    """One model's window within a telemetry message (``models`` list)."""

    name: str
    version: str | None
    serving_version: int | None
    requests: int
    errors: int
    latency: LatencyHistogram
    feedback: dict[str, int] | None = None
    drift: float | None = None

    @classmethod
    def from_dict(cls, doc: Any, where: str) -> ModelTelemetry:
        if not isinstance(doc, dict):
            raise ProtocolError(f"{where} must be an object")
        name = _model_name(doc.get("name"), where)
        requests, errors, latency, feedback = _window_counts(doc, where)
        return cls(name=name, version=_text(doc, "version", where, required=False, limit=64),
                   serving_version=_count(doc, "serving_version", where, required=False), requests=requests,
                   errors=errors, latency=latency, feedback=feedback, drift=_number(doc, "drift", where, required=False))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({"name": self.name, "version": self.version, "serving_version": self.serving_version,
                           "requests": self.requests, "errors": self.errors, "latency": self.latency.to_dict(),
                           "feedback": self.feedback, "drift": self.drift})


def _window_counts(doc: dict[str, Any], t: str) -> tuple[int, int, LatencyHistogram, dict[str, int] | None]:
    """requests, errors, latency and feedback of one window (a message's, or one model's)."""
    latency_doc = _object(doc, "latency", t)
    try:
        latency = LatencyHistogram.from_dict(latency_doc or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"{t} message field 'latency' is not a latency histogram ({exc})") from None
    feedback = _object(doc, "feedback", t, required=False)
    if feedback is not None:
        feedback = {"correct": _count(feedback, "correct", f"{t}.feedback") or 0,
                    "total": _count(feedback, "total", f"{t}.feedback") or 0}
        if feedback["correct"] > feedback["total"]:
            raise ProtocolError(f"{t}.feedback: 'correct' exceeds 'total'")
    requests = _count(doc, "requests", t) or 0
    errors = _count(doc, "errors", t) or 0
    if errors > requests:
        raise ProtocolError(f"{t} message counts {errors} errors in {requests} requests")
    return requests, errors, latency, feedback


@dataclass(frozen=True)
class TelemetryMessage:
    """Device -> controller, QoS 0/1: one window of serving statistics.

    ``latency`` is an ota.telemetry.LatencyHistogram (fixed buckets, mergeable);
    ``feedback`` counts labelled answers (``correct``/``total``) for A/B accuracy.
    """

    ts: float
    window_s: float
    requests: int
    errors: int
    latency: LatencyHistogram
    bundle: dict[str, str] | None = None
    feedback: dict[str, int] | None = None
    drift: float | None = None
    models: tuple[ModelTelemetry, ...] = ()
    """Each model's window (a multi-model agent); the top-level fields are the first model's."""
    KIND = TELEMETRY
    TYPE = "telemetry"

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TelemetryMessage:
        t = cls.TYPE
        requests, errors, latency, feedback = _window_counts(doc, t)
        models = _get(doc, "models", (list,), t, required=False)
        if models is not None and len(models) > MAX_MODELS:
            raise ProtocolError(f"telemetry message names {len(models)} models; at most {MAX_MODELS}")
        window = _number(doc, "window_s", t) or 0.0
        if window <= 0:
            raise ProtocolError("telemetry message field 'window_s' must be positive")
        return cls(
            ts=_number(doc, "ts", t) or 0.0, window_s=window, requests=requests, errors=errors, latency=latency,
            bundle=_bundle_ref(_object(doc, "bundle", t, required=False), "bundle", t),
            feedback=feedback, drift=_number(doc, "drift", t, required=False),
            models=tuple(ModelTelemetry.from_dict(m, f"telemetry.models[{i}]") for i, m in enumerate(models or ())),
        )

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({**_base(self.TYPE), "ts": self.ts, "window_s": self.window_s, "requests": self.requests,
                           "errors": self.errors, "latency": self.latency.to_dict(), "bundle": self.bundle,
                           "feedback": self.feedback, "drift": self.drift,
                           "models": [m.to_dict() for m in self.models] or None})


@dataclass(frozen=True)
class BlockRequest:
    """Device -> server: blocks of one stream (``metadata/<file>`` or ``targets/<path>``).

    ``bitmap`` (hex) marks the wanted block indexes relative to ``offset``: bit
    ``j % 8`` of byte ``j // 8`` asks for block ``offset + j``. Without a bitmap
    the request asks only for the stream's description (a BlockInfo: size,
    block count and etag).
    """

    request_id: str
    stream: str
    block_size: int
    bitmap: str | None = None
    offset: int = 0
    KIND = BLOCK_REQUEST
    TYPE = "block_request"

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> BlockRequest:
        t = cls.TYPE
        stream = _text(doc, "stream", t, limit=_MAX_STREAM_CHARS) or ""
        _check_stream(stream)
        bitmap = _text(doc, "bitmap", t, required=False, limit=_MAX_BLOCKS // 4)
        if bitmap is not None and (len(bitmap) % 2 or not _HEX.match(bitmap)):
            raise ProtocolError("block_request field 'bitmap' must be an even-length hex string")
        return cls(
            request_id=_text(doc, "request_id", t, limit=64) or "",
            stream=stream,
            block_size=_count(doc, "block_size", t, low=MIN_BLOCK_SIZE, high=MAX_BLOCK_SIZE) or 0,
            bitmap=bitmap,
            offset=_count(doc, "offset", t, required=False, high=_MAX_BLOCKS) or 0,
        )

    def wanted(self) -> list[int]:
        """The absolute block indexes this request asks for, ascending."""
        return indexes_from_bitmap(self.bitmap or "", self.offset)

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({**_base(self.TYPE), "request_id": self.request_id, "stream": self.stream,
                           "block_size": self.block_size, "bitmap": self.bitmap,
                           "offset": self.offset or None})


def _check_stream(stream: str) -> None:
    """A stream is a relative path of plain segments: no '..', '.', empty, absolute or NUL parts."""
    parts = stream.split("/")
    if (stream.startswith("/") or "\\" in stream or "\x00" in stream
            or any(part in ("", ".", "..") for part in parts)):
        raise ProtocolError(f"block stream {stream[:80]!r} must be a relative path of plain segments")


@dataclass(frozen=True)
class BlockInfo:
    """Server -> device: a stream's size and block count (answer to a describe request)."""

    request_id: str
    stream: str
    file_size: int
    block_size: int
    etag: str | None = None
    TYPE = "block_info"

    @property
    def blocks_total(self) -> int:
        return blocks_in(self.file_size, self.block_size)

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({**_base(self.TYPE), "request_id": self.request_id, "stream": self.stream,
                           "file_size": self.file_size, "block_size": self.block_size, "etag": self.etag})


@dataclass(frozen=True)
class BlockError:
    """Server -> device: ``code`` 404 (no such stream), 400 (bad request), 429 (rate limited)."""

    request_id: str
    stream: str
    code: int
    message: str
    retry_after_s: float | None = None
    TYPE = "block_error"

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({**_base(self.TYPE), "request_id": self.request_id, "stream": self.stream,
                           "code": self.code, "message": self.message, "retry_after_s": self.retry_after_s})


@dataclass(frozen=True)
class BlockData:
    """Server -> device: one block. On the wire: JSON header, ``\\n``, raw bytes."""

    request_id: str
    stream: str
    index: int
    block_size: int
    file_size: int
    data: bytes = field(repr=False)
    etag: str | None = None
    TYPE = "block"

    def header(self) -> dict[str, Any]:
        return _drop_none({**_base(self.TYPE), "request_id": self.request_id, "stream": self.stream,
                           "index": self.index, "block_size": self.block_size, "file_size": self.file_size,
                           "length": len(self.data), "etag": self.etag})


Message = Union[DesiredMessage, ReportedMessage, StatusMessage, EventMessage, TelemetryMessage, BlockRequest]
_BY_KIND = {cls.KIND: cls for cls in (DesiredMessage, ReportedMessage, StatusMessage, EventMessage,
                                      TelemetryMessage, BlockRequest)}


def parse_message(kind: str, payload: bytes) -> Message:
    """Validate one JSON message received on a topic of ``kind`` (ota.topics).

    Raises:
        ProtocolError: oversized, not JSON, unknown version, wrong type, or a field is wrong.
    """
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise ProtocolError(f"no JSON message schema for topic kind {kind!r}; expected one of {sorted(_BY_KIND)}")
    return cls.from_dict(_decode(payload, kind, cls.TYPE))


def encode_message(message: Message) -> bytes:
    """Compact UTF-8 JSON of a message (the inverse of parse_message)."""
    return json.dumps(message.to_dict(), separators=(",", ":"), sort_keys=True).encode("utf-8")


BlockReply = Union[BlockData, BlockInfo, BlockError]


def encode_block_reply(reply: BlockReply) -> bytes:
    """The wire form of a reply on ``blocks/data``."""
    if isinstance(reply, BlockData):
        header = json.dumps(reply.header(), separators=(",", ":")).encode("utf-8")
        return header + b"\n" + reply.data
    return json.dumps(reply.to_dict(), separators=(",", ":")).encode("utf-8") + b"\n"


def parse_block_reply(payload: bytes) -> BlockReply:
    """Validate one ``blocks/data`` payload (a block, a stream description or an error)."""
    if not isinstance(payload, (bytes, bytearray)):
        raise ProtocolError(f"blocks/data payload must be bytes, got {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD_BYTES[BLOCK_DATA]:
        raise ProtocolError(f"blocks/data message of {len(payload)} bytes exceeds the limit")
    cut = payload.find(b"\n", 0, _MAX_HEADER_BYTES)
    if cut < 0:
        raise ProtocolError("blocks/data message has no header line within its first 4096 bytes")
    header_bytes, body = bytes(payload[:cut]), bytes(payload[cut + 1:])
    try:
        doc = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"blocks/data header is not UTF-8 JSON ({str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("blocks/data header must be a JSON object")
    doc_type = _get(doc, "type", (str,), "blocks/data")
    if _get(doc, "v", (int,), "blocks/data") != PROTOCOL_VERSION:
        raise ProtocolError(f"blocks/data message has schema version {doc['v']}; expected {PROTOCOL_VERSION}")
    request_id = _text(doc, "request_id", doc_type, limit=64) or ""
    stream = _text(doc, "stream", doc_type, limit=_MAX_STREAM_CHARS) or ""
    etag = _text(doc, "etag", doc_type, required=False, limit=128)
    if doc_type == BlockData.TYPE:
        block_size = _count(doc, "block_size", doc_type, low=MIN_BLOCK_SIZE, high=MAX_BLOCK_SIZE) or 0
        file_size = _count(doc, "file_size", doc_type, high=MAX_STREAM_BYTES) or 0
        index = _count(doc, "index", doc_type, high=_MAX_BLOCKS) or 0
        length = _count(doc, "length", doc_type, high=MAX_BLOCK_SIZE)
        total = blocks_in(file_size, block_size)
        if index >= total:
            raise ProtocolError(f"block {index} of {stream!r} is past its end ({total} blocks)")
        expected = min(block_size, file_size - index * block_size)
        if length != len(body) or length != expected:
            raise ProtocolError(
                f"block {index} of {stream!r} carries {len(body)} bytes; header says {length}, "
                f"its place in the file needs {expected}"
            )
        return BlockData(request_id, stream, index, block_size, file_size, body, etag)
    if body.strip(b"\n"):
        raise ProtocolError(f"blocks/data {doc_type} message has trailing bytes")
    if doc_type == BlockInfo.TYPE:
        return BlockInfo(request_id, stream, _count(doc, "file_size", doc_type, high=MAX_STREAM_BYTES) or 0,
                         _count(doc, "block_size", doc_type, low=MIN_BLOCK_SIZE, high=MAX_BLOCK_SIZE) or 0,
                         etag)
    if doc_type == BlockError.TYPE:
        return BlockError(request_id, stream, _count(doc, "code", doc_type, low=100, high=599) or 0,
                          _text(doc, "message", doc_type, limit=1024) or "",
                          _number(doc, "retry_after_s", doc_type, required=False))
    raise ProtocolError(f"blocks/data message has unknown type {doc_type[:40]!r}")


def blocks_in(file_size: int, block_size: int) -> int:
    """How many blocks a stream of ``file_size`` bytes has (an empty stream has one, empty, block)."""
    return max(1, -(-file_size // block_size))


def bitmap_from_indexes(indexes: Iterable[int], offset: int = 0) -> str:
    """Hex bitmap with bit ``j % 8`` of byte ``j // 8`` set for each index ``offset + j``."""
    relative = [i - offset for i in indexes]
    if not relative:
        return ""
    if min(relative) < 0:
        raise ValueError(f"block index must be >= offset {offset}, got {min(relative) + offset}")
    bits = bytearray(max(relative) // 8 + 1)
    for j in relative:
        bits[j // 8] |= 1 << (j % 8)
    return bits.hex()


def indexes_from_bitmap(bitmap: str, offset: int = 0) -> list[int]:
    """The set bit positions of a hex bitmap plus ``offset``, ascending."""
    bits = bytes.fromhex(bitmap)
    return [offset + byte_i * 8 + bit for byte_i, byte in enumerate(bits) if byte
            for bit in range(8) if byte >> bit & 1]
