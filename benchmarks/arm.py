"""The device agent on emulated ARM CPUs (docs/benchmarks.md, section ``arm``): arm64 and
armhf Debian bookworm roots (Raspberry Pi OS 64-bit and 32-bit) under qemu-user-static,
prepared as in ``make test-arm`` (.ci/arm/session), each figure beside the same step on
this machine's own CPU in the same run:

1. install size of each extra: what ``pip install edgeship[EXTRA]`` adds to a fresh venv
   (on armhf, plus what apt installed for it: Debian's numpy, cffi, psutil);
2. idle RSS of ``edgeship-agent run`` serving digits (fp32 TFLite), 3 s after its first
   prediction: VmRSS of the process, which under qemu-user includes the emulator and its
   translated code, so it is an upper bound of a device's;
3. start to first prediction of ``edgeship-agent run`` (digits installed and committed);
4. the emulation factor: the same steps timed on the host, and two micro figures in one
   process (a pure-Python loop; 200 invokes of digits), emulated time over host time.

These are EMULATED figures: qemu translates every ARM instruction; a Raspberry Pi's own
timings differ (usually much faster than these for model invokes). Read the sizes as a
device's, the RSS as an upper bound, and the times only through the emulation factor.

Reproduce (root; a few minutes with the roots cached): ``make bench-arm``, or
``.venv/bin/python benchmarks/arm.py --write``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "examples" / "digits"))

PLAN = (("arm64", "litert,onnx"), ("armhf", "tflite"))
RUNTIME = {"litert": "litert", "tflite": "tflite_runtime", "onnx": "onnxruntime"}
STARTS = 3

# Run in one process by the root's Python and by the host's: pure Python, then invokes.
_MICRO = """
import json, sys, time
t = time.perf_counter(); s = 0
for i in range(1_000_000):
    s += i * i % 7
python_s = time.perf_counter() - t
import numpy as np
from edgeship.agent.runtimes import open_model
with open_model(sys.argv[1], prefer=[sys.argv[2]]) as runner:
    x = np.zeros((1, 8, 8, 1), np.float32)
    runner.run([x])
    t = time.perf_counter()
    for _ in range(200):
        runner.run([x])
    invoke_s = (time.perf_counter() - t) / 200
print(json.dumps({"python_s": python_s, "invoke_s": invoke_s, "runtime": runner.runtime_version}))
"""


def measure_agent(config: Path, python: list[str]) -> dict[str, float]:
    """Median of ``STARTS`` starts: seconds to first prediction, idle RSS (MB) 3 s later."""
    from agent import rss_mb, start_agent  # benchmarks/agent.py

    starts, rss = [], []
    for _ in range(STARTS):
        proc, _host, _port, seconds = start_agent(config, python=python)
        try:
            starts.append(seconds)
            time.sleep(3.0)
            rss.append(rss_mb(proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    return {"start_s": statistics.median(starts), "rss_mb": statistics.median(rss)}


def micro(python: list[str], model: Path, runtime: str) -> dict[str, Any]:
    out = subprocess.run([*python, "-c", _MICRO, str(model), runtime], capture_output=True, text=True,
                         timeout=900, check=False)
    if out.returncode != 0:
        raise SystemExit(f"arm bench: the micro benchmark failed: {out.stderr.strip()[-500:]}")
    return dict(json.loads(out.stdout))


def host_python(extra: str) -> list[str]:
    """The host's Python with the same runtime as the emulated one, where there is one
    (.venv-tflite has tflite_runtime 2.14; .venv has LiteRT and ONNX Runtime)."""
    tflite = REPO / ".venv-tflite" / "bin" / "python"
    if extra == "tflite" and tflite.exists():
        return [str(tflite)]
    return [sys.executable]


def measure_session(out: Path) -> None:
    """Inside ``.ci/arm/session``: every figure of this architecture, emulated and host."""
    from agent import make_device  # benchmarks/agent.py

    arch = os.environ["EDGESHIP_ARM_ARCH"]
    in_root = [os.environ["EDGESHIP_ARM_IN_ROOT"], os.environ["EDGESHIP_ARM_ROOT"]]
    base = Path(os.environ["EDGESHIP_ARM_RUN"]) / "bench"
    base.mkdir()
    config, model, _ = make_device(base)  # digits 1.0.0 committed, on the shared path
    results: dict[str, Any] = {"arch": arch, "extras": {}}
    for var in sorted(k for k in os.environ if k.startswith("EDGESHIP_ARM_PYTHON_")):
        extra = var.removeprefix("EDGESHIP_ARM_PYTHON_").lower()
        install = json.loads((Path(os.environ["EDGESHIP_ARM_RESULTS"]) / f"{arch}-{extra}.install.json").read_text())
        row: dict[str, Any] = {"install": install}
        if extra != "onnx":  # the digits bundle is TFLite
            emulated = [*in_root, os.environ[var]]
            print(f"arm bench: {arch} edgeship[{extra}]: {STARTS} agent starts emulated, then on the host", flush=True)
            row["emulated"] = {**measure_agent(config, emulated), **micro(emulated, model, RUNTIME[extra])}
            host = host_python(extra)
            row["host"] = {**measure_agent(config, host), **micro(host, model, RUNTIME[extra])}
        results["extras"][extra] = row
    out.write_text(json.dumps(results, indent=1))


def _wheel() -> Path:
    dist = REPO / "build" / "arm" / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for stale in (REPO / "build" / "lib",):
        shutil.rmtree(stale, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(dist), str(REPO)], check=True, capture_output=True)
    return next(dist.glob("edgeship-*.whl"))


def _mb(kib: float) -> str:
    return f"{kib / 1024:.0f} MB"


def table(results: list[dict[str, Any]]) -> str:
    when = dt.date.today().isoformat()
    lines = [
        "## Emulated ARM devices (`benchmarks/arm.py`)",
        "",
        (f"**EMULATED, not a Raspberry Pi's figures.** Measured {when} on {platform.machine()}, 2 cores (shared), "
         "in Debian bookworm roots (what Raspberry Pi OS 64-bit and 32-bit are) under qemu-user-static "
         f"{_qemu_version()}, the project's wheel installed as docs/agent.md tells a device to. "
         "Sizes are a device's; the RSS of an emulated process includes qemu and its translated code "
         "(an upper bound); times are only meaningful through the emulation factor beside them "
         "(emulated / host, the same step in the same run). Agent figures: digits (fp32 TFLite, batch 1, "
         f"1 thread) installed and committed, median of {STARTS} starts."),
        "",
        ("| device (emulated) | extra | install size | idle RSS serving digits | start to first prediction | "
         "pure Python | one invoke |"),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        device = {"arm64": "arm64 (Pi OS 64-bit-like)", "armhf": "armhf (Pi OS 32-bit-like)"}[res["arch"]]
        for extra, row in res["extras"].items():
            inst = row["install"]
            size = f"{_mb(inst['venv_kib'])} venv"
            if inst.get("apt_kib"):
                size += f" + {_mb(inst['apt_kib'])} apt (numpy, cffi, psutil)"
            if "emulated" not in row:
                lines.append(f"| {device} | `[{extra}]` | {size} | (no TFLite runtime: ONNX bundles only; "
                             "served and tested by make test-arm) | | | |")
                continue
            e, h = row["emulated"], row["host"]
            lines.append(
                f"| {device} | `[{extra}]` | {size} | {e['rss_mb']:.0f} MB (host: {h['rss_mb']:.0f} MB) | "
                f"{e['start_s']:.1f} s (host {h['start_s']:.2f} s: {e['start_s'] / h['start_s']:.0f}x) | "
                f"{e['python_s']:.2f} s (host {h['python_s']:.2f} s: {e['python_s'] / h['python_s']:.1f}x) | "
                f"{e['invoke_s'] * 1e3:.2f} ms (host {h['invoke_s'] * 1e6:.0f} us: "
                f"{e['invoke_s'] / h['invoke_s']:.0f}x) |"
            )
    lines += ["", "Packages installed per extra (pip freeze in each root):", ""]
    for res in results:
        for extra, row in res["extras"].items():
            lines.append(f"- {res['arch']} `[{extra}]`: {row['install']['packages'].strip()}")
    lines += [
        "",
        "armhf has no ONNX Runtime (no armv7 build exists), so no `[onnx]` row there.",
        ("Pure Python: 1,000,000 iterations of an integer loop in one process; one invoke: the mean of "
         "200 `runner.run` calls on a zeros input after one warm-up, the same runtime on both sides "
         "where the host has it (armhf's tflite_runtime 2.14 against the host's .venv-tflite)."),
        "",
        "Reproduce (root): `make bench-arm` (`.venv/bin/python benchmarks/arm.py --write`).",
    ]
    return "\n".join(lines)


def _qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True, text=True, check=False)
        return out.stdout.split("version", 1)[1].split()[0]
    except (OSError, IndexError):
        return "(version unknown)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md section 'arm'")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # inside .ci/arm/session
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.measure:
        measure_session(args.measure)
        return
    setup = subprocess.run(["bash", str(REPO / ".ci" / "arm" / "host-setup")], check=False)
    if setup.returncode != 0:
        raise SystemExit(setup.returncode)
    wheel = _wheel()
    results = []
    for arch, extras in PLAN:
        out = REPO / "build" / "arm" / f"bench-{arch}.json"
        out.unlink(missing_ok=True)
        session = [str(REPO / ".ci" / "arm" / "session"), arch, extras, str(wheel), "--",
                   sys.executable, str(Path(__file__).resolve()), "--measure", str(out)]
        print("arm bench:", shlex.join(session[:4]), flush=True)
        if subprocess.run(session, cwd=REPO, timeout=3600, check=False).returncode != 0:
            raise SystemExit(f"arm bench: the {arch} session failed (output above)")
        results.append(json.loads(out.read_text()))
    text = table(results)
    print(text)
    if args.write:
        from results_doc import write_section

        write_section("arm", text)


if __name__ == "__main__":
    main()
