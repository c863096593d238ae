"""``edgeship abtest``: A/B tests between two bundle versions (start, report, promote, stop, ls).

``start`` records the test; the controller gives each device of the selection
its arm's version (arms are a hash of the device id, see
edgeship.toolkit.abtest.plan_assignments). ``report`` reads the devices'
telemetry from the store. ``promote`` starts a rollout of the winner.
"""

from __future__ import annotations

__all__ = ["abtest"]

import time
from typing import Any

import click

from edgeship.ota.errors import BadInputError
from edgeship.ota.topics import validate_identifier
from edgeship.ota.versions import check_name, parse_version

from ..fleet_actions import abtest_report, promote_abtest
from ..output import console, emit_json
from .fleet_options import (
    broker_option,
    check_broker_url,
    check_published,
    db_option,
    json_option,
    open_fleet_store,
    policy_from_options,
    policy_options,
    repo_option,
)


@click.group("abtest")
def abtest() -> None:
    """A/B tests between two bundle versions, with a statistical verdict."""


def _test_doc(test: Any, promoted: str | None = None) -> dict[str, Any]:
    return {"id": test.id, "fleet": test.fleet, "a": str(test.a), "b": str(test.b), "metric": test.metric.value,
            "split_pct": test.split_pct, "min_samples": test.min_samples, "alpha": test.alpha, "power": test.power,
            "selection": dict(test.selection), "state": test.state, "created_at": test.created_at,
            "promoted_rollout": promoted}


@abtest.command("start")
@click.argument("arm_a", metavar="NAME:VA")
@click.argument("arm_b", metavar="NAME:VB")
@click.option("--fleet", required=True, help="The fleet to test on.")
@click.option("--select", "select", multiple=True, metavar="TAG=VALUE", help="Only devices with this tag.")
@click.option("--split", type=float, default=50.0, show_default=True, metavar="PCT",
              help="Share of the devices that run B.")
@click.option("--metric", required=True, type=click.Choice(["latency_p95", "error_rate", "accuracy"]),
              help="What decides: p95 latency (Welch's t-test), error rate or accuracy (two-proportion test).")
@click.option("--min-samples", type=int, default=30, show_default=True,
              help="Samples per arm before any verdict (windows for latency, requests or labels for rates).")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="Significance level.")
@click.option("--power", type=float, default=0.8, show_default=True, help="Power for the sample-size estimate.")
@repo_option
@db_option
@broker_option
@json_option
def start(arm_a: str, arm_b: str, fleet: str, select: tuple[str, ...], split: float, metric: str, min_samples: int,
          alpha: float, power: float, repo_dir: str | None, db_url: str | None, broker_url: str | None,
          as_json: bool) -> None:
    """Start an A/B test between NAME:VA and NAME:VB; prints the test's id."""
    from edgeship.toolkit.abtest import ABTest, Arm, Metric
    from edgeship.toolkit.store import new_id, parse_selection

    check_broker_url(broker_url)
    validate_identifier(fleet, "fleet")
    a, b = Arm.parse(arm_a), Arm.parse(arm_b)
    for arm in (a, b):
        check_name(arm.name)
        parse_version(arm.version)
    test = ABTest(id=new_id("ab"), fleet=fleet, a=a, b=b, metric=Metric(metric), split_pct=split,
                  min_samples=min_samples, alpha=alpha, power=power, created_at=time.time(),
                  selection=parse_selection(select))
    check_published(repo_dir, (a.name, a.version), (b.name, b.version))
    store = open_fleet_store(db_url)
    store.create_abtest(test)  # refuses a second running test of these bundles, in the same transaction
    if as_json:
        emit_json(_test_doc(test))
    else:
        click.echo(test.id)


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ms" if metric == "latency_p95" else f"{value:.2%}"


@abtest.command("report")
@click.argument("test_id")
@db_option
@json_option
def report_command(test_id: str, db_url: str | None, as_json: bool) -> None:
    """Per-arm statistics, the test, p-value, effect size and a verdict in words."""
    store = open_fleet_store(db_url, existing=True)
    test, result, promoted = abtest_report(store, test_id)
    if as_json:
        emit_json({"test": _test_doc(test, promoted), **result.to_dict()})
        return
    from rich.table import Table

    out = console()
    out.print(f"[bold]A/B test {test.id}[/bold]  {test.a} vs {test.b} on fleet {test.fleet}, metric "
              f"{test.metric.value}, {test.split_pct:g}% on B, {test.state}")
    table = Table("arm", "version", "devices", "n", "mean", f"{1 - test.alpha:.0%} CI", show_edge=False)
    for stats in (result.a, result.b):
        ci = "-" if stats.ci_low is None else f"{_fmt(stats.ci_low, result.metric)} .. {_fmt(stats.ci_high, result.metric)}"
        table.add_row(stats.label, stats.arm, str(stats.devices), str(stats.n), _fmt(stats.mean, result.metric), ci)
    out.print(table)
    if result.result is not None:
        r = result.result
        out.print(f"B - A = {_fmt(r.difference, result.metric)} (CI {_fmt(r.ci_low, result.metric)} .. "
                  f"{_fmt(r.ci_high, result.metric)}), {r.test} = {r.statistic:.3f}, p = {r.p_value:.4g}, "
                  f"{r.effect_size_name} = {r.effect_size:.3f}")
    out.print(f"[bold]{result.verdict}[/bold]")


@abtest.command("promote")
@click.argument("test_id")
@click.option("--arm", type=click.Choice(["A", "B"]), default=None,
              help="Promote this arm even without a significant winner.")
@policy_options
@db_option
@broker_option
@json_option
def promote(test_id: str, arm: str | None, stages: str, success_threshold: float, max_failures: str, health: str,
            stage_timeout: str, bake: str, db_url: str | None, broker_url: str | None, as_json: bool) -> None:
    """Start a rollout of the winning arm to the test's devices; prints the rollout's id.

    Refused (exit 3) while the report has no significant winner, unless --arm names one.
    """
    check_broker_url(broker_url)
    policy = policy_from_options(stages, success_threshold, max_failures, health, stage_timeout, bake)
    store = open_fleet_store(db_url, existing=True)
    promoted = promote_abtest(store, test_id, policy, arm)
    if as_json:
        emit_json(promoted.to_dict())
    else:
        click.echo(promoted.rollout_id)


@abtest.command("stop")
@click.argument("test_id")
@db_option
@json_option
def stop(test_id: str, db_url: str | None, as_json: bool) -> None:
    """Stop a test without promoting: the controller stops assigning arms; devices keep what they run."""
    store = open_fleet_store(db_url, existing=True)
    test, _ = store.get_abtest(test_id)
    if test.state != "RUNNING":
        raise BadInputError(f"A/B test {test_id} is {test.state}, not RUNNING")
    store.set_abtest_state(test_id, "STOPPED", time.time())
    if as_json:
        emit_json({"id": test_id, "state": "STOPPED"})
    else:
        click.echo(f"A/B test {test_id} stopped")


@abtest.command("ls")
@click.option("--fleet", default=None, help="Only this fleet.")
@db_option
@json_option
def ls(fleet: str | None, db_url: str | None, as_json: bool) -> None:
    """List A/B tests, newest first."""
    store = open_fleet_store(db_url, existing=True)
    tests = store.list_abtests(fleet)
    if as_json:
        emit_json([_test_doc(t) for t in tests])
        return
    from rich.table import Table

    table = Table(show_edge=False)
    table.add_column("id", no_wrap=True)
    for title in ("fleet", "A", "B", "metric", "split", "state"):
        table.add_column(title)
    for t in tests:
        table.add_row(t.id, t.fleet, str(t.a), str(t.b), t.metric.value, f"{t.split_pct:g}%", t.state)
    console().print(table)
