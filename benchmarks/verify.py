"""Benchmark: verifying a large bundle streams (memory flat) and hashes at ``sha256sum`` speed.

Builds a bundle around a random 200 MB model, publishes it into a fresh release
repository, then measures, each in its own fresh subprocess (so the RSS figures
belong to the verification alone):

- ``bundle verify``: ``ReleaseRepository.verify_bundle`` (TUF metadata checked from the
  first root, then one streaming pass: whole-file sha256 + every member's sha256);
- ``device fetch``: ``fetch_verified_bundle`` through ``LocalFolderFetcher`` (TUF
  refresh, bounded download streamed into the safe extractor, whole-file and member
  hashes, fsync);

against ``sha256sum`` on the same file in the same run (page cache warm for all).
Gates: peak RSS added by verification <= 16 MiB; verification speed
>= 80% of ``sha256sum``'s. Results go to docs/benchmarks.md, section ``verify``.

Run: ``.venv/bin/python benchmarks/verify.py [--size-mb 200] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RSS_GATE_MIB = 16.0
SPEED_GATE = 0.80
PASSPHRASE = "benchmark passphrase"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM), so imports' peak does not count (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def child(mode: str, bundle: str, repo: str, scratch: str) -> None:
    """Run one verification in this (fresh) process; print seconds and RSS growth as JSON."""
    from edgeship.ota.director import load_director_public_key, verify_desired_state
    from edgeship.ota.fetchers import LocalFolderFetcher
    from edgeship.ota.release import ReleaseRepository
    from edgeship.ota.updater import fetch_verified_bundle

    repository = ReleaseRepository(repo)
    now = dt.datetime.now(dt.timezone.utc)
    state = None
    if mode == "device":
        name_version = json.loads(Path(repo, "bench.json").read_text())
        envelope = json.loads(Path(repo, "desired.json").read_text())
        state = verify_desired_state(envelope, load_director_public_key(repository.director_public_key_path),
                                     device="bench", fleet="bench", last_sequence=None, now=now)
        trust = Path(scratch, "trust")
        trust.mkdir(parents=True)
        shutil.copy(repository.metadata_dir / "1.root.json", trust / "root.json")
        assert name_version["name"] == state.bundle
    reset = _reset_peak_rss()
    rss_before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    if mode == "verify":
        repository.verify_bundle(bundle, now=now)
    else:
        assert state is not None
        fetch_verified_bundle(trust_dir=Path(scratch, "trust"), desired=state, fetcher=LocalFolderFetcher(repo),
                              work_dir=Path(scratch, "work"), now=now)
    seconds = time.perf_counter() - start
    # VmHWM since the reset; without the reset, ru_maxrss (which may include the imports' peak)
    peak = _status_kib("VmHWM") * 1024 if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "rss_before": rss_before, "peak": peak, "peak_reset": reset,
                      "added": max(0, peak - rss_before)}))


def _run_child(mode: str, bundle: Path, repo: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-child-", dir=bundle.parent) as scratch:
        done = subprocess.run([sys.executable, __file__, "--child", mode, str(bundle), str(repo), scratch],
                              capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sha256sum(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["sha256sum", str(path)], capture_output=True, check=True)
    return time.perf_counter() - start


def _make_bundle(folder: Path, size: int) -> Path:
    from edgeship.ota.bundle_build import build_bundle

    model = folder / "big.tflite"
    with open(model, "wb") as handle:
        handle.write(b"\x1c\x00\x00\x00TFL3")
        left = size - 8
        while left > 0:
            step = min(left, 1 << 20)
            handle.write(os.urandom(step))
            left -= step
    signature = {"inputs": [{"name": "x", "shape": [1, 224, 224, 3], "dtype": "float32"}],
                 "outputs": [{"name": "y", "shape": [1, 1000], "dtype": "float32"}]}
    out = folder / "big.bundle"
    build_bundle(model, name="big", version="1.0.0", out=out, report={"signature": signature})
    model.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "BUNDLE", "REPO", "SCRATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from edgeship.ota.release import ReleaseRepository

    size = args.size_mb * 1000 * 1000
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-verify-") as tmp:
        folder = Path(tmp)
        bundle = _make_bundle(folder, size)
        repo = ReleaseRepository(folder / "repo")
        repo.init(root_passphrase=PASSPHRASE)
        repo.publish(bundle)
        envelope = repo.sign_desired(fleet="bench", device="bench", name="big", version="1.0.0")
        (folder / "repo" / "desired.json").write_text(json.dumps(envelope))
        (folder / "repo" / "bench.json").write_text(json.dumps({"name": "big", "version": "1.0.0"}))
        length = bundle.stat().st_size
        _sha256sum(bundle)  # warm the page cache for everyone
        runs: dict[str, list[dict[str, Any]]] = {"verify": [], "device": []}
        baseline: list[float] = []
        for _ in range(args.repeat):
            baseline.append(_sha256sum(bundle))
            runs["verify"].append(_run_child("verify", bundle, folder / "repo"))
            runs["device"].append(_run_child("device", bundle, folder / "repo"))

    base = statistics.median(baseline)
    rows = []
    results: dict[str, Any] = {"bundle_bytes": length, "sha256sum_s": base}
    for mode, label in (("verify", "`bundle verify` (TUF metadata + one streaming pass)"),
                        ("device", "device `fetch_verified_bundle` (download, verify, extract)")):
        seconds = statistics.median(r["seconds"] for r in runs[mode])
        added = max(r["added"] for r in runs[mode]) / 2**20
        ratio = base / seconds
        results[mode] = {"seconds": seconds, "rss_added_mib": added, "speed_vs_sha256sum": ratio}
        rows.append((label, seconds, length / seconds / 1e6, ratio, added))
    verify = results["verify"]
    passed = verify["rss_added_mib"] <= RSS_GATE_MIB and verify["speed_vs_sha256sum"] >= SPEED_GATE
    device_ok = results["device"]["rss_added_mib"] <= RSS_GATE_MIB
    print(json.dumps(results, indent=2))

    lines = [
        f"Verifying a {length / 1e6:.0f} MB bundle (random model bytes) against `sha256sum` on the same file, "
        f"same run, page cache warm; median of {args.repeat} runs, each verification in a fresh process. "
        f"`sha256sum`: {base:.3f} s ({length / base / 1e6:.0f} MB/s).",
        "",
        "| what | seconds | MB/s | speed vs `sha256sum` | peak RSS added (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| `sha256sum` (baseline) | {base:.3f} | {length / base / 1e6:.0f} | 1.00 | - |",
    ]
    for label, seconds, mbps, ratio, added in rows:
        lines.append(f"| {label} | {seconds:.3f} | {mbps:.0f} | {ratio:.2f} | {added:.1f} |")
    lines += [
        "",
        f"Verification gates: verification adds at most {RSS_GATE_MIB:.0f} MiB of RSS and runs at no less than "
        f"{SPEED_GATE:.0%} of `sha256sum`'s speed: **{'pass' if passed else 'FAIL'}** for `bundle verify`; "
        f"the device path's RSS gate: **{'pass' if device_ok else 'FAIL'}**; its time also includes writing "
        "the extracted files and fsyncing them (the download streams straight into the extractor), and it "
        "hashes every byte twice (the whole file against TUF, each member against the manifest).",
        "",
        "RSS added = the process's peak RSS during the verification (VmHWM, reset through /proc/self/clear_refs "
        "just before it began) minus its RSS at that moment. "
        "Reads use a 1 MiB buffer and hashlib (OpenSSL).",
        "",
        f"Measured on: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}.",
        "Reproduce: `.venv/bin/python benchmarks/verify.py` (options: `--size-mb`, `--repeat`).",
    ]
    if not args.no_write:
        from results_doc import write_section

        write_section("verify", "## verify: streaming bundle verification\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
