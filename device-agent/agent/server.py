"""The local HTTP API, compatible with TensorFlow Serving's REST API.

Applications written for TF Serving work unchanged::

    POST /v1/models/NAME:predict                 {"instances": [...]} or {"inputs": ...}
    POST /v1/models/NAME/versions/V:predict      the same, pinned to version V (the serving
                                                 version number, or the bundle's version)
    POST /v1/models/NAME/labels/L:predict        the same, the version label L points at
    GET  /v1/models/NAME[/versions/V|/labels/L]  version status (every loaded version)
    GET  /v1/models/NAME[...]/metadata           signature_def
    POST /v1/models/NAME:feedback                ground-truth labels (edgeship extension)
    GET  /healthz                                200 when a model serves, else 503
    GET  /metrics                                Prometheus text

The Open Inference Protocol's REST paths (``/v2/...``, ``oip.py``) are served on the same
port, by the same connection handling, limits and access rules.

Errors use TF Serving's format, ``{"error": "message"}``: 400 for a bad request
(malformed JSON, wrong shape, wrong dtype, over a limit; decoding.py has the
rules), 401 without valid credentials, 404 for an unknown path, model or
version, 405 for a method a path does not take, 408 when a request is not
received in time, 503 while no model serves or when the connection cap is
reached. int8 models take and return floats: the runtime layer quantizes and
dequantizes for the caller.

One thread per connection (the standard library's server, HTTP/1.1 keep-alive),
bounded: at most ``max_connections`` at once (beyond it a connection gets a 503
and is closed, so file descriptors stay available to the control socket), each
connection's reads run against a deadline (``header_timeout_s`` for a request's
line and headers, ``body_timeout_s`` for its body, ``idle_timeout_s`` between
keep-alive requests), and a slow or silent client only ever holds its own
thread. Each response goes out in a single ``sendall`` with Nagle's algorithm
off (a header write followed by a body write would otherwise wait for the
client's delayed ACK).
"""

from __future__ import annotations

__all__ = [
    "CONTENT_CODINGS",
    "ApiAccess",
    "ApiServer",
    "PredictRequestError",
    "UnsupportedContentEncoding",
    "ServerLimits",
    "bind_refusal",
    "build_inputs",
    "content_decoded",
    "format_outputs",
    "is_loopback",
    "load_access",
    "read_token",
    "signature_key",
    "tensor_keys",
]

import hmac
import io
import ipaddress
import json
import re
import socket
import ssl
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.prometheus import Exposition

from . import oip
from .decoding import (
    DecodedRequest,
    DecodeLimits,
    InexactParseError,
    PredictRequestError,
    build_inputs,
    caller_dtype,
    decode_request,
    decode_request_fast,
    format_outputs,
    loads_json,
    signature_key,
    tensor_keys,
)
from .inference import as_servables, caller_error, predict, resolve, signature_names, version_text
from .runtimes import ModelSignature, TensorSpec
from .servables import Servables
from .serving import LoadedModel, NoModelError, ServingModel
from .telemetry import render_prometheus

SWITCH_INTERVAL_S = 0.001
_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[a-z]+))?/?$"
)
_V2_ROUTE = re.compile(
    r"^/v2(?:/health/(?P<health>live|ready)"
    r"|/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<verb>ready|infer))?)?/?$"
)
_OPEN_PATHS = ("/healthz", "/v2/health/live", "/v2/health/ready")
"""Paths any caller may use whatever the access rules: liveness and readiness only."""
_TF_DTYPES = {
    "float32": "DT_FLOAT",
    "float16": "DT_HALF",
    "float64": "DT_DOUBLE",
    "int8": "DT_INT8",
    "uint8": "DT_UINT8",
    "int16": "DT_INT16",
    "int32": "DT_INT32",
    "int64": "DT_INT64",
    "bool": "DT_BOOL",
}
_CHUNK_LINE = re.compile(rb"^([0-9A-Fa-f]{1,16})(;[^\r\n]*)?\r?\n$")
_LARGE_BODY = 1 << 20
"""A body at least this large leaves parsed objects worth handing back to the OS."""
_TRIM_QUIET_S = 0.25
"""Memory goes back to the OS once no large request has ended for this long."""
_MAX_TRAILERS = 32
_BURST_CONNECTIONS = 32
"""After this many connections at once, the last one to close trims memory."""


@dataclass(frozen=True)
class ServerLimits:
    """Resource bounds of the HTTP API ([limits] in the config; docs/agent.md)."""

    max_body_bytes: int = 16 << 20
    max_connections: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    decode: DecodeLimits = field(default_factory=DecodeLimits)


@dataclass(frozen=True)
class ApiAccess:
    """Who may call predict, metadata and /metrics (``/healthz`` stays open).

    ``token``: callers send ``Authorization: Bearer <token>``. ``tls``: a server
    context; with ``client_certs`` a caller must present a certificate the
    context's CA verifies. Neither: anyone who can connect (loopback by default).
    """

    token: str | None = None
    tls: ssl.SSLContext | None = None
    client_certs: bool = False

    @property
    def open(self) -> bool:
        return self.token is None and not self.client_certs


def is_loopback(host: str) -> bool:
    """Whether a bind address only takes connections from this machine."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


MIN_TOKEN_CHARS = 16


def bind_refusal(host: str, access: ApiAccess, trusted_network: bool) -> str | None:
    """Why the API must not listen on ``host`` as configured, or None.

    Beyond loopback every process on the network could predict, read metadata
    and /metrics: a bearer token or client certificates are required, unless the
    operator states that the network is trusted.
    """
    if is_loopback(host) or not access.open or trusted_network:
        return None
    return (
        f"refusing to serve the API on {host}, beyond loopback, without access control: set "
        "[server] token_file (bearer token) or tls_cert/tls_key/tls_client_ca (client certificates), "
        "or state [server] trusted_network = true (--trusted-network); see docs/security.md"
    )


def read_token(path: Path) -> str:
    """The bearer token from its file, which only its owner may read (like a key)."""
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeshipError(f"[server] token_file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if info.st_mode & 0o077:
        raise EdgeshipError(
            f"[server] token_file {path} is readable by others (mode {info.st_mode & 0o777:o}): chmod 600 {path}"
        )
    if len(text) < MIN_TOKEN_CHARS or any(c.isspace() for c in text):
        raise EdgeshipError(
            f"[server] token_file {path} must hold one token of at least {MIN_TOKEN_CHARS} characters "
            "without spaces (e.g. `openssl rand -hex 32`)"
        )
    return text


def load_access(
    token_file: Path | None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_client_ca: Path | None = None,
) -> ApiAccess:
    """The API's access rules from the config's files (read once, at start)."""
    token = read_token(token_file) if token_file is not None else None
    context = None
    if tls_cert is not None and tls_key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(tls_cert), str(tls_key))
            if tls_client_ca is not None:
                context.load_verify_locations(cafile=str(tls_client_ca))
                # optional at the handshake so /healthz stays open; required per request elsewhere
                context.verify_mode = ssl.CERT_OPTIONAL
        except (OSError, ssl.SSLError) as exc:
            raise EdgeshipError(f"[server] TLS files cannot be used: {exc}") from None
    return ApiAccess(token=token, tls=context, client_certs=tls_client_ca is not None)


def _signature_def(signature: ModelSignature) -> dict[str, Any]:
    def tensors(specs: Sequence[TensorSpec]) -> dict[str, Any]:
        return {
            key: {
                "dtype": _TF_DTYPES.get(caller_dtype(s).name, "DT_INVALID"),
                "tensor_shape": {
                    "dim": [{"size": str(d), "name": ""} for d in (-1, *s.shape[1:])],
                    "unknown_rank": False,
                },
                "name": s.name,
            }
            for key, s in zip(tensor_keys(specs), specs)
        }

    return {
        # under the keys a TF Serving client uses (decode_request accepts them, and
        # multi-output answers use them)
        "inputs": tensors(signature.inputs),
        "outputs": tensors(signature.outputs),
        "method_name": "tensorflow/serving/predict",
    }


def _agent_version() -> str:
    try:
        from importlib.metadata import version

        return version("edgeship")
    except Exception:  # noqa: BLE001 - metadata missing in a bare checkout: say so, never fail a request
        return "unknown"


class UnsupportedContentEncoding(PredictRequestError):
    """A request body in a content coding the agent does not read (HTTP 415)."""


CONTENT_CODINGS = ("gzip", "deflate")
"""Request body codings read (``Content-Encoding``), as Triton and TF Serving read them:
tritonclient's ``request_compression_algorithm`` sends either."""


_MAX_CODINGS = 4


def content_decoded(raw: bytes, codings: Sequence[str], cap: int) -> bytes:
    """``raw`` with each ``Content-Encoding`` undone (the header's values, in the order they
    were applied), never more than ``cap`` bytes out: a compression bomb is refused at the
    cap, not inflated. ``identity`` is no coding; ``x-gzip`` is gzip; ``deflate`` is zlib's
    format (RFC 9110), or raw deflate as some clients send it."""
    names = [c.strip().lower() for value in codings for c in value.split(",") if c.strip()]
    if len(names) > _MAX_CODINGS:  # each layer costs an inflate: a header of thousands is an attack
        raise PredictRequestError(f"{len(names)} content codings; at most {_MAX_CODINGS} are read")
    for name in reversed(names):
        if name == "identity":
            continue
        if name not in ("gzip", "x-gzip", "deflate"):
            raise UnsupportedContentEncoding(
                f"Content-Encoding {name!r} is not read; send the body plain, gzip or deflate"
            )
        label = "gzip" if name == "x-gzip" else name
        formats = [16 + zlib.MAX_WBITS] if label == "gzip" else [zlib.MAX_WBITS, -zlib.MAX_WBITS]
        for wbits in formats:
            inflater = zlib.decompressobj(wbits)
            try:
                out = inflater.decompress(raw, cap + 1)
                break
            except zlib.error:
                continue
        else:
            raise PredictRequestError(f"the body is not {label} data (Content-Encoding: {name})")
        if len(out) > cap:
            raise PredictRequestError(
                f"request body exceeds {cap} bytes once decompressed ([limits] max_body_bytes)"
            )
        if not inflater.eof or inflater.unused_data:
            raise PredictRequestError(f"the body is not complete {label} data (Content-Encoding: {name})")
        raw = out
    return raw


class _RequestTimeout(Exception):
    """The client did not send its request (line, headers or body) in time."""


class _DeadlineReader(io.RawIOBase):
    """The connection's reads against one absolute deadline (monotonic clock): a
    client that sends a byte every few seconds cannot hold the thread past it, as
    it could with a plain per-read socket timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _RequestTimeout()
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv_into(buffer)
        except (TimeoutError, ssl.SSLWantReadError):
            raise _RequestTimeout() from None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgeship-agent"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- connection ----------------------------------------------------------------------------
    def setup(self) -> None:
        limits = self.server.limits
        access = self.server.access
        if access.tls is not None:
            self.request.settimeout(limits.header_timeout_s)
            try:
                self.request = access.tls.wrap_socket(self.request, server_side=True)
            except (OSError, ssl.SSLError):
                self.request.close()
                raise ConnectionAbortedError("TLS handshake failed") from None
        self.connection = self.request
        if self.disable_nagle_algorithm:
            try:
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            except OSError:
                pass
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 65536)
        self.wfile = _SocketWriter(self.connection, limits.body_timeout_s)
        self._requests = 0

    def handle(self) -> None:
        self.close_connection = True
        try:
            self.handle_one_request()
            while not self.close_connection:
                self.handle_one_request()
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError):
            pass  # the peer went away; nothing to answer

    def finish(self) -> None:
        try:
            self.rfile.close()
        except OSError:  # closing a broken stream must not raise
            return
        finally:
            if getattr(self, "_had_large", False):
                # The trimmer thread hands most of a large body's memory back, but what this
                # thread freed sits in its own malloc caches, which only it can return: done
                # here, when the connection ends and no request of it is waiting.
                from .loading import release_memory

                release_memory()

    def handle_one_request(self) -> None:
        limits = self.server.limits
        now = time.monotonic()
        self._reader.deadline = now + (limits.idle_timeout_s if self._requests else limits.header_timeout_s)
        self.close_connection = True
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except _RequestTimeout:
            return  # an idle or silent connection: closed without an answer
        if not self.raw_requestline:
            return
        self._requests += 1
        self._reader.deadline = time.monotonic() + limits.header_timeout_s
        try:
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self._error(414, "request line too long")
                return
            if not self.parse_request():
                return  # parse_request answered (through send_error)
            self._dispatch(self.command)
        except _RequestTimeout:
            self.close_connection = True
            self._error(408, "request not received in time")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's protocol errors (bad request line, too many or too
        long headers), in the API's JSON format."""
        self.close_connection = True
        self._error(code, message or self.responses.get(code, ("error",))[0])

    # -- plumbing ------------------------------------------------------------------------------
    def _send(
        self, status: int, payload: bytes, content_type: str = "application/json", extra: str = ""
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n{extra}"
            f"{'Connection: close' if self.close_connection else 'Connection: keep-alive'}\r\n\r\n"
        ).encode("latin-1")
        self.wfile.write(head + payload)

    def _json(self, status: int, document: Any, extra: str = "") -> None:
        self._send(status, json.dumps(document, separators=(",", ":")).encode(), extra=extra)

    def _error(self, status: int, message: str, extra: str = "") -> None:
        self._json(status, {"error": message}, extra)

    def _framing(self) -> tuple[str, int]:
        """How the body is delimited: ("chunked", 0), ("length", n) or ("none", 0).
        Conflicting or invalid framing is a 400 (and the connection closes: where
        the next request starts is unknown)."""
        encodings = [v.strip().lower() for v in self.headers.get_all("Transfer-Encoding") or []]
        lengths = [v.strip() for v in self.headers.get_all("Content-Length") or []]
        if encodings:
            self.close_connection = True
            if lengths:
                raise PredictRequestError("a request cannot have both Transfer-Encoding and Content-Length")
            if ",".join(encodings) != "chunked":
                raise PredictRequestError(f"unsupported Transfer-Encoding {', '.join(encodings)!r} (only chunked)")
            self.close_connection = False
            return "chunked", 0
        if not lengths:
            return "none", 0
        values = {v for text in lengths for v in text.split(",")}
        values = {v.strip() for v in values}
        if len(values) != 1 or not next(iter(values)).isdigit() or len(next(iter(values))) > 12:
            self.close_connection = True
            raise PredictRequestError(f"invalid Content-Length {', '.join(lengths)!r}")
        return "length", int(next(iter(values)))

    def _chunked(self) -> bytes:
        """A ``Transfer-Encoding: chunked`` body, parsed strictly: a chunk size that is
        not hex, negative, or over the body cap is a 400 at once."""
        cap = self.server.limits.max_body_bytes
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1026)
            match = _CHUNK_LINE.match(line)
            if match is None:
                self.close_connection = True
                raise PredictRequestError("malformed chunked request body (a chunk size must be hex)")
            size = int(match.group(1), 16)
            if size == 0:
                for _ in range(_MAX_TRAILERS):
                    if self.rfile.readline(1026) in (b"\r\n", b"\n"):
                        return b"".join(parts)
                self.close_connection = True
                raise PredictRequestError("malformed chunked request body (trailers)")
            total += size
            if total > cap:
                self.close_connection = True
                raise PredictRequestError(f"request body exceeds {cap} bytes ([limits] max_body_bytes)")
            data = self.rfile.read(size)
            if len(data) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                self.close_connection = True
                raise PredictRequestError("malformed chunked request body (chunk shorter than its size)")
            parts.append(data)

    def _raw_body(self) -> bytes | None:
        """The request's body (None without one), received before the body deadline."""
        self._reader.deadline = time.monotonic() + self.server.limits.body_timeout_s
        kind, length = self._framing()
        if kind == "chunked":
            return self._chunked()
        if kind == "none":
            return None
        cap = self.server.limits.max_body_bytes
        if length > cap:
            self.close_connection = True
            raise PredictRequestError(f"request body of {length} bytes exceeds {cap} ([limits] max_body_bytes)")
        raw = self.rfile.read(length)
        if len(raw) != length:
            self.close_connection = True
            raise ConnectionAbortedError("body cut short")
        return raw

    def _body(self) -> bytes | None:
        """The request's body as sent, its ``Content-Encoding`` undone (None without one)."""
        raw = self._raw_body()
        codings = self.headers.get_all("Content-Encoding")
        if raw is None or not codings:
            return raw
        return content_decoded(raw, codings, self.server.limits.max_body_bytes)

    def _discard_body(self) -> None:
        """Consume a body nobody will read, so the keep-alive connection stays usable."""
        try:
            self._raw_body()
        except PredictRequestError:
            self.close_connection = True

    def _model_for(self, name: str, version: str | None, label: str | None = None) -> LoadedModel:
        return resolve(self.server.servables, name, version, label)

    # -- the Open Inference Protocol (oip.py) -------------------------------------------------
    def _v2_get(self, path: str) -> None:
        match = _V2_ROUTE.match(path)
        assert match is not None
        servables = self.server.servables
        try:
            if match.group("health") == "live":
                self._json(200, {"live": True})
            elif match.group("health") == "ready":
                ready = all(m.serving.current is not None for m in servables) and bool(servables.names())
                self._json(200 if ready else 503, {"ready": ready})
            elif match.group("name") is None:
                self._json(200, oip.server_metadata(_agent_version()))
            else:
                model = self._model_for(match.group("name"), match.group("version"))
                if match.group("verb") == "ready":
                    self._json(200, {"name": model.name, "ready": True})
                else:
                    self._json(200, oip.model_metadata(model, servables.get(model.name).loaded()))
        except NoModelError as exc:
            self._error(503, exc.message)
        except LookupError as exc:
            self._error(404, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must answer in the error format, not drop the connection
            self._error(500, f"internal error: {type(exc).__name__}: {str(exc)[:300]}")

    def _v2_infer(self, path: str) -> None:
        match = _V2_ROUTE.match(path)
        assert match is not None and match.group("verb") == "infer"
        try:
            header = self.headers.get("Inference-Header-Content-Length")
            raw = self._body()
            if raw is None:
                self.close_connection = True
                raise PredictRequestError("a request body with Content-Length is required")
            if len(raw) >= _LARGE_BODY:
                self.server.large_begin()
                self._large_pending = True
            header_length = None
            if header is not None:
                if not header.strip().isdigit():
                    raise PredictRequestError(f"invalid Inference-Header-Content-Length {header!r}")
                header_length = int(header)
            model = self._model_for(match.group("name"), match.group("version"))
            try:
                request = oip.decode_infer(raw, header_length, model, self.server.limits.decode)
            except PredictRequestError:
                caller_error(model)
                raise
            served, outputs = predict(self.server.servables, model, request.inputs)
            body, json_length = oip.encode_infer(served, outputs, request)
            if json_length is None:
                self._send(200, body)
            else:
                self._send(
                    200, body, "application/octet-stream",
                    f"Inference-Header-Content-Length: {json_length}\r\n",
                )
        except UnsupportedContentEncoding as exc:
            self._error(415, exc.message, _ACCEPT_ENCODING)
        except BadInputError as exc:
            self._error(400, exc.message)
        except NoModelError as exc:
            self._error(503, exc.message)
        except LookupError as exc:
            self._error(404, str(exc))
        except (_RequestTimeout, ConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001 - the model failed: 500, counted by the serving layer
            self._error(500, f"inference failed: {str(exc)[:300]}")

    def _authorized(self) -> bool:
        """Whether this caller may use a protected path; answers 401 when not."""
        access = self.server.access
        if access.open:
            return True
        if access.client_certs and not self.connection.getpeercert():
            self.close_connection = True
            self._error(401, "a client certificate is required ([server] tls_client_ca)")
            return False
        if access.token is not None:
            given = self.headers.get("Authorization", "")
            scheme, _, credential = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                credential.strip().encode(), access.token.encode()
            ):
                self.close_connection = True  # the body was not read
                self._error(
                    401, "missing or wrong bearer token (Authorization: Bearer ...)",
                    'WWW-Authenticate: Bearer realm="edgeship-agent"\r\n',
                )
                return False
        return True

    # -- routing -------------------------------------------------------------------------------
    def _allowed(self, path: str) -> tuple[str, ...]:
        """The methods a known path takes; () for an unknown path."""
        if path in ("/healthz", "/metrics"):
            return ("GET",)
        v2 = _V2_ROUTE.match(path)
        if v2:
            return ("POST",) if v2.group("verb") == "infer" else ("GET",)
        match = _ROUTE.match(path)
        if not match:
            return ()
        if match.group("verb"):
            return ("POST",) if match.group("verb") in ("predict", "feedback") else ()
        return ("GET",)

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        if method == "HEAD":
            self.close_connection = True  # the answer has a body: the stream cannot be reused
        allowed = self._allowed(path)
        if method not in allowed:
            self._discard_body()
            if not allowed:
                self._error(404, f"unknown path {path} (see docs/agent.md for the API)")
            else:
                self._error(
                    405, f"method {method} is not allowed on {path} (use {', '.join(allowed)})",
                    f"Allow: {', '.join(allowed)}\r\n",
                )
            return
        if path not in _OPEN_PATHS and not self._authorized():
            return
        if method == "GET":
            self._discard_body()
            if path.startswith("/v2"):
                self._v2_get(path)
            else:
                self._get(path)
            return
        self._large_pending = False
        try:
            if path.startswith("/v2"):
                self._v2_infer(path)
            else:
                self._post(path)
        finally:  # after _post's frame (the parsed body) is gone
            if self._large_pending:
                self._had_large = True
                self.server.large_end()

    def _get(self, path: str) -> None:
        try:
            if path == "/healthz":
                ok, detail = self.server.health()
                self._json(200 if ok else 503, detail)
                return
            if path == "/metrics":
                # every loaded version of every model, then the connection gauges
                text = render_prometheus(self.server.servables, self.server.data_dir) + self.server.metrics_text()
                self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
                return
            match = _ROUTE.match(path)
            assert match is not None
            model = self._model_for(match.group("name"), match.group("version"), match.group("label"))
            if match.group("metadata"):
                signature = _signature_def(model.runner.signature)
                self._json(
                    200,
                    {
                        "model_spec": {"name": model.name, "signature_name": "", "version": version_text(model)},
                        "metadata": {
                            "signature_def": {
                                "signature_def": {name: signature for name in signature_names(model)}
                            }
                        },
                    },
                )
            else:
                named = match.group("version") is not None or match.group("label") is not None
                versions = [model] if named else self.server.servables.get(model.name).loaded()
                self._json(
                    200,
                    {
                        "model_version_status": [
                            {
                                "version": version_text(m),
                                "state": "AVAILABLE",
                                "status": {"error_code": "OK", "error_message": ""},
                            }
                            for m in versions
                        ]
                    },
                )
        except NoModelError as exc:
            self._error(503, exc.message)
        except LookupError as exc:
            self._error(404, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must answer in the error format, not drop the connection
            self._error(500, f"internal error: {type(exc).__name__}: {str(exc)[:300]}")

    def _post(self, path: str) -> None:
        match = _ROUTE.match(path)
        assert match is not None
        try:
            raw = self._body()
            if raw is None:
                self.close_connection = True  # the body's end is unknown: the stream cannot be reused
                raise PredictRequestError("a request body with Content-Length is required")
            if len(raw) >= _LARGE_BODY:
                self.server.large_begin()
                self._large_pending = True
            if match.group("verb") == "predict":
                fast = self._predict_fast(raw, match)
                if fast is not None:
                    served, outputs, row = fast
                    self._json(200, format_outputs(outputs, served.runner.signature, row))
                    return
            body, exact = loads_json(raw)
            model = self._model_for(match.group("name"), match.group("version"), match.group("label"))
            if match.group("verb") == "feedback":
                self._json(200, self._feedback(model, body))
                return
            def decode(body: Any, exact: bool) -> DecodedRequest:
                return decode_request(
                    body,
                    model.runner.signature,
                    self.server.limits.decode,
                    maybe_bools=b"true" in raw or b"false" in raw,
                    signature_names=signature_names(model),
                    exact_integers=exact,
                )

            try:
                try:
                    decoded = decode(body, exact)
                except InexactParseError:  # a huge number orjson may have read otherwise: json decides
                    decoded = decode(loads_json(raw, exact=True)[0], True)
            except PredictRequestError:
                caller_error(model)
                raise
            served, outputs = predict(self.server.servables, model, decoded.inputs)  # counts its own errors
            self._json(200, format_outputs(outputs, served.runner.signature, decoded.row))
        except UnsupportedContentEncoding as exc:
            self._error(415, exc.message, _ACCEPT_ENCODING)
        except BadInputError as exc:
            self._error(400, exc.message)
        except NoModelError as exc:
            self._error(503, exc.message)
        except LookupError as exc:
            self._error(404, str(exc))
        except (_RequestTimeout, ConnectionError):
            raise
        except Exception as exc:  # noqa: BLE001 - the model failed: 500, counted by the serving layer
            self._error(500, f"prediction failed: {str(exc)[:300]}")

    def _predict_fast(self, raw: bytes, match: re.Match[str]) -> tuple[LoadedModel, list[np.ndarray], bool] | None:
        """A camera frame's body through ``decode_request_fast`` and the model; None where the
        fast path does not take the body (or the model cannot be resolved): the exact path
        then answers, errors included, in today's order (a malformed body's 400 before an
        unknown model's 404)."""
        try:
            model = self._model_for(match.group("name"), match.group("version"), match.group("label"))
        except (LookupError, NoModelError):
            return None
        decoded = decode_request_fast(raw, model.runner.signature, self.server.limits.decode)
        if decoded is None:
            return None
        served, outputs = predict(self.server.servables, model, decoded.inputs)  # counts its own errors
        return served, outputs, decoded.row

    def _feedback(self, model: LoadedModel, body: Any) -> dict[str, Any]:
        """``{"labels": [...], "predictions": [...]}``: true class and the class (or
        score vector) the application got back; counts correct/total for A/B tests."""
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("labels"), list)
            or not isinstance(body.get("predictions"), list)
        ):
            raise PredictRequestError('feedback must be {"labels": [...], "predictions": [...]}')
        labels, predictions = body["labels"], body["predictions"]
        if len(labels) != len(predictions) or not labels:
            raise PredictRequestError(
                "feedback 'labels' and 'predictions' must be non-empty and of equal length"
            )
        correct = 0
        for label, predicted in zip(labels, predictions):
            if isinstance(predicted, list):
                try:
                    predicted = int(np.argmax(np.asarray(predicted, dtype=np.float64)))
                except (ValueError, TypeError, OverflowError):
                    raise PredictRequestError(
                        "feedback 'predictions' must be class indexes or score lists"
                    ) from None
            if (
                not isinstance(label, int)
                or isinstance(label, bool)
                or not isinstance(predicted, int)
            ):
                raise PredictRequestError("feedback labels and predicted classes must be integers")
            correct += int(label == predicted)
        model.stats.feedback(correct, len(labels))
        return {"accepted": len(labels), "correct": correct}


class _SocketWriter(io.BufferedIOBase):
    """Unbuffered writes: each response is one ``sendall``, with its own time limit
    (a client that stops reading must not hold the thread; the socket's timeout
    otherwise is whatever the last read's deadline left)."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self._sock = sock
        self._timeout_s = timeout_s

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.settimeout(self._timeout_s)
        self._sock.sendall(data)
        return len(data)


_ACCEPT_ENCODING = f"Accept-Encoding: {', '.join(CONTENT_CODINGS)}\r\n"
_BUSY_BODY = b'{"error":"too many connections: the agent\'s connection limit is reached"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(_BUSY_BODY)}\r\n".encode()
    + b"Retry-After: 1\r\nConnection: close\r\n\r\n"
    + _BUSY_BODY
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    servables: Servables
    data_dir: Path
    health: Callable[[], tuple[bool, dict[str, Any]]]
    limits: ServerLimits
    access: ApiAccess

    def setup_counters(self) -> None:
        self._count_lock = threading.Lock()
        self.connections = 0
        self.refused = 0
        self._large = 0
        self._peak = 0  # connections at once since the last trim
        self._trim_due = 0.0
        self._trim_wanted = threading.Event()
        self._trimmer: threading.Thread | None = None

    def metrics_text(self) -> str:
        """The connection gauges in Prometheus text (appended to /metrics)."""
        page = Exposition()
        page.gauge("edgeship_http_connections",
                   "Open HTTP connections (each holds a thread until its deadline).", [({}, self.connections)])
        page.counter("edgeship_http_connections_refused_total",
                     "Connections answered 503 at [limits] max_connections.", [({}, self.refused)])
        return page.text()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._count_lock:
            full = self.connections >= self.limits.max_connections
            if full:
                self.refused += 1
            else:
                self.connections += 1
                self._peak = max(self._peak, self.connections)
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._count_lock:
                self.connections -= 1
            raise

    def _refuse(self, request: socket.socket) -> None:
        """Beyond the cap: a 503 if the socket takes it at once (never block the
        accept loop), then close. A TLS listener closes without an answer (the
        handshake would block here)."""
        if self.access.tls is None:
            try:
                request.setblocking(False)
                request.send(_BUSY)
            except OSError:
                pass
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self.connections -= 1
                burst_over = self.connections == 0 and self._peak >= _BURST_CONNECTIONS
                if burst_over:
                    self._peak = 0
            if burst_over:  # the threads of a burst are gone: hand their memory back
                from .loading import release_memory

                release_memory()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client's broken connection is not the agent's error

    def large_begin(self) -> None:
        with self._count_lock:
            self._large += 1

    def large_end(self) -> None:
        """After a large request: hand the parsed objects' memory back once no large request
        has come for ``_TRIM_QUIET_S`` (on the trimmer's thread, off the request path: a
        collection and ``malloc_trim`` cost 10-25 ms, which a stream of camera frames in JSON
        would otherwise pay on every frame)."""
        with self._count_lock:
            self._large -= 1
            self._trim_due = time.monotonic() + _TRIM_QUIET_S
            if self._trimmer is None:
                self._trimmer = threading.Thread(target=self._trim_when_quiet, name="edgeship-trim", daemon=True)
                self._trimmer.start()
        self._trim_wanted.set()

    def _trim_when_quiet(self) -> None:
        from .loading import release_memory

        while True:
            self._trim_wanted.wait()
            while True:
                with self._count_lock:
                    wait_s = self._trim_due - time.monotonic()
                    busy = self._large > 0
                if not busy and wait_s <= 0:
                    break
                time.sleep(max(wait_s, 0.05))
            self._trim_wanted.clear()  # a large request ending from here on asks again
            release_memory()


class _Server6(_Server):
    address_family = socket.AF_INET6


class ApiServer:
    """The HTTP API on its own threads; ``port`` is the bound one (0 picks a free port)."""

    def __init__(
        self,
        servables: Servables | ServingModel,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = 8501,
        health: Callable[[], tuple[bool, dict[str, Any]]] | None = None,
        limits: ServerLimits | None = None,
        access: ApiAccess | None = None,
    ) -> None:
        self.servables = as_servables(servables)
        try:
            server_class = _Server6 if ":" in host else _Server
            self._httpd = server_class((host.strip("[]"), port), _Handler)
        except OSError as exc:  # taken port, unknown host, privileged port
            raise EdgeshipError(
                f"cannot listen on {host}:{port} ([server] bind): {exc.strerror or exc}"
            ) from None
        self._httpd.servables = self.servables
        self._httpd.data_dir = data_dir
        self._httpd.health = health or self._default_health
        self._httpd.limits = limits or ServerLimits()
        self._httpd.access = access or ApiAccess()
        self._httpd.setup_counters()
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def scheme(self) -> str:
        return "https" if self._httpd.access.tls is not None else "http"

    @property
    def connections(self) -> int:
        return self._httpd.connections

    def _default_health(self) -> tuple[bool, dict[str, Any]]:
        models = [m.serving.current for m in self.servables]
        serving = [m for m in models if m is not None]
        if not serving:
            return False, {"status": "no model serving"}
        first = serving[0]
        return True, {
            "status": "ok",
            "model": {"name": first.name, "version": first.version},
            "models": [{"name": m.name, "version": m.version, "serving_version": m.serving_version} for m in serving],
        }

    def start(self) -> ApiServer:
        # One thread per keep-alive connection share the GIL; CPython hands it over every
        # 5 ms by default, which shows up directly as a 5 ms tail. 1 ms keeps p99 low at
        # a small cost in throughput (benchmarks/agent.py).
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="edgeship-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
