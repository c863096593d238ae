"""The one path by which a desired state reaches a device: build, sign, publish (retained, QoS 1),
record in the store.

A change names one model's entry; the document carries the device's whole desired set: the
store's current set with that entry replaced (``fleet_rules.next_desired_set``). Which form the
device gets follows what its agent reports (``fleet_rules.document_schema``): schema 2 (every
model) to a multi-model agent, schema 1 (today's single bundle) to an agent of one model while
its set holds one model; a second model name for such an agent is refused with the reason.

Everything that changes what a device must run goes through :meth:`DesiredPublisher.publish`:
the outbox's assignments and rollbacks (rollouts, A/B tests, ``deploy``) and the re-issue of
documents before they expire. A document is recorded in the store only once the broker has
acknowledged it, so the store never claims a device was told something it was not.
"""

from __future__ import annotations

__all__ = [
    "DesiredChange",
    "DesiredPublisher",
    "PublishOutcome",
    "build_desired_state",
    "build_schema2_document",
    "sign_document",
]

import datetime as _dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeship.ota.desired_sets import ModelEntry, build_desired_set, sign_document
from edgeship.ota.director import DesiredState, sign_desired_state
from edgeship.ota.errors import EdgeshipError
from edgeship.ota.protocol import DesiredMessage, encode_message
from edgeship.ota.release import TargetInfo
from edgeship.ota.topics import DESIRED, device_topic
from edgeship.ota.transport import MqttConnection, TransportError
from edgeship.toolkit.fleet_rules import DesiredModel, document_schema, next_desired_set
from edgeship.toolkit.store import FleetStore

log = logging.getLogger(__name__)


def build_desired_state(*, fleet: str, device: str, target: TargetInfo, sequence: int, now: float,
                        expires_in_s: float, action: str, rollout: str | None = None,
                        deployment: str | None = None) -> DesiredState:
    """The director's document for one device: the bundle's TUF target, length and hashes from the
    release repository, so the device's two checks (director and TUF) name the same bytes."""
    issued = _dt.datetime.fromtimestamp(int(now), _dt.timezone.utc)
    return DesiredState(fleet=fleet, device=device, bundle=target.name, version=target.version, target=target.path,
                        length=target.length, hashes=dict(target.hashes), sequence=sequence,
                        expires=issued + _dt.timedelta(seconds=int(expires_in_s)), issued=issued,
                        deployment=deployment, rollout=rollout, action=action)


def build_schema2_document(*, fleet: str, device: str, sequence: int, now: float, expires_in_s: float,
                           models: Mapping[str, tuple[DesiredModel, TargetInfo]]) -> dict[str, Any]:
    """The director's schema-2 document (the signed part) for a device's desired set: each model
    with its bundle's TUF target, length and hashes and its serving version (the entry's, else the
    signed target's)."""
    issued = _dt.datetime.fromtimestamp(int(now), _dt.timezone.utc)
    return build_desired_set(
        fleet=fleet, device=device, sequence=sequence, issued=issued,
        expires=issued + _dt.timedelta(seconds=int(expires_in_s)),
        models={name: ModelEntry(bundle=target.name, version=target.version, target=target.path,
                                 length=target.length, hashes=target.hashes,
                                 serving_version=entry.serving_version if entry.serving_version is not None
                                 else target.serving_version,
                                 deployment=entry.deployment, rollout=entry.rollout_id, action=entry.action)
                for name, (entry, target) in models.items()})


@dataclass(frozen=True)
class DesiredChange:
    """What one device must be told: a model's bundle version, and why (which rollout, test, deploy).

    ``token`` is the caller's handle (an outbox entry id), returned with the outcome."""

    fleet: str
    device: str
    target: TargetInfo | None
    """The model's bundle to install or roll back to; None with ``action`` ``remove``."""
    action: str
    rollout_id: str | None = None
    abtest_id: str | None = None
    deployment: str | None = None
    token: Any = None
    model: str = ""
    """With ``remove``: the model name taken out of the device's set; with ``renew``: the model
    the renewed document last changed (kept in the store's history)."""
    model_version: str = ""
    renew: bool = False
    """Publish the device's current set again (a new sequence, a new expiry), changing nothing."""


@dataclass
class PublishOutcome:
    published: list[DesiredChange] = field(default_factory=list)
    unsent: list[DesiredChange] = field(default_factory=list)
    """Not acknowledged by the broker: try again later (nothing was recorded for them)."""
    refused: list[tuple[DesiredChange, str]] = field(default_factory=list)
    """Not sent, with the reason (an agent of one model given a second model, a model of the set
    that is no longer published): the device keeps its current document."""


class DesiredPublisher:
    """Signs and publishes desired states and records them (see the module docstring).

    Args:
        connection: the controller's broker connection.
        store: where published documents are recorded.
        next_sequence: the fleet's director counter (one number per call; it only grows).
        signing_key: returns the director's private key (re-read when it was rotated).
        target_info: the release repository's ``target_info(name, version)`` (the other models of
            a schema-2 document are looked up there).
    """

    def __init__(self, connection: MqttConnection, store: FleetStore, *, next_sequence: Callable[[str], int],
                 signing_key: Callable[[], Any], prefix: str, expires_s: float,
                 target_info: Callable[[str, str], TargetInfo], ack_timeout_s: float = 15.0) -> None:
        self.connection, self.store, self.target_info = connection, store, target_info
        self.next_sequence, self.signing_key = next_sequence, signing_key
        self.prefix, self.expires_s, self.ack_timeout_s = prefix, expires_s, ack_timeout_s

    def publish(self, changes: Sequence[DesiredChange], now: float) -> PublishOutcome:
        """Publish every change (all sent, then all acknowledged), record what the broker took.

        One number from the fleet's director counter serves the whole batch: a sequence must only
        grow per device, and every later number (a later batch, an offline package) is higher. A
        device met twice in one batch (an assignment, then its rollback) gets a fresh number. At
        the first publish the connection refuses, the rest of the batch is returned unsent.
        """
        outcome = PublishOutcome()
        if not changes:
            return outcome
        key = self.signing_key()
        devices = sorted({c.device for c in changes})
        current = self.store.desired_sets(devices)
        forms = self.store.device_forms(devices)
        sequences: dict[str, tuple[int, set[str]]] = {}
        looked_up: dict[tuple[str, str], TargetInfo] = {}  # the repository's metadata is read once per bundle

        def target_of(name: str, version: str) -> TargetInfo:
            if (name, version) not in looked_up:
                looked_up[(name, version)] = self.target_info(name, version)
            return looked_up[(name, version)]

        in_flight: list[tuple[DesiredChange, int, dict[str, DesiredModel], dict[str, Any], Any, tuple[str, str]]] = []
        for index, change in enumerate(changes):
            have = current.get(change.device, {})
            if change.renew:
                if not have:
                    outcome.refused.append((change, f"{change.device} has no desired model to renew"))
                    continue
                models, recorded = dict(have), (change.model, change.model_version)
            elif change.target is None:  # remove one model; the others stay
                if change.model not in have:
                    outcome.refused.append((change, f"{change.model} is not in the desired set of {change.device}"))
                    continue
                models = {n: m for n, m in have.items() if n != change.model}
                recorded = (change.model, have[change.model].version)
            else:
                models = next_desired_set(have, DesiredModel(
                    change.target.name, change.target.version, change.target.serving_version, change.action,
                    change.rollout_id, change.abtest_id, change.deployment))
                recorded = (change.target.name, change.target.version)
            multi, agent_version = forms.get(change.device, (False, None))
            schema, why = document_schema(models, multi_model_agent=multi, agent_version=agent_version,
                                          removing=change.target is None and not change.renew)
            if why is None:
                try:
                    targets = {name: (m, change.target if change.target is not None and name == change.target.name
                                      else target_of(m.name, m.version)) for name, m in models.items()}
                except EdgeshipError as exc:
                    why = f"the device's desired set cannot be signed: {exc.message}"
            if why is not None:
                outcome.refused.append((change, why))
                continue
            current_seq = sequences.get(change.fleet)
            if current_seq is None or change.device in current_seq[1]:
                current_seq = sequences[change.fleet] = (self.next_sequence(change.fleet), set())
            current_seq[1].add(change.device)
            sequence = current_seq[0]
            if schema == 2:
                envelope = sign_document(build_schema2_document(
                    fleet=change.fleet, device=change.device, sequence=sequence, now=now,
                    expires_in_s=self.expires_s, models=targets), key)
            else:  # one model: schema 1 names its entry
                (only, target), = targets.values()
                envelope = sign_desired_state(build_desired_state(
                    fleet=change.fleet, device=change.device, target=target, sequence=sequence, now=now,
                    expires_in_s=self.expires_s, action=only.action, rollout=only.rollout_id,
                    deployment=only.deployment), key)
            topic = device_topic(change.fleet, change.device, DESIRED, self.prefix)
            try:
                handle = self.connection.publish(topic, encode_message(DesiredMessage(envelope)), qos=1,
                                                 retain=True, wait=False)
            except TransportError as exc:
                log.warning("desired state for %s not published (%s); trying again later", change.device, exc)
                outcome.unsent.extend(changes[index:])
                break
            current[change.device] = models  # a second change of this device in the batch builds on this one
            in_flight.append((change, sequence, models, envelope, handle, recorded))
        for change, sequence, models, envelope, handle, (name, version) in in_flight:
            try:
                handle.wait(self.ack_timeout_s)
            except TransportError as exc:
                log.warning("desired state for %s not acknowledged (%s); trying again later", change.device, exc)
                outcome.unsent.append(change)
                continue
            self.store.record_desired(
                fleet=change.fleet, device=change.device, sequence=sequence, name=name,
                version=version, action=change.action, issued_at=now, expires_at=now + self.expires_s,
                rollout_id=change.rollout_id, abtest_id=change.abtest_id, deployment=change.deployment,
                envelope=envelope, models=models)
            outcome.published.append(change)
        return outcome
