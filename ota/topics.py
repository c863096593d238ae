"""The MQTT topic tree, one subtree per device (see docs/protocol.md)::

    <prefix>/<fleet>/devices/<device-id>/desired          controller -> device, retained (signed desired state)
    <prefix>/<fleet>/devices/<device-id>/reported         device -> controller, retained
    <prefix>/<fleet>/devices/<device-id>/status           device, retained "online"/"offline" (last will)
    <prefix>/<fleet>/devices/<device-id>/events           device -> controller, QoS 1
    <prefix>/<fleet>/devices/<device-id>/telemetry        device -> controller, QoS 0/1
    <prefix>/<fleet>/devices/<device-id>/blocks/request   device -> controller (block requests)
    <prefix>/<fleet>/devices/<device-id>/blocks/data      controller -> device (blocks)

Pure: builds and parses topic names, and says who may publish and subscribe to
what (the broker ACL is generated from the same tables).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_PREFIX",
    "DESIRED",
    "REPORTED",
    "STATUS",
    "EVENTS",
    "TELEMETRY",
    "BLOCK_REQUEST",
    "BLOCK_DATA",
    "DEVICE_KINDS",
    "DEVICE_PUBLISHES",
    "DEVICE_SUBSCRIBES",
    "DeviceTopic",
    "TopicError",
    "device_topic",
    "device_wildcard",
    "parse_device_topic",
    "validate_identifier",
]

import re
from dataclasses import dataclass

from .errors import BadInputError

DEFAULT_PREFIX = "edgeship"

DESIRED = "desired"
REPORTED = "reported"
STATUS = "status"
EVENTS = "events"
TELEMETRY = "telemetry"
BLOCK_REQUEST = "blocks/request"
BLOCK_DATA = "blocks/data"

DEVICE_KINDS: tuple[str, ...] = (DESIRED, REPORTED, STATUS, EVENTS, TELEMETRY, BLOCK_REQUEST, BLOCK_DATA)
DEVICE_PUBLISHES: frozenset[str] = frozenset({REPORTED, STATUS, EVENTS, TELEMETRY, BLOCK_REQUEST})
"""What a device may publish, on its own subtree only."""
DEVICE_SUBSCRIBES: frozenset[str] = frozenset({DESIRED, BLOCK_DATA})
"""What a device may read, on its own subtree only (it also reads back its own retained reported state)."""

_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class TopicError(BadInputError):
    """A topic or an identifier in one is malformed."""


def validate_identifier(value: str, what: str = "identifier") -> str:
    """A prefix, fleet or device id: 1-64 of ``A-Z a-z 0-9 . _ -``, starting alphanumeric.

    MQTT wildcards (``+``, ``#``), ``/`` and ``$`` can therefore never appear in one.
    """
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise TopicError(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class DeviceTopic:
    prefix: str
    fleet: str
    device: str
    kind: str

    def __str__(self) -> str:
        return f"{self.prefix}/{self.fleet}/devices/{self.device}/{self.kind}"


def device_topic(fleet: str, device: str, kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The topic of ``kind`` (one of DEVICE_KINDS) for one device."""
    if kind not in DEVICE_KINDS:
        raise TopicError(f"unknown topic kind {kind!r}; expected one of {list(DEVICE_KINDS)}")
    validate_identifier(prefix, "topic prefix")
    validate_identifier(fleet, "fleet")
    validate_identifier(device, "device id")
    return str(DeviceTopic(prefix, fleet, device, kind))


def device_wildcard(kind: str, fleet: str = "+", prefix: str = DEFAULT_PREFIX) -> str:
    """A subscription filter for ``kind`` across every device (of one fleet, or of all)."""
    if kind not in DEVICE_KINDS:
        raise TopicError(f"unknown topic kind {kind!r}; expected one of {list(DEVICE_KINDS)}")
    if fleet != "+":
        validate_identifier(fleet, "fleet")
    return f"{prefix}/{fleet}/devices/+/{kind}"


def parse_device_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> DeviceTopic:
    """Split a concrete device topic; raises TopicError for anything else."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != prefix or parts[2] != "devices":
        raise TopicError(f"not a device topic under '{prefix}': {topic!r}")
    kind = "/".join(parts[4:])
    if kind not in DEVICE_KINDS:
        raise TopicError(f"unknown topic kind {kind!r} in {topic!r}")
    validate_identifier(parts[1], "fleet")
    validate_identifier(parts[3], "device id")
    return DeviceTopic(prefix, parts[1], parts[3], kind)
