"""The local HTTP API, compatible with TensorFlow Serving's REST API.

Applications written for TF Serving work unchanged::

    POST /v1/models/NAME:predict                 {"instances": [...]} or {"inputs": ...}
    POST /v1/models/NAME/versions/V:predict      the same, pinned to version V
    GET  /v1/models/NAME[/versions/V]            version status
    GET  /v1/models/NAME[/versions/V]/metadata   signature_def
    POST /v1/models/NAME:feedback                ground-truth labels (edgeship extension)
    GET  /healthz                                200 when a model serves, else 503
    GET  /metrics                                Prometheus text

Errors use TF Serving's format, ``{"error": "message"}``, with 400 for a bad
request (malformed JSON, wrong shape, wrong dtype), 404 for an unknown model or
version, 503 while no model serves. int8 models take and return floats: the
runtime layer quantizes and dequantizes for the caller.

The standard library's ``ThreadingHTTPServer`` with HTTP/1.1 keep-alive: one
thread per connection, each response written with a single ``sendall`` and
Nagle's algorithm off (a header write followed by a body write would otherwise
wait for the client's delayed ACK).
"""

from __future__ import annotations

__all__ = ["ApiServer", "PredictRequestError", "build_inputs", "format_outputs", "signature_key", "tensor_keys"]

import json
import re
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import numpy as np
from edgeship.ota.errors import BadInputError, EdgeshipError

from .runtimes import ModelSignature, TensorSpec
from .serving import LoadedModel, NoModelError, ServingModel
from .telemetry import render_prometheus

MAX_BODY_BYTES = 32 * 1024 * 1024
SWITCH_INTERVAL_S = 0.001
_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[a-z]+))?/?$"
)
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


class PredictRequestError(BadInputError):
    """A predict request that cannot be served as sent (HTTP 400)."""


_TF_TENSOR_NAME = re.compile(r"^serving_default_(?P<key>.+):\d+$")


def signature_key(tensor_name: str) -> str:
    """The SavedModel signature key a TF Serving client uses for an input: TF's TFLite
    converter names the tensor of key ``image`` ``serving_default_image:0``."""
    match = _TF_TENSOR_NAME.match(tensor_name)
    return match.group("key") if match else tensor_name


def tensor_keys(specs: Sequence[TensorSpec]) -> list[str]:
    """The names TF Serving would use for these tensors: the model's SignatureDef keys
    (``TensorSpec.key``), else the key in a converter's tensor name
    (``signature_key``), else the tensor names themselves where keys would collide."""
    keys = [s.key or signature_key(s.name) for s in specs]
    return keys if len(set(keys)) == len(keys) else [s.name for s in specs]


def _named_values(given: dict[str, Any], specs: Sequence[TensorSpec], where: str) -> list[Any]:
    """The values of a document naming each input, by tensor name or by signature key."""
    if set(given) == {s.name for s in specs}:
        return [given[s.name] for s in specs]
    keys = tensor_keys(specs)
    if set(given) == set(keys):
        return [given[k] for k in keys]
    raise PredictRequestError(f"{where} must name exactly the inputs {keys}")


def _caller_dtype(spec: TensorSpec) -> np.dtype:
    """The dtype a caller sends for this input: float for float and quantized tensors."""
    if spec.quantized or np.dtype(spec.dtype).kind == "f":
        return np.dtype(np.float32)
    return np.dtype(spec.dtype)


def _tensor(value: Any, spec: TensorSpec, where: str) -> np.ndarray:
    dtype = _caller_dtype(spec)
    try:
        array = np.asarray(value, dtype=dtype)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise PredictRequestError(
            f"{where}: input '{spec.name}' must be a rectangular array of {dtype.name} values ({str(exc)[:120]})"
        ) from None
    if array.dtype.kind == "O":  # pragma: no cover - numpy refuses ragged lists above
        raise PredictRequestError(f"{where}: input '{spec.name}' is ragged")
    expected = spec.shape
    if array.ndim != len(expected) or any(
        want not in (-1, got) for want, got in zip(expected[1:], array.shape[1:])
    ):
        raise PredictRequestError(
            f"{where}: input '{spec.name}' has shape {list(array.shape)}, the model expects "
            f"{['batch' if i == 0 else d for i, d in enumerate(expected)]} (-1: any size)"
        )
    if array.shape[0] == 0:
        raise PredictRequestError(f"{where}: empty batch")
    return array


def build_inputs(body: Any, signature: ModelSignature) -> tuple[list[np.ndarray], bool]:
    """A request document -> model inputs (batched) and whether it was the row form."""
    if not isinstance(body, dict):
        raise PredictRequestError("request body must be a JSON object with 'instances' or 'inputs'")
    signature_name = body.get("signature_name", "serving_default")
    if signature_name not in ("serving_default", "", None):
        raise PredictRequestError(
            f"unknown signature_name {signature_name!r}: this model has 'serving_default'"
        )
    specs = signature.inputs
    if ("instances" in body) == ("inputs" in body):
        raise PredictRequestError(
            "request must have exactly one of 'instances' (row format) or 'inputs' (columnar)"
        )
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise PredictRequestError("'instances' must be a non-empty list")
        if isinstance(instances[0], dict):
            columns: list[list[Any]] = [[] for _ in specs]
            for row, instance in enumerate(instances):
                if not isinstance(instance, dict):
                    raise PredictRequestError(
                        f"instances[{row}] must name exactly the inputs {tensor_keys(specs)}"
                    )
                for i, value in enumerate(_named_values(instance, specs, f"instances[{row}]")):
                    columns[i].append(value)
            return [_tensor(col, s, "instances") for col, s in zip(columns, specs)], True
        if len(specs) != 1:
            raise PredictRequestError(
                f"the model has {len(specs)} inputs: each instance must be an object naming {tensor_keys(specs)}"
            )
        return [_tensor(instances, specs[0], "instances")], True
    inputs = body["inputs"]
    if isinstance(inputs, dict):
        values = _named_values(inputs, specs, "'inputs'")
        return [_tensor(v, s, "inputs") for v, s in zip(values, specs)], False
    if len(specs) != 1:
        raise PredictRequestError(
            f"the model has {len(specs)} inputs: 'inputs' must be an object naming them"
        )
    return [_tensor(inputs, specs[0], "inputs")], False


def format_outputs(
    outputs: Sequence[np.ndarray], signature: ModelSignature, row: bool
) -> dict[str, Any]:
    """Model outputs -> TF Serving's response (``predictions`` rows or ``outputs`` columns)."""
    if len(outputs) == 1:
        return {"predictions": outputs[0].tolist()} if row else {"outputs": outputs[0].tolist()}
    names = tensor_keys(signature.outputs)  # TF Serving answers under the SignatureDef's output keys
    if row:
        lists = [o.tolist() for o in outputs]
        return {"predictions": [dict(zip(names, values)) for values in zip(*lists)]}
    return {"outputs": {n: o.tolist() for n, o in zip(names, outputs)}}


def _signature_def(signature: ModelSignature) -> dict[str, Any]:
    def tensors(specs: Sequence[TensorSpec]) -> dict[str, Any]:
        return {
            key: {
                "dtype": _TF_DTYPES.get(_caller_dtype(s).name, "DT_INVALID"),
                "tensor_shape": {
                    "dim": [{"size": str(d), "name": ""} for d in (-1, *s.shape[1:])],
                    "unknown_rank": False,
                },
                "name": s.name,
            }
            for key, s in zip(tensor_keys(specs), specs)
        }

    return {
        # under the keys a TF Serving client uses (build_inputs accepts them, and
        # multi-output answers use them)
        "inputs": tensors(signature.inputs),
        "outputs": tensors(signature.outputs),
        "method_name": "tensorflow/serving/predict",
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgeship-agent"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
        head = (
            f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
            f"{'Connection: close' if self.close_connection else 'Connection: keep-alive'}\r\n\r\n"
        ).encode("latin-1")
        self.wfile.write(head + payload)

    def _json(self, status: int, document: Any) -> None:
        self._send(status, json.dumps(document, separators=(",", ":")).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _chunked(self) -> bytes:
        """A ``Transfer-Encoding: chunked`` body, at most MAX_BODY_BYTES."""
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise PredictRequestError("malformed chunked request body") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise PredictRequestError(f"request body exceeds {MAX_BODY_BYTES} bytes")
            parts.append(self.rfile.read(size))
            self.rfile.readline(8)  # the CRLF after each chunk

    def _discard_body(self) -> None:
        """Consume a body nobody will read, so the keep-alive connection stays usable."""
        length_text = self.headers.get("Content-Length") or ""
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self._chunked()
            elif length_text.isdigit() and int(length_text) <= MAX_BODY_BYTES:
                self.rfile.read(int(length_text))
            elif length_text:
                self.close_connection = True
        except PredictRequestError:
            self.close_connection = True

    def _body(self) -> Any:
        length_text = self.headers.get("Content-Length")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = self._chunked()
        elif length_text is None or not length_text.isdigit():
            self.close_connection = True  # the body's end is unknown: the stream cannot be reused
            raise PredictRequestError("a request body with Content-Length is required")
        else:
            length = int(length_text)
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                raise PredictRequestError(f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
            raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise PredictRequestError(f"JSON Parse error: {str(exc)[:200]}") from None

    def _model_for(self, name: str, version: str | None) -> LoadedModel:
        model = self.server.serving.current
        if model is None:
            raise NoModelError("no model is serving")
        if name != model.name or (version is not None and version != model.version):
            raise LookupError(
                f"Servable not found for request: {'Specific' if version else 'Latest'}({name}"
                f"{', ' + version if version else ''}); this agent serves {model.name} {model.version}"
            )
        return model

    # -- verbs ---------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                ok, detail = self.server.health()
                self._json(200 if ok else 503, detail)
                return
            if path == "/metrics":
                text = render_prometheus(self.server.serving, self.server.data_dir)
                self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
                return
            match = _ROUTE.match(path)
            if not match or match.group("verb"):
                self._error(404, f"unknown path {path} (see docs/agent.md for the API)")
                return
            model = self._model_for(match.group("name"), match.group("version"))
            if match.group("metadata"):
                self._json(
                    200,
                    {
                        "model_spec": {
                            "name": model.name,
                            "signature_name": "",
                            "version": model.version,
                        },
                        "metadata": {
                            "signature_def": {
                                "signature_def": {
                                    "serving_default": _signature_def(model.runner.signature)
                                }
                            }
                        },
                    },
                )
            else:
                self._json(
                    200,
                    {
                        "model_version_status": [
                            {
                                "version": model.version,
                                "state": "AVAILABLE",
                                "status": {"error_code": "OK", "error_message": ""},
                            }
                        ]
                    },
                )
        except NoModelError as exc:
            self._error(503, exc.message)
        except LookupError as exc:
            self._error(404, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must answer in the error format, not drop the connection
            self._error(500, f"internal error: {type(exc).__name__}: {str(exc)[:300]}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        match = _ROUTE.match(path)
        try:
            if (
                not match
                or match.group("metadata")
                or match.group("verb") not in ("predict", "feedback")
            ):
                self._discard_body()
                self._error(404, f"unknown path {path}: use /v1/models/NAME:predict")
                return
            body = self._body()
            model = self._model_for(match.group("name"), match.group("version"))
            if match.group("verb") == "feedback":
                self._json(200, self._feedback(model, body))
                return
            try:
                inputs, row = build_inputs(body, model.runner.signature)
            except PredictRequestError:
                model.stats.error("bad_request")
                raise
            served, outputs = self.server.serving.predict(inputs, model)  # counts its own errors
            self._json(200, format_outputs(outputs, served.runner.signature, row))
        except BadInputError as exc:
            self._error(400, exc.message)
        except NoModelError as exc:
            self._error(503, exc.message)
        except LookupError as exc:
            self._error(404, str(exc))
        except Exception as exc:  # the model failed: 500, counted by the serving layer
            self._error(500, f"prediction failed: {str(exc)[:300]}")

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    serving: ServingModel
    data_dir: Path
    health: Callable[[], tuple[bool, dict[str, Any]]]


class ApiServer:
    """The HTTP API on its own threads; ``port`` is the bound one (0 picks a free port)."""

    def __init__(
        self,
        serving: ServingModel,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = 8501,
        health: Callable[[], tuple[bool, dict[str, Any]]] | None = None,
    ) -> None:
        self.serving = serving
        try:
            self._httpd = _Server((host, port), _Handler)
        except OSError as exc:  # taken port, unknown host, privileged port
            raise EdgeshipError(
                f"cannot listen on {host}:{port} ([server] bind): {exc.strerror or exc}"
            ) from None
        self._httpd.serving = serving
        self._httpd.data_dir = data_dir
        self._httpd.health = health or self._default_health
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def _default_health(self) -> tuple[bool, dict[str, Any]]:
        model = self.serving.current
        if model is None:
            return False, {"status": "no model serving"}
        return True, {"status": "ok", "model": {"name": model.name, "version": model.version}}

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
