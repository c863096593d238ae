"""The director's pure checks, table by table: envelopes in, a DesiredState or one exception out;
and the mapping of python-tuf's exceptions onto edgeship's."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api import exceptions as tuf_exceptions

from edgeship.ota import director as d
from edgeship.ota import updater as u
from edgeship.ota.errors import BadInputError

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)
KEY = Ed25519PrivateKey.generate()


def state(**changes: Any) -> d.DesiredState:
    fields: dict[str, Any] = dict(
        fleet="plant", device="dev-1", bundle="digits", version="1.4.0", target="digits/digits-1.4.0.bundle",
        length=52736, hashes={"sha256": "ab" * 32}, sequence=10, expires=NOW + dt.timedelta(hours=1),
        issued=NOW, deployment="dep-1", rollout=None, action="install",
    )
    fields.update(changes)
    return d.DesiredState(**fields)


def signed(**changes: Any) -> dict:
    return d.sign_desired_state(state(**changes), KEY)


def resign(envelope: dict, mutate: Callable[[dict], None]) -> dict:
    """Change the signed document and sign it again with the trusted key (shape tests)."""
    doc = copy.deepcopy(envelope["signed"])
    mutate(doc)
    sig = KEY.sign(d.canonical_json(doc)).hex()
    return {"signed": doc, "signatures": [{"keyid": d.director_key_id(KEY.public_key()), "sig": sig}]}


def verify(envelope: Any, last: int | None = 9, now: dt.datetime = NOW, device: str = "dev-1") -> d.DesiredState:
    return d.verify_desired_state(envelope, KEY.public_key(), device=device, fleet="plant", last_sequence=last,
                                  now=now)


def test_round_trip() -> None:
    result = verify(signed())
    assert result == state()
    assert result.sha256 == "ab" * 32


@pytest.mark.parametrize("last,sequence,ok", [
    (None, 1, True),   # a device that never accepted anything
    (9, 10, True),
    (10, 10, True),    # the same document delivered again
    (11, 10, False),   # a replay
    (1000, 10, False),
])
def test_sequence_table(last: int | None, sequence: int, ok: bool) -> None:
    envelope = signed(sequence=sequence)
    if ok:
        assert verify(envelope, last=last).sequence == sequence
    else:
        with pytest.raises(d.ReplayedDesiredStateError, match=f"sequence {sequence}, lower than {last}"):
            verify(envelope, last=last)


@pytest.mark.parametrize("offset,ok", [(-3600, True), (3599, True), (3600, False), (86400, False)])
def test_expiry_table(offset: int, ok: bool) -> None:
    now = NOW + dt.timedelta(seconds=offset)
    if ok:
        verify(signed(), now=now)
    else:
        with pytest.raises(d.ExpiredDesiredStateError, match="expired at 2026-11-23T13:00:00Z"):
            verify(signed(), now=now)


@pytest.mark.parametrize("target_device,ok", [("dev-1", True), ("*", True), ("dev-2", False), ("DEV-1", False)])
def test_device_table(target_device: str, ok: bool) -> None:
    if ok:
        verify(signed(device=target_device))
    else:
        with pytest.raises(d.WrongDeviceError):
            verify(signed(device=target_device))


MALFORMED: dict[str, Any] = {
    "not an object": (lambda: ["signed"], d.MalformedDesiredStateError, "no 'signed' object"),
    "no signatures": (lambda: {"signed": signed()["signed"], "signatures": []}, d.MalformedDesiredStateError,
                      "unsigned"),
    "signature not hex": (lambda: {"signed": signed()["signed"], "signatures": [
        {"keyid": d.director_key_id(KEY.public_key()), "sig": "zz"}]}, d.DirectorSignatureError, "does not verify"),
    "other type": (lambda: resign(signed(), lambda s: s.update(_type="tuf-targets")), d.MalformedDesiredStateError,
                   "_type is 'tuf-targets'"),
    "newer schema": (lambda: resign(signed(), lambda s: s.update(schema=3)), d.MalformedDesiredStateError,
                     "schema 3 is not supported"),
    "bad action": (lambda: resign(signed(), lambda s: s.update(action="wipe")), d.MalformedDesiredStateError,
                   "action 'wipe'"),
    "no sha256": (lambda: resign(signed(), lambda s: s.update(hashes={"md5": "00"})), d.MalformedDesiredStateError,
                  "sha256 included"),
    "negative length": (lambda: resign(signed(), lambda s: s.update(length=-1)), d.MalformedDesiredStateError,
                        "'length' must be a non-negative integer"),
    "bad time": (lambda: resign(signed(), lambda s: s.update(expires="tomorrow")), d.MalformedDesiredStateError,
                 "not a UTC time"),
    "bundle name with a path": (lambda: resign(signed(), lambda s: s.update(bundle="../../var/lib/edgeship")),
                                d.MalformedDesiredStateError, "bundle name"),
    "version not a version": (lambda: resign(signed(), lambda s: s.update(version="1.0/../../x")),
                              d.MalformedDesiredStateError, "is not a version"),
    "hash with a newline": (lambda: resign(signed(), lambda s: s.update(hashes={"sha256": "ab" * 32 + "\n"})),
                            d.MalformedDesiredStateError, "sha256 included"),
    "float inside": (lambda: {"signed": dict(signed()["signed"], length=1.5), "signatures": signed()["signatures"]},
                     d.MalformedDesiredStateError, "cannot be canonicalised"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_envelopes(case: str) -> None:
    build, error, message = MALFORMED[case]
    with pytest.raises(error, match=message):
        verify(build())


def test_unknown_fields_are_kept_and_signed() -> None:
    envelope = resign(signed(), lambda s: s.update(note="canary"))
    assert verify(envelope).extra == {"note": "canary"}
    assert d.sign_desired_state(verify(envelope), KEY)["signed"]["note"] == "canary"


def test_naive_clock_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(signed(), now=NOW.replace(tzinfo=None))


def test_key_files(tmp_path: Path) -> None:
    key_id = d.generate_director_key(tmp_path / "k", tmp_path / "k.pub")
    private = d.load_director_private_key(tmp_path / "k")
    public = d.load_director_public_key(tmp_path / "k.pub")
    assert d.director_key_id(public) == key_id == d.director_key_id(private.public_key())
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert d.load_director_public_key((tmp_path / "k.pub").read_bytes()) is not None
    with pytest.raises(BadInputError, match="not a PEM public key"):
        d.load_director_public_key(tmp_path / "k")


@pytest.mark.parametrize("exc,expected", [
    (tuf_exceptions.UnsignedMetadataError("timestamp was signed by 0/1 keys"), u.UntrustedMetadataError),
    (tuf_exceptions.ExpiredMetadataError("timestamp.json is expired"), u.MetadataExpiredError),
    (tuf_exceptions.BadVersionNumberError("New timestamp version 1 must be >= 3"), u.MetadataRollbackError),
    (tuf_exceptions.BadVersionNumberError("New snapshot version must be >= 3, got version 1"), u.MetadataRollbackError),
    (tuf_exceptions.BadVersionNumberError("Expected targets.json version 1, got 3."), u.MetadataRollbackError),
    (tuf_exceptions.BadVersionNumberError("Expected snapshot version 3, got 1"), u.MixedMetadataError),
    (tuf_exceptions.BadVersionNumberError("Expected targets v3, got v2."), u.MixedMetadataError),
    (tuf_exceptions.BadVersionNumberError("Expected root version 2 instead got version 5"), u.MixedMetadataError),
    (tuf_exceptions.RepositoryError("Expected 'timestamp', got 'snapshot'"), u.BadMetadataError),
    (tuf_exceptions.DownloadLengthMismatchError("Downloaded 20000 bytes exceeding"), u.MetadataTooLargeError),
    (tuf_exceptions.DownloadHTTPError("not found", 404), u.FetchError),
    (tuf_exceptions.DownloadError("Failed to download"), u.FetchError),
])
def test_tuf_errors_map_to_their_own_types(exc: Exception, expected: type[Exception]) -> None:
    mapped = u.map_tuf_error(exc)
    assert type(mapped) is expected
    assert str(exc) in mapped.message


# -- schema 2: the full set of models a device serves ----------------------------------------------
def entry(**changes: Any) -> d.ModelEntry:
    fields: dict[str, Any] = dict(bundle="digits", version="1.4.0", target="digits/digits-1.4.0.bundle",
                                  length=52736, hashes={"sha256": "ab" * 32}, serving_version=7)
    fields.update(changes)
    return d.ModelEntry(**fields)


def signed2(models: dict[str, d.ModelEntry], sequence: int = 10) -> dict:
    state2 = d.DesiredState.for_models(fleet="plant", device="dev-1", models=models, sequence=sequence,
                                       expires=NOW + dt.timedelta(hours=1), issued=NOW)
    return d.sign_desired_state(state2, KEY)


def test_schema2_round_trips_every_model_entry() -> None:
    models = {"digits": entry(), "wake": entry(bundle="wake", version="2.0.0", target="wake/wake-2.0.0.bundle",
                                               serving_version=None, rollout="canary", deployment="dep-9")}
    envelope = signed2(models)
    assert envelope["signed"]["schema"] == 2 and "bundle" not in envelope["signed"]
    got = verify(envelope)
    assert got.schema2 and got.models() == models
    assert got.for_model("wake").bundle == "wake" and got.for_model("wake").sequence == 10
    with pytest.raises(d.MalformedDesiredStateError, match="names no model 'other'"):
        got.for_model("other")


def test_schema2_with_no_models_means_remove_all() -> None:
    got = verify(signed2({}))
    assert got.schema2 and got.models() == {}


def test_schema1_reads_as_its_one_model_and_leaves_the_others_alone() -> None:
    got = verify(signed())
    assert not got.schema2
    assert got.models() == {"digits": entry(serving_version=None, deployment="dep-1")}
    carried = verify(resign(signed(), lambda s: s.update(serving_version=4)))
    assert carried.models()["digits"].serving_version == 4


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda s: s.update(models=[]), "'models' must be an object"),
    (lambda s: s["models"].update({"../x": s["models"]["digits"]}), "model"),
    (lambda s: s["models"]["digits"].update(hashes={}), "model 'digits': 'hashes'"),
    (lambda s: s["models"]["digits"].update(serving_version=-1), "'serving_version' must be a non-negative"),
    (lambda s: s["models"]["digits"].update(serving_version=True), "'serving_version' must be a non-negative"),
    (lambda s: s["models"]["digits"].update(action="wipe"), "action 'wipe'"),
    (lambda s: s["models"]["digits"].update(version="../1"), "model 'digits'"),
])
def test_schema2_malformed_entries_are_refused(mutate: Callable[[dict], None], message: str) -> None:
    with pytest.raises(d.MalformedDesiredStateError, match=message):
        verify(resign(signed2({"digits": entry()}), mutate))
