"""Under the ACL that `broker config` writes, the controller identity can do what the controller
does: MQTT 5 shared subscriptions to every device's events, telemetry and block requests (two
replicas, each with its own identity from `broker replica`, share the load), and publishing
desired states."""

from __future__ import annotations

import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker_fixtures import start_broker
from mqtt_broker import mosquitto_binary

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")]


def test_controller_identity_shares_subscriptions_under_the_acl(tmp_path: Path) -> None:
    b = start_broker(tmp_path, auth="cert")
    try:
        from broker_fixtures import creds

        b.folder.issue_controller("edgeship-controller-b", tmp_path / "replica-b")
        replicas = []
        for ctl in (b.controller(), creds(tmp_path / "replica-b")):
            client, outcome = b.connect_as(ctl, protocol=mqtt.MQTTv5)
            assert client is not None, outcome
            granted = client.subscribe("$share/edgeship-controllers/edgeship/+/devices/+/events")
            assert all(not getattr(g, "is_failure", g >= 128) for g in granted), granted
            replicas.append(client)
        dev, outcome = b.connect_as(b.device("dev-a"))
        assert dev is not None, outcome
        for i in range(20):
            dev.publish("edgeship/f1/devices/dev-a/events", f"e{i}".encode())
        time.sleep(1.0)
        per_replica = [list(r.drain()) for r in replicas]
        got = [p for messages in per_replica for _, p in messages]
        assert sorted(got) == sorted(f"e{i}".encode() for i in range(20))  # every event, each once
        assert all(per_replica), [len(m) for m in per_replica]  # and both replicas had a share
        # and the controller may publish a device's desired state, which the device reads
        dev.subscribe("edgeship/f1/devices/dev-a/desired")
        replicas[0].publish("edgeship/f1/devices/dev-a/desired", b"d", retain=True)
        assert dev.wait_for("edgeship/f1/devices/dev-a/desired") == b"d"
        for client in (*replicas, dev):
            client.close()
    finally:
        b.stop()
