"""Fixtures for the controller tests: a real release repository built through the CLI from
the digits model, a running controller over a real store and Mosquitto, and simulated devices
speaking the real protocol over their own MqttConnection (one connection per device)."""

from __future__ import annotations

import datetime as dt
import json
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner
from polling import wait_for  # also re-exported for the tests

from edgeship.ota.director import DesiredState, load_director_public_key, verify_desired_state
from edgeship.ota.protocol import (
    DesiredMessage,
    EventMessage,
    ModelTelemetry,
    ReportedMessage,
    StatusMessage,
    TelemetryMessage,
    encode_message,
    parse_message,
)
from edgeship.ota.telemetry import LatencyHistogram
from edgeship.ota.topics import DESIRED, EVENTS, REPORTED, STATUS, TELEMETRY, device_topic
from edgeship.ota.transport import MqttConnection, ReconnectPolicy, WillMessage
from edgeship.toolkit.cli import main

__all__ = ["PASS", "FAST", "SimDevice", "cli", "cli_json", "make_release_repo", "wait_for", "start_controller"]

PASS = "controller test passphrase"
FAST = ReconnectPolicy(initial_s=0.1, max_s=0.5)


def cli(args: list[str], code: int = 0, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(main, args, catch_exceptions=False, env=env)
    assert result.exit_code == code, (args, result.output, getattr(result, "stderr", ""))
    return result


def cli_json(args: list[str], env: dict[str, str] | None = None) -> Any:
    return json.loads(cli(args + ["--json"], env=env).stdout)


def make_release_repo(folder: Path, model: Path, versions: list[str], name: str = "digits") -> Path:
    """``edgeship keys init`` + ``bundle build`` + ``publish`` for each version, through the CLI."""
    env = {"EDGESHIP_ROOT_PASSPHRASE": PASS}
    repo = folder / "repo"
    cli(["keys", "init", "--repo", str(repo)], env=env)
    for version in versions:
        bundle = folder / f"{name}-{version}.bundle"
        cli(["bundle", "build", str(model), "--name", name, "--version", version, "-o", str(bundle)], env=env)
        cli(["publish", str(bundle), "--repo", str(repo)], env=env)
    return repo


@dataclass
class SimDevice:
    """A device speaking the real protocol: retained status (birth/last will) and reported state,
    events with a growing seq, telemetry windows; it verifies every desired state it receives
    with the director's public key, and can answer one by reporting COMMITTED."""

    broker: str
    fleet: str
    device: str
    director_pub: Path
    active: dict[str, str] | None = None
    auto_commit: bool = False
    desired: queue.Queue[DesiredState] = field(default_factory=queue.Queue)
    refused: list[str] = field(default_factory=list)
    last_sequence: int | None = None
    seq: int = 0
    multi_model: bool = False
    """Speak as a multi-model agent: report a ``models`` map, read desired-state schema 2."""
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    """model name -> {"active": bundle ref, "serving_version": n} (a multi-model device)."""
    documents: list[dict[str, Any]] = field(default_factory=list)
    """Every verified schema-2 document (the signed part), in order."""

    def topic(self, kind: str) -> str:
        return device_topic(self.fleet, self.device, kind)

    def connect(self) -> SimDevice:
        offline = encode_message(StatusMessage("offline"))
        online = encode_message(StatusMessage("online", time.time()))
        self.connection = MqttConnection(self.broker, client_id=self.device, reconnect=FAST,
                                         last_will=WillMessage(self.topic(STATUS), offline),
                                         birth=WillMessage(self.topic(STATUS), online)).connect(10)
        self.connection.subscribe(self.topic(DESIRED), self._on_desired, qos=1)
        self.report()
        return self

    def close(self, send_will: bool = True) -> None:
        self.connection.close(send_will=send_will)

    def _on_desired(self, message: Any) -> None:
        envelope = parse_message(DESIRED, message.payload)
        assert isinstance(envelope, DesiredMessage)
        signed = envelope.envelope.get("signed") if isinstance(envelope.envelope, dict) else None
        if self.multi_model and isinstance(signed, dict) and signed.get("schema") == 2:
            self._on_schema2(envelope.envelope)
            return
        try:
            state = verify_desired_state(envelope.envelope, load_director_public_key(self.director_pub),
                                         device=self.device, fleet=self.fleet, last_sequence=self.last_sequence,
                                         now=dt.datetime.now(dt.timezone.utc))
        except Exception as exc:  # noqa: BLE001 - a refused document (or a bug) is recorded for the test to see; raised, it would vanish in paho's thread
            self.refused.append(f"{type(exc).__name__}: {exc}")
            return
        self.last_sequence = state.sequence
        self.desired.put(state)
        if self.auto_commit:
            threading.Thread(target=self.commit, args=(state,), daemon=True).start()

    def _on_schema2(self, envelope: dict[str, Any]) -> None:
        """What a multi-model agent checks before it acts on a schema-2 document: the director's
        signature over the canonical JSON, its device and fleet, a sequence that grew, the expiry."""
        from edgeship.ota.director import canonical_json, parse_utc

        signed = envelope["signed"]
        try:
            key = load_director_public_key(self.director_pub)
            key.verify(bytes.fromhex(envelope["signatures"][0]["sig"]), canonical_json(signed))
            assert signed["device"] == self.device and signed["fleet"] == self.fleet, "wrong device"
            assert self.last_sequence is None or signed["sequence"] > self.last_sequence, "replayed"
            assert parse_utc(signed["expires"]) > dt.datetime.now(dt.timezone.utc), "expired"
        except Exception as exc:  # noqa: BLE001 - a refused document is recorded, never installed
            self.refused.append(f"{type(exc).__name__}: {exc}")
            return
        self.last_sequence = signed["sequence"]
        self.documents.append(signed)
        if self.auto_commit:
            threading.Thread(target=self.commit_models, args=(signed,), daemon=True).start()

    def commit_models(self, signed: dict[str, Any]) -> None:
        """Install each model whose entry changed (one update per model); drop the ones left out."""
        for name, entry in sorted(signed["models"].items()):
            bundle = {"name": entry["bundle"], "version": entry["version"]}
            have = self.models.get(name, {})
            if have.get("active") == bundle:
                continue
            previous = have.get("active")
            self.models[name] = {"active": bundle, "previous": previous, "serving_version": entry["serving_version"],
                                 "update": {"state": "COMMITTED", "bundle": bundle}}
            self.active = bundle
            self.event("update_committed", bundle=bundle, state="COMMITTED", deployment=entry["deployment"],
                       model=name)
            self.report(update={"state": "COMMITTED", "bundle": bundle}, previous=previous)
        for name in [n for n in self.models if n not in signed["models"]]:
            del self.models[name]
            self.report()

    def commit(self, state: DesiredState, transfer: dict[str, Any] | None = None) -> None:
        """Report ``state``'s bundle COMMITTED; ``transfer``: how it travelled, on the update (with
        the update id and deployment an agent reports beside it)."""
        bundle = {"name": state.bundle, "version": state.version}
        previous = self.active
        self.active = bundle
        update: dict[str, Any] = {"state": "COMMITTED", "bundle": bundle}
        if transfer is not None:
            update.update(id=f"{self.device}-{state.sequence}", deployment=state.deployment, transfer=transfer)
        self.event("update_committed", bundle=bundle, state="COMMITTED", deployment=state.deployment)
        self.report(update=update, previous=previous)

    def report(self, update: dict[str, Any] | None = None, previous: dict[str, str] | None = None,
               device: str | None = None) -> None:
        message = ReportedMessage(device=device or self.device, ts=time.time(), active=self.active,
                                  previous=previous, update=update, agent_version="sim", runtime="none",
                                  models={n: {k: v for k, v in m.items() if v is not None}
                                          for n, m in self.models.items()} if self.multi_model else None)
        self.connection.publish(self.topic(REPORTED), encode_message(message), qos=1, retain=True)

    def event(self, name: str, **fields: Any) -> None:
        self.seq += 1
        self.connection.publish(self.topic(EVENTS), encode_message(EventMessage(name, time.time(), self.seq,
                                                                                **fields)), qos=1)

    def telemetry(self, requests: int = 100, errors: int = 0, latency_ms: float = 2.0, drift: float | None = None,
                  qos: int = 1) -> None:
        histogram = LatencyHistogram()
        for _ in range(requests):
            histogram.observe(latency_ms)
        per_model = tuple(ModelTelemetry(name, m["active"]["version"], m.get("serving_version"), requests, errors,
                                         histogram, drift=drift)
                          for name, m in sorted(self.models.items())) if self.multi_model else ()
        message = TelemetryMessage(ts=time.time(), window_s=10.0, requests=requests, errors=errors, latency=histogram,
                                   bundle=self.active, drift=drift, models=per_model)
        self.connection.publish(self.topic(TELEMETRY), encode_message(message), qos=qos)


def start_controller(broker_url: str, repo: Path, db_url: str, **overrides: Any) -> Any:
    from edgeship.toolkit.controller import Controller, ControllerConfig

    config = ControllerConfig(broker=broker_url, repo=repo, db_url=db_url, **{"tick_s": 0.2, **overrides})
    return Controller(config).start()


@pytest.fixture(scope="session")
def digits_repo_template(digits_tflite: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release repository with digits 1.0.0 and 1.1.0 (built once; tests copy it)."""
    return make_release_repo(tmp_path_factory.mktemp("controller-repo"), digits_tflite, ["1.0.0", "1.1.0"])


@pytest.fixture
def release_repo(digits_repo_template: Path, tmp_path: Path) -> Path:
    """A private copy of the digits release repository (tests may re-sign it)."""
    target = tmp_path / "repo"
    shutil.copytree(digits_repo_template, target)
    return target


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture
def devices_factory(mosquitto_broker: Any, release_repo: Path) -> Iterator[Callable[..., SimDevice]]:
    made: list[SimDevice] = []

    def make(device: str, fleet: str = "plant", **kwargs: Any) -> SimDevice:
        sim = SimDevice(mosquitto_broker.url, fleet, device, release_repo / "director" / "director.pub",
                        **kwargs).connect()
        made.append(sim)
        return sim

    yield make
    for sim in made:
        try:
            sim.close(send_will=False)
        except Exception:  # noqa: BLE001, S110 - teardown: a simulator already gone must not hide the test's result
            pass
