"""The MQTT transport against a real Mosquitto: URLs, connect, publish/subscribe,
last will on a SIGKILLed process, retained state after reconnect, backoff,
shared subscriptions, and hostile messages that must not kill anything."""

from __future__ import annotations

import json
import logging
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import MosquittoBroker, free_port
from transport_fixtures import Collector, python_child, read_line_with, wait_until

from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.protocol import StatusMessage, encode_message, parse_message
from edgeship.ota.topics import (
    DEVICE_KINDS,
    STATUS,
    device_topic,
    device_wildcard,
    parse_device_topic,
)
from edgeship.ota.transport import (
    MQTT_V5,
    MQTT_V311,
    BrokerUrl,
    MqttConnection,
    ReceivedMessage,
    ReconnectPolicy,
    TransportError,
    WillMessage,
    parse_broker_url,
    topic_matches,
    validate_filter,
)

FAST = ReconnectPolicy(initial_s=0.1, max_s=0.5, multiplier=2.0, jitter=0.5)


# -- pure: URLs, backoff, filters -----------------------------------------------------------------

@pytest.mark.parametrize(
    "url, expected",
    [
        ("mqtt://broker.local:1884", ("mqtt", "broker.local", 1884, False)),
        ("mqtt://10.0.0.2", ("mqtt", "10.0.0.2", 1883, False)),
        ("mqtts://broker:8884", ("mqtts", "broker", 8884, True)),
        ("MQTTS://broker", ("mqtts", "broker", 8883, True)),
        ("mqtt://[::1]:1883/", ("mqtt", "::1", 1883, False)),
    ],
)
def test_broker_urls_parse(url: str, expected: tuple) -> None:
    parsed = parse_broker_url(url, environ={})
    assert (parsed.scheme, parsed.host, parsed.port, parsed.tls) == expected
    assert parsed.username is None and parsed.password is None


@pytest.mark.parametrize(
    "url, needle",
    [
        ("", "empty"),
        ("tcp://h:1883", "scheme"),
        ("http://h", "scheme"),
        ("h:1883", "scheme"),
        ("mqtt://user:pw@h:1883", "credentials"),
        ("mqtt://h:99999", "port"),
        ("mqtt://h:abc", "port"),
        ("mqtt://h:1883/topic", "path"),
        ("mqtt://h:1883?x=1", "path"),
        ("mqtt://:1883", "no host"),
    ],
)
def test_bad_broker_urls_get_one_clear_line(url: str, needle: str) -> None:
    with pytest.raises(BadInputError) as info:
        parse_broker_url(url, environ={})
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert "pw" not in str(info.value)  # never echo a password


def test_credentials_from_options_beat_the_environment(tmp_path: Path) -> None:
    env = {"EDGESHIP_MQTT_USERNAME": "env-user", "EDGESHIP_MQTT_PASSWORD": "env-secret"}
    assert parse_broker_url("mqtt://h", environ=env).username == "env-user"
    assert parse_broker_url("mqtt://h", environ=env).password == "env-secret"
    given = parse_broker_url("mqtt://h", username="u", password="p", environ=env)
    assert (given.username, given.password) == ("u", "p")
    assert "secret" not in repr(parse_broker_url("mqtt://h", environ=env))
    assert str(given) == "mqtt://h:1883"
    with pytest.raises(BadInputError, match="without a username"):
        parse_broker_url("mqtt://h", password="p", environ={})


def test_tls_options_are_checked(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert parse_broker_url("mqtts://h", ca_file=str(ca), environ={}).ca_file == str(ca)
    with pytest.raises(BadInputError, match="need mqtts"):
        parse_broker_url("mqtt://h", ca_file=str(ca), environ={})
    with pytest.raises(BadInputError, match="does not exist"):
        parse_broker_url("mqtts://h", ca_file=str(tmp_path / "nope.pem"), environ={})
    with pytest.raises(BadInputError, match="without a client certificate"):
        parse_broker_url("mqtts://h", key_file=str(ca), environ={})


@pytest.mark.parametrize(
    "attempt, ceiling",
    [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (50, 30.0), (10_000, 30.0)],
)
def test_backoff_grows_exponentially_to_a_cap_with_jitter(attempt: int, ceiling: float) -> None:
    policy = ReconnectPolicy(initial_s=0.5, max_s=30.0, multiplier=2.0, jitter=0.5)
    assert policy.ceiling(attempt) == pytest.approx(ceiling)
    rng = random.Random(7)
    draws = [policy.delay(attempt, rng) for _ in range(200)]
    assert all(ceiling * 0.5 - 1e-9 <= d <= ceiling + 1e-9 for d in draws)
    assert max(draws) - min(draws) > ceiling * 0.3  # jitter spreads a fleet out


def test_backoff_policy_refuses_nonsense() -> None:
    with pytest.raises(BadInputError):
        ReconnectPolicy(initial_s=0)
    with pytest.raises(BadInputError):
        ReconnectPolicy(initial_s=5, max_s=1)
    with pytest.raises(BadInputError):
        ReconnectPolicy(jitter=2)


@pytest.mark.parametrize(
    "topic_filter, topic, matches",
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("edgeship/+/devices/+/blocks/request", "edgeship/lab/devices/pi/blocks/request", True),
        ("edgeship/+/devices/+/blocks/request", "edgeship/lab/devices/pi/blocks/data", False),
        ("$share/ctl/edgeship/+/devices/+/events", "edgeship/lab/devices/pi/events", True),
        ("$share/ctl/edgeship/+/devices/+/events", "edgeship/lab/devices/pi/status", False),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b", "$share/g", "$share//a", "$share/g+/a", "$share/g/"])
def test_malformed_filters_are_refused(bad: str) -> None:
    with pytest.raises(BadInputError):
        validate_filter(bad)


def test_shared_filter_splits_into_group_and_filter() -> None:
    assert validate_filter("$share/ctl/edgeship/+/devices/+/events") == ("ctl", "edgeship/+/devices/+/events")
    assert validate_filter("a/+/#") == (None, "a/+/#")


# -- against Mosquitto ----------------------------------------------------------------------------

def _conn(broker: MosquittoBroker, client_id: str, **kwargs: Any) -> MqttConnection:
    kwargs.setdefault("reconnect", FAST)
    return MqttConnection(broker.url, client_id=client_id, **kwargs)


@pytest.mark.parametrize("protocol", [MQTT_V311, MQTT_V5])
def test_publish_and_subscribe_round_trip(mosquitto_broker: MosquittoBroker, protocol: str) -> None:
    received = Collector()
    with _conn(mosquitto_broker, "sub", protocol=protocol) as sub, _conn(mosquitto_broker, "pub", protocol=protocol) as pub:
        sub.subscribe("edgeship/lab/devices/+/events", received, qos=1)
        for i in range(20):
            pub.publish(f"edgeship/lab/devices/d{i % 3}/events", f"m{i}", qos=1)  # returns once PUBACKed
        pub.publish("edgeship/lab/devices/d0/telemetry", b"not for the subscriber", qos=0)
        assert received.wait_for(lambda ms: len(ms) >= 20)
        assert sorted(received.payloads()) == sorted(f"m{i}".encode() for i in range(20))
        assert {m.topic for m in received.messages} == {f"edgeship/lab/devices/d{i}/events" for i in range(3)}
        assert sub.connects == 1 and sub.dropped == 0


def test_connect_to_nothing_fails_within_the_timeout() -> None:
    port = free_port()
    connection = MqttConnection(f"mqtt://127.0.0.1:{port}", client_id="lonely", reconnect=FAST)
    started = time.monotonic()
    with pytest.raises(TransportError, match=rf"127.0.0.1:{port} within 1.5 s.*(Refused|refused)"):
        connection.connect(timeout=1.5)
    assert time.monotonic() - started < 4.0
    assert isinstance(TransportError("x"), EdgeshipError)


@pytest.mark.mosquitto
def test_wrong_password_is_refused_with_our_error(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "ctl", "right"], check=True,
                   capture_output=True)
    broker = MosquittoBroker(
        tmp_path / "m", f"listener {{port}} 127.0.0.1\nuser root\nallow_anonymous false\npassword_file {passwd}\n"
    ).start()
    try:
        bad = MqttConnection(parse_broker_url(broker.url, username="ctl", password="wrong", environ={}),
                             client_id="x", reconnect=FAST)
        with pytest.raises(TransportError, match="refused the connection"):
            bad.connect(timeout=5)
        good = MqttConnection(parse_broker_url(broker.url, username="ctl", password="right", environ={}),
                              client_id="y", reconnect=FAST)
        good.connect(timeout=5)
        good.publish("t/x", "ok", qos=1)
        good.close()
    finally:
        broker.stop()


_CHILD_DEVICE = r"""
import sys, time
from edgeship.ota.protocol import StatusMessage, encode_message
from edgeship.ota.transport import MqttConnection, WillMessage, ReconnectPolicy
url, topic = sys.argv[1], sys.argv[2]
conn = MqttConnection(url, client_id="pi-07", keepalive=5,
                      last_will=WillMessage(topic, encode_message(StatusMessage("offline"))),
                      birth=WillMessage(topic, encode_message(StatusMessage("online"))))
conn.connect(timeout=10)
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("protocol", [MQTT_V311, MQTT_V5])
def test_last_will_marks_a_killed_device_offline(mosquitto_broker: MosquittoBroker, protocol: str) -> None:
    topic = device_topic("lab", "pi-07", STATUS)
    states: list[str] = []
    seen = Collector()

    def on_status(message: ReceivedMessage) -> None:
        states.append(parse_message(STATUS, message.payload).state)  # type: ignore[union-attr]
        seen(message)

    with _conn(mosquitto_broker, "controller", protocol=protocol) as controller:
        controller.subscribe(device_wildcard(STATUS, "lab"), on_status)
        child = python_child(_CHILD_DEVICE, mosquitto_broker.url, topic)
        try:
            read_line_with(child, "ready")
            assert wait_until(lambda: states[-1:] == ["online"], 10)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            assert wait_until(lambda: states[-1:] == ["offline"], 10), states
        finally:
            if child.poll() is None:
                child.kill()
            child.communicate(timeout=5)
    # the retained status says offline to whoever asks later
    late = Collector()
    with _conn(mosquitto_broker, "late") as observer:
        observer.subscribe(topic, late)
        assert late.wait_for(lambda ms: len(ms) == 1)
        assert late.messages[0].retain and b'"offline"' in late.messages[0].payload


def test_clean_close_can_still_send_the_will(mosquitto_broker: MosquittoBroker) -> None:
    topic = device_topic("lab", "pi-08", STATUS)
    offline = encode_message(StatusMessage("offline"))
    for protocol in (MQTT_V311, MQTT_V5):
        seen = Collector()
        with _conn(mosquitto_broker, f"obs-{protocol}") as observer:
            observer.subscribe(topic, seen)
            device = _conn(mosquitto_broker, "pi-08", protocol=protocol,
                           last_will=WillMessage(topic, offline),
                           birth=WillMessage(topic, encode_message(StatusMessage("online"))))
            device.connect(5)
            assert seen.wait_for(lambda ms: any(b"online" in m.payload for m in ms))
            device.close(send_will=True)
            assert seen.wait_for(lambda ms: ms[-1].payload == offline), protocol


@pytest.mark.slow
@pytest.mark.mosquitto
def test_reconnect_with_backoff_resubscribes_and_sees_retained_state(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    broker = MosquittoBroker(
        tmp_path / "m",
        "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\npersistence true\npersistence_location {folder}/\n",
    ).start()
    desired_topic = device_topic("lab", "pi-09", "desired")
    got = Collector()
    reconnects: list[bool] = []
    try:
        with _conn(broker, "controller-1") as controller:
            controller.publish(desired_topic, b'{"seq":1}', qos=1, retain=True)
        device = _conn(broker, "pi-09", on_connect=reconnects.append)
        device.connect(5)
        device.subscribe(desired_topic, got)
        assert got.wait_for(lambda ms: len(ms) == 1) and got.messages[0].retain
        caplog.set_level(logging.INFO, logger="edgeship.ota.transport")
        broker.stop()
        assert wait_until(lambda: not device.is_connected, 5)
        time.sleep(2.0)  # several attempts fail while the broker is down
        broker.start()
        assert device.wait_connected(10)
        assert reconnects == [False, True] and device.connects == 2
        # after the reconnect the retained desired state arrives again (re-subscribed)
        assert got.wait_for(lambda ms: len(ms) == 2, 10)
        assert got.messages[1].retain and got.messages[1].payload == b'{"seq":1}'
        # new state published after the restart reaches the device too
        with _conn(broker, "controller-2") as controller:
            controller.publish(desired_topic, b'{"seq":2}', qos=1, retain=True)
        assert got.wait_for(lambda ms: ms[-1].payload == b'{"seq":2}', 10)
        device.close()
    finally:
        broker.stop()
    waits = [(int(m.group(2)), float(m.group(1))) for m in
             (re.search(r"in ([\d.]+) s \(attempt (\d+)\)", r.getMessage()) for r in caplog.records) if m]
    assert len(waits) >= 3, waits
    attempts = [a for a, _ in waits]
    assert attempts == sorted(attempts) and attempts[0] == 1
    for attempt, delay in waits:
        assert FAST.ceiling(attempt) * (1 - FAST.jitter) - 1e-6 <= delay <= FAST.ceiling(attempt) + 1e-6


def test_publish_waits_for_the_ack_or_fails_clearly(mosquitto_broker: MosquittoBroker) -> None:
    conn = _conn(mosquitto_broker, "pub")
    with pytest.raises(RuntimeError):
        conn.publish("a/b", "x", qos=1)  # before connect: misuse
    conn.connect(5)
    conn.publish("a/b", "x", qos=1)
    conn.publish("a/b", "x", qos=2)
    with pytest.raises(BadInputError):
        conn.publish("a/+", "x")
    with pytest.raises(BadInputError):
        conn.publish("a/b", "x", qos=3)
    mosquitto_broker.stop()
    assert wait_until(lambda: not conn.is_connected, 5)
    with pytest.raises(TransportError, match="not connected"):
        conn.publish("a/b", "x", qos=0)
    with pytest.raises(TransportError, match="no acknowledgement"):
        conn.publish("a/b", "queued", qos=1, timeout=0.5)
    conn.close()


def test_shared_subscription_splits_messages_between_two_controllers(mosquitto_broker: MosquittoBroker) -> None:
    a, b = Collector(), Collector()
    shared = "$share/controllers/" + device_wildcard("events", "lab")
    with _conn(mosquitto_broker, "ctl-a") as ctl_a, _conn(mosquitto_broker, "ctl-b") as ctl_b, \
            _conn(mosquitto_broker, "dev") as device:
        ctl_a.subscribe(shared, a)
        ctl_b.subscribe(shared, b)
        for i in range(200):
            device.publish(device_topic("lab", f"d{i % 10}", "events"), f"e{i}", qos=1)
        assert wait_until(lambda: len(a.messages) + len(b.messages) >= 200, 10)
        time.sleep(0.2)
        got_a, got_b = set(a.payloads()), set(b.payloads())
        assert len(a.messages) + len(b.messages) == 200  # each message delivered exactly once
        assert got_a | got_b == {f"e{i}".encode() for i in range(200)} and not got_a & got_b
        assert len(got_a) > 20 and len(got_b) > 20, (len(got_a), len(got_b))


def _schema_checking_handler(log: list[str]) -> Any:
    def handle(message: ReceivedMessage) -> None:
        kind = parse_device_topic(message.topic).kind
        if kind == "blocks/data":
            from edgeship.ota.protocol import parse_block_reply

            parse_block_reply(message.payload)
        else:
            parse_message(kind, message.payload)
        log.append(message.topic)
    return handle


_HOSTILE_PAYLOADS = [
    b"",
    b"not json",
    b"\xff\xfe\x00binary",
    b"[1,2,3]",
    b'{"v":99,"type":"status","state":"online"}',
    b'{"v":1,"type":"event"}',
    b'{"v":1}',
    b"{" * 5000,
    b'{"v":1,"type":"status","state":"online","ts":1e999}',
    b'{"v":1,"type":"desired","envelope":{"signed":{"device":"evil"},"signatures":[]}}',  # unsigned
]


@pytest.mark.mosquitto_clients
def test_hostile_messages_on_every_topic_are_logged_and_dropped(mosquitto_broker: MosquittoBroker,
                                                                tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgeship.ota.transport")
    accepted: list[str] = []
    oversized = tmp_path / "big.bin"
    oversized.write_bytes(b'{"v":1,"type":"status","state":"online","pad":"' + b"x" * 3_000_000 + b'"}')
    with _conn(mosquitto_broker, "ctl") as ctl:
        ctl.subscribe("edgeship/lab/devices/#", _schema_checking_handler(accepted))

        def buggy(message: ReceivedMessage) -> None:
            raise ZeroDivisionError("a bug in a handler")

        # filters of one connection should not overlap: a broker may deliver a message once per
        # matching subscription, and each copy goes to every matching handler
        ctl.subscribe("bugs/#", buggy)
        sent_bad = 0
        for kind in DEVICE_KINDS:
            topic = device_topic("lab", "evil", kind)
            for payload in _HOSTILE_PAYLOADS:
                source = ["-s"] if payload else ["-n"]
                subprocess.run(["mosquitto_pub", "-p", str(mosquitto_broker.port), "-h", "127.0.0.1",
                                "-t", topic, *source, "-q", "1"], input=payload, check=True, timeout=10)
                sent_bad += 1
            subprocess.run(["mosquitto_pub", "-p", str(mosquitto_broker.port), "-h", "127.0.0.1", "-t", topic,
                            "-f", str(oversized), "-q", "1"], check=True, timeout=10)
            sent_bad += 1
        for _ in range(3):
            ctl.publish("bugs/x", b"anything", qos=1)
        ctl.publish(device_topic("lab", "good", STATUS), encode_message(StatusMessage("online")), qos=1)
        ctl.publish(device_topic("lab", "good", "events"),
                    json.dumps({"v": 1, "type": "event", "event": "installed", "ts": 1.0, "seq": 1}), qos=1)
        assert wait_until(lambda: len(accepted) == 2, 10), accepted
        assert wait_until(lambda: ctl.dropped == sent_bad + 3, 10), (ctl.dropped, sent_bad)
        assert ctl.is_connected and ctl.connects == 1
        assert accepted == [device_topic("lab", "good", STATUS), device_topic("lab", "good", "events")]
    assert any("exceeds" in r.getMessage() for r in caplog.records)
    assert any("a bug in a handler" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_waiting_inside_a_handler_is_refused_not_deadlocked(mosquitto_broker: MosquittoBroker) -> None:
    errors: list[str] = []
    echoed = Collector()
    with _conn(mosquitto_broker, "echo") as conn:
        def echo(message: ReceivedMessage) -> None:
            conn.publish("out/echo", message.payload, qos=1)  # wait defaults to False on the network thread
            try:
                conn.publish("out/echo", b"never", qos=1, wait=True)
            except RuntimeError as exc:
                errors.append(str(exc))

        conn.subscribe("out/echo", echoed)
        conn.subscribe("in/x", echo)
        conn.publish("in/x", b"hello", qos=1)
        assert echoed.wait_for(lambda ms: ms and ms[0].payload == b"hello")
        assert errors and "wait=False" in errors[0]


def test_broker_url_object_is_accepted_directly(mosquitto_broker: MosquittoBroker) -> None:
    url = BrokerUrl("mqtt", "127.0.0.1", mosquitto_broker.port)
    with MqttConnection(url, client_id="direct") as conn:
        assert conn.is_connected
    with pytest.raises(BadInputError):
        MqttConnection(url, client_id="x", protocol="4")


@pytest.mark.mosquitto
def test_mqtts_with_client_certificates(tmp_path: Path) -> None:
    from transport_fixtures import make_pki

    pki = make_pki(tmp_path / "pki")
    broker = MosquittoBroker(
        tmp_path / "m",
        "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\n"
        f"cafile {pki['ca']}\ncertfile {pki['server']}\nkeyfile {pki['server_key']}\nrequire_certificate true\n",
    ).start()
    url = f"mqtts://127.0.0.1:{broker.port}"
    try:
        good = parse_broker_url(url, ca_file=pki["ca"], cert_file=pki["client"], key_file=pki["client_key"],
                                environ={})
        got = Collector()
        with MqttConnection(good, client_id="tls-dev", reconnect=FAST) as conn:
            conn.subscribe("t/#", got)
            conn.publish("t/x", b"over tls", qos=1)
            assert got.wait_for(lambda ms: ms and ms[0].payload == b"over tls")
            # publishing from this thread while the network thread reads the same TLS socket:
            # only the network thread may touch an SSL socket (this used to drop the connection)
            for i in range(2000):
                conn.publish("t/load", bytes([i % 256]) * 10_000, qos=1, wait=False)
            assert got.wait_for(lambda ms: len(ms) == 2001, 30), len(got.messages)
            assert conn.connects == 1 and conn.is_connected
        no_client_cert = parse_broker_url(url, ca_file=pki["ca"], environ={})
        with pytest.raises(TransportError, match="could not connect"):
            MqttConnection(no_client_cert, client_id="anon", reconnect=FAST).connect(timeout=2)
        wrong_ca = parse_broker_url(url, ca_file=pki["other_ca"], cert_file=pki["client"],
                                    key_file=pki["client_key"], environ={})
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            MqttConnection(wrong_ca, client_id="mitm", reconnect=FAST).connect(timeout=2)
    finally:
        broker.stop()


@pytest.mark.mosquitto
def test_a_started_connection_comes_up_when_the_broker_does(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "m")
    got = Collector()
    conn = MqttConnection(broker.url, client_id="early-agent", reconnect=FAST).start()
    try:
        conn.subscribe("t/#", got)  # registered now, made at the first connect
        assert not conn.wait_connected(0.5)
        broker.start()
        assert conn.wait_connected(10)
        conn.publish("t/x", b"late but there", qos=1)
        assert got.wait_for(lambda ms: ms and ms[0].payload == b"late but there")
        with pytest.raises(RuntimeError):
            conn.start()
    finally:
        conn.close()
        broker.stop()


def test_fetching_blocks_inside_a_handler_is_refused(mosquitto_broker: MosquittoBroker, tmp_path: Path) -> None:
    from edgeship.ota.blocks import MqttBlockFetcher

    errors: list[str] = []
    with _conn(mosquitto_broker, "dev") as conn:
        fetcher = MqttBlockFetcher(conn, fleet="lab", device="dev", work_dir=tmp_path)

        def handler(message: ReceivedMessage) -> None:
            try:
                fetcher.fetch_to_file("edgeship://targets/x.tar", tmp_path / "x")
            except RuntimeError as exc:
                errors.append(str(exc))

        conn.subscribe("go", handler)
        conn.publish("go", b"", qos=1)
        assert wait_until(lambda: bool(errors), 5) and "inside a message handler" in errors[0]
