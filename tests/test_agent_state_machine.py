"""The agent's pure decisions, table by table: transitions, crash-loop cap, boot
serving, probation verdicts, the self-test speed gate, retention, config and the
state file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeship.agent.config import load_config, parse_config, render_config
from edgeship.agent.health import (
    MIN_SAMPLE,
    ProbationPolicy,
    ProbationSample,
    Verdict,
    latency_gate,
    probation_verdict,
)
from edgeship.agent.persistence import AgentState, InstalledBundle, StateStore, UpdateRecord
from edgeship.agent.slots import install_into_slot, plan_retention
from edgeship.agent.state_machine import (
    PRE_ACTIVATION_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    Event,
    InvalidTransitionError,
    State,
    event_on_reentry,
    next_state,
    serving_bundle_key,
)
from edgeship.ota.errors import BadInputError, EdgeshipError

S, E = State, Event

# The happy path, then a failure injected in each state: where it must end.
HAPPY = [
    S.DISK_CHECK,
    S.FETCHING,
    S.VERIFYING,
    S.INSTALLING,
    S.SELF_TEST,
    S.ACTIVATING,
    S.PROBATION,
    S.COMMITTED,
]
FAILURE_IN = {
    S.DISK_CHECK: [S.FAILED],
    S.FETCHING: [S.FAILED],
    S.VERIFYING: [S.FAILED],
    S.INSTALLING: [S.FAILED],
    S.SELF_TEST: [S.FAILED],
    S.ACTIVATING: [S.ROLLING_BACK, S.ROLLED_BACK],
    S.PROBATION: [S.ROLLING_BACK, S.ROLLED_BACK],
}
REJECT_IN = {
    s: [S.REJECTED] for s in (S.DISK_CHECK, S.FETCHING, S.VERIFYING, S.INSTALLING, S.SELF_TEST)
}


def walk(fail_in: State | None, event: Event) -> list[State]:
    """Drive the table: SUCCESS everywhere except ``event`` in ``fail_in``."""
    state, path = next_state(S.IDLE, E.START), []
    while True:
        path.append(state)
        if state in TERMINAL_STATES:
            return path
        state = next_state(state, event if state is fail_in else E.SUCCESS)


def test_happy_path() -> None:
    assert walk(None, E.SUCCESS) == HAPPY


@pytest.mark.parametrize("state, tail", sorted(FAILURE_IN.items()))
def test_failure_in_each_state(state: State, tail: list[State]) -> None:
    path = walk(state, E.FAILURE)
    assert path[: path.index(state) + 1] == HAPPY[: HAPPY.index(state) + 1]
    assert path[path.index(state) + 1 :] == tail


@pytest.mark.parametrize("state, tail", sorted(REJECT_IN.items()))
def test_reject_in_each_pre_activation_state(state: State, tail: list[State]) -> None:
    assert walk(state, E.REJECT)[-1:] == tail


@pytest.mark.parametrize(
    "state",
    [S.DISK_CHECK, S.FETCHING, S.VERIFYING, S.INSTALLING, S.SELF_TEST, S.ACTIVATING, S.PROBATION],
)
def test_abort_and_loop_in_each_state_end_without_the_new_model(state: State) -> None:
    for event in (E.ABORT, E.LOOP_DETECTED):
        end = next_state(state, event)
        assert end in (S.FAILED, S.ROLLING_BACK)
        if end is S.ROLLING_BACK:
            assert next_state(end, E.SUCCESS) is S.ROLLED_BACK


def test_rollback_failures_end_failed_and_every_non_terminal_state_can_end() -> None:
    assert next_state(S.ROLLING_BACK, E.FAILURE) is S.FAILED
    assert next_state(S.ROLLING_BACK, E.LOOP_DETECTED) is S.FAILED
    non_terminal = {s for s in State if s not in TERMINAL_STATES}
    for state in non_terminal:  # a failure and a crash loop lead out of every state: never stuck
        assert (state, E.FAILURE) in TRANSITIONS and (state, E.LOOP_DETECTED) in TRANSITIONS


def test_no_event_leaves_a_terminal_state() -> None:
    for state in TERMINAL_STATES - {S.IDLE}:
        for event in Event:
            with pytest.raises(InvalidTransitionError):
                next_state(state, event)

def test_a_refusal_after_activation_rolls_back_like_a_failure() -> None:
    for state in (S.ACTIVATING, S.PROBATION):
        assert next_state(state, E.REJECT) is next_state(state, E.FAILURE) is S.ROLLING_BACK
    assert next_state(S.ROLLING_BACK, E.REJECT) is S.FAILED


def test_only_probation_waits_and_a_rollback_cannot_be_aborted() -> None:
    from edgeship.agent.state_machine import WAITS, accepts

    assert WAITS == {(S.PROBATION, E.DEFER)}
    assert next_state(S.PROBATION, E.DEFER) is S.PROBATION
    assert not accepts(S.ROLLING_BACK, E.ABORT)  # a rollback in progress finishes
    for state in (S.DISK_CHECK, S.FETCHING, S.VERIFYING, S.INSTALLING, S.SELF_TEST, S.ACTIVATING, S.PROBATION):
        assert accepts(state, E.ABORT)


# Every (state, event) pair the driver can post, and where it must lead (None: no row).
TABLE = [
    (s, e, TRANSITIONS.get((s, e)))
    for s in State
    for e in Event
]


@pytest.mark.parametrize(("state", "event", "target"), TABLE, ids=[f"{s.value}-{e.value}" for s, e, _ in TABLE])
def test_every_row_keeps_the_old_model_before_activation_and_rolls_back_after(
    state: State, event: Event, target: State | None
) -> None:
    if target is None:
        with pytest.raises(InvalidTransitionError):
            next_state(state, event)
        return
    if state in PRE_ACTIVATION_STATES and event is not E.SUCCESS:
        assert target in (S.FAILED, S.REJECTED)  # the old model never stopped serving
    if state in (S.ACTIVATING, S.PROBATION) and event not in (E.SUCCESS, E.DEFER):
        assert target is S.ROLLING_BACK  # after activation every way out but commit rolls back
    if state is S.ROLLING_BACK and event is not E.SUCCESS:
        assert target is S.FAILED


@pytest.mark.parametrize(
    "entries, cap, expected",
    [
        (1, 3, None),
        (2, 3, None),
        (4, 3, None),
        (5, 3, E.LOOP_DETECTED),
        (1, 0, None),
        (2, 0, E.LOOP_DETECTED),
    ],
)
def test_reentry_cap(entries: int, cap: int, expected: Event | None) -> None:
    assert event_on_reentry(entries, cap) is expected


@pytest.mark.parametrize(
    "state, key",
    [
        (S.ROLLING_BACK, "rollback_to"),
        (S.PROBATION, "active"),
        (S.SELF_TEST, "active"),
        (S.ACTIVATING, "active"),
    ],
)
def test_bundle_served_at_boot(state: State, key: str) -> None:
    assert serving_bundle_key(state) == key


POLICY = ProbationPolicy(
    window_s=10, min_requests=5, max_error_rate=0.05, max_nonfinite_rate=0.0, max_latency_ratio=2.0
)


@pytest.mark.parametrize(
    "sample, verdict, words",
    [
        (ProbationSample(1, 3, 0, 0, 1.0, 1.0, 100), Verdict.WAIT, ""),
        (ProbationSample(11, 3, 0, 0, 1.0, 1.0, 100), Verdict.WAIT, ""),  # too few requests yet
        (ProbationSample(11, 6, 0, 0, 1.0, 1.0, 100), Verdict.COMMIT, "healthy"),
        (ProbationSample(1, MIN_SAMPLE, 5, 0, 1.0, 1.0, 100), Verdict.ROLL_BACK, "error rate"),
        (
            ProbationSample(1, MIN_SAMPLE - 1, 5, 0, 1.0, 1.0, 100),
            Verdict.WAIT,
            "",
        ),  # not enough to judge early
        (
            ProbationSample(11, 6, 1, 0, 1.0, 1.0, 100),
            Verdict.ROLL_BACK,
            "error rate",
        ),  # judged at window end
        (ProbationSample(2, 40, 0, 1, 1.0, 1.0, 100), Verdict.ROLL_BACK, "NaN/Inf"),
        (ProbationSample(2, 40, 0, 0, 3.0, 1.0, 100), Verdict.ROLL_BACK, "p95 latency"),
        (
            ProbationSample(11, 40, 0, 0, 3.0, 1.0, 5),
            Verdict.COMMIT,
            "healthy",
        ),  # baseline too small to compare
        (ProbationSample(11, 40, 0, 0, 1.9, 1.0, 100), Verdict.COMMIT, "healthy"),
    ],
)
def test_probation_verdicts(sample: ProbationSample, verdict: Verdict, words: str) -> None:
    got, reason = probation_verdict(sample, POLICY)
    assert got is verdict and words in reason


@pytest.mark.parametrize(
    "new, running, ratio, ok",
    [
        (1.0, None, 1.5, True),
        (1.0, 1.0, 0.0, True),
        (2.0, 1.0, 1.5, False),
        (1.4, 1.0, 1.5, True),
    ],
)
def test_self_test_latency_gate(new: float, running: float | None, ratio: float, ok: bool) -> None:
    passed, reason = latency_gate(new, running, ratio)
    assert passed is ok and ("too slow" in reason) is (not ok)


def _bundle(slot: str) -> InstalledBundle:
    return InstalledBundle(
        name="m", version=slot, slot=slot, model_file="model.tflite", model_format="tflite"
    )


def test_retention_keeps_active_and_n_previous_and_deletes_the_rest() -> None:
    active, previous = _bundle("a"), [_bundle("p1"), _bundle("p2"), _bundle("p3")]
    plan = plan_retention(
        active, previous, 2, ["a", "p1", "p2", "p3", "failed", "leftover"], protected=["new"]
    )
    assert [b.slot for b in plan.keep_previous] == ["p1", "p2"]
    assert plan.delete == ("failed", "leftover", "p3")


def test_install_into_slot_is_idempotent(tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model.tflite").write_bytes(b"x")
    slots = tmp_path / "slots"
    target = install_into_slot(staged, slots, "s1")
    assert install_into_slot(staged, slots, "s1") == target  # re-run after a restart: already moved
    assert (target / "model.tflite").read_bytes() == b"x"


def test_state_file_round_trip_and_corruption(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    assert store.load().active is None
    record = UpdateRecord(
        id="u1",
        kind="install",
        state="PROBATION",
        staged=_bundle("s"),
        rollback_to=_bundle("o"),
        source={"kind": "package", "path": "/x"},
        entries={"PROBATION": 2},
    )
    state = AgentState(active=_bundle("s"), previous=[_bundle("o")], last_sequence=7, update=record)
    store.save(state)
    again = store.load()
    assert again.to_dict() == state.to_dict()
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(BadInputError, match="unreadable"):
        store.load()
    (tmp_path / "state.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(BadInputError, match="unknown format"):
        store.load()
    for bad in ([], "text", {"format": 1, "update": {"id": "u", "kind": "install", "state": "BOGUS"}}):
        (tmp_path / "state.json").write_text(json.dumps(bad))
        with pytest.raises(BadInputError, match="unreadable") as info:
            store.load()
        assert "\n" not in info.value.message


def test_a_state_that_cannot_be_written_is_one_error_and_the_old_file_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import edgeship.agent.persistence as persistence

    store = StateStore(tmp_path / "state.json")
    store.save(AgentState(last_sequence=3))

    def full_disk(path: Path, data: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(persistence, "atomic_write_json", full_disk)
    with pytest.raises(EdgeshipError, match="cannot write agent state .*No space left on device") as info:
        store.save(AgentState(last_sequence=4))
    assert "\n" not in info.value.message
    monkeypatch.undo()
    assert store.load().last_sequence == 3


def test_rendered_config_is_complete_and_valid(tmp_path: Path) -> None:
    text = render_config(
        data="/var/lib/edgeship",
        device_id="pi-7",
        fleet="lab",
        root="/etc/edgeship/root.json",
        director_key="/etc/edgeship/director.pub",
        bind="127.0.0.1:9000",
        broker="mqtt://h:1883",
    )
    path = tmp_path / "agent.toml"
    path.write_text(text)
    config = load_config(path)
    assert (config.device_id, config.fleet, config.bind_port, config.broker_url) == (
        "pi-7",
        "lab",
        9000,
        "mqtt://h:1883",
    )
    assert config.data_dir == Path("/var/lib/edgeship") and config.keep_previous == 2
    example = Path(__file__).resolve().parents[1] / "device-agent" / "agent.example.toml"
    assert load_config(example).device_id  # the shipped example parses


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"device": {"fleet": "lab"}}, r"\[device\] id is missing"),
        ({"device": {"id": "a/b", "fleet": "lab"}}, "must be non-empty without"),
        ({"runtime": {"prefer": ["cuda"]}}, "choose from"),
        ({"runtime": {"threads": 0}}, "threads = 0 must be > 0"),
        ({"server": {"bind": "localhost"}}, "not HOST:PORT"),
        ({"probation": {"max_error_rate": 2.0}}, "within"),
        ({"probation": {"window_s": "long"}}, "must be a float"),
        # a typo must not silently leave the default in force
        ({"probation": {"window": 5.0}}, r"\[probation\] window is not a known key \(known: max_error_rate"),
        ({"probaton": {"window_s": 5.0}}, r"\[probaton\] is not a known table"),
        ({"retention": {"keep": 1}}, r"\[retention\] keep is not a known key"),
        # nan passes every comparison as false (probation would never roll back); inf never ends
        ({"probation": {"max_error_rate": float("nan")}}, r"\[probation\] max_error_rate = nan must be a finite"),
        ({"probation": {"window_s": float("inf")}}, r"\[probation\] window_s = inf must be a finite"),
        # named as the file names it, not by the attribute
        ({"probation": {"window_s": -1.0}}, r"\[probation\] window_s = -1.0 must be >= 0"),
        ({"self_test": {"max_latency_ratio": -2.0}}, r"\[self_test\] max_latency_ratio = -2.0 must be >= 0"),
    ],
)
def test_bad_config_is_named(patch: dict, message: str) -> None:
    doc = {
        "device": {"id": "d", "fleet": "f"},
        "paths": {"data": "/d"},
        "trust": {"root": "/r.json", "director_key": "/k.pub"},
    }
    for table, values in patch.items():
        doc[table] = values if table == "device" else {**doc.get(table, {}), **values}
    with pytest.raises(BadInputError, match=message):
        parse_config(doc)


def test_broker_table_takes_the_fleet_links_keys() -> None:
    """[broker] keys besides url belong to the fleet link (validated there): not refused here."""
    doc = {
        "device": {"id": "d", "fleet": "f"},
        "paths": {"data": "/d"},
        "trust": {"root": "/r.json", "director_key": "/k.pub"},
        "broker": {"url": "", "prefix": "x", "block_size": 1024, "repository_url": "https://h/r"},
    }
    assert parse_config(doc).broker_url == ""


# -- which TFLite runtime may run a bundle, and whether its version is enough ---------------------
@pytest.mark.parametrize(
    "prefer, runtimes, order",
    [
        (["litert", "tflite_runtime", "tensorflow"], None, ["litert", "tflite_runtime", "tensorflow"]),
        (["litert", "tflite_runtime", "tensorflow"], [], ["litert", "tflite_runtime", "tensorflow"]),
        # SELECT_TF_OPS models name only full TensorFlow: LiteRT must not be tried
        (["litert", "tflite_runtime", "tensorflow"], ["tensorflow"], ["tensorflow"]),
        (["litert", "tflite_runtime"], ["tensorflow"], []),
        (["tflite_runtime", "litert"], ["litert", "tflite_runtime"], ["tflite_runtime", "litert"]),
    ],
)
def test_tflite_runtime_order(prefer: list[str], runtimes: list[str] | None, order: list[str]) -> None:
    from edgeship.agent.runtimes import tflite_runtime_order

    assert tflite_runtime_order(prefer, runtimes) == order


@pytest.mark.parametrize(
    "runtime, have, minimum, validated, ok, words",
    [
        ("litert", "2.3.0", None, None, True, ""),
        # min_version is a TensorFlow Lite version; LiteRT numbers its releases apart from
        # TensorFlow's, and every LiteRT release has at least TF Lite 2.17's kernels
        ("litert", "2.3.0", "2.17.0", None, True, "2.17"),
        ("litert", "1.0.1", "1.14.0", None, True, ""),
        # newer than the floor: accepted only when the converter validated it on this
        # LiteRT version or an older one
        ("litert", "2.3.0", "2.20.0", {"runtime": "litert", "version": "2.3.0"}, True, "validated"),
        ("litert", "2.3.0", "2.20.0", {"runtime": "litert", "version": "2.4.0"}, False, "2.20.0"),
        ("litert", "2.3.0", "99.0", None, False, "needs TensorFlow Lite >= 99.0"),
        ("litert", "2.3.0", "2.20.0", {"runtime": "tensorflow", "version": "2.21.0"}, False, "litert 2.3.0"),
        # tflite_runtime and tensorflow use TensorFlow's numbering: compared directly
        ("tflite_runtime", "2.14.0", "2.17.0", None, False, "tflite_runtime >= 2.17.0"),
        ("tflite_runtime", "2.14.0", "1.14.0", None, True, ""),
        ("tensorflow", "2.21.0", "2.17.0", None, True, ""),
        ("tensorflow", "2.16.1", "99.0", {"runtime": "tensorflow", "version": "2.15.0"}, False, "99.0"),
        # pre-release and local labels (Jetson wheels): the release numbers only, not their digits run together
        ("tensorflow", "2.16.0rc1", "2.16.1", None, False, "2.16.1"),
        ("tflite_runtime", "2.15.0+nv24.05", "2.15.1", None, False, "2.15.1"),
        ("tflite_runtime", "2.15.0+nv24.05", "2.15.0", None, True, ""),
        ("tensorflow", "2.17.0-dev20240101", "2.17.0", None, True, ""),
    ],
)
def test_tflite_min_version(
    runtime: str, have: str, minimum: str | None, validated: dict | None, ok: bool, words: str
) -> None:
    from edgeship.agent.runtimes import tflite_version_ok

    result, reason = tflite_version_ok(runtime, have, minimum, validated)
    assert result is ok and words in reason, reason


def test_only_states_before_activation_can_end_rejected() -> None:
    """A REJECT after activation rolls back (the table, not the driver, says so): the states
    from which a REJECT reaches REJECTED are exactly those before activation."""
    rejected = {state for (state, event), end in TRANSITIONS.items() if event is E.REJECT and end is S.REJECTED}
    assert rejected == set(PRE_ACTIVATION_STATES)
