"""``edgeship keys``, ``bundle``, ``publish`` and ``repo`` through the real CLI edge
(click's CliRunner, and one real subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from ota_repo_simulator import SIGNATURE, fake_tflite

from edgeship.ota.golden import GoldenVectors
from edgeship.toolkit.cli import main

PASS = "correct horse battery"


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("EDGESHIP_ROOT_PASSPHRASE", PASS)
    monkeypatch.delenv("EDGESHIP_NEW_ROOT_PASSPHRASE", raising=False)
    return CliRunner()


def run(runner: CliRunner, args: list[str], code: int = 0, **kwargs: Any) -> Any:
    result = runner.invoke(main, args, catch_exceptions=False, **kwargs)
    assert result.exit_code == code, (result.output, result.stderr if hasattr(result, "stderr") else "")
    return result


def run_json(runner: CliRunner, args: list[str]) -> Any:
    return json.loads(run(runner, args + ["--json"]).stdout)


@pytest.fixture
def converted(tmp_path: Path) -> Path:
    """A model with the converter's sidecar files: MODEL.report.json and MODEL.golden.npz."""
    model = tmp_path / "digits.tflite"
    model.write_bytes(fake_tflite(4000))
    (tmp_path / "digits.tflite.report.json").write_text(json.dumps({
        "signature": SIGNATURE, "quality": {"accuracy": 0.95}, "labels": list("0123456789"),
        "golden": {"atol": 0.03, "rtol": 0.0}}))
    GoldenVectors(("x",), (np.ones((2, 64), np.float32),), ("y",), (np.zeros((2, 10), np.float32),),
                  atol=0.1).save(tmp_path / "digits.tflite.golden.npz")
    return model


@pytest.fixture
def repo(runner: CliRunner, tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    run(runner, ["keys", "init", "--repo", str(path)])
    return path


def test_keys_init_prints_fingerprints_and_provisioning_files(runner: CliRunner, tmp_path: Path) -> None:
    info = run_json(runner, ["keys", "init", "--repo", str(tmp_path / "r"), "--expires", "timestamp=6h"])
    assert set(info["keys"]) == {"root", "targets", "snapshot", "timestamp"}
    assert Path(info["root_metadata"]).is_file() and Path(info["director_public_key"]).is_file()
    assert stat.S_IMODE((tmp_path / "r" / "keys" / "root.key").stat().st_mode) == 0o600
    human = run(runner, ["keys", "init", "--repo", str(tmp_path / "r2")]).stdout
    assert "trusted root metadata" in human and "director public key" in human and "root " in human
    status = run_json(runner, ["repo", "status", "--repo", str(tmp_path / "r")])
    assert status["roles"]["timestamp"]["validity_seconds"] == 6 * 3600


def test_keys_init_prompts_for_the_passphrase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGESHIP_ROOT_PASSPHRASE", raising=False)
    result = CliRunner().invoke(main, ["keys", "init", "--repo", str(tmp_path / "r"), "--json"],
                                input=f"{PASS}\n{PASS}\n")
    assert result.exit_code == 0, result.output
    assert b"OPENSSH PRIVATE KEY" in (tmp_path / "r" / "keys" / "root.key").read_bytes()


def test_keys_init_twice_is_refused(runner: CliRunner, repo: Path) -> None:
    result = run(runner, ["keys", "init", "--repo", str(repo)], code=2)
    assert result.stderr.strip() == f"error: {repo} already holds a release repository; nothing was changed"


def test_build_inspect_publish_verify_export(runner: CliRunner, repo: Path, converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "digits-1.0.0.bundle"
    built = run_json(runner, ["bundle", "build", str(converted), "--name", "digits", "--version", "1.0.0",
                              "--meta", "git=abc", "--tag", "arm64", "-o", str(out)])
    manifest = built["manifest"]
    assert set(manifest["files"]) == {"model.tflite", "golden.npz", "labels.txt", "report.json"}  # picked up
    assert manifest["golden"]["atol"] == 0.03 and manifest["meta"] == {"git": "abc"}
    assert run_json(runner, ["bundle", "inspect", str(out)]) == manifest
    assert "digits 1.0.0" in run(runner, ["bundle", "inspect", str(out)]).stdout
    published = run_json(runner, ["publish", str(out), "--repo", str(repo)])
    assert published["target"] == "digits/digits-1.0.0.bundle"
    verified = run_json(runner, ["bundle", "verify", str(out), "--repo", str(repo)])
    assert verified["verified"] is True and verified["sha256"] == published["sha256"]
    status = run_json(runner, ["repo", "status", "--repo", str(repo)])
    assert [t["version"] for t in status["targets"]] == ["1.0.0"]
    assert status["root_metadata"].endswith("root.json") and status["director_public_key"].endswith(".pub")
    package = tmp_path / "usb.tar"
    exported = run_json(runner, ["bundle", "export", "digits", "1.0.0", "--repo", str(repo), "-o", str(package),
                                 "--fleet", "plant"])
    assert exported["device"] == "*" and package.is_file()
    assert exported["metadata_expires_role"] == "timestamp"  # a day, by default: the CLI warns
    warned = run(runner, ["bundle", "export", "digits", "1.0.0", "--repo", str(repo), "-o", str(package)])
    assert "warning: the package can be installed only until" in warned.stderr
    assert "--expires timestamp=30d" in warned.stderr
    run(runner, ["repo", "refresh", "--repo", str(repo), "--expires", "timestamp=30d", "--expires", "snapshot=30d"])
    quiet = run(runner, ["bundle", "export", "digits", "1.0.0", "--repo", str(repo), "-o", str(package)])
    assert "warning" not in quiet.stderr


def test_inspect_prints_hostile_manifest_text_literally(runner: CliRunner, converted: Path, tmp_path: Path) -> None:
    # manifest strings are the bundle author's: rich markup in them once raised MarkupError (a traceback)
    out = tmp_path / "b.bundle"
    run(runner, ["bundle", "build", str(converted), "--name", "digits", "--version", "1.0.0", "--meta",
                 "note=[/] [red]x", "--tag", "[/bold]", "-o", str(out)])
    shown = run(runner, ["bundle", "inspect", str(out)]).stdout
    assert "[/] [red]x" in shown and "[/bold]" in shown


def test_publish_of_an_equal_version_exits_2(runner: CliRunner, repo: Path, converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    run(runner, ["bundle", "build", str(converted), "--name", "digits", "--version", "1.0.0", "-o", str(out)])
    run(runner, ["publish", str(out), "--repo", str(repo)])
    result = run(runner, ["publish", str(out), "--repo", str(repo)], code=2)
    assert result.stderr == ("error: digits 1.0.0 is not newer than the published digits 1.0.0; "
                             "publish a higher version\n")


def test_verify_of_a_tampered_bundle_exits_4(runner: CliRunner, repo: Path, converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    run(runner, ["bundle", "build", str(converted), "--name", "digits", "--version", "1.0.0", "-o", str(out)])
    run(runner, ["publish", str(out), "--repo", str(repo)])
    data = bytearray(out.read_bytes())
    data[data.index(b"TFL3") + 10] ^= 1
    out.write_bytes(bytes(data))
    result = run(runner, ["bundle", "verify", str(out), "--repo", str(repo)], code=4)
    assert result.stderr.startswith("error: member 'model.tflite' does not match its manifest")
    assert result.stdout == ""


def test_bad_input_exits_2(runner: CliRunner, tmp_path: Path, converted: Path) -> None:
    result = run(runner, ["bundle", "build", str(converted), "--name", "Bad Name", "--version", "1",
                          "-o", str(tmp_path / "b")], code=2)
    assert result.stderr.startswith("error: bundle name 'Bad Name' is not allowed")
    result = run(runner, ["repo", "status", "--repo", str(tmp_path)], code=2)
    assert "is not an edgeship release repository" in result.stderr
    result = run(runner, ["repo", "refresh", "--repo", str(tmp_path), "--expires", "nonsense=1d"], code=2)
    assert "--expires 'nonsense=1d'" in result.stderr


def test_unwritable_outputs_are_one_line_errors(runner: CliRunner, repo: Path, converted: Path,
                                                tmp_path: Path) -> None:
    # an OSError once escaped as a traceback
    (tmp_path / "a-file").write_text("x")
    result = run(runner, ["keys", "init", "--repo", str(tmp_path / "a-file" / "repo")], code=1)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    too_long = str(tmp_path / ("x" * 300))
    result = run(runner, ["bundle", "build", str(converted), "--name", "digits", "--version", "1.0.0", "-o",
                          too_long], code=1)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    bundle = tmp_path / "b.bundle"
    run(runner, ["bundle", "build", str(converted), "--name", "digits", "--version", "1.0.0", "-o", str(bundle)])
    run(runner, ["publish", str(bundle), "--repo", str(repo)])
    result = run(runner, ["bundle", "export", "digits", "1.0.0", "--repo", str(repo), "-o", too_long], code=1)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_refresh_and_rotate(runner: CliRunner, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refreshed = run_json(runner, ["repo", "refresh", "--repo", str(repo), "--expires", "timestamp=2h", "--targets"])
    assert refreshed["roles"]["timestamp"]["version"] == 2 and refreshed["roles"]["targets"]["version"] == 2
    assert refreshed["roles"]["timestamp"]["validity_seconds"] == 7200
    monkeypatch.setenv("EDGESHIP_NEW_ROOT_PASSPHRASE", "the next passphrase")
    rotated = run_json(runner, ["keys", "rotate", "root", "--repo", str(repo)])
    assert rotated["root_version"] == 2 and rotated["fingerprints"]["keys"]["root"] == [rotated["new_key"]]
    monkeypatch.setenv("EDGESHIP_ROOT_PASSPHRASE", "wrong passphrase")
    result = run(runner, ["keys", "rotate", "timestamp", "--repo", str(repo)], code=2)
    assert "does not decrypt" in result.stderr
    monkeypatch.setenv("EDGESHIP_ROOT_PASSPHRASE", "the next passphrase")
    assert run_json(runner, ["keys", "rotate", "timestamp", "--repo", str(repo)])["root_version"] == 3
    assert run_json(runner, ["keys", "rotate", "director", "--repo", str(repo)])["role"] == "director"


def test_real_process_exit_codes(tmp_path: Path, converted: Path) -> None:
    """The installed entry point, in its own process: exit status and one line on stderr."""
    exe = shutil.which("edgeship", path=str(Path(sys.executable).parent)) or "edgeship"
    env = dict(os.environ, EDGESHIP_ROOT_PASSPHRASE=PASS)
    repo = tmp_path / "repo"
    bundle = tmp_path / "b.bundle"
    for args in (["keys", "init", "--repo", str(repo), "--json"],
                 ["bundle", "build", str(converted), "--name", "digits", "--version", "2.0.0", "-o", str(bundle)],
                 ["publish", str(bundle), "--repo", str(repo)]):
        done = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
    data = bytearray(bundle.read_bytes())
    data[data.index(b"TFL3") + 5] ^= 1  # inside the model: the member hash fails
    bundle.write_bytes(bytes(data))
    done = subprocess.run([exe, "bundle", "verify", str(bundle), "--repo", str(repo), "--json"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 4
    assert done.stdout == "" and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")


def test_verify_without_a_repository_checks_the_manifest_only(runner: CliRunner, converted: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "b"
    run(runner, ["bundle", "build", str(converted), "--name", "digits", "--version", "1.0.0", "-o", str(out)])
    result = run_json(runner, ["bundle", "verify", str(out)])
    assert result["verified"] is True and result["released"] is None
    assert "not checked as released" in run(runner, ["bundle", "verify", str(out)]).stdout


def _model_bundle(runner: CliRunner, folder: Path, version: str, model: bytes) -> Path:
    """A bundle of ``model`` (bytes with the TFLite identifier) built through the CLI."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"m-{version}.tflite"
    path.write_bytes(model)
    (folder / f"m-{version}.tflite.report.json").write_text(json.dumps({"signature": SIGNATURE}))
    out = folder / f"digits-{version}.bundle"
    run(runner, ["bundle", "build", str(path), "--name", "digits", "--version", version, "-o", str(out)])
    return out


def _weights(seed: int, size: int = 96_000) -> bytearray:
    """Half noise (weights), half zeros (padding): compressible, like a model, but not trivially."""
    noise = np.random.default_rng(seed).integers(0, 256, size // 2, dtype=np.uint8).tobytes()
    return bytearray(b"\x1c\x00\x00\x00TFL3" + noise + bytes(size // 2))


def test_publish_adds_the_compressed_bundle_and_deltas_from_the_latest_versions(runner: CliRunner, repo: Path,
                                                                                 tmp_path: Path) -> None:
    from edgeship.ota.compressed import decompress_to
    from edgeship.ota.delta import apply_delta
    from edgeship.ota.release import ReleaseRepository

    v1 = _weights(1)
    v2 = bytearray(v1)
    v2[100:110] = b"0123456789"  # a small retrain: most bytes unchanged
    v3 = bytearray(v2)
    v3[5000:5004] = b"abcd"
    bundles = {v: _model_bundle(runner, tmp_path / "b", v, bytes(m))
               for v, m in (("1.0.0", v1), ("2.0.0", v2), ("3.0.0", v3))}

    first = run_json(runner, ["publish", str(bundles["1.0.0"]), "--repo", str(repo)])
    assert first["target"] == "digits/digits-1.0.0.bundle" and first["skipped"] == []
    assert [(c["kind"], c["target"]) for c in first["companions"]] == [("compressed", "digits/digits-1.0.0.bundle.zst")]
    assert first["companions"][0]["length"] < first["length"] * 0.7

    second = run_json(runner, ["publish", str(bundles["2.0.0"]), "--repo", str(repo)])
    kinds = [(c["kind"], c["base_version"]) for c in second["companions"]]
    assert kinds == [("compressed", None), ("delta", "1.0.0")], second
    delta = second["companions"][1]
    assert delta["target"] == f"digits/deltas/2.0.0/{first['sha256']}.delta"
    assert delta["base_sha256"] == first["sha256"] and delta["of"] == "digits/digits-2.0.0.bundle"
    assert delta["length"] < second["companions"][0]["length"] / 10  # far below the compressed bundle

    third = run_json(runner, ["publish", str(bundles["3.0.0"]), "--repo", str(repo), "--deltas", "1",
                              "--no-compress"])
    assert [(c["kind"], c["base_version"]) for c in third["companions"]] == [("delta", "2.0.0")]

    # every companion rebuilds its bundle bit for bit from the files the repository serves
    repository = ReleaseRepository(repo)
    assert [t.version for t in repository.targets()] == ["1.0.0", "2.0.0", "3.0.0"]  # bundles only
    for target in repository.targets():
        for companion in repository.companions(target.name, target.version):
            assert companion.of == target.path
            rebuilt = tmp_path / "rebuilt.bundle"
            if companion.kind == "compressed":
                with open(companion.file, "rb") as source, open(rebuilt, "wb") as out:
                    decompress_to(source, out.write, target.length)
            else:
                base = repository.target_info(target.name, str(companion.base_version))
                apply_delta(companion.file, base.file, rebuilt, expected_target_sha256=target.sha256)
            assert rebuilt.read_bytes() == target.file.read_bytes()

    status = run_json(runner, ["repo", "status", "--repo", str(repo)])
    listed = {t["version"]: [(c["kind"], c.get("base_version")) for c in t["companions"]] for t in status["targets"]}
    assert listed == {"1.0.0": [("compressed", None)], "2.0.0": [("compressed", None), ("delta", "1.0.0")],
                      "3.0.0": [("delta", "2.0.0")]}
    human = run(runner, ["repo", "status", "--repo", str(repo)]).stdout
    assert "delta from 1.0.0" in human and "zst" in human
    text = run(runner, ["publish", str(_model_bundle(runner, tmp_path / "b", "5.0.0", bytes(v3[:-1]) + b"z")),
                        "--repo", str(repo), "--deltas", "0"]).stdout
    assert "compressed: digits/digits-5.0.0.bundle.zst" in text and "delta" not in text


def test_publish_takes_the_number_of_delta_bases_from_the_repository_config(runner: CliRunner, repo: Path,
                                                                             tmp_path: Path) -> None:
    config = json.loads((repo / "config.json").read_text())
    (repo / "config.json").write_text(json.dumps({**config, "deltas": 0}))
    v1 = _weights(7)
    v2 = bytearray(v1)
    v2[200] ^= 1
    run_json(runner, ["publish", str(_model_bundle(runner, tmp_path, "1.0.0", bytes(v1))), "--repo", str(repo)])
    second = run_json(runner, ["publish", str(_model_bundle(runner, tmp_path, "2.0.0", bytes(v2))), "--repo",
                               str(repo)])
    assert [c["kind"] for c in second["companions"]] == ["compressed"] and second["skipped"] == []
    run(runner, ["repo", "refresh", "--repo", str(repo), "--expires", "timestamp=2d"])
    assert json.loads((repo / "config.json").read_text())["deltas"] == 0  # kept by a later config write
    (repo / "config.json").write_text(json.dumps({**config, "deltas": "many"}))
    result = run(runner, ["publish", str(_model_bundle(runner, tmp_path, "3.0.0", bytes(v2) + b"x")), "--repo",
                          str(repo)], code=2)
    assert "deltas must be a whole number" in result.stderr


def test_companions_not_worth_sending_are_skipped_with_their_reason(tmp_path: Path) -> None:
    """Incompressible, unrelated files: neither a compressed copy nor a delta is smaller, so neither is made."""
    from edgeship.ota.release import TargetInfo
    from edgeship.toolkit.deltas import build_companions

    def target(version: str, seed: int) -> TargetInfo:
        path = tmp_path / f"x-{version}.bundle"
        path.write_bytes(np.random.default_rng(seed).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
        return TargetInfo("x", version, f"x/x-{version}.bundle", 50_000, "0" * 64, "tflite", {}, path)

    old, new = target("1.0.0", 1), target("2.0.0", 2)
    built = build_companions([old, new], new, tmp_path, bases=2)
    assert built.files == []
    assert [(s["kind"], s.get("base_version")) for s in built.skipped] == [("compressed", None), ("delta", "1.0.0")]
    assert "not smaller than the bundle's 50000" in built.skipped[0]["reason"]
    assert "no smaller than the compressed bundle" in built.skipped[1]["reason"]
