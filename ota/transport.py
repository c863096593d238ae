"""MQTT transport: the one module that imports paho-mqtt (see docs/protocol.md).

One concept over 500 lines: the wrapper that keeps paho (connection, reconnect, publish
acknowledgements, subscriptions) behind our own surface; splitting it would let paho's
types leak into a second module.

Everything above it (the agent, the controller, block transfer) sees a small
surface: :func:`parse_broker_url`, :class:`MqttConnection` (connect, publish,
subscribe, close) and :class:`ReceivedMessage`. Paho's return codes never leave
this module: failures become :class:`TransportError` (exit status 1) and bad
URLs or options :class:`~edgeship.ota.errors.BadInputError` (exit status 2).

Threading: a connection runs one network thread of its own. Message handlers
and the connect listener run on it, so they must be quick (hand slow work to a
queue) and may publish only with ``wait=False``. An exception in a handler is
logged and the message dropped; it never reaches the network thread.

Reconnect: after a lost connection the network thread reconnects with
exponential backoff and full jitter (:class:`ReconnectPolicy`), re-subscribes
every filter (so retained messages, the desired state among them, arrive
again), publishes the birth message, and calls the connect listeners.

Why one module of this size: it is the whole of what edgeship knows about paho-mqtt (the
design keeps paho behind one small module), and most of it is one class, the connection,
whose reconnect, subscription, birth/last-will and pending-publish state change together on
paho's network thread. The pure pieces beside it (broker URLs, topic filters, the reconnect
policy) are the vocabulary of that connection's options and its callers.
"""

from __future__ import annotations

__all__ = [
    "MQTT_V311",
    "MQTT_V5",
    "MQTT_AUTO",
    "ENV_USERNAME",
    "ENV_PASSWORD",
    "TransportError",
    "BrokerUrl",
    "parse_broker_url",
    "WillMessage",
    "ReconnectPolicy",
    "ReceivedMessage",
    "MessageHandler",
    "MqttConnection",
    "PendingPublish",
    "device_connection",
    "topic_matches",
    "validate_filter",
]

import logging
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from .errors import BadInputError, EdgeshipError, first_line
from .protocol import StatusMessage, encode_message
from .topics import DEFAULT_PREFIX, STATUS, device_topic

log = logging.getLogger(__name__)

MQTT_V311 = "3.1.1"
MQTT_V5 = "5"
MQTT_AUTO = "auto"
"""MQTT 5, falling back to 3.1.1 once when the broker refuses version 5 (amqtt, old brokers)."""
ENV_USERNAME = "EDGESHIP_MQTT_USERNAME"
ENV_PASSWORD = "EDGESHIP_MQTT_PASSWORD"
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_UNSUPPORTED_PROTOCOL_VERSION = 0x84


class TransportError(EdgeshipError):
    """The broker could not be reached, refused us, or did not acknowledge in time."""


# -- broker URLs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BrokerUrl:
    """A parsed ``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT`` with its credentials and TLS files."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        """The URL without credentials (safe to log)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_broker_url(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> BrokerUrl:
    """Check and split a broker URL; credentials come from the options or the environment.

    ``mqtt://HOST[:1883]`` is plain TCP, ``mqtts://HOST[:8883]`` is TLS (the
    system CAs unless ``ca_file``; ``cert_file``/``key_file`` for client
    certificates). Credentials inside the URL are refused: they would end up in
    process lists and logs. ``username``/``password`` default to
    ``EDGESHIP_MQTT_USERNAME``/``EDGESHIP_MQTT_PASSWORD``.

    Raises:
        BadInputError: anything else, with what was wrong and the accepted form.
    """
    env = os.environ if environ is None else environ
    form = "use mqtt://HOST:PORT or mqtts://HOST:PORT"
    if not isinstance(url, str) or not url.strip():
        raise BadInputError(f"broker URL is empty; {form}")
    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise BadInputError(f"broker URL {url!r} has scheme {parts.scheme or '(none)'!r}; {form}")
    if parts.username is not None or parts.password is not None:
        raise BadInputError(
            f"broker URL {scheme}://...@{parts.hostname} carries credentials; pass them with "
            f"--username/--password or {ENV_USERNAME}/{ENV_PASSWORD} instead"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BadInputError(f"broker URL {url!r} has a path, query or fragment; {form}")
    host = parts.hostname
    if not host:
        raise BadInputError(f"broker URL {url!r} has no host; {form}")
    try:
        port = parts.port if parts.port is not None else _DEFAULT_PORTS[scheme]  # ':0' is refused, not 1883
    except ValueError:
        raise BadInputError(f"broker URL {url!r} has an invalid port; {form} with PORT in 1-65535") from None
    if not 0 < port < 65536:
        raise BadInputError(f"broker URL {url!r} has port {port}; PORT must be in 1-65535")
    user = username if username is not None else env.get(ENV_USERNAME) or None
    secret = password if password is not None else env.get(ENV_PASSWORD) or None
    if secret is not None and user is None:
        raise BadInputError(f"a broker password was given without a username (set --username or {ENV_USERNAME})")
    tls_files = {"CA file": ca_file, "client certificate": cert_file, "client key": key_file}
    if scheme == "mqtt" and any(tls_files.values()):
        given = ", ".join(name for name, value in tls_files.items() if value)
        raise BadInputError(f"{given} given for a plain broker URL {url!r}; TLS options need mqtts://")
    if key_file and not cert_file:
        raise BadInputError("a client key was given without a client certificate (--cert)")
    for name, value in tls_files.items():
        if value and not Path(value).is_file():
            raise BadInputError(f"{name} {value} does not exist or is not a file")
    return BrokerUrl(scheme, host, port, user, secret, ca_file, cert_file, key_file)


# -- pure pieces -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WillMessage:
    """A message the broker publishes for us: the last will (on an unclean loss) or a birth message."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class ReconnectPolicy:
    """Exponential backoff with full jitter (seconds).

    Attempt ``n`` (1-based) waits a uniform random time in
    ``[(1 - jitter) * d, d]`` with ``d = min(max_s, initial_s * multiplier ** (n - 1))``,
    so a fleet that lost its broker at once does not come back at once.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s and self.multiplier >= 1.0 and 0.0 <= self.jitter <= 1.0):
            raise BadInputError(
                f"reconnect policy needs 0 < initial_s <= max_s, multiplier >= 1 and jitter in [0, 1]; got {self}"
            )

    def ceiling(self, attempt: int) -> float:
        """The longest wait before attempt ``attempt`` (1-based)."""
        exponent = min(max(attempt - 1, 0), 64)
        return min(self.max_s, self.initial_s * self.multiplier ** exponent)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = self.ceiling(attempt)
        draw = (rng or random).random()
        return ceiling * (1.0 - self.jitter * draw)


def validate_filter(topic_filter: str) -> tuple[str | None, str]:
    """Split ``$share/GROUP/FILTER`` into (group, filter); check wildcard placement.

    Raises:
        BadInputError: an empty filter, ``#`` not last, a wildcard inside a level,
            or a malformed shared-subscription group.
    """
    if not isinstance(topic_filter, str) or not topic_filter:
        raise BadInputError("subscription filter is empty")
    group: str | None = None
    plain = topic_filter
    if topic_filter.startswith("$share/"):
        pieces = topic_filter.split("/", 2)
        if len(pieces) < 3 or not pieces[1] or not pieces[2] or any(c in pieces[1] for c in "+#"):
            raise BadInputError(f"shared subscription {topic_filter!r} must be $share/GROUP/FILTER")
        group, plain = pieces[1], pieces[2]
    levels = plain.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise BadInputError(f"filter {topic_filter!r}: '#' must be a whole last level")
        if "+" in level and level != "+":
            raise BadInputError(f"filter {topic_filter!r}: '+' must be a whole level")
    return group, plain


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching (shared-subscription prefix ignored; ``$`` topics need a literal first level)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(f_levels):
        if level == "#":
            return True
        if index >= len(t_levels):
            return False
        if level != "+" and level != t_levels[index]:
            return False
    return len(f_levels) == len(t_levels)


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as a handler sees it (never paho's own class)."""

    topic: str
    payload: bytes = field(repr=False)
    qos: int
    retain: bool


MessageHandler = Callable[[ReceivedMessage], None]
ConnectListener = Callable[[bool], None]
"""Called on the network thread after every accepted connect; the argument says whether it is a reconnect."""


@dataclass
class _Subscription:
    topic_filter: str
    qos: int
    handler: MessageHandler


def _ignore_socket(client: paho.Client, userdata: object, sock: object) -> None:
    """The network thread's select already watches the socket; nothing to register."""


def _no_delay(client: paho.Client, userdata: object, sock: object) -> None:
    """Turn Nagle's algorithm off: block requests and acks are small and latency-bound
    (with it on, each round trip can wait for a delayed ACK, ~40 ms)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        pass


def describe_connect_failure(exc: BaseException) -> str:
    """Why a TCP/TLS connect to the broker failed, in words an operator can act on (the
    reconnect log repeats it: TLS verification, refused, DNS, or the raw error)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = getattr(exc, "verify_message", None) or first_line(exc)
        return (f"TLS verification of the broker failed (certificate verify failed: {detail}): check the CA "
                "file (ca_file / --ca) and that the broker's certificate names this host")
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or first_line(exc)
        if "ALERT" in str(reason).upper():
            return (f"the broker refused the TLS handshake ({reason}): its CA did not accept the client "
                    "certificate (cert_file / key_file), or it is revoked or missing")
        return f"TLS error ({reason})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens on that host and port"
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({first_line(exc)})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    return f"{type(exc).__name__}: {first_line(exc)}"


def _describe(code: ReasonCode | MQTTErrorCode | int | None) -> str:
    if isinstance(code, ReasonCode):
        return str(code)
    if isinstance(code, MQTTErrorCode):
        return paho.error_string(code)
    return str(code)


class PendingPublish:
    """A published message whose acknowledgement can be awaited once (QoS 0: nothing to wait for)."""

    def __init__(self, connection: MqttConnection, topic: str, mid: int | None, mark: int) -> None:
        self._connection = connection
        self.topic = topic
        self._mid = mid
        self._mark = mark
        self.acknowledged = mid is None

    def done(self) -> bool:
        """True once the broker acknowledged the message (never blocks)."""
        if not self.acknowledged and self._mid is not None:
            self.acknowledged = self._connection._poll_ack(self._mid, self._mark)
        return self.acknowledged

    def wait(self, timeout: float = 10.0) -> None:
        """Return once the broker acknowledged the message.

        Raises:
            TransportError: no acknowledgement within ``timeout``, or the broker refused it.
            RuntimeError: called on the network thread (it would deadlock).
        """
        mid = self._mid
        if self.acknowledged or mid is None:
            return
        self._connection._check_not_network_thread("publish")
        reasons = self._connection._await(mid, self._mark, timeout, f"publish to {self.topic}")
        self.acknowledged = True
        if reasons and reasons[0].is_failure:
            raise TransportError(f"broker {self._connection.broker} refused the publish to {self.topic}: {reasons[0]}")


# -- the connection ----------------------------------------------------------------------------

class MqttConnection:
    """One MQTT client session with reconnect, re-subscribe, acknowledged publishes and safe handlers.

    Args:
        broker: a BrokerUrl or a URL string for parse_broker_url.
        client_id: the MQTT client id (a device uses its device id).
        protocol: ``"auto"`` (default: MQTT 5, or 3.1.1 when the broker refuses 5), ``"5"`` or ``"3.1.1"``.
        last_will: what the broker publishes if we vanish without a clean close.
        birth: published after every accepted connect (the ``online`` status).
        keepalive: seconds between pings; a dead peer is noticed after about 1.5x this.
        clean_start: start without a stored session on the broker.
        reconnect: the backoff policy.
        on_connect: listeners called (on the network thread) after each accepted connect.
    """

    def __init__(
        self,
        broker: BrokerUrl | str,
        *,
        client_id: str,
        protocol: str = MQTT_AUTO,
        last_will: WillMessage | None = None,
        birth: WillMessage | None = None,
        keepalive: int = 30,
        clean_start: bool = True,
        reconnect: ReconnectPolicy | None = None,
        on_connect: ConnectListener | None = None,
        max_queued_messages: int = 10000,
    ) -> None:
        self.broker = parse_broker_url(broker) if isinstance(broker, str) else broker
        if protocol not in (MQTT_V311, MQTT_V5, MQTT_AUTO):
            raise BadInputError(
                f"MQTT protocol {protocol!r} is not supported; use '{MQTT_AUTO}', '{MQTT_V311}' or '{MQTT_V5}'"
            )
        if not client_id or len(client_id) > 128:
            raise BadInputError("MQTT client id must be 1-128 characters")
        if keepalive < 1:
            raise BadInputError(f"keepalive must be at least 1 second, got {keepalive}")
        self.client_id = client_id
        self._auto = protocol == MQTT_AUTO
        self.protocol = MQTT_V5 if self._auto else protocol
        """The MQTT version in use (after an automatic fall-back, "3.1.1")."""
        self._downgrade = False
        self._connack = False
        self._session_up = False
        self._connect_timeout = 5.0
        self._max_queued = max_queued_messages
        self.last_will = last_will
        self.birth = birth
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.policy = reconnect or ReconnectPolicy()
        self._listeners: list[ConnectListener] = [on_connect] if on_connect else []
        self._subscriptions: dict[str, _Subscription] = {}
        self._lock = threading.RLock()
        # Acknowledgements by message id. A waiter notes the serial before it
        # publishes and accepts only a later ack of its mid: mids wrap at 65535,
        # and paho calls on_publish holding its own locks, so we never hold
        # ours across a paho call (that would deadlock).
        self._acks = threading.Condition()
        self._acked: dict[int, tuple[int, list[ReasonCode]]] = {}
        self._ack_serial = 0
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._refusal: str | None = None
        self._last_error = "no attempt yet"
        self._ever_connected = False
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        self.connects = 0
        """Accepted connects so far (1 after the first connect, more after reconnects)."""
        self.dropped = 0
        """Messages a handler refused or failed on (logged and dropped)."""
        self._client = self._make_client(max_queued_messages)

    # -- setup --
    def _make_client(self, max_queued: int) -> paho.Client:
        v5 = self.protocol == MQTT_V5
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else self.clean_start,
            reconnect_on_failure=False,
        )
        client.max_queued_messages_set(max_queued)
        client.max_inflight_messages_set(100)
        if self.broker.username is not None:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            try:
                client.tls_set(
                    ca_certs=self.broker.ca_file, certfile=self.broker.cert_file, keyfile=self.broker.key_file,
                    cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise BadInputError(f"cannot use the TLS files for {self.broker}: {exc}") from None
        if self.last_will is not None:
            client.will_set(self.last_will.topic, self.last_will.payload, self.last_will.qos, self.last_will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_socket_open = _no_delay
        # Only our network thread may touch the socket: without a registered "want write"
        # hook, paho writes from whichever thread publishes, concurrently with the network
        # thread's reads, which an SSL socket does not survive ("connection lost" under load).
        # With the hook, a publish queues the packet and wakes the network thread's select.
        client.on_socket_register_write = _ignore_socket
        client.on_socket_unregister_write = _ignore_socket
        return client

    def add_connect_listener(self, listener: ConnectListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected (True) or ``timeout`` seconds pass (False)."""
        return self._connected.wait(timeout)

    # -- connect / close --
    def start(self, connect_timeout: float = 10.0) -> MqttConnection:
        """Start the network thread and return at once; it connects (and reconnects) with
        backoff whenever the broker is there, for as long as the connection is open.

        For a daemon that must come up before its broker: QoS 1 publishes queue until
        connected, subscriptions are made at the first connect, ``wait_connected``
        waits for it. ``connect_timeout`` bounds each TCP/TLS connect and CONNACK wait.
        """
        if self._thread is not None:
            raise RuntimeError("MqttConnection was already started")
        self._connect_timeout = max(1.0, min(connect_timeout, 10.0))
        self._prepare_connect()
        self._thread = threading.Thread(target=self._network_loop, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()
        return self

    def connect(self, timeout: float = 10.0) -> MqttConnection:
        """Connect, retrying with backoff for up to ``timeout`` seconds.

        Raises:
            TransportError: not connected within ``timeout`` (names the last error), or
                the broker refused the connection (bad credentials, not authorized).
        """
        self.start(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._connected.wait(0.05):
                return self
            if self._refusal is not None:
                refusal = self._refusal
                self._stop_thread()
                raise TransportError(f"broker {self.broker} refused the connection: {refusal}")
        self._stop_thread()
        raise TransportError(f"could not connect to broker {self.broker} within {timeout:g} s ({self._last_error})")

    def close(self, *, send_will: bool = False, timeout: float = 5.0) -> None:
        """Disconnect cleanly and stop the network thread.

        A clean disconnect makes the broker discard the last will; with
        ``send_will`` the will is still published (MQTT 5: disconnect reason 4;
        3.1.1: we publish it ourselves first), so a device that shuts down on
        purpose still reads ``offline``.
        """
        if self._thread is None:
            return
        if send_will and self.last_will is not None and self.is_connected:
            if self.protocol == MQTT_V5:
                self._closing.set()
                self._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
                self._join(timeout)
                return
            try:
                self.publish(self.last_will.topic, self.last_will.payload, qos=self.last_will.qos,
                             retain=self.last_will.retain, timeout=timeout)
            except TransportError as exc:
                log.warning("could not publish the last will before closing: %s", exc)
        self._closing.set()
        self._client.disconnect()
        self._join(timeout)

    def _prepare_connect(self) -> None:
        self._client.connect_timeout = self._connect_timeout
        if self.protocol == MQTT_V5:
            self._client.connect_async(self.broker.host, self.broker.port, self.keepalive,
                                       clean_start=self.clean_start)
        else:  # 3.1.1 takes clean_session at construction
            self._client.connect_async(self.broker.host, self.broker.port, self.keepalive)

    def _stop_thread(self) -> None:
        self._closing.set()
        self._client.disconnect()
        self._join(5.0)

    def _join(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._connected.clear()

    def __enter__(self) -> MqttConnection:
        if self._thread is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- network thread --
    def _network_loop(self) -> None:
        attempt = 0
        while not self._closing.is_set():
            if attempt:
                delay = self.policy.delay(attempt, self._rng)
                log.info("reconnecting to %s in %.2f s (attempt %d): %s", self.broker, delay, attempt,
                         self._last_error)
                if self._closing.wait(delay):
                    break
            attempt += 1
            try:
                result = self._client.reconnect()
            except Exception as exc:  # noqa: BLE001 - OSError, ssl errors, DNS: all mean try again later
                self._last_error = describe_connect_failure(exc)
                log.debug("connect to %s failed: %s", self.broker, self._last_error)
                continue
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._last_error = _describe(result)
                continue
            result = MQTTErrorCode.MQTT_ERR_SUCCESS
            close_deadline: float | None = None
            self._connack = False
            wait_for_connack = self._connect_timeout
            if self._auto and self.protocol == MQTT_V5 and not self._ever_connected:
                # probing MQTT 5: a 3.1.1-only broker may sit silent on it, so leave time to fall back
                wait_for_connack = min(max(1.0, self._connect_timeout / 3), 3.0)
            connack_deadline = time.monotonic() + wait_for_connack
            while result == MQTTErrorCode.MQTT_ERR_SUCCESS:
                try:
                    result = self._client.loop(timeout=0.2)
                except Exception as exc:  # a bug in a callback path must not end the thread (logged)
                    log.exception("MQTT network loop error: %s", exc)
                    result = MQTTErrorCode.MQTT_ERR_UNKNOWN
                if self._connected.is_set():
                    attempt = 0
                if self._closing.is_set():
                    close_deadline = close_deadline or time.monotonic() + 2.0
                    if time.monotonic() > close_deadline:
                        break
                elif not self._connack and time.monotonic() > connack_deadline:
                    # Some MQTT 3.1.1-only brokers neither answer nor close on an MQTT 5 CONNECT.
                    self._last_error = f"no CONNACK within {wait_for_connack:g} s"
                    if self._auto and self.protocol == MQTT_V5 and not self._ever_connected:
                        self._downgrade = True
                    result = MQTTErrorCode.MQTT_ERR_CONN_LOST
                    self._drop_socket()
            self._connected.clear()
            with self._lock:
                self._session_up = False
            if self._downgrade and not self._closing.is_set():
                self._downgrade = False
                log.info("broker %s does not speak MQTT 5; using MQTT 3.1.1", self.broker)
                self.protocol = MQTT_V311
                self._drop_socket()
                self._client = self._make_client(self._max_queued)
                self._prepare_connect()
                attempt = 0
                continue
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS and not self._closing.is_set():
                self._last_error = f"connection lost ({_describe(result)})"
                log.warning("MQTT connection to %s lost: %s", self.broker, _describe(result))
            attempt = max(attempt, 1)
        self._connected.clear()

    def _drop_socket(self) -> None:
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _on_connect(self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode,
                    properties: object = None) -> None:
        if reason.is_failure:
            if self._auto and self.protocol == MQTT_V5 and reason.value == _UNSUPPORTED_PROTOCOL_VERSION:
                self._downgrade = True
                return
            self._refusal = str(reason)
            self._last_error = f"refused by the broker: {reason} (check the user name, password or certificate)"
            log.warning("broker %s refused the connection (authentication or authorization): %s", self.broker,
                        reason)
            return
        self._connack = True
        reconnected = self._ever_connected
        self._ever_connected = True
        self.connects += 1
        with self._lock:  # a subscribe() racing with this either is in the snapshot or sees the session up
            subscriptions = list(self._subscriptions.values())
            listeners = list(self._listeners)
            self._session_up = True
        for sub in subscriptions:
            client.subscribe(sub.topic_filter, sub.qos)
        if self.birth is not None:
            client.publish(self.birth.topic, self.birth.payload, self.birth.qos, self.birth.retain)
        log.info("connected to %s as %s (%s)", self.broker, self.client_id, "reconnect" if reconnected else "first")
        for listener in listeners:
            try:
                listener(reconnected)
            except Exception:  # a listener's bug must not stop the others or the connection (logged)
                log.exception("connect listener %r failed", listener)
        self._connected.set()

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode,
                       properties: object = None) -> None:
        with self._lock:
            self._session_up = False
        self._connected.clear()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self.dropped += 1
            log.warning("dropped a message whose topic is not UTF-8")
            return
        received = ReceivedMessage(topic, bytes(message.payload), int(message.qos), bool(message.retain))
        with self._lock:
            handlers = [s.handler for s in self._subscriptions.values() if topic_matches(s.topic_filter, topic)]
        for handler in handlers:
            try:
                handler(received)
            except EdgeshipError as exc:
                self.dropped += 1
                log.warning("dropped message on %s (%d bytes): %s", topic, len(received.payload), exc.message)
            except Exception:  # a handler's bug drops its message, never the network thread (logged)
                self.dropped += 1
                log.exception("handler %r failed on a message on %s; message dropped", handler, topic)

    def _record_ack(self, mid: int, reasons: list[ReasonCode]) -> None:
        with self._acks:
            self._ack_serial += 1
            self._acked[mid] = (self._ack_serial, reasons)
            self._acks.notify_all()

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason: object = None,
                    properties: object = None) -> None:
        self._record_ack(mid, [reason] if isinstance(reason, ReasonCode) else [])

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reasons: list[ReasonCode],
                      properties: object = None) -> None:
        self._record_ack(mid, list(reasons))

    def _on_unsubscribe(self, client: paho.Client, userdata: object, mid: int, reasons: object = None,
                        properties: object = None) -> None:
        self._record_ack(mid, [])

    def _ack_mark(self) -> int:
        with self._acks:
            return self._ack_serial

    def _poll_ack(self, mid: int, after: int) -> bool:
        with self._acks:
            entry = self._acked.get(mid)
            if entry is not None and entry[0] > after:
                del self._acked[mid]
                return True
            return False

    def _await(self, mid: int, after: int, timeout: float, what: str) -> list[ReasonCode]:
        deadline = time.monotonic() + timeout
        with self._acks:
            while True:
                entry = self._acked.get(mid)
                if entry is not None and entry[0] > after:
                    del self._acked[mid]
                    return entry[1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(f"{what}: no acknowledgement from {self.broker} within {timeout:g} s")
                self._acks.wait(min(left, 0.2))

    def on_network_thread(self) -> bool:
        """True when called from this connection's network thread (inside a handler or listener)."""
        return self._thread is not None and threading.current_thread() is self._thread

    def _check_not_network_thread(self, what: str) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError(f"{what} cannot wait for an acknowledgement inside a message handler; pass wait=False")

    # -- publish / subscribe --
    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False, *,
                wait: bool | None = None, timeout: float = 10.0) -> PendingPublish:
        """Publish one message.

        With QoS 1/2 and ``wait`` (the default for QoS > 0 outside the network
        thread) this returns only once the broker acknowledged it; a message
        published while the connection is down is queued and sent after the
        reconnect, within ``timeout``.

        Without ``wait`` it returns at once (except before the very first connect of an
        ``auto`` connection, which must settle the MQTT version first: then it waits up to
        ``timeout`` for the connection); the returned PendingPublish can wait
        for the acknowledgement later (a sender that keeps one message of
        look-ahead gets back-pressure without stalling its pipeline).

        Raises:
            TransportError: QoS 0 while disconnected (the message is not sent), the
                outgoing queue is full, or no acknowledgement came within ``timeout``.
        """
        if qos not in (0, 1, 2):
            raise BadInputError(f"QoS must be 0, 1 or 2, got {qos}")
        if not topic or any(c in topic for c in "+#\x00"):
            raise BadInputError(f"cannot publish to topic {topic!r}: it must be non-empty and have no wildcards")
        if self._thread is None:
            raise RuntimeError("MqttConnection.publish() before connect()")
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        wait = (qos > 0 and threading.current_thread() is not self._thread) if wait is None else wait
        if wait:
            if qos == 0:
                raise BadInputError("wait=True needs QoS 1 or 2 (QoS 0 is never acknowledged)")
            self._check_not_network_thread("publish")
        if self._auto and not self._ever_connected and not self.on_network_thread():
            # Until the first connect settles the MQTT version (auto), a message queued in the
            # client would be lost if the client is rebuilt for 3.1.1: wait for the connection.
            if not self._connected.wait(timeout):
                raise TransportError(f"not connected to {self.broker} within {timeout:g} s; message to {topic} "
                                     "not sent")
        mark = self._ack_mark()
        info = self._client.publish(topic, data, qos, retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(f"outgoing queue to {self.broker} is full; message to {topic} not sent")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise TransportError(f"not connected to {self.broker}; QoS 0 message to {topic} not sent")
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {_describe(info.rc)}")
        pending = PendingPublish(self, topic, info.mid if qos > 0 else None, mark)
        if wait:
            pending.wait(timeout)
        return pending

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1, *,
                  timeout: float = 10.0) -> None:
        """Subscribe ``handler`` to ``topic_filter`` (``$share/GROUP/...`` for a shared subscription).

        The subscription is remembered and renewed after every reconnect. When
        connected, this waits for the broker's SUBACK (outside the network thread).

        Raises:
            BadInputError: a malformed filter.
            TransportError: the broker refused the subscription (ACL) or did not answer.
        """
        if qos not in (0, 1, 2):
            raise BadInputError(f"QoS must be 0, 1 or 2, got {qos}")
        validate_filter(topic_filter)
        with self._lock:
            self._subscriptions[topic_filter] = _Subscription(topic_filter, qos, handler)
            session_up = self._session_up
        if self._thread is None or not session_up:
            return  # subscribed by the next connect
        in_network_thread = threading.current_thread() is self._thread
        mark = self._ack_mark()
        result, mid = self._client.subscribe(topic_filter, qos)
        if result == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return  # renewed on reconnect
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(f"subscribe to {topic_filter} failed: {_describe(result)}")
        if in_network_thread:
            return
        reasons = self._await(mid, mark, timeout, f"subscribe to {topic_filter}")
        refused = [r for r in reasons if r.is_failure]
        if refused:
            with self._lock:
                self._subscriptions.pop(topic_filter, None)
            raise TransportError(f"broker {self.broker} refused the subscription to {topic_filter}: {refused[0]}")

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget a subscription (and tell the broker when connected)."""
        with self._lock:
            known = self._subscriptions.pop(topic_filter, None)
        if known is not None and self.is_connected:
            self._client.unsubscribe(topic_filter)


def device_connection(broker: BrokerUrl | str, *, fleet: str, device: str, prefix: str = DEFAULT_PREFIX,
                      **options: object) -> MqttConnection:
    """A device's connection: client id = device id, retained ``status`` ``online`` as its
    birth message and ``offline`` as its last will (docs/protocol.md). Not yet connected.

    ``options`` go to MqttConnection (protocol, keepalive, reconnect, on_connect...).
    """
    status = device_topic(fleet, device, STATUS, prefix)
    return MqttConnection(
        broker, client_id=device,
        last_will=WillMessage(status, encode_message(StatusMessage("offline")), qos=1, retain=True),
        birth=WillMessage(status, encode_message(StatusMessage("online")), qos=1, retain=True),
        **options,  # type: ignore[arg-type]
    )
