"""A real Mosquitto broker for tests: started on a free loopback port with a
config the test chooses, stopped (or restarted mid-test) on demand."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["MosquittoBroker", "free_port", "mosquitto_binary"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


class MosquittoBroker:
    """One mosquitto process.

    ``config`` is the body of the configuration file; the default is one
    anonymous plain listener on ``127.0.0.1:port`` (MQTT 3.1.1 and 5). A custom
    config may use ``{port}`` and ``{folder}`` placeholders.
    """

    def __init__(self, folder: Path, config: str | None = None, port: int | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
        self.binary = binary
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        template = config if config is not None else (
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        )
        self.config_path = self.folder / "mosquitto.conf"
        self.config_path.write_text(template.format(port=self.port, folder=self.folder))
        self.log_path = self.folder / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the broker, stay down ``down_for`` seconds, start it on the same port."""
        self.stop()
        time.sleep(down_for)
        self.start()
