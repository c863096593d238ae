"""The director's schema-2 document: every model a device must serve, built and signed (the
producing side; the agent's parser is ``edgeship.ota.director``).

Schema 2 (docs/protocol.md, "Desired state")::

    {"_type": "edgeship-desired-state", "schema": 2, "fleet", "device", "sequence", "issued",
     "expires", "models": {"<model name>": {"bundle", "version", "serving_version", "target",
                                             "length", "hashes", "deployment", "rollout", "action"}}}

It is signed exactly as schema 1: ed25519 over the OLPC canonical JSON of ``signed``, with the
director key's id. The controller publishes it to multi-model agents; ``bundle export`` writes
it into offline packages that carry several models.
"""

from __future__ import annotations

__all__ = ["DESIRED_SET_SCHEMA", "ModelEntry", "build_desired_set", "sign_document"]

import datetime as _dt
from collections.abc import Mapping
from typing import Any

from .director import (
    ACTIONS,
    DESIRED_STATE_TYPE,
    ModelEntry,
    canonical_json,
    director_key_id,
    format_utc,
)
from .errors import BadInputError

DESIRED_SET_SCHEMA = 2


def build_desired_set(*, fleet: str, device: str, sequence: int, issued: _dt.datetime, expires: _dt.datetime,
                      models: Mapping[str, ModelEntry]) -> dict[str, Any]:
    """The signed part of a schema-2 document (pure)."""
    for name, entry in models.items():
        if entry.action not in ACTIONS:
            raise BadInputError(f"model {name}: action {entry.action!r} is not one of {list(ACTIONS)}")
        if "sha256" not in entry.hashes:
            raise BadInputError(f"model {name}: a desired state needs a sha256 hash of its target")
    return {
        "_type": DESIRED_STATE_TYPE, "schema": DESIRED_SET_SCHEMA, "fleet": fleet, "device": device,
        "sequence": int(sequence), "issued": format_utc(issued), "expires": format_utc(expires),
        "models": {name: e.to_dict() for name, e in sorted(models.items())},
    }


def sign_document(signed: Mapping[str, Any], private_key: Any) -> dict[str, Any]:
    """The envelope ``{"signed", "signatures": [{"keyid", "sig"}]}`` of a prepared document: the
    same canonical JSON and ed25519 signature as ``sign_desired_state`` gives a schema-1 document."""
    body = dict(signed)
    return {"signed": body, "signatures": [{"keyid": director_key_id(private_key.public_key()),
                                            "sig": private_key.sign(canonical_json(body)).hex()}]}
