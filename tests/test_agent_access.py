"""Who may call the device API: a bearer token or TLS client certificates beyond
loopback (tested with ``requests``, as an outside client would), the refusal to
serve a non-loopback address unprotected, and probation on the monotonic clock."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import requests
from agent_fixtures import AgentRepo, agent_cli, write_config

from edgeship.agent.health import (
    ProbationPolicy,
    ProbationSample,
    Verdict,
    probation_elapsed,
    probation_verdict,
)
from edgeship.agent.runtimes import open_model
from edgeship.agent.server import ApiAccess, ApiServer, bind_refusal, load_access, read_token
from edgeship.agent.serving import LoadedModel, ServingModel
from edgeship.ota.errors import EdgeshipError

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def serving(digits_tflite: Path) -> ServingModel:
    model = ServingModel()
    model.swap(LoadedModel("digits", "1", open_model(digits_tflite)))
    return model


def test_a_bearer_token_guards_predict_and_metrics_not_healthz(tmp_path: Path, serving: ServingModel) -> None:
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    server = ApiServer(serving, tmp_path, port=0, access=load_access(token_file)).start()
    base = f"http://127.0.0.1:{server.port}"
    body = {"instances": [[[[0.0]] * 8] * 8]}
    try:
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            reply = requests.post(f"{base}/v1/models/digits:predict", json=body, headers=headers, timeout=5)
            assert reply.status_code == 401 and "bearer token" in reply.json()["error"]
            assert reply.headers["WWW-Authenticate"].startswith("Bearer")
            assert requests.get(f"{base}/metrics", headers=headers, timeout=5).status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        reply = requests.post(f"{base}/v1/models/digits:predict", json=body, headers=good, timeout=5)
        assert reply.status_code == 200 and len(reply.json()["predictions"]) == 1
        assert requests.get(f"{base}/metrics", headers=good, timeout=5).status_code == 200
    finally:
        server.stop()


def test_a_token_file_others_can_read_or_a_short_token_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o644)
    with pytest.raises(EdgeshipError, match="chmod 600"):
        read_token(token_file)
    token_file.write_text("short")
    token_file.chmod(0o600)
    with pytest.raises(EdgeshipError, match="at least 16"):
        read_token(token_file)


def _ca_and_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with cryptography."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, extra in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(who)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1)))
        if extra:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        paths[f"{who}_cert"] = folder / f"{who}.pem"
        paths[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{who}_key"] = write_key(key, folder / f"{who}.key")
    return paths


def test_tls_with_client_certificates(tmp_path: Path, serving: ServingModel) -> None:
    pki = _ca_and_certs(tmp_path)
    access = load_access(None, pki["server_cert"], pki["server_key"], pki["ca"])
    server = ApiServer(serving, tmp_path, port=0, access=access).start()
    base = f"https://127.0.0.1:{server.port}"
    body = {"instances": [[[[0.0]] * 8] * 8]}
    try:
        assert server.scheme == "https"
        # /healthz stays open; predict and metrics need the client certificate
        assert requests.get(f"{base}/healthz", verify=str(pki["ca"]), timeout=5).status_code == 200
        reply = requests.post(f"{base}/v1/models/digits:predict", json=body, verify=str(pki["ca"]), timeout=5)
        assert reply.status_code == 401 and "client certificate" in reply.json()["error"]
        assert requests.get(f"{base}/metrics", verify=str(pki["ca"]), timeout=5).status_code == 401
        cert = (str(pki["client_cert"]), str(pki["client_key"]))
        reply = requests.post(f"{base}/v1/models/digits:predict", json=body, verify=str(pki["ca"]), cert=cert, timeout=5)
        assert reply.status_code == 200 and len(reply.json()["predictions"]) == 1
        assert requests.get(f"{base}/metrics", verify=str(pki["ca"]), cert=cert, timeout=5).status_code == 200
        # a certificate from another CA is refused at the handshake
        (tmp_path / "other").mkdir()
        other = _ca_and_certs(tmp_path / "other")
        with pytest.raises(requests.exceptions.RequestException):
            requests.post(f"{base}/v1/models/digits:predict", json=body, verify=str(pki["ca"]),
                          cert=(str(other["client_cert"]), str(other["client_key"])), timeout=5)
        # plain HTTP on the TLS port: no answer, the agent keeps serving
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
        reply = requests.post(f"{base}/v1/models/digits:predict", json=body, verify=str(pki["ca"]), cert=cert, timeout=5)
        assert reply.status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize(
    "host, access, trusted, refused",
    [
        ("127.0.0.1", ApiAccess(), False, False),
        ("::1", ApiAccess(), False, False),
        ("localhost", ApiAccess(), False, False),
        ("0.0.0.0", ApiAccess(), False, True),
        ("192.168.1.20", ApiAccess(), False, True),
        ("::", ApiAccess(), False, True),
        ("0.0.0.0", ApiAccess(token=TOKEN), False, False),
        ("0.0.0.0", ApiAccess(client_certs=True), False, False),
        ("0.0.0.0", ApiAccess(), True, False),
    ],
)
def test_binding_beyond_loopback_needs_access_control(host: str, access: ApiAccess, trusted: bool, refused: bool) -> None:
    assert (bind_refusal(host, access, trusted) is not None) == refused


def test_run_refuses_a_public_bind_without_access_control(tmp_path: Path, agent_repo: AgentRepo) -> None:
    config = write_config(tmp_path, agent_repo)
    result = agent_cli("run", "--config", str(config), "--bind", "0.0.0.0:0", timeout=60)
    assert result.returncode == 2 and "beyond loopback" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1  # one clear line


# -- time ------------------------------------------------------------------------------------
POLICY = ProbationPolicy(window_s=60, min_requests=0, max_error_rate=0.05, max_nonfinite_rate=0.0, max_latency_ratio=2.0)


@pytest.mark.parametrize(
    "wall_jump_s, monotonic_elapsed_s, verdict",
    [
        (0, 10, Verdict.WAIT),  # no jump: the window is not over
        (+86400 * 365, 10, Verdict.WAIT),  # NTP steps the clock a year forward: probation is not skipped
        (-86400 * 365, 61, Verdict.COMMIT),  # ... or back: probation is not held forever
        (-3600, 61, Verdict.COMMIT),
    ],
)
def test_probation_windows_ignore_wall_clock_steps(wall_jump_s: float, monotonic_elapsed_s: float, verdict: Verdict) -> None:
    # the driver reads a monotonic clock; a wall clock jump changes none of its readings
    started = 1000.0
    elapsed = probation_elapsed(started, started + monotonic_elapsed_s)
    sample = ProbationSample(elapsed_s=elapsed, requests=0, errors=0, nonfinite=0, p95_ms=None, baseline_p95_ms=None)
    assert probation_verdict(sample, POLICY)[0] is verdict
    assert probation_elapsed(started, started - 5) == 0.0  # never negative


def test_the_update_driver_times_probation_on_the_monotonic_clock(tmp_path: Path, agent_repo: AgentRepo) -> None:
    import time

    from edgeship.agent.config import load_config
    from edgeship.agent.updater import UpdateDriver

    driver = UpdateDriver(load_config(write_config(tmp_path, agent_repo)))
    assert driver.clock is time.monotonic


@pytest.mark.parametrize("jump_s", [+86400 * 365, -86400 * 365], ids=["forward a year", "back a year"])
def test_a_wall_clock_step_neither_skips_nor_holds_probation_in_a_real_agent(
    tmp_path: Path, agent_repo: AgentRepo, jump_s: float
) -> None:
    """The agent process's wall clock (``time.time``) steps a year half a second after
    it starts, as NTP does after boot on a board without an RTC: probation still takes
    its window, measured on the monotonic clock."""
    import subprocess
    import sys
    import time

    from agent_fixtures import agent_env, wait_for

    window_s = 3.0
    config = write_config(tmp_path, agent_repo, window_s=0.3)
    assert agent_cli("install", str(agent_repo.export("1.0.0")), "--config", str(config)).returncode == 0
    config.write_text(config.read_text().replace("window_s = 0.3", f"window_s = {window_s}"))
    wrapper = (
        "import sys, time\n"
        "real = time.time\n"
        "start = real()\n"
        f"time.time = lambda: real() + ({jump_s} if real() - start > 0.5 else 0.0)\n"
        f"sys.argv = ['edgeship-agent', 'run', '--config', {str(config)!r}]\n"
        "from edgeship.agent.cli import main\n"
        "main()\n"
    )
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", wrapper], stdout=log, stderr=subprocess.STDOUT, env=agent_env())
    try:
        from edgeship.agent.config import load_config
        from edgeship.agent.control import ControlClient

        client = ControlClient(load_config(config).control_socket, timeout=5)
        status = wait_for(lambda: _try_status(client), 30, what="the agent")
        started = time.monotonic()
        assert status["update"]["state"] == "PROBATION"
        time.sleep(1.5)
        assert _try_status(client)["update"]["state"] == "PROBATION", "a forward step skipped probation"
        doc = wait_for(lambda: (d := _try_status(client)) and d["update"]["terminal"] and d or None, 20,
                       what="probation to end")
        assert doc["update"]["state"] == "COMMITTED", doc["update"]
        assert window_s - 0.5 <= time.monotonic() - started < window_s + 5, "a backward step held probation"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _try_status(client: object) -> dict | None:
    try:
        return dict(client.call("status")["status"])  # type: ignore[attr-defined]
    except EdgeshipError:
        return None
