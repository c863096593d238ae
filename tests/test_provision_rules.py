"""The pure decisions of provisioning, table by table: targets, tags, hosts files,
the probe's output, the refusal rules, file actions, the unit and env files."""

from __future__ import annotations

import base64
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from edgeship.ota.errors import BadInputError
from edgeship.toolkit.provisioning import (
    HostFacts,
    HostRequirements,
    SshTarget,
    broker_table_lines,
    check_host,
    default_prefix,
    file_action,
    parse_host_facts,
    parse_hosts_file,
    parse_tags,
    parse_target,
    probe_script,
    render_agent_env,
    render_systemd_unit,
    wheel_content_id,
)

# -- targets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,port,expected", [
    ("pi@raspberrypi", None, SshTarget("pi", "raspberrypi", 22)),
    ("pi@10.0.0.7:2222", None, SshTarget("pi", "10.0.0.7", 2222)),
    ("pi@10.0.0.7:2222", 22, SshTarget("pi", "10.0.0.7", 22)),
    ("root@[fe80::1]:2200", None, SshTarget("root", "fe80::1", 2200)),
    ("root@[::1]", None, SshTarget("root", "::1", 22)),
    ("edge_user@gw-3.plant.example.com", 2022, SshTarget("edge_user", "gw-3.plant.example.com", 2022)),
])
def test_targets(text: str, port: int | None, expected: SshTarget) -> None:
    assert parse_target(text, port=port) == expected


@pytest.mark.parametrize("text,fragment", [
    ("raspberrypi", "USER@HOST"),
    ("@host", "USER@HOST"),
    ("pi@", "not a host"),
    ("pi@host:port", "not a number"),
    ("pi@host:70000", "out of range"),
    ("p i@host", "USER@HOST"),
    ("pi@host;rm -rf /", "not a host"),
    ("pi@[::1]x", "bad port"),
])
def test_bad_targets(text: str, fragment: str) -> None:
    with pytest.raises(BadInputError, match=fragment):
        parse_target(text)


@pytest.mark.parametrize("items,expected", [
    ([], {}),
    (["site=plant-3", "line=2"], {"site": "plant-3", "line": "2"}),
    (["site=a=b"], {"site": "a=b"}),
])
def test_tags(items: list[str], expected: dict[str, str]) -> None:
    assert parse_tags(items) == expected


@pytest.mark.parametrize("items", [["site"], ["site="], ["=x"], ["a/b=x"]])
def test_bad_tags(items: list[str]) -> None:
    with pytest.raises(BadInputError):
        parse_tags(items)


# -- hosts files ----------------------------------------------------------------------------------


def test_hosts_file() -> None:
    entries = parse_hosts_file(
        "# plant 3\n\npi@10.0.0.1 id=cam-1 site=p3\npi@10.0.0.2:2222   # no id: its host name\n"
        "root@gw.example.com id=gw-1 role=gateway zone=b\n")
    assert [(str(e.target), e.device_id, e.tags, e.line) for e in entries] == [
        ("pi@10.0.0.1", "cam-1", {"site": "p3"}, 3),
        ("pi@10.0.0.2:2222", None, {}, 4),
        ("root@gw.example.com", "gw-1", {"role": "gateway", "zone": "b"}, 5),
    ]


@pytest.mark.parametrize("text,fragment", [
    ("", "lists no hosts"),
    ("# only a comment\n", "lists no hosts"),
    ("pi@a id=x\npi@a id=y\n", "line 2: pi@a is already on line 1"),
    ("pi@a id=x\npi@b id=x\n", "line 2: device id x is already on line 1"),
    ("pi@a id=a/b\n", "line 1: invalid device id"),
    ("pi@a site\n", "line 1: tag 'site' must be KEY=VALUE"),
    ("nohost\n", "line 1"),
])
def test_bad_hosts_files(text: str, fragment: str) -> None:
    with pytest.raises(BadInputError, match=fragment):
        parse_hosts_file(text)


# -- the probe and the refusal rules --------------------------------------------------------------

PI = HostFacts(arch="aarch64", system="Linux", python="/usr/bin/python3", python_version=(3, 11, 2),
               venv_module=True, disk_free_mb=5000, memory_available_mb=700, systemd=True, user="pi", uid=1000,
               home="/home/pi")
REQ = HostRequirements()


def facts(**changes: object) -> HostFacts:
    from dataclasses import replace

    return replace(PI, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("host,runtime,reasons", [
    (PI, "onnx", []),
    (PI, "litert", []),
    (facts(arch="armv7l"), "tflite", []),
    (facts(arch="armv7l"), "onnx", ["runtime onnx has no wheels for armv7l; choose --runtime tflite"]),
    (facts(arch="mips"), "onnx", ["runtime onnx has no wheels for mips; no runtime supports it"]),
    (facts(arch=None), "onnx", ["could not determine the architecture (uname -m)"]),
    (facts(system="Darwin"), "onnx", ["the agent runs on Linux, this host runs Darwin"]),
    (facts(python=None, python_version=None), "onnx", ["no python3 on the PATH (the agent needs Python 3.9+)"]),
    (facts(python_version=(3, 7, 3)), "onnx", ["Python 3.7.3 is too old: the agent needs 3.9+"]),
    (facts(python_version=None), "onnx", ["could not run /usr/bin/python3 to read its version"]),
    (facts(venv_module=False), "onnx",
     ["/usr/bin/python3 has no venv/ensurepip module (Debian: apt install python3-venv)"]),
    (facts(disk_free_mb=120), "onnx", ["only 120 MB free disk, the agent needs 300 MB"]),
    (facts(memory_available_mb=64), "onnx", ["only 64 MB memory available, the agent needs 128 MB"]),
    (facts(memory_available_mb=None, disk_free_mb=None), "onnx",
     ["could not determine the free disk space (df)", "could not determine the available memory (/proc/meminfo)"]),
    (PI, "pytorch", ["unknown runtime 'pytorch'; choose one of ['litert', 'tflite', 'onnx']"]),
    (facts(systemd=False), "onnx", []),  # no systemd is not a refusal: the agent is started without it
])
def test_refusal_rules(host: HostFacts, runtime: str, reasons: list[str]) -> None:
    assert check_host(host, REQ, runtime) == reasons


def test_requirements_from_options_and_environment() -> None:
    assert HostRequirements.from_env({}) == HostRequirements()
    env = {"EDGESHIP_PROVISION_MIN_DISK_MB": "1000", "EDGESHIP_PROVISION_MIN_MEMORY_MB": "512"}
    assert HostRequirements.from_env(env).min_disk_mb == 1000
    assert HostRequirements.from_env(env, min_memory_mb=64).min_memory_mb == 64
    with pytest.raises(BadInputError, match="whole number"):
        HostRequirements.from_env({"EDGESHIP_PROVISION_MIN_DISK_MB": "lots"})
    with pytest.raises(BadInputError):
        HostRequirements.from_env({}, min_disk_mb=-1)


def test_parse_probe_output() -> None:
    state = {"device_id": "cam-1", "fleet": "f"}
    text = "\n".join([
        "arch=aarch64", "system=Linux", "user=pi", "uid=1000", "home=/home/pi", "hostname=cam-1.local",
        "python=/usr/bin/python3", "python_version=3.9.2", "venv=yes", "disk_free_kb=2048000",
        "mem_available_kb=524288", "systemd=yes", "file=" + "a" * 64 + " etc/agent.toml",
        "file=nothex etc/x", "state=" + base64.b64encode(json.dumps(state).encode()).decode(),
        "venv_exists=yes", "agent_installed=yes", "agent_running=yes", "noise without equals",
    ])
    f = parse_host_facts(text)
    assert (f.arch, f.python_version, f.disk_free_mb, f.memory_available_mb) == ("aarch64", (3, 9, 2), 2000, 512)
    assert f.systemd and f.venv_module and f.venv_exists and f.agent_installed and f.agent_running
    assert f.files == {"etc/agent.toml": "a" * 64} and f.state == state and f.uid == 1000
    empty = parse_host_facts("")
    assert empty.arch is None and empty.python_version is None and not empty.systemd
    assert parse_host_facts("state=@@notbase64").state is None


def test_the_probe_runs_here_and_parses() -> None:
    """The real script, run by this machine's sh, gives facts the rules accept."""
    out = subprocess.run(["sh", "-c", probe_script("/nonexistent/edgeship")], capture_output=True, text=True)
    f = parse_host_facts(out.stdout)
    assert f.arch and f.system == "Linux" and f.disk_free_mb and f.memory_available_mb and f.python_version
    assert check_host(f, HostRequirements(min_disk_mb=1, min_memory_mb=1), "onnx") == [] or f.arch not in (
        "x86_64", "aarch64")


@pytest.mark.parametrize("uid,home,expected", [(0, "/root", "/opt/edgeship"), (1000, "/home/pi", "/home/pi/edgeship"),
                                               (1000, "/home/pi/", "/home/pi/edgeship")])
def test_default_prefix(uid: int, home: str, expected: str) -> None:
    assert default_prefix(facts(uid=uid, home=home)) == expected


@pytest.mark.parametrize("have,want,action", [
    ({}, "a" * 64, "create"),
    ({"etc/agent.toml": "a" * 64}, "a" * 64, "unchanged"),
    ({"etc/agent.toml": "b" * 64}, "a" * 64, "update"),
])
def test_file_action(have: dict[str, str], want: str, action: str) -> None:
    assert file_action("etc/agent.toml", want, facts(files=have)) == action


def test_unit_and_env_files() -> None:
    unit = render_systemd_unit("/opt/edgeship", "edge")
    assert "ExecStart=/opt/edgeship/venv/bin/edgeship-agent run --config /opt/edgeship/etc/agent.toml" in unit
    assert "User=edge" in unit and "EnvironmentFile=-/opt/edgeship/etc/agent.env" in unit
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/opt/edgeship/data",
                      "PrivateTmp=yes", "CapabilityBoundingSet="):
        assert hardening in unit.splitlines(), hardening
    cert = {"username": "d1", "ca": "ca.crt", "cert": "client.crt", "key": "client.key"}
    env = render_agent_env("/p", cert)
    assert "PASSWORD" not in env and "USERNAME" not in env  # the certificate's CN is the user name
    pw = {"username": "d1", "ca": "ca.crt", "password": "password"}
    envp = render_agent_env("/p", pw, "s3cret")
    assert "EDGESHIP_MQTT_PASSWORD=s3cret" in envp and "EDGESHIP_MQTT_USERNAME=d1" in envp
    assert broker_table_lines("/p", cert, "edgeship")[1:] == [
        'ca_file = "/p/etc/broker/ca.crt"', 'cert_file = "/p/etc/broker/client.crt"',
        'key_file = "/p/etc/broker/client.key"']
    assert broker_table_lines("/p", pw, "fleetx")[1:] == ['ca_file = "/p/etc/broker/ca.crt"', 'prefix = "fleetx"']


def test_broker_lines_extend_the_agent_config_it_reads() -> None:
    """Appended to what `edgeship-agent init` renders, they land in [broker] and the agent reads them."""
    from edgeship.agent.config import parse_config, render_config

    text = render_config(data="/p/data", device_id="d1", fleet="f", root="/p/r.json", director_key="/p/d.pub",
                         broker="mqtts://localhost:8883")
    cert = {"username": "d1", "ca": "ca.crt", "cert": "client.crt", "key": "client.key"}
    full = text + "\n".join(broker_table_lines("/p", cert, "edgeship")) + "\n"
    import sys
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    doc = tomllib.loads(full)
    assert doc["broker"]["cert_file"] == "/p/etc/broker/client.crt" and doc["broker"]["url"].startswith("mqtts://")
    parse_config(doc)
    fleet_link = pytest.importorskip("edgeship.agent.fleet_link")
    cfg = parse_config(doc)
    settings = fleet_link.load_link_settings(cfg, doc["broker"])
    assert (settings.ca_file, settings.cert_file, settings.key_file) == (
        "/p/etc/broker/ca.crt", "/p/etc/broker/client.crt", "/p/etc/broker/client.key")


def test_wheel_content_id_ignores_zip_timestamps(tmp_path: Path) -> None:
    def wheel(path: Path, stamp: tuple[int, int, int, int, int, int], body: bytes) -> Path:
        with zipfile.ZipFile(path, "w") as z:
            for name, data in (("pkg/__init__.py", body), ("pkg-1.dist-info/RECORD", b"pkg/__init__.py,sha256=" + body)):
                info = zipfile.ZipInfo(name, date_time=stamp)
                z.writestr(info, data)
        return path

    a = wheel(tmp_path / "a.whl", (2020, 1, 1, 0, 0, 0), b"x")
    b = wheel(tmp_path / "b.whl", (2024, 5, 5, 5, 5, 6), b"x")
    c = wheel(tmp_path / "c.whl", (2020, 1, 1, 0, 0, 0), b"y")
    assert a.read_bytes() != b.read_bytes()
    assert wheel_content_id(a) == wheel_content_id(b) != wheel_content_id(c)
    (tmp_path / "bad.whl").write_text("nope")
    with pytest.raises(BadInputError, match="not a wheel"):
        wheel_content_id(tmp_path / "bad.whl")
