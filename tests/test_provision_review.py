"""Review fixes on provisioning: nonsense options are refused before any host is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from edgeship.ota.errors import BadInputError
from edgeship.toolkit.cli import main
from edgeship.toolkit.provisioning import ProvisionOptions


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf")])
def test_online_timeout_must_be_positive_and_finite(timeout: float) -> None:
    with pytest.raises(BadInputError, match="--online-timeout"):
        ProvisionOptions(fleet="plant", online_timeout=timeout)


def test_bad_online_timeout_is_refused_before_ssh(tmp_path: Path) -> None:
    root, key = tmp_path / "root.json", tmp_path / "director.pub"
    root.write_text("{}")
    key.write_text("x")
    # port 1 on loopback: if the command got as far as SSH it would fail with "cannot reach" (exit 1)
    result = CliRunner().invoke(main, ["device", "provision", "pi@127.0.0.1", "--port", "1", "--fleet", "plant",
                                       "--root", str(root), "--director-key", str(key), "--online-timeout", "-1"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --online-timeout")
