"""The fleet rules the store applies, table by table (pure: no store here)."""

from __future__ import annotations

import pytest

from edgeship.toolkit.fleet_rules import LiveWork, exclusion_conflict

R_DIGITS = LiveWork("rollout", "ro-1", frozenset({"digits"}), "RUNNING", "1.1.0")
P_DIGITS = LiveWork("rollout", "ro-2", frozenset({"digits"}), "PAUSED", "1.2.0")
T_DIGITS = LiveWork("abtest", "ab-1", frozenset({"digits"}), "RUNNING")
T_MIXED = LiveWork("abtest", "ab-2", frozenset({"digits", "digits-small"}), "RUNNING")
R_WAKE = LiveWork("rollout", "ro-9", frozenset({"wakeword"}), "RUNNING", "2.0.0")


@pytest.mark.parametrize("kind,names,live,promoting,expected", [
    ("rollout", {"digits"}, [], None, None),
    # another model on the same fleet is never in the way
    ("rollout", {"digits"}, [R_WAKE], None, None),
    ("abtest", {"digits"}, [R_WAKE], None, None),
    ("rollout", {"digits"}, [R_DIGITS], None, "rollout ro-1 of digits 1.1.0 on fleet f is RUNNING; abort it or let"),
    ("rollout", {"digits"}, [P_DIGITS], None, "rollout ro-2 of digits 1.2.0 on fleet f is PAUSED"),
    ("abtest", {"digits"}, [R_DIGITS], None, "rollout ro-1 of digits on fleet f is RUNNING; abort it or let it "
                                             "finish before an A/B test"),
    ("rollout", {"digits"}, [T_DIGITS], None, "A/B test ab-1 of digits runs on fleet f; promote or stop it first"),
    # the test a rollout promotes does not count against it; another test still does
    ("rollout", {"digits"}, [T_DIGITS], "ab-1", None),
    ("rollout", {"digits"}, [T_DIGITS, T_MIXED], "ab-1", "A/B test ab-2 of digits runs on fleet f"),
    ("abtest", {"digits"}, [T_DIGITS], None, "A/B test ab-1 of digits already runs on fleet f"),
    # either arm's name counts
    ("abtest", {"digits-small", "other"}, [T_MIXED], None, "A/B test ab-2 of digits-small/other already runs"),
])
def test_one_model_name_is_moved_by_one_thing_at_a_time(kind: str, names: set[str], live: list[LiveWork],
                                                        promoting: str | None, expected: str | None) -> None:
    got = exclusion_conflict(kind, names, "f", live, promoting=promoting)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.startswith(expected), got
