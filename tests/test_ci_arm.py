"""The ARM stage's own machinery (.ci/arm), on this machine's CPU: where it may not run it
says why in one line and passes; it never leaves a mount behind, and never touches a folder
beside the one it cleans. (The stage itself, with the agent in emulated roots, is
``make test-arm``: tests/test_agent_arm.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARM = REPO / ".ci" / "arm"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount)")


def _as_nobody(*command: str) -> list[str]:
    """``command`` as an unprivileged user (the test runs as root in CI)."""
    if os.geteuid() != 0:
        return list(command)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]


@pytest.fixture
def readable_copy() -> Iterator[Path]:
    """.ci/arm copied where an unprivileged user can read it (a checkout under /root, or
    pytest's own tmp_path, is not)."""
    folder = Path(tempfile.mkdtemp(prefix="edgeship-ci-arm-"))
    try:
        shutil.copytree(ARM, folder / ".ci" / "arm")
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder)


def test_without_root_the_stage_is_skipped_with_one_line(readable_copy: Path) -> None:
    arm = readable_copy / ".ci" / "arm"
    result = subprocess.run(_as_nobody("bash", str(arm / "host-setup")), capture_output=True, text=True,
                            timeout=60, check=False, cwd=readable_copy)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ARM stage skipped: needs root")
    # test-arm turns that into a pass: CI on such a machine goes on
    result = subprocess.run(_as_nobody("bash", str(arm / "test-arm"), "--ci"), capture_output=True, text=True,
                            timeout=60, check=False, cwd=readable_copy)
    assert result.returncode == 0 and "ARM stage skipped" in result.stderr, result.stderr


def test_a_wrong_argument_is_a_usage_error() -> None:
    result = subprocess.run(["bash", str(ARM / "test-arm"), "riscv64"], capture_output=True, text=True,
                            timeout=60, check=False, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith("usage:"), result.stderr


@root_only
def test_release_mounts_unmounts_nested_mounts_and_spares_a_sibling(tmp_path: Path) -> None:
    """A root is emptied only once nothing is mounted in it: nested mounts (deepest first)
    all go; a folder whose name merely starts with the root's (root-x) keeps its mount."""
    root, sibling = tmp_path / "root", tmp_path / "root-x"
    for folder in (root / "proc", root / "dev" / "shm", sibling):
        folder.mkdir(parents=True)

    def mount(target: Path) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True, timeout=30)

    def mounted(path: Path) -> bool:
        return subprocess.run(["mountpoint", "-q", str(path)], check=False, timeout=30).returncode == 0

    mount(root / "proc")
    mount(root / "dev")
    (root / "dev" / "shm").mkdir()
    mount(root / "dev" / "shm")
    mount(sibling)
    try:
        result = subprocess.run(["bash", "-c", f'source "{ARM / "lib.sh"}" && release_mounts "{root}"'],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert not any(mounted(p) for p in (root / "proc", root / "dev", root / "dev" / "shm"))
        assert mounted(sibling)
    finally:
        for target in (root / "dev" / "shm", root / "dev", root / "proc", sibling):
            if mounted(target):
                subprocess.run(["umount", "-l", str(target)], check=False, timeout=30)
