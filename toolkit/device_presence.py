"""Is a device online: its retained ``status`` topic, watched over MQTT.

Provisioning waits here for a device it just started. The connection uses the broker folder's
provisioner identity (a controller's rights, its own client id), never the controller's: that
would take the running controller's session away. One connection per broker folder and process
is shared by every device a run waits for (``fleet provision`` waits for several at once).
"""

from __future__ import annotations

__all__ = ["wait_online"]

import os
import threading
import time
from pathlib import Path
from typing import Any

from edgeship.ota.topics import STATUS, device_topic
from edgeship.toolkit.provisioning.hosts import ProvisionError


class _StatusWatcher:
    """One MQTT connection per broker folder and process: the broker names each client by its
    identity, so two connections with the provisioner's identity would take turns."""

    _lock = threading.Lock()
    _open: dict[str, tuple[Any, int]] = {}

    @classmethod
    def acquire(cls, folder: Any) -> Any:
        from edgeship.ota.transport import MqttConnection, parse_broker_url

        key = str(Path(folder.path).resolve())
        with cls._lock:
            if key in cls._open:
                conn, users = cls._open[key]
                cls._open[key] = (conn, users + 1)
                return conn
            creds = folder.provisioner_credentials()
            url = parse_broker_url(
                creds["url"], username=creds.get("username") if "password" in creds else None,
                password=Path(creds["password"]).read_text().strip() if "password" in creds else None,
                ca_file=creds.get("ca"), cert_file=creds.get("cert"), key_file=creds.get("key"))
            conn = MqttConnection(url, client_id=f"{creds['identity']}-{os.getpid()}"[:128])
            conn.connect(timeout=15.0)
            cls._open[key] = (conn, 1)
            return conn

    @classmethod
    def release(cls, folder: Any) -> None:
        key = str(Path(folder.path).resolve())
        with cls._lock:
            conn, users = cls._open[key]
            if users > 1:
                cls._open[key] = (conn, users - 1)
                return
            del cls._open[key]
        conn.close()


def wait_online(folder: Any, fleet: str, device_id: str, timeout: float) -> float:
    """Subscribe to the device's status topic until it says ``online``; seconds waited."""
    from edgeship.ota.protocol import ProtocolError, parse_message

    online = threading.Event()

    def handler(message: Any) -> None:
        try:
            if getattr(parse_message(STATUS, message.payload), "state", None) == "online":
                online.set()
        except ProtocolError:
            pass

    start = time.monotonic()
    topic = device_topic(fleet, device_id, STATUS, folder.settings().prefix)
    mqtt = _StatusWatcher.acquire(folder)
    try:
        mqtt.subscribe(topic, handler)
        try:
            if not online.wait(max(0.0, timeout - (time.monotonic() - start))):
                raise ProvisionError(f"device {device_id} did not report online on {topic} within {timeout:.1f} s; "
                                     "see the agent's log on the device")
        finally:
            mqtt.unsubscribe(topic)
    finally:
        _StatusWatcher.release(folder)
    return time.monotonic() - start
