"""Controller settings that would misbehave silently are refused with one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgeship.ota.errors import BadInputError
from edgeship.toolkit.cli import main
from edgeship.toolkit.controller import ControllerConfig


@pytest.mark.parametrize("changes", [
    {"tick_s": float("nan")},       # every wait returns at once: a busy loop
    {"tick_s": float("inf")},       # OverflowError in the reconcile thread
    {"tick_s": 1e12},
    {"shared_group": "a/b"},        # $share/a/b/edgeship/...: group "a", the wrong topic filter
    {"shared_group": "+"},
    {"shared_group": "g#"},
])
def test_config_refuses_silent_nonsense(changes: dict[str, Any]) -> None:
    with pytest.raises(BadInputError):
        ControllerConfig(broker="mqtt://127.0.0.1:1883", repo="r", db_url="sqlite://", **changes)


def test_good_settings_still_pass() -> None:
    config = ControllerConfig(broker="mqtt://127.0.0.1:1883", repo="r", db_url="sqlite://", tick_s=0.5,
                              shared_group="edgeship-controllers")
    assert config.shared_group == "edgeship-controllers"
    assert ControllerConfig(broker="mqtt://127.0.0.1:1883", repo="r", db_url="sqlite://",
                            shared_group=None).shared_group is None


@pytest.mark.parametrize("args,why", [(["--tick", "nan"], "tick"), (["--shared-group", "a/b"], "shared")])
def test_cli_refuses_them_before_connecting(tmp_path: Path, args: list, why: str) -> None:
    repo = tmp_path / "repo"
    result = CliRunner().invoke(main, ["controller", "--broker", "mqtt://127.0.0.1:1", "--repo", str(repo),
                                       "--db", f"sqlite:///{tmp_path / 'f.db'}", *args],
                                env={"EDGESHIP_ROOT_PASSPHRASE": "a long passphrase"})
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and why in result.stderr
