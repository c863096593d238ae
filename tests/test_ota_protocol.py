"""Message schemas (ota/protocol.py): pure, table-tested. Every message round-trips;
every malformed, oversized, unknown-version or unsigned one is refused with one line."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgeship.ota.errors import BadInputError
from edgeship.ota.protocol import (
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    BlockData,
    BlockError,
    BlockInfo,
    BlockRequest,
    DesiredMessage,
    EventMessage,
    ProtocolError,
    ReportedMessage,
    StatusMessage,
    TelemetryMessage,
    bitmap_from_indexes,
    blocks_in,
    encode_block_reply,
    encode_message,
    indexes_from_bitmap,
    parse_block_reply,
    parse_message,
)
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.ota.topics import BLOCK_REQUEST, DESIRED, EVENTS, REPORTED, STATUS, TELEMETRY


def _histogram() -> LatencyHistogram:
    h = LatencyHistogram()
    for v in (0.4, 1.1, 9.0):
        h.observe(v)
    return h


GOOD = [
    DesiredMessage({"signed": {"device": "pi", "sequence": 3}, "signatures": [{"keyid": "ab", "sig": "cd"}]}),
    ReportedMessage("pi-01", 1.5, active={"name": "digits", "version": "1.0.0"},
                    previous={"name": "digits", "version": "0.9.0"}, update={"state": "IDLE"},
                    agent_version="0.1.0", runtime="litert"),
    ReportedMessage("pi-02", 2.0),
    StatusMessage("online", 3.0),
    StatusMessage("offline"),
    EventMessage("installed", 4.0, 7, deployment="dep-1", bundle={"name": "digits", "version": "1.0.0"},
                 state="COMMITTED", detail="ok"),
    TelemetryMessage(5.0, 60.0, 100, 2, _histogram(), bundle={"name": "digits", "version": "1.0.0"},
                     feedback={"correct": 9, "total": 10}, drift=0.1),
    BlockRequest("r1", "targets/digits-1.0.0.tar", 4096, bitmap_from_indexes([0, 3, 9])),
    BlockRequest("r2", "metadata/2.root.json", 256),
    BlockRequest("r3", "targets/a/b.tar", 1024, bitmap_from_indexes([70000, 70001], 70000), 70000),
]


@pytest.mark.parametrize("message", GOOD, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Any) -> None:
    payload = encode_message(message)
    doc = json.loads(payload)
    assert doc["v"] == PROTOCOL_VERSION and doc["type"] == message.TYPE
    assert parse_message(message.KIND, payload) == message


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    doc = {"v": 1, "type": "status", "state": "online", "new_field_from_the_future": [1, 2]}
    assert parse_message(STATUS, json.dumps(doc).encode()) == StatusMessage("online")


def _status(**over: Any) -> dict[str, Any]:
    return {"v": 1, "type": "status", "state": "online", **over}


def _event(**over: Any) -> dict[str, Any]:
    return {"v": 1, "type": "event", "event": "installed", "ts": 1.0, "seq": 1, **over}


def _telemetry(**over: Any) -> dict[str, Any]:
    return {"v": 1, "type": "telemetry", "ts": 1.0, "window_s": 10.0, "requests": 5, "errors": 0,
            "latency": LatencyHistogram().to_dict(), **over}


def _request(**over: Any) -> dict[str, Any]:
    return {"v": 1, "type": "block_request", "request_id": "r", "stream": "targets/x.tar", "block_size": 1024,
            **over}


BAD = [
    (STATUS, b"", "not UTF-8 JSON"),
    (STATUS, b"\xff\xfe", "not UTF-8 JSON"),
    (STATUS, b"[]", "JSON object"),
    (EVENTS, b"[" * 10000, "not UTF-8 JSON"),
    (STATUS, json.dumps(_status(v=2)).encode(), "schema version 2"),
    (STATUS, json.dumps(_status(v="1")).encode(), "must be an integer"),
    (STATUS, json.dumps(_status(v=True)).encode(), "boolean"),
    (STATUS, json.dumps(_status(type="event")).encode(), "expected 'status'"),
    (STATUS, json.dumps(_status(state="sleeping")).encode(), "must be one of"),
    (STATUS, json.dumps(_status(ts=float("inf"))).encode(), "finite"),
    (STATUS, b'{"v":1,"type":"status","state":"online","ts":NaN}', "finite"),
    (STATUS, json.dumps(_status(pad="x" * 2000)).encode(), "exceeds the 1024-byte limit"),
    (DESIRED, json.dumps({"v": 1, "type": "desired", "envelope": {"signed": {}, "signatures": []}}).encode(),
     "unsigned"),
    (DESIRED, json.dumps({"v": 1, "type": "desired", "envelope": {"signed": {}}}).encode(), "signatures"),
    (DESIRED, json.dumps({"v": 1, "type": "desired", "envelope": {"signed": {}, "signatures": ["x"]}}).encode(),
     "must be an object"),
    (DESIRED, json.dumps({"v": 1, "type": "desired"}).encode(), "envelope"),
    (REPORTED, json.dumps({"v": 1, "type": "reported", "ts": 1}).encode(), "'device'"),
    (REPORTED, json.dumps({"v": 1, "type": "reported", "device": "d", "ts": 1, "active": {"name": "x"}}).encode(),
     "'version'"),
    (REPORTED, json.dumps({"v": 1, "type": "reported", "device": "d" * 65, "ts": 1}).encode(), "1-64"),
    (EVENTS, json.dumps(_event(seq=-1)).encode(), "within"),
    (EVENTS, json.dumps(_event(seq=1.5)).encode(), "integer"),
    (EVENTS, json.dumps(_event(detail="x" * 5000)).encode(), "1-4096"),
    (EVENTS, json.dumps(_event(event=None)).encode(), "lacks required field 'event'"),
    (TELEMETRY, json.dumps(_telemetry(errors=6)).encode(), "6 errors in 5 requests"),
    (TELEMETRY, json.dumps(_telemetry(window_s=0)).encode(), "positive"),
    (TELEMETRY, json.dumps(_telemetry(latency={"counts": [1, 2]})).encode(), "latency histogram"),
    (TELEMETRY, json.dumps(_telemetry(latency={"counts": [-1] * 26})).encode(), "latency"),
    (TELEMETRY, json.dumps(_telemetry(feedback={"correct": 3, "total": 2})).encode(), "exceeds 'total'"),
    (BLOCK_REQUEST, json.dumps(_request(stream="../keys/root.key")).encode(), "plain segments"),
    (BLOCK_REQUEST, json.dumps(_request(stream="/etc/passwd")).encode(), "plain segments"),
    (BLOCK_REQUEST, json.dumps(_request(stream="targets/./x")).encode(), "plain segments"),
    (BLOCK_REQUEST, json.dumps(_request(stream="targets//x")).encode(), "plain segments"),
    (BLOCK_REQUEST, json.dumps(_request(stream="targets\\x")).encode(), "plain segments"),
    (BLOCK_REQUEST, json.dumps(_request(stream="targets/x\x00")).encode(), "plain segments"),
    (BLOCK_REQUEST, json.dumps(_request(block_size=1)).encode(), "within [256"),
    (BLOCK_REQUEST, json.dumps(_request(block_size=2 ** 30)).encode(), "within [256"),
    (BLOCK_REQUEST, json.dumps(_request(bitmap="xyz")).encode(), "hex"),
    (BLOCK_REQUEST, json.dumps(_request(bitmap="0a 0b")).encode(), "hex"),
    (BLOCK_REQUEST, json.dumps(_request(bitmap="abc")).encode(), "hex"),
    (BLOCK_REQUEST, json.dumps(_request(offset=-3)).encode(), "within"),
    (BLOCK_REQUEST, json.dumps(_request(bitmap="ff" * 10000)).encode(), "exceeds"),
]


@pytest.mark.parametrize("kind, payload, needle", BAD, ids=[f"{k}-{n}" for k, _, n in BAD])
def test_bad_messages_are_refused_with_one_line(kind: str, payload: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(kind, payload)
    assert needle in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, BadInputError)


def test_unknown_topic_kind_and_non_bytes_are_refused() -> None:
    with pytest.raises(ProtocolError, match="no JSON message schema"):
        parse_message("blocks/data", b"{}")
    with pytest.raises(ProtocolError, match="must be bytes"):
        parse_message(STATUS, "text")  # type: ignore[arg-type]


def test_payload_caps_are_checked_before_decoding() -> None:
    for kind, cap in MAX_PAYLOAD_BYTES.items():
        if kind == "blocks/data":
            continue
        with pytest.raises(ProtocolError, match="exceeds"):
            parse_message(kind, b" " * (cap + 1))


# -- bitmaps ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "indexes, offset, bitmap",
    [
        ([], 0, ""),
        ([0], 0, "01"),
        ([7], 0, "80"),
        ([8], 0, "0001"),
        ([0, 1, 2, 3, 4, 5, 6, 7, 8], 0, "ff01"),
        ([16, 17], 16, "03"),
        ([1000], 1000, "01"),
    ],
)
def test_bitmaps_round_trip(indexes: list, offset: int, bitmap: str) -> None:
    assert bitmap_from_indexes(indexes, offset) == bitmap
    assert indexes_from_bitmap(bitmap, offset) == indexes


def test_bitmap_refuses_indexes_below_the_offset() -> None:
    with pytest.raises(ValueError):
        bitmap_from_indexes([3], offset=4)


def test_request_wanted_uses_the_offset() -> None:
    request = BlockRequest("r", "targets/x", 256, bitmap_from_indexes([5000, 5007, 5008], 5000), 5000)
    assert request.wanted() == [5000, 5007, 5008]
    assert BlockRequest("r", "targets/x", 256).wanted() == []


@pytest.mark.parametrize("file_size, block_size, blocks", [(0, 256, 1), (1, 256, 1), (256, 256, 1),
                                                           (257, 256, 2), (1024, 256, 4)])
def test_block_counts(file_size: int, block_size: int, blocks: int) -> None:
    assert blocks_in(file_size, block_size) == blocks
    assert BlockInfo("r", "s", file_size, block_size).blocks_total == blocks


# -- block replies ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "reply",
    [
        BlockData("r1", "targets/x.tar", 0, 256, 600, b"a" * 256, "e1"),
        BlockData("r1", "targets/x.tar", 2, 256, 600, b"\n\x00" * 44),
        BlockData("r1", "targets/empty", 0, 256, 0, b""),
        BlockInfo("r2", "metadata/root.json", 1234, 512, "etag-1"),
        BlockError("r3", "targets/nope", 404, "no such stream"),
        BlockError("r4", "targets/x.tar", 429, "rate limited", 1.5),
    ],
    ids=lambda r: type(r).__name__,
)
def test_block_replies_round_trip(reply: Any) -> None:
    assert parse_block_reply(encode_block_reply(reply)) == reply


def _block(header: dict[str, Any], body: bytes) -> bytes:
    base = {"v": 1, "type": "block", "request_id": "r", "stream": "s", "index": 0, "block_size": 256,
            "file_size": 300, "length": len(body)}
    return json.dumps({**base, **header}).encode() + b"\n" + body


@pytest.mark.parametrize(
    "payload, needle",
    [
        (b"no newline at all", "no header line"),
        (b"x" * 5000 + b"\n", "no header line"),
        (b"[1]\n", "JSON object"),
        (b"\xff\n", "not UTF-8 JSON"),
        (_block({"v": 9}, b"a" * 256), "schema version 9"),
        (_block({}, b"a" * 255), "needs 256"),
        (_block({"length": 255}, b"a" * 256), "header says 255"),
        (_block({"index": 1}, b"a" * 256), "needs 44"),
        (_block({"index": 2}, b""), "past its end"),
        (_block({"index": 2 ** 40}, b""), "within"),
        (_block({"block_size": 16}, b"a" * 16), "within [256"),
        (_block({"type": "surprise"}, b""), "unknown type"),
        (json.dumps({"v": 1, "type": "block_info", "request_id": "r", "stream": "s", "file_size": 1,
                     "block_size": 256}).encode() + b"\ntrailing", "trailing"),
        (json.dumps({"v": 1, "type": "block_error", "request_id": "r", "stream": "s", "code": 9,
                     "message": "m"}).encode() + b"\n", "within [100"),
        (b" " * (MAX_PAYLOAD_BYTES["blocks/data"] + 1), "exceeds"),
    ],
)
def test_bad_block_replies_are_refused(payload: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_block_reply(payload)
    assert needle in str(info.value), str(info.value)


# -- many models per device -----------------------------------------------------------------------

def _doc(kind: str, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "type": kind, **fields}).encode()


def test_reported_models_and_per_model_telemetry_round_trip() -> None:
    from edgeship.ota.protocol import ModelTelemetry

    reported = ReportedMessage("dev-1", 1.0, {"name": "kws", "version": "2.0.0"}, agent_version="0.2.0", models={
        "digits": {"active": {"name": "digits", "version": "1.0.0"}, "serving_version": 3,
                   "update": {"state": "COMMITTED"}, "labels": {"stable": 3}},
        "kws": {"active": {"name": "kws", "version": "2.0.0"}, "previous": {"name": "kws", "version": "1.0.0"}}})
    assert parse_message(REPORTED, encode_message(reported)) == reported
    hist = LatencyHistogram()
    hist.observe(3.0)
    telemetry = TelemetryMessage(1.0, 10.0, 1, 0, hist, models=(
        ModelTelemetry("digits", "1.0.0", 3, 1, 0, hist), ModelTelemetry("kws", None, None, 0, 0, LatencyHistogram())))
    assert parse_message(TELEMETRY, encode_message(telemetry)) == telemetry


@pytest.mark.parametrize("kind,payload,needle", [
    (REPORTED, _doc("reported", device="d", ts=1, models=[]), "'models' must be an object"),
    (REPORTED, _doc("reported", device="d", ts=1, models={"": {}}), "model name must be 1-64"),
    (REPORTED, _doc("reported", device="d", ts=1, models={"m": "x"}), "reported.models.m must be an object"),
    (REPORTED, _doc("reported", device="d", ts=1, models={"m": {"serving_version": -1}}), "serving_version"),
    (REPORTED, _doc("reported", device="d", ts=1, models={f"m{i}": {} for i in range(65)}), "at most 64"),
    (TELEMETRY, _doc("telemetry", ts=1, window_s=1, requests=0, errors=0, latency={"counts": [0] * 26},
                     models=[{"name": "m", "requests": 1, "errors": 2, "latency": {"counts": [0] * 26}}]),
     "2 errors in 1 requests"),
    (TELEMETRY, _doc("telemetry", ts=1, window_s=1, requests=0, errors=0, latency={"counts": [0] * 26},
                     models=[{"requests": 1, "errors": 0, "latency": {"counts": [0] * 26}}]), "model name"),
    (EVENTS, _doc("event", event="e", ts=1, seq=1, model=7), "'model' must be a string"),
])
def test_bad_model_fields_are_refused_with_one_line(kind: str, payload: bytes, needle: str) -> None:
    with pytest.raises(BadInputError) as info:
        parse_message(kind, payload)
    assert needle in info.value.message and "\n" not in info.value.message


# -- the update's transfer record ------------------------------------------------------------------

DELTA = {"kind": "delta", "bytes": 51234, "full_bytes": 1_800_000, "base_version": "1.0.0"}


@pytest.mark.parametrize("transfer,kept", [
    (DELTA, DELTA),
    ({"kind": "compressed", "bytes": 900_000, "full_bytes": 1_800_000,
      "fallback": "delta refused: base sha256 differs"},
     {"kind": "compressed", "bytes": 900_000, "full_bytes": 1_800_000, "fallback": "delta refused: base sha256 differs"}),
    ({"kind": "full", "bytes": 0, "full_bytes": 0}, {"kind": "full", "bytes": 0, "full_bytes": 0}),
    ({"kind": "full", "bytes": 2**53 - 1, "full_bytes": 2**53 - 1},
     {"kind": "full", "bytes": 2**53 - 1, "full_bytes": 2**53 - 1}),
    ({**DELTA, "retries": 3, "fallback": ""}, DELTA),  # unknown fields and an empty fallback are not kept
])
def test_a_good_transfer_record_is_kept_top_level_and_per_model(transfer: dict[str, Any],
                                                                kept: dict[str, Any]) -> None:
    update = {"state": "COMMITTED", "bundle": {"name": "digits", "version": "1.1.0"}, "transfer": transfer}
    message = parse_message(REPORTED, _doc("reported", device="d", ts=1, update=update,
                                           models={"digits": {"update": update}}))
    assert isinstance(message, ReportedMessage)
    assert message.update is not None and message.update["transfer"] == kept
    assert message.models is not None and message.models["digits"]["update"]["transfer"] == kept
    assert message.dropped == ()
    assert parse_message(REPORTED, encode_message(message)) == message


@pytest.mark.parametrize("transfer,needle", [
    ("delta", "transfer must be an object"),
    ({"bytes": 1, "full_bytes": 2}, "lacks required field 'kind'"),
    ({"kind": "bsdiff", "bytes": 1, "full_bytes": 2}, "must be one of ['delta', 'compressed', 'full']"),
    ({"kind": "full", "full_bytes": 2}, "lacks required field 'bytes'"),
    ({"kind": "full", "bytes": 1}, "lacks required field 'full_bytes'"),
    ({"kind": "full", "bytes": -1, "full_bytes": 2}, "'bytes' must be within [0, 9007199254740991]"),
    ({"kind": "full", "bytes": 2**53, "full_bytes": 2}, "'bytes' must be within"),
    ({"kind": "full", "bytes": 1.5, "full_bytes": 2}, "'bytes' must be an integer"),
    ({"kind": "full", "bytes": True, "full_bytes": 2}, "got a boolean"),
    ({"kind": "full", "bytes": "12", "full_bytes": 2}, "'bytes' must be an integer, got str"),
    ({"kind": "delta", "bytes": 1, "full_bytes": 2}, "a delta transfer names its base_version"),
    ({"kind": "compressed", "bytes": 1, "full_bytes": 2, "base_version": "1.0.0"},
     "a compressed transfer has no base_version"),
    ({**DELTA, "base_version": "v" * 65}, "'base_version' must be 1-64 characters"),
    ({**DELTA, "fallback": "x" * 201}, "'fallback' must be 1-200 characters"),
    ({**DELTA, "fallback": "two\nlines"}, "must be one line"),
    ({**DELTA, "fallback": 7}, "'fallback' must be a string"),
])
def test_a_malformed_transfer_record_is_dropped_and_the_report_kept(transfer: Any, needle: str) -> None:
    """The update's state still reaches the controller; only the record of bytes is lost, with a
    one-line reason the controller logs."""
    update = {"state": "COMMITTED", "bundle": {"name": "digits", "version": "1.1.0"}, "transfer": transfer}
    message = parse_message(REPORTED, _doc("reported", device="d", ts=1, update=update,
                                           models={"digits": {"update": update}}))
    assert isinstance(message, ReportedMessage)
    assert message.update == {"state": "COMMITTED", "bundle": {"name": "digits", "version": "1.1.0"}}
    assert message.models is not None and "transfer" not in message.models["digits"]["update"]
    assert len(message.dropped) == 2
    assert all(needle in reason and "\n" not in reason for reason in message.dropped), message.dropped
    assert message.dropped[0].startswith("reported.update.transfer")
    assert message.dropped[1].startswith("reported.models.digits.update.transfer")


@pytest.mark.parametrize("transfer,kept", [
    (DELTA, DELTA),
    ({"kind": "bsdiff", "bytes": 1, "full_bytes": 2}, None),
    ({"kind": "delta", "bytes": 1, "full_bytes": 2}, None),
    ("delta", None),
])
def test_the_verifying_event_keeps_a_good_transfer_copy_and_drops_a_bad_one(transfer: Any,
                                                                           kept: dict[str, Any] | None) -> None:
    message = parse_message(EVENTS, _doc("event", event="update.verifying", ts=1, seq=4, state="VERIFYING",
                                         model="digits", transfer=transfer))
    assert isinstance(message, EventMessage)
    assert (message.event, message.seq, message.state) == ("update.verifying", 4, "VERIFYING")
    assert message.transfer == kept
    assert parse_message(EVENTS, encode_message(message)) == message
