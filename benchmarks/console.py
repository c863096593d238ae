"""The console at 10,000 devices (section ``console`` of docs/benchmarks.md).

For each store (SQLite in WAL mode, and PostgreSQL when its binaries are installed): a fleet of
``--devices`` devices ingested through the store's own ingest (status, reported state, an event and
three telemetry windows each), a staged rollout under way (its first stage assigned), an A/B test
with telemetry on a second fleet, then the console's main pages fetched ``--requests`` times each
by a logged-in client **while a writer ingests telemetry at the rate of every device reporting
every 10 s** (``--devices / 10`` messages/s, in batches of 100 as the controller writes them).
Baseline in the same run: ``/healthz`` of the same server (the HTTP round trip with no store read).
Target: every main page at p95 within 300 ms.

    .venv/bin/python benchmarks/console.py [--devices 10000] [--requests 30] [--no-postgres] [--write]
"""

from __future__ import annotations

import argparse
import http.client
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from console_fixtures import (
    OPERATOR_TOKEN,
    ab_telemetry,
    fill_fleet,
    histogram,
    serve,
    start_abtest,
    start_rollout,
)
from results_doc import write_section

from edgeship.ota.protocol import TelemetryMessage
from edgeship.toolkit.store import FleetStore, IngestItem


def fetch(port: int, path: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    response = conn.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {body[:200]!r}")
    return elapsed * 1000.0


class TelemetryWriter(threading.Thread):
    """Ingests telemetry windows at ``rate`` messages/s in batches of 100, as the controller does."""

    def __init__(self, store: FleetStore, ids: list[str], rate: float) -> None:
        super().__init__(daemon=True)
        self.store, self.ids, self.rate = store, ids, rate
        self.stop_event = threading.Event()
        self.written = 0
        self.started_at = 0.0
        self.finished_at = 0.0

    def run(self) -> None:
        rng = random.Random(5)
        batch = 100
        self.started_at = time.perf_counter()
        while not self.stop_event.is_set():
            due = self.started_at + (self.written + batch) / self.rate
            now = time.time()
            items = []
            for _ in range(batch):
                device = self.ids[rng.randrange(len(self.ids))]
                items.append(IngestItem("plant", device, TelemetryMessage(
                    ts=now, window_s=10.0, requests=40, errors=0, latency=histogram(rng, 40, 2.0),
                    bundle={"name": "digits", "version": "1.0.0"}), now))
            self.store.ingest(items)
            self.written += batch
            wait = due - time.perf_counter()
            if wait > 0:
                self.stop_event.wait(wait)
        self.finished_at = time.perf_counter()


def measure(db_url: str, devices: int, requests: int) -> dict[str, Any]:
    store = FleetStore(db_url)
    started = time.perf_counter()
    ids = fill_fleet(store, devices=devices)
    fill_fleet(store, devices=200, fleet="lab")
    filled_s = time.perf_counter() - started
    rollout_id = start_rollout(store, stages="5,25,100")
    test_id = start_abtest(store, fleet="lab")
    ab_telemetry(store, test_id, fleet="lab", per_device=3)
    console = serve(store)
    pages = {
        "/healthz (baseline: no store read)": "/healthz",
        "fleet, unfiltered (first page, 100 rows)": "/",
        "fleet, live part": "/?part=live",
        "fleet, a page half-way through (100 rows)": f"/?after={ids[len(ids) // 2]}",
        "fleet, live part, 500 rows per page": "/?rows=500&part=live",
        "fleet, filtered (offline)": "/?online=no&fleet=plant",
        "device": f"/devices/{ids[len(ids) // 2]}",
        "rollout (stage 1 assigned)": f"/rollouts/{rollout_id}",
        "rollout, live part": f"/rollouts/{rollout_id}?part=live",
        "rollouts list": "/rollouts",
        "A/B test (200 devices)": f"/abtests/{test_id}",
    }
    writer = TelemetryWriter(store, ids, devices / 10.0)
    writer.start()
    results: dict[str, Any] = {}
    try:
        for label, path in pages.items():
            fetch(console.port, path)  # warm
            times = sorted(fetch(console.port, path) for _ in range(requests))
            results[label] = {"p50": statistics.median(times), "p95": times[int(round(0.95 * (len(times) - 1)))],
                              "max": times[-1]}
    finally:
        writer.stop_event.set()
        writer.join()
        console.stop()
        store.close()
    elapsed = writer.finished_at - writer.started_at
    return {"pages": results, "filled_s": filled_s, "ingested": writer.written,
            "ingest_rate": writer.written / elapsed if elapsed else 0.0, "offered_rate": devices / 10.0}


def markdown(devices: int, requests: int, runs: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"Run: `.venv/bin/python benchmarks/console.py --devices {devices} --requests {requests} --write` on "
        f"{platform.machine()}, 2 cores (shared), Python {platform.python_version()}. The console's pages fetched "
        f"{requests} times each (after one warm-up), one logged-in client, while a writer ingests telemetry as "
        f"{devices:,} devices reporting every 10 s would ({devices // 10:,} messages/s, batches of 100). "
        "Baseline in the same run: `/healthz` on the same server. Target: p95 within 300 ms for every main page.",
        "",
        "| page | " + " | ".join(f"{name} p50 / p95 (ms)" for name in runs) + " |",
        "| --- | " + " | ".join("---" for _ in runs) + " |",
    ]
    labels = next(iter(runs.values()))["pages"].keys()
    for label in labels:
        cells = [f"{run['pages'][label]['p50']:.1f} / {run['pages'][label]['p95']:.1f}" for run in runs.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| telemetry ingested during the fetches (messages/s, offered "
                 f"{devices // 10:,}) | " + " | ".join(f"{run['ingest_rate']:.0f}" for run in runs.values()) + " |")
    lines.append("| filling the store (s) | " + " | ".join(f"{run['filled_s']:.1f}" for run in runs.values()) + " |")
    worst = max(p["p95"] for run in runs.values() for label, p in run["pages"].items() if "baseline" not in label)
    lines += ["", f"Slowest main page at p95: **{worst:.0f} ms** ({'within' if worst <= 300 else 'over'} the 300 ms target).",
              "", "The store is filled through its own ingest and the telemetry load is written straight into it, "
              "so this measures the console's reads against a 10,000-device store under that write load; the "
              "end-to-end run of 10,000 simulated devices over MQTT (`benchmarks/fleet_scale.py`, section fleet-scale) "
              "is a separate run. A rollout's health on its page is measured in the background at most every 15 s, reading only "
              "the windows that arrived since the last reading (docs/console.md)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    import tempfile

    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        print(f"SQLite: {args.devices} devices ...", file=sys.stderr)
        runs["SQLite"] = measure(f"sqlite:///{folder}/fleet.db", args.devices, args.requests)
    if not args.no_postgres:
        from fleet_fixtures import PostgresServer, postgres_binaries

        bindir = postgres_binaries()
        if bindir is None:
            print("PostgreSQL binaries not installed: SQLite only", file=sys.stderr)
        else:
            server = PostgresServer(bindir).start()
            try:
                time.sleep(1.0)
                print(f"PostgreSQL: {args.devices} devices ...", file=sys.stderr)
                runs["PostgreSQL"] = measure(server.new_database(), args.devices, args.requests)
            finally:
                server.stop()
    text = markdown(args.devices, args.requests, runs)
    print(text)
    if args.write:
        write_section("console", text)


if __name__ == "__main__":
    main()
