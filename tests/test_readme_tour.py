"""README.md's tour, run as printed, in order, from a fresh `git clone` of this checkout.

The commands are read from README.md's ``sh`` blocks of "A tour of the commands" (so the test and
the README cannot drift apart) and run as one bash script, in the clone, with ``.venv`` linked to
this checkout's environment (which holds the project installed editable from this checkout: the
clone's HEAD is the same code). Real parts all the way: TensorFlow and LiteRT, the embedded
broker, Mosquitto with the generated TLS configuration, the controller, edgeship-agent processes,
curl against the agent's REST API, and the SSH provisioning step against a real sshd on loopback
(the only change to the printed commands: the example host ``pi@10.0.0.12`` becomes that sshd,
with its key and an offline wheelhouse, since the test machine has no device and no network).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mqtt_broker import mosquitto_binary
from provision_fixtures import (
    Sshd,
    build_offline_wheelhouse,
    make_device_account,
    make_user_key,
    sshd_binary,
    world_readable_tempdir,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_HOST = "pi@10.0.0.12"
TOUR_PORTS = (1883, 8883, 8501, 8502)  # what the README's commands use, as printed

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.sshd]


def tour_blocks(readme: str) -> list[str]:
    """The ``sh`` blocks of the README's tour section, in order."""
    section = readme.split("## A tour of the commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def tour_script(readme: str, provision_target: str) -> str:
    blocks = tour_blocks(readme)
    body = "\n".join(blocks)
    assert body.count(EXAMPLE_HOST) == 1, "the README's provisioning example host changed"
    body = body.replace(EXAMPLE_HOST, provision_target)
    return "set -euo pipefail\nset -x\n" + body


def test_the_tour_is_read_from_the_readme() -> None:
    blocks = tour_blocks((ROOT / "README.md").read_text())
    commands = "\n".join(blocks)
    for needed in ("examples/digits/model.py", "edgeship convert", "edgeship broker run &", "edgeship controller",
                   "edgeship-agent init --credentials", "mosquitto -c broker/mosquitto.conf",
                   "edgeship device credentials", "edgeship rollout start", ":predict", "edgeship device provision",
                   "edgeship-agent install usb-update.tar"):
        assert needed in commands, needed


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _clone_venv(clone: Path) -> None:
    """``.venv`` in the clone, as `make demo` would leave it: a real virtual environment with the
    clone installed editable (so the tour runs the clone's code), its dependencies taken from
    this checkout's environment (a .pth line) instead of a download."""
    here = Path(sys.prefix)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(clone / ".venv")], check=True)
    site = next((clone / ".venv" / "lib").glob("python3*/site-packages"))
    deps = next((here / "lib").glob("python3*/site-packages"))
    (site / "_edgeship_deps.pth").write_text(f"{deps}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(clone / ".venv" / "bin" / "python"), "install",
                    "--quiet", "--no-deps", "--no-build-isolation", "-e", str(clone)], check=True,
                   capture_output=True)


def _stop_group(pgid: int) -> None:
    """SIGKILL whatever the script left running (its own process group, started by the test)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_readme_tour_from_a_fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> None:
    for tool, where in (("mosquitto", mosquitto_binary()), ("sshd", sshd_binary()), ("curl", shutil.which("curl")),
                        ("git", shutil.which("git"))):
        if not where:
            pytest.skip(f"{tool} is not installed")
    busy = [p for p in TOUR_PORTS if not _port_free(p)]
    if busy:
        pytest.skip(f"the README's ports {busy} are taken on this machine")
    wheelhouse = build_offline_wheelhouse(tmp_path_factory.mktemp("tour-wheels"), "litert")
    base = world_readable_tempdir("edgeship-tour-")  # Mosquitto's own account must reach broker/
    clone = base / "edgeship"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    _clone_venv(clone)
    account = make_device_account(base)
    key, pub = make_user_key(tmp_path_factory.mktemp("tour-sshkey"))
    (base / "sshd").mkdir()
    sshd = Sshd(base / "sshd", pub).start()
    prefix = account.home / "edgeship" if account.created else base / "device-prefix"
    target = (f"{account.user}@127.0.0.1 --port {sshd.port} --identity {key} --wheelhouse {wheelhouse}"
              + ("" if account.created else f" --prefix {prefix}"))
    script = tour_script((ROOT / "README.md").read_text(), target)
    (base / "tour.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGESHIP_", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    log_path = base / "tour.log"
    # a file, not a pipe: a background process the script leaves behind must not hold the test up
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["bash", str(base / "tour.sh")], cwd=clone, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        try:
            process.wait(timeout=900)
        except subprocess.TimeoutExpired:
            pytest.fail("the tour did not finish within 15 minutes:\n" + log_path.read_text(errors="replace")[-6000:])
    finally:
        _stop_group(process.pid)
        pidfile = prefix / "run" / "agent.pid"
        if pidfile.exists():  # the agent provisioning started, by its pid
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        sshd.stop()
        account.remove()
    output = log_path.read_text(errors="replace")
    try:
        assert process.returncode == 0, output[-8000:]
        tour = clone / "tour"
        # the conversion half
        assert (tour / "digits-int8.tflite").exists() and "gates passed" in output
        # both fleets completed their rollouts and answered a prediction
        assert output.count(" COMPLETED ") >= 2, output[-6000:]
        assert output.count('{"predictions":[[') == 2, output[-6000:]
        # provisioning reached the device over SSH, installed and started the agent, and it came
        # online through Mosquitto (the step that waits for its status message)
        assert re.search(r"@127\.0\.0\.1\S*: provisioned \(", output), output[-6000:]
        assert re.search(r"wait online \[(changed|unchanged)\]: online after", output), output[-6000:]
        # the USB package installed on the hand-updated device
        assert '"version": "1.0.0"' in output
        assert "Traceback" not in output, output[-6000:]
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":  # print the script the test runs
    sys.stdout.write(tour_script((ROOT / "README.md").read_text(), "USER@127.0.0.1 --port PORT"))
