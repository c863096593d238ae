"""The broker's rules against a real Mosquitto running the config `broker config` generates.

Every "cannot" is checked with a positive control beside it: the same client,
on the same connection, does the allowed thing and it arrives, so a test cannot
pass just because nothing works.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker_fixtures import BrokerUnderTest, Client, connect, start_broker
from mqtt_broker import mosquitto_binary

from edgeship.toolkit.fleet_pki import (
    certificate_pem,
    create_ca,
    issue_client_certificate,
    private_key_pem,
)

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (.ci/run installs it)")]

F = "f1"


def t(device: str, kind: str, fleet: str = F) -> str:
    return f"edgeship/{fleet}/devices/{device}/{kind}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One broker (cert and password listeners), the controller, devices a and b (certs), p (password)."""
    b = start_broker(tmp_path_factory.mktemp("broker-rules"), auth="both")
    creds = {"a": b.device("dev-a"), "b": b.device("dev-b"), "p": b.device("dev-p", auth="password"),
             "x": b.device("dev-x", fleet="f2")}
    clients: dict[str, Client] = {}
    try:
        for name, c in [("ctl", b.controller())] + list(creds.items()):
            client, outcome = b.connect_as(c)
            assert client is not None, f"{name} could not connect: {outcome}"
            clients[name] = client
        assert clients["ctl"].subscribe("edgeship/#")
        yield {"b": b, "creds": creds, "clients": clients}
    finally:
        for c in clients.values():
            c.close()
        b.stop()


def _fresh(env: dict, name: str) -> Client:
    client, outcome = env["b"].connect_as(env["creds"][name])
    assert client is not None, outcome
    return client


def test_a_reads_its_own_desired_state_but_never_b_s(env: dict) -> None:
    ctl: Client = env["clients"]["ctl"]
    a = _fresh(env, "a")
    try:
        # retained before the subscription, and live after it
        ctl.publish(t("dev-b", "desired"), b"for-b-retained", retain=True)
        for kind in ("desired", "blocks/data", "reported"):
            a.subscribe(t("dev-b", kind))
        a.subscribe("edgeship/#")  # a wildcard must not leak other devices' topics either
        a.subscribe(t("dev-a", "desired"))
        ctl.publish(t("dev-b", "desired"), b"for-b-live", retain=True)
        ctl.publish(t("dev-b", "blocks/data"), b"block-for-b")
        ctl.publish(t("dev-a", "desired"), b"for-a")  # the control: this one must arrive
        assert a.wait_for(t("dev-a", "desired")) == b"for-a"
        ctl.publish(t("dev-a", "blocks/data"), b"block-for-a")
        assert a.wait_for(t("dev-a", "blocks/data")) == b"block-for-a"
        seen = a.drain()
        leaked = [topic for topic, _ in seen if "/dev-a/" not in topic]
        assert leaked == [], f"device a received other devices' messages: {leaked}"
    finally:
        a.close()
        ctl.publish(t("dev-b", "desired"), b"", retain=True)


FORBIDDEN_FOR_A = [
    t("dev-b", "reported"), t("dev-b", "status"), t("dev-b", "events"), t("dev-b", "telemetry"),
    t("dev-b", "blocks/request"),
    t("dev-a", "desired"), t("dev-b", "desired"),  # no device may write any desired state
    t("dev-a", "blocks/data"),  # blocks come from the controller only
    t("dev-a", "reported", fleet="f2"),  # its own id in another fleet
    "edgeship/f1/devices", "$SYS/broker/uptime", "other/topic",
]


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["mqtt311", "mqtt5"])
def test_a_publishes_only_on_its_own_subtree(env: dict, protocol: int) -> None:
    ctl: Client = env["clients"]["ctl"]
    b = env["b"]
    a, outcome = connect(b.settings.port, ca=env["creds"]["a"]["ca"], cert=env["creds"]["a"]["cert"],
                         key=env["creds"]["a"]["key"], protocol=protocol)
    assert a is not None, outcome
    try:
        ctl.drain(0)
        ctl.seen.clear()
        marker = f"marker-{protocol}".encode()
        for topic in FORBIDDEN_FOR_A:
            a.publish(topic, b"evil")
        for kind in ("reported", "status", "events", "telemetry", "blocks/request"):
            a.publish(t("dev-a", kind), b"own-" + kind.encode())
        a.publish(t("dev-a", "events"), marker)
        # Mosquitto keeps one client's QoS 1 messages in order: once the marker is
        # here, every earlier publish that was allowed is here too.
        assert ctl.wait_for_payload(t("dev-a", "events"), marker), "the marker never arrived"
        got = {topic for topic, payload in ctl.drain(0.2)}
        assert not got & set(FORBIDDEN_FOR_A), f"forbidden publishes arrived: {got & set(FORBIDDEN_FOR_A)}"
        for kind in ("reported", "status", "events", "telemetry", "blocks/request"):
            assert t("dev-a", kind) in got, f"device a's own {kind} did not arrive"
    finally:
        a.close()


def test_password_device_has_the_same_rules(env: dict) -> None:
    ctl: Client = env["clients"]["ctl"]
    p = env["clients"]["p"]
    ctl.drain(0)
    ctl.seen.clear()
    p.publish(t("dev-b", "reported"), b"evil")
    p.publish(t("dev-p", "desired"), b"evil")
    p.publish(t("dev-p", "reported"), b"p-own")
    assert ctl.wait_for(t("dev-p", "reported")) == b"p-own"
    got = {topic for topic, _ in ctl.drain(0.2)}
    assert t("dev-b", "reported") not in got and t("dev-p", "desired") not in got


def test_same_device_id_is_bound_to_its_fleet(env: dict) -> None:
    ctl: Client = env["clients"]["ctl"]
    x = env["clients"]["x"]  # dev-x of fleet f2
    ctl.drain(0)
    ctl.seen.clear()
    x.publish(t("dev-x", "reported", fleet="f1"), b"wrong-fleet")
    x.publish(t("dev-x", "reported", fleet="f2"), b"right-fleet")
    assert ctl.wait_for(t("dev-x", "reported", fleet="f2")) == b"right-fleet"
    assert t("dev-x", "reported", fleet="f1") not in {topic for topic, _ in ctl.drain(0.2)}


def test_anonymous_and_strangers_are_refused(env: dict, tmp_path: Path) -> None:
    b: BrokerUnderTest = env["b"]
    ca = env["creds"]["a"]["ca"]
    # no client certificate on the certificate listener
    assert connect(b.settings.port, ca=ca)[0] is None
    # no user name on the password listener
    assert connect(b.settings.password_port, ca=ca)[0] is None
    # a wrong password, and a real user name with another's password
    assert connect(b.settings.password_port, ca=ca, username="dev-p", password="guess")[0] is None
    assert connect(b.settings.password_port, ca=ca, username="dev-a",
                   password=env["creds"]["p"]["password"].read_text().strip())[0] is None
    # plain MQTT on a TLS port
    assert connect(b.settings.port, tls=False)[0] is None
    # a certificate with a real device id, signed by another CA
    other_key, other_ca = create_ca("someone else's CA")
    key, cert = issue_client_certificate(other_key, other_ca, "dev-a")
    (tmp_path / "c.crt").write_bytes(certificate_pem(cert))
    (tmp_path / "c.key").write_bytes(private_key_pem(key))
    client, outcome = connect(b.settings.port, ca=ca, cert=tmp_path / "c.crt", key=tmp_path / "c.key")
    assert client is None, "a certificate from another CA got in"
    # and the control: the real credentials get in on the same ports
    for name in ("a", "p"):
        client, outcome = b.connect_as(env["creds"][name])
        assert client is not None, outcome
        client.close()


def test_a_client_that_does_not_trust_our_ca_does_not_connect(env: dict) -> None:
    """The server certificate is signed by the fleet CA only: the system store does not trust it."""
    b: BrokerUnderTest = env["b"]
    client, outcome = connect(b.settings.port, ca=None, cert=env["creds"]["a"]["cert"], key=env["creds"]["a"]["key"])
    assert client is None and "certificate verify failed" in outcome


def test_revoked_devices_are_refused_and_lose_their_open_connection(tmp_path: Path) -> None:
    b = start_broker(tmp_path, auth="both")
    try:
        ctl, outcome = b.connect_as(b.controller())
        assert ctl is not None, outcome
        ctl.subscribe("edgeship/#")
        cert_dev, pw_dev = b.device("dev-c"), b.device("dev-q", auth="password")
        c, outcome = b.connect_as(cert_dev)
        assert c is not None, outcome
        q, outcome = b.connect_as(pw_dev)
        assert q is not None, outcome
        c.publish(t("dev-c", "reported"), b"before")
        assert ctl.wait_for(t("dev-c", "reported")) == b"before"

        assert b.folder.revoke("dev-c").broker_reloaded == b.broker.process.pid  # type: ignore[union-attr]
        assert b.folder.revoke("dev-q").changed
        time.sleep(0.5)  # SIGHUP is asynchronous
        # the open certificate connection has no rights any more
        c.publish(t("dev-c", "reported"), b"after")
        q_closed = q.disconnected.wait(3)
        ctl.publish(t("dev-c", "desired"), b"to-revoked")
        assert c.wait_for(t("dev-c", "desired"), timeout=1) is None
        assert ctl.wait_for(t("dev-c", "reported"), timeout=1) is None
        # the open password connection was closed by the reload
        assert q_closed
        # and neither gets back in
        assert b.connect_as(cert_dev)[0] is None
        assert b.connect_as(pw_dev)[0] is None
        # revoking again changes nothing
        assert b.folder.revoke("dev-c").changed is False
        # re-issuing gives a working identity with a new certificate
        new = b.device("dev-c")
        c2, outcome = b.connect_as(new)
        assert c2 is not None, outcome
        c2.close()
        c.close()
        ctl.close()
    finally:
        b.stop()


def test_broker_restart_keeps_the_rules_and_retained_desired_state(tmp_path: Path) -> None:
    b = start_broker(tmp_path, auth="cert")
    try:
        ctl, _ = b.connect_as(b.controller())
        assert ctl is not None
        creds = b.device("dev-r")
        ctl.publish(t("dev-r", "desired"), b"keep-me", retain=True)
        ctl.close()
        b.broker.restart()
        r, outcome = b.connect_as(creds)
        assert r is not None, outcome
        r.subscribe(t("dev-r", "desired"))
        assert r.wait_for(t("dev-r", "desired")) == b"keep-me"
        r.close()
    finally:
        b.stop()


# -- Under the ACL that `broker config` writes, the controller identity can do what the controller
# does: MQTT 5 shared subscriptions to every device's events, telemetry and block requests (two
# replicas, each with its own identity from `broker replica`, share the load), and publishing
# desired states.

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
