"""The store's A/B tests: created under the fleet rule that one model name is moved by one thing
at a time (``fleet_rules.exclusion_conflict``), read, listed, moved between states. A mixin of
:class:`~edgeship.toolkit.store.FleetStore`."""

from __future__ import annotations

__all__ = ["ABTestRecords"]

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from edgeship.ota.errors import BadInputError
from edgeship.toolkit.abtest import ABTest, Arm, Metric
from edgeship.toolkit.fleet_rules import LiveWork, exclusion_conflict
from edgeship.toolkit.rollouts import RolloutState
from edgeship.toolkit.store_schema import LIVE_ROLLOUT_STATES, abtests, json_value, rollouts


class ABTestRecords:
    """A/B tests in the store (see the module docstring)."""

    engine: Engine

    @staticmethod
    def _live_rollouts(conn: Connection, fleet: str, names: set[str]) -> list[LiveWork]:
        query = sa.select(rollouts.c.id, rollouts.c.name, rollouts.c.version, rollouts.c.state).where(
            rollouts.c.fleet == fleet, rollouts.c.name.in_(names), rollouts.c.state.in_(LIVE_ROLLOUT_STATES))
        return [LiveWork("rollout", r.id, frozenset({r.name}), r.state, r.version) for r in conn.execute(query)]

    @staticmethod
    def _live_abtests(conn: Connection, fleet: str, names: set[str]) -> list[LiveWork]:
        query = sa.select(abtests.c.id, abtests.c.a_name, abtests.c.b_name, abtests.c.state).where(
            abtests.c.fleet == fleet, abtests.c.state == "RUNNING",
            sa.or_(abtests.c.a_name.in_(names), abtests.c.b_name.in_(names)))
        return [LiveWork("abtest", r.id, frozenset({r.a_name, r.b_name}), r.state) for r in conn.execute(query)]

    # -- A/B tests ----------------------------------------------------------------------------

    def create_abtest(self, test: ABTest) -> None:
        """Store a new A/B test. Refused while a rollout of either arm's bundle is RUNNING or PAUSED on
        the fleet, or another A/B test of either bundle RUNS there (two tests would each assign the
        devices both select, back and forth every tick); COMPLETED rollouts of those bundles are
        superseded (they stop giving their version to devices that join later, which now get an arm)."""
        names = {test.a.name, test.b.name}
        with self.engine.begin() as conn:
            reason = exclusion_conflict("abtest", names, test.fleet,
                                        self._live_rollouts(conn, test.fleet, names)
                                        + self._live_abtests(conn, test.fleet, names))
            if reason is not None:
                raise BadInputError(reason)
            conn.execute(sa.update(rollouts).where(
                rollouts.c.fleet == test.fleet, rollouts.c.name.in_(names),
                rollouts.c.state == RolloutState.COMPLETED.value, rollouts.c.superseded_by.is_(None))
                .values(superseded_by=test.id))
            conn.execute(sa.insert(abtests).values(
                id=test.id, fleet=test.fleet, a_name=test.a.name, a_version=test.a.version, b_name=test.b.name,
                b_version=test.b.version, metric=test.metric.value, split_pct=test.split_pct,
                min_samples=test.min_samples, alpha=test.alpha, power=test.power,
                selection=[list(p) for p in test.selection], state=test.state, created_at=test.created_at,
                updated_at=test.created_at))

    def get_abtest(self, test_id: str) -> tuple[ABTest, str | None]:
        """(test, id of the rollout it was promoted to or None). Unknown id: BadInputError."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(abtests).where(abtests.c.id == test_id)).mappings().first()
        if row is None:
            raise BadInputError(f"unknown A/B test {test_id!r} (see `edgeship abtest ls`)")
        return self._abtest(row), row["promoted_rollout"]

    @staticmethod
    def _abtest(row: Any) -> ABTest:
        selection = json_value(row["selection"])
        return ABTest(id=row["id"], fleet=row["fleet"], a=Arm(row["a_name"], row["a_version"]),
                      b=Arm(row["b_name"], row["b_version"]), metric=Metric(row["metric"]),
                      split_pct=row["split_pct"], min_samples=row["min_samples"], alpha=row["alpha"],
                      power=row["power"], created_at=row["created_at"],
                      selection=tuple((k, v) for k, v in selection), state=row["state"])

    def list_abtests(self, fleet: str | None = None, states: Iterable[str] | None = None) -> list[ABTest]:
        query = sa.select(abtests).order_by(abtests.c.created_at.desc(), abtests.c.id)
        if fleet is not None:
            query = query.where(abtests.c.fleet == fleet)
        if states is not None:
            query = query.where(abtests.c.state.in_(list(states)))
        with self.engine.connect() as conn:
            return [self._abtest(r) for r in conn.execute(query).mappings()]

    def set_abtest_state(self, test_id: str, state: str, now: float, promoted_rollout: str | None = None) -> None:
        with self.engine.begin() as conn:
            result = conn.execute(sa.update(abtests).where(abtests.c.id == test_id)
                                  .values(state=state, updated_at=now, promoted_rollout=promoted_rollout))
            if result.rowcount != 1:
                raise BadInputError(f"unknown A/B test {test_id!r}")
