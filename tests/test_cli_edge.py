"""Both entry points: every mistake is one line on stderr and a meaningful exit status."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeship.agent.cli import cli as agent_cli
from edgeship.toolkit.cli import main as edgeship_cli


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["rollout", "start", "digits", "1.0.0"], "Missing option '--fleet'"),
        (["abtest", "start", "d:1", "d:2", "--fleet", "f", "--metric", "bogus"], "Invalid value for '--metric'"),
        (["no-such-command"], "No such command"),
        (["convert"], "Missing argument"),
    ],
)
def test_usage_mistakes_are_one_line_with_exit_2(args: list[str], fragment: str) -> None:
    result = CliRunner().invoke(edgeship_cli, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    assert "--help" in lines[0]


def test_agent_usage_mistake_is_one_line() -> None:
    result = CliRunner().invoke(agent_cli, ["install"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: Missing argument") and len(result.output.strip().splitlines()) == 1


def test_help_and_version_still_exit_0() -> None:
    assert CliRunner().invoke(edgeship_cli, ["--version"]).exit_code == 0
    assert "Usage:" in CliRunner().invoke(edgeship_cli, ["bundle", "--help"]).output


def test_real_process_prints_no_traceback_for_a_bad_option() -> None:
    proc = subprocess.run([sys.executable, "-m", "edgeship.toolkit.cli", "rollout", "ls", "--limit", "x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
