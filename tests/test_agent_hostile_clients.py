"""Careless and hostile local clients against a real ``edgeship-agent run`` process
(loopback only, bounded in count and time): each attack gets its answer, the model
keeps serving, nothing is rolled back, and the agent's memory comes back. Then
probation: a flood of bad and NaN inputs does not roll a healthy model back, and a
model that really produces NaN on valid input is rolled back."""

from __future__ import annotations

import json
import resource
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_fixtures import (
    PASSPHRASE,
    AgentProcess,
    AgentRepo,
    agent_cli,
    make_golden,
    rss_mb,
    wait_for,
    write_config,
)

IDLE_S = 2.0
FD_LIMIT = 1024


def _limits(text: str, **values: float) -> str:
    for key, value in values.items():
        start = text.index(f"\n{key} = ") + 1
        end = text.index("\n", start)
        text = text[:start] + f"{key} = {value}" + text[end:]
    return text


def raw_exchange(port: int, data: bytes, wait_s: float = 5.0) -> tuple[int, dict[str, Any] | None, float]:
    """Send raw bytes and read one answer: (status, JSON body or None, seconds to the answer).
    Status 0: the agent closed the connection without answering."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait_s)
    start = time.monotonic()
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = b""
        try:
            while b"\r\n\r\n" not in chunks:
                got = sock.recv(65536)
                if not got:
                    break
                chunks += got
            head, _, body = chunks.partition(b"\r\n\r\n")
            if not head:
                return 0, None, time.monotonic() - start
            length = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), b"0"))
            while len(body) < length:
                got = sock.recv(65536)
                if not got:
                    break
                body += got
        except ConnectionResetError:
            return 0, None, time.monotonic() - start
        status = int(head.split(b" ")[1])
        return status, (json.loads(body) if body else None), time.monotonic() - start
    finally:
        sock.close()


def post(path: str, body: bytes, headers: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


class Served:
    def __init__(self, agent: AgentProcess, x: np.ndarray) -> None:
        self.agent = agent
        self.x = x
        self.port = int(agent.status()["server"].rsplit(":", 1)[1])

    def predict_ok(self) -> None:
        client = self.agent.client()
        try:
            status, body = client.predict("digits", self.x[:2].tolist())
            assert status == 200 and np.asarray(body["predictions"]).shape == (2, 10), body
        finally:
            client.close()

    def no_rollback(self) -> None:
        doc = self.agent.status()
        assert doc["active"]["version"] == "1.0.0"
        assert doc["update"]["state"] == "COMMITTED", doc["update"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, agent_repo: AgentRepo) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("hostile")
    config = write_config(folder, agent_repo, window_s=0.3)
    config.write_text(_limits(config.read_text(), idle_timeout_s=IDLE_S, header_timeout_s=IDLE_S, body_timeout_s=IDLE_S))
    result = agent_cli("install", str(agent_repo.export("1.0.0")), "--config", str(config))
    assert result.returncode == 0, result.stderr
    agent = AgentProcess(config, preexec_fn=_limit_fds)  # a 1,024 file limit it cannot raise (soft = hard)
    agent.wait_serving()
    wait_for(lambda: agent.status()["update"]["state"] == "COMMITTED" or None, 30, what="probation")
    served = Served(agent, agent_repo.eval_x)
    for _ in range(50):
        served.predict_ok()
    yield served
    agent.stop()


DIGIT = [[[0.0]] * 8] * 8
ATTACKS: list[tuple[str, bytes, int, str]] = [
    ("null in a float tensor", post("/v1/models/digits:predict", json.dumps({"instances": [[[[None]] * 8] * 8]}).encode()), 400, "numbers only"),
    ("true in a float tensor", post("/v1/models/digits:predict", json.dumps({"instances": [[[[True]] + [[0.0]] * 7] * 8]}).encode()), 400, "true/false"),
    ("'1.5' in a float tensor", post("/v1/models/digits:predict", json.dumps({"instances": [[[["1.5"]] * 8] * 8]}).encode()), 400, "strings are not numbers"),
    ("ragged instances", post("/v1/models/digits:predict", json.dumps({"instances": [DIGIT, DIGIT[:7]]}).encode()), 400, "rectangular"),
    ("one instance over max_batch", post("/v1/models/digits:predict", json.dumps({"instances": [DIGIT] * 1025}).encode()), 400, "max_batch"),
    (
        "100,000 instances (over the body cap, refused before reading)",
        b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 27000000\r\n\r\n" + b"{" * 1000,
        400,
        "max_body_bytes",
    ),
    ("chunk size -1", b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400, "chunk size"),
    ("non-hex chunk size", b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "chunk size"),
    ("chunk over the body cap", b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFF\r\n", 400, "max_body_bytes"),
    ("conflicting Content-Length", b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 20\r\n\r\n{}", 400, "Content-Length"),
    ("invalid Content-Length", b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400, "Content-Length"),
    ("Content-Length and chunked", b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "both"),
    ("gzip transfer coding", b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "Transfer-Encoding"),
    ("no body length", b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n\r\n", 400, "Content-Length"),
    ("deeply nested JSON", post("/v1/models/digits:predict", b'{"instances": ' + b"[" * 100000 + b"]" * 100000 + b"}"), 400, "JSON"),
    ("unknown path", b"GET /v2/health HTTP/1.1\r\nHost: x\r\n\r\n", 404, "unknown path"),
    ("PUT on predict", post("/v1/models/digits:predict", b"{}").replace(b"POST", b"PUT", 1), 405, "not allowed"),
    ("DELETE a model", b"DELETE /v1/models/digits HTTP/1.1\r\nHost: x\r\n\r\n", 405, "not allowed"),
    ("GET predict", b"GET /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n\r\n", 405, "not allowed"),
    ("POST /healthz", post("/healthz", b"{}"), 405, "not allowed"),
    ("unknown verb", post("/v1/models/digits:explode", b"{}"), 404, "unknown path"),
    ("too many headers", b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431, ""),
    ("request line too long", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, ""),
    ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, ""),
]


@pytest.mark.parametrize("data, status, words", [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_each_attack_gets_its_answer_and_the_model_keeps_serving(served: Served, data: bytes, status: int, words: str) -> None:
    got, body, seconds = raw_exchange(served.port, data)
    assert got == status, (got, body)
    assert body is not None and set(body) == {"error"} and words in body["error"], body
    assert seconds < IDLE_S, "answered at once, not after a timeout"
    served.predict_ok()
    served.no_rollback()


def test_nan_inputs_are_served_and_counted_as_the_callers(served: Served) -> None:
    x = served.x[:3].copy()
    x[:, 2, 2, 0] = np.nan
    body = json.dumps({"instances": x.tolist()}).encode()  # NaN: TF Serving's JSON extension
    for _ in range(30):
        status, reply, _ = raw_exchange(served.port, post("/v1/models/digits:predict", body))
        assert status == 200, reply
    client = served.agent.client()
    _, text = client.request("GET", "/metrics")
    client.close()
    counts = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("edgeship_predict_") and not line.startswith("edgeship_predict_latency")
    }
    assert counts["edgeship_predict_nonfinite_input_total"] >= 30
    assert counts["edgeship_predict_nonfinite_total"] == 0
    assert counts["edgeship_predict_model_failures_total"] == 0
    assert counts["edgeship_predict_caller_errors_total"] >= 1
    served.no_rollback()


def test_slow_and_idle_clients_are_cut_off_at_their_deadline(served: Served) -> None:
    slow = socket.create_connection(("127.0.0.1", served.port))
    start = time.monotonic()
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ":  # one byte every 0.3 s
            slow.sendall(bytes([byte]))
            time.sleep(0.3)
            if time.monotonic() - start > 3 * IDLE_S:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    slow.settimeout(5)
    try:
        answer = slow.recv(4096)
    except ConnectionResetError:
        answer = b""
    assert answer.startswith(b"HTTP/1.1 408") or answer == b"", answer
    assert time.monotonic() - start < 3 * IDLE_S + 1
    slow.close()
    idle = socket.create_connection(("127.0.0.1", served.port))
    idle.settimeout(IDLE_S * 3)
    start = time.monotonic()
    assert idle.recv(10) == b""  # closed by the agent, silently
    assert IDLE_S - 0.5 < time.monotonic() - start < IDLE_S * 2
    idle.close()
    served.predict_ok()


def test_the_largest_admitted_request_answers_and_memory_comes_back(served: Served) -> None:
    before = rss_mb(served.agent.proc.pid)
    rng = np.random.default_rng(0)
    body = json.dumps({"instances": rng.uniform(0, 16, (1024, 8, 8, 1)).tolist()}).encode()
    for _ in range(3):
        status, reply, _ = raw_exchange(served.port, post("/v1/models/digits:predict", body), wait_s=30)
        assert status == 200 and len(reply["predictions"]) == 1024  # type: ignore[index]
    served.predict_ok()
    after = wait_for(lambda: (rss_mb(served.agent.proc.pid) - before < 8) or None, 10, what="RSS to come back")
    assert after
    served.no_rollback()


def test_a_connection_flood_under_a_1024_file_limit_leaves_the_control_socket_and_api_alive(served: Served) -> None:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limit[1] < 2048:
        pytest.skip("this test process needs 1,100+ file descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit[1], limit[1]))
    before = rss_mb(served.agent.proc.pid)
    flood: list[socket.socket] = []
    try:
        for _ in range(1100):
            flood.append(socket.create_connection(("127.0.0.1", served.port), timeout=5))
        # the control socket answers while the flood holds every connection slot
        doc = served.agent.status()
        assert doc["running"] is True
        # every connection ends, bounded in time: a 503 at once beyond the cap, or
        # closed silently at its deadline (it never sent a request)
        answers: dict[int, bytes] = {}
        with selectors.DefaultSelector() as selector:
            for i, sock in enumerate(flood):
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, i)
            deadline = time.monotonic() + 30
            while len(answers) < len(flood) and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=0.5):
                    try:
                        answers[key.data] = key.fileobj.recv(64)  # type: ignore[union-attr]
                    except ConnectionResetError:
                        answers[key.data] = b""
                    selector.unregister(key.fileobj)
        assert len(answers) == len(flood), f"{len(flood) - len(answers)} connections still held"
        refused = sum(a.startswith(b"HTTP/1.1 503") for a in answers.values())
        assert refused >= 1, "beyond the cap a connection gets an answer, not a hang"
        assert all(a == b"" or a.startswith(b"HTTP/1.1 503") for a in answers.values())
    finally:
        for sock in flood:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, limit)
    # the silent connections are dropped at their deadline; the API serves again
    wait_for(lambda: raw_exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200 or None, 15,
             what="the API after the flood")
    served.predict_ok()
    served.no_rollback()
    wait_for(lambda: (rss_mb(served.agent.proc.pid) - before < 8) or None, 15, what="RSS to come back")


# -- probation ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_repo(
    tmp_path_factory: pytest.TempPathFactory, digits_tflite: Path, digits_int8_tflite: Path, digits_files: dict[str, Path]
) -> AgentRepo:
    """A release repository with the digits model (1.0.0, and again as 1.1.0) and a model that produces NaN
    on every real digit (2.0.0): its output adds sqrt(first pixel - 0.5), and the first
    pixel of every digit is 0. Its golden vectors use a first pixel of 1, so it passes
    the self-test and fails only in service."""
    import tensorflow as tf

    from edgeship.ota.bundle import build_bundle
    from edgeship.ota.release import ReleaseRepository

    base = tmp_path_factory.mktemp("nan-repo")
    model = tf.keras.models.load_model(digits_files["model"])
    image = tf.keras.Input(shape=(8, 8, 1), name="image")
    nan_out = tf.keras.layers.Lambda(lambda t: t[0] + tf.sqrt(t[1][:, 0:1, 0, 0] - 0.5))([model(image), image])
    nan_path = base / "nan.tflite"
    nan_path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(image, nan_out)).convert())
    x = np.load(digits_files["eval"])["x"][:8].astype(np.float32)
    assert (x[:, 0, 0, 0] == 0).all()
    golden_x = x.copy()
    golden_x[:, 0, 0, 0] = 1.0
    repo = ReleaseRepository(base / "repo")
    repo.init(root_passphrase=PASSPHRASE)
    for version, path, gx in (("1.0.0", digits_tflite, x), ("1.1.0", digits_tflite, x), ("2.0.0", nan_path, golden_x)):
        golden = make_golden(path, gx, base / f"{version}.golden.npz")
        bundle = base / f"{version}.bundle"
        build_bundle(path, name="digits", version=version, out=bundle, golden=golden)
        repo.publish(bundle)
    (base / "packages").mkdir()
    return AgentRepo(path=base / "repo", out=base / "packages", eval_x=x, fp32=digits_tflite, int8=digits_int8_tflite)


def _probation_agent(folder: Path, repo: AgentRepo) -> tuple[AgentProcess, Path]:
    config = write_config(folder, repo, window_s=0.3)
    assert agent_cli("install", str(repo.export("1.0.0")), "--config", str(config)).returncode == 0
    config.write_text(config.read_text().replace("window_s = 0.3", "window_s = 4.0"))
    agent = AgentProcess(config)
    agent.wait_serving()
    wait_for(lambda: agent.status()["update"]["terminal"] or None, 30, what="the first install's probation")
    return agent, config


def _flood_during_probation(agent: AgentProcess, x: np.ndarray, bad: bool) -> None:
    port = int(agent.status()["server"].rsplit(":", 1)[1])
    nan_x = x[:2].copy()
    nan_x[:, 3, 3, 0] = np.nan
    bodies = [post("/v1/models/digits:predict", json.dumps({"instances": nan_x.tolist()}).encode())]
    if bad:
        bodies += [
            post("/v1/models/digits:predict", b'{"instances": [[null]]}'),
            post("/v1/models/digits:predict", json.dumps({"instances": [[[[True]] * 8] * 8]}).encode()),
            post("/v1/models/digits:predict", b"{not json"),
        ]
    for i in range(120):
        raw_exchange(port, bodies[i % len(bodies)])


def test_a_flood_of_bad_and_nan_inputs_does_not_roll_back_a_healthy_model(tmp_path: Path, nan_repo: AgentRepo) -> None:
    agent, config = _probation_agent(tmp_path, nan_repo)
    try:
        # a healthy model (the same digits model, as a new version) in probation
        result = agent_cli("install", str(nan_repo.export("1.1.0")), "--config", str(config), "--no-wait")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: agent.status()["update"]["state"] in ("PROBATION", "COMMITTED", "ROLLED_BACK") or None, 30,
                 what="probation")
        _flood_during_probation(agent, nan_repo.eval_x, bad=True)
        doc = wait_for(lambda: (d := agent.status())["update"]["terminal"] and d or None, 30, what="the verdict")
        assert doc["update"]["state"] == "COMMITTED", doc["update"]
    finally:
        agent.stop()


def test_a_model_that_produces_nan_on_valid_input_is_rolled_back(tmp_path: Path, nan_repo: AgentRepo) -> None:
    agent, config = _probation_agent(tmp_path, nan_repo)
    try:
        result = agent_cli("install", str(nan_repo.export("2.0.0")), "--config", str(config), "--no-wait")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: agent.status()["active"]["version"] == "2.0.0" or None, 30, what="activation")
        port = int(agent.status()["server"].rsplit(":", 1)[1])
        body = post("/v1/models/digits:predict", json.dumps({"instances": nan_repo.eval_x[:2].tolist()}).encode())
        for _ in range(30):
            raw_exchange(port, body)
        doc = wait_for(lambda: (d := agent.status())["update"]["terminal"] and d or None, 30, what="the verdict")
        assert doc["update"]["state"] == "ROLLED_BACK" and "NaN" in doc["update"]["reason"], doc["update"]
        assert doc["active"]["version"] == "1.0.0"
    finally:
        agent.stop()


def test_metrics_pass_promtool_and_show_connections(served: Served) -> None:
    import shutil
    import subprocess

    client = served.agent.client()
    status, text = client.request("GET", "/metrics")
    client.close()
    assert status == 200
    assert "edgeship_http_connections " in text and "edgeship_http_connections_refused_total " in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_chunked_upload_from_requests_is_served(served: Served) -> None:
    import requests

    document = json.dumps({"instances": served.x[:3].tolist()}).encode()
    pieces = iter([document[:10], document[10:1000], document[1000:]])  # a generator: requests sends it chunked
    reply = requests.post(f"http://127.0.0.1:{served.port}/v1/models/digits:predict", data=pieces, timeout=10)
    assert reply.status_code == 200 and len(reply.json()["predictions"]) == 3
    reply = requests.put(f"http://127.0.0.1:{served.port}/v1/models/digits:predict", json={}, timeout=10)
    assert reply.status_code == 405 and reply.headers["Allow"] == "POST" and "error" in reply.json()


def test_a_body_that_never_comes_is_a_408_at_the_body_deadline(served: Served) -> None:
    start = time.monotonic()
    status, body, _ = raw_exchange(
        served.port, b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"inst",
        wait_s=IDLE_S * 4,
    )
    assert status == 408 and body is not None and "in time" in body["error"], body
    assert IDLE_S - 0.5 < time.monotonic() - start < IDLE_S * 3
    served.predict_ok()
    served.no_rollback()
