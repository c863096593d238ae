"""Device-agent benchmarks (docs/benchmarks.md, section ``agent``), each beside a
baseline measured in the same run:

1. idle RSS of ``edgeship-agent run`` serving digits vs a bare Python + numpy + LiteRT
   process holding the same model (target: agent <= 60 MB);
2. in-process predict (``ServingModel.predict``: float I/O, shape checks, telemetry)
   vs a bare interpreter ``set_tensor/invoke/get_tensor`` loop on the public LiteRT API
   (target: <= 10% more): interleaved rounds, the median of each round's own ratio
   (``--only-overhead MODEL.tflite`` measures just this);
3. HTTP predict through the real agent process, keep-alive TF Serving-style clients in
   another process, vs the bare interpreter loop (targets: >= 1,000 req/s, p99 < 5 ms);
4. 100 hot swaps under that load: failed requests (target 0) and p99 during swaps vs
   steady state (target <= 2x);
5. start to first successful prediction of ``edgeship-agent run`` (target <= 1.5 s) vs a
   bare process that imports LiteRT, loads the model and invokes it once;
6. idle RSS after one update installed through the running agent's control socket (the
   state a device idles in; target <= 60 MB) vs the same process before the update, and
   vs the verification run in the agent's own process (``EDGESHIP_AGENT_VERIFY_IN_PROCESS=1``);
   the same for an update from the fleet over Mosquitto (MQTT blocks), where mosquitto is installed;
7. RSS of the serving agent after the largest predict request its default [limits] admit, and
   with 1,000 idle connections open and after they close, vs its idle RSS just before (target:
   back within 5 MB).

Reproduce: ``.venv/bin/python benchmarks/agent.py --write`` (about 2 minutes).

``--protocols`` measures the protocol front ends instead (``benchmarks/agent_protocols.py``:
MobileNetV2 frames over every protocol beside bare LiteRT and a FastAPI wrapper, two models at
once on a real ``edgeship-agent run`` with one of them updated under load, idle RSS with gRPC;
section ``agent-protocols``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "digits"))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))  # mqtt_broker: the tests' Mosquitto runner

TARGETS = {
    "rss_mb": 60.0,
    "overhead_pct": 10.0,
    "rps": 1000.0,
    "p99_ms": 5.0,
    "swap_p99_ratio": 2.0,
    "start_s": 1.5,
    "rss_back_mb": 5.0,
}


# -- load generator (its own process, so the agent's CPU is not the client's) ---------------------
def _client_process(
    host: str, port: int, body: bytes, seconds: float, connections: int, queue: Any
) -> None:
    stop = time.perf_counter() + seconds
    results: list[tuple[list[float], int, int]] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        lat: list[float] = []
        ok = failed = 0
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                conn.request(
                    "POST", "/v1/models/digits:predict", body, {"Content-Type": "application/json"}
                )
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    ok += 1
                else:
                    failed += 1
            except (OSError, http.client.HTTPException):
                failed += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
            lat.append((time.perf_counter() - start) * 1000.0)
        conn.close()
        with lock:
            results.append((lat, ok, failed))

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    latencies = [v for lat, _, _ in results for v in lat]
    queue.put(
        {
            "ok": sum(r[1] for r in results),
            "failed": sum(r[2] for r in results),
            "elapsed": elapsed,
            "latencies": latencies,
        }
    )


def load(host: str, port: int, body: bytes, seconds: float, connections: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(host, port, body, seconds, connections, queue))
    proc.start()
    result = queue.get(timeout=seconds + 60)
    proc.join()
    lat = np.array(result["latencies"]) if result["latencies"] else np.array([0.0])
    result.update(
        rps=result["ok"] / result["elapsed"],
        p50=float(np.percentile(lat, 50)),
        p99=float(np.percentile(lat, 99)),
    )
    del result["latencies"]
    return result


# -- helpers -----------------------------------------------------------------------------------------
def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A /proc/PID/status size in MB: VmRSS (resident now) or VmHWM (its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def interleaved(model: Path, x: np.ndarray, n: int, chunk: int = 2000) -> dict[str, float]:
    """Nanoseconds per prediction of three paths over one interpreter, taken in turn
    call by call (each path between two clock reads; the order rotates every chunk):

    - bare: what any caller of the interpreter must do for one prediction, through
      LiteRT's public API, inline (no call of its own): set the input (``set_tensor``,
      a copy), ``invoke``, read the output (``get_tensor``, a copy);
    - run: the runtime layer, ``runner.run`` (its lock, the float I/O checks);
    - predict: ``ServingModel.predict``, what the agent's server calls: the same plus
      the latency measurement and the telemetry, folds and samples included.

    One interpreter for all three and the paths side by side call by call, so the
    comparison is of the code around ``invoke`` only: two interpreters of one model
    can differ by several per cent in speed (where XNNPACK's buffers happen to
    lie), and this shared machine's speed drifts from one second to the next. The
    overhead is the ratio of the totals (predict time / bare time over all calls:
    the mean cost, folds included); the chunks' own ratios give its spread."""
    from edgeship.agent.runtimes import open_model
    from edgeship.agent.serving import LoadedModel, ServingModel, warm_up

    runner = open_model(model, threads=1, prefer=["litert"])
    warm_up(runner, [x], runs=500)
    serving = ServingModel()
    serving.swap(LoadedModel("digits", "1", runner))
    interp = runner._interpreter  # the one the runner and predict wrap
    i = interp.get_input_details()[0]["index"]
    o = interp.get_output_details()[0]["index"]
    set_tensor, invoke, get_tensor = interp.set_tensor, interp.invoke, interp.get_tensor
    run, predict = runner.run, serving.predict
    clock = time.perf_counter_ns
    inputs = [x]

    def chunk_times(order: int) -> tuple[int, int, int]:
        bare_ns = run_ns = predict_ns = 0
        for _ in range(chunk):
            if order == 0:
                t0 = clock()
                set_tensor(i, x)
                invoke()
                get_tensor(o)
                t1 = clock()
                run(inputs)
                t2 = clock()
                predict(inputs)
                t3 = clock()
                bare_ns += t1 - t0
                run_ns += t2 - t1
                predict_ns += t3 - t2
            elif order == 1:
                t0 = clock()
                run(inputs)
                t1 = clock()
                predict(inputs)
                t2 = clock()
                set_tensor(i, x)
                invoke()
                get_tensor(o)
                t3 = clock()
                run_ns += t1 - t0
                predict_ns += t2 - t1
                bare_ns += t3 - t2
            else:
                t0 = clock()
                predict(inputs)
                t1 = clock()
                set_tensor(i, x)
                invoke()
                get_tensor(o)
                t2 = clock()
                run(inputs)
                t3 = clock()
                predict_ns += t1 - t0
                bare_ns += t2 - t1
                run_ns += t3 - t2
        return bare_ns, run_ns, predict_ns

    chunks = [chunk_times(c % 3) for c in range(max(3, n // chunk))]
    bare = [c[0] for c in chunks]

    def overhead(k: int) -> list[float]:
        return [100.0 * (c[k] / b - 1) for c, b in zip(chunks, bare)]

    q1, q2, q3 = statistics.quantiles(overhead(2), n=4)
    calls = chunk * len(chunks)
    total = [sum(c[k] for c in chunks) for k in range(3)]
    return {
        "bare_us": total[0] / calls / 1e3,
        "run_us": total[1] / calls / 1e3,
        "predict_us": total[2] / calls / 1e3,
        "run_pct": 100.0 * (total[1] / total[0] - 1),
        "predict_pct": 100.0 * (total[2] / total[0] - 1),
        "predict_extra_ns": (total[2] - total[0]) / calls,
        "predict_chunk_q1_pct": q1,
        "predict_chunk_median_pct": q2,
        "predict_chunk_q3_pct": q3,
        "chunks": len(chunks),
        "calls": calls,
    }


def overhead_in_processes(model: Path, calls: int, processes: int) -> dict[str, Any]:
    """``interleaved`` in several fresh processes, one after the other: where a
    process's buffers happen to lie moves its result by a few per cent (cache
    effects), so one process is one sample. The headline is the median process."""
    runs = []
    for k in range(processes):
        out = subprocess.run(
            [sys.executable, __file__, "--only-overhead", str(model), "--calls", str(calls)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        ).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  in-process overhead, process {k + 1}/{processes}: {runs[-1]['predict_pct']:+.1f}%", flush=True)
    runs.sort(key=lambda r: r["predict_pct"])
    result = dict(runs[len(runs) // 2])  # the median process
    result["processes"] = [r["predict_pct"] for r in runs]
    result["run_processes"] = sorted(r["run_pct"] for r in runs)
    return result


def make_device(base: Path) -> tuple[Path, Path, Path]:
    """A release repository with digits 1.0.0 and 2.0.0, an agent config, and digits 1.0.0
    installed and committed (the real offline-package path)."""
    import tensorflow as tf
    from model import save_digits_model

    from edgeship.agent.config import load_config, render_config
    from edgeship.agent.runtimes import open_model
    from edgeship.agent.serving import ServingModel
    from edgeship.agent.sources import OfflinePackageSource
    from edgeship.agent.updater import UpdateDriver
    from edgeship.ota.bundle_build import build_bundle
    from edgeship.ota.golden import GoldenVectors
    from edgeship.ota.release import ReleaseRepository

    files = save_digits_model(base / "digits", epochs=8)
    keras_model = tf.keras.models.load_model(files["model"])
    model = base / "digits.tflite"
    model.write_bytes(tf.lite.TFLiteConverter.from_keras_model(keras_model).convert())
    x = np.load(files["eval"])["x"][:8].astype(np.float32)
    with open_model(model) as runner:
        (y,) = runner.run([x])
    GoldenVectors(("image",), (x,), ("probs",), (y,), atol=1e-4).save(base / "golden.npz")
    repo = ReleaseRepository(base / "repo")
    repo.init(root_passphrase="benchmark-passphrase")
    for version in ("1.0.0", "2.0.0"):
        build_bundle(
            model,
            name="digits",
            version=version,
            out=base / f"{version}.bundle",
            golden=base / "golden.npz",
        )
        repo.publish(base / f"{version}.bundle")
    config_path = base / "agent.toml"
    config_path.write_text(
        render_config(
            data=str(base / "data"),
            device_id="bench",
            fleet="bench",
            root=str(repo.root_metadata_path),
            director_key=str(repo.director_public_key_path),
            bind="127.0.0.1:0",
        ).replace("window_s = 60.0", "window_s = 0.1")
    )
    repo.export("digits", "1.0.0", base / "1.package", fleet="bench")
    driver = UpdateDriver(load_config(config_path), serving=ServingModel())
    driver.begin(OfflinePackageSource(base / "1.package"))
    record = driver.run()
    assert record.state == "COMMITTED", record.reason
    return config_path, model, base / "digits"


def start_agent(
    config: Path, extra_env: dict[str, str] | None = None, python: list[str] | None = None
) -> tuple[subprocess.Popen, str, int, float]:
    """Start ``edgeship-agent run`` (with ``python``: that command line's Python, e.g. one in
    an emulated ARM root); returns it, its address and the time to first prediction."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    begin = time.perf_counter()
    proc = subprocess.Popen(
        [*(python or [sys.executable]), "-m", "edgeship.agent.cli", "run", "--config", str(config), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    doc = json.loads(proc.stdout.readline())  # printed once the API listens
    host, port = doc["server"].removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"instances": np.zeros((1, 8, 8, 1)).tolist()})
    while True:
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            conn.request("POST", "/v1/models/digits:predict", body)
            if conn.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.005)
    return proc, host, int(port), time.perf_counter() - begin


def rss_under_abuse(proc: subprocess.Popen, host: str, port: int, settle_s: float = 2.0) -> dict[str, float]:
    """VmRSS of a serving agent: idle; after the largest predict request its default
    [limits] admit for digits (max_batch = 1,024 instances of full-precision random
    floats), three times; while 1,000 idle connections are open (beyond the connection
    cap they get a 503 and are closed); and after they are gone."""
    import resource
    import socket

    from edgeship.agent.config import AgentConfig

    defaults = AgentConfig(device_id="d", fleet="f", data_dir=Path("."), root_metadata=Path("."),
                           director_key=Path("."))
    rng = np.random.default_rng(0)
    body = json.dumps({"instances": rng.uniform(0, 16, (defaults.max_batch, 8, 8, 1)).tolist()}).encode()
    assert len(body) <= defaults.max_body_bytes
    out: dict[str, float] = {"idle": rss_mb(proc.pid), "body_mb": len(body) / 1e6}
    for _ in range(3):
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("POST", "/v1/models/digits:predict", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()[:200]
        response.read()
        conn.close()
    out["peak_large"] = rss_mb(proc.pid, "VmHWM")
    time.sleep(settle_s)
    out["after_large"] = rss_mb(proc.pid)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(1000)]
    time.sleep(settle_s)
    out["during_idle"] = rss_mb(proc.pid)
    for sock in idle:
        sock.close()
    time.sleep(settle_s)
    out["after_idle"] = rss_mb(proc.pid)
    return out


def rss_after_update(
    config: Path, package: Path, data: Path, committed: Path, extra_env: dict[str, str] | None = None
) -> dict[str, float]:
    """Idle RSS of ``edgeship-agent run`` before and after one update, as a device does it:
    start the agent (digits 1.0.0 committed: ``data`` restored from ``committed``), idle,
    read VmRSS; ``edgeship-agent install PACKAGE`` through the control socket (it follows
    the update to its end: COMMITTED after the probation window); idle 3 s; read VmRSS
    of the same agent process again."""
    import shutil

    shutil.rmtree(data)
    shutil.copytree(committed, data)
    proc, host, port, _ = start_agent(config, extra_env)
    try:
        time.sleep(1.0)
        before = rss_mb(proc.pid)
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "edgeship.agent.cli", "install", str(package), "--config",
             str(config), "--json"],
            capture_output=True,
            check=False,
            text=True,
            timeout=120,
            env={**os.environ, **(extra_env or {})},
        )
        seconds = time.perf_counter() - began
        doc = json.loads(done.stdout)
        state = doc["update"]["state"]
        assert done.returncode == 0 and state == "COMMITTED", (state, doc["update"]["reason"])
        assert doc["active"]["version"] == "2.0.0", doc["active"]
        conn = http.client.HTTPConnection(host, port, timeout=5)  # it serves the new model
        conn.request("POST", "/v1/models/digits:predict",
                     json.dumps({"instances": np.zeros((1, 8, 8, 1)).tolist()}))
        assert conn.getresponse().status == 200
        time.sleep(3.0)  # idle
        after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return {"before": before, "after": after, "install_s": seconds}


def rss_after_fleet_update(
    config: Path, repo: Path, data: Path, committed: Path, broker_url: str, extra_env: dict[str, str] | None = None
) -> dict[str, float]:
    """The same as ``rss_after_update`` for a fleet device: ``edgeship-agent run`` with a
    broker in its config (digits 1.0.0 committed), idle; then the fleet side (a real
    BlockServer, the repository's director key) publishes a signed desired state for
    2.0.0, retained; the agent verifies it, fetches the bundle in MQTT blocks, self-tests,
    swaps, probation, COMMITTED; idle 3 s; VmRSS of the same agent process again."""
    import shutil

    from edgeship.ota.protocol import DesiredMessage, encode_message
    from edgeship.ota.release import ReleaseRepository
    from edgeship.ota.topics import DESIRED, device_topic
    from edgeship.ota.transport import MqttConnection
    from edgeship.toolkit.blockserver import BlockServer

    shutil.rmtree(data)
    shutil.copytree(committed, data)
    fleet_side = MqttConnection(broker_url, client_id=f"bench-director-{os.getpid()}").connect(10)
    blocks = BlockServer(fleet_side, repo, fleet="bench").start()
    topic = device_topic("bench", "bench", DESIRED)
    proc, host, port, _ = start_agent(config, extra_env)
    try:
        time.sleep(2.0)  # connected, idle
        before = rss_mb(proc.pid)
        began = time.perf_counter()
        envelope = ReleaseRepository(repo).sign_desired(fleet="bench", device="bench", name="digits", version="2.0.0")
        fleet_side.publish(topic, encode_message(DesiredMessage(envelope)), qos=1, retain=True)
        while True:
            done = subprocess.run(
                [sys.executable, "-m", "edgeship.agent.cli", "status", "--config", str(config), "--json"],
                capture_output=True, check=False, text=True, timeout=60,
            )
            doc = json.loads(done.stdout)
            update = doc.get("update") or {}
            if (doc.get("active") or {}).get("version") == "2.0.0" and update.get("state") == "COMMITTED":
                break
            assert update.get("state") not in ("FAILED", "REJECTED", "ROLLED_BACK"), update
            assert time.perf_counter() - began < 120, "the fleet update did not end within 120 s"
            time.sleep(0.2)
        seconds = time.perf_counter() - began
        conn = http.client.HTTPConnection(host, port, timeout=5)  # it serves the new model
        conn.request("POST", "/v1/models/digits:predict",
                     json.dumps({"instances": np.zeros((1, 8, 8, 1)).tolist()}))
        assert conn.getresponse().status == 200
        time.sleep(3.0)  # idle
        after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        fleet_side.publish(topic, b"", qos=1, retain=True)  # the next agent starts without it
        blocks.stop()
        fleet_side.close()
    return {"before": before, "after": after, "install_s": seconds}


_BARE_START = """
import time, numpy as np
from ai_edge_litert.interpreter import Interpreter
i = Interpreter(model_path={model!r}); i.allocate_tensors()
d = i.get_input_details()[0]; i.set_tensor(d["index"], np.zeros(d["shape"], np.float32)); i.invoke()
import os; print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]); time.sleep({sleep})
"""


def bare_process(model: Path) -> tuple[float, float]:
    """(seconds to first invoke, RSS MB) of a bare Python + numpy + LiteRT process."""
    begin = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _BARE_START.format(model=str(model), sleep=0)],
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=60)
    return time.perf_counter() - begin, int(out.strip()) / 1024.0


def hot_swaps_under_load(
    model: Path, x: np.ndarray, swaps: int, connections: int
) -> dict[str, Any]:
    """In one process: the real ApiServer and ServingModel; the load from another process.
    Steady state first, then the same load while ``swaps`` swaps happen (each new
    runner loaded and warmed before the switch)."""
    from edgeship.agent.runtimes import open_model
    from edgeship.agent.server import ApiServer
    from edgeship.agent.serving import LoadedModel, ServingModel, warm_up

    def fresh(version: str) -> LoadedModel:
        runner = open_model(model, threads=1)
        warm_up(runner, [x[:1]])
        return LoadedModel("digits", version, runner)

    serving = ServingModel()
    serving.swap(fresh("1"))
    with tempfile.TemporaryDirectory() as folder:
        server = ApiServer(serving, Path(folder), port=0).start()
        body = json.dumps({"instances": x[:1].tolist()}).encode()
        steady = load(server.host, server.port, body, 5.0, connections)
        result: dict[str, Any] = {}
        seconds = 10.0

        def swapper() -> None:
            time.sleep(0.5)
            gap = (seconds - 1.5) / swaps
            for i in range(swaps):
                serving.swap(fresh(str(i + 2)))
                time.sleep(gap)
            result["swaps"] = swaps

        thread = threading.Thread(target=swapper)
        thread.start()
        during = load(server.host, server.port, body, seconds, connections)
        thread.join()
        server.stop()
    return {"steady": steady, "during": during, "swaps": result.get("swaps", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write", action="store_true", help="write docs/benchmarks.md section 'agent'"
    )
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument(
        "--calls", type=int, default=200_000, help="in-process: calls per path (default 200,000)"
    )
    parser.add_argument(
        "--processes", type=int, default=5, help="in-process: fresh processes measured (default 5)"
    )
    parser.add_argument(
        "--only-overhead",
        metavar="MODEL",
        type=Path,
        help="measure only the in-process overhead on this .tflite (batch 1, random input); no --write",
    )
    parser.add_argument(
        "--protocols",
        action="store_true",
        help="measure only the protocols on camera frames, two models at once (one updated under load) "
        "and RSS with gRPC "
        "(benchmarks/agent_protocols.py; section agent-protocols)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.protocols:
        from agent_protocols import run as run_protocols

        run_protocols(args.write, rounds=10, seconds=8.0)
        return
    if args.only_overhead:
        from ai_edge_litert.interpreter import Interpreter

        shape = Interpreter(model_path=str(args.only_overhead)).get_input_details()[0]["shape"]
        x1 = np.random.default_rng(0).random(shape).astype(np.float32)
        ov = interleaved(args.only_overhead, x1, args.calls)
        print(json.dumps({k: round(v, 3) for k, v in ov.items()}))
        return
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        base = Path(tmp)
        config, model, _ = make_device(base)
        from edgeship.agent.isolated import VERIFY_IN_PROCESS_ENV
        from edgeship.ota.release import ReleaseRepository

        ReleaseRepository(base / "repo").export("digits", "2.0.0", base / "2.package", fleet="bench")
        import shutil

        shutil.copytree(base / "data", base / "data.committed")
        x = np.load(base / "digits" / "eval.npz")["x"][:8].astype(np.float32)
        x1 = x[:1]

        # 5 and 1: start to first prediction and idle RSS (median of 3 starts)
        starts, rss = [], []
        for _ in range(3):
            proc, host, port, seconds = start_agent(config)
            starts.append(seconds)
            time.sleep(1.0)  # idle
            rss.append(rss_mb(proc.pid))
            proc.terminate()
            proc.wait(timeout=20)
        bare = [bare_process(model) for _ in range(3)]
        bare_start = statistics.median(b[0] for b in bare)
        bare_rss = statistics.median(b[1] for b in bare)
        start_s, rss_agent = statistics.median(starts), statistics.median(rss)
        print(
            f"start to first prediction: agent {start_s:.3f} s, bare LiteRT process {bare_start:.3f} s"
        )
        print(f"idle RSS: agent {rss_agent:.1f} MB, bare Python+numpy+LiteRT {bare_rss:.1f} MB")

        # 1b: idle RSS after one update (median of 3), and the same with the verification
        # in the agent's own process (what the agent did before; docs/agent.md)
        upd = [
            rss_after_update(config, base / "2.package", base / "data", base / "data.committed")
            for _ in range(3)
        ]
        inproc = [
            rss_after_update(
                config,
                base / "2.package",
                base / "data",
                base / "data.committed",
                {VERIFY_IN_PROCESS_ENV: "1"},
            )
            for _ in range(3)
        ]
        upd_before = statistics.median(u["before"] for u in upd)
        upd_after = statistics.median(u["after"] for u in upd)
        upd_s = statistics.median(u["install_s"] for u in upd)
        inproc_after = statistics.median(u["after"] for u in inproc)
        inproc_s = statistics.median(u["install_s"] for u in inproc)
        print(
            f"idle RSS after one update: agent {upd_after:.1f} MB (same process before it "
            f"{upd_before:.1f} MB; install {upd_s:.2f} s); verification in the agent's process: "
            f"{inproc_after:.1f} MB (install {inproc_s:.2f} s)"
        )

        # 1c: the same for a fleet device: the update over MQTT (Mosquitto), verified in
        # children that download through the agent's connection (docs/agent.md)
        fleet: dict[str, float] | None = None
        fleet_inproc: dict[str, float] | None = None
        try:
            from mqtt_broker import MosquittoBroker

            broker = MosquittoBroker(base / "mosquitto").start()
        except RuntimeError as exc:  # no mosquitto on this machine: the row says so
            print(f"fleet update RSS not measured: {exc}")
        else:
            try:
                from edgeship.agent.config import render_config
                from edgeship.ota.release import ReleaseRepository

                release = ReleaseRepository(base / "repo")
                fleet_config = base / "agent-fleet.toml"
                fleet_config.write_text(
                    render_config(
                        data=str(base / "data"), device_id="bench", fleet="bench",
                        root=str(release.root_metadata_path), director_key=str(release.director_public_key_path),
                        bind="127.0.0.1:0", broker=broker.url,
                    ).replace("window_s = 60.0", "window_s = 0.1")
                )
                runs = [
                    rss_after_fleet_update(fleet_config, base / "repo", base / "data", base / "data.committed",
                                           broker.url)
                    for _ in range(3)
                ]
                runs_inproc = [
                    rss_after_fleet_update(fleet_config, base / "repo", base / "data", base / "data.committed",
                                           broker.url, {VERIFY_IN_PROCESS_ENV: "1"})
                    for _ in range(3)
                ]
                fleet = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                fleet_inproc = {k: statistics.median(r[k] for r in runs_inproc) for k in runs_inproc[0]}
                print(
                    f"idle RSS after one fleet update: agent {fleet['after']:.1f} MB (connected, before it "
                    f"{fleet['before']:.1f} MB; update {fleet['install_s']:.2f} s); verification in the agent's "
                    f"process: {fleet_inproc['after']:.1f} MB (update {fleet_inproc['install_s']:.2f} s)"
                )
            finally:
                broker.stop()

        # 2: in-process overhead
        ov = overhead_in_processes(model, args.calls, args.processes)
        bare_us, run_us, agent_us = ov["bare_us"], ov["run_us"], ov["predict_us"]
        overhead = ov["predict_pct"]
        print(
            f"in-process predict (median of {len(ov['processes'])} processes, each {ov['calls']:,} calls per path): "
            f"bare set_tensor/invoke/get_tensor {bare_us:.2f} us, runner.run {run_us:.2f} us "
            f"({ov['run_pct']:+.1f}%), agent predict {agent_us:.2f} us ({overhead:+.1f}%); "
            f"all processes: {', '.join(f'{p:+.1f}%' for p in ov['processes'])}"
        )

        # 3: HTTP through the real agent process
        proc, host, port, _ = start_agent(config)
        try:
            body = json.dumps({"instances": x1.tolist()}).encode()
            load(host, port, body, 2.0, args.connections)  # warm-up
            http_result = load(host, port, body, 10.0, args.connections)
            http_more = load(host, port, body, 10.0, 2 * args.connections)  # and twice the concurrency
            abuse = rss_under_abuse(proc, host, port)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
        bare_rps = 1e6 / bare_us
        print(
            f"RSS under abuse: idle {abuse['idle']:.1f} MB; after the largest admitted request "
            f"({abuse['body_mb']:.2f} MB, 1,024 instances) {abuse['after_large']:.1f} MB (peak {abuse['peak_large']:.1f} MB); "
            f"with 1,000 idle connections {abuse['during_idle']:.1f} MB; after them {abuse['after_idle']:.1f} MB"
        )
        print(
            f"HTTP predict: {http_result['rps']:.0f} req/s, p50 {http_result['p50']:.2f} ms, "
            f"p99 {http_result['p99']:.2f} ms, {http_result['failed']} failed; bare loop {bare_rps:.0f} invokes/s; "
            f"{2 * args.connections} connections: {http_more['rps']:.0f} req/s, p99 {http_more['p99']:.2f} ms"
        )

        # 4: hot swaps under load
        swap = hot_swaps_under_load(model, x, 100, args.connections)
        ratio = swap["during"]["p99"] / swap["steady"]["p99"]
        print(
            f"hot swaps: {swap['swaps']} swaps, {swap['during']['failed']} failed of "
            f"{swap['during']['ok'] + swap['during']['failed']}; p99 {swap['during']['p99']:.2f} ms during vs "
            f"{swap['steady']['p99']:.2f} ms steady ({ratio:.2f}x)"
        )

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = [
        (
            "idle RSS serving digits",
            f"{rss_agent:.1f} MB",
            f"bare Python+numpy+LiteRT process: {bare_rss:.1f} MB ({rss_agent / bare_rss:.2f}x)",
            "<= 60 MB",
            verdict(rss_agent <= TARGETS["rss_mb"]),
        ),
        (
            "idle RSS after one update (offline package installed through the running agent, COMMITTED)",
            f"{upd_after:.1f} MB",
            (
                f"the same process before the update: {upd_before:.1f} MB ({upd_after - upd_before:+.1f} MB); "
                f"verification in the agent's own process (`EDGESHIP_AGENT_VERIFY_IN_PROCESS=1`): "
                f"{inproc_after:.1f} MB; install took {upd_s:.2f} s vs {inproc_s:.2f} s in-process"
            ),
            "<= 60 MB",
            verdict(upd_after <= TARGETS["rss_mb"]),
        ),
        (
            "idle RSS after one fleet update (desired state over MQTT, bundle in MQTT blocks, COMMITTED)",
            f"{fleet['after']:.1f} MB" if fleet else "not measured (no mosquitto)",
            (
                f"the same process before the update (connected, serving 1.0.0): {fleet['before']:.1f} MB "
                f"({fleet['after'] - fleet['before']:+.1f} MB); verification in the agent's own process: "
                f"{fleet_inproc['after']:.1f} MB; the update took {fleet['install_s']:.2f} s vs "
                f"{fleet_inproc['install_s']:.2f} s in-process"
            ) if fleet and fleet_inproc else "",
            "<= 60 MB",
            verdict(fleet is not None and fleet["after"] <= TARGETS["rss_mb"]),
        ),
        (
            "in-process predict, batch 1",
            f"{agent_us:.2f} us",
            (
                f"bare set_tensor/invoke/get_tensor: {bare_us:.2f} us ({overhead:+.1f}%, "
                f"{ov['predict_extra_ns']:.0f} ns a call; its chunks of 2,000 calls: quartiles "
                f"{ov['predict_chunk_q1_pct']:+.1f}%..{ov['predict_chunk_q3_pct']:+.1f}%); "
                f"the {len(ov['processes'])} processes: {', '.join(f'{p:+.1f}%' for p in ov['processes'])}"
            ),
            "<= +10%",
            verdict(overhead <= TARGETS["overhead_pct"]),
        ),
        (
            "of which the runtime layer (`runner.run`)",
            f"{run_us:.2f} us",
            (
                f"{ov['run_pct']:+.1f}% over bare (the processes: "
                f"{', '.join(f'{p:+.1f}%' for p in ov['run_processes'])}); the lock and the float I/O "
                "checks; the latency measurement and the telemetry are the rest"
            ),
            "",
            "",
        ),
        (
            "HTTP predict throughput",
            f"{http_result['rps']:.0f} req/s",
            f"bare invoke loop: {bare_rps:.0f} /s ({http_result['rps'] / bare_rps:.3f}x)",
            ">= 1,000 req/s",
            verdict(http_result["rps"] >= TARGETS["rps"]),
        ),
        (
            "HTTP predict p99",
            f"{http_result['p99']:.2f} ms",
            f"p50 {http_result['p50']:.2f} ms; {http_result['failed']} failed",
            "< 5 ms",
            verdict(http_result["p99"] < TARGETS["p99_ms"]),
        ),
        (
            f"HTTP predict with {2 * args.connections} connections",
            f"{http_more['rps']:.0f} req/s, p99 {http_more['p99']:.2f} ms",
            f"p50 {http_more['p50']:.2f} ms; {http_more['failed']} failed",
            ">= 1,000 req/s, p99 < 5 ms",
            verdict(http_more["rps"] >= TARGETS["rps"] and http_more["p99"] < TARGETS["p99_ms"]),
        ),
        (
            "RSS after the largest request the defaults admit (digits: 1,024 instances, "
            f"{abuse['body_mb']:.2f} MB of JSON, 3 times)",
            f"{abuse['after_large']:.1f} MB",
            (
                f"the same process idle just before: {abuse['idle']:.1f} MB ({abuse['after_large'] - abuse['idle']:+.1f} MB); "
                f"peak while serving it {abuse['peak_large']:.1f} MB"
            ),
            "<= +5 MB",
            verdict(abuse["after_large"] - abuse["idle"] <= TARGETS["rss_back_mb"]),
        ),
        (
            "RSS with 1,000 idle connections open, and after they close",
            f"{abuse['during_idle']:.1f} MB, then {abuse['after_idle']:.1f} MB",
            (
                f"idle before: {abuse['idle']:.1f} MB ({abuse['during_idle'] - abuse['idle']:+.1f} MB while open: "
                "256 held to their deadline, the rest answered 503 and closed)"
            ),
            "after: <= +5 MB",
            verdict(abuse["after_idle"] - abuse["idle"] <= TARGETS["rss_back_mb"]),
        ),
        (
            "100 hot swaps under load: failures",
            f"{swap['during']['failed']} of {swap['during']['ok'] + swap['during']['failed']}",
            f"{swap['swaps']} swaps in 10 s",
            "0",
            verdict(swap["during"]["failed"] == 0 and swap["swaps"] == 100),
        ),
        (
            "p99 during swaps vs steady",
            f"{swap['during']['p99']:.2f} ms",
            f"steady {swap['steady']['p99']:.2f} ms ({ratio:.2f}x)",
            "<= 2x",
            verdict(ratio <= TARGETS["swap_p99_ratio"]),
        ),
        (
            "start to first prediction",
            f"{start_s:.2f} s",
            f"bare LiteRT process to first invoke: {bare_start:.2f} s",
            "<= 1.5 s",
            verdict(start_s <= TARGETS["start_s"]),
        ),
    ]
    table = "\n".join(f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows)
    markdown = f"""## Device agent (`benchmarks/agent.py`)

Measured {time.strftime("%Y-%m-%d")} on {platform.machine()}, {os.cpu_count()} cores (shared), Python
{platform.python_version()}, LiteRT, the digits model (fp32 TFLite, batch 1, 1 interpreter thread). HTTP load:
{args.connections} keep-alive connections from a separate client process (Python `http.client`, TF
Serving-style JSON), 10 s. Swaps: the real `ApiServer` and `ServingModel`, each new interpreter
loaded and warmed before the switch, 100 swaps in 10 s under the same load.
In-process: {len(ov["processes"])} fresh processes, one after another, each with one interpreter that three
paths take in turn call by call ({ov["calls"]:,} calls each, in chunks of 2,000, the order rotating):
the paths see the same interpreter and the same moment of this shared machine, so what differs
is the code around `invoke`. A process's overhead is its total predict time over its total bare
time (the mean cost of a call, the telemetry's batched folds included); the headline is the
median process (where a process's buffers happen to lie moves its result by a few per cent).
Bare = what any caller must do through LiteRT's public API for one prediction, inline in the
loop: `set_tensor` (copies the input), `invoke`, `get_tensor` (copies the output). The agent's
`predict` does the same plus the runner's lock, the dtype and shape fallbacks, the latency
measurement and the telemetry (counts, latency histogram, NaN/Inf and class histogram of every
request, folded in batches; input statistics sampled; see docs/agent.md).
RSS and start time: median of 3 starts of `edgeship-agent run` with digits installed and committed.
RSS after one update: median of 3 agents, each started with digits 1.0.0 committed, then
`edgeship-agent install` of an offline package of digits 2.0.0 through the control socket (TUF
refresh, director signature, bounded download, safe extraction, self-test with golden vectors and
a second interpreter, hot swap, probation, commit), then 3 s idle; VmRSS of the agent process.
RSS after one fleet update: the same agents with a Mosquitto broker in their config; a real
`BlockServer` and the repository's director key publish a signed desired state for 2.0.0
(retained); the agent checks it, downloads the bundle in MQTT blocks, verifies, self-tests,
swaps and commits; median of 3, and of 3 more with `EDGESHIP_AGENT_VERIFY_IN_PROCESS=1`.
RSS under abuse: the agent of the HTTP rows, right after its load (its idle RSS then is the
baseline); three predict requests of 1,024 instances of full-precision random floats (the largest
the default `[limits]` admit for digits: `max_batch`), VmRSS 2 s after; then 1,000 idle TCP
connections held 2 s (256 take a thread until their deadline, the rest get a 503), VmRSS, and
VmRSS 2 s after they close.

| measure | agent | baseline in the same run | target | |
| --- | --- | --- | --- | --- |
{table}

Reproduce: `.venv/bin/python benchmarks/agent.py --write`.
"""
    print(markdown)
    if args.write:
        from results_doc import write_section

        write_section("agent", markdown)


if __name__ == "__main__":
    main()
