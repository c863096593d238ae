"""The agent's MQTT side: reports home and takes desired states.

``FleetLink`` owns one :class:`~edgeship.ota.transport.MqttConnection` (client id
= the device id) and plugs into the agent through its two seams:

- ``reporter`` (:class:`MqttReporter`): reported state retained (QoS 1), events
  at QoS 1 with a ``seq`` that keeps growing across restarts (persisted in the
  data folder), telemetry windows (QoS 0 by default); ``status`` is ``online``
  retained on every connect (birth message) and ``offline`` retained through the
  last will, or on a clean shutdown;
- ``registry`` (a :class:`~edgeship.agent.sources.SourceRegistry` with the kind
  ``mqtt`` registered): an update interrupted by a restart is rebuilt as a
  ``DirectorSource`` over the same block fetcher, whose partial files live in
  ``<data>/fleet/blocks`` and survive the restart, so the download resumes.

The device's own ``desired`` topic is subscribed after ``attach(agent)``. Each
message is parsed (``DesiredMessage``; malformed, oversized or unsigned ones are
logged and dropped by the transport), verified with the director key (a forged,
foreign, expired or replayed document never becomes an update), then decided by
the pure :func:`decide_desired` on a worker thread: duplicates and replays are
ignored, a document naming the bundle that already runs changes nothing, a newer
document naming another version aborts the update in progress and is taken once
it has ended. The agent verifies the document again when the update runs. A
schema-2 document is decided model by model (one driver per model), and a model it
no longer names is removed; a schema-1 document names one model and leaves the others.
Longer than the project's usual module: one concept, the agent's side of the fleet
protocol (reporter, desired-state worker and its decisions), each part needing the others.

Without a broker (``[broker] url = ""``) none of this exists: the agent serves
and updates from offline packages exactly as before. While the broker is down
the agent keeps serving; the connection retries with backoff, reports are kept
(the latest state, up to 1,000 events) and sent after the reconnect.

Why one module of this size: it is one concept, the device's link to the fleet; the settings,
the pure decision on a desired state, the reporter and the link that wires them to the agent
are read together when following a desired state from the broker to an update.

Settings, all in the config's ``[broker]`` table besides ``url`` (docs/fleet-link.md):
``prefix``, ``protocol``, ``keepalive_s``, ``reconnect_max_s``, ``block_size``,
``block_window``, ``block_timeout_s``, ``telemetry_qos``, ``ca_file``,
``cert_file``, ``key_file``; credentials from ``EDGESHIP_MQTT_USERNAME`` /
``EDGESHIP_MQTT_PASSWORD``.
"""

from __future__ import annotations

__all__ = [
    "SOURCE_KIND",
    "DesiredAction",
    "DesiredDecision",
    "FleetLink",
    "FleetLinkSettings",
    "MqttReporter",
    "decide_desired",
    "load_link_settings",
    "open_fleet_link",
]

import collections
import datetime as _dt
import enum
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship.ota.atomicfile import atomic_write_json
from edgeship.ota.errors import BadInputError, EdgeshipError, SecurityError
from edgeship.ota.protocol import (
    DesiredMessage,
    EventMessage,
    ProtocolError,
    StatusMessage,
    encode_message,
    parse_message,
)
from edgeship.ota.topics import (
    DEFAULT_PREFIX,
    DESIRED,
    EVENTS,
    REPORTED,
    STATUS,
    TELEMETRY,
    device_topic,
    validate_identifier,
)

from .config import AgentConfig
from .isolated import isolate_verification, verify_in_child
from .sources import BundleSource, DirectorSource, HttpFetchPlan, SourceRegistry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10 devices
    import tomli as tomllib

log = logging.getLogger("edgeship.agent.fleet")

SOURCE_KIND = "mqtt"
"""The update-source kind this module registers (kept in the update record)."""
_MAX_QUEUED_EVENTS = 1000
_MAX_CANDIDATES = 8
"""Desired states received and not verified yet, at most (the highest claimed sequences)."""


# -- settings --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FleetLinkSettings:
    """The ``[broker]`` table (``url`` comes from AgentConfig.broker_url)."""

    url: str
    prefix: str = DEFAULT_PREFIX
    protocol: str = "auto"
    keepalive_s: int = 30
    reconnect_max_s: float = 30.0
    block_size: int = 64 * 1024
    block_window: int = 64
    block_timeout_s: float = 3.0
    telemetry_qos: int = 0
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    repository_url: str | None = None
    """Fetch metadata and bundles over HTTP(S) from this copy of the release repository instead of
    MQTT blocks (desired states, reports and telemetry still use the broker); TUF verifies either."""
    repository_ca_file: str | None = None
    """CA file for an ``https://`` ``repository_url`` (default: the system CAs)."""
    username: str | None = None
    """Broker user name for password identities (default: env EDGESHIP_MQTT_USERNAME)."""
    password_file: str | None = None
    """A file whose first line is the broker password (default: env EDGESHIP_MQTT_PASSWORD)."""


_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "prefix": (str,), "protocol": (str,), "keepalive_s": (int,), "reconnect_max_s": (int, float),
    "block_size": (int,), "block_window": (int,), "block_timeout_s": (int, float), "telemetry_qos": (int,),
    "ca_file": (str,), "cert_file": (str,), "key_file": (str,), "repository_url": (str,),
    "repository_ca_file": (str,), "username": (str,), "password_file": (str,),
}


def load_link_settings(config: AgentConfig, table: Mapping[str, Any] | None = None) -> FleetLinkSettings:
    """Read the fleet-link keys of ``[broker]`` (from ``table``, or the config's own file).

    Raises:
        BadInputError: a key of the wrong type or out of range, naming the file and key.
    """
    where = f"config {config.source}" if config.source else "config"
    if table is None:
        table = {}
        if config.source is not None:
            try:
                table = tomllib.loads(Path(config.source).read_text("utf-8")).get("broker", {})
            except (OSError, ValueError) as exc:
                raise BadInputError(f"{where}: cannot read [broker] ({exc})") from None
    unknown = sorted(set(table) - set(_SETTING_TYPES) - {"url"})
    if unknown:  # a misspelt key must not silently leave a default in force
        raise BadInputError(
            f"{where}: [broker] {unknown[0]} is not a known key (known: url, {', '.join(_SETTING_TYPES)})"
        )
    values: dict[str, Any] = {}
    for key, kinds in _SETTING_TYPES.items():
        if key not in table:
            continue
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise BadInputError(f"{where}: [broker] {key} = {value!r} has the wrong type")
        values[key] = value
    settings = FleetLinkSettings(url=config.broker_url, **values)
    validate_identifier(settings.prefix, f"{where}: [broker] prefix")
    if settings.protocol not in ("auto", "5", "3.1.1"):
        raise BadInputError(f"{where}: [broker] protocol = {settings.protocol!r}: use 'auto', '5' or '3.1.1'")
    if settings.keepalive_s < 1 or settings.reconnect_max_s <= 0 or settings.block_window < 1 \
            or settings.block_timeout_s <= 0:
        raise BadInputError(f"{where}: [broker] keepalive_s, reconnect_max_s, block_window and block_timeout_s "
                            "must be positive")
    if settings.telemetry_qos not in (0, 1):
        raise BadInputError(f"{where}: [broker] telemetry_qos must be 0 or 1")
    if settings.repository_ca_file and not (settings.repository_url or "").startswith("https://"):
        raise BadInputError(f"{where}: [broker] repository_ca_file needs an https:// repository_url")
    if settings.repository_url:
        from edgeship.ota.repository_urls import (
            check_http_base_url,  # not HttpFetcher: no TUF import here
        )

        try:
            check_http_base_url(settings.repository_url)
        except BadInputError as exc:
            raise BadInputError(f"{where}: [broker] repository_url: {exc.message}") from None
    return settings


# -- the pure decision ------------------------------------------------------------------------------

class DesiredAction(str, enum.Enum):
    SUBMIT = "submit"                  # start the update
    IGNORE_REPLAY = "ignore-replay"    # lower than a sequence already accepted or taken
    IGNORE_SAME = "ignore-same"        # the document already taken (a retained redelivery)
    ALREADY_ACTIVE = "already-active"  # names what runs: nothing to install
    WAIT = "wait"                      # an update runs; take this one when it has ended
    ABORT_AND_WAIT = "abort-and-wait"  # an update of another version runs: abort it, then take this one


@dataclass(frozen=True)
class DesiredDecision:
    action: DesiredAction
    reason: str


def decide_desired(
    *,
    sequence: int,
    bundle: tuple[str, str],
    last_sequence: int,
    taken_sequence: int,
    active: tuple[str, str] | None,
    running: tuple[str, str] | None,
    in_progress: bool,
) -> DesiredDecision:
    """What to do with a verified desired state (pure; table-tested).

    Args:
        sequence: the document's sequence.
        bundle: (name, version) it names.
        last_sequence: the highest sequence the agent accepted (persisted by the agent).
        taken_sequence: the highest sequence this link handed to the agent (or skipped) since it started.
        active: what the agent serves, or None.
        running: what the update in progress installs (None when unknown or no update runs).
        in_progress: whether an update runs.
    """
    seen = max(last_sequence, taken_sequence)
    if sequence < seen:
        return DesiredDecision(DesiredAction.IGNORE_REPLAY, f"sequence {sequence} is lower than {seen} already taken")
    if sequence == seen:
        return DesiredDecision(DesiredAction.IGNORE_SAME, f"sequence {sequence} was already taken")
    if in_progress:
        if running is not None and running != bundle:
            return DesiredDecision(DesiredAction.ABORT_AND_WAIT,
                                   f"sequence {sequence} asks for {bundle[0]} {bundle[1]}, the update in progress "
                                   f"installs {running[0]} {running[1]}")
        return DesiredDecision(DesiredAction.WAIT, f"an update is in progress; sequence {sequence} waits for its end")
    if active == bundle:
        return DesiredDecision(DesiredAction.ALREADY_ACTIVE, f"{bundle[0]} {bundle[1]} already runs")
    return DesiredDecision(DesiredAction.SUBMIT, f"sequence {sequence}: {bundle[0]} {bundle[1]}")


# -- the reporter -----------------------------------------------------------------------------------

class MqttReporter:
    """``Reporter`` over MQTT. Never blocks on the broker and never raises.

    While disconnected it keeps the latest reported state and up to 1,000 events
    (oldest dropped first) and sends them after the next connect; telemetry
    windows are dropped (they are statistics, the next window follows).
    """

    def __init__(self, connection: Any, config: AgentConfig, settings: FleetLinkSettings,
                 seq_file: Path | None = None) -> None:
        self.connection = connection
        self.config = config
        self.settings = settings
        def topic(kind: str) -> str:
            return device_topic(config.fleet, config.device_id, kind, settings.prefix)

        self.reported_topic = topic(REPORTED)
        self.events_topic = topic(EVENTS)
        self.telemetry_topic = topic(TELEMETRY)
        self._lock = threading.Lock()
        self._online = False
        self._state: bytes | None = None
        self._state_sent = True
        self._events: collections.deque[bytes] = collections.deque(maxlen=_MAX_QUEUED_EVENTS)
        self._seq_file = seq_file
        self._seq = self._load_seq()
        self.published: dict[str, int] = {"state": 0, "events": 0, "telemetry": 0, "telemetry_dropped": 0}

    # -- event sequence (grows across restarts) --
    def _load_seq(self) -> int:
        if self._seq_file is None:
            return 0
        try:
            return int(json.loads(self._seq_file.read_text()).get("event_seq", 0))
        except (OSError, ValueError, AttributeError, TypeError):
            return 0

    def _next_seq(self) -> int:
        self._seq += 1
        if self._seq_file is not None:
            try:
                self._seq_file.parent.mkdir(exist_ok=True, mode=0o700)  # inside the agent's data folder
                atomic_write_json(self._seq_file, {"event_seq": self._seq})
            except OSError as exc:  # a read-only disk must not stop reporting
                log.warning("cannot save the event sequence in %s: %s", self._seq_file, exc)
        return self._seq

    # -- Reporter --
    def report_state(self, state: dict[str, Any]) -> None:
        try:
            payload = _encode(REPORTED, state)
        except EdgeshipError as exc:
            log.error("reported state not sent: %s", exc.message)
            return
        with self._lock:
            self._state, self._state_sent = payload, False
            if self._can_send():
                self._send_state()

    def report_event(self, event: dict[str, Any]) -> None:
        try:
            with self._lock:
                payload = _encode(EVENTS, {**event, "seq": self._next_seq()})
                self._events.append(payload)
                if self._can_send():
                    self._flush_events()
        except EdgeshipError as exc:
            log.error("event not sent: %s", exc.message)

    def report_telemetry(self, telemetry: dict[str, Any]) -> None:
        try:
            payload = _encode(TELEMETRY, telemetry)
        except EdgeshipError as exc:
            log.error("telemetry window not sent: %s", exc.message)
            return
        with self._lock:
            if not self._can_send():
                self.published["telemetry_dropped"] += 1
                return
        try:
            self.connection.publish(self.telemetry_topic, payload, qos=self.settings.telemetry_qos, wait=False)
            self.published["telemetry"] += 1
        except EdgeshipError as exc:
            self.published["telemetry_dropped"] += 1
            log.debug("telemetry window dropped: %s", exc.message)

    # -- connection --
    def _can_send(self) -> bool:
        return self._online and self.connection.is_connected

    def _send_state(self) -> None:
        if self._state is None or self._state_sent:
            return
        try:
            self.connection.publish(self.reported_topic, self._state, qos=1, retain=True, wait=False)
            self._state_sent = True
            self.published["state"] += 1
        except EdgeshipError as exc:
            log.info("reported state kept for the next connect: %s", exc.message)

    def _flush_events(self) -> None:
        while self._events:
            try:
                self.connection.publish(self.events_topic, self._events[0], qos=1, wait=False)
            except EdgeshipError as exc:
                log.info("%d events kept for the next connect: %s", len(self._events), exc.message)
                return
            self._events.popleft()
            self.published["events"] += 1

    def on_connect(self, reconnected: bool) -> None:
        """Connect listener (network thread): send what waited, then report directly."""
        with self._lock:
            self._online = True
            self._state_sent = False   # a retained copy may have been lost with a broker restart
            self._send_state()
            self._flush_events()

    def on_disconnect(self) -> None:
        with self._lock:
            self._online = False


def _encode(kind: str, doc: Mapping[str, Any]) -> bytes:
    """Check an outgoing document against its schema and encode it (what the controller parses).

    Non-finite floats (a drift score without inputs yet) become null: JSON has no NaN.
    """
    payload = json.dumps(_finite(dict(doc)), separators=(",", ":"), sort_keys=True, allow_nan=False,
                         default=str).encode("utf-8")
    parse_message(kind, payload)
    return payload


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- the link ---------------------------------------------------------------------------------------

class FleetLink:
    """One agent's MQTT connection, reporter, update source and desired-state worker."""

    def __init__(self, config: AgentConfig, settings: FleetLinkSettings | None = None) -> None:
        # block_transfer, not blocks: the TUF client and its imports stay out of this process
        from edgeship.ota.block_transfer import BlockTransferConfig, MqttBlockDownloader
        from edgeship.ota.transport import (
            MqttConnection,
            ReconnectPolicy,
            WillMessage,
            parse_broker_url,
        )

        self.config = config
        self.settings = settings or load_link_settings(config)
        s = self.settings
        password = None
        if s.password_file:
            try:
                password = Path(s.password_file).read_text("utf-8").strip()
            except OSError as exc:
                raise BadInputError(f"[broker] password_file {s.password_file} cannot be read: "
                                    f"{exc.strerror or exc}") from None
        broker = parse_broker_url(s.url, username=s.username, password=password, ca_file=s.ca_file,
                                  cert_file=s.cert_file, key_file=s.key_file)
        self.desired_topic = device_topic(config.fleet, config.device_id, DESIRED, s.prefix)
        status_topic = device_topic(config.fleet, config.device_id, STATUS, s.prefix)
        self.folder = config.data_dir / "fleet"
        self.connection = MqttConnection(
            broker, client_id=config.device_id, protocol=s.protocol, keepalive=s.keepalive_s,
            reconnect=ReconnectPolicy(initial_s=min(0.5, s.reconnect_max_s), max_s=s.reconnect_max_s),
            last_will=WillMessage(status_topic, encode_message(StatusMessage("offline")), qos=1, retain=True),
            birth=WillMessage(status_topic, encode_message(StatusMessage("online")), qos=1, retain=True),
        )
        self.reporter = MqttReporter(self.connection, config, s, self.folder / "events.json")
        self.connection.add_connect_listener(self.reporter.on_connect)
        self.fetcher: Any
        if s.repository_url:  # the update's child process fetches over HTTPS itself
            self.fetcher = HttpFetchPlan(s.repository_url, str(self.folder / "http"), s.repository_ca_file)
        else:  # the child's TUF client downloads through this process's connection
            self.fetcher = MqttBlockDownloader(
                self.connection, fleet=config.fleet, device=config.device_id, work_dir=self.folder / "blocks",
                prefix=s.prefix, config=BlockTransferConfig(block_size=s.block_size, window=s.block_window,
                                                            request_timeout_s=s.block_timeout_s),
            )
        self.registry = SourceRegistry(wrap=isolate_verification)
        self.registry.register(SOURCE_KIND, self._rebuild)
        self.agent: Any = None
        self._pending: tuple[int, dict[str, Any]] | None = None  # verified: (sequence, envelope)
        self._candidates: dict[int, dict[str, Any]] = {}  # received, not verified yet: claimed sequence -> envelope
        self._taken: dict[str, int] = {}       # model -> the highest sequence handed to its driver
        self._aborted_for: dict[str, int] = {}
        self._last_refusal_event = -1e9
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.decisions: collections.deque[tuple[float, int, DesiredDecision]] = collections.deque(maxlen=100)
        """Recent (time, sequence, decision), for diagnostics and tests."""

    # -- life cycle --
    def start(self) -> FleetLink:
        """Start connecting in the background (the agent never waits for the broker)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        thread = threading.Thread(target=self._connect, name="edgeship-fleet-connect", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def _connect(self) -> None:
        try:  # retries with backoff until connected; returns then (the network thread goes on)
            self.connection.connect(timeout=float("inf"))
        except EdgeshipError as exc:  # refused: bad credentials or not authorized; retrying will not help
            log.error("fleet link disabled: %s", exc.message)

    def attach(self, agent: Any) -> None:
        """Connect (in the background) and take desired states for ``agent``.

        Called after ``agent.start()``: an agent that cannot start (another one holds the
        data folder) must not connect with the same client id and take over its session.
        """
        self.agent = agent
        if not self._threads:
            self.start()
        thread = threading.Thread(target=self._work, name="edgeship-fleet-desired", daemon=True)
        thread.start()
        self._threads.append(thread)
        self.connection.subscribe(self.desired_topic, self._on_desired, qos=1)

    def close(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` and disconnect (a crash leaves it to the last will)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self.reporter.on_disconnect()
        try:
            self.connection.close(send_will=True, timeout=timeout)
        except (EdgeshipError, OSError, RuntimeError) as exc:  # shutting down: nothing to save
            log.debug("fleet link close: %s", exc)

    # -- update source after a restart --
    def _rebuild(self, record: dict[str, Any]) -> BundleSource:
        envelope = record.get("envelope")
        if not isinstance(envelope, dict):
            raise EdgeshipError("the interrupted fleet update's record holds no desired-state envelope")
        return DirectorSource(envelope, self.fetcher, record)

    # -- desired states --
    def _on_desired(self, message: Any) -> None:
        """Network thread: parse only (cheap); the worker verifies, decides and acts."""
        if not message.payload:
            return  # a cleared retained message
        desired = parse_message(DESIRED, message.payload)   # ProtocolError: logged and dropped by the transport
        assert isinstance(desired, DesiredMessage)
        signed = desired.envelope.get("signed") if isinstance(desired.envelope, dict) else None
        claimed = signed.get("sequence") if isinstance(signed, dict) else None
        if not isinstance(claimed, int) or isinstance(claimed, bool):
            raise ProtocolError("desired state without an integer sequence")
        with self._cond:
            self._candidates[claimed] = desired.envelope
            while len(self._candidates) > _MAX_CANDIDATES:  # a flood keeps the highest claims
                del self._candidates[min(self._candidates)]
            self._cond.notify_all()

    def _verify(self, envelope: dict[str, Any]) -> int:
        """The desired state's verified sequence (SecurityError: refused, with an event).

        The signature check runs in a short-lived child (isolated.run_call) unless
        EDGESHIP_AGENT_VERIFY_IN_PROCESS=1: cryptography never enters the agent."""
        args = (envelope, str(self.config.director_key), self.config.device_id, self.config.fleet,
                _dt.datetime.now(_dt.timezone.utc).isoformat())
        try:
            if verify_in_child():
                from .isolated import run_call

                return int(run_call("edgeship.agent.fleet_link:verify_envelope", *args))
            return verify_envelope(*args)
        except SecurityError as exc:
            signed = envelope.get("signed") if isinstance(envelope, dict) else None
            seq = signed.get("sequence") if isinstance(signed, dict) else None
            now = time.monotonic()
            if now - self._last_refusal_event < 10.0:  # a flood of forgeries costs one event per 10 s
                raise
            self._last_refusal_event = now
            self.reporter.report_event(EventMessage(
                event="desired.refused", ts=time.time(), seq=0, state="REJECTED",
                detail=f"desired state (sequence {seq!r}) refused: {exc.message}"[:4000]).to_dict())
            raise

    def _verify_candidates(self) -> None:
        """Worker: verify the received desired states, highest claimed sequence first;
        the highest genuine one becomes the pending one."""
        while not self._stop.is_set():
            with self._cond:
                if not self._candidates:
                    return
                claimed = max(self._candidates)
                envelope = self._candidates.pop(claimed)
            try:
                sequence = self._verify(envelope)
            except EdgeshipError as exc:
                log.warning("desired state (claimed sequence %s) refused: %s", claimed, exc.message)
                continue
            with self._cond:
                if self._pending is None or sequence > self._pending[0]:
                    self._pending = (sequence, envelope)

    def _work(self) -> None:
        while not self._stop.is_set():
            self._verify_candidates()
            with self._cond:
                if self._pending is None:
                    if not self._candidates:
                        self._cond.wait(1.0)
                    continue
                sequence, envelope = self._pending
            try:
                done = self._consider(sequence, envelope)
            except Exception:  # one bad document must not end the worker; it is logged and dropped
                log.exception("desired state %d could not be handled", sequence)
                done = True
            with self._cond:
                if done and self._pending is not None and self._pending[0] == sequence:
                    self._pending = None
                elif not done and not self._candidates:
                    self._cond.wait(0.5)  # an update runs: look again shortly

    def _consider(self, sequence: int, envelope: dict[str, Any]) -> bool:
        """Decide and act on one verified desired state, model by model; False: try again
        later (an update of one of its models runs). Schema 2 names the full set: a model
        it does not name is removed. Schema 1 names one model and leaves the others alone."""
        signed = envelope["signed"]
        agent = self.agent
        if signed.get("schema") == 2:
            wanted = {str(n): (str(e["bundle"]), str(e["version"])) for n, e in (signed.get("models") or {}).items()}
            gone = [n for n in agent.models.names() if n not in wanted]
        else:
            wanted, gone = {str(signed["bundle"]): (str(signed["bundle"]), str(signed["version"]))}, []
        done = True
        for name, bundle in sorted(wanted.items()):
            done = self._consider_model(sequence, envelope, name, bundle, signed.get("schema") == 2) and done
        for name in gone:
            if self._taken.get(name, 0) >= sequence:
                continue
            removed = agent.remove_model(name, f"desired state {sequence} does not name it")
            if removed:
                self._taken[name] = sequence
            done = removed and done
        if done:
            agent.accepted(sequence)
        return done

    def _consider_model(
        self, sequence: int, envelope: dict[str, Any], name: str, bundle: tuple[str, str], schema2: bool
    ) -> bool:
        agent = self.agent
        driver = agent.models.get(name)
        state = driver.snapshot() if driver is not None else None
        update = state.update if state is not None else None
        in_progress = driver is not None and driver.in_progress
        running = None
        if in_progress and update is not None:
            if update.bundle:
                running = (str(update.bundle.get("name")), str(update.bundle.get("version")))
            else:  # not admitted yet: what its envelope names
                named = (update.source.get("envelope") or {}).get("signed") or {}
                entry = (named.get("models") or {}).get(update.source.get("model") or name) if named.get("models") else named
                if isinstance(entry, dict) and entry.get("bundle"):
                    running = (str(entry["bundle"]), str(entry.get("version")))
        active = (state.active.name, state.active.version) if state is not None and state.active is not None else None
        if state is not None and state.removed:
            active = None if (state.active is None or (state.active.name, state.active.version) != bundle) else active
        accepted = int(read_index_sequence(agent))
        last = max(accepted, int(state.last_sequence or 0) if state is not None else 0)
        decision = decide_desired(sequence=sequence, bundle=bundle, last_sequence=last,
                                  taken_sequence=self._taken.get(name, 0), active=active, running=running,
                                  in_progress=in_progress)
        self.decisions.append((time.time(), sequence, decision))
        action = decision.action
        if action in (DesiredAction.IGNORE_REPLAY, DesiredAction.IGNORE_SAME):
            log.debug("desired state ignored for %s: %s", name, decision.reason)
            return True
        if action is DesiredAction.ALREADY_ACTIVE:
            log.info("desired state %d: %s; nothing to install", sequence, decision.reason)
            self._taken[name] = sequence
            if state is not None and state.removed:
                agent.models.restore(name)
            self.reporter.report_state(agent.reported_document(driver))
            return True
        if action is DesiredAction.ABORT_AND_WAIT:
            if self._aborted_for.get(name) != sequence and driver is not None:
                self._aborted_for[name] = sequence
                log.info("desired state %d supersedes the update of %s in progress: %s", sequence, name, decision.reason)
                driver.abort(f"superseded by desired state {sequence} ({bundle[0]} {bundle[1]})")
            return False
        if action is DesiredAction.WAIT:
            return False
        record: dict[str, Any] = {"kind": SOURCE_KIND, "envelope": envelope}
        if schema2:
            record["model"] = name
        try:
            reply = agent.submit_desired(envelope, self.fetcher, record)
        except EdgeshipError as exc:  # raced with an update that started meanwhile
            log.info("desired state %d waits for %s: %s", sequence, name, exc.message)
            return False
        self._taken[name] = sequence
        log.info("desired state %d: update %s of %s started (%s)", sequence, reply.get("update"), name,
                 decision.reason)
        return True


def read_index_sequence(agent: Any) -> int:
    """The highest desired state the agent acted on in full (replays below it are ignored)."""
    from .models import read_index

    return int(read_index(agent.config).get("last_sequence", 0))


def verify_envelope(envelope: dict[str, Any], director_key: str, device: str, fleet: str, now: str) -> int:
    """The director's signature and the desired state's addressing, checked; its
    sequence (runs in the child ``FleetLink._verify`` starts: plain data in and out)."""
    from edgeship.ota.director import load_director_public_key, verify_desired_state

    key = load_director_public_key(director_key)
    state = verify_desired_state(envelope, key, device=device, fleet=fleet, last_sequence=None,
                                 now=_dt.datetime.fromisoformat(now))
    return int(state.sequence)


def open_fleet_link(config: AgentConfig) -> FleetLink | None:
    """The link for ``config`` (not connected yet: ``attach`` connects), or None without a broker."""
    if not config.broker_url:
        return None
    return FleetLink(config)
