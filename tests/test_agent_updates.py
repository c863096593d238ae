"""The update driver with real parts: real offline packages from a real release
repository (TUF + director verification), real LiteRT, real files.

A failure is injected in each state in turn; every bad bundle must end REJECTED
or FAILED with the running model still serving."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from agent_fixtures import DEVICE, AgentRepo, agent_config, tamper_package

from edgeship.agent.faults import FaultHooks
from edgeship.agent.persistence import StateStore
from edgeship.agent.serving import ServingModel
from edgeship.agent.sources import OfflinePackageSource, SlotSource
from edgeship.agent.state_machine import State
from edgeship.agent.updater import UpdateDriver, UpdateInProgressError
from edgeship.ota.errors import EdgeshipError, SecurityError


def predict(serving: ServingModel, x: np.ndarray) -> np.ndarray:
    _, (y,) = serving.predict([x])
    return y


def install(driver: UpdateDriver, package: Path):  # type: ignore[no-untyped-def]
    driver.begin(OfflinePackageSource(package))
    return driver.run()


@pytest.fixture
def device(tmp_path: Path, agent_repo: AgentRepo):  # type: ignore[no-untyped-def]
    """A driver that serves digits 1.0.0, committed."""
    config = agent_config(tmp_path, agent_repo, probation_window_s=0.2)
    serving = ServingModel()
    driver = UpdateDriver(config, serving=serving)
    record = install(driver, agent_repo.export("1.0.0"))
    assert record.state == "COMMITTED", record.reason
    return driver


def test_install_then_update_commits_and_keeps_the_previous(
    device: UpdateDriver, agent_repo: AgentRepo
) -> None:
    record = install(device, agent_repo.export("2.0.0"))
    assert record.state == "COMMITTED", record.reason
    assert [h[0] for h in record.history] == [
        "DISK_CHECK",
        "FETCHING",
        "VERIFYING",
        "INSTALLING",
        "SELF_TEST",
        "ACTIVATING",
        "PROBATION",
        "COMMITTED",
    ]
    state = StateStore(device.config.state_file).load()  # what is on disk, not in memory
    assert (state.active.name, state.active.version) == ("digits", "2.0.0")
    assert [b.version for b in state.previous] == ["1.0.0"]
    assert (
        device.serving.current.version == "2.0.0"
        and device.serving.current.runner.signature.inputs[0].dtype == "int8"
    )
    assert state.last_sequence == record.sequence
    y = predict(device.serving, agent_repo.eval_x[:4])
    assert y.shape == (4, 10) and y.dtype == np.float32  # int8 I/O handled for the caller
    assert "golden vectors match" in " ".join(h[2] for h in record.history)
    slots = sorted(p.name for p in device.config.slots_dir.iterdir())
    assert slots == sorted([state.active.slot, state.previous[0].slot])
    assert not any(device.config.work_dir.iterdir())  # downloads and the unpacked package are gone


# Failure injected in each state: (state, exception, final state, active version afterwards)
INJECTIONS = [
    (State.DISK_CHECK, EdgeshipError, "FAILED", "1.0.0"),
    (State.FETCHING, EdgeshipError, "FAILED", "1.0.0"),
    (State.VERIFYING, EdgeshipError, "FAILED", "1.0.0"),
    (State.INSTALLING, EdgeshipError, "FAILED", "1.0.0"),
    (State.SELF_TEST, EdgeshipError, "FAILED", "1.0.0"),
    (State.ACTIVATING, EdgeshipError, "ROLLED_BACK", "1.0.0"),
    (State.PROBATION, EdgeshipError, "ROLLED_BACK", "1.0.0"),
    (State.DISK_CHECK, SecurityError, "REJECTED", "1.0.0"),
    (State.FETCHING, SecurityError, "REJECTED", "1.0.0"),
    (State.VERIFYING, SecurityError, "REJECTED", "1.0.0"),
    (State.INSTALLING, SecurityError, "REJECTED", "1.0.0"),
    (State.SELF_TEST, SecurityError, "REJECTED", "1.0.0"),
    (
        State.ACTIVATING,
        SecurityError,
        "ROLLED_BACK",
        "1.0.0",
    ),  # no REJECT after activation: a failure
    (State.PROBATION, RuntimeError, "ROLLED_BACK", "1.0.0"),  # a bug is a failure too, never stuck
    (
        State.ROLLING_BACK,
        EdgeshipError,
        "FAILED",
        "2.0.0",
    ),  # rollback impossible: the new one stays
]


@pytest.mark.parametrize(
    "state, error, final, active",
    INJECTIONS,
    ids=[f"{s.value}-{e.__name__}" for s, e, _, _ in INJECTIONS],
)
def test_failure_injected_in_each_state(
    device: UpdateDriver,
    agent_repo: AgentRepo,
    state: State,
    error: type[Exception],
    final: str,
    active: str,
) -> None:
    def inject(current: State) -> None:
        if current is state:
            raise error(f"injected in {current.value}")
        if state is State.ROLLING_BACK and current is State.PROBATION:
            raise EdgeshipError("probation breach (to reach ROLLING_BACK)")

    device.hooks = FaultHooks(inject=inject)
    record = install(device, agent_repo.export("2.0.0"))
    assert record.state == final
    assert f"injected in {state.value}" in record.reason, record.reason  # a rollback names its cause too
    disk = StateStore(device.config.state_file).load()
    assert disk.active is not None and disk.active.version == active  # never neither
    assert device.serving.current.version == active
    assert predict(device.serving, agent_repo.eval_x[:2]).shape == (2, 10)
    slots = {p.name for p in device.config.slots_dir.iterdir()}
    assert disk.active.slot in slots
    if active == "1.0.0":  # FAILED, REJECTED and ROLLED_BACK alike: the failed bundle's slot was deleted
        assert slots == {disk.active.slot} and disk.previous == []  # deleted from disk, not kept
    assert not any(device.config.work_dir.iterdir())


BAD_BUNDLES = [
    ("2.1.0", "FAILED", "golden vectors do not match"),
    ("2.2.0", "REJECTED", "needs"),
    ("2.3.0", "REJECTED", "built for ['riscv64']"),
    ("2.4.0", "FAILED", "cannot load"),
]


@pytest.mark.parametrize("version, final, words", BAD_BUNDLES)
def test_bad_bundle_leaves_the_running_model_serving(
    device: UpdateDriver, agent_repo: AgentRepo, version: str, final: str, words: str
) -> None:
    before = predict(device.serving, agent_repo.eval_x[:4])
    record = install(device, agent_repo.export(version))
    assert record.state == final and words in record.reason, record.reason
    assert device.serving.current.version == "1.0.0"
    np.testing.assert_array_equal(predict(device.serving, agent_repo.eval_x[:4]), before)
    assert StateStore(device.config.state_file).load().active.version == "1.0.0"
    assert len(list(device.config.slots_dir.iterdir())) == 1


def test_tampered_package_is_rejected(
    device: UpdateDriver, agent_repo: AgentRepo, tmp_path: Path
) -> None:
    bad = tamper_package(agent_repo.export("2.0.0"), tmp_path / "tampered.package")
    record = install(device, bad)
    assert record.state == "REJECTED" and "sha256" in record.reason, record.reason
    assert device.serving.current.version == "1.0.0"


def test_replayed_older_package_is_rejected(device: UpdateDriver, agent_repo: AgentRepo) -> None:
    old = agent_repo.export("2.0.0")  # lower sequence
    newer = agent_repo.export("3.0.0")
    assert install(device, newer).state == "COMMITTED"
    record = install(device, old)
    assert record.state == "REJECTED" and "replayed" in record.reason, record.reason
    assert device.serving.current.version == "3.0.0"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"fleet": "other-fleet"}, "fleet"),
        (
            {
                "now": dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3),
                "expires_in": dt.timedelta(days=1),
            },
            "expired",
        ),
    ],
)
def test_director_document_for_another_fleet_or_expired_is_rejected(
    device: UpdateDriver, agent_repo: AgentRepo, kwargs: dict, words: str
) -> None:
    record = install(device, agent_repo.export("2.0.0", **kwargs))
    assert record.state == "REJECTED" and words in record.reason, record.reason
    assert device.serving.current.version == "1.0.0"


def test_package_signed_by_another_repository_is_rejected(
    device: UpdateDriver, agent_repo: AgentRepo, tmp_path: Path
) -> None:
    from agent_fixtures import PASSPHRASE

    from edgeship.ota.bundle_build import build_bundle
    from edgeship.ota.release import ReleaseRepository

    rogue = ReleaseRepository(tmp_path / "rogue")
    rogue.init(root_passphrase=PASSPHRASE)
    build_bundle(agent_repo.int8, name="digits", version="9.0.0", out=tmp_path / "b.bundle")
    rogue.publish(tmp_path / "b.bundle")
    rogue.export("digits", "9.0.0", tmp_path / "rogue.package", fleet="lab")
    record = install(device, tmp_path / "rogue.package")
    assert record.state == "REJECTED" and "director key" in record.reason, record.reason
    assert device.serving.current.version == "1.0.0"


def test_insufficient_disk_is_named(
    device: UpdateDriver, agent_repo: AgentRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeship.agent import updater

    monkeypatch.setattr(
        updater, "free_bytes", lambda folder: 1000
    )  # a full disk, as statvfs would say
    record = install(device, agent_repo.export("2.0.0"))
    assert record.state == "FAILED" and record.reason.startswith("insufficient disk: need ")
    assert "free 1000 bytes" in record.reason


def break_runtime(model) -> None:  # type: ignore[no-untyped-def]
    """Make every call into ``model``'s runtime raise, wherever the request path looks it
    up (the runner's ``run`` and the bound copy the serving layer may keep)."""

    def broken(inputs):  # type: ignore[no-untyped-def]
        raise RuntimeError("interpreter crashed (injected)")

    model.runner.run = broken
    if hasattr(model, "run"):
        model.run = broken


def test_probation_rolls_back_a_model_that_fails_requests(
    device: UpdateDriver, agent_repo: AgentRepo
) -> None:
    """Requests during probation fail in the runtime (a broken interpreter); the driver rolls back by itself."""
    import threading

    device.config = device.config.__class__(**{**device.config.__dict__, "probation_window_s": 5.0})
    done = threading.Event()

    def traffic() -> None:
        while not done.is_set():
            current = device.serving.current
            if current is not None and current.version == "2.0.0":
                break_runtime(current)  # the new model's runtime breaks on every call
            try:
                predict(device.serving, agent_repo.eval_x[:1])
            except (RuntimeError, EdgeshipError):  # the broken runtime's injected failure: counted by the serving layer
                continue

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        record = install(device, agent_repo.export("2.0.0"))
    finally:
        done.set()
        thread.join()
    assert record.state == "ROLLED_BACK" and "error rate" in record.reason, record.reason
    assert device.serving.current.version == "1.0.0"
    disk = StateStore(device.config.state_file).load()
    # the failed bundle's slot is deleted from disk, not kept as a previous one
    assert {p.name for p in device.config.slots_dir.iterdir()} == {disk.active.slot} and disk.previous == []


def test_operator_rollback_of_a_committed_update_goes_through_the_machine(
    device: UpdateDriver, agent_repo: AgentRepo
) -> None:
    assert install(device, agent_repo.export("2.0.0")).state == "COMMITTED"
    previous = device.state.previous[0]
    device.begin(SlotSource(previous), kind="rollback")
    record = device.run()
    assert record.state == "COMMITTED" and record.kind == "rollback"
    assert "golden vectors match" in " ".join(h[2] for h in record.history)  # self-tested again
    assert device.serving.current.version == "1.0.0"
    assert [b.version for b in device.state.previous] == ["2.0.0"]


def test_kept_bundle_modified_on_disk_is_refused_for_rollback(
    device: UpdateDriver, agent_repo: AgentRepo
) -> None:
    assert install(device, agent_repo.export("2.0.0")).state == "COMMITTED"
    previous = device.state.previous[0]
    model = device.config.slots_dir / previous.slot / previous.model_file
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    device.begin(SlotSource(previous), kind="rollback")
    record = device.run()
    assert record.state == "FAILED" and "changed on disk" in record.reason
    assert device.serving.current.version == "2.0.0"


def test_one_update_at_a_time(device: UpdateDriver, agent_repo: AgentRepo) -> None:
    device.begin(OfflinePackageSource(agent_repo.export("2.0.0")))
    with pytest.raises(UpdateInProgressError, match="in progress"):
        device.begin(OfflinePackageSource(agent_repo.export("3.0.0")))
    assert device.run().state == "COMMITTED"


def test_retention_keeps_the_configured_number(tmp_path: Path, agent_repo: AgentRepo) -> None:
    config = agent_config(tmp_path, agent_repo, probation_window_s=0.05, keep_previous=1)
    driver = UpdateDriver(config, serving=ServingModel())
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        assert install(driver, agent_repo.export(version)).state == "COMMITTED"
    assert [b.version for b in driver.state.previous] == ["2.0.0"]
    assert len(list(config.slots_dir.iterdir())) == 2


def test_crash_loop_in_probation_rolls_back_before_loading_the_model(
    device: UpdateDriver, agent_repo: AgentRepo
) -> None:
    """Restarts in PROBATION are counted before anything loads; past the cap it rolls back."""
    device.hooks = FaultHooks(inject=lambda s: None)
    device.begin(OfflinePackageSource(agent_repo.export("2.0.0")))
    device.run(stop_at_probation=True)
    assert device.state.update.state == "PROBATION"
    for restart in range(device.config.max_reentries + 1):
        restarted = UpdateDriver(device.config, serving=ServingModel())
        restarted.prepare_resume()
        state = restarted.state.update.state
        if restart < device.config.max_reentries:
            assert state == "PROBATION" and restarted.boot_bundle().version == "2.0.0"
    assert state == "ROLLING_BACK"
    assert (
        restarted.boot_bundle().version == "1.0.0"
    )  # served at boot instead of the crashing model
    record = restarted.run()
    assert record.state == "ROLLED_BACK" and "interrupted" in " ".join(h[2] for h in record.history)
    assert json.loads(device.config.state_file.read_text())["active"]["version"] == "1.0.0"
    assert DEVICE


def _linear_onnx(path: Path) -> Path:
    """A small real ONNX model (64 -> 10 softmax), built with onnx.helper."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(64, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnx_bundle_runs_on_onnx_runtime(device: UpdateDriver, agent_repo: AgentRepo, tmp_path: Path) -> None:
    """The runtime is chosen by the bundle's format: an .onnx bundle replaces a .tflite one."""
    pytest.importorskip("onnxruntime")
    from edgeship.agent.runtimes import open_model
    from edgeship.ota.bundle_build import build_bundle
    from edgeship.ota.golden import GoldenVectors

    model = _linear_onnx(tmp_path / "linear.onnx")
    x = agent_repo.eval_x.reshape(len(agent_repo.eval_x), -1)
    with open_model(model) as runner:
        (y,) = runner.run([x])
    GoldenVectors(("x",), (x,), ("probs",), (y,), atol=1e-5).save(tmp_path / "golden.npz")
    build_bundle(model, name="linear", version="1.0.0", out=tmp_path / "linear.bundle", golden=tmp_path / "golden.npz")
    agent_repo.repo.publish(tmp_path / "linear.bundle")
    record = install(device, agent_repo.export("1.0.0", name="linear"))
    assert record.state == "COMMITTED", record.reason
    assert device.serving.current.runner.runtime == "onnxruntime" and device.serving.current.name == "linear"
    np.testing.assert_allclose(predict(device.serving, x[:3]), y[:3], atol=1e-6)


@pytest.mark.parametrize("member", ["../escaped.txt", "targets/../../escaped.txt", "/abs/escaped.txt"])
def test_hostile_offline_package_is_rejected_and_writes_nothing_outside(
    device: UpdateDriver, agent_repo: AgentRepo, tmp_path: Path, member: str
) -> None:
    import io
    import tarfile

    good = agent_repo.export("2.0.0")
    hostile = tmp_path / "hostile.package"
    with tarfile.open(good) as src, tarfile.open(hostile, "w", format=tarfile.GNU_FORMAT) as dst:
        for info in src.getmembers():
            dst.addfile(info, src.extractfile(info))
        evil = tarfile.TarInfo(member)
        evil.size = 5
        dst.addfile(evil, io.BytesIO(b"owned"))
    record = install(device, hostile)
    assert record.state == "REJECTED", record.reason
    assert device.serving.current.version == "1.0.0"
    data = device.config.data_dir
    assert not list(data.parent.rglob("escaped.txt")) and not Path("/abs/escaped.txt").exists()
    assert not any(device.config.work_dir.iterdir())


def _publish_with_requirements(agent_repo: AgentRepo, tmp_path: Path, name: str, requirements: dict) -> Path:
    """A real digits bundle whose manifest states ``requirements``, published and exported."""
    from edgeship.agent.runtimes import open_model
    from edgeship.ota.bundle_build import build_bundle

    with open_model(agent_repo.fp32, prefer=["litert"]) as runner:
        signature = runner.signature.to_dict()
    out = tmp_path / f"{name}.bundle"
    build_bundle(agent_repo.fp32, name=name, version="1.0.0", out=out,
                 report={"signature": signature, "runtime_requirements": requirements})
    agent_repo.repo.publish(out)
    return agent_repo.export("1.0.0", name=name)


def test_tflite_min_version_is_not_compared_with_litert_numbering(
    device: UpdateDriver, agent_repo: AgentRepo, tmp_path: Path
) -> None:
    """A dynamic-range model from TF's converter states TF Lite 2.17.0; LiteRT 2.x runs it
    (its own version numbers are not TensorFlow's), so it must not be REJECTED."""
    pytest.importorskip("ai_edge_litert")
    package = _publish_with_requirements(agent_repo, tmp_path, "digitsmin", {"min_version": "2.17.0"})
    record = install(device, package)
    assert record.state == "COMMITTED", record.reason
    assert device.serving.current.runner.runtime == "litert"


def test_bundle_for_full_tensorflow_only_is_rejected_without_it(
    tmp_path: Path, agent_repo: AgentRepo
) -> None:
    """A SELECT_TF_OPS model names only ``tensorflow``; a device configured without it
    REJECTS the bundle (not FAILED after LiteRT cannot load it)."""
    config = agent_config(tmp_path, agent_repo, probation_window_s=0.05, runtime_prefer=("litert", "tflite_runtime"))
    driver = UpdateDriver(config, serving=ServingModel())
    package = _publish_with_requirements(agent_repo, tmp_path, "digitsflex", {"runtimes": ["tensorflow"]})
    record = install(driver, package)
    assert record.state == "REJECTED" and "tensorflow" in record.reason, record.reason
    assert driver.serving.current is None
    assert not config.slots_dir.exists() or not any(config.slots_dir.iterdir())


def test_reinstalling_a_kept_version_keeps_no_duplicate(device: UpdateDriver, agent_repo: AgentRepo) -> None:
    """1.0.0 -> 2.0.0 -> rollback to 1.0.0 -> 2.0.0 again: the old copy of 2.0.0 is not kept
    beside the active 2.0.0 (useless as a rollback target, and it would push out 1.0.0)."""
    assert install(device, agent_repo.export("2.0.0")).state == "COMMITTED"
    device.begin(SlotSource(device.state.previous[0]), kind="rollback")
    assert device.run().state == "COMMITTED" and device.serving.current.version == "1.0.0"
    assert install(device, agent_repo.export("2.0.0")).state == "COMMITTED"
    disk = StateStore(device.config.state_file).load()
    assert disk.active.version == "2.0.0" and [b.version for b in disk.previous] == ["1.0.0"]
    assert {p.name for p in device.config.slots_dir.iterdir()} == {disk.active.slot, disk.previous[0].slot}


def test_offline_package_is_not_unpacked_onto_a_full_disk(
    device: UpdateDriver, agent_repo: AgentRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The package is unpacked (1x), its bundle downloaded (2x) and extracted (3x): the space
    is checked before the first copy, with the same clear message."""
    from edgeship.agent import sources

    package = agent_repo.export("2.0.0")
    size = package.stat().st_size
    monkeypatch.setattr(sources, "free_bytes", lambda folder: size * 2)  # enough for 2x, not 3x
    record = install(device, package)
    assert record.state == "FAILED" and record.reason.startswith("insufficient disk: need "), record.reason
    assert f"free {size * 2} bytes" in record.reason and "offline package" in record.reason
    assert device.serving.current.version == "1.0.0"
    assert not any(device.config.work_dir.iterdir())


def test_a_state_file_with_a_duplicate_kept_version_heals(device: UpdateDriver, agent_repo: AgentRepo) -> None:
    """A state written before duplicates were dropped (active 2.0.0, kept [1.0.0, older 2.0.0
    copy]): rolling back to 1.0.0 keeps 2.0.0 once."""
    import dataclasses

    assert install(device, agent_repo.export("2.0.0")).state == "COMMITTED"
    stale = dataclasses.replace(device.state.active, slot="digits-2.0.0-stalecopy")
    (device.config.slots_dir / stale.slot).mkdir()
    device.state.previous.append(stale)
    device.store.save(device.state)
    device.begin(SlotSource(device.state.previous[0]), kind="rollback")
    assert device.run().state == "COMMITTED"
    disk = StateStore(device.config.state_file).load()
    assert disk.active.version == "1.0.0" and [b.version for b in disk.previous] == ["2.0.0"]
    assert not (device.config.slots_dir / stale.slot).exists()
