"""What updates moved over the wire, summed (pure): the rollout's record of bytes shown by
``rollout status``, the console and the benchmarks (docs/fleet.md, "Bytes on the record")."""

from __future__ import annotations

__all__ = ["summarize"]

from collections.abc import Iterable, Mapping
from typing import Any

from edgeship.ota.protocol import TRANSFER_KINDS


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum ``transfers`` rows (device_id, kind, bytes, full_bytes, fallback, reported_at).

    Bytes count every row (what travelled, each try of each device); a device is counted once,
    under the kind of its latest transfer. ``bytes_saved`` is what the full bundles would have
    cost minus what was sent: sum(full_bytes) - sum(bytes) (negative if fallbacks cost more than
    they saved). Every kind is listed, zeros included, so a reader never guesses a missing key.
    """
    by_kind = {kind: {"devices": 0, "updates": 0, "bytes": 0, "full_bytes": 0} for kind in TRANSFER_KINDS}
    latest: dict[str, tuple[float, str]] = {}
    fallbacks = 0
    for row in rows:
        entry = by_kind.setdefault(str(row["kind"]), {"devices": 0, "updates": 0, "bytes": 0, "full_bytes": 0})
        entry["updates"] += 1
        entry["bytes"] += int(row["bytes"])
        entry["full_bytes"] += int(row["full_bytes"])
        fallbacks += 1 if row.get("fallback") else 0
        at = float(row.get("reported_at") or 0.0)
        device = str(row["device_id"])
        if device not in latest or at >= latest[device][0]:
            latest[device] = (at, str(row["kind"]))
    for _, kind in latest.values():
        by_kind[kind]["devices"] += 1
    sent = sum(e["bytes"] for e in by_kind.values())
    full = sum(e["full_bytes"] for e in by_kind.values())
    return {"devices": len(latest), "bytes": sent, "full_bytes": full, "bytes_saved": full - sent,
            "fallbacks": fallbacks, "by_kind": by_kind}
