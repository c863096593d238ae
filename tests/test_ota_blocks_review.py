"""The block server's rate limit is per device: one device that spent its bucket does not slow
another down (issue 5: "per-device rate limit")."""

from __future__ import annotations

from pathlib import Path

import pytest
from mqtt_broker import MosquittoBroker

from edgeship.ota.protocol import BlockRequest, bitmap_from_indexes
from edgeship.ota.transport import MqttConnection
from edgeship.toolkit.blockserver import BlockServer

pytestmark = pytest.mark.mosquitto


def test_rate_limit_is_per_device(mosquitto_broker: MosquittoBroker, tmp_path: Path) -> None:
    (tmp_path / "metadata").mkdir()
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "b.tar").write_bytes(b"x" * 64 * 1024)
    now: list[float] = [100.0]
    conn = MqttConnection(mosquitto_broker.url, client_id="ctl-review").connect(5)
    try:
        server = BlockServer(conn, tmp_path, rate_bytes_per_s=1024, burst_bytes=8 * 1024, clock=lambda: now[0])
        want = bitmap_from_indexes(range(16), 0)
        first = server.serve("plant", "dev-a", BlockRequest("r1", "targets/b.tar", 1024, want, 0))
        assert first.outcome == "rate-limited" and len(first.served) == 8  # its 8 KiB burst, no more
        again = server.serve("plant", "dev-a", BlockRequest("r2", "targets/b.tar", 1024, want, 0))
        assert again.outcome == "rate-limited" and again.served == ()
        other = server.serve("plant", "dev-b", BlockRequest("r3", "targets/b.tar", 1024, want, 0))
        assert len(other.served) == 8  # a full bucket of its own
        same_id_other_fleet = server.serve("lab", "dev-a", BlockRequest("r4", "targets/b.tar", 1024, want, 0))
        assert len(same_id_other_fleet.served) == 8
        now[0] += 2.0  # 2 s at 1 KiB/s refill dev-a by two blocks
        later = server.serve("plant", "dev-a", BlockRequest("r5", "targets/b.tar", 1024, want, 0))
        assert len(later.served) == 2
    finally:
        conn.close()
