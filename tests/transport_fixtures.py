"""Helpers for the transport and block-transfer tests: collecting handlers,
waiting on conditions, and small child processes that speak MQTT."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from edgeship.ota.transport import ReceivedMessage

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


class Collector:
    """A message handler that keeps what it received (thread-safe)."""

    def __init__(self) -> None:
        self.messages: list[ReceivedMessage] = []
        self._lock = threading.Lock()

    def __call__(self, message: ReceivedMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [m.payload for m in self.messages]

    def wait_for(self, predicate: Callable[[list[ReceivedMessage]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(list(self.messages)):
                    return True
            time.sleep(0.02)
        return False


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def python_child(code: str, *args: str) -> subprocess.Popen[str]:
    """Run ``code`` in a fresh interpreter (the venv's), stdout piped, line-buffered text."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [PYTHON, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=str(REPO),
    )


def read_line_with(process: subprocess.Popen[str], marker: str, timeout: float = 20.0) -> str:
    """Read the child's stdout until a line containing ``marker`` (or fail with its stderr)."""
    assert process.stdout is not None
    result: list[str] = []

    def reader() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if marker in line:
                result.append(line)
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        process.kill()
        _, err = process.communicate(timeout=5)
        raise AssertionError(f"child never printed {marker!r}; stderr:\n{err[-3000:]}")
    return result[0]


def make_pki(folder: Path) -> dict:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (PEM files)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def issue(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
              ca: bool, san: bool = False) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = issue("test CA", ca_key, ca_name, ca_key, ca=True)
    files = {}
    for name, san in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(name, key, ca_name, ca_key, ca=False, san=san)
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(key_pem(key))
        files[name] = str(folder / f"{name}.pem")
        files[f"{name}_key"] = str(folder / f"{name}.key")
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["ca"] = str(folder / "ca.pem")
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = issue("other CA", other_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")]),
                  other_key, ca=True)
    (folder / "other-ca.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    files["other_ca"] = str(folder / "other-ca.pem")
    return files
