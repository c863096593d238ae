"""Block transfer through Mosquitto against a bare paho publish loop moving the same bytes.

Both run in the same process against the same Mosquitto on loopback, with the
same message size and QoS:

- baseline: one paho client publishes the file in block-sized messages as fast
  as paho takes them; a second paho client receives them into memory. Timed
  from the first publish to the last message received.
- block transfer: ``edgeship.toolkit.blockserver.BlockServer`` (requests on one
  connection, blocks published on a second one, as docs/protocol.md recommends) answers an
  ``edgeship.ota.blocks.MqttBlockFetcher`` that describes the file, requests
  windows of blocks with bitmaps, writes them into its on-disk partial file
  (fsync + sidecar every 64 blocks) and streams the file, in order, to a consumer
  that hashes it (as the TUF client does). Timed from the fetch call to the last byte.

Target: block transfer at >= 50% of the baseline's throughput.

    .venv/bin/python benchmarks/blocks.py [--size-mb 32] [--block-kb 64] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import paho.mqtt.client as paho
from mqtt_broker import MosquittoBroker
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from results_doc import write_section

from edgeship.ota.blocks import BlockTransferConfig, MqttBlockFetcher
from edgeship.ota.transport import MqttConnection
from edgeship.toolkit.blockserver import BlockServer


def bare_paho(port: int, data: bytes, block: int, qos: int) -> float:
    """Seconds to move ``data`` in ``block``-byte messages from one paho client to another."""
    chunks = [data[i:i + block] for i in range(0, len(data), block)]
    done = threading.Event()
    received: list[int] = [0]
    sink = bytearray()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        sink.extend(message.payload)
        received[0] += 1
        if received[0] == len(chunks):
            done.set()

    subscribed = threading.Event()
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub", protocol=MQTTProtocolVersion.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.subscribe("bench/bare", qos)
    sub.loop_start()
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=MQTTProtocolVersion.MQTTv5)
    pub.max_inflight_messages_set(100)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    subscribed.wait(10)
    time.sleep(0.2)
    started = time.perf_counter()
    for chunk in chunks:
        pub.publish("bench/bare", chunk, qos)
    if not done.wait(300):
        raise RuntimeError(f"bare paho: only {received[0]} of {len(chunks)} messages arrived")
    elapsed = time.perf_counter() - started
    assert bytes(sink) == data
    for client in (pub, sub):
        client.disconnect()
        client.loop_stop()
    return elapsed


def block_transfer(broker: MosquittoBroker, root: Path, work: Path, data: bytes, block: int, qos: int,
                   run: int, window: int) -> float:
    controller = MqttConnection(broker.url, client_id=f"bench-ctl-{run}").connect(10)
    publisher = MqttConnection(broker.url, client_id=f"bench-ctl-pub-{run}").connect(10)
    device = MqttConnection(broker.url, client_id=f"bench-dev-{run}").connect(10)
    server = BlockServer(controller, root, qos=qos, rate_bytes_per_s=1e12, burst_bytes=1e12,
                         publisher=publisher).start()
    fetcher = MqttBlockFetcher(device, fleet="bench", device=f"dev-{run}", work_dir=work,
                               config=BlockTransferConfig(block_size=block, qos=qos, window=window))
    try:
        started = time.perf_counter()
        digest = hashlib.sha256()
        for chunk in fetcher.fetch("edgeship://targets/bundle.bin"):
            digest.update(chunk)  # what the TUF client does with the stream: hash it, check the length
        elapsed = time.perf_counter() - started
        if digest.digest() != hashlib.sha256(data).digest():
            raise RuntimeError("block transfer delivered different bytes")
        return elapsed
    finally:
        server.stop()
        device.close()
        publisher.close()
        controller.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=32.0)
    parser.add_argument("--block-kb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=BlockTransferConfig().window)
    parser.add_argument("--qos", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    size = int(args.size_mb * 1024 * 1024)
    block = args.block_kb * 1024
    data = os.urandom(size)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        root = folder / "repo"
        (root / "metadata").mkdir(parents=True)
        (root / "targets").mkdir()
        (root / "targets" / "bundle.bin").write_bytes(data)
        for nodelay in (False, True):
            config = "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            if nodelay:
                config += "set_tcp_nodelay true\n"
            broker = MosquittoBroker(folder / f"mosquitto-{nodelay}", config).start()
            label = "`set_tcp_nodelay true`" if nodelay else "default"
            try:
                for qos in args.qos:
                    bare, blocks = [], []
                    for run in range(args.repeats):
                        bare.append(bare_paho(broker.port, data, block, qos))
                        blocks.append(block_transfer(broker, root, folder / f"work-{nodelay}-{qos}-{run}", data,
                                                     block, qos, run, args.window))
                        print(f"broker {label}, qos {qos}, run {run}: bare paho {size / bare[-1] / 1e6:.1f} MB/s, "
                              f"block transfer {size / blocks[-1] / 1e6:.1f} MB/s", flush=True)
                    # each run pairs a baseline and a block transfer measured back to back; the median
                    # of the pairs' ratios is robust to the load of a shared machine drifting
                    ratios = [b / k for b, k in zip(bare, blocks)]
                    rows.append({"broker": label, "qos": qos, "bare": size / statistics.median(bare) / 1e6,
                                 "blocks": size / statistics.median(blocks) / 1e6,
                                 "ratio": statistics.median(ratios), "worst": min(ratios), "best": max(ratios)})
            finally:
                broker.stop()
    lines = [
        f"Block transfer of a {args.size_mb:g} MiB file in {args.block_kb} KiB blocks (window {args.window} "
        f"blocks) through Mosquitto "
        f"{_mosquitto_version()} on loopback, against a bare paho-mqtt {_paho_version()} publish loop moving "
        f"the same bytes in messages of the same size, same run, {args.repeats} back-to-back pairs (medians); "
        f"{os.cpu_count()} CPU cores shared with other work.",
        "",
        "| Mosquitto config | QoS | bare paho loop (MB/s) | block transfer (MB/s) | ratio (median of pairs) "
        "| ratio range | target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        verdict = "met" if float(row["ratio"]) >= 0.5 else "missed"  # type: ignore[arg-type]
        lines.append(f"| {row['broker']} | {row['qos']:.0f} | {row['bare']:.1f} | {row['blocks']:.1f} | "
                     f"{row['ratio']:.0%} | {row['worst']:.0%}-{row['best']:.0%} | >= 50%: {verdict} |")
    lines += [
        "",
        "The block transfer does more than the loop: a describe round trip, windowed bitmap requests, "
        "a header parsed per block, every block written to the on-disk partial file, fsync and sidecar "
        "every 64 blocks (what makes it resumable), and the file streamed in order to a consumer that "
        "hashes it, as the TUF client does; the baseline keeps the bytes in memory.",
        "",
        "Runs on a shared machine vary widely: the range column gives the spread of the pairs (during "
        "this work the bare loop alone measured anywhere from 75 to 310 MB/s from one run to the next).",
        "",
        "The server reads requests on one connection and publishes blocks on a second one. "
        "Mosquitto leaves Nagle's algorithm on by default; the block protocol's small requests and "
        "replies then wait on delayed ACKs (tens of ms per round trip), which the one-way bare loop never "
        "meets. edgeship's clients turn it off on their side (TCP_NODELAY); brokers serving blocks should "
        "set `set_tcp_nodelay true` (docs/protocol.md).",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/blocks.py --size-mb {args.size_mb:g} --block-kb {args.block_kb} "
        f"--window {args.window} --repeats {args.repeats}`",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("blocks", "## Block transfer over MQTT\n\n" + text)


def _paho_version() -> str:
    from importlib.metadata import version

    return version("paho-mqtt")


def _mosquitto_version() -> str:
    import subprocess

    from mqtt_broker import mosquitto_binary

    binary = mosquitto_binary() or "mosquitto"
    out = subprocess.run([binary, "-h"], capture_output=True, text=True).stdout
    return out.split("version", 1)[1].split()[0] if "version" in out else "?"


if __name__ == "__main__":
    main()
