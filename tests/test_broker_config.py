"""Pure generation of the broker's files (tables), and the CLI of broker config /
device credentials / device revoke (exit codes, one-line errors, --json)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from edgeship.ota.errors import BadInputError
from edgeship.ota.topics import DEVICE_KINDS, DEVICE_PUBLISHES, DEVICE_SUBSCRIBES
from edgeship.toolkit import broker_config as bc
from edgeship.toolkit import fleet_pki as pki
from edgeship.toolkit.cli import main
from edgeship.toolkit.identities import BrokerFolder

# -- the ACL --------------------------------------------------------------------------------------

ACCESS = [
    ("desired", "read"),
    ("reported", "readwrite"),
    ("status", "write"),
    ("events", "write"),
    ("telemetry", "write"),
    ("blocks/request", "write"),
    ("blocks/data", "read"),
]


@pytest.mark.parametrize("kind,access", ACCESS)
def test_device_access_per_topic_kind(kind: str, access: str) -> None:
    assert bc.device_topic_access(kind) == access


def test_access_table_follows_the_topic_tables() -> None:
    """Every kind a device publishes is writable, every kind it subscribes readable, nothing else."""
    for kind in DEVICE_KINDS:
        access = bc.device_topic_access(kind) or ""
        assert ("write" in access) == (kind in DEVICE_PUBLISHES)
        assert ("read" in access) == (kind in DEVICE_SUBSCRIBES or kind in bc.DEVICE_READS_BACK)
    assert "desired" not in DEVICE_PUBLISHES and "blocks/data" not in DEVICE_PUBLISHES


def test_acl_has_one_block_per_identity_and_no_wildcards_for_devices() -> None:
    acl = bc.render_acl([bc.AclIdentity("dev-b", "device", "f1"), bc.AclIdentity("ctl", "controller"),
                         bc.AclIdentity("dev-a", "device", "f2")], prefix="pfx")
    blocks = [b.strip().splitlines() for b in acl.split("\n\n") if "user " in b]
    assert [b[1] for b in blocks] == ["user ctl", "user dev-b", "user dev-a"]
    assert blocks[0][2:] == ["topic readwrite pfx/#"]
    a_lines = blocks[2][2:]
    assert a_lines == [f"topic {acc} pfx/f2/devices/dev-a/{kind}" for kind, acc in ACCESS]
    device_lines = [line for b in blocks[1:] for line in b if line.startswith("topic")]
    assert not any("+" in line or "#" in line or "%" in line for line in device_lines)
    assert "pattern" not in acl


@pytest.mark.parametrize("identities,fragment", [
    ([bc.AclIdentity("d", "device", "f"), bc.AclIdentity("d", "device", "g")], "twice"),
])
def test_acl_refuses_duplicates(identities: list, fragment: str) -> None:
    with pytest.raises(BadInputError, match=fragment):
        bc.render_acl(identities)


@pytest.mark.parametrize("name,kind,fleet", [
    ("dev/x", "device", "f"), ("#", "device", "f"), ("dev", "device", "f+"), ("dev", "device", ""),
    ("dev", "admin", "f"), ("", "controller", ""),
])
def test_bad_identities_are_refused(name: str, kind: str, fleet: str) -> None:
    with pytest.raises(BadInputError):
        bc.AclIdentity(name, kind, fleet)


# -- settings and mosquitto.conf ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,fragment", [
    ({"auth": "none"}, "auth mode"),
    ({"port": 0}, "port"),
    ({"port": 70000}, "port"),
    ({"auth": "both", "port": 9000, "password_port": 9000}, "two ports"),
    ({"prefix": "a/b"}, "prefix"),
    ({"names": ("bad name",)}, "server name"),
    ({"run_as": "x;rm"}, "user name"),
    ({"bind": "not an ip"}, "neither an IP address nor a host name"),
    ({"bind": "127.0.0.1\nallow_anonymous true"}, "neither an IP address"),  # no option smuggled into the conf
    ({"bind": ""}, "neither an IP address"),
])
def test_bad_settings_are_refused(kwargs: dict, fragment: str) -> None:
    with pytest.raises(BadInputError, match=fragment):
        bc.BrokerSettings(**kwargs)


@pytest.mark.parametrize("auth,listeners,has_passwd,has_cert_listener", [
    ("cert", ["listener 8883 127.0.0.1"], False, True),
    ("password", ["listener 8883 127.0.0.1"], True, False),
    ("both", ["listener 8883 127.0.0.1", "listener 8884 127.0.0.1"], True, True),
])
def test_conf_listeners_per_auth_mode(auth: str, listeners: list, has_passwd: bool, has_cert_listener: bool,
                                      tmp_path: Path) -> None:
    conf = bc.render_mosquitto_conf(bc.BrokerSettings(auth=auth, run_as="mosquitto"), tmp_path)
    lines = conf.splitlines()
    assert [x for x in lines if x.startswith("listener")] == listeners
    assert "allow_anonymous false" in lines and "user mosquitto" in lines
    assert ("password_file " + str(tmp_path / "passwd") in lines) == has_passwd
    assert ("require_certificate true" in lines) == has_cert_listener
    assert ("use_identity_as_username true" in lines) == has_cert_listener
    assert f"acl_file {tmp_path / 'acl'}" in lines
    assert "require_certificate false" in lines or auth == "cert"


def test_settings_round_trip() -> None:
    s = bc.BrokerSettings(prefix="p", port=1234, auth="both", names=("broker.lan", "10.0.0.2"), run_as="mq")
    assert bc.BrokerSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# -- passwords ------------------------------------------------------------------------------------

def test_password_entries_verify_and_salt() -> None:
    e1, e2 = bc.password_file_entry("dev", "s3cret"), bc.password_file_entry("dev", "s3cret")
    assert e1 != e2 and e1.startswith("dev:$7$101$")
    assert bc.verify_password_entry(e1, "s3cret") and not bc.verify_password_entry(e1, "s3cre")
    assert not bc.verify_password_entry("dev:$6$x$y", "s3cret")
    with pytest.raises(BadInputError):
        bc.password_file_entry("dev", "")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_our_hash_format_is_mosquitto_passwd_s(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "alice", "open sesame"], check=True)
    line = pw.read_text().strip()
    assert bc.verify_password_entry(line, "open sesame") and not bc.verify_password_entry(line, "open")


# -- PKI ------------------------------------------------------------------------------------------

def test_server_certificate_names_and_client_certificate_cn() -> None:
    ca_key, ca = pki.create_ca()
    _, server = pki.issue_server_certificate(ca_key, ca, ["broker.lan", "10.1.2.3"])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(v.value) for v in san} == {"localhost", "127.0.0.1", "broker.lan", "10.1.2.3"}
    _, client = pki.issue_client_certificate(ca_key, ca, "dev-7")
    assert client.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "dev-7"
    client.verify_directly_issued_by(ca)
    with pytest.raises(BadInputError):
        pki.issue_client_certificate(ca_key, ca, "dev/7")


def test_crl_lists_revoked_serials() -> None:
    import datetime as dt

    ca_key, ca = pki.create_ca()
    now = dt.datetime.now(dt.timezone.utc)
    crl = pki.build_crl(ca_key, ca, [(1234, now), (99, now)])
    assert {r.serial_number for r in crl} == {1234, 99} and crl.is_signature_valid(ca.public_key())
    assert crl.next_update_utc > now + dt.timedelta(days=300)


# -- the CLI --------------------------------------------------------------------------------------

def run(args: list[str]) -> object:
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_broker_config_is_idempotent_and_keeps_the_ca(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    r1 = run(["broker", "config", "--out", str(out), "--port", "18883", "--json"])
    assert r1.exit_code == 0, r1.output
    first = json.loads(r1.output)
    assert "fleet CA created" in first["changed"]
    ca = (out / "ca" / "ca.crt").read_bytes()
    r2 = run(["broker", "config", "--out", str(out), "--json"])
    assert r2.exit_code == 0 and json.loads(r2.output)["changed"] == []
    assert (out / "ca" / "ca.crt").read_bytes() == ca
    assert json.loads((out / "broker.json").read_text())["port"] == 18883  # saved settings kept
    r3 = run(["broker", "config", "--out", str(out), "--name", "broker.lan", "--json"])
    changed = json.loads(r3.output)["changed"]
    assert any("server certificate" in c for c in changed) and (out / "ca" / "ca.crt").read_bytes() == ca
    r4 = run(["broker", "config", "--out", str(out), "--controller", "other"])
    assert r4.exit_code == 2 and r4.output.count("\n") == 1 and "controller identity" in r4.output


def test_credentials_and_revoke_cli(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    assert run(["broker", "config", "--out", str(out), "--auth", "both", "--json"]).exit_code == 0
    env_args = ["--broker-dir", str(out)]
    r = run(["device", "credentials", "dev-1", "--fleet", "f1", "--out", str(tmp_path / "d1"), *env_args, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["identity"]["auth"] == "cert" and (tmp_path / "d1" / "client.key").stat().st_mode & 0o077 == 0
    conn = json.loads((tmp_path / "d1" / "connection.json").read_text())
    assert conn["url"].startswith("mqtts://localhost:") and conn["username"] == "dev-1" and conn["fleet"] == "f1"
    assert "user dev-1" in (out / "acl").read_text()

    again = run(["device", "credentials", "dev-1", "--fleet", "f1", "--out", str(tmp_path / "d1b"), *env_args])
    assert again.exit_code == 2 and "already has active credentials" in again.output
    assert again.output.startswith("error: ") and again.output.count("\n") == 1
    other_fleet = run(["device", "credentials", "dev-1", "--fleet", "f2", "--out", str(tmp_path / "x"), *env_args])
    assert other_fleet.exit_code == 2 and "fleet f1" in other_fleet.output

    re = run(["device", "credentials", "dev-1", "--fleet", "f1", "--out", str(tmp_path / "d1c"), *env_args,
              "--reissue", "--json"])
    assert re.exit_code == 0
    old_serial = doc["identity"]["serial"]
    assert json.loads(re.output)["replaced_serial"] == old_serial
    crl = x509.load_pem_x509_crl((out / "ca" / "crl.pem").read_bytes())
    assert int(old_serial, 16) in {x.serial_number for x in crl}

    pw = run(["device", "credentials", "dev-2", "--fleet", "f1", "--out", str(tmp_path / "d2"), *env_args,
              "--auth", "password", "--json"])
    assert pw.exit_code == 0
    password = (tmp_path / "d2" / "password").read_text().strip()
    entry = [x for x in (out / "passwd").read_text().splitlines() if x.startswith("dev-2:")][0]
    assert bc.verify_password_entry(entry, password)

    rv = run(["device", "revoke", "dev-2", *env_args, "--json"])
    assert rv.exit_code == 0 and json.loads(rv.output)["changed"] is True
    assert "dev-2:" not in (out / "passwd").read_text() and "user dev-2" not in (out / "acl").read_text()
    rv2 = run(["device", "revoke", "dev-2", *env_args, "--json"])
    assert rv2.exit_code == 0 and json.loads(rv2.output)["changed"] is False

    unknown = run(["device", "revoke", "nobody", *env_args])
    assert unknown.exit_code == 2 and "no device 'nobody'" in unknown.output
    ctl = run(["device", "credentials", "edgeship-controller", "--fleet", "f1", "--out", str(tmp_path / "c"), *env_args])
    assert ctl.exit_code == 2 and "controller" in ctl.output
    bad_id = run(["device", "credentials", "a/b", "--fleet", "f1", "--out", str(tmp_path / "c"), *env_args])
    assert bad_id.exit_code == 2 and "invalid device id" in bad_id.output

    status = run(["broker", "status", "--dir", str(out), "--json"])
    names = {i["name"]: i for i in json.loads(status.output)["identities"]}
    assert names["dev-2"]["revoked"] and not names["dev-1"]["revoked"]


def test_commands_on_a_folder_that_is_not_a_broker(tmp_path: Path) -> None:
    r = run(["device", "credentials", "d", "--fleet", "f", "--out", str(tmp_path / "o"),
             "--broker-dir", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "is not a broker folder" in r.output and r.output.count("\n") == 1


def test_password_only_broker_refuses_certificates(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    assert run(["broker", "config", "--out", str(out), "--auth", "password"]).exit_code == 0
    assert (out / "controller" / "password").exists()  # the controller logs in with a password too
    r = run(["device", "credentials", "d", "--fleet", "f", "--out", str(tmp_path / "o"), "--broker-dir", str(out),
             "--auth", "cert"])
    assert r.exit_code == 2 and "no cert listener" in r.output


def test_broker_folder_is_not_world_readable_where_it_matters(tmp_path: Path) -> None:
    folder = BrokerFolder(tmp_path / "b")
    folder.create_or_update(bc.BrokerSettings(auth="both"))
    for rel in ("ca/ca.key", "server/server.key", "passwd", "identities.json", "controller/client.key"):
        assert (folder.path / rel).stat().st_mode & 0o077 == 0, rel


def test_amqtt_rules_are_the_same_tables() -> None:
    acl = bc.render_amqtt_topic_acl([bc.AclIdentity("d1", "device", "f"), bc.AclIdentity("ctl", "controller")])
    assert acl["publish-acl"]["d1"] == [f"edgeship/f/devices/d1/{k}" for k, a in ACCESS if "write" in a]
    assert acl["subscribe-acl"]["d1"] == [f"edgeship/f/devices/d1/{k}" for k, a in ACCESS if "read" in a]
    assert acl["receive-acl"] == acl["subscribe-acl"]
    assert acl["publish-acl"]["ctl"] == ["edgeship/#"] and acl["publish-acl"]["anonymous"] == []


def test_amqtt_plugin_applies_our_rules() -> None:
    """amqtt's own matcher, fed our rules: d1 may publish its reported state, not d2's nor a desired state."""
    plugin = pytest.importorskip("amqtt.plugins.topic_checking").TopicAccessControlListPlugin
    acl = bc.render_amqtt_topic_acl([bc.AclIdentity("d1", "device", "f")])
    allowed = acl["publish-acl"]["d1"]
    def can(topic: str) -> bool:
        return any(plugin.topic_ac(topic, a) for a in allowed)
    assert can("edgeship/f/devices/d1/reported")
    assert not can("edgeship/f/devices/d2/reported") and not can("edgeship/f/devices/d1/desired")


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0", "::", "::1", "broker.lan", "gw-01"])
def test_listener_addresses_are_ip_addresses_or_host_names(bind: str) -> None:
    assert bc.BrokerSettings(bind=bind).bind == bind


# -- where Mosquitto can run from -------------------------------------------------------------------

def _has_account(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.mark.skipif(not _has_account("mosquitto"), reason="no mosquitto account on this machine")
def test_a_folder_the_broker_account_cannot_enter_is_named() -> None:
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="edgeship-home-"))  # pytest's tmp folders are 0700 themselves
    base.chmod(0o755)
    home = base / "home"
    (home / "work").mkdir(parents=True)
    home.chmod(0o700)
    try:
        assert bc.unreachable_folder(home / "work" / "broker", "mosquitto") == home
        home.chmod(0o711)  # traversable by others: nothing to say
        assert bc.unreachable_folder(home / "work" / "broker", "mosquitto") is None
        assert bc.unreachable_folder(home / "work", "root") is None  # root enters everything
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(not _has_account("mosquitto") or __import__("os").geteuid() != 0,
                    reason="as root with a mosquitto account: the case where Mosquitto drops privileges")
def test_broker_config_under_a_0700_home_says_what_to_do() -> None:
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="edgeship-home-"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir()
    home.chmod(0o700)
    try:
        _check_warning(home)
    finally:
        shutil.rmtree(base)


def _check_warning(home: Path) -> None:
    result = CliRunner().invoke(main, ["broker", "config", "--out", str(home / "broker"), "--port", "18999"])
    assert result.exit_code == 0, result.output
    assert "warning: Mosquitto drops from root to the account 'mosquitto'" in result.stderr
    assert str(home) in result.stderr and "Unable to write pid" in result.stderr and "--run-as root" in result.stderr
    doc = json.loads(CliRunner().invoke(main, ["broker", "config", "--out", str(home / "broker"), "--json"]).stdout)
    assert doc["warnings"] and str(home) in doc["warnings"][0]


def test_conf_binds_client_ids_to_identities_on_every_listener(tmp_path: Path) -> None:
    conf = bc.render_mosquitto_conf(bc.BrokerSettings(auth="both", run_as=""), tmp_path)
    listeners = conf.split("\nlistener ")[1:]
    assert len(listeners) == 2
    assert all("use_username_as_clientid true" in block for block in listeners)


def test_broker_replica_issues_a_controller_identity_of_its_own(tmp_path: Path) -> None:
    folder = BrokerFolder(tmp_path / "broker")
    folder.create_or_update(bc.BrokerSettings(run_as=""))
    result = CliRunner().invoke(main, ["broker", "replica", "ctl-b", "--dir", str(folder.path), "--out",
                                       str(tmp_path / "ctl-b"), "--json"])
    assert result.exit_code == 0, result.output
    conn = json.loads((tmp_path / "ctl-b" / "connection.json").read_text())
    assert conn["kind"] == "controller" and conn["identity"] == "ctl-b"
    acl = (folder.path / "acl").read_text()
    assert "user ctl-b\ntopic readwrite edgeship/#" in acl
    again = CliRunner().invoke(main, ["broker", "replica", "ctl-b", "--dir", str(folder.path), "--out",
                                      str(tmp_path / "again")])
    assert again.exit_code == 2 and "already exists" in again.stderr
