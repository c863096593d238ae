"""Block transfer through a real Mosquitto: the device's MqttBlockFetcher against
the host's BlockServer, with the broker restarted mid-transfer and the fetcher
process SIGKILLed and restarted (both resume; finished blocks are not asked for
again), rate limits, hostile paths, and the pure pieces table-tested."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_broker import MosquittoBroker
from transport_fixtures import python_child, read_line_with, wait_until
from tuf.api import exceptions as tuf_exceptions

from edgeship.ota.blocks import (
    BlockNotFoundError,
    BlockTransferConfig,
    BlockTransferError,
    MqttBlockFetcher,
    stream_for_url,
)
from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.ota.protocol import (
    BlockRequest,
    bitmap_from_indexes,
    encode_message,
    indexes_from_bitmap,
)
from edgeship.ota.transport import MqttConnection, ReconnectPolicy
from edgeship.toolkit.blockserver import BlockServer, TokenBucket, resolve_stream

FAST = ReconnectPolicy(initial_s=0.1, max_s=0.5)


# -- pure pieces -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "url, stream",
    [
        ("edgeship://metadata/1.root.json", "metadata/1.root.json"),
        ("edgeship://metadata/timestamp.json", "metadata/timestamp.json"),
        ("edgeship://targets/digits-1.0.0.tar", "targets/digits-1.0.0.tar"),
        ("edgeship://targets/a/b%20c.tar", "targets/a/b c.tar"),
    ],
)
def test_urls_map_to_streams(url: str, stream: str) -> None:
    assert stream_for_url(url) == stream


@pytest.mark.parametrize(
    "url",
    ["http://x/metadata/root.json", "edgeship://keys/root.key", "edgeship://metadata/", "edgeship://targets/../keys/x",
     "edgeship://targets/%2e%2e/keys/x", "edgeship://targets//etc/passwd", "edgeship://targets/a\\b"],
)
def test_other_urls_are_refused_as_400(url: str) -> None:
    with pytest.raises(BlockNotFoundError) as info:
        stream_for_url(url)
    assert info.value.status_code == 400
    assert isinstance(info.value, tuf_exceptions.DownloadHTTPError) and isinstance(info.value, EdgeshipError)


@pytest.mark.parametrize(
    "steps, expected",
    [
        # (time, take bytes) -> granted?
        ([(0.0, 100), (0.0, 100), (0.0, 50), (0.0, 1)], [True, False, True, False]),  # a burst of 150, no more
        ([(0.0, 150), (1.0, 50), (1.0, 1)], [True, True, False]),  # refills 50 per second
        ([(0.0, 150), (10.0, 150), (10.0, 1)], [True, True, False]),  # never holds more than capacity
        ([(0.0, 1000), (0.0, 1)], [True, False]),  # more than capacity needs a full bucket
    ],
)
def test_token_bucket(steps: list[tuple[float, int]], expected: list[bool]) -> None:
    bucket = TokenBucket(rate=50, capacity=150, updated=0.0)
    assert [bucket.take(amount, now) for now, amount in steps] == expected


def test_token_bucket_wait_time() -> None:
    bucket = TokenBucket(rate=100, capacity=200, updated=0.0)
    assert bucket.take(200, 0.0)
    assert bucket.wait_s(50, 0.0) == pytest.approx(0.5)
    assert bucket.wait_s(50, 0.5) == pytest.approx(0.0)
    with pytest.raises(BadInputError):
        TokenBucket(rate=0, capacity=1)


def _repository(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "metadata").mkdir(parents=True)
    (root / "targets" / "sub").mkdir(parents=True)
    (root / "keys").mkdir()
    (root / "keys" / "root.key").write_text("secret")
    (root / "metadata" / "root.json").write_text("{}")
    return root


def test_paths_cannot_leave_the_served_folders(tmp_path: Path) -> None:
    root = _repository(tmp_path)
    (root / "targets" / "sub" / "ok.tar").write_bytes(b"x")
    (tmp_path / "outside.txt").write_text("no")
    os.symlink(tmp_path / "outside.txt", root / "targets" / "escape.tar")
    os.symlink(root / "keys", root / "targets" / "keys")
    assert resolve_stream(root, "targets/sub/ok.tar") == (root / "targets" / "sub" / "ok.tar").resolve()
    assert resolve_stream(root, "metadata/root.json") is not None
    for stream in ["keys/root.key", "targets/../keys/root.key", "targets/escape.tar", "targets/keys/root.key",
                   "targets/sub", "targets/missing", "metadata", "metadata/../../outside.txt", "/etc/passwd"]:
        assert resolve_stream(root, stream) is None, stream


def test_config_refuses_nonsense() -> None:
    with pytest.raises(BadInputError):
        BlockTransferConfig(block_size=100)
    with pytest.raises(BadInputError):
        BlockTransferConfig(window=0)
    with pytest.raises(BadInputError):
        BlockTransferConfig(qos=2)


# -- through Mosquitto ----------------------------------------------------------------------------

class Rig:
    """A controller connection with a BlockServer, and a device connection with a fetcher."""

    def __init__(self, broker: MosquittoBroker, tmp_path: Path, *, config: BlockTransferConfig | None = None,
                 **server_options: object) -> None:
        self.root = _repository(tmp_path)
        self.controller = MqttConnection(broker.url, client_id="controller", reconnect=FAST).connect(5)
        self.server = BlockServer(self.controller, self.root, **server_options).start()  # type: ignore[arg-type]
        self.device = MqttConnection(broker.url, client_id="pi-01", reconnect=FAST).connect(5)
        self.work = tmp_path / "device-work"
        self.fetcher = MqttBlockFetcher(self.device, fleet="lab", device="pi-01", work_dir=self.work,
                                        config=config or BlockTransferConfig(block_size=4096))

    def target(self, name: str, size: int, seed: int = 1) -> bytes:
        data = os.urandom(size) if seed < 0 else (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
        (self.root / "targets" / name).write_bytes(data)
        return data

    def close(self) -> None:
        self.server.stop()
        self.device.close()
        self.controller.close()


@pytest.fixture
def rig(mosquitto_broker: MosquittoBroker, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(mosquitto_broker, tmp_path)
    yield r
    r.close()


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 300_000])
def test_files_of_any_size_arrive_whole(rig: Rig, size: int) -> None:
    data = rig.target(f"f{size}.bin", size, seed=-1)
    chunks = list(rig.fetcher.fetch(f"edgeship://targets/f{size}.bin"))
    assert b"".join(chunks) == data
    assert not list((rig.work / "partial").iterdir())  # a finished transfer leaves nothing behind


def test_tuf_download_bytes_works_and_enforces_its_length(rig: Rig) -> None:
    (rig.root / "metadata" / "timestamp.json").write_bytes(b'{"signed": {}}')
    assert rig.fetcher.download_bytes("edgeship://metadata/timestamp.json", 1000) == b'{"signed": {}}'
    rig.target("big.tar", 100_000)
    with pytest.raises(tuf_exceptions.DownloadLengthMismatchError):
        rig.fetcher.download_bytes("edgeship://targets/big.tar", 10_000)
    # the refused stream's partial file is not kept around
    assert not list((rig.work / "partial").iterdir())


def test_missing_file_is_a_404_for_the_tuf_client(rig: Rig) -> None:
    with pytest.raises(tuf_exceptions.DownloadHTTPError) as info:
        rig.fetcher.download_bytes("edgeship://metadata/2.root.json", 1000)
    assert info.value.status_code == 404
    with pytest.raises(tuf_exceptions.DownloadHTTPError):
        rig.fetcher.download_bytes("edgeship://targets/../keys/root.key", 1000)
    # the server logs a request after answering it; the traversal never left the device
    assert wait_until(lambda: [entry.outcome for entry in rig.server.log] == ["not-found"], 5), list(rig.server.log)


def test_no_server_means_a_clear_timeout(mosquitto_broker: MosquittoBroker, tmp_path: Path) -> None:
    with MqttConnection(mosquitto_broker.url, client_id="alone", reconnect=FAST) as device:
        fetcher = MqttBlockFetcher(device, fleet="lab", device="alone", work_dir=tmp_path,
                                   config=BlockTransferConfig(request_timeout_s=0.3, total_timeout_s=1.0))
        with pytest.raises(BlockTransferError, match="no description"):
            fetcher.fetch_to_file("edgeship://targets/x.tar", tmp_path / "x")
        with pytest.raises(tuf_exceptions.DownloadError):
            fetcher.download_bytes("edgeship://targets/x.tar", 10)


def test_rate_limit_slows_a_device_down_and_it_still_completes(mosquitto_broker: MosquittoBroker,
                                                                tmp_path: Path) -> None:
    rig = Rig(mosquitto_broker, tmp_path, rate_bytes_per_s=400_000, burst_bytes=100_000, max_blocks_per_request=16,
              config=BlockTransferConfig(block_size=8192, window=32))
    try:
        data = rig.target("slow.tar", 1_000_000)
        started = time.monotonic()
        assert b"".join(rig.fetcher.fetch("edgeship://targets/slow.tar")) == data
        elapsed = time.monotonic() - started
        assert elapsed >= (1_000_000 - 100_000) / 400_000 * 0.9, elapsed
        outcomes = [e.outcome for e in rig.server.log]
        assert "rate-limited" in outcomes
        assert max(len(e.served) for e in rig.server.log) <= 16  # the per-request cap holds
    finally:
        rig.close()


def test_garbage_on_the_data_topic_does_not_break_a_transfer(rig: Rig) -> None:
    data = rig.target("t.tar", 200_000)
    topic = rig.fetcher.data_topic
    junk = [b"", b"junk", b'{"v":1,"type":"block"}\n', b"\xff" * 100,
            b'{"v":1,"type":"block","request_id":"x","stream":"targets/t.tar","index":0,"block_size":4096,'
            b'"file_size":200000,"length":4096,"etag":"forged"}\n' + b"A" * 4096]

    def inject(stream: str, have: int, total: int) -> None:
        if have == 5:  # mid-transfer, from another client
            for payload in junk[:4]:
                rig.controller.publish(topic, payload, qos=1, wait=False)

    rig.fetcher.progress = inject
    assert b"".join(rig.fetcher.fetch("edgeship://targets/t.tar")) == data
    assert rig.device.dropped == 4 and rig.device.is_connected
    # a well-formed block of another version of the file (wrong etag) aborts the transfer cleanly
    data = rig.target("t.tar", 1_000_000, seed=2)

    def forge(stream: str, have: int, total: int) -> None:
        if have == 3:
            rig.controller.publish(topic, junk[4].replace(b"200000", b"1000000"), qos=1)
            time.sleep(0.3)  # it is queued behind the first window, before the next one

    rig.fetcher.progress = forge
    with pytest.raises(BlockTransferError, match="changed on the server"):
        rig.fetcher.fetch_to_file("edgeship://targets/t.tar", rig.work / "out")
    rig.fetcher.progress = None
    assert b"".join(rig.fetcher.fetch("edgeship://targets/t.tar")) == data


def _requested_after(fetcher: MqttBlockFetcher, since: float) -> set[int]:
    return {i for t, r in fetcher.requests_sent if t >= since and r.bitmap for i in r.wanted()}


@pytest.mark.slow
def test_broker_restart_mid_transfer_resumes_without_refetching(mosquitto_broker: MosquittoBroker,
                                                                  tmp_path: Path) -> None:
    # ~2 MB at 1 MB/s: the broker goes down for a second in the middle
    rig = Rig(mosquitto_broker, tmp_path, rate_bytes_per_s=1_000_000, burst_bytes=64_000,
              config=BlockTransferConfig(block_size=8192, window=32, request_timeout_s=1.0))
    data = rig.target("bundle.tar", 2_000_000)
    total = -(-len(data) // 8192)
    snapshot: list[set[int]] = []
    restarted_at: list[float] = []

    def progress(stream: str, have: int, of: int) -> None:
        if have >= total // 3 and not snapshot and not restarted_at:
            restarted_at.append(-1.0)
            threading.Thread(target=restart, daemon=True).start()

    def restart() -> None:
        mosquitto_broker.stop()
        time.sleep(0.3)
        assert rig.fetcher.current is not None
        snapshot.append(set(rig.fetcher.current.have))
        time.sleep(0.7)
        restarted_at[0] = time.monotonic()
        mosquitto_broker.start()

    rig.fetcher.progress = progress
    try:
        got = b"".join(rig.fetcher.fetch("edgeship://targets/bundle.tar"))
        assert got == data
        assert snapshot and restarted_at[0] > 0
        finished_before = snapshot[0]
        assert total // 3 <= len(finished_before) < total
        asked_again = _requested_after(rig.fetcher, restarted_at[0]) & finished_before
        assert not asked_again, sorted(asked_again)[:10]
        assert _requested_after(rig.fetcher, restarted_at[0])  # it did go on asking after the restart
        assert rig.device.connects >= 2 and rig.controller.connects >= 2
        assert rig.fetcher.blocks_received == total
    finally:
        rig.close()


_CHILD_FETCHER = r"""
import hashlib, json, sys
from edgeship.ota.blocks import BlockTransferConfig, MqttBlockFetcher
from edgeship.ota.transport import MqttConnection
url, work = sys.argv[1], sys.argv[2]
conn = MqttConnection(url, client_id="pi-02").connect(10)
def progress(stream, have, total):
    print(f"have {have} {total}", flush=True)
fetcher = MqttBlockFetcher(conn, fleet="lab", device="pi-02", work_dir=work, progress=progress,
                           config=BlockTransferConfig(block_size=4096, window=16, sync_every_blocks=4))
digest = hashlib.sha256()
for chunk in fetcher.fetch("edgeship://targets/bundle.tar"):
    digest.update(chunk)
    if fetcher.current is not None and len(fetcher.current.have) and not hasattr(fetcher, "said"):
        fetcher.said = True
        print(f"resumed-with {len(fetcher.current.have)}", flush=True)
asked = sorted({i for _, r in fetcher.requests_sent if r.bitmap for i in r.wanted()})
print("done " + json.dumps({"sha256": digest.hexdigest(), "asked": asked,
                             "received": fetcher.blocks_received}), flush=True)
conn.close()
"""


@pytest.mark.slow
def test_killed_fetcher_process_resumes_from_disk(mosquitto_broker: MosquittoBroker, tmp_path: Path) -> None:
    rig = Rig(mosquitto_broker, tmp_path, rate_bytes_per_s=600_000, burst_bytes=32_000)
    data = rig.target("bundle.tar", 1_200_000)
    total = -(-len(data) // 4096)
    work = tmp_path / "pi-02"
    try:
        first = python_child(_CHILD_FETCHER, mosquitto_broker.url, str(work))
        line = read_line_with(first, f"have {total // 2} ")
        assert line
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
        sidecars = list((work / "partial").glob("*.json"))
        assert len(sidecars) == 1
        on_disk = set(indexes_from_bitmap(json.loads(sidecars[0].read_text())["have"]))
        assert total // 3 < len(on_disk) < total  # fsynced every 4 blocks: most of what arrived is durable

        second = python_child(_CHILD_FETCHER, mosquitto_broker.url, str(work))
        done = read_line_with(second, "done ", timeout=60)
        second.communicate(timeout=10)
        result = json.loads(done.split("done ", 1)[1])
        assert result["sha256"] == hashlib.sha256(data).hexdigest()
        assert not set(result["asked"]) & on_disk, "a block already on disk was requested again"
        assert result["received"] == total - len(on_disk)
        assert set(result["asked"]) | on_disk == set(range(total))
        assert not list((work / "partial").iterdir())
    finally:
        rig.close()


@pytest.mark.mosquitto_clients
def test_hostile_requests_are_dropped_and_the_server_keeps_serving(rig: Rig, mosquitto_broker: MosquittoBroker,
                                                                   tmp_path: Path) -> None:
    import subprocess

    data = rig.target("ok.tar", 100_000)
    big = tmp_path / "big.json"
    big.write_bytes(b'{"v":1,"type":"block_request","request_id":"r","stream":"targets/ok.tar","block_size":4096,'
                    b'"bitmap":"' + b"ff" * 20_000 + b'"}')
    topic = rig.fetcher.request_topic
    hostile = [b"junk", b"\xff\xfe", b"[]", b'{"v":2,"type":"block_request"}',
               b'{"v":1,"type":"block_request","request_id":"r","stream":"../keys/root.key","block_size":4096}',
               b'{"v":1,"type":"block_request","request_id":"r","stream":"targets/ok.tar","block_size":1}',
               b'{"v":1,"type":"block_request","request_id":"r","stream":"targets/ok.tar","block_size":4096,'
               b'"bitmap":"zz"}']
    for payload in hostile:
        subprocess.run(["mosquitto_pub", "-p", str(mosquitto_broker.port), "-h", "127.0.0.1", "-t", topic, "-s",
                        "-q", "1"], input=payload, check=True, timeout=10)
    subprocess.run(["mosquitto_pub", "-p", str(mosquitto_broker.port), "-h", "127.0.0.1", "-t", topic, "-f",
                    str(big), "-q", "1"], check=True, timeout=10)
    # a request on a topic that is not a device topic, and one for keys/ that parses but must not be served
    rig.device.publish("edgeship/lab/devices/pi-01/blocks/request", encode_message(
        BlockRequest("r2", "keys/root.key", 4096, "01")), qos=1)
    assert wait_until(lambda: rig.controller.dropped == len(hostile) + 1, 10), rig.controller.dropped
    assert b"".join(rig.fetcher.fetch("edgeship://targets/ok.tar")) == data
    assert wait_until(lambda: len(rig.server.log) >= 2, 5)
    assert [e.outcome for e in rig.server.log][0] == "not-found"  # keys/ is outside metadata/ and targets/
    assert rig.controller.is_connected and rig.controller.connects == 1


def test_two_server_replicas_share_the_requests(mosquitto_broker: MosquittoBroker, tmp_path: Path) -> None:
    rig = Rig(mosquitto_broker, tmp_path, shared_group="controllers",
              config=BlockTransferConfig(block_size=4096, window=8))
    other = MqttConnection(mosquitto_broker.url, client_id="controller-2", reconnect=FAST).connect(5)
    replica = BlockServer(other, rig.root, shared_group="controllers").start()
    try:
        data = rig.target("shared.tar", 400_000)
        assert b"".join(rig.fetcher.fetch("edgeship://targets/shared.tar")) == data
        first = [e for e in rig.server.log if e.outcome == "blocks"]
        second = [e for e in replica.log if e.outcome == "blocks"]
        assert first and second, (len(first), len(second))
        served = [i for e in first + second for i in e.served]
        assert sorted(set(served)) == list(range(-(-len(data) // 4096)))
    finally:
        replica.stop()
        other.close()
        rig.close()


def test_partial_file_sidecar_never_runs_ahead_of_the_data(tmp_path: Path) -> None:
    from edgeship.ota.blocks import PartialFile

    partial = PartialFile(tmp_path, "targets/x.tar", 10 * 256 + 7, 256, "e1")
    for index in (0, 1, 2, 5):
        partial.write(index, bytes([index]) * 256)
    partial.sync(every_blocks=2)  # due: runs in the background
    partial.write(10, b"z" * 7)
    partial.close()  # waits for it, then records the rest
    again = PartialFile(tmp_path, "targets/x.tar", 10 * 256 + 7, 256, "e1")
    assert again.have == {0, 1, 2, 5, 10}
    assert again.read(5) == b"\x05" * 256 and again.read(10) == b"z" * 7
    assert again.missing() == [3, 4, 6, 7, 8, 9]
    # another etag (the file changed on the server) starts over
    other = PartialFile(tmp_path, "targets/x.tar", 10 * 256 + 7, 256, "e2")
    assert other.have == set()
    other.write(0, b"a" * 256)
    other.discard()
    other.close()  # after a discard nothing is written back
    assert not list(tmp_path.iterdir())
    again.close()


def test_server_can_publish_on_a_second_connection(mosquitto_broker: MosquittoBroker, tmp_path: Path) -> None:
    rig = Rig(mosquitto_broker, tmp_path)
    rig.server.stop()
    publisher = MqttConnection(mosquitto_broker.url, client_id="controller-pub", reconnect=FAST).connect(5)
    rig.server = BlockServer(rig.controller, rig.root, publisher=publisher).start()
    try:
        data = rig.target("two.tar", 300_000)
        assert b"".join(rig.fetcher.fetch("edgeship://targets/two.tar")) == data
    finally:
        rig.close()
        publisher.close()


# -- The block server's rate limit is per device: one device that spent its bucket does not slow
# another down, nor the same device id in another fleet.

@pytest.mark.mosquitto
def test_block_rate_limit_is_per_device_and_fleet(mosquitto_broker: MosquittoBroker, tmp_path: Path) -> None:
    (tmp_path / "metadata").mkdir()
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "b.tar").write_bytes(b"x" * 64 * 1024)
    now: list[float] = [100.0]
    conn = MqttConnection(mosquitto_broker.url, client_id="ctl-rate").connect(5)
    try:
        server = BlockServer(conn, tmp_path, rate_bytes_per_s=1024, burst_bytes=8 * 1024, clock=lambda: now[0])
        want = bitmap_from_indexes(range(16), 0)
        first = server.serve("plant", "dev-a", BlockRequest("r1", "targets/b.tar", 1024, want, 0))
        assert first.outcome == "rate-limited" and len(first.served) == 8  # its 8 KiB burst, no more
        again = server.serve("plant", "dev-a", BlockRequest("r2", "targets/b.tar", 1024, want, 0))
        assert again.outcome == "rate-limited" and again.served == ()
        other = server.serve("plant", "dev-b", BlockRequest("r3", "targets/b.tar", 1024, want, 0))
        assert len(other.served) == 8  # a full bucket of its own
        same_id_other_fleet = server.serve("lab", "dev-a", BlockRequest("r4", "targets/b.tar", 1024, want, 0))
        assert len(same_id_other_fleet.served) == 8
        now[0] += 2.0  # 2 s at 1 KiB/s refill dev-a by two blocks
        later = server.serve("plant", "dev-a", BlockRequest("r5", "targets/b.tar", 1024, want, 0))
        assert len(later.served) == 2
    finally:
        conn.close()


def test_a_device_asking_again_while_its_request_waits_replaces_it(mosquitto_broker: MosquittoBroker,
                                                                   tmp_path: Path) -> None:
    """Under load every device re-asks on its timeout; copies of one device's request for one stream
    are served once (the newest), and only a full queue of distinct requests drops one."""
    from edgeship.ota.protocol import encode_message
    from edgeship.ota.transport import ReceivedMessage

    (tmp_path / "metadata").mkdir()
    (tmp_path / "targets").mkdir()
    conn = MqttConnection(mosquitto_broker.url, client_id="ctl-coalesce").connect(5)
    try:
        server = BlockServer(conn, tmp_path, queue_size=2)  # not started: nothing is served yet

        def ask(device: str, request_id: str, stream: str = "targets/b.tar") -> None:
            payload = encode_message(BlockRequest(request_id, stream, 1024, bitmap_from_indexes(range(4), 0), 0))
            server._on_request(ReceivedMessage(f"edgeship/plant/devices/{device}/blocks/request", payload, 1, False))

        ask("dev-a", "a1")
        ask("dev-a", "a2")
        ask("dev-a", "a3")
        assert server._queue.qsize() == 1 and server.coalesced_requests == 2 and server.dropped_requests == 0
        assert server._waiting[("plant", "dev-a", "targets/b.tar")].request_id == "a3"  # the newest is served
        ask("dev-a", "a4", "targets/c.tar")  # another stream of the same device is its own request
        ask("dev-b", "b1")  # the queue is full: a distinct request is dropped and counted
        assert server._queue.qsize() == 2 and server.dropped_requests == 1
        assert ("plant", "dev-b", "targets/b.tar") not in server._waiting
    finally:
        conn.close()


@pytest.mark.parametrize("waits,expected", [
    ([3.0], 6.0), ([6.0], 12.0), ([12.0], 24.0), ([24.0], 24.0), ([24.0, 24.0], 24.0),
])
def test_reasks_back_off_to_eight_request_timeouts(waits: list[float], expected: float) -> None:
    from edgeship.ota.block_transfer import next_reask_s

    config = BlockTransferConfig(request_timeout_s=3.0)
    current = waits[0]
    for _ in waits:
        result = next_reask_s(current, config)
        current = result
    assert result == expected
