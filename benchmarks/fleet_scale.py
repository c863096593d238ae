"""A fleet at operating scale: N simulated devices reporting telemetry every 10 s while a staged
rollout of a 1 MB bundle runs, the console being read, on SQLite and on PostgreSQL (section
``fleet-scale`` of docs/benchmarks.md).

The parts are those of ``benchmarks/fleet_sim.py`` (real Mosquitto, the controller and the
console each as its own process, simulated devices with one MQTT connection each that verify every
desired state and the bundle's sha256); what differs is that everything happens at once, as in a
real fleet:

1. connect N devices and wait until the controller has ingested every one;
2. from then on, every device publishes a telemetry window every ``--every`` seconds (spread over
   the period, as independent devices would);
3. a staged rollout (5, 25, 100 %) of the bundle to every device, to COMPLETED;
4. throughout, once a second: the controller's CPU and RSS (psutil) and its ingest lag and queue
   (its Prometheus endpoint); and an operator reading the console's main pages one after another
   (fleet, its live part, the same at the largest page size, a device, the rollout and its live
   part, the rollout list).

Baselines in the same run: the console's ``/healthz`` (no store read) beside its pages, and what a
bare paho subscriber received of the telemetry beside what the controller wrote.

    .venv/bin/python benchmarks/fleet_scale.py [--devices 10000] [--every 10] [--stores sqlite,postgresql] [--write]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import psutil
from fleet_sim import (
    FLEET,
    SimDevice,
    Simulator,
    _cpu,
    _metrics,
    _telemetry_rows,
)

from edgeship.ota.protocol import TelemetryMessage, encode_message
from edgeship.ota.release import ReleaseRepository
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.store import FleetStore

TOKEN = "fleet-scale-operator-token-0123456789"


def _raise_fd_limit(needed: int) -> None:
    """Each simulated device holds one socket (paho's wake-up pair exists only with its own loop); the broker inherits the
    limit too. Root may raise the hard limit; anyone else gets a clear error before the run."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
    except (ValueError, OSError):
        raise SystemExit(f"fleet_scale: {needed} file descriptors are needed, the limit is {soft}/{hard} "
                         "(raise it with `ulimit -n`)") from None


class ReconnectingSimulator(Simulator):
    """Devices that reconnect when the broker drops them, as the real agent does: on a loaded
    machine a simulated device can miss its keep-alive, and a device that never comes back would
    hold its rollout stage open until the stage timeout, measuring the simulator, not the fleet."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.disconnects = 0
        self.reconnects = 0

    async def _connect_all(self) -> None:
        import asyncio

        for start in range(0, self.n, 50):
            wave = [SimDevice(self, f"d{i:05d}") for i in range(start, min(self.n, start + 50))]
            for device in wave:
                device.client.on_disconnect = self._on_disconnect(device)
                device.connect()
            self.devices.extend(wave)
            await asyncio.wait_for(asyncio.gather(*(d.connected.wait() for d in wave)), 60)

    def _on_disconnect(self, device: SimDevice) -> Any:
        def on_disconnect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            if self.stopping:
                return
            self.disconnects += 1
            self.loop.call_later(1.0 + random.random() * 4.0, reconnect)

        def reconnect() -> None:
            try:
                device.client.reconnect()
                self.reconnects += 1
            except OSError:
                self.loop.call_later(2.0 + random.random() * 4.0, reconnect)

        return on_disconnect

    stopping = False

    def stop(self) -> None:
        self.stopping = True
        super().stop()


class ConsoleReader(threading.Thread):
    """An operator with the console open: its main pages, one after another, all run long."""

    def __init__(self, port: int, pages: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.port, self.pages = port, pages
        self.times: dict[str, list[float]] = {label: [] for label in pages}
        self.failures: list[str] = []
        self.stop_event = threading.Event()

    def fetch(self, path: str) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        started = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        body = response.read()
        elapsed = (time.perf_counter() - started) * 1000.0
        conn.close()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {body[:200]!r}")
        return elapsed

    def run(self) -> None:
        while not self.stop_event.is_set():
            for label, path in self.pages.items():
                try:
                    self.times[label].append(self.fetch(path))
                except (OSError, RuntimeError) as exc:  # a failed page is a result, not a crash
                    self.failures.append(f"{path}: {exc}")
                if self.stop_event.wait(0.2):
                    return


class Sampler(threading.Thread):
    """Once a second: the controller's CPU and RSS and its ingest lag and queue."""

    def __init__(self, proc: psutil.Process, metrics_port: int) -> None:
        super().__init__(daemon=True)
        self.proc, self.metrics_port = proc, metrics_port
        self.rss: list[float] = []
        self.lag: list[float] = []
        self.queue: list[float] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            try:
                self.rss.append(self.proc.memory_info().rss / 2**20)
                m = _metrics(self.metrics_port)
            except (OSError, psutil.Error):
                continue
            self.lag.append(m.get("edgeship_controller_ingest_lag_seconds", 0.0))
            self.queue.append(m.get("edgeship_controller_ingest_queue", 0.0))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _telemetry_payload() -> bytes:
    histogram = LatencyHistogram()
    rng = random.Random(3)
    for _ in range(40):
        histogram.observe(rng.lognormvariate(1.5, 0.4))
    return encode_message(TelemetryMessage(time.time(), 10.0, 40, 0, histogram,
                                           bundle={"name": "digits", "version": "1.0.0"}, drift=0.01))


class BaselineSubscriber:
    """A bare paho subscriber to every device's telemetry, in a process of its own: what the broker
    delivers, to set beside what the controller wrote. Its own process because paho's own loop
    uses select(), which cannot watch a descriptor numbered past 1,024, and this process holds one
    per simulated device. It subscribes from on_connect and the run waits for its SUBACK."""

    def __init__(self, host: str, port: int, folder: Path) -> None:
        self.count_file = folder / "baseline-count"
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--baseline-subscriber",
                                      host, str(port), str(self.count_file)])
        deadline = time.monotonic() + 60
        while not self.count_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the baseline subscriber did not subscribe within 60 s")
            time.sleep(0.1)

    def stop(self) -> int:
        self.proc.terminate()
        self.proc.wait(30)
        return int(self.count_file.read_text() or 0)


def _baseline_subscriber_main(host: str, port: int, count_file: Path) -> None:
    import signal

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    counter = {"n": 0}
    stop = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="baseline-telemetry", protocol=paho.MQTTv5)

    def on_connect(c: Any, u: Any, flags: Any, reason: Any, properties: Any) -> None:
        c.subscribe(f"edgeship/{FLEET}/devices/+/telemetry", 0)

    def on_subscribe(c: Any, u: Any, mid: Any, reasons: Any, properties: Any) -> None:
        count_file.write_text("0")

    def on_message(c: Any, u: Any, m: Any) -> None:
        counter["n"] += 1

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client.connect(host, port, keepalive=120)
    client.loop_start()
    stop.wait()
    client.loop_stop()
    count_file.write_text(str(counter["n"]))


def _wait_for_line(log: Path, proc: subprocess.Popen, needle: bytes, what: str) -> None:
    deadline = time.monotonic() + 60
    while needle not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: " + log.read_text()[-2000:])
        time.sleep(0.2)


def run(n: int, bundle_mb: float, every_s: float, db: str, work: Path) -> dict[str, Any]:
    from mqtt_broker import MosquittoBroker
    from ota_repo_simulator import make_bundle

    r: dict[str, Any] = {"devices": n, "every_s": every_s, "load_before": os.getloadavg()[0]}
    broker = MosquittoBroker(work / "mosquitto", "listener {port} 127.0.0.1\nallow_anonymous true\n"
                                                  "persistence false\nmax_queued_messages 100000\n").start()  # as `edgeship broker config`
    repo = ReleaseRepository(work / "repo")
    repo.init(root_passphrase="benchmark passphrase")
    target = repo.publish(make_bundle(work / "bundles", "digits", "1.1.0", size=int(bundle_mb * 1024 * 1024)))
    r["bundle_bytes"] = target.length
    store = FleetStore(db)
    metrics_port = 19000 + random.randint(0, 900)
    console_port = 18000 + random.randint(0, 900)
    env = dict(os.environ, EDGESHIP_CONSOLE_OPERATOR_TOKEN=TOKEN)
    logs = {name: open(work / f"{name}.log", "wb") for name in ("controller", "console")}
    controller = subprocess.Popen([sys.executable, "-m", "edgeship.toolkit.cli", "controller", "--broker", broker.url,
                                   "--repo", str(repo.path), "--db", db, "--replica-id", "scale",
                                   "--metrics-port", str(metrics_port)],
                                  stdout=logs["controller"], stderr=subprocess.STDOUT)
    console = subprocess.Popen([sys.executable, "-m", "edgeship.toolkit.cli", "console", "--db", db,
                                "--port", str(console_port)], stdout=logs["console"], stderr=subprocess.STDOUT,
                               env=env)
    sim = ReconnectingSimulator("127.0.0.1", broker.port, repo.director_public_key_path, n)
    sim.target_file = target.file
    reader: ConsoleReader | None = None
    sampler: Sampler | None = None
    telemetry_stop = threading.Event()
    try:
        proc = psutil.Process(controller.pid)
        _wait_for_line(work / "controller.log", controller, b"started", "the controller")
        sim.start()
        print(f"connecting {n} devices, one MQTT connection each ...", flush=True)
        start = time.perf_counter()
        sim.connect_all()
        r["connect_s"] = time.perf_counter() - start
        while len([d for d in store.list_devices(FLEET) if d.online and d.active_version]) < n:
            if time.perf_counter() - start > 600:
                raise RuntimeError("the controller did not ingest every device within 600 s")
            time.sleep(1.0)
        r["known_s"] = time.perf_counter() - start
        print(f"  connected in {r['connect_s']:.1f} s, all {n} in the store after {r['known_s']:.1f} s", flush=True)

        # -- telemetry from every device, every `every_s` seconds, from now until the end
        payload = _telemetry_payload()
        baseline = BaselineSubscriber("127.0.0.1", broker.port, work)
        rows_start = _telemetry_rows(store)
        sent = {"n": 0}

        async def telemetry_loop() -> None:
            import asyncio

            started = time.monotonic()
            devices = sim.devices
            round_no = 0
            while not telemetry_stop.is_set():
                for offset in range(0, len(devices), 50):
                    for device in devices[offset:offset + 50]:
                        device.telemetry(payload)
                        sent["n"] += 1
                    due = started + (round_no + (offset + 50) / len(devices)) * every_s
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    if telemetry_stop.is_set():
                        return
                round_no += 1

        import asyncio

        telemetry_future = asyncio.run_coroutine_threadsafe(telemetry_loop(), sim.loop)
        sampler = Sampler(proc, metrics_port)
        sampler.start()
        time.sleep(every_s)  # one full round of telemetry before the rollout starts

        # -- the staged rollout, with the console being read
        out = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "rollout", "start", "digits", "1.1.0",
                              "--fleet", FLEET, "--stages", "5,25,100", "--success-threshold", "100",
                              "--db", db], capture_output=True, text=True, check=True, timeout=120)
        rollout_id = out.stdout.strip()
        pages = {
            "/healthz (baseline: no store read)": "/healthz",
            "fleet": "/",
            "fleet, live part": "/?part=live",
            "fleet, live part, 500 rows per page (the largest page size)": "/?rows=500&part=live",
            "device": f"/devices/{sim.devices[n // 2].device}",
            "rollout": f"/rollouts/{rollout_id}",
            "rollout, live part": f"/rollouts/{rollout_id}?part=live",
            "rollouts list": "/rollouts",
        }
        deadline = time.monotonic() + 60
        while True:  # the console answers once it has opened the store
            try:
                ConsoleReader(console_port, pages).fetch("/healthz")
                break
            except (OSError, RuntimeError):
                if console.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the console did not start: " + (work / "console.log").read_text()[-2000:]) from None
                time.sleep(0.3)
        reader = ConsoleReader(console_port, pages)
        reader.start()
        cpu0 = _cpu(proc)
        start = time.perf_counter()
        print(f"rollout {rollout_id} of a {target.length / 1e6:.2f} MB bundle to {n} devices, telemetry every "
              f"{every_s:g} s, console being read ...", flush=True)
        stage_times: list[float] = []
        last_stage = 0
        last_print = start
        last_committed, progress_at, stuck_shown = 0, start, False
        while True:
            rollout, _ = store.load_rollout(rollout_id)
            now = time.perf_counter()
            if rollout.stage != last_stage:
                stage_times.append(now - start)
                last_stage = rollout.stage
            if now - last_print > 15:
                print(f"  {now - start:.0f} s: stage {rollout.stage}, {rollout.state.value}; committed "
                      f"{sum(1 for d in sim.devices if d.committed_at)}; fetching "
                      f"{sum(1 for d in sim.devices if d.state is not None)}; dropped connections "
                      f"{sim.disconnects}", flush=True)
                last_print = now
            if rollout.state.value in ("COMPLETED", "ABORTED", "ROLLED_BACK"):
                break
            committed = sum(1 for d in sim.devices if d.committed_at)
            if committed != last_committed:
                last_committed, progress_at = committed, now
            elif now - progress_at > 120 and not stuck_shown:  # say who is stuck, and why if it can be seen
                fetching = [d for d in sim.devices if d.state is not None]
                stuck_shown = bool(fetching)
                for device in fetching[:5]:
                    print(f"  no progress for 120 s: {device.device} connected={device.client.is_connected()} "
                          f"fetching={device.state is not None} blocks={len(device.blocks)}/"
                          f"{device.info.blocks_total if device.info else '?'} last desired sequence "
                          f"{device.last_sequence}", flush=True)
            if now - start > 3600:
                raise RuntimeError("rollout did not finish within an hour")
            time.sleep(1.0)
        r.update(rollout_state=rollout.state.value, rollout_s=time.perf_counter() - start, stage_s=stage_times,
                 rollout_cpu_s=_cpu(proc) - cpu0, retries=sim.retries, disconnects=sim.disconnects, rate_limited=sim.rate_limited,
                 mismatches=sim.mismatches, sim_errors=sim.errors)
        reader.stop_event.set()
        reader.join(30)
        print(f"  {rollout.state.value} in {r['rollout_s']:.1f} s", flush=True)

        # -- stop telemetry, let the controller drain, count
        telemetry_stop.set()
        telemetry_future.result(60)
        target_rows = rows_start + sent["n"]
        seen, changed = -1, time.perf_counter()
        while True:
            current = _telemetry_rows(store)
            if current != seen:
                seen, changed = current, time.perf_counter()
            if current >= target_rows or time.perf_counter() - changed > 10.0:
                break
            time.sleep(0.5)
        sampler.stop_event.set()
        sampler.join(5)
        r["load_after"] = os.getloadavg()[0]
        delivered = baseline.stop()
        metrics = _metrics(metrics_port)
        r.update(telemetry_sent=sent["n"], telemetry_ingested=_telemetry_rows(store) - rows_start,
                 telemetry_delivered_baseline=delivered,
                 telemetry_dropped=metrics.get("edgeship_controller_ingest_dropped_total", 0.0),
                 lag_median_s=_pct(sampler.lag, 0.5), lag_p95_s=_pct(sampler.lag, 0.95),
                 lag_max_s=max(sampler.lag, default=0.0), queue_max=max(sampler.queue, default=0.0),
                 rss_max_mb=max(sampler.rss, default=0.0), rss_median_mb=_pct(sampler.rss, 0.5),
                 block_bytes_sent=metrics.get("edgeship_controller_block_bytes_sent_total", 0.0),
                 console={label: {"n": len(t), "p50": _pct(t, 0.5), "p95": _pct(t, 0.95), "max": max(t, default=0.0)}
                          for label, t in reader.times.items()},
                 console_failures=reader.failures[:5], console_failed=len(reader.failures))
    finally:
        telemetry_stop.set()
        for thread in (reader, sampler):
            if thread is not None:
                thread.stop_event.set()
        try:
            sim.stop()
        except (OSError, RuntimeError, TimeoutError) as exc:  # report, do not hide the results
            print(f"simulator stop: {exc}", file=sys.stderr)
        for process in (console, controller):
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        for handle in logs.values():
            handle.close()
        store.close()
        broker.stop()
    return r


def render(runs: dict[str, dict[str, Any]], command: str) -> str:
    first = next(iter(runs.values()))
    n, every = first["devices"], first["every_s"]
    names = list(runs)
    lines = [
        "## fleet-scale: a fleet at operating scale, everything at once",
        "",
        f"Run: `{command}` on {platform.machine()}, {os.cpu_count()} cores (shared), Python "
        f"{platform.python_version()}, Mosquitto. {n} simulated devices, each with its own MQTT connection, publish "
        f"a telemetry window every {every:g} s ({n / every:.0f} messages/s) while a staged rollout (5, 25, 100 %) of "
        f"a {first['bundle_bytes'] / 1e6:.2f} MB bundle runs and an operator reads the console's main pages one "
        "after another. The controller and the console are their own processes; the simulator, the broker, the "
        "controller, the console and the store share the machine's cores. PostgreSQL runs with `fsync=off` "
        "(a throwaway cluster).",
        "",
        "| measured | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]

    def row(label: str, cell: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(runs[name]) for name in names) + " |")

    row("load average (1 min) before / after: the machine's other work", lambda r: f"{r['load_before']:.1f} / "
        f"{r.get('load_after', 0.0):.1f}")
    row("connect all; every device in the store", lambda r: f"{r['connect_s']:.0f} s; {r['known_s']:.0f} s")
    row("rollout", lambda r: f"**{r['rollout_state']}** in {r['rollout_s']:.0f} s (stages at "
        + ", ".join(f"{s:.0f}" for s in r["stage_s"]) + " s)")
    row("bundle bytes served", lambda r: f"{r['block_bytes_sent'] / 1e9:.2f} GB")
    row("re-requests / 429s / sha256 failures / device errors / dropped connections (reconnected)",
        lambda r: f"{r['retries']} / {r['rate_limited']} / {r['mismatches']} / {r['sim_errors']} / {r['disconnects']}")
    row("controller CPU during the rollout", lambda r: f"{r['rollout_cpu_s']:.0f} s "
        f"({r['rollout_cpu_s'] / r['rollout_s']:.0%} of one core)")
    row("controller RSS, median / max", lambda r: f"{r['rss_median_mb']:.0f} / {r['rss_max_mb']:.0f} MB")
    row("telemetry sent / written by the controller / dropped",
        lambda r: f"{r['telemetry_sent']} / {r['telemetry_ingested']} / {r['telemetry_dropped']:.0f}")
    row("baseline: telemetry a bare paho subscriber received",
        lambda r: f"{r['telemetry_delivered_baseline']} (controller / baseline "
        f"{r['telemetry_ingested'] / max(1, r['telemetry_delivered_baseline']):.3f})")
    row("ingest (report) lag, median / p95 / max; queue max",
        lambda r: f"{r['lag_median_s']:.2f} / {r['lag_p95_s']:.2f} / {r['lag_max_s']:.2f} s; {r['queue_max']:.0f}")
    for label in first["console"]:
        row(f"console: {label}, p50 / p95 ms (n)",
            lambda r, label=label: f"{r['console'][label]['p50']:.0f} / {r['console'][label]['p95']:.0f} "
            f"({r['console'][label]['n']})")
    row("console: failed page loads", lambda r: str(r["console_failed"]))

    def slowest(r: dict[str, Any]) -> float:
        return max(v["p95"] for k, v in r["console"].items() if not k.startswith("/healthz") and "500 rows" not in k)

    def largest_page(r: dict[str, Any]) -> str:
        found = [v["p95"] for k, v in r["console"].items() if "500 rows" in k]
        return f"{found[0]:.0f} ms" if found else "not measured"

    lines += ["", "Slowest console page at p95 while the rollout ran (the pages as they open, 100 fleet rows): "
              + "; ".join(f"{name} **{slowest(r):.0f} ms**" for name, r in runs.items())
              + " (target: 300 ms). The fleet's live part at the largest page size an operator can pick (500 rows): "
              + "; ".join(f"{name} {largest_page(r)}" for name, r in runs.items()) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--every", type=float, default=10.0, help="Seconds between a device's telemetry windows.")
    parser.add_argument("--bundle-mb", type=float, default=1.0)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--json", action="store_true", help="Print the raw results as JSON too.")
    args = parser.parse_args()
    _raise_fd_limit(args.devices + 2048)
    runs: dict[str, dict[str, Any]] = {}
    for kind in [s.strip() for s in args.stores.split(",") if s.strip()]:
        work = Path(tempfile.mkdtemp(prefix="edgeship-fleet-scale-"))
        try:
            if kind == "sqlite":
                print(f"SQLite: {args.devices} devices", flush=True)
                runs["SQLite"] = run(args.devices, args.bundle_mb, args.every, f"sqlite:///{work / 'fleet.db'}", work)
            elif kind == "postgresql":
                from fleet_fixtures import PostgresServer, postgres_binaries

                bindir = postgres_binaries()
                if bindir is None:
                    raise SystemExit("fleet_scale: PostgreSQL binaries (initdb, pg_ctl) are not installed")
                server = PostgresServer(bindir).start()
                try:
                    time.sleep(1.0)
                    print(f"PostgreSQL: {args.devices} devices", flush=True)
                    runs["PostgreSQL"] = run(args.devices, args.bundle_mb, args.every, server.new_database(), work)
                finally:
                    server.stop()
            else:
                raise SystemExit(f"fleet_scale: unknown store {kind!r} (sqlite, postgresql)")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    command = (f".venv/bin/python benchmarks/fleet_scale.py --devices {args.devices} --every {args.every:g} "
               f"--bundle-mb {args.bundle_mb:g} --stores {args.stores}")
    text = render(runs, command)
    print(text)
    if args.json:
        print(json.dumps(runs, indent=2, default=str))
    if args.write:
        from results_doc import write_section

        write_section("fleet-scale", text)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--baseline-subscriber":
        _baseline_subscriber_main(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
