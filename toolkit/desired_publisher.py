"""The one path by which a desired state reaches a device: build, sign, publish (retained, QoS 1),
record in the store.

Everything that changes what a device must run goes through :meth:`DesiredPublisher.publish`:
the outbox's assignments and rollbacks (rollouts, A/B tests, ``deploy``) and the re-issue of
documents before they expire. A document is recorded in the store only once the broker has
acknowledged it, so the store never claims a device was told something it was not.
"""

from __future__ import annotations

__all__ = ["DesiredChange", "DesiredPublisher", "PublishOutcome", "build_desired_state"]

import datetime as _dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeship.ota.director import DesiredState, sign_desired_state
from edgeship.ota.protocol import DesiredMessage, encode_message
from edgeship.ota.release import TargetInfo
from edgeship.ota.topics import DESIRED, device_topic
from edgeship.ota.transport import MqttConnection, TransportError
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


@dataclass(frozen=True)
class DesiredChange:
    """What one device must be told: a model's bundle version, and why (which rollout, test, deploy).

    ``token`` is the caller's handle (an outbox entry id), returned with the outcome."""

    fleet: str
    device: str
    target: TargetInfo
    action: str
    rollout_id: str | None = None
    abtest_id: str | None = None
    deployment: str | None = None
    token: Any = None


@dataclass
class PublishOutcome:
    published: list[DesiredChange] = field(default_factory=list)
    unsent: list[DesiredChange] = field(default_factory=list)
    """Not acknowledged by the broker: try again later (nothing was recorded for them)."""


class DesiredPublisher:
    """Signs and publishes desired states and records them (see the module docstring).

    Args:
        connection: the controller's broker connection.
        store: where published documents are recorded.
        next_sequence: the fleet's director counter (one number per call; it only grows).
        signing_key: returns the director's private key (re-read when it was rotated).
    """

    def __init__(self, connection: MqttConnection, store: FleetStore, *, next_sequence: Callable[[str], int],
                 signing_key: Callable[[], Any], prefix: str, expires_s: float, ack_timeout_s: float = 15.0) -> None:
        self.connection, self.store = connection, store
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
        sequences: dict[str, tuple[int, set[str]]] = {}
        in_flight: list[tuple[DesiredChange, DesiredState, dict[str, Any], Any]] = []
        for index, change in enumerate(changes):
            current = sequences.get(change.fleet)
            if current is None or change.device in current[1]:
                current = sequences[change.fleet] = (self.next_sequence(change.fleet), set())
            current[1].add(change.device)
            state = build_desired_state(fleet=change.fleet, device=change.device, target=change.target,
                                        sequence=current[0], now=now, expires_in_s=self.expires_s,
                                        action=change.action, rollout=change.rollout_id,
                                        deployment=change.deployment)
            envelope = sign_desired_state(state, key)
            topic = device_topic(change.fleet, change.device, DESIRED, self.prefix)
            try:
                handle = self.connection.publish(topic, encode_message(DesiredMessage(envelope)), qos=1,
                                                 retain=True, wait=False)
            except TransportError as exc:
                log.warning("desired state for %s not published (%s); trying again later", change.device, exc)
                outcome.unsent.extend(changes[index:])
                break
            in_flight.append((change, state, envelope, handle))
        for change, state, envelope, handle in in_flight:
            try:
                handle.wait(self.ack_timeout_s)
            except TransportError as exc:
                log.warning("desired state for %s not acknowledged (%s); trying again later", change.device, exc)
                outcome.unsent.append(change)
                continue
            self.store.record_desired(
                fleet=change.fleet, device=change.device, sequence=state.sequence, name=state.bundle,
                version=state.version, action=state.action, issued_at=now, expires_at=now + self.expires_s,
                rollout_id=change.rollout_id, abtest_id=change.abtest_id, deployment=change.deployment,
                envelope=envelope)
            outcome.published.append(change)
        return outcome
