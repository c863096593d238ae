"""The store's records of intent: desired states, rollouts, A/B tests and the outbox of actions
that must reach devices. A mixin of :class:`~edgeship.toolkit.store.FleetStore` (it needs the
store's engine and dialect helpers); the fleet rules it applies are pure functions
(:mod:`edgeship.toolkit.fleet_rules`)."""

from __future__ import annotations

__all__ = ["ConcurrentUpdateError", "DesiredRecord", "IntentRecords", "PendingAction"]

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from edgeship.ota.errors import BadInputError, EdgeshipError
from edgeship.toolkit.abtest import TelemetryWindow, plan_assignments
from edgeship.toolkit.fleet_rules import (
    DesiredModel,
    exclusion_conflict,
    next_desired_set,
)
from edgeship.toolkit.rollouts import (
    Action,
    AssignVersion,
    Decision,
    DeviceRecord,
    DeviceSnapshot,
    DeviceStatus,
    RemoveModel,
    RollbackDevice,
    Rollout,
    RolloutPolicy,
    RolloutState,
    action_from_dict,
    step,
)
from edgeship.toolkit.store_abtests import ABTestRecords
from edgeship.toolkit.store_schema import (
    LIVE_ROLLOUT_STATES,
    abtests,
    desired_models,
    desired_sequences,
    desired_states,
    json_value,
    outbox,
    rollout_devices,
    rollout_log,
    rollouts,
)


class ConcurrentUpdateError(EdgeshipError):
    """The rollout changed since it was read (another writer saved first); read it again and retry."""


# -- values the store hands out -------------------------------------------------------------------


@dataclass(frozen=True)
class DesiredRecord:
    device: str
    fleet: str
    sequence: int
    name: str
    version: str
    action: str
    rollout_id: str | None
    abtest_id: str | None
    deployment: str | None
    issued_at: float
    expires_at: float | None
    envelope: dict[str, Any] | None


@dataclass(frozen=True)
class PendingAction:
    """An outbox entry: an action that must reach a device, in the order it was decided."""

    id: int
    fleet: str
    rollout_id: str | None
    abtest_id: str | None
    action: Action
    created_at: float




class IntentRecords(ABTestRecords):
    """Desired states, rollouts, A/B tests, the outbox (see the module docstring)."""

    engine: Engine

    def _insert(self, table: sa.Table) -> Any:
        raise NotImplementedError  # FleetStore's

    def list_devices(self, fleet: str | None = None, selection: Sequence[tuple[str, str]] = ()) -> list[Any]:
        raise NotImplementedError  # FleetStore's

    def fleet_snapshot(self, fleet: str, selection: Sequence[tuple[str, str]] = (),
                       telemetry_since: float | None = None, model: str | None = None) -> list[DeviceSnapshot]:
        raise NotImplementedError  # FleetStore's

    def telemetry_windows(self, fleet: str, selection: Sequence[tuple[str, str]] = (),
                          since: float = 0.0) -> list[TelemetryWindow]:
        raise NotImplementedError  # FleetStore's

    # -- desired states -----------------------------------------------------------------------

    def next_desired_sequence(self, device: str) -> int:
        """Atomically allocate the device's next desired-state sequence number (1, 2, ...)."""
        statement = (self._insert(desired_sequences).values(device_id=device, last_sequence=1)
                     .on_conflict_do_update(index_elements=["device_id"],
                                            set_={"last_sequence": desired_sequences.c.last_sequence + 1})
                     .returning(desired_sequences.c.last_sequence))
        with self.engine.begin() as conn:
            return int(conn.execute(statement).scalar_one())

    def record_desired(self, *, fleet: str, device: str, sequence: int, name: str, version: str,
                       action: str = "install", issued_at: float, expires_at: float | None = None,
                       rollout_id: str | None = None, abtest_id: str | None = None,
                       deployment: str | None = None, envelope: dict[str, Any] | None = None,
                       models: Mapping[str, DesiredModel] | None = None) -> None:
        """Keep the desired state the controller signed and published (its history too).

        ``name``/``version`` is the entry that changed (``remove``: the entry taken out); ``models``
        the device's whole desired set the document carried (None: the current set with that entry
        replaced, or without it)."""
        if action not in ("install", "rollback", "remove"):
            raise BadInputError(f"desired action {action!r} must be install, rollback or remove")
        with self.engine.begin() as conn:
            conn.execute(sa.insert(desired_states).values(
                device_id=device, fleet=fleet, sequence=sequence, name=name, version=version, action=action,
                rollout_id=rollout_id, abtest_id=abtest_id, deployment=deployment, issued_at=issued_at,
                expires_at=expires_at, envelope=envelope))
            if models is None and action == "remove":
                models = {n: m for n, m in self._desired_set(conn, device).items() if n != name}
            elif models is None:
                models = next_desired_set(self._desired_set(conn, device), DesiredModel(
                    name, version, None, action, rollout_id, abtest_id, deployment))
            conn.execute(sa.delete(desired_models).where(desired_models.c.device_id == device))
            if models:
                conn.execute(sa.insert(desired_models), [
                    {"device_id": device, "model": m.name, "fleet": fleet, "version": m.version,
                     "serving_version": m.serving_version, "action": m.action, "rollout_id": m.rollout_id,
                     "abtest_id": m.abtest_id, "deployment": m.deployment, "sequence": sequence,
                     "updated_at": issued_at} for m in models.values()])

    def serving_version_of(self, fleet: str, name: str, version: str) -> int | None:
        """The serving version the desired states of ``fleet`` give model ``name`` at ``version``
        (copied from the release repository's signed target at publish); None: none given yet."""
        query = sa.select(sa.func.max(desired_models.c.serving_version)).where(
            desired_models.c.fleet == fleet, desired_models.c.model == name, desired_models.c.version == version)
        with self.engine.connect() as conn:
            value = conn.execute(query).scalar()
        return None if value is None else int(value)

    def desired_set(self, device: str) -> dict[str, DesiredModel]:
        """The device's current desired set: model name -> entry (empty: nothing desired yet)."""
        with self.engine.connect() as conn:
            return self._desired_set(conn, device)

    def desired_sets(self, ids: Sequence[str]) -> dict[str, dict[str, DesiredModel]]:
        """:meth:`desired_set` of several devices at once."""
        found: dict[str, dict[str, DesiredModel]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                query = sa.select(desired_models).where(desired_models.c.device_id.in_(list(ids[start:start + 500])))
                for r in conn.execute(query).mappings():
                    found.setdefault(r["device_id"], {})[r["model"]] = self._desired_model(r)
        return found

    @staticmethod
    def _desired_model(r: Any) -> DesiredModel:
        return DesiredModel(r["model"], r["version"], r["serving_version"], r["action"], r["rollout_id"],
                            r["abtest_id"], r["deployment"])

    def _desired_set(self, conn: Connection, device: str) -> dict[str, DesiredModel]:
        query = sa.select(desired_models).where(desired_models.c.device_id == device).order_by(desired_models.c.model)
        return {r["model"]: self._desired_model(r) for r in conn.execute(query).mappings()}

    def desired_for(self, device: str) -> DesiredRecord | None:
        """The device's latest desired state (highest sequence), or None."""
        query = (sa.select(desired_states).where(desired_states.c.device_id == device)
                 .order_by(desired_states.c.sequence.desc()).limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else self._desired(row)

    def desired_map(self, fleet: str, names: Iterable[str] | None = None) -> dict[str, tuple[str, str]]:
        """Each device of ``fleet``: the (name, version) of its latest desired state; with ``names``,
        of its desired entry for one of those model names (devices with none are left out)."""
        if names is not None:
            query = (sa.select(desired_models.c.device_id, desired_models.c.model, desired_models.c.version)
                     .where(desired_models.c.fleet == fleet, desired_models.c.model.in_(list(names)))
                     .order_by(desired_models.c.device_id, desired_models.c.model))
            with self.engine.connect() as conn:
                found: dict[str, tuple[str, str]] = {}
                for d, n, v in conn.execute(query):
                    found.setdefault(d, (n, v))
                return found
        latest = (sa.select(desired_states.c.device_id, sa.func.max(desired_states.c.sequence).label("seq"))
                  .where(desired_states.c.fleet == fleet).group_by(desired_states.c.device_id).subquery())
        query = (sa.select(desired_states.c.device_id, desired_states.c.name, desired_states.c.version)
                 .join(latest, sa.and_(latest.c.device_id == desired_states.c.device_id,
                                       latest.c.seq == desired_states.c.sequence)))
        with self.engine.connect() as conn:
            return {d: (n, v) for d, n, v in conn.execute(query)}

    def expiring_desired(self, before: float, limit: int = 1000) -> list[DesiredRecord]:
        """Each device's latest desired state if it expires before ``before`` (the controller
        re-issues them so a device that was away long never finds only an expired document)."""
        latest = (sa.select(desired_states.c.device_id, sa.func.max(desired_states.c.sequence).label("seq"))
                  .group_by(desired_states.c.device_id).subquery())
        query = (sa.select(desired_states)
                 .join(latest, sa.and_(latest.c.device_id == desired_states.c.device_id,
                                       latest.c.seq == desired_states.c.sequence))
                 .where(desired_states.c.expires_at.is_not(None), desired_states.c.expires_at < before)
                 .order_by(desired_states.c.expires_at).limit(limit))
        with self.engine.connect() as conn:
            return [self._desired(row) for row in conn.execute(query).mappings()]

    @staticmethod
    def _desired(row: Any) -> DesiredRecord:
        return DesiredRecord(row["device_id"], row["fleet"], int(row["sequence"]), row["name"], row["version"],
                             row["action"], row["rollout_id"], row["abtest_id"], row["deployment"],
                             row["issued_at"], row["expires_at"], row["envelope"])

    # -- rollouts -----------------------------------------------------------------------------

    def create_rollout(self, rollout: Rollout, promote_abtest: str | None = None) -> None:
        """Store a new rollout. Refused while another rollout of the same bundle on the fleet is
        RUNNING or PAUSED, or a RUNNING A/B test there has an arm of that bundle (other than
        ``promote_abtest``, which this rollout promotes: it is marked PROMOTED in the same
        transaction). COMPLETED rollouts of the same bundle are marked superseded (they stop
        giving their version to devices that join later)."""
        with self.engine.begin() as conn:
            testing = self._live_abtests(conn, rollout.fleet, {rollout.name})
            reason = exclusion_conflict("rollout", {rollout.name}, rollout.fleet,
                                        self._live_rollouts(conn, rollout.fleet, {rollout.name}) + testing,
                                        promoting=promote_abtest)
            if reason is not None:
                raise BadInputError(reason)
            if promote_abtest is not None:
                if promote_abtest not in {t.id for t in testing}:
                    raise BadInputError(f"A/B test {promote_abtest} is not a RUNNING test of {rollout.name} "
                                        f"on fleet {rollout.fleet}")
                conn.execute(sa.update(abtests).where(abtests.c.id == promote_abtest).values(
                    state="PROMOTED", updated_at=rollout.created_at, promoted_rollout=rollout.id))
            conn.execute(sa.insert(rollouts).values(**self._rollout_row(rollout), revision=1))
            conn.execute(sa.update(rollouts).where(
                rollouts.c.fleet == rollout.fleet, rollouts.c.name == rollout.name, rollouts.c.id != rollout.id,
                rollouts.c.state == RolloutState.COMPLETED.value, rollouts.c.superseded_by.is_(None))
                .values(superseded_by=rollout.id))
            self._write_devices(conn, rollout, {})
            conn.execute(sa.insert(rollout_log).values(rollout_id=rollout.id, at=rollout.created_at, kind="start",
                                                       detail=f"{rollout.name} {rollout.version}"))

    @staticmethod
    def _rollout_row(rollout: Rollout) -> dict[str, Any]:
        return {"id": rollout.id, "fleet": rollout.fleet, "name": rollout.name, "version": rollout.version,
                "state": rollout.state.value, "stage": rollout.stage, "stage_started_at": rollout.stage_started_at,
                "created_at": rollout.created_at, "updated_at": rollout.updated_at,
                "policy": rollout.policy.to_dict(), "selection": [list(p) for p in rollout.selection],
                "reason": rollout.reason}

    def _write_devices(self, conn: Connection, rollout: Rollout, before: Mapping[str, DeviceRecord]) -> None:
        changed = [r for d, r in rollout.devices.items() if before.get(d) != r]
        if not changed:
            return
        existing = [r.device for r in changed if r.device in before]
        for start in range(0, len(existing), 500):
            conn.execute(sa.delete(rollout_devices).where(rollout_devices.c.rollout_id == rollout.id,
                                                          rollout_devices.c.device_id.in_(existing[start:start + 500])))
        conn.execute(sa.insert(rollout_devices), [
            {"rollout_id": rollout.id, "device_id": r.device, "status": r.status.value, "stage": r.stage,
             "assigned_at": r.assigned_at, "previous_name": r.previous_name, "previous_version": r.previous_version,
             "updated_at": r.updated_at, "detail": r.detail} for r in changed])

    def load_rollout(self, rollout_id: str) -> tuple[Rollout, int]:
        """(rollout, revision). Unknown id: BadInputError."""
        with self.engine.connect() as conn:
            return self._load_rollout(conn, rollout_id)

    def rollout_revision(self, rollout_id: str) -> int | None:
        """The stored revision of a rollout (None: unknown): every change to it or its devices'
        records bumps it, so a reader may keep a loaded rollout until this moves."""
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(rollouts.c.revision).where(rollouts.c.id == rollout_id)).scalar()
        return None if value is None else int(value)

    def _load_rollout(self, conn: Connection, rollout_id: str) -> tuple[Rollout, int]:
        row = conn.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).mappings().first()
        if row is None:
            raise BadInputError(f"unknown rollout {rollout_id!r} (see `edgeship rollout ls`)")
        # plain rows and one status lookup per distinct value: a 10,000-device rollout is reloaded
        # whenever its revision moves (the console's page, every reconcile), and per-row mappings and
        # Enum calls were most of that time
        statuses = {s.value: s for s in DeviceStatus}
        c = rollout_devices.c
        records = {
            device: DeviceRecord(device, statuses[status], stage, assigned_at, previous_name, previous_version,
                                 updated_at, detail)
            for device, status, stage, assigned_at, previous_name, previous_version, updated_at, detail
            in conn.execute(sa.select(c.device_id, c.status, c.stage, c.assigned_at, c.previous_name,
                                      c.previous_version, c.updated_at, c.detail).where(c.rollout_id == rollout_id))}
        policy = json_value(row["policy"])
        selection = json_value(row["selection"])
        rollout = Rollout(id=row["id"], fleet=row["fleet"], name=row["name"], version=row["version"],
                          policy=RolloutPolicy.from_dict(policy), state=RolloutState(row["state"]),
                          stage=row["stage"], stage_started_at=row["stage_started_at"], created_at=row["created_at"],
                          updated_at=row["updated_at"], selection=tuple((k, v) for k, v in selection),
                          devices=records, reason=row["reason"])
        return rollout, int(row["revision"])

    def save_rollout(self, rollout: Rollout, expected_revision: int, actions: Sequence[Action] = (),
                     before: Rollout | None = None, now: float | None = None) -> int:
        """Persist a decision: the rollout, its changed device records, its log, and the actions that
        must reach devices (into the outbox), in one transaction. Returns the new revision.

        Raises:
            ConcurrentUpdateError: the stored revision is no longer ``expected_revision``.
        """
        at = rollout.updated_at if now is None else now
        with self.engine.begin() as conn:
            result = conn.execute(sa.update(rollouts).where(rollouts.c.id == rollout.id,
                                                            rollouts.c.revision == expected_revision)
                                  .values(**{k: v for k, v in self._rollout_row(rollout).items() if k != "id"},
                                          revision=expected_revision + 1))
            if result.rowcount != 1:
                raise ConcurrentUpdateError(f"rollout {rollout.id} changed since revision {expected_revision}")
            previous = before.devices if before is not None else self._load_rollout(conn, rollout.id)[0].devices
            self._write_devices(conn, rollout, previous)
            self._log_and_enqueue(conn, rollout.fleet, actions, at, rollout_id=rollout.id)
        return expected_revision + 1

    def _log_and_enqueue(self, conn: Connection, fleet: str, actions: Sequence[Action], at: float,
                         rollout_id: str | None = None, abtest_id: str | None = None) -> None:
        if not actions:
            return
        if rollout_id is not None:
            conn.execute(sa.insert(rollout_log), [
                {"rollout_id": rollout_id, "at": at, "kind": a.kind, "device_id": getattr(a, "device", None),
                 "detail": getattr(a, "reason", None)} for a in actions])
        deliver = [a for a in actions if isinstance(a, (AssignVersion, RollbackDevice, RemoveModel))]
        if deliver:
            conn.execute(sa.insert(outbox), [
                {"created_at": at, "fleet": fleet, "rollout_id": rollout_id, "abtest_id": abtest_id, "kind": a.kind,
                 "device_id": a.device, "payload": asdict(a)} for a in deliver])

    def update_rollout(self, rollout_id: str, decide: Callable[[Rollout], Decision], *, now: float | None = None,
                       retries: int = 5) -> Decision:
        """Load, apply ``decide`` (a pure function of the rollout), save; retry on a concurrent save."""
        for attempt in range(retries):
            rollout, revision = self.load_rollout(rollout_id)
            decision = decide(rollout)
            if not decision.actions and replace(decision.rollout, updated_at=rollout.updated_at) == rollout:
                return decision  # nothing changed: no write, no revision bump
            try:
                self.save_rollout(decision.rollout, revision, decision.actions, before=rollout, now=now)
                return decision
            except ConcurrentUpdateError:
                if attempt == retries - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def reconcile_rollout(self, rollout_id: str, now: float, telemetry_window_s: float = 900.0) -> Decision:
        """One reconcile of one rollout: snapshot of its selection (telemetry of the last
        ``telemetry_window_s`` seconds, never before the rollout started), ``step``, save with the
        outbox. What the controller calls for each of :meth:`live_rollout_ids` on every tick."""
        def decide(rollout: Rollout) -> Decision:
            since = max(rollout.created_at, now - telemetry_window_s)
            return step(rollout, self.fleet_snapshot(rollout.fleet, rollout.selection, telemetry_since=since,
                                                     model=rollout.name), now)

        return self.update_rollout(rollout_id, decide, now=now)

    def reconcile_abtest(self, test_id: str, now: float) -> list[AssignVersion]:
        """Queue the arm assignments a RUNNING A/B test still needs (devices that joined, or whose
        desired state is not their arm's yet); returns what was queued. Assignments already queued and
        not yet carried out are not queued twice."""
        test, _ = self.get_abtest(test_id)
        if test.state != "RUNNING":
            return []
        names = {test.a.name, test.b.name}
        desired = self.desired_map(test.fleet, names)
        for pending in self.pending_actions(limit=100_000):
            if pending.abtest_id == test_id and isinstance(pending.action, AssignVersion):
                desired[pending.action.device] = (pending.action.name, pending.action.version)
        # each device as it serves the test's model (a multi-model device serves others beside it)
        actions = plan_assignments(test, self.fleet_snapshot(test.fleet, test.selection, model=test.a.name), desired)
        if actions:
            self.enqueue_actions(test.fleet, actions, now, abtest_id=test_id)
        return actions

    def list_rollouts(self, fleet: str | None = None, states: Iterable[str] | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
        """Rollout rows (no device records), newest first, with per-status device counts."""
        query = sa.select(rollouts).order_by(rollouts.c.created_at.desc(), rollouts.c.id).limit(limit)
        if fleet is not None:
            query = query.where(rollouts.c.fleet == fleet)
        if states is not None:
            query = query.where(rollouts.c.state.in_([str(s) for s in states]))
        counts_query = (sa.select(rollout_devices.c.rollout_id, rollout_devices.c.status, sa.func.count())
                        .group_by(rollout_devices.c.rollout_id, rollout_devices.c.status))
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
            counts: dict[str, dict[str, int]] = {}
            for rollout_id, status, count in conn.execute(counts_query):
                counts.setdefault(rollout_id, {})[status] = int(count)
        for row in rows:
            row["devices"] = counts.get(row["id"], {})
        return rows

    def live_rollout_ids(self) -> list[str]:
        """What the controller reconciles: RUNNING and PAUSED rollouts, and COMPLETED ones not yet
        superseded by a newer rollout of the same bundle on the fleet (they serve late joiners)."""
        query = sa.select(rollouts.c.id).where(sa.or_(
            rollouts.c.state.in_(LIVE_ROLLOUT_STATES),
            sa.and_(rollouts.c.state == RolloutState.COMPLETED.value, rollouts.c.superseded_by.is_(None))
        )).order_by(rollouts.c.created_at, rollouts.c.id)
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def rollout_log_entries(self, rollout_id: str, limit: int = 200) -> list[dict[str, Any]]:
        query = (sa.select(rollout_log).where(rollout_log.c.rollout_id == rollout_id)
                 .order_by(rollout_log.c.id.desc()).limit(limit))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()][::-1]

    # -- the outbox ---------------------------------------------------------------------------

    def enqueue_actions(self, fleet: str, actions: Sequence[Action], now: float, *, rollout_id: str | None = None,
                        abtest_id: str | None = None) -> None:
        """Queue device actions decided outside a rollout (``deploy``, A/B assignments)."""
        with self.engine.begin() as conn:
            self._log_and_enqueue(conn, fleet, actions, now, rollout_id=rollout_id, abtest_id=abtest_id)

    def pending_actions(self, limit: int = 1000) -> list[PendingAction]:
        """Actions not yet carried out, oldest first (a device's actions stay in decision order)."""
        query = sa.select(outbox).where(outbox.c.done_at.is_(None)).order_by(outbox.c.id).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [PendingAction(int(r["id"]), r["fleet"], r["rollout_id"], r["abtest_id"],
                              action_from_dict(json_value(r["payload"])), r["created_at"]) for r in rows]

    def claim_actions(self, owner: str, now: float, limit: int = 500, lease_s: float = 60.0) -> list[PendingAction]:
        """Claim pending actions for one controller replica, so two replicas never carry out the same
        one: unclaimed entries, or entries whose claim is older than ``lease_s`` (a replica that died).
        Returns the entries this call claimed, oldest first."""
        expired = now - lease_s
        claimable = sa.and_(outbox.c.done_at.is_(None),
                            sa.or_(outbox.c.claimed_by.is_(None), outbox.c.claimed_at < expired))
        with self.engine.begin() as conn:
            ids = list(conn.execute(sa.select(outbox.c.id).where(claimable).order_by(outbox.c.id).limit(limit))
                       .scalars())
            if not ids:
                return []
            # The claim re-checks the condition, so a concurrent claimer that got there first wins.
            conn.execute(sa.update(outbox).where(outbox.c.id.in_(ids), claimable)
                         .values(claimed_by=owner, claimed_at=now))
            rows = conn.execute(sa.select(outbox).where(outbox.c.id.in_(ids), outbox.c.claimed_by == owner,
                                                        outbox.c.claimed_at == now).order_by(outbox.c.id)
                                ).mappings().all()
        return [PendingAction(int(r["id"]), r["fleet"], r["rollout_id"], r["abtest_id"],
                              action_from_dict(json_value(r["payload"])), r["created_at"]) for r in rows]

    def complete_action(self, action_id: int, now: float, error: str | None = None) -> None:
        """Mark an outbox entry carried out (``error`` keeps why it could not be)."""
        with self.engine.begin() as conn:
            conn.execute(sa.update(outbox).where(outbox.c.id == action_id).values(done_at=now, error=error))
