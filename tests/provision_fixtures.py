"""Real parts for the provisioning tests: an sshd on a free loopback port with a
throwaway host key, a "device" (a dedicated unprivileged user made with
useradd, else root with its own folder), and an offline wheelhouse.

The wheelhouse: devices in the tests have no package index, and this machine
has no network. ``pip wheel --no-deps`` builds edgeship itself; its dependencies
(the closure of ``edgeship[RUNTIME]``) are repacked, file for file, from the
distributions installed in this virtual environment into real wheels (their
own dist-info, a fresh RECORD), so the device runs a genuine offline
``pip install --no-index --find-links``. Built once per test session.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from mqtt_broker import free_port
from packaging.markers import default_environment
from packaging.requirements import Requirement

__all__ = ["Sshd", "DeviceAccount", "make_device_account", "make_user_key", "build_offline_wheelhouse", "sshd_binary",
           "repack_installed", "world_readable_tempdir"]


def sshd_binary() -> str | None:
    return "/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else shutil.which("sshd")


@dataclass
class DeviceAccount:
    user: str
    home: Path
    created: bool  # made by useradd (removed at the end)

    def remove(self) -> None:
        if self.created:
            subprocess.run(["userdel", "-r", "-f", self.user], capture_output=True)


def make_device_account(base: Path) -> DeviceAccount:
    """A dedicated unprivileged user with its home under ``base`` (root only), else the current user."""
    if os.geteuid() == 0 and shutil.which("useradd"):
        name = f"esdev{os.getpid() % 100000}{int(time.time() * 1000) % 1000}"
        home = base / name
        proc = subprocess.run(["useradd", "-m", "-d", str(home), "-s", "/bin/sh", "-p", "*", name],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return DeviceAccount(name, home, True)
    user = pwd.getpwuid(os.geteuid()).pw_name
    home = base / "device-home"
    home.mkdir(parents=True, exist_ok=True)
    return DeviceAccount(user, home, False)


class Sshd:
    """A real OpenSSH server on 127.0.0.1:port, key authentication only."""

    def __init__(self, root: Path, authorized_keys: str) -> None:
        self.root = root
        self.port = free_port()
        self.host_key = root / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)], check=True)
        (root / "authorized_keys").write_text(authorized_keys)
        os.chmod(root / "authorized_keys", 0o644)
        self.config = root / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp",
            "MaxStartups 64",
            "MaxSessions 64",
            "LogLevel VERBOSE",
            "",
        ]))
        self.log = root / "sshd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Sshd:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation folder
        binary = sshd_binary()
        assert binary
        log = open(self.log, "ab")
        self.process = subprocess.Popen([binary, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def make_user_key(folder: Path) -> tuple[Path, str]:
    key = folder / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key, (folder / "id_ed25519.pub").read_text()


# -- the offline wheelhouse -----------------------------------------------------------------------

def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirement: str) -> list[metadata.Distribution]:
    """The installed distributions ``requirement`` needs, recursively (markers evaluated here)."""
    env = default_environment()
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(requirement)]
    while todo:
        req = todo.pop()
        key = (_canonical(req.name), frozenset(req.extras))
        if key in done:
            continue
        done.add(key)
        dist = metadata.distribution(req.name)
        found[key[0]] = dist
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in (req.extras or {""})):
                todo.append(sub)
    return [d for k, d in sorted(found.items())]


def _tag(dist: metadata.Distribution) -> str:
    text = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]
    if not tags:
        return "py3-none-any"
    parts = [t.split("-") for t in tags]

    def join(i: int) -> str:
        seen: list[str] = []
        for p in parts:
            if p[i] not in seen:
                seen.append(p[i])
        return ".".join(seen)

    return f"{join(0)}-{join(1)}-{join(2)}"


def repack_installed(dist: metadata.Distribution, out: Path) -> Path:
    """A wheel of an installed distribution: its files under site-packages, dist-info included."""
    name = dist.metadata["Name"]
    wheel_name = f"{re.sub(r'[-_.]+', '_', name)}-{dist.version}-{_tag(dist)}.whl"
    path = out / wheel_name
    records: list[tuple[str, str, str]] = []
    dist_info = None
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for f in dist.files or []:
            rel = str(f).replace(os.sep, "/")
            if rel.startswith("..") or "__pycache__" in rel or rel.endswith(".pyc"):
                continue
            parts = rel.split("/")
            if parts[0].endswith(".dist-info"):
                dist_info = parts[0]
                if parts[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                    continue
            src = Path(str(dist.locate_file(f)))
            if not src.is_file():
                continue
            data = src.read_bytes()
            z.writestr(rel, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append((rel, f"sha256={digest}", str(len(data))))
        assert dist_info, f"{name} has no dist-info in its file list"
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerows(records)
        w.writerow((f"{dist_info}/RECORD", "", ""))
        z.writestr(f"{dist_info}/RECORD", buf.getvalue())
    return path


def build_offline_wheelhouse(out: Path, runtime: str = "onnx") -> Path:
    """edgeship's wheel (pip wheel --no-deps) plus repacked wheels of every dependency of edgeship[runtime]."""
    from edgeship.toolkit.provisioning import build_project_wheel

    out.mkdir(parents=True, exist_ok=True)
    build_project_wheel(out)
    for dist in _closure(f"edgeship[{runtime}]"):
        if _canonical(dist.metadata["Name"]) == "edgeship":
            continue
        repack_installed(dist, out)
    return out


def world_readable_tempdir(prefix: str) -> Path:
    """A temp folder other accounts can traverse (pytest's are 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d
