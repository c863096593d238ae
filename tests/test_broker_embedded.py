"""The same topic rules on the embedded broker (amqtt), where it can follow them:
password identities from the broker folder, per-device publish/subscribe/delivery
rules; and `edgeship broker run --broker-dir` as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import Client, connect, creds, stop_gracefully
from click.testing import CliRunner
from mqtt_broker import free_port

from edgeship.toolkit.broker_config import BrokerSettings
from edgeship.toolkit.cli import main
from edgeship.toolkit.identities import BrokerFolder

pytest.importorskip("amqtt")
pytest.importorskip("edgeship.toolkit.embedded_broker")


def t(device: str, kind: str) -> str:
    return f"edgeship/f1/devices/{device}/{kind}"


def login(port: int, folder: Path) -> tuple[Client | None, str]:
    c = creds(folder)
    return connect(port, tls=False, username=c["username"], password=Path(c["password"]).read_text().strip(),
                   client_id=c["username"])


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[dict[str, Any]]:
    from edgeship.toolkit.embedded_rules import RuledEmbeddedBroker

    folder = BrokerFolder(tmp_path / "broker")
    folder.create_or_update(BrokerSettings(auth="password", run_as=""))
    for name in ("dev-a", "dev-b"):
        folder.issue_device(name, "f1", tmp_path / name)
    port = free_port()
    broker = RuledEmbeddedBroker("127.0.0.1", port, folder.path).start()
    try:
        yield {"port": port, "folder": folder, "root": tmp_path}
    finally:
        broker.stop()


def test_embedded_broker_applies_the_device_rules(embedded: dict[str, Any]) -> None:
    port, root, folder = embedded["port"], embedded["root"], embedded["folder"]
    ctl, outcome = login(port, folder.controller_dir)
    assert ctl is not None, outcome
    a, outcome = login(port, root / "dev-a")
    assert a is not None, outcome
    try:
        assert connect(port, tls=False)[0] is None  # anonymous
        assert connect(port, tls=False, username="dev-a", password="guess")[0] is None
        ctl.subscribe("edgeship/#")
        # subscriptions outside its own subtree are refused (SUBACK failure), its own granted
        assert all(rc.is_failure for rc in a.subscribe(t("dev-b", "desired")))
        assert all(rc.is_failure for rc in a.subscribe("edgeship/#"))
        assert not any(rc.is_failure for rc in a.subscribe(t("dev-a", "desired")))
        ctl.publish(t("dev-b", "desired"), b"for-b")
        ctl.publish(t("dev-a", "desired"), b"for-a")
        assert a.wait_for(t("dev-a", "desired")) == b"for-a"
        assert [x for x, _ in a.drain()] == [t("dev-a", "desired")]
        # publishes outside its own writable topics are dropped
        for topic in (t("dev-b", "reported"), t("dev-a", "desired"), t("dev-a", "blocks/data"), "other/x"):
            a.publish(topic, b"evil")
        a.publish(t("dev-a", "reported"), b"mine")
        assert ctl.wait_for_payload(t("dev-a", "reported"), b"mine")
        seen = {x for x, p in ctl.drain() if p == b"evil"}
        assert seen == set(), seen
        # revoking takes effect at the next check: no publish, no delivery, no new login
        folder.revoke("dev-a")
        a.publish(t("dev-a", "reported"), b"after-revoke")
        ctl.publish(t("dev-a", "desired"), b"to-revoked")
        assert ctl.wait_for(t("dev-a", "reported"), timeout=1) is None
        assert a.wait_for(t("dev-a", "desired"), timeout=1) is None
        assert login(port, root / "dev-a")[0] is None
    finally:
        a.close()
        ctl.close()


def test_embedded_rules_need_a_password_folder(tmp_path: Path) -> None:
    folder = BrokerFolder(tmp_path / "b")
    folder.create_or_update(BrokerSettings(auth="cert", run_as=""))
    r = CliRunner().invoke(main, ["broker", "run", "--port", str(free_port()), "--broker-dir", str(folder.path)],
                           catch_exceptions=False)
    assert r.exit_code == 2 and "passwords only" in r.output and r.output.count("\n") == 1


def test_broker_run_with_rules_as_a_process(tmp_path: Path) -> None:
    folder = BrokerFolder(tmp_path / "b")
    folder.create_or_update(BrokerSettings(auth="password", run_as=""))
    folder.issue_device("dev-a", "f1", tmp_path / "dev-a")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeship.toolkit.cli", "broker", "run", "--port", str(port),
                             "--broker-dir", str(folder.path), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        text = b""
        while not text.endswith(b"}\n"):  # one JSON document, printed once listening
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            text += line
        doc = json.loads(text)
        assert doc["acl"] is True and doc["anonymous"] is False and doc["url"].endswith(f":{port}")
        assert connect(port, tls=False)[0] is None
        a, outcome = login(port, tmp_path / "dev-a")
        assert a is not None, outcome
        a.close()
    finally:
        stop_gracefully(proc)
    assert proc.returncode == 0
