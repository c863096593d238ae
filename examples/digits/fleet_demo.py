"""The fleet half of ``make demo``: the digits model goes to five devices and back.

    python examples/digits/fleet_demo.py [--out DIR] [--devices N] [--json]

On this machine, with nothing but the Python environment: an embedded MQTT broker
(amqtt, ``edgeship broker run``), the fleet controller
(``edgeship controller``) and N device agents (``edgeship-agent run``, each with its
own data folder and config written by ``edgeship-agent init``), all separate
processes. Then, with the real commands:

1. the model: ``DIR/summary.json`` from ``examples/digits/run.py`` (trained,
   converted and validated; run.py runs first in ``make demo``), or, without it,
   train and convert the primary variant here;
2. ``edgeship keys init``, ``edgeship bundle build`` (model, golden vectors, report),
   ``edgeship publish``: version 1.0.0, and 1.1.0 whose golden vectors no longer
   match what the model computes (its outputs perturbed);
3. ``edgeship rollout start digits 1.0.0 --stages 20,60,100``, live progress;
4. a real prediction through one device's TF Serving-compatible REST API;
5. ``edgeship rollout start digits 1.1.0``: the first device fails its self-test,
   the rollout aborts at its first stage and rolls that device back;
6. ``edgeship fleet ls`` and a summary.

Every process is stopped at the end, also on Ctrl-C or an error (their logs stay in
``DIR/fleet/logs``). Files: ``DIR/fleet/`` (repository, store, device folders, logs).
"""

from __future__ import annotations

__all__ = ["FleetDemo", "ProcessGroup", "main", "perturbed_golden", "run_fleet_demo"]

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

FLEET = "demo"
GOOD_VERSION = "1.0.0"
BAD_VERSION = "1.1.0"
PASSPHRASE = "edgeship-demo-root-passphrase (a demo only: keep a real root key offline)"
PYTHON = sys.executable


class DemoError(Exception):
    """A step of the demo did not turn out as it must; the message says which."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise DemoError(f"timed out after {timeout:g} s waiting for {what}")


class ProcessGroup:
    """The demo's child processes, each with its log file and a layer (0: broker, 1: controller,
    2: devices). ``stop()`` stops the highest layer first (SIGTERM, SIGKILL after a grace
    period), so the devices still reach the broker to say "offline" before it goes."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, int, subprocess.Popen[bytes], Any]] = []
        self.pids_file = log_dir / "pids.json"

    def start(self, name: str, argv: Sequence[str], layer: int) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")  # held until the process is stopped
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_env(), start_new_session=True)
        self.procs.append((name, layer, proc, log))
        self.pids_file.write_text(json.dumps({n: p.pid for n, _, p, _ in self.procs}))
        return proc

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, _, proc, _ in self.procs}

    def check(self) -> None:
        for name, _, proc, _ in self.procs:
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise DemoError(f"{name} exited with status {proc.returncode}:\n{tail}")

    def stop(self, grace_s: float = 10.0) -> list[str]:
        """Stop everything, layer by layer; returns the names that needed SIGKILL."""
        killed: list[str] = []
        for layer in sorted({entry[1] for entry in self.procs}, reverse=True):
            group = [entry for entry in self.procs if entry[1] == layer]
            for _, _, proc, _ in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for name, _, proc, log in group:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    killed.append(name)
                log.close()
        self.procs.clear()
        return killed


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", EDGESHIP_ROOT_PASSPHRASE=PASSPHRASE)
    for key in ("EDGESHIP_BROKER", "EDGESHIP_DB", "EDGESHIP_REPO"):
        env.pop(key, None)
    return env


def _cli(*args: str, json_out: bool = True, timeout: float = 300) -> Any:
    """One ``edgeship`` command as a user runs it; its JSON document (with --json)."""
    argv = [PYTHON, "-m", "edgeship.toolkit.cli", *args] + (["--json"] if json_out else [])
    env = _env()
    env.setdefault("COLUMNS", str(max(120, shutil.get_terminal_size((120, 40)).columns)))  # tables printed here
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if result.returncode != 0:
        raise DemoError(f"`edgeship {' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()[-1500:]}")
    return json.loads(result.stdout) if json_out else result.stdout


def _agent_cli(*args: str) -> Any:
    result = subprocess.run([PYTHON, "-m", "edgeship.agent.cli", *args, "--json"], capture_output=True, text=True,
                            env=_env(), timeout=120, check=False)
    if result.returncode != 0:
        raise DemoError(f"`edgeship-agent {' '.join(args)}` failed: {result.stderr.strip()[-1500:]}")
    return json.loads(result.stdout)


def perturbed_golden(golden: Path, out: Path, shift: float = 0.25) -> Path:
    """The same inputs with outputs the model does not produce (shifted past the tolerance)."""
    from edgeship.ota.golden import GoldenVectors

    vectors = GoldenVectors.load(golden)
    outputs = tuple((y.astype("float64") + shift).astype(y.dtype) for y in vectors.outputs)
    GoldenVectors(vectors.input_names, vectors.inputs, vectors.output_names, outputs, atol=vectors.atol).save(out)
    return out


def _model_files(out: Path, say: Callable[[str], None]) -> dict[str, Path]:
    """The primary variant from run.py's summary.json, or trained and converted here."""
    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        files = summary["files"][summary["primary"]]
        found = {"model": Path(files["model"]), "golden": Path(files["golden"]), "report": Path(files["report"]),
                 "eval": Path(summary["files"]["eval"])}
        if all(p.is_file() for p in found.values()):
            say(f"model: {found['model'].name} from {summary_path} (trained, converted and validated by run.py)")
            return found
    from run import PRIMARY_VARIANT, VARIANTS, convert_variants, train

    say("model: training the digits CNN and converting its primary variant (run.py's steps)")
    paths = train(out)
    variant = next(v for v in VARIANTS if v.name == PRIMARY_VARIANT)
    result = convert_variants(paths, out, variants=[variant])[variant.name]
    return {"model": result.model, "golden": result.golden, "report": result.report_path, "eval": paths["eval"]}


class FleetDemo:
    """The fleet demo's state and steps (``run()`` does them all; ``close()`` stops every process)."""

    def __init__(self, out: Path, devices: int = 5, say: Callable[[str], None] = print) -> None:
        self.out = out
        self.root = out / "fleet"
        self.n_devices = devices
        self.say = say
        self.procs: ProcessGroup | None = None
        self.timings: dict[str, float] = {}
        self.result: dict[str, Any] = {}
        self.repo = self.root / "repo"
        self.db_url = f"sqlite:///{self.root / 'fleet.db'}"
        self.broker_url = ""
        self.devices = [f"dev-{i + 1}" for i in range(devices)]
        self.short_root: Path | None = None

    # -- steps --
    def prepare(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
        (self.root / "logs").mkdir(parents=True)
        self.procs = ProcessGroup(self.root / "logs")

    def release(self) -> None:
        start = time.perf_counter()
        files = _model_files(self.out, self.say)
        self.files = files
        keys = _cli("keys", "init", "--repo", str(self.repo))
        self.root_json = Path(keys["root_metadata"])
        self.director_pub = Path(keys["director_public_key"])
        bad_golden = perturbed_golden(files["golden"], self.root / "bad.golden.npz")
        published = {}
        for version, golden in ((GOOD_VERSION, files["golden"]), (BAD_VERSION, bad_golden)):
            bundle = self.root / f"digits-{version}.bundle"
            _cli("bundle", "build", str(files["model"]), "--name", "digits", "--version", version, "--golden",
                 str(golden), "--report", str(files["report"]), "-o", str(bundle))
            info = _cli("publish", str(bundle), "--repo", str(self.repo))
            published[version] = info
            self.say(f"published digits {version}: {info['length']} bytes, sha256 {info['sha256'][:16]}..."
                     + ("  (its golden vectors no longer match the model)" if version == BAD_VERSION else ""))
        self.result["published"] = {v: {"length": i["length"], "sha256": i["sha256"]} for v, i in published.items()}
        self.timings["bundle_sign_publish_s"] = time.perf_counter() - start

    def start_fleet(self) -> None:
        assert self.procs is not None
        start = time.perf_counter()
        port = _free_port()
        self.broker_url = f"mqtt://127.0.0.1:{port}"
        self.procs.start("broker", [PYTHON, "-m", "edgeship.toolkit.cli", "broker", "run", "--host", "127.0.0.1",
                                    "--port", str(port)], layer=0)
        _wait(lambda: self._listening(port) or self.procs.check(), 30, "the embedded broker")  # type: ignore[union-attr]
        self.say(f"embedded MQTT broker (amqtt) on {self.broker_url}")
        self.procs.start("controller", [PYTHON, "-m", "edgeship.toolkit.cli", "controller", "--broker",
                                        self.broker_url, "--repo", str(self.repo), "--db", self.db_url,
                                        "--tick", "0.5", "--replica-id", "demo"], layer=1)
        for device in self.devices:
            folder = self.root / "devices" / device
            folder.mkdir(parents=True)
            config = folder / "agent.toml"
            data = self._data_folder(device)
            _agent_cli("init", "--data", str(data), "--device-id", device, "--fleet", FLEET,
                       "--root", str(self.root_json), "--director-key", str(self.director_pub),
                       "--bind", "127.0.0.1:0", "--broker", self.broker_url, "-o", str(config))
            # a demo's probation is short (a real device watches a new model for minutes)
            text = config.read_text().replace("window_s = 60.0", "window_s = 2.0") \
                .replace("interval_s = 60.0", "interval_s = 2.0")
            config.write_text(text)
            self.procs.start(device, [PYTHON, "-m", "edgeship.agent.cli", "run", "--config", str(config)], layer=2)
        self.say(f"controller and {len(self.devices)} agents ({', '.join(self.devices)}) starting")
        from edgeship.toolkit.store import FleetStore

        self.store = FleetStore(self.db_url)

        def all_online() -> bool:
            self.procs.check()  # type: ignore[union-attr]
            devices = self.store.list_devices(FLEET)
            return sum(1 for d in devices if d.online) == len(self.devices)

        _wait(all_online, 90, "every agent to report online to the controller", interval=0.3)
        self.timings["fleet_start_s"] = time.perf_counter() - start
        self.say(f"all {len(self.devices)} devices online (controller store {self.db_url})")

    def _data_folder(self, device: str) -> Path:
        """The device's data folder; under a short temporary folder when the demo's own path
        would make the control socket's path longer than a Unix socket allows (108 bytes)."""
        data = (self.root / "devices" / device / "data").resolve()
        if len(str(data / "agent.sock")) <= 100:
            return data
        if self.short_root is None:
            self.short_root = Path(tempfile.mkdtemp(prefix="edgeship-demo-"))
        return self.short_root / device

    @staticmethod
    def _listening(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    def rollout(self, version: str, expect: str) -> dict[str, Any]:
        """Start a staged rollout with the real command and follow it live until it finishes."""
        from edgeship.toolkit.rollouts import FINISHED_STATES, describe_stages, stage_progress

        start = time.perf_counter()
        started = _cli("rollout", "start", "digits", version, "--fleet", FLEET, "--stages", "20,60,100",
                       "--max-failures", "0", "--stage-timeout", "2m", "--db", self.db_url,
                       "--broker", self.broker_url)
        rollout_id = started["id"]
        self.say(f"rollout {rollout_id}: digits {version} to fleet {FLEET} in stages 20%, 60%, 100%")
        last = ""

        def finished() -> Any:
            nonlocal last
            self.procs.check()  # type: ignore[union-attr]
            current, _ = self.store.load_rollout(rollout_id)
            parts = describe_stages(stage_progress(current))
            line = f"  [{time.perf_counter() - start:5.1f} s] {current.state.value:<11} " + " | ".join(parts)
            if line.split("] ", 1)[1] != last:
                last = line.split("] ", 1)[1]
                self.say(line)
            return current if current.state in FINISHED_STATES else None

        final = _wait(finished, 150, f"rollout {rollout_id} of digits {version} to finish", interval=0.3)
        seconds = time.perf_counter() - start
        outcome = {"id": rollout_id, "version": version, "state": final.state.value, "reason": final.reason,
                   "seconds": round(seconds, 1),
                   "devices": {d: r.status.value for d, r in sorted(final.devices.items())}}
        if final.state.value != expect:
            raise DemoError(f"rollout of {version} ended {final.state.value} ({final.reason}); expected {expect}")
        self.say(f"rollout {rollout_id} {final.state.value} in {seconds:.1f} s" +
                 (f": {final.reason}" if final.reason else ""))
        return outcome

    def wait_versions(self, version: str, timeout: float = 60) -> None:
        def converged() -> bool:
            devices = self.store.list_devices(FLEET)
            return len(devices) == len(self.devices) and all(d.active_version == version for d in devices)
        _wait(converged, timeout, f"every device to run digits {version}", interval=0.3)

    def predict(self, device: str) -> dict[str, Any]:
        """A real request to a device's REST API (TF Serving's predict), as an application sends it."""
        import http.client

        import numpy as np

        from edgeship.agent.config import load_config
        from edgeship.agent.control import ControlClient

        config = load_config(self.root / "devices" / device / "agent.toml")
        status = ControlClient(config.control_socket, timeout=10).call("status")["status"]
        host, port = status["server"].removeprefix("http://").rsplit(":", 1)
        data = np.load(self.files["eval"])
        x, y = data["x"][:4], data["y"][:4]
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        body = json.dumps({"instances": x.tolist()})
        conn.request("POST", "/v1/models/digits:predict", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        conn.close()
        if response.status != 200:
            raise DemoError(f"{device} answered {response.status}: {answer}")
        predicted = [int(np.argmax(p)) for p in answer["predictions"]]
        doc = {"device": device, "url": f"http://{host}:{port}/v1/models/digits:predict",
               "serving": f"{status['serving']['name']} {status['serving']['version']}",
               "predicted": predicted, "labels": [int(v) for v in y]}
        self.say(f"POST {doc['url']} with 4 digits from eval.npz -> predicted {predicted}, true labels {doc['labels']}"
                 f" ({doc['serving']} on {device})")
        return doc

    def fleet_table(self) -> str:
        table = _cli("fleet", "ls", "--fleet", FLEET, "--db", self.db_url, json_out=False)
        self.result["fleet"] = _cli("fleet", "ls", "--fleet", FLEET, "--db", self.db_url)["devices"]
        return str(table)

    def run(self) -> dict[str, Any]:
        total = time.perf_counter()
        self.prepare()
        self.release()
        self.start_fleet()
        self.result["rollout_good"] = self.rollout(GOOD_VERSION, expect="COMPLETED")
        self.wait_versions(GOOD_VERSION)
        self.result["prediction"] = self.predict(self.devices[0])
        self.result["rollout_bad"] = bad = self.rollout(BAD_VERSION, expect="ABORTED")
        failed = [d for d, s in bad["devices"].items() if s in ("FAILED", "ROLLBACK_SENT")]
        self.wait_versions(GOOD_VERSION)
        reasons = {}
        for device in failed:
            info = self.store.get_device(device)
            reasons[device] = {"update": f"{info.update_name} {info.update_version} {info.update_state}",
                               "reason": info.update_detail, "active": f"{info.active_name} {info.active_version}"}
        self.result["bad_version_failed_on"] = reasons
        self.say(self.fleet_table().rstrip())
        self.timings["fleet_total_s"] = time.perf_counter() - total
        self.result["timings"] = {k: round(v, 1) for k, v in self.timings.items()}
        return self.result

    def close(self) -> None:
        if getattr(self, "store", None) is not None:
            self.store.close()
        if self.procs is not None:
            self.result["processes"] = self.procs.pids()
            killed = self.procs.stop()
            if killed:
                self.say(f"stopped with SIGKILL (did not stop within 10 s): {', '.join(killed)}")
        if self.short_root is not None:
            shutil.rmtree(self.short_root, ignore_errors=True)


def run_fleet_demo(out: Path, devices: int = 5, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole fleet demo; every process is stopped before this returns or raises."""
    demo = FleetDemo(out, devices, say)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        return demo.run()
    finally:
        # a second Ctrl-C (or SIGTERM) while stopping must not leave a process behind
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            demo.close()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous)


def _summary(result: dict[str, Any]) -> str:
    good, bad, pred = result["rollout_good"], result["rollout_bad"], result["prediction"]
    lines = [
        "summary:",
        f"  digits {good['version']}: rollout {good['id']} {good['state']} in {good['seconds']} s; every device runs it",
        f"  prediction on {pred['device']}: {pred['predicted']} (labels {pred['labels']})",
        f"  digits {bad['version']}: rollout {bad['id']} {bad['state']} in {bad['seconds']} s ({bad['reason']})",
    ]
    for device, info in result["bad_version_failed_on"].items():
        lines.append(f"    {device}: {info['update']} ({info['reason']}); sent back to {good['version']}, "
                     f"serves {info['active']}")
    t = result["timings"]
    lines.append("  times: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v} s" for k, v in t.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="the folder run.py wrote (default ./demo-out)")
    parser.add_argument("--devices", type=int, default=5, help="device agents to run (default 5)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    args = parser.parse_args(argv)
    if args.devices < 1:
        print("error: --devices must be at least 1", file=sys.stderr)
        return 2
    say: Callable[[str], None] = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else \
        (lambda text: print(text, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = run_fleet_demo(out, args.devices, say)
    except KeyboardInterrupt:
        print("error: interrupted; every demo process was stopped", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"error: {exc} (logs: {out / 'fleet' / 'logs'})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
