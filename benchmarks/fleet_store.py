"""Fleet store ingest and reconcile speed (section ``fleet-store`` of docs/benchmarks.md).

What the controller must sustain: 1,000 devices sending telemetry every second,
i.e. at least 1,000 telemetry messages/s written. Measured here:

- baseline: one transaction per message (``FleetStore.ingest`` of one item), the naive way;
- ``FleetStore.ingest`` with batches of 100 and 1,000 messages;
- the same batches including the protocol parse of each payload (bytes -> TelemetryMessage);
- one reconcile of a 1,000-device rollout: ``fleet_snapshot`` (with 60 s of telemetry merged) and ``step``.

Run: ``.venv/bin/python benchmarks/fleet_store.py [--db URL] [--messages N] [--write]``
(default: a temporary SQLite file in WAL mode).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgeship.ota.protocol import TelemetryMessage, encode_message, parse_message
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.ota.topics import TELEMETRY
from edgeship.toolkit.rollouts import RolloutPolicy, new_rollout, step
from edgeship.toolkit.store import FleetStore, IngestItem

FLEET = "bench"
DEVICES = 1000


def _message(rng: random.Random) -> TelemetryMessage:
    histogram = LatencyHistogram()
    for _ in range(50):
        histogram.observe(rng.lognormvariate(1.5, 0.4))
    return TelemetryMessage(ts=time.time(), window_s=1.0, requests=50, errors=rng.randint(0, 2), latency=histogram,
                            bundle={"name": "digits", "version": "1.0"}, feedback={"correct": 45, "total": 50},
                            drift=0.02)


def _timed(func: Callable[[], int]) -> tuple[int, float]:
    start = time.perf_counter()
    count = func()
    return count, time.perf_counter() - start


def run(url: str, messages: int) -> list[tuple[str, int, float]]:
    rng = random.Random(1)
    store = FleetStore(url)
    samples = [_message(rng) for _ in range(200)]
    payloads = [encode_message(m) for m in samples]
    devices = [f"dev-{i:04d}" for i in range(DEVICES)]
    now = time.time()
    store.ingest([IngestItem(FLEET, d, samples[0], now) for d in devices])  # the devices exist
    results: list[tuple[str, int, float]] = []

    def one_by_one() -> int:
        count = max(200, messages // 10)
        for i in range(count):
            store.ingest([IngestItem(FLEET, devices[i % DEVICES], samples[i % len(samples)], time.time())])
        return count

    results.append(("baseline: one transaction per message", *_timed(one_by_one)))

    for batch in (100, 1000):
        def batched(batch: int = batch) -> int:
            done = 0
            while done < messages:
                at = time.time()
                store.ingest([IngestItem(FLEET, devices[(done + j) % DEVICES], samples[(done + j) % len(samples)], at)
                              for j in range(batch)])
                done += batch
            return done

        results.append((f"ingest, batches of {batch}", *_timed(batched)))

    def parsed() -> int:
        done = 0
        while done < messages:
            at = time.time()
            store.ingest([IngestItem(FLEET, devices[(done + j) % DEVICES],
                                     parse_message(TELEMETRY, payloads[(done + j) % len(payloads)]), at)
                          for j in range(500)])
            done += 500
        return done

    results.append(("parse + ingest, batches of 500", *_timed(parsed)))

    rollout = new_rollout("r-bench", FLEET, "digits", "2.0", RolloutPolicy(), time.time())
    store.create_rollout(rollout)

    def reconcile() -> int:
        snapshot = store.fleet_snapshot(FLEET, telemetry_since=time.time() - 60)
        decision = step(rollout, snapshot, time.time())
        store.save_rollout(decision.rollout, 1, decision.actions, before=rollout)
        return 1

    results.append((f"one reconcile of a {DEVICES}-device rollout (snapshot + step + save)", *_timed(reconcile)))
    store.close()
    return results


def markdown(url: str, results: list[tuple[str, int, float]]) -> str:
    baseline_rate = results[0][1] / results[0][2]
    kind = "temporary WAL file" if url.startswith("sqlite") else "server"
    intro = (f"Store: `{url.split('://')[0]}` ({kind}), {DEVICES} devices, telemetry messages with a 26-bucket "
             f"histogram. Python {platform.python_version()}, {os.cpu_count()} cores, shared machine.")
    lines = [
        intro,
        "",
        "| what | messages | seconds | messages/s | vs baseline |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, count, seconds in results:
        if label.startswith("one reconcile"):
            continue
        rate = count / seconds
        lines.append(f"| {label} | {count} | {seconds:.2f} | {rate:,.0f} | {rate / baseline_rate:.1f}x |")
    reconcile = next(r for r in results if r[0].startswith("one reconcile"))
    closing = ("The controller needs 1,000 messages/s for 1,000 devices reporting every second; compare the "
               "batched rows with that. Reproduce: `.venv/bin/python benchmarks/fleet_store.py --write`.")
    lines += ["", f"{reconcile[0]}: {reconcile[2] * 1000:.0f} ms.", "", closing]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: a temporary SQLite file)")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--write", action="store_true", help="write the fleet-store section of docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = args.db or f"sqlite:///{Path(folder) / 'bench.db'}"
        results = run(url, args.messages)
    text = markdown(url, results)
    print(text)
    if args.write:
        from results_doc import write_section

        write_section("fleet-store", text)


if __name__ == "__main__":
    main()
