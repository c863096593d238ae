"""Test helpers for the broker's rules: a real Mosquitto started from a broker
folder made by ``BrokerFolder``, and small paho-mqtt clients that say exactly
whether they got in and what they received."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from mqtt_broker import MosquittoBroker, free_port

from edgeship.toolkit.broker_config import BrokerSettings
from edgeship.toolkit.identities import BrokerFolder

__all__ = ["Client", "connect", "start_broker", "BrokerUnderTest", "creds"]


@dataclass
class Client:
    """A connected paho client that queues every message it receives."""

    mqttc: mqtt.Client
    messages: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    disconnected: threading.Event = field(default_factory=threading.Event)
    subscribed: queue.Queue[list[Any]] = field(default_factory=queue.Queue)
    published: queue.Queue[tuple[int, Any]] = field(default_factory=queue.Queue)

    def subscribe(self, topic: str, qos: int = 1) -> list[Any]:
        """Subscribe and wait for the SUBACK; returns its reason codes."""
        self.mqttc.subscribe(topic, qos)
        return self.subscribed.get(timeout=5)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.mqttc.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(timeout=5)

    def wait_for(self, topic: str, timeout: float = 5.0) -> bytes | None:
        """Wait for a message on ``topic`` (other messages stay recorded in ``seen``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                t, payload = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append((t, payload))
            if t == topic:
                return payload
        return None

    def wait_for_payload(self, topic: str, payload: bytes, timeout: float = 5.0) -> bool:
        """Wait until ``payload`` arrives on ``topic``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.wait_for(topic, timeout=deadline - time.monotonic()) == payload:
                return True
        return False

    @property
    def seen(self) -> list[tuple[str, bytes]]:
        if not hasattr(self, "_seen"):
            self._seen: list[tuple[str, bytes]] = []
        return self._seen

    def drain(self, wait: float = 0.3) -> list[tuple[str, bytes]]:
        time.sleep(wait)
        while True:
            try:
                self.seen.append(self.messages.get_nowait())
            except queue.Empty:
                return self.seen

    def close(self) -> None:
        try:
            self.mqttc.disconnect()
        finally:
            self.mqttc.loop_stop()


def connect(port: int, *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
            username: str | None = None, password: str | None = None, tls: bool = True,
            protocol: int = mqtt.MQTTv311, timeout: float = 5.0,
            client_id: str | None = None) -> tuple[Client | None, str]:
    """Connect; returns (client, "ok") or (None, why it was refused)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:10]}",
                    protocol=protocol)
    client = Client(c)
    result: queue.Queue[str] = queue.Queue()

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        result.put("ok" if not rc.is_failure else f"refused: {rc}")

    def on_disconnect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        client.disconnected.set()
        result.put(f"disconnected: {rc}")

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    c.on_message = lambda _c, _u, m: client.messages.put((m.topic, m.payload))
    c.on_subscribe = lambda _c, _u, _mid, rcs, _p=None: client.subscribed.put(list(rcs))
    c.on_publish = lambda _c, _u, mid, rc, _p=None: client.published.put((mid, rc))
    if tls:
        c.tls_set(ca_certs=str(ca) if ca else None, certfile=str(cert) if cert else None,
                  keyfile=str(key) if key else None, cert_reqs=ssl.CERT_REQUIRED)
    if username is not None:
        c.username_pw_set(username, password)
    try:
        c.connect("127.0.0.1", port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        return None, f"connect failed: {exc}"
    c.loop_start()
    try:
        outcome = result.get(timeout=timeout)
    except queue.Empty:
        outcome = "no CONNACK"
    if outcome != "ok":
        c.loop_stop()
        try:
            c.disconnect()
        except Exception:  # noqa: BLE001, S110 - already gone
            pass
        return None, outcome
    return client, outcome


def creds(folder: Path) -> dict[str, Any]:
    """connection.json of a credentials folder, with absolute paths."""
    data = json.loads((folder / "connection.json").read_text())
    for k in ("ca", "cert", "key", "password"):
        if k in data:
            data[k] = folder / data[k]
    return data


@dataclass
class BrokerUnderTest:
    folder: BrokerFolder
    broker: MosquittoBroker
    settings: BrokerSettings
    root: Path

    def device(self, device_id: str, fleet: str = "f1", auth: str | None = None) -> dict[str, Any]:
        out = self.root / "creds" / device_id
        self.folder.issue_device(device_id, fleet, out, auth=auth)
        return creds(out)

    def connect_as(self, c: dict[str, Any], **kw: Any) -> tuple[Client | None, str]:
        if "cert" in c:
            return connect(self.settings.cert_port or 0, ca=c["ca"], cert=c["cert"], key=c["key"], **kw)
        password = Path(c["password"]).read_text().strip()
        return connect(self.settings.pass_port or 0, ca=c["ca"], username=c["username"], password=password, **kw)

    def controller(self) -> dict[str, Any]:
        return creds(self.folder.controller_dir)

    def stop(self) -> None:
        """Stop Mosquitto and remove a temp folder made for it."""
        self.broker.stop()
        if self.root.name.startswith("edgeship-broker-") and self.root.parent == Path(tempfile.gettempdir()):
            shutil.rmtree(self.root, ignore_errors=True)


def start_broker(root: Path, auth: str = "both") -> BrokerUnderTest:
    """A broker folder with fresh ports, and a real Mosquitto running its generated config.

    As root, Mosquitto drops to the ``mosquitto`` account as it would in
    production; pytest's tmp folders are 0700, so the broker folder then lives
    in a world-traversable temp folder (removed by ``stop_broker``).
    """
    run_as = "mosquitto" if _has_user("mosquitto") else ""
    if run_as:
        home = Path(tempfile.mkdtemp(prefix="edgeship-broker-"))
        os.chmod(home, 0o755)
        root = home
    settings = BrokerSettings(port=free_port(), password_port=free_port(), auth=auth, run_as=run_as)
    folder = BrokerFolder(root / "broker")
    folder.create_or_update(settings)
    broker = MosquittoBroker(root / "mosquitto-run", config=folder.conf_path.read_text(),
                             port=settings.cert_port or settings.pass_port)
    broker.start()
    # the pid file is how `device revoke` finds the broker to reload it
    deadline = time.monotonic() + 5
    while folder.running_broker_pid() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return BrokerUnderTest(folder, broker, settings, root)


def stop_gracefully(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM a broker process and wait (SIGKILL after ``timeout`` s); its exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def _has_user(name: str) -> bool:
    import pwd

    if os.geteuid() != 0:
        return False
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
