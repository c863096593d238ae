"""The agent's configuration: a TOML file, read and validated into AgentConfig.

Every error names the file, the key and what is expected. ``render_config``
writes a complete, commented file (``edgeship-agent init``).
"""

from __future__ import annotations

__all__ = ["DEFAULT_CONFIG_PATH", "AgentConfig", "BrokerCredentials", "check_trust_anchors", "load_config",
           "parse_bind", "parse_config", "read_credentials", "render_config"]

import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeship.ota.errors import BadInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10 devices
    import tomli as tomllib

DEFAULT_CONFIG_PATH = "/etc/edgeship/agent.toml"
_TFLITE_NAMES = ("litert", "tflite_runtime", "tensorflow")


@dataclass(frozen=True)
class AgentConfig:
    """Validated settings (see device-agent/agent.example.toml for each one's meaning)."""

    device_id: str
    fleet: str
    data_dir: Path
    root_metadata: Path
    director_key: Path
    runtime_prefer: tuple[str, ...] = _TFLITE_NAMES
    threads: int = 1
    bind_host: str = "127.0.0.1"
    bind_port: int = 8501
    probation_window_s: float = 60.0
    probation_min_requests: int = 0
    max_error_rate: float = 0.05
    max_nonfinite_rate: float = 0.0
    max_latency_ratio: float = 2.0
    max_reentries: int = 3
    self_test_latency_ratio: float = 0.0
    self_test_runs: int = 20
    keep_previous: int = 2
    memory_budget_mb: float = 0.0
    """[models] memory_budget_mb: what every loaded model may take together (0: no budget)."""
    broker_url: str = ""
    telemetry_interval_s: float = 60.0
    # [server]: who may call the API beyond loopback (docs/security.md)
    api_token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    trusted_network: bool = False
    grpc_port: int | None = None
    """The gRPC front ends' port on the bind host (None: no gRPC; needs edgeship[grpc])."""
    # [limits]: what one client may make the agent hold (docs/agent.md)
    max_body_bytes: int = 16 << 20
    max_batch: int = 1024
    max_tensor_bytes: int = 32 << 20
    max_connections: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    source: Path | None = field(default=None, compare=False)

    @property
    def state_file(self) -> Path:
        return self.data_dir / "state.json"

    @property
    def slots_dir(self) -> Path:
        return self.data_dir / "slots"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"

    @property
    def control_socket(self) -> Path:
        return self.data_dir / "agent.sock"

    @property
    def lock_file(self) -> Path:
        return self.data_dir / "agent.lock"


def parse_bind(text: str, where: str = "bind") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), with a clear error."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise BadInputError(f"{where}: '{text}' is not HOST:PORT (e.g. 127.0.0.1:8501)")
    return host, int(port)


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate an agent config file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise BadInputError(
            f"config {p} does not exist; write one with `edgeship-agent init ... -o {p}` or pass --config"
        ) from None
    except OSError as exc:
        raise BadInputError(f"config {p} cannot be read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"config {p} is not valid TOML: {exc}") from None
    return parse_config(data, source=p)


class _Reader:
    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self.data, self.where = data, where

    def table(self, name: str) -> Mapping[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise BadInputError(f"{self.where}: [{name}] must be a table")
        return value

    def get(self, table: str, key: str, kind: type, default: Any = None, *, required: bool = False) -> Any:
        section = self.table(table)
        if key not in section:
            if required:
                raise BadInputError(f"{self.where}: [{table}] {key} is missing")
            return default
        value = section[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise BadInputError(
                f"{self.where}: [{table}] {key} = {value!r} must be a {kind.__name__}"
            )
        return value


def _positive(where: str, name: str, value: float, *, allow_zero: bool = True) -> None:
    if not math.isfinite(value):  # nan compares false with every threshold; inf never ends a window
        raise BadInputError(f"{where}: {name} = {value} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise BadInputError(f"{where}: {name} = {value} must be {'>= 0' if allow_zero else '> 0'}")


_KNOWN_KEYS: dict[str, frozenset[str] | None] = {
    "device": frozenset({"id", "fleet"}),
    "paths": frozenset({"data"}),
    "trust": frozenset({"root", "director_key"}),
    "runtime": frozenset({"prefer", "threads"}),
    "server": frozenset({"bind", "token_file", "tls_cert", "tls_key", "tls_client_ca", "trusted_network", "grpc_port"}),
    "limits": frozenset(
        {
            "max_body_bytes",
            "max_batch",
            "max_tensor_bytes",
            "max_connections",
            "header_timeout_s",
            "body_timeout_s",
            "idle_timeout_s",
        }
    ),
    "self_test": frozenset({"latency_runs", "max_latency_ratio"}),
    "probation": frozenset(
        {"window_s", "min_requests", "max_error_rate", "max_nonfinite_rate", "max_latency_ratio", "max_restarts"}
    ),
    "retention": frozenset({"keep_previous"}),
    "models": frozenset({"memory_budget_mb"}),
    "telemetry": frozenset({"interval_s"}),
    "broker": None,  # url here; the fleet link's own keys are validated by fleet_link.load_link_settings
}


def _check_known(data: Mapping[str, Any], where: str) -> None:
    """A misspelt table or key must not silently leave a default in force."""
    for table, values in data.items():
        if table not in _KNOWN_KEYS:
            raise BadInputError(f"{where}: [{table}] is not a known table (known: {', '.join(_KNOWN_KEYS)})")
        known = _KNOWN_KEYS[table]
        if known is None or not isinstance(values, dict):
            continue
        for key in values:
            if key not in known:
                raise BadInputError(
                    f"{where}: [{table}] {key} is not a known key (known: {', '.join(sorted(known))})"
                )


def parse_config(data: Mapping[str, Any], *, source: Path | None = None) -> AgentConfig:
    """Validate a parsed TOML document (pure; used by load_config and tests)."""
    where = f"config {source}" if source else "config"
    _check_known(data, where)
    r = _Reader(data, where)
    base = source.parent if source else Path.cwd()

    def path(table: str, key: str) -> Path:
        p = Path(r.get(table, key, str, required=True)).expanduser()
        return p if p.is_absolute() else (base / p)

    def optional_path(table: str, key: str) -> Path | None:
        return path(table, key) if r.get(table, key, str, "") else None

    device_id = r.get("device", "id", str, required=True)
    fleet = r.get("device", "fleet", str, required=True)
    for name, value in (("[device] id", device_id), ("[device] fleet", fleet)):
        if not value or any(c in value for c in "/#+ \t\n"):
            raise BadInputError(f"{where}: {name} = {value!r} must be non-empty without '/', '#', '+' or spaces")
    prefer = r.get("runtime", "prefer", list, list(_TFLITE_NAMES))
    unknown = [x for x in prefer if x not in _TFLITE_NAMES]
    if unknown or not prefer:
        raise BadInputError(f"{where}: [runtime] prefer = {prefer!r}: choose from {list(_TFLITE_NAMES)}")
    threads = r.get("runtime", "threads", int, 1)
    _positive(where, "[runtime] threads", threads, allow_zero=False)
    host, port = parse_bind(r.get("server", "bind", str, "127.0.0.1:8501"), f"{where}: [server] bind")
    cfg = AgentConfig(
        device_id=device_id,
        fleet=fleet,
        data_dir=path("paths", "data"),
        root_metadata=path("trust", "root"),
        director_key=path("trust", "director_key"),
        runtime_prefer=tuple(prefer),
        threads=threads,
        bind_host=host,
        bind_port=port,
        probation_window_s=r.get("probation", "window_s", float, 60.0),
        probation_min_requests=r.get("probation", "min_requests", int, 0),
        max_error_rate=r.get("probation", "max_error_rate", float, 0.05),
        max_nonfinite_rate=r.get("probation", "max_nonfinite_rate", float, 0.0),
        max_latency_ratio=r.get("probation", "max_latency_ratio", float, 2.0),
        max_reentries=r.get("probation", "max_restarts", int, 3),
        self_test_latency_ratio=r.get("self_test", "max_latency_ratio", float, 0.0),
        self_test_runs=r.get("self_test", "latency_runs", int, 20),
        keep_previous=r.get("retention", "keep_previous", int, 2),
        memory_budget_mb=r.get("models", "memory_budget_mb", float, 0.0),
        broker_url=r.get("broker", "url", str, ""),
        telemetry_interval_s=r.get("telemetry", "interval_s", float, 60.0),
        api_token_file=optional_path("server", "token_file"),
        tls_cert=optional_path("server", "tls_cert"),
        tls_key=optional_path("server", "tls_key"),
        tls_client_ca=optional_path("server", "tls_client_ca"),
        trusted_network=r.get("server", "trusted_network", bool, False),
        grpc_port=r.get("server", "grpc_port", int, None),
        max_body_bytes=r.get("limits", "max_body_bytes", int, 16 << 20),
        max_batch=r.get("limits", "max_batch", int, 1024),
        max_tensor_bytes=r.get("limits", "max_tensor_bytes", int, 32 << 20),
        max_connections=r.get("limits", "max_connections", int, 256),
        header_timeout_s=r.get("limits", "header_timeout_s", float, 10.0),
        body_timeout_s=r.get("limits", "body_timeout_s", float, 30.0),
        idle_timeout_s=r.get("limits", "idle_timeout_s", float, 30.0),
        source=source,
    )
    for name, value in (
        ("[limits] max_body_bytes", cfg.max_body_bytes),
        ("[limits] max_batch", cfg.max_batch),
        ("[limits] max_tensor_bytes", cfg.max_tensor_bytes),
        ("[limits] max_connections", cfg.max_connections),
        ("[limits] header_timeout_s", cfg.header_timeout_s),
        ("[limits] body_timeout_s", cfg.body_timeout_s),
        ("[limits] idle_timeout_s", cfg.idle_timeout_s),
    ):
        _positive(where, name, value, allow_zero=False)
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise BadInputError(f"{where}: [server] tls_cert and tls_key go together (the certificate and its key)")
    if cfg.tls_client_ca is not None and cfg.tls_cert is None:
        raise BadInputError(f"{where}: [server] tls_client_ca needs tls_cert and tls_key (client certificates need TLS)")
    if cfg.grpc_port is not None and not 0 <= cfg.grpc_port <= 65535:
        raise BadInputError(f"{where}: [server] grpc_port = {cfg.grpc_port} must be a port (0-65535; 0 picks a free one)")
    if cfg.grpc_port is not None and cfg.grpc_port and cfg.grpc_port == cfg.bind_port:
        raise BadInputError(f"{where}: [server] grpc_port {cfg.grpc_port} is the REST API's port ([server] bind)")
    for name, value in (
        ("[probation] window_s", cfg.probation_window_s),
        ("[probation] min_requests", cfg.probation_min_requests),
        ("[probation] max_error_rate", cfg.max_error_rate),
        ("[probation] max_nonfinite_rate", cfg.max_nonfinite_rate),
        ("[probation] max_latency_ratio", cfg.max_latency_ratio),
        ("[self_test] max_latency_ratio", cfg.self_test_latency_ratio),
        ("[retention] keep_previous", cfg.keep_previous),
        ("[models] memory_budget_mb", cfg.memory_budget_mb),
    ):
        _positive(where, name, value)
    _positive(where, "[probation] max_restarts", cfg.max_reentries, allow_zero=True)
    _positive(where, "[telemetry] interval_s", cfg.telemetry_interval_s, allow_zero=False)
    _positive(where, "[self_test] latency_runs", cfg.self_test_runs, allow_zero=False)
    if cfg.max_error_rate > 1 or cfg.max_nonfinite_rate > 1:
        raise BadInputError(f"{where}: [probation] rates must be within [0, 1]")
    return cfg


_TEMPLATE = """\
# edgeship-agent configuration (written by `edgeship-agent init`).
# Every key is documented in docs/agent.md.

[device]
id = {device_id}          # this device's id: names its MQTT subtree and its director documents
fleet = {fleet}           # the fleet it belongs to

[paths]
data = {data}             # slots, state file, control socket; must be writable by the agent

[trust]
root = {root}             # trusted TUF root metadata (root.json) of the release repository
director_key = {director_key}   # the director's public key (PEM)

[runtime]
prefer = ["litert", "tflite_runtime", "tensorflow"]   # TFLite interpreters, in order
threads = {threads}                  # interpreter threads (XNNPACK / ONNX intra-op)

[server]
bind = {bind}             # TF Serving-compatible REST API (keep it on loopback)
# Beyond loopback the agent refuses to start without access control (docs/security.md):
# token_file = "/etc/edgeship/api.token"   # callers send "Authorization: Bearer <token>" (file mode 0600)
# tls_cert = "/etc/edgeship/api.crt"       # HTTPS, with tls_key; tls_client_ca: client certificates required
# tls_key = "/etc/edgeship/api.key"
# tls_client_ca = "/etc/edgeship/clients-ca.pem"
# trusted_network = false                  # true: serve a non-loopback address without either (you vouch for the network)
# grpc_port = 8500                         # gRPC (OIP v2 and TF Serving) on the bind host; needs edgeship[grpc]

[limits]
max_body_bytes = 16777216 # largest request body (bytes); a larger one is a 400 before it is read
max_batch = 1024          # instances per predict request
max_tensor_bytes = 33554432   # bytes of one decoded input tensor, checked before it is allocated
max_connections = 256     # concurrent HTTP connections; more get a 503 (the control socket is apart)
header_timeout_s = 10.0   # to receive a request's line and headers
body_timeout_s = 30.0     # to receive its body
idle_timeout_s = 30.0     # a keep-alive connection idle this long is closed

[self_test]
latency_runs = 20         # invokes timed for the new and the running model
max_latency_ratio = 0.0   # refuse a model slower than this x the running one (0: no gate)

[probation]
window_s = 60.0           # how long a new model is watched before it is committed
min_requests = 0          # and at least this many requests (0: time only)
max_error_rate = 0.05     # roll back above this share of failed predictions
max_nonfinite_rate = 0.0  # roll back above this share of NaN/Inf outputs
max_latency_ratio = 2.0   # roll back when p95 latency exceeds this x the previous model's
max_restarts = 3          # agent restarts tolerated in one update state before it gives up (rolls back)

[retention]
keep_previous = 2         # committed bundles kept besides the active one

[models]
memory_budget_mb = 0.0    # what all loaded models may take together; a model that would not fit is REJECTED (0: no budget)

[telemetry]
interval_s = 60.0         # how often a telemetry window goes to the reporter (MQTT with a broker)

[broker]
url = {broker}            # MQTT broker for fleet rollouts ("" = none; the agent runs without)
# The fleet link's other keys (prefix, protocol, keepalive_s, reconnect_max_s, block_size,
# block_window, block_timeout_s, telemetry_qos, ca_file, cert_file, key_file,
# repository_url, repository_ca_file) go here too: see docs/fleet-link.md.
"""


def _toml_str(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(
    *, data: str, device_id: str, fleet: str, root: str, director_key: str,
    bind: str = "127.0.0.1:8501", broker: str = "", threads: int = 1,
    broker_keys: Mapping[str, str] | None = None,
) -> str:
    """A complete, commented config file; validated before it is returned.

    ``broker_keys``: more ``[broker]`` keys (the credentials' ca_file, cert_file, ...), written
    right after ``url``.
    """
    parse_bind(bind, "--bind")
    text = _TEMPLATE.format(
        device_id=_toml_str(device_id), fleet=_toml_str(fleet), data=_toml_str(data), root=_toml_str(root),
        director_key=_toml_str(director_key), bind=_toml_str(bind), broker=_toml_str(broker), threads=threads,
    )
    if broker_keys:
        url_line = f"url = {_toml_str(broker)}"
        head, sep, tail = text.partition(url_line)
        extra = "".join(f"\n{key} = {_toml_str(value)}" for key, value in broker_keys.items())
        text = head + sep + tail.split("\n", 1)[0] + extra + "\n" + tail.split("\n", 1)[1]
    parse_config(tomllib.loads(text))
    return text


# -- broker credentials and trust anchors --------------------------------------------------------

_CREDENTIALS_FILE = "connection.json"
_CREDENTIAL_FILES = ("ca", "cert", "key", "password", "root", "director_key")


@dataclass(frozen=True)
class BrokerCredentials:
    """What ``edgeship device credentials`` writes for one device (its connection.json), paths absolute."""

    folder: Path
    url: str
    device_id: str
    fleet: str
    prefix: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    root: Path | None = None
    director_key: Path | None = None

    def broker_keys(self) -> dict[str, str]:
        """The ``[broker]`` keys (besides url) that connect with these credentials."""
        keys = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file,
                "password_file": self.password_file}
        out = {k: str(v) for k, v in keys.items() if v is not None}
        if self.password_file is not None and self.username:
            out["username"] = self.username
        if self.prefix:
            out["prefix"] = self.prefix
        return out


def read_credentials(folder: str | os.PathLike[str]) -> BrokerCredentials:
    """Read a device credentials folder (``edgeship device credentials --out FOLDER``).

    Raises:
        BadInputError: not such a folder, a device's, or a file it names is missing (named).
    """
    d = Path(folder).expanduser().resolve()
    p = d / _CREDENTIALS_FILE
    try:
        doc = json.loads(p.read_text("utf-8"))
    except FileNotFoundError:
        raise BadInputError(
            f"--credentials {folder}: no {_CREDENTIALS_FILE} there; make the folder with "
            "`edgeship device credentials DEVICE_ID --fleet FLEET --broker-dir BROKER --repo REPO --out FOLDER`"
        ) from None
    except (OSError, ValueError) as exc:
        raise BadInputError(f"--credentials {folder}: {p} cannot be read ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != "device" or not doc.get("identity") or not doc.get("url"):
        raise BadInputError(f"--credentials {folder}: {p} is not a device's credentials (kind, identity, url)")
    files: dict[str, Path] = {}
    for key in _CREDENTIAL_FILES:
        if doc.get(key):
            path = d / str(doc[key])
            if not path.is_file():
                raise BadInputError(f"--credentials {folder}: {path.name} ({key}) is missing")
            files[key] = path
    return BrokerCredentials(
        folder=d, url=str(doc["url"]), device_id=str(doc["identity"]), fleet=str(doc.get("fleet") or ""),
        prefix=str(doc["prefix"]) if doc.get("prefix") else None, ca_file=files.get("ca"),
        cert_file=files.get("cert"), key_file=files.get("key"), username=str(doc.get("username") or "") or None,
        password_file=files.get("password"), root=files.get("root"), director_key=files.get("director_key"),
    )


def check_trust_anchors(root: str | os.PathLike[str], director_key: str | os.PathLike[str], *,
                        where: str = "") -> None:
    """Refuse a missing or unreadable trust anchor, naming which: without them the agent could
    verify nothing it is sent, and would only say so at its first update."""
    for what, path in (("trusted root metadata (root.json)", root), ("director's public key", director_key)):
        p = Path(path)
        try:
            with open(p, "rb") as handle:
                handle.read(1)
        except FileNotFoundError:
            raise BadInputError(f"{where}the {what} {p} does not exist") from None
        except IsADirectoryError:
            raise BadInputError(f"{where}the {what} {p} is a folder, not a file") from None
        except OSError as exc:
            raise BadInputError(f"{where}the {what} {p} cannot be read: {exc.strerror or exc}") from None
