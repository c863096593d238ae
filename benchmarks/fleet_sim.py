"""Many simulated devices against the real controller (section ``fleet-sim`` of docs/benchmarks.md).

Everything is real but the devices' model serving: a Mosquitto broker, the controller as its own
process (``edgeship controller``, so its CPU is measured apart), a SQLite store in WAL mode, a
release repository with a published 1 MB bundle, and N simulated devices, **each with its own MQTT
connection and client id** (one paho client per device, driven by one asyncio event loop: 1,000
``MqttConnection`` objects would be 1,000 network threads polling every 0.2 s, which on this
2-core machine would measure the GIL rather than the controller). Each device speaks the real
protocol: retained status with a last will, retained reported state, events at QoS 1, telemetry;
it verifies each desired state with the director's public key (ed25519, ``verify_desired_state``),
fetches the bundle with the block protocol (describe, then bitmap requests of a window of blocks,
re-asking for missing blocks after a timeout, honouring 429 retry-after) and checks the director's
length and sha256 over the bytes it received before it reports COMMITTED. It does not run the TUF
client (no metadata refresh): that costs the device, not the controller, and is measured in the
``verify`` and ``blocks`` sections.

Phases, in one run:

1. connect N devices (in waves of 50) and wait until the controller has ingested every one;
2. staged rollout of the 1 MB bundle to all of them (``edgeship rollout start --stages 5,25,100``):
   time to COMPLETED, per-stage times, controller CPU, bytes served; baseline: a bare paho publish
   loop moving the same number of bytes (N x bundle) through the same broker in the same block size;
3. telemetry: every device publishes a telemetry window every second for ``--telemetry-s``
   seconds: messages/s ingested by the controller (from its Prometheus counters), ingest lag
   (sampled every second), controller CPU; baseline: a bare paho subscriber counting what the
   broker delivered of the same messages.

    .venv/bin/python benchmarks/fleet_sim.py [--devices 1000] [--bundle-mb 1] [--telemetry-s 20] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgeship.ota.director import load_director_public_key, verify_desired_state
from edgeship.ota.protocol import (
    BlockData,
    BlockError,
    BlockInfo,
    BlockRequest,
    DesiredMessage,
    EventMessage,
    ReportedMessage,
    StatusMessage,
    TelemetryMessage,
    bitmap_from_indexes,
    encode_message,
    parse_block_reply,
    parse_message,
)
from edgeship.ota.release import ReleaseRepository
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.ota.topics import (
    BLOCK_DATA,
    BLOCK_REQUEST,
    DESIRED,
    EVENTS,
    REPORTED,
    STATUS,
    TELEMETRY,
    device_topic,
)
from edgeship.toolkit.store import FleetStore

FLEET = "sim"
BLOCK_SIZE = 64 * 1024
WINDOW = 16
REASK_S = 5.0  # a device without progress for this long asks again (then twice as long, up to 8x)


def _fmt(seconds: float) -> str:
    return f"{seconds:.1f} s"


# -- the delta mode's pieces -----------------------------------------------------------------------

@dataclass(frozen=True)
class Fetch:
    """What a device fetches for one update: a target path with its signed length and sha256."""

    kind: str                  # delta | compressed | full
    path: str
    length: int
    sha256: str
    base_version: str | None = None


def rebuild_bundle(kind: str, payload: str, base: str, out: str, length: int, sha256: str) -> tuple[str, float]:
    """In a worker process: the bundle from a delta (``apply_delta`` against the base file) or from a
    zstd frame (streaming, capped at the signed length); returns the result's sha256 (computed here,
    apart from any check the applier makes) and the seconds it took."""
    started = time.perf_counter()
    if kind == "delta":
        from edgeship.ota.delta import apply_delta

        apply_delta(payload, base, out, expected_target_sha256=sha256)
    else:
        import zstandard

        with open(payload, "rb") as source, open(out, "wb") as target:
            reader = zstandard.ZstdDecompressor().stream_reader(source)
            written = 0
            while chunk := reader.read(1 << 20):
                written += len(chunk)
                if written > length:
                    raise ValueError(f"the compressed bundle decompresses past its signed length {length}")
                target.write(chunk)
    digest = hashlib.sha256()
    with open(out, "rb") as rebuilt:
        while chunk := rebuilt.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest(), time.perf_counter() - started


# -- one simulated device ------------------------------------------------------------------------

class SimDevice:
    """One device: one paho client (its own TCP connection and client id) on the shared loop."""

    def __init__(self, sim: Simulator, device: str) -> None:
        self.sim, self.device = sim, device
        self.loop = sim.loop
        self.active = dict(sim.initial_active)
        self.connected = asyncio.Event()
        self.seq = 0
        self.last_sequence: int | None = None
        self.state: Any = None
        self.info: BlockInfo | None = None
        self.blocks: dict[int, bytes] = {}
        self.progress_at = 0.0
        self.stall_s = REASK_S
        self.request_no = 0
        self.committed_at: float | None = None
        self.serving_version: int | None = None
        # the delta mode: the active bundle's sha256 (None: no base kept), and the update's fetch plan
        self.active_sha256: str | None = sim.initial_sha256
        self.fetch: Fetch | None = None
        self.wire_bytes = 0
        self.fallback: str | None = None
        self.update_no = 0
        self.rebuilding = False
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5)
        self.client.will_set(self.topic(STATUS), encode_message(StatusMessage("offline")), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_socket_open = self._on_socket_open
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = lambda c, u, s: self.loop.add_writer(s, c.loop_write)
        self.client.on_socket_unregister_write = lambda c, u, s: self.loop.remove_writer(s)
        self.client.max_inflight_messages_set(100)
        self._misc: asyncio.Task | None = None

    def topic(self, kind: str) -> str:
        return device_topic(FLEET, self.device, kind)

    # socket plumbing (paho's documented external-loop integration)
    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.loop.add_reader(sock, client.loop_read)
        self._misc = self.loop.create_task(self._misc_loop())

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self.loop.remove_reader(sock)
        if self._misc is not None:
            self._misc.cancel()

    async def _misc_loop(self) -> None:
        while self.client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1.0)
            self._check_transfer()

    def connect(self) -> None:
        self.client.connect(self.sim.host, self.sim.port, keepalive=60, clean_start=True)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe([(self.topic(DESIRED), 1), (self.topic(BLOCK_DATA), 1)])
        client.publish(self.topic(STATUS), encode_message(StatusMessage("online", time.time())), 1, True)
        self.report()
        self.connected.set()

    def report(self, update: dict[str, Any] | None = None) -> None:
        # --multi-model: report the `models` map, so the controller sends desired-state schema 2
        models = {self.active["name"]: {"active": dict(self.active), "serving_version": self.serving_version,
                                        **({"update": update} if update else {})}} if self.sim.multi_model else None
        message = ReportedMessage(self.device, time.time(), dict(self.active), update=update, agent_version="sim",
                                  runtime="none", models=models)
        self.client.publish(self.topic(REPORTED), encode_message(message), 1, True)

    def event(self, name: str, **fields: Any) -> None:
        self.seq += 1
        self.client.publish(self.topic(EVENTS), encode_message(EventMessage(name, time.time(), self.seq, **fields)), 1)

    def telemetry(self, payload: bytes) -> None:
        self.client.publish(self.topic(TELEMETRY), payload, 0)

    # the update
    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        # Nothing may escape into paho: an exception raised in a callback leaves the packet it was
        # handling half-processed inside paho's reader, and the next read misparses.
        try:
            if message.topic.endswith("/desired"):
                self._on_desired(bytes(message.payload))
            else:
                self._on_block(bytes(message.payload))
        except Exception as exc:  # noqa: BLE001 - a simulated device's bug is counted and printed; raised, it would unwind paho's reader thread
            self.sim.errors += 1
            if self.sim.errors <= 10:
                print(f"{self.device}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def _on_desired(self, payload: bytes) -> None:
        doc = parse_message(DESIRED, payload)
        assert isinstance(doc, DesiredMessage)
        if doc.envelope.get("signed", {}).get("schema") == 2:
            state = self._schema2_state(doc.envelope)
            if state is None:
                return
        else:
            state = verify_desired_state(doc.envelope, self.sim.director_key, device=self.device, fleet=FLEET,
                                         last_sequence=self.last_sequence, now=dt.datetime.now(dt.timezone.utc))
        self.last_sequence = state.sequence
        if state.version == self.active["version"] and state.bundle == self.active["name"]:
            return
        self.state, self.info, self.blocks = state, None, {}
        self.update_no += 1
        self.wire_bytes, self.fallback = 0, None
        self.fetch = self.sim.plan(self, state)
        self.report({"state": "FETCHING", "bundle": {"name": state.bundle, "version": state.version}})
        self._request(None)

    def _schema2_state(self, envelope: dict[str, Any]) -> Any:
        """What a multi-model agent checks of a schema-2 document (signature over the canonical JSON,
        device, fleet, a growing sequence, expiry), then this device's one model's entry as the
        single-model state the transfer below works on (None: nothing to do)."""
        from types import SimpleNamespace

        from edgeship.ota.director import canonical_json, parse_utc

        signed = envelope["signed"]
        self.sim.director_key.verify(bytes.fromhex(envelope["signatures"][0]["sig"]), canonical_json(signed))
        if signed["device"] != self.device or signed["fleet"] != FLEET:
            raise RuntimeError(f"{self.device}: a desired state for {signed['fleet']}/{signed['device']}")
        if self.last_sequence is not None and signed["sequence"] <= self.last_sequence:
            raise RuntimeError(f"{self.device}: sequence {signed['sequence']} is not above {self.last_sequence}")
        if parse_utc(signed["expires"]) <= dt.datetime.now(dt.timezone.utc):
            raise RuntimeError(f"{self.device}: an expired desired state")
        self.last_sequence = signed["sequence"]
        entry = signed["models"].get(self.active["name"])
        if entry is None:
            return None
        self.serving_version = entry.get("serving_version")
        return SimpleNamespace(sequence=signed["sequence"], bundle=entry["bundle"], version=entry["version"],
                               target=entry["target"], length=entry["length"], sha256=entry["hashes"]["sha256"],
                               deployment=entry.get("deployment"))

    def _request(self, indexes: list[int] | None) -> None:
        self.request_no += 1
        self.progress_at = time.monotonic()
        bitmap = None
        offset = 0
        if indexes:
            offset = min(indexes)
            bitmap = bitmap_from_indexes(indexes, offset)
        path = self.fetch.path if self.fetch is not None else self.state.target
        request = BlockRequest(f"{self.device}-{self.request_no}", f"targets/{path}", BLOCK_SIZE, bitmap, offset)
        self.client.publish(self.topic(BLOCK_REQUEST), encode_message(request), 1)

    def _missing(self) -> list[int]:
        assert self.info is not None
        return [i for i in range(self.info.blocks_total) if i not in self.blocks]

    def _on_block(self, payload: bytes) -> None:
        if self.state is None:
            return
        reply = parse_block_reply(payload)
        self.progress_at = time.monotonic()
        if isinstance(reply, BlockInfo):
            self.info = reply
            self._request(self._missing()[:WINDOW])
        elif isinstance(reply, BlockError):
            if reply.code == 429:
                self.sim.rate_limited += 1
                self.loop.call_later(reply.retry_after_s or 0.5, lambda: self.state and self.info and
                                     self._request(self._missing()[:WINDOW]))
            else:
                raise RuntimeError(f"{self.device}: block error {reply.code} {reply.message}")
        elif isinstance(reply, BlockData) and self.info is not None:
            self.wire_bytes += len(reply.data)  # every block that came over the wire, repeats included
            if reply.index not in self.blocks:
                self.blocks[reply.index] = reply.data
                self.stall_s = REASK_S
                self.sim.bytes_received += len(reply.data)
            missing = self._missing()
            if not missing:
                self._finish()
            elif len(self.blocks) % WINDOW == 0 or reply.index == self.info.blocks_total - 1:
                self._request(missing[:WINDOW])

    def _check_transfer(self) -> None:
        """Ask again for what did not arrive (a lost request or block)."""
        if self.state is not None and not self.rebuilding and time.monotonic() - self.progress_at > self.stall_s:
            self.sim.retries += 1
            self._request(self._missing()[:WINDOW] if self.info else None)
            self.stall_s = min(self.stall_s * 2, REASK_S * 8)  # as the agent backs off (ota.block_transfer)

    def _finish(self) -> None:
        assert self.info is not None and self.state is not None
        data = b"".join(self.blocks[i] for i in range(self.info.blocks_total))
        if self.fetch is not None and self.fetch.kind != "full":
            self._finish_companion(data)
            return
        if len(data) != self.state.length or hashlib.sha256(data).hexdigest() != self.state.sha256:
            self.sim.mismatches += 1
            detail = ""
            if self.sim.target_file is not None:
                truth = self.sim.target_file.read_bytes()
                bad = [i for i in range(self.info.blocks_total)
                       if self.blocks[i] != truth[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]]
                detail = f"; blocks differing from the file: {bad[:10]} of {self.info.blocks_total}"
            print(f"{self.device}: the bundle ({len(data)} bytes) does not match the director's length "
                  f"{self.state.length} and sha256{detail}; fetching again", file=sys.stderr)
            self.info, self.blocks = None, {}
            self._request(None)
            return
        self._commit()

    def _commit(self) -> None:
        """The bundle is verified against the director's sha256: the new active bundle; with a
        fetch plan (the delta mode) the report carries how it travelled."""
        assert self.state is not None
        bundle = {"name": self.state.bundle, "version": self.state.version}
        update: dict[str, Any] = {"state": "COMMITTED", "bundle": bundle}
        if self.fetch is not None:
            transfer: dict[str, Any] = {"kind": self.fetch.kind, "bytes": self.wire_bytes,
                                        "full_bytes": self.state.length}
            if self.fetch.kind == "delta":
                transfer["base_version"] = self.fetch.base_version
            if self.fallback:
                transfer["fallback"] = self.fallback[:200]
            update.update(id=f"{self.device}-u{self.update_no}", deployment=getattr(self.state, "deployment", None),
                          transfer=transfer)
            self.active_sha256 = self.state.sha256
            self.sim.kinds[self.fetch.kind] = self.sim.kinds.get(self.fetch.kind, 0) + 1
        self.active, self.state, self.info, self.blocks, self.fetch = bundle, None, None, {}, None
        self.committed_at = time.monotonic()
        self.event("update_committed", bundle=bundle, state="COMMITTED")
        self.report(update)

    def _finish_companion(self, data: bytes) -> None:
        """A delta or a compressed bundle arrived: check its own signed length and sha256, rebuild the
        bundle in a worker process (the real ``apply_delta``, or a capped zstd decompression), then
        check the rebuilt bundle against the director's sha256, as the agent does."""
        fetch, state = self.fetch, self.state
        assert fetch is not None and state is not None
        if len(data) != fetch.length or hashlib.sha256(data).hexdigest() != fetch.sha256:
            self.sim.mismatches += 1
            self.info, self.blocks = None, {}
            self._request(None)
            return
        payload = self.sim.scratch / f"{self.device}-{self.update_no}.{fetch.kind}"
        payload.write_bytes(data)
        out = self.sim.scratch / f"{self.device}-{self.update_no}.bundle"
        base = str(self.sim.bundle_files[self.active_sha256]) if fetch.kind == "delta" and self.active_sha256 else ""
        self.blocks, self.rebuilding = {}, True
        future = self.loop.run_in_executor(self.sim.pool, rebuild_bundle, fetch.kind, str(payload), base, str(out),
                                           state.length, state.sha256)
        future.add_done_callback(lambda done: self._rebuilt(done, fetch, payload, out))

    def _rebuilt(self, done: asyncio.Future, fetch: Fetch, payload: Path, out: Path) -> None:
        self.rebuilding = False
        try:
            payload.unlink(missing_ok=True)
            out.unlink(missing_ok=True)
            if self.state is None or self.fetch is not fetch:
                return  # a newer desired state took over
            try:
                sha256, seconds = done.result()
            except Exception as exc:  # noqa: BLE001 - any failure of the delta path means: fall back, as the agent does
                self.fallback = f"{fetch.kind} refused: {type(exc).__name__}: {exc}"[:200]
                self.sim.fallbacks += 1
                self.fetch, self.info, self.blocks = self.sim.plan(self, self.state, no_delta=True), None, {}
                self._request(None)
                return
            if sha256 != self.state.sha256:
                raise RuntimeError(f"{self.device}: the rebuilt bundle's sha256 is not the director's")
            self.sim.rebuild_s.append(seconds)
            self._commit()
        except Exception as exc:  # noqa: BLE001 - as in _on_message: counted and printed, never raised into the loop
            self.sim.errors += 1
            if self.sim.errors <= 10:
                print(f"{self.device}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


class Simulator:
    def __init__(self, host: str, port: int, director_pub: Path, n: int, multi_model: bool = False) -> None:
        self.host, self.port, self.n, self.multi_model = host, port, n, multi_model
        self.director_key = load_director_public_key(director_pub)
        self.loop = asyncio.new_event_loop()
        self.devices: list[SimDevice] = []
        self.bytes_received = 0
        self.retries = 0
        self.rate_limited = 0
        self.mismatches = 0
        self.errors = 0
        self.target_file: Path | None = None
        # the delta mode (docs/benchmarks.md, fleet-sim-deltas)
        self.initial_active = {"name": "digits", "version": "1.0.0"}
        self.initial_sha256: str | None = None
        self.bundle_files: dict[str, Path] = {}      # sha256 -> the bundle file a device's active slot holds
        self.companions: dict[str, list[Fetch]] = {}  # version -> its published delta and compressed targets
        self.pool: ProcessPoolExecutor | None = None
        self.scratch = Path(tempfile.gettempdir())
        self.kinds: dict[str, int] = {}
        self.fallbacks = 0
        self.rebuild_s: list[float] = []
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim-loop", daemon=True)

    def plan(self, device: SimDevice, state: Any, no_delta: bool = False) -> Fetch | None:
        """What the agent would fetch (docs/deltas.md): the delta from the active bundle's sha256 when
        one is published, else the compressed bundle when published, else the full bundle. None
        outside the delta mode (the plain full fetch)."""
        if self.pool is None:
            return None
        published = self.companions.get(state.version, [])
        if not no_delta and device.active_sha256:
            for fetch in published:
                if fetch.kind == "delta" and fetch.path.rsplit("/", 1)[-1] == f"{device.active_sha256}.delta":
                    return fetch
        if device.active_sha256 is None and published:
            device.fallback = "no base: the active slot's bundle file is not kept"
        for fetch in published:
            if fetch.kind == "compressed":
                return fetch
        return Fetch("full", state.target, state.length, state.sha256)

    def start(self) -> None:
        self.thread.start()

    def call(self, coro: Any, timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect_all(self) -> None:
        for start in range(0, self.n, 50):
            wave = [SimDevice(self, f"d{i:05d}") for i in range(start, min(self.n, start + 50))]
            for device in wave:
                device.connect()
            self.devices.extend(wave)
            await asyncio.wait_for(asyncio.gather(*(d.connected.wait() for d in wave)), 60)

    def connect_all(self) -> None:
        self.call(self._connect_all())

    async def _telemetry_round(self, payload: bytes) -> None:
        for device in self.devices:
            device.telemetry(payload)

    async def _telemetry(self, seconds: float, payload: bytes, hz: float) -> int:
        sent = 0
        start = time.monotonic()
        period = 1.0 / hz
        for index in range(int(seconds * hz)):
            # spread each round over its period, as independent devices would
            for offset in range(0, len(self.devices), 50):
                for device in self.devices[offset:offset + 50]:
                    device.telemetry(payload)
                    sent += 1
                due = start + (index + (offset + 50) / len(self.devices)) * period
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        return sent

    def telemetry(self, seconds: float, payload: bytes, hz: float = 1.0) -> int:
        return self.call(self._telemetry(seconds, payload, hz), timeout=seconds + 120)

    async def _disconnect(self) -> None:
        for device in self.devices:
            device.client.disconnect()
        await asyncio.sleep(0.5)

    def stop(self) -> None:
        try:
            self.call(self._disconnect(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


# -- the harness ---------------------------------------------------------------------------------

def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample, value = line.rsplit(" ", 1)
            if value == "NaN":
                continue
            values[sample] = float(value)
            if "{" in sample:  # a labelled sample also adds to its family's sum, under the bare name
                name = sample.split("{", 1)[0]
                values[name] = values.get(name, 0.0) + float(value)
    return values


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _baseline_publish(host: str, port: int, total_bytes: int, block_size: int) -> float:
    """Bare paho: one client publishes total_bytes in block-sized QoS 1 messages, another receives them."""
    received = threading.Event()
    count = {"n": 0}
    messages = max(1, total_bytes // block_size)

    def on_message(client: paho.Client, userdata: Any, message: Any) -> None:
        count["n"] += 1
        if count["n"] >= messages:
            received.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="baseline-sub", protocol=paho.MQTTv5)
    sub.on_message = on_message
    sub.connect(host, port)
    sub.subscribe("baseline/blocks", 1)
    sub.loop_start()
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="baseline-pub", protocol=paho.MQTTv5)
    pub.max_queued_messages_set(0)
    pub.connect(host, port)
    pub.loop_start()
    time.sleep(0.5)
    payload = os.urandom(block_size)
    start = time.perf_counter()
    for _ in range(messages):
        info = pub.publish("baseline/blocks", payload, 1)
        if (_ % 64) == 63:
            info.wait_for_publish(30)
    received.wait(300)
    elapsed = time.perf_counter() - start
    for client in (pub, sub):
        client.loop_stop()
        client.disconnect()
    return elapsed


def _baseline_subscriber(host: str, port: int) -> Any:
    counter = {"n": 0}
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="baseline-telemetry", protocol=paho.MQTTv5)

    def on_message(c: Any, u: Any, m: Any) -> None:
        counter["n"] += 1

    client.on_message = on_message
    client.connect(host, port)
    client.subscribe(f"edgeship/{FLEET}/devices/+/telemetry", 0)
    client.loop_start()
    return client, counter


def _telemetry_rows(store: FleetStore) -> int:
    import sqlalchemy as sa

    from edgeship.toolkit.store import telemetry

    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(telemetry)).scalar_one())


def _telemetry_phase(sim: Simulator, hz: float, seconds: int, metrics_port: int, proc: psutil.Process,
                     broker_port: int, store: FleetStore) -> dict[str, Any]:
    n = len(sim.devices)
    histogram = LatencyHistogram()
    rng = random.Random(3)
    for _ in range(50):
        histogram.observe(rng.lognormvariate(1.5, 0.4))
    payload = encode_message(TelemetryMessage(time.time(), 1.0 / hz, 50, 1, histogram,
                                              bundle={"name": "digits", "version": "1.1.0"}, drift=0.01))
    baseline_client, delivered = _baseline_subscriber("127.0.0.1", broker_port)
    time.sleep(0.5)
    before = _metrics(metrics_port)
    cpu0 = _cpu(proc)
    lags: list[float] = []
    depth: list[float] = []
    ticks: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            m = _metrics(metrics_port)
            lags.append(m.get("edgeship_controller_ingest_lag_seconds", 0.0))
            depth.append(m.get("edgeship_controller_ingest_queue", 0.0))
            ticks.append(m.get("edgeship_controller_tick_seconds", 0.0))

    sampler = threading.Thread(target=sample, daemon=True)
    rows_start = _telemetry_rows(store)
    print(f"telemetry: {n} devices x {hz:g} message/s for {seconds} s ...", flush=True)
    start = time.perf_counter()
    sampler.start()
    sent = sim.telemetry(seconds, payload, hz)
    sent_s = time.perf_counter() - start
    target_count = rows_start + sent
    seen, changed = -1.0, time.perf_counter()
    while True:  # until everything is in the store, or nothing more arrives for 5 s (the broker dropped some)
        current = _telemetry_rows(store)
        now = time.perf_counter()
        if current != seen:
            seen, changed = current, now
        if current >= target_count or now - changed > 5.0 or now - start > seconds + 300:
            break
        time.sleep(0.1)
    drained_s = changed - start
    stop.set()
    sampler.join(5)
    after = _metrics(metrics_port)
    ingested = _telemetry_rows(store) - rows_start
    baseline_client.loop_stop()
    baseline_client.disconnect()
    r = dict(hz=hz, sent=sent, send_s=sent_s, ingested=int(ingested), drained_s=drained_s,
             rate=ingested / drained_s, offered_rate=sent / sent_s, delivered_baseline=delivered["n"],
             lag_max_s=max(lags) if lags else 0.0, lag_median_s=sorted(lags)[len(lags) // 2] if lags else 0.0,
             queue_max=max(depth) if depth else 0.0, cpu_s=_cpu(proc) - cpu0,
             tick_max_s=max(ticks) if ticks else 0.0,
             dropped=after.get("edgeship_controller_ingest_dropped_total", 0)
             - before.get("edgeship_controller_ingest_dropped_total", 0))
    print(f"  sent {sent} in {_fmt(sent_s)} ({r['offered_rate']:.0f}/s offered); controller ingested "
          f"{int(ingested)}, all written {_fmt(drained_s)} after the first ({r['rate']:.0f}/s), lag max "
          f"{r['lag_max_s']:.2f} s; a bare subscriber got {delivered['n']}", flush=True)
    return r


def _launch_controller(work: Path, broker_url: str, repo: Path, db: str) -> tuple[subprocess.Popen, int, Any]:
    """``edgeship controller`` as its own process (its CPU is measured apart), with a metrics port;
    returns once it logged that it started."""
    metrics_port = 19000 + random.randint(0, 900)
    log = open(work / "controller.log", "wb")
    controller = subprocess.Popen([sys.executable, "-m", "edgeship.toolkit.cli", "controller", "--broker", broker_url,
                                   "--repo", str(repo), "--db", db, "--replica-id", "bench",
                                   "--metrics-port", str(metrics_port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b"started" not in (work / "controller.log").read_bytes():
        if controller.poll() is not None or time.monotonic() > deadline:
            controller.kill()
            log.close()
            raise RuntimeError("controller did not start: " + (work / "controller.log").read_text()[-2000:])
        time.sleep(0.2)
    return controller, metrics_port, log


def _connect_fleet(sim: Simulator, store: FleetStore, n: int) -> tuple[float, float]:
    """Connect every simulated device and wait until the controller has stored each one: (seconds to
    connect, seconds until all are in the store)."""
    sim.start()
    print(f"connecting {n} devices, one MQTT connection each ...", flush=True)
    start = time.perf_counter()
    sim.connect_all()
    connected = time.perf_counter() - start
    while len([d for d in store.list_devices(FLEET) if d.online and d.active_version]) < n:
        if time.perf_counter() - start > 300:
            raise RuntimeError("the controller did not ingest every device within 300 s")
        time.sleep(0.5)
    known = time.perf_counter() - start
    print(f"  connected in {_fmt(connected)}, all {n} in the store after {_fmt(known)}", flush=True)
    return connected, known


def _shut_down(sim: Simulator, controller: subprocess.Popen | None, log: Any) -> None:
    try:
        sim.stop()
    except Exception as exc:  # noqa: BLE001 - report, do not hide the results measured so far
        print(f"simulator stop: {exc}", file=sys.stderr)
    if sim.pool is not None:
        sim.pool.shutdown(cancel_futures=True)
    if controller is not None:
        controller.terminate()
        try:
            controller.wait(30)
        except subprocess.TimeoutExpired:
            controller.kill()
    if log is not None:
        log.close()


def run(n: int, bundle_mb: float, telemetry_s: int, rates: list[float], work: Path,
        multi_model: bool = False) -> dict[str, Any]:
    from mqtt_broker import MosquittoBroker
    from ota_repo_simulator import make_bundle

    results: dict[str, Any] = {"devices": n, "bundle_mb": bundle_mb}
    broker = MosquittoBroker(work / "mosquitto", "listener {port} 127.0.0.1\nallow_anonymous true\n"
                                                  "persistence false\nmax_queued_messages 10000\n").start()
    repo = ReleaseRepository(work / "repo")
    repo.init(root_passphrase="benchmark passphrase")
    bundle = make_bundle(work / "bundles", "digits", "1.1.0", size=int(bundle_mb * 1024 * 1024))
    target = repo.publish(bundle)
    results["bundle_bytes"] = target.length
    db = f"sqlite:///{work / 'fleet.db'}"
    store = FleetStore(db)
    sim = Simulator("127.0.0.1", broker.port, repo.director_public_key_path, n, multi_model=multi_model)
    sim.target_file = target.file
    controller, log = None, None
    try:
        controller, metrics_port, log = _launch_controller(work, broker.url, repo.path, db)
        proc = psutil.Process(controller.pid)
        results["connect_s"], results["known_s"] = _connect_fleet(sim, store, n)

        # -- phase 2: staged rollout
        cpu0, sim_cpu0 = _cpu(proc), _cpu(psutil.Process())
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "rollout", "start", "digits", "1.1.0",
                              "--fleet", FLEET, "--stages", "5,25,100", "--success-threshold", "100",
                              "--db", db], capture_output=True, text=True, check=True, timeout=60)
        rollout_id = out.stdout.strip()
        print(f"rollout {rollout_id} of a {target.length / 1e6:.2f} MB bundle to {n} devices ...", flush=True)
        stage_times: list[float] = []
        last_stage = 0
        while True:
            rollout, _ = store.load_rollout(rollout_id)
            if rollout.stage != last_stage:
                stage_times.append(time.perf_counter() - start)
                last_stage = rollout.stage
            if rollout.state.value in ("COMPLETED", "ABORTED", "ROLLED_BACK"):
                break
            if time.perf_counter() - start > 1800:
                raise RuntimeError("rollout did not finish within 30 minutes")
            time.sleep(0.5)
        elapsed = time.perf_counter() - start
        results.update(rollout_state=rollout.state.value, rollout_s=elapsed, stage_s=stage_times,
                       rollout_cpu_s=_cpu(proc) - cpu0, sim_cpu_s=_cpu(psutil.Process()) - sim_cpu0,
                       bytes_received=sim.bytes_received, retries=sim.retries, rate_limited=sim.rate_limited,
                       mismatches=sim.mismatches, sim_errors=sim.errors)
        metrics = _metrics(metrics_port)
        results["blocks_sent"] = metrics.get("edgeship_controller_blocks_sent_total", 0)
        results["block_bytes_sent"] = metrics.get("edgeship_controller_block_bytes_sent_total", 0)
        results["desired_published"] = metrics.get("edgeship_controller_desired_published_total", 0)
        print(f"  {rollout.state.value} in {_fmt(elapsed)} (stages advanced at "
              f"{', '.join(_fmt(s) for s in stage_times)}); controller CPU {results['rollout_cpu_s']:.1f} s",
              flush=True)
        moved = results["block_bytes_sent"] or n * target.length
        results["baseline_s"] = _baseline_publish("127.0.0.1", broker.port, int(moved), BLOCK_SIZE)
        print(f"  baseline: bare paho moves the same {moved / 1e6:.0f} MB in {_fmt(results['baseline_s'])}", flush=True)

        # -- phase 3: telemetry from every device, once a second (and faster, to find the headroom)
        results["telemetry"] = [_telemetry_phase(sim, hz, telemetry_s, metrics_port, proc, broker.port, store)
                                for hz in rates]
    finally:
        _shut_down(sim, controller, log)
        store.close()
        broker.stop()
    return results


MODEL = "mobilenet"
MODEL_VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
NO_BASE_EVERY = 20
"""In the delta rollout every 20th device (5%) starts without a base and takes the compressed bundle."""


def make_model_bundles(folder: Path) -> None:
    """Three bundles of one real model, each after retraining only its head (what benchmarks/deltas.py
    measures): MobileNetV2 at 96 px, alpha 0.35, 10 classes, fp32, random weights with BatchNorm
    statistics set from one batch (so its features are not all zero and a retrained head really
    moves), then its last Dense layer trained for an epoch on random data, twice."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf
    from deltas import copy_model, set_batchnorm_statistics, tflite

    from edgeship.ota.bundle_build import build_bundle

    folder.mkdir(parents=True, exist_ok=True)
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10)
    rng = np.random.default_rng(0)
    x = rng.random((32, 96, 96, 3), dtype=np.float32)
    y = rng.integers(0, 10, 32)
    set_batchnorm_statistics(model, x)
    models = [model]
    for _ in MODEL_VERSIONS[1:]:
        head = copy_model(models[-1])
        for layer in head.layers[:-1]:
            layer.trainable = False
        head.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
        head.fit(x, y, epochs=1, batch_size=16, verbose=0)
        models.append(head)
    for version, trained in zip(MODEL_VERSIONS, models):
        model_file = tflite(trained, folder / f"{MODEL}-{version}.tflite", x, False)
        build_bundle(model_file, name=MODEL, version=version, out=folder / f"{MODEL}-{version}.bundle")


def publish_cli(repo: ReleaseRepository, bundle: Path, deltas: int) -> dict[str, Any]:
    """``edgeship publish BUNDLE --deltas N --json``: the bundle, and (N > 0) its zstd copy and its
    deltas from the last N published versions, signed as companion targets (the operator's path)."""
    args = ["--deltas", str(deltas)] + ([] if deltas else ["--no-compress"])
    out = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "publish", str(bundle), "--repo",
                          str(repo.path), *args, "--json"], capture_output=True, text=True, check=True, timeout=300)
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def companion_fetches(repo: ReleaseRepository, version: str) -> list[Fetch]:
    """The companions of ``version`` as the signed targets metadata lists them (what the agent's TUF
    client reads: path, length, sha256)."""
    return [Fetch(t.kind, t.path, t.length, t.sha256, t.base_version) for t in repo.companions(MODEL, version)]


def _children_cpu() -> float:
    """CPU seconds of this process and its live children (the rebuild workers)."""
    me = psutil.Process()
    return _cpu(me) + sum(_cpu(child) for child in me.children(recursive=True))


def _by_kind(metrics: dict[str, float], family: str, kinds: tuple[str, ...], fleet: str | None = None) -> dict[str, float]:
    where = f'fleet="{fleet}",' if fleet else ""
    return {k: metrics.get(f'{family}{{{where}kind="{k}"}}', 0.0) for k in kinds}


def _delta_phase(sim: Simulator, version: str, db: str, store: FleetStore, metrics_port: int,
                 proc: psutil.Process) -> dict[str, Any]:
    """One staged rollout of ``version`` to every device: time, CPU, the block server's bytes per
    stream kind, what the devices reported (``rollout status --json``, the metrics' counters)."""
    served_kinds, transfer_kinds = ("delta", "compressed", "full", "metadata"), ("delta", "compressed", "full")
    before = _metrics(metrics_port)
    kinds0, fallbacks0, rebuilds0 = dict(sim.kinds), sim.fallbacks, len(sim.rebuild_s)
    cpu0, sim_cpu0 = _cpu(proc), _children_cpu()
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "rollout", "start", MODEL, version,
                          "--fleet", FLEET, "--stages", "5,25,100", "--success-threshold", "100", "--db", db],
                         capture_output=True, text=True, check=True, timeout=60)
    rollout_id = out.stdout.strip()
    print(f"rollout {rollout_id} of {MODEL} {version} to {len(sim.devices)} devices ...", flush=True)
    while True:
        rollout, _ = store.load_rollout(rollout_id)
        if rollout.state.value in ("COMPLETED", "ABORTED", "ROLLED_BACK"):
            break
        if time.perf_counter() - start > 1800:
            raise RuntimeError("rollout did not finish within 30 minutes")
        time.sleep(0.25)
    elapsed = time.perf_counter() - start
    cpu, sim_cpu = _cpu(proc) - cpu0, _children_cpu() - sim_cpu0
    time.sleep(2.5)  # the last reports reach the store; the metrics page is cached for 2 s
    after = _metrics(metrics_port)
    status = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "rollout", "status", rollout_id, "--json",
                             "--db", db], capture_output=True, text=True, check=True, timeout=60)
    b0, b1 = _by_kind(before, "edgeship_controller_block_bytes_sent_total", served_kinds), \
        _by_kind(after, "edgeship_controller_block_bytes_sent_total", served_kinds)
    t0, t1 = (_by_kind(before, "edgeship_fleet_transfer_bytes_total", transfer_kinds, FLEET),
              _by_kind(after, "edgeship_fleet_transfer_bytes_total", transfer_kinds, FLEET))
    rebuilds = sim.rebuild_s[rebuilds0:]
    r = dict(version=version, rollout=rollout_id, state=rollout.state.value, rollout_s=elapsed, controller_cpu_s=cpu,
             sim_cpu_s=sim_cpu, served={k: b1[k] - b0[k] for k in served_kinds},
             reported_metrics={k: t1[k] - t0[k] for k in transfer_kinds},
             transfers=json.loads(status.stdout)["transfers"],
             kinds={k: sim.kinds.get(k, 0) - kinds0.get(k, 0) for k in transfer_kinds},
             fallbacks=sim.fallbacks - fallbacks0, rebuilds=len(rebuilds),
             rebuild_mean_s=sum(rebuilds) / len(rebuilds) if rebuilds else 0.0,
             rebuild_max_s=max(rebuilds, default=0.0))
    print(f"  {r['state']} in {_fmt(elapsed)}; controller CPU {cpu:.1f} s; served {r['served']}; devices "
          f"reported {r['transfers']['bytes']} bytes {r['kinds']}", flush=True)
    return r


def run_deltas(n: int, work: Path, workers: int) -> dict[str, Any]:
    """The delta mode: a real model's bundles, rolled out to ``n`` devices twice in one run, first
    without deltas published (every device fetches the full bundle), then with them."""
    import multiprocessing

    from mqtt_broker import MosquittoBroker

    results: dict[str, Any] = {"devices": n, "workers": workers, "load_start": os.getloadavg()}
    print("making the model's bundles (MobileNetV2 96 px alpha 0.35, head retrained twice) ...", flush=True)
    subprocess.run([sys.executable, __file__, "--make-model-bundles", str(work / "bundles")], check=True, timeout=1200)
    broker = MosquittoBroker(work / "mosquitto", "listener {port} 127.0.0.1\nallow_anonymous true\n"
                                                  "persistence false\nmax_queued_messages 10000\n").start()
    repo = ReleaseRepository(work / "repo")
    repo.init(root_passphrase="benchmark passphrase")
    # 1.0.0 and 1.1.0 as before deltas (no companion); 1.2.0 with them, the operator's way
    for version in MODEL_VERSIONS:
        doc = publish_cli(repo, work / "bundles" / f"{MODEL}-{version}.bundle", 2 if version == MODEL_VERSIONS[2] else 0)
        print(f"published {MODEL} {version}: {len(doc['companions'])} companions, skipped "
              f"{[s['kind'] + ': ' + s['reason'] for s in doc['skipped']]}", flush=True)
    published = [repo.target_info(MODEL, v) for v in MODEL_VERSIONS]
    companions = companion_fetches(repo, MODEL_VERSIONS[2])
    if {f.kind for f in companions} != {"delta", "compressed"} or companion_fetches(repo, MODEL_VERSIONS[1]):
        raise RuntimeError(f"unexpected companions: {companions}")
    results.update(bundle_bytes=published[2].length,
                   companions={(f"delta from {f.base_version}" if f.kind == "delta" else f.kind): f.length
                               for f in companions})
    db = f"sqlite:///{work / 'fleet.db'}"
    store = FleetStore(db)
    sim = Simulator("127.0.0.1", broker.port, repo.director_public_key_path, n)
    sim.initial_active = {"name": MODEL, "version": MODEL_VERSIONS[0]}
    sim.initial_sha256 = published[0].sha256
    sim.bundle_files = {t.sha256: t.file for t in published}
    sim.companions = {MODEL_VERSIONS[2]: companions}
    sim.scratch = work / "scratch"
    sim.scratch.mkdir()
    # spawned workers: a forked child would inherit the simulator's thousand sockets and its threads
    sim.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    controller, log = None, None
    try:
        for _ in range(workers):
            sim.pool.submit(time.sleep, 0.2).result(60)  # start the workers before any timing
        controller, metrics_port, log = _launch_controller(work, broker.url, repo.path, db)
        proc = psutil.Process(controller.pid)
        _connect_fleet(sim, store, n)
        results["full"] = _delta_phase(sim, MODEL_VERSIONS[1], db, store, metrics_port, proc)
        for index, device in enumerate(sim.devices):
            if index % NO_BASE_EVERY == 0:
                device.active_sha256 = None
        results["delta"] = _delta_phase(sim, MODEL_VERSIONS[2], db, store, metrics_port, proc)
        results.update(mismatches=sim.mismatches, sim_errors=sim.errors, retries=sim.retries,
                       rate_limited=sim.rate_limited)
    finally:
        _shut_down(sim, controller, log)
        store.close()
        broker.stop()
    results["load_end"] = os.getloadavg()
    return results


def _mb(count: float) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"


def _delta_reading(r: dict[str, Any]) -> str:
    """What the table says, in figures computed from it."""
    delta = r["delta"]
    kinds = delta["transfers"]["by_kind"]
    per_delta = kinds["delta"]["bytes"] / max(1, kinds["delta"]["updates"])
    full = r["bundle_bytes"]
    share = kinds["compressed"]["bytes"] / max(1, delta["transfers"]["bytes"])
    slower = delta["rollout_s"] > r["full"]["rollout_s"]
    return (f"Reading: a device that holds its base receives {per_delta / 1e3:.1f} kB instead of {full / 1e6:.2f} MB "
            f"({per_delta / full:.1%} of the bundle); the {kinds['compressed']['devices']} devices without a base "
            f"({kinds['compressed']['devices'] / max(1, delta['transfers']['devices']):.0%} of the fleet) move "
            f"{share:.0%} of the rollout's bytes, so keeping the base on the device is what the saving rests on. "
            + ("The block server's count and the devices' reports agree to the byte (no block was sent twice). "
               if sum(delta["served"][k] for k in ("delta", "compressed", "full")) == delta["transfers"]["bytes"]
               else "The block server sent more than the devices report receiving: blocks sent twice. ")
            + ("The rollout with deltas took longer to complete here although the controller worked less: its time "
               "went to the simulated devices rebuilding bundles in worker processes on the same two cores as the "
               "controller and the broker (the simulator's CPU column), a cost each real device pays on its own CPU "
               "(docs/benchmarks.md, section deltas: the apply's time per model). "
               if slower else "")
            + "The controller's CPU follows the bytes it serves.")


def render_deltas(r: dict[str, Any], command: str) -> str:
    full, delta = r["full"], r["delta"]
    served = {name: sum(p["served"][k] for k in ("delta", "compressed", "full")) for name, p in (("full", full),
                                                                                                ("delta", delta))}
    lines = [
        f"## fleet-sim, deltas: a {r['devices']:,}-device rollout of a retrained head, delta against full",
        "",
        f"Run: `{command}` on {platform.machine()}, {os.cpu_count()} cores (shared with other work: load average "
        f"{r['load_start'][0]:.2f} at the start, {r['load_end'][0]:.2f} at the end), Python "
        f"{platform.python_version()}, Mosquitto, SQLite (WAL), the controller its own process. The model: "
        f"MobileNetV2 96 px, alpha 0.35, fp32 (a {_mb(r['bundle_bytes'])} bundle), three versions, each after "
        "retraining only its head. One run, two staged rollouts (5, 25, 100 %) to the same devices: first "
        "1.1.0 published without companions (every device fetches the full bundle, as before deltas), then 1.2.0 "
        "published by `edgeship publish --deltas 2` with its companions, signed as TUF targets ("
        + ", ".join(f"{kind} {_mb(length)}" for kind, length in sorted(r["companions"].items()))
        + f"); {100 // NO_BASE_EVERY}% of the devices start that second rollout without a base and take the "
        "compressed bundle.",
        "",
        "| measured | without deltas (1.0.0 -> 1.1.0) | with deltas (1.1.0 -> 1.2.0) | with / without |",
        "| --- | --- | --- | --- |",
        f"| rollout | {full['state']} in {full['rollout_s']:.1f} s | {delta['state']} in {delta['rollout_s']:.1f} s | "
        f"{delta['rollout_s'] / full['rollout_s']:.2f} |",
        f"| bundle bytes the controller's block server sent (`edgeship_controller_block_bytes_sent_total`) | "
        f"{_mb(served['full'])} | {_mb(served['delta'])} (delta {_mb(delta['served']['delta'])}, compressed "
        f"{_mb(delta['served']['compressed'])}, full {_mb(delta['served']['full'])}) | "
        f"**{served['delta'] / max(1, served['full']):.4f}** |",
        f"| bytes the devices reported (`rollout status --json` transfers) | {_mb(full['transfers']['bytes'])} | "
        f"{_mb(delta['transfers']['bytes'])} | {delta['transfers']['bytes'] / max(1, full['transfers']['bytes']):.4f} |",
        f"| ... the same from `/metrics` (`edgeship_fleet_transfer_bytes_total`) | "
        f"{_mb(sum(full['reported_metrics'].values()))} | {_mb(sum(delta['reported_metrics'].values()))} | |",
        f"| devices by transfer kind (delta / compressed / full) | {full['kinds'].get('delta', 0)} / "
        f"{full['kinds'].get('compressed', 0)} / {full['kinds'].get('full', 0)} | {delta['kinds'].get('delta', 0)} / "
        f"{delta['kinds'].get('compressed', 0)} / {delta['kinds'].get('full', 0)} | |",
        f"| bytes saved (sum of full bundles - bytes sent) | {_mb(full['transfers']['bytes_saved'])} | "
        f"{_mb(delta['transfers']['bytes_saved'])} | |",
        f"| controller CPU during the rollout | {full['controller_cpu_s']:.1f} s | {delta['controller_cpu_s']:.1f} s | "
        f"{delta['controller_cpu_s'] / max(0.01, full['controller_cpu_s']):.2f} |",
        f"| simulator CPU (event loop and {r['workers']} rebuild worker processes) | {full['sim_cpu_s']:.1f} s | "
        f"{delta['sim_cpu_s']:.1f} s | |",
        f"| bundles rebuilt on the devices' side (real `apply_delta` / capped zstd, in {r['workers']} worker "
        f"processes), mean / max | - | {delta['rebuilds']}: {delta['rebuild_mean_s'] * 1000:.0f} / "
        f"{delta['rebuild_max_s'] * 1000:.0f} ms | |",
        f"| deltas that failed and fell back | {full['fallbacks']} | {delta['fallbacks']} | |",
        f"| over the whole run: sha256 mismatches / block re-requests / 429s / device-side errors | "
        f"{r['mismatches']} / {r['retries']} / {r['rate_limited']} / {r['sim_errors']} | | |",
        "",
        _delta_reading(r),
        "",
        "Each simulated device fetches what the agent would (docs/deltas.md): the delta named by its active "
        "bundle's sha256 when one is published, else the compressed bundle, else the full one, over the block "
        "protocol; checks the fetched file's length and sha256, rebuilds the bundle in a worker process (so a "
        "thousand applies do not stall the event loop that carries every device's MQTT connection), checks "
        "the result against the director's signed sha256, and reports COMMITTED with its transfer record. "
        "The devices keep their active bundle's hash in memory and share one copy of each bundle file (the "
        "agent checks the hash of its own file). Bytes served include the "
        "TUF metadata kind at 0: the simulated devices do not run the TUF client.",
    ]
    return "\n".join(lines)


def render(r: dict[str, Any], command: str) -> str:
    mb = r["bundle_bytes"] / 1e6
    moved = r["block_bytes_sent"] or r["bytes_received"]
    rollout_mbps = moved / 1e6 / r["rollout_s"]
    base_mbps = moved / 1e6 / r["baseline_s"]
    lines = [
        "## fleet-sim: simulated devices against the real controller",
        "",
        f"Run: `{command}` on {platform.machine()}, {os.cpu_count()} cores (shared), Python "
        f"{platform.python_version()}, Mosquitto, SQLite (WAL). Each simulated device has its own MQTT "
        "connection and client id; the controller is its own process (`edgeship controller`).",
        "",
        "| measured | value |",
        "| --- | --- |",
        f"| devices (one MQTT connection each) | {r['devices']} |",
        f"| connect all | {r['connect_s']:.1f} s; every device in the store after {r['known_s']:.1f} s |",
        f"| staged rollout 5,25,100 % of a {mb:.2f} MB bundle | {r['rollout_state']} in {r['rollout_s']:.1f} s "
        f"(stages started at {', '.join(f'{s:.1f}' for s in r['stage_s'])} s) |",
        f"| bundle bytes served by the controller's block server | {moved / 1e6:.0f} MB in {r['blocks_sent']:.0f} "
        f"blocks = {rollout_mbps:.1f} MB/s over the whole rollout |",
        f"| baseline: bare paho publish loop, same bytes, same broker, 64 KiB QoS 1 | {r['baseline_s']:.1f} s = "
        f"{base_mbps:.1f} MB/s (rollout / baseline throughput: {rollout_mbps / base_mbps:.2f}) |",
        f"| controller CPU during the rollout | {r['rollout_cpu_s']:.1f} s ({r['rollout_cpu_s'] / r['rollout_s']:.0%} "
        f"of one core); the simulator's {r['sim_cpu_s']:.1f} s |",
        f"| desired states signed and published | {r['desired_published']:.0f} |",
        f"| block re-requests (timeouts) / 429 rate limits / bundles that failed the sha256 check | "
        f"{r['retries']} / {r['rate_limited']} / {r['mismatches']} (device-side errors: {r['sim_errors']}) |",
    ]
    for t in r["telemetry"]:
        lines += [
            f"| telemetry at {t['hz']:g} message/s per device: offered | {t['sent']} messages in {t['send_s']:.1f} s = "
            f"{t['offered_rate']:.0f}/s |",
            f"| ... ingested by the controller (rows in the store) | {t['ingested']} ({t['dropped']:.0f} dropped), the "
            f"last one written {t['drained_s']:.1f} s after the first was sent = **{t['rate']:.0f} messages/s** |",
            f"| ... baseline: what a bare paho subscriber received of it | {t['delivered_baseline']} "
            f"(controller / baseline: {t['ingested'] / max(1, t['delivered_baseline']):.3f}) |",
            f"| ... ingest lag (age of a batch's oldest message when written), sampled each second | median "
            f"{t['lag_median_s']:.2f} s, max {t['lag_max_s']:.2f} s; queue at most {t['queue_max']:.0f}; longest "
            f"reconcile tick {t['tick_max_s']:.2f} s |",
            f"| ... controller CPU | {t['cpu_s']:.1f} s over {t['drained_s']:.1f} s "
            f"({t['cpu_s'] / t['drained_s']:.0%} of one core) |",
        ]
    lines += [
        "",
        "The simulated devices verify each desired state (ed25519) and the bundle's length and sha256 but do not "
        "run the TUF client; the simulator, the broker and the controller share this machine's cores with "
        "each other (and with other work), so the figures are a floor, not a ceiling.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--bundle-mb", type=float, default=1.0)
    parser.add_argument("--telemetry-s", type=int, default=20)
    parser.add_argument("--telemetry-hz", default="1,3",
                        help="Telemetry rates per device to measure (messages/s), comma-separated.")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--json", action="store_true", help="Print the raw results as JSON too.")
    parser.add_argument("--multi-model", action="store_true",
                        help="Devices speak as multi-model agents: report `models`, get desired-state schema 2.")
    parser.add_argument("--deltas", action="store_true",
                        help="The delta mode: a real model's bundles, rolled out without and then with deltas "
                             "(section fleet-sim-deltas).")
    parser.add_argument("--workers", type=int, default=2,
                        help="Worker processes rebuilding bundles from deltas (--deltas).")
    parser.add_argument("--make-model-bundles", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_model_bundles:
        make_model_bundles(args.make_model_bundles)
        return
    work = Path(tempfile.mkdtemp(prefix="edgeship-fleet-sim-"))
    if args.deltas:
        try:
            results = run_deltas(args.devices, work, args.workers)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        text = render_deltas(results, f".venv/bin/python benchmarks/fleet_sim.py --deltas --devices {args.devices}"
                                      f" --workers {args.workers}")
        print(text)
        if args.json:
            print(json.dumps(results, indent=2, default=str))
        if not args.no_write:
            from results_doc import write_section

            write_section("fleet-sim-deltas", text)
        return
    try:
        rates = [float(x) for x in args.telemetry_hz.split(",") if x.strip()]
        results = run(args.devices, args.bundle_mb, args.telemetry_s, rates, work, multi_model=args.multi_model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = (f".venv/bin/python benchmarks/fleet_sim.py --devices {args.devices} --bundle-mb {args.bundle_mb:g} "
               f"--telemetry-s {args.telemetry_s} --telemetry-hz {args.telemetry_hz}"
               + (" --multi-model" if args.multi_model else ""))
    text = render(results, command)
    print(text)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    if not args.no_write:
        from results_doc import write_section

        write_section("fleet-sim", text)


if __name__ == "__main__":
    main()
