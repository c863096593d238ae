"""Store URLs the store cannot use are one clear line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.toolkit.cli import main
from edgeship.toolkit.store import FleetStore


@pytest.mark.parametrize("url", ["mysql://x@127.0.0.1/db", "oracle://x@h/db", "mssql+pyodbc://x@h/db"])
def test_unsupported_databases_are_bad_input(url: str) -> None:
    with pytest.raises(BadInputError, match="sqlite:/// or postgresql://"):
        FleetStore(url)


def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not SQLite at all\n" * 100)
    with pytest.raises(EdgeshipError, match="cannot open the store"):
        FleetStore(f"sqlite:///{junk}")
    result = CliRunner().invoke(main, ["rollout", "ls", "--db", f"sqlite:///{junk}"])
    assert result.exit_code == 1 and result.stderr.startswith("error: cannot open the store")
    assert result.stderr.count("\n") == 1
    assert junk.read_bytes() == b"this is not SQLite at all\n" * 100  # nothing lost


def test_an_unreachable_postgresql_is_one_line() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(EdgeshipError, match="cannot open the store") as caught:
        FleetStore("postgresql://nobody@127.0.0.1:1/fleet")
    assert "\n" not in caught.value.message and "\t" not in caught.value.message
