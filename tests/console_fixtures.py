"""A fleet store filled as a controller fills it (the store's own ingest of real protocol messages),
and a console server over it, for the console's HTTP and browser tests and its benchmark."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edgeship.ota.protocol import EventMessage, ReportedMessage, StatusMessage, TelemetryMessage
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.toolkit.store import FleetStore, IngestItem

OPERATOR_TOKEN = "operator-" + "o" * 20
VIEWER_TOKEN = "viewer-" + "v" * 20
V1 = {"name": "digits", "version": "1.0.0"}
V2 = {"name": "digits", "version": "1.1.0"}


def histogram(rng: random.Random, n: int, centre_ms: float) -> LatencyHistogram:
    hist = LatencyHistogram()
    for _ in range(n):
        hist.observe(max(0.05, rng.gauss(centre_ms, centre_ms / 5)))
    return hist


def fill_fleet(store: FleetStore, devices: int = 12, fleet: str = "plant", windows: int = 3, seed: int = 7,
               now: float | None = None) -> list[str]:
    """``devices`` devices of one fleet on digits 1.0.0 (every third offline, sites as tags), each with
    telemetry windows and an event; returns their ids."""
    rng = random.Random(seed)
    at = time.time() if now is None else now
    ids = [f"{fleet}-{i:05d}" for i in range(devices)]
    items: list[IngestItem] = []
    for i, device in enumerate(ids):
        items.append(IngestItem(fleet, device, StatusMessage("online" if i % 3 else "offline", at), at))
        items.append(IngestItem(fleet, device, ReportedMessage(device=device, ts=at, active=dict(V1), previous=None,
                                                               update=None, agent_version="0.1.0",
                                                               runtime="litert"), at))
        items.append(IngestItem(fleet, device, EventMessage("update_committed", at - 60, 1, bundle=dict(V1),
                                                            state="COMMITTED"), at - 60))
        for w in range(windows):
            hist = histogram(rng, 40, 2.0 + (i % 5) * 0.3)
            items.append(IngestItem(fleet, device, TelemetryMessage(ts=at - w * 10, window_s=10.0, requests=40,
                                                                    errors=rng.randint(0, 1), latency=hist,
                                                                    bundle=dict(V1), drift=0.1 * (i % 4)),
                                    at - w * 10))
    for start in range(0, len(items), 2000):
        store.ingest(items[start:start + 2000])
    store.set_tags(ids[0], {"site": "berlin" if fleet == "plant" else "lyon"})
    return ids


def start_rollout(store: FleetStore, fleet: str = "plant", stages: str = "25,100") -> str:
    from edgeship.toolkit.commands.fleet_options import policy_from_options
    from edgeship.toolkit.rollouts import new_rollout
    from edgeship.toolkit.store import new_id

    now = time.time()
    policy = policy_from_options(stages, 90.0, "10%", "", "30m", "0s")
    rollout = new_rollout(new_id("r"), fleet, V2["name"], V2["version"], policy, now)
    store.create_rollout(rollout)
    store.reconcile_rollout(rollout.id, now)  # the controller's first tick: the first stage's devices
    return rollout.id


def start_abtest(store: FleetStore, fleet: str = "plant") -> str:
    from edgeship.toolkit.abtest import ABTest, Arm, Metric
    from edgeship.toolkit.store import new_id

    test = ABTest(id=new_id("ab"), fleet=fleet, a=Arm(V1["name"], V1["version"]), b=Arm(V2["name"], V2["version"]),
                  metric=Metric.LATENCY_P95, min_samples=5, created_at=time.time() - 600)
    store.create_abtest(test)
    return test.id


def ab_telemetry(store: FleetStore, test_id: str, fleet: str = "plant", per_device: int = 6) -> None:
    """Windows from every device of the test's fleet, on its arm's version; B answers slower."""
    from edgeship.toolkit.abtest import assign_arm

    rng = random.Random(3)
    now = time.time()
    items = []
    for device in store.list_devices(fleet):
        arm = assign_arm(test_id, device.id, 50.0)
        bundle, centre = (V2, 3.5) if arm == "B" else (V1, 2.0)
        for w in range(per_device):
            items.append(IngestItem(fleet, device.id, TelemetryMessage(
                ts=now - w, window_s=10.0, requests=50, errors=0, latency=histogram(rng, 50, centre), bundle=dict(bundle)),
                now - w))
    store.ingest(items)


@pytest.fixture
def console_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESHIP_CONSOLE_OPERATOR_TOKEN", OPERATOR_TOKEN)
    monkeypatch.setenv("EDGESHIP_CONSOLE_VIEWER_TOKEN", VIEWER_TOKEN)


def serve(store: FleetStore) -> Any:
    from edgeship.toolkit.commands.fleet_options import policy_from_options
    from edgeship.toolkit.console import ConsoleServer
    from edgeship.toolkit.console.auth import Credentials

    creds = Credentials(operator=OPERATOR_TOKEN, viewer=VIEWER_TOKEN)
    policy = policy_from_options("50,100", 90.0, "10%", "", "30m", "0s")
    return ConsoleServer(store, creds, port=0, promotion_policy=policy).start()


@pytest.fixture
def console_store(tmp_path: Any) -> Iterator[FleetStore]:
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield store
    store.close()
