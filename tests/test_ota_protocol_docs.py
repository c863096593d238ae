"""docs/protocol.md's JSON schemas and ota/protocol.py name the same fields: a fully populated
message of each type has exactly the fields its documented schema lists, and a minimal one has
every field the schema requires."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from edgeship.ota.protocol import (
    BlockData,
    BlockError,
    BlockInfo,
    BlockRequest,
    DesiredMessage,
    EventMessage,
    ModelTelemetry,
    ReportedMessage,
    StatusMessage,
    TelemetryMessage,
)
from edgeship.ota.telemetry import LatencyHistogram

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
BUNDLE = {"name": "digits", "version": "1.0.0"}


def _schemas() -> dict[str, dict[str, Any]]:
    """type name -> the schema object documented for it."""
    found: dict[str, dict[str, Any]] = {}
    for block in re.findall(r"```json\n(.*?)```", DOC.read_text("utf-8"), flags=re.S):
        doc = json.loads(block)
        for schema in doc.get("oneOf", [doc]):
            kind = schema.get("properties", {}).get("type", {}).get("const")
            if kind:
                found[kind] = schema
    return found


FULL: list[Any] = [
    DesiredMessage({"signed": {}, "signatures": [{"keyid": "k", "sig": "s"}]}),
    ReportedMessage("dev-1", 1.0, BUNDLE, BUNDLE, {"state": "IDLE"}, "0.1.0", "litert",
                    {"digits": {"active": BUNDLE, "serving_version": 1}}),
    StatusMessage("online", 1.0),
    EventMessage("update.verifying", 1.0, 3, "r-1", BUNDLE, "VERIFYING", "fetched", "digits",
                 {"kind": "full", "bytes": 10, "full_bytes": 10}),
    TelemetryMessage(1.0, 10.0, 5, 1, LatencyHistogram(), BUNDLE, {"correct": 1, "total": 2}, 0.1,
                     (ModelTelemetry("digits", "1.0.0", 1, 5, 1, LatencyHistogram()),)),
    BlockRequest("q-1", "targets/x.tar", 4096, "ff", 8),
    BlockInfo("q-1", "targets/x.tar", 10, 4096, "e"),
    BlockError("q-1", "targets/x.tar", 429, "slow down", 1.5),
    BlockData("q-1", "targets/x.tar", 0, 4096, 10, b"0123456789", "e"),
]
MINIMAL: list[Any] = [
    ReportedMessage("dev-1", 1.0), StatusMessage("offline"), EventMessage("hello", 1.0, 0),
    TelemetryMessage(1.0, 10.0, 0, 0, LatencyHistogram()), BlockRequest("q-1", "targets/x.tar", 4096),
    BlockInfo("q-1", "targets/x.tar", 10, 4096), BlockError("q-1", "targets/x.tar", 404, "no such file"),
    BlockData("q-1", "targets/x.tar", 0, 4096, 10, b"0123456789"),
]


def _fields(message: Any) -> dict[str, Any]:
    return message.header() if isinstance(message, BlockData) else message.to_dict()


def test_every_message_type_is_documented() -> None:
    assert set(_schemas()) == {m.TYPE for m in FULL}


@pytest.mark.parametrize("message", FULL, ids=[m.TYPE for m in FULL])
def test_documented_fields_are_the_fields_sent(message: Any) -> None:
    schema = _schemas()[message.TYPE]
    documented = set(schema.get("properties", {})) | set(schema.get("required", []))
    assert set(_fields(message)) == documented


@pytest.mark.parametrize("message", MINIMAL, ids=[m.TYPE for m in MINIMAL])
def test_required_fields_are_always_sent(message: Any) -> None:
    assert set(_schemas()[message.TYPE]["required"]) <= set(_fields(message))
