"""What the broker's rules cost: explicit per-device ACL blocks at fleet scale, and
issuing credentials.

Mosquitto's ACL file plugin looks a user's block up per message, so an ACL with
thousands of `user` blocks could slow every publish. This measures, on a real
Mosquitto running the generated config (TLS, client certificates):

- device -> controller QoS 1 throughput with the ACL of a small fleet (the
  baseline) and of a large one (same run, same clients; ratio);
- revocation, timed as `revoke` -> the revoked device's next connection refused;
- the cost of issuing one device's credentials and rendering the ACL.

The large fleet's other devices are ACL entries only (no certificates): the
per-message lookup is what is measured.

Run: .venv/bin/python benchmarks/broker.py [--devices 10000] [--messages 2000] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from broker_fixtures import start_broker

from edgeship.toolkit import broker_config as bc


def throughput(b, device_creds, messages: int) -> float:  # type: ignore[no-untyped-def]
    ctl, why = b.connect_as(b.controller())
    dev, why2 = b.connect_as(device_creds)
    assert ctl is not None and dev is not None, (why, why2)
    ctl.subscribe("edgeship/#")
    topic = f"edgeship/f1/devices/{device_creds['username']}/telemetry"
    start = time.perf_counter()
    for _ in range(messages):
        dev.mqttc.publish(topic, b"x" * 64, qos=1)
    dev.publish(f"edgeship/f1/devices/{device_creds['username']}/events", b"end")
    assert ctl.wait_for_payload(f"edgeship/f1/devices/{device_creds['username']}/events", b"end", timeout=120)
    elapsed = time.perf_counter() - start
    got = sum(1 for t, _ in ctl.drain(0) if t == topic)
    assert got == messages, f"{got} of {messages} arrived"
    ctl.close()
    dev.close()
    return messages / elapsed


def with_acl_of(b, devices: int) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the ACL with ``devices`` extra device blocks (registry identities kept) and reload."""
    real = [bc.AclIdentity(r.name, r.kind, r.fleet) for r in b.folder.records().values() if r.active]
    extra = [bc.AclIdentity(f"bulk-{i:06d}", "device", "f1") for i in range(devices)]
    (b.folder.path / "acl").write_text(bc.render_acl(real + extra))
    b.folder.reload_broker()
    time.sleep(1.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--write", action="store_true", help="write the results into docs/benchmarks.md")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edgeship-bench-broker-"))
    b = start_broker(root, auth="cert")
    try:
        t0 = time.perf_counter()
        issued = [b.device(f"dev-{i}") for i in range(20)]
        issue_ms = (time.perf_counter() - t0) / 20 * 1000
        t0 = time.perf_counter()
        text = bc.render_acl([bc.AclIdentity(f"bulk-{i:06d}", "device", "f1") for i in range(args.devices)])
        render_ms = (time.perf_counter() - t0) * 1000
        dev = issued[0]

        # revocation: from `revoke` (registry, ACL, CRL, SIGHUP) to the device's next connection refused
        victim = issued[1]
        assert b.connect_as(victim)[0] is not None
        t0 = time.perf_counter()
        b.folder.revoke(victim["username"])
        while True:
            client, _ = b.connect_as(victim, timeout=2)
            if client is None:
                break
            client.close()
        revoke_s = time.perf_counter() - t0

        with_acl_of(b, 10)
        small = throughput(b, dev, args.messages)
        with_acl_of(b, args.devices)
        large = throughput(b, dev, args.messages)
    finally:
        b.stop()
    lines = [
        "## broker",
        "",
        "The broker's rules at fleet scale: a real Mosquitto 2.0 running the config of `broker config`",
        "(TLS 1.2+, client certificates, explicit per-device ACL blocks), on loopback, on the shared",
        "2-core CI machine. The large ACL's other devices are ACL entries only; the publishing device's",
        "block sorts after all of them (the worst place for Mosquitto's per-message user lookup).",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| device -> controller QoS 1, ACL of 10 devices (baseline) | {small:,.0f} msg/s |",
        f"| the same, ACL of {args.devices:,} devices | {large:,.0f} msg/s ({large / small:.2f}x the baseline) |",
        f"| `device revoke` -> the device's next connection refused (upper bound: includes the paho client's connect and close) | {revoke_s * 1000:.0f} ms |",
        f"| issue one device's credentials (key, certificate, registry, ACL, CRL) | {issue_ms:.0f} ms |",
        f"| render the ACL of {args.devices:,} devices | {render_ms:.0f} ms ({len(text) / 1e6:.1f} MB) |",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/broker.py --devices {args.devices} --messages {args.messages} --write`",
    ]
    print("\n".join(lines))
    if args.write:
        from results_doc import write_section

        write_section("broker", "\n".join(lines))
    if os.environ.get("KEEP"):
        print(root)


if __name__ == "__main__":
    main()
