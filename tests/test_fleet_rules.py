"""The fleet rules the store applies, table by table (pure: no store here)."""

from __future__ import annotations

from typing import Any

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


# -- many models per device -----------------------------------------------------------------------

from edgeship.toolkit.fleet_rules import DesiredModel, document_schema, next_desired_set  # noqa: E402

DIGITS_1 = DesiredModel("digits", "1.0.0", 1)
DIGITS_2 = DesiredModel("digits", "1.1.0", 2, rollout_id="ro-1")
KWS_1 = DesiredModel("kws", "0.1.0", 1)


@pytest.mark.parametrize("current,change,expected", [
    ({}, DIGITS_1, {"digits": DIGITS_1}),
    # a rollout of one model replaces that entry and leaves the others as they were
    ({"digits": DIGITS_1, "kws": KWS_1}, DIGITS_2, {"digits": DIGITS_2, "kws": KWS_1}),
    ({"digits": DIGITS_1}, KWS_1, {"digits": DIGITS_1, "kws": KWS_1}),
    # a renewal (the same entry) changes nothing
    ({"digits": DIGITS_1, "kws": KWS_1}, KWS_1, {"digits": DIGITS_1, "kws": KWS_1}),
])
def test_a_change_moves_one_model_and_copies_the_others(current: dict[str, DesiredModel], change: DesiredModel,
                                                        expected: dict[str, DesiredModel]) -> None:
    assert next_desired_set(current, change) == expected
    assert current == dict(current)  # the current set is not modified


@pytest.mark.parametrize("models,multi,version,expected", [
    ({"digits": DIGITS_1}, True, "0.2.0", (2, None)),
    ({"digits": DIGITS_1, "kws": KWS_1}, True, "0.2.0", (2, None)),
    # an agent of one model: schema 1 while it holds one model
    ({"digits": DIGITS_2}, False, "0.1.0", (1, None)),
    ({}, False, None, (1, None)),
    # a second model name is refused with the reason, naming the agent's version
    ({"digits": DIGITS_1, "kws": KWS_1}, False, "0.1.0", (None, "agent 0.1.0 serves one model; upgrade the agent")),
    ({"digits": DIGITS_1, "kws": KWS_1}, False, None,
     (None, "agent (version unknown) serves one model; upgrade the agent")),
])
def test_the_document_form_follows_what_the_agent_reports(models: dict[str, DesiredModel], multi: bool,
                                                          version: str | None,
                                                          expected: tuple[int | None, str | None]) -> None:
    assert document_schema(models, multi_model_agent=multi, agent_version=version) == expected


@pytest.mark.parametrize("left,multi,expected", [
    ({"digits": DIGITS_1}, True, (2, None)),
    ({}, True, (2, None)),  # a multi-model agent may be told to serve nothing
    # schema 1 names one bundle: it cannot tell an agent of one model to drop it
    ({}, False, (None, "agent 0.1.0 serves one model; upgrade the agent")),
])
def test_taking_a_model_out_needs_a_multi_model_agent(left: dict[str, DesiredModel], multi: bool,
                                                      expected: tuple[int | None, str | None]) -> None:
    assert document_schema(left, multi_model_agent=multi, agent_version="0.1.0", removing=True) == expected


@pytest.mark.parametrize("models,multi,version,expected", [
    ({"digits": DIGITS_1}, True, "0.2.0", (2, None)),
])
def test_a_multi_model_agent_gets_schema_2_even_for_one_model(models: dict[str, DesiredModel], multi: bool,
                                                          version: str | None,
                                                          expected: tuple[int | None, str | None]) -> None:
    assert document_schema(models, multi_model_agent=multi, agent_version=version) == expected


def test_a_schema2_document_carries_every_model_and_verifies_with_the_director_key(tmp_path: Any) -> None:
    from pathlib import Path

    from edgeship.ota.director import (
        DESIRED_STATE_TYPE,
        canonical_json,
        generate_director_key,
        load_director_private_key,
        load_director_public_key,
    )
    from edgeship.ota.release import TargetInfo
    from edgeship.toolkit.desired_publisher import build_schema2_document, sign_document

    generate_director_key(tmp_path / "d.key", tmp_path / "d.pub")
    key = load_director_private_key(tmp_path / "d.key")
    targets = {
        "digits": (DIGITS_2, TargetInfo("digits", "1.1.0", "digits/digits-1.1.0.bundle", 10, "a" * 64, "tflite", {},
                                        Path("x"), serving_version=2)),
        "kws": (DesiredModel("kws", "0.1.0"), TargetInfo("kws", "0.1.0", "kws/kws-0.1.0.bundle", 20, "b" * 64,
                                                         "onnx", {}, Path("y"), serving_version=5))}
    doc = build_schema2_document(fleet="f", device="d1", sequence=9, now=1_700_000_000, expires_in_s=3600,
                                 models=targets)
    assert doc["_type"] == DESIRED_STATE_TYPE and doc["schema"] == 2 and doc["sequence"] == 9
    assert doc["models"]["digits"] == {"bundle": "digits", "version": "1.1.0", "serving_version": 2,
                                       "target": "digits/digits-1.1.0.bundle", "length": 10,
                                       "hashes": {"sha256": "a" * 64}, "deployment": None, "rollout": "ro-1",
                                       "action": "install"}
    assert doc["models"]["kws"]["serving_version"] == 5  # from the signed target when the entry has none
    envelope = sign_document(doc, key)
    public = load_director_public_key(tmp_path / "d.pub")
    public.verify(bytes.fromhex(envelope["signatures"][0]["sig"]), canonical_json(envelope["signed"]))
