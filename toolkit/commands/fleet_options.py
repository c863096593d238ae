"""Options shared by the fleet commands (``rollout``, ``abtest``, and the controller's ``fleet``/``deploy``).

- ``--db URL`` / ``EDGESHIP_DB``: the controller's store (a SQLAlchemy URL; default ``sqlite:///fleet.db``).
- ``--repo DIR`` / ``EDGESHIP_REPO`` (optional): the release repository; when given, a rollout, deploy
  or A/B test of a version that is not published there is refused at once (the controller could not
  sign it: the devices of the first stage would only time out).
- ``--broker URL`` / ``EDGESHIP_BROKER``: ``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT``. The rollout and
  A/B commands only record intent in the store; the controller, which holds the broker connection and
  the director key, carries it out. They accept ``--broker`` so that every fleet command takes the
  same options (scripts need not know which ones talk to the broker) and check its form.
"""

from __future__ import annotations

__all__ = [
    "WINDOW_HELP",
    "ago",
    "parse_window",
    "broker_option",
    "check_broker_url",
    "check_published",
    "db_option",
    "json_option",
    "open_fleet_store",
    "policy_from_options",
    "policy_options",
    "repo_option",
]

import re
from typing import Any, Callable

import click

from edgeship.ota.errors import BadInputError

F = Callable[..., Any]

_BROKER_URL = re.compile(r"^mqtts?://[^\s/:]+(:\d{1,5})?/?$")


def check_broker_url(url: str | None) -> str | None:
    """``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT`` (or None); anything else is bad input.

    The same rules as the controller and the agent (``parse_broker_url``: ports 1-65535, IPv6
    hosts in brackets, no credentials in the URL), so a URL one command accepts the others do too.
    """
    if url is None:
        return None
    from edgeship.ota.transport import parse_broker_url

    if not _BROKER_URL.match(url) and not url.startswith(("mqtt://[", "mqtts://[")):
        raise BadInputError(f"broker URL {url!r}: use mqtt://HOST:PORT or mqtts://HOST:PORT")
    parse_broker_url(url, environ={})
    return url


def repo_option(func: F) -> F:
    return click.option("--repo", "repo_dir", envvar="EDGESHIP_REPO", default=None,
                        type=click.Path(file_okay=False),
                        help="Check that the version is published in this release repository first "
                             "(env EDGESHIP_REPO).")(func)


def check_published(repo_dir: str | None, *bundles: tuple[str, str]) -> None:
    """With a release repository, every (name, version) must be published there (BadInputError)."""
    if repo_dir is None:
        return
    from edgeship.ota.release import ReleaseRepository

    repo = ReleaseRepository(repo_dir)
    for name, version in bundles:
        repo.target_info(name, version)


def db_option(func: F) -> F:
    return click.option("--db", "db_url", envvar="EDGESHIP_DB", default=None, metavar="URL",
                        help="The fleet store, a SQLAlchemy URL (env EDGESHIP_DB; default sqlite:///fleet.db).")(func)


def broker_option(func: F) -> F:
    return click.option("--broker", "broker_url", envvar="EDGESHIP_BROKER", default=None, metavar="URL",
                        help="mqtt://HOST:PORT or mqtts://HOST:PORT (env EDGESHIP_BROKER). This command only "
                             "records intent in the store; the running controller carries it out.")(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(func)


def device_choice_options(func: F) -> F:
    """Which devices a direct assignment concerns (``deploy``, ``undeploy``): named devices, or
    every device with the given tags, in one fleet."""
    func = click.option("--fleet", "fleet_name", default=None,
                        help="The fleet (needed with --select when several exist).")(func)
    func = click.option("--select", "select", multiple=True, metavar="TAG=VALUE",
                        help="Every device with this tag (repeatable: all must match).")(func)
    return click.option("--device", "device_ids", multiple=True, metavar="ID", help="The device (repeatable).")(func)


def policy_options(func: F) -> F:
    """The rollout policy options of ``rollout start`` (and ``abtest promote``)."""
    options = [
        click.option("--stages", default="5,25,100", show_default=True,
                     help="Cumulative percentages of the selected devices, ending at 100."),
        click.option("--success-threshold", "success_threshold", type=float, default=90.0, show_default=True,
                     metavar="PCT", help="Share of a stage's devices that must succeed before the next stage."),
        click.option("--max-failures", "max_failures", default="10%", show_default=True, metavar="PCT%|N",
                     help="Abort when more than this many moved devices failed or were rejected."),
        click.option("--health", "health", default="", metavar="GATES",
                     help="Telemetry gates, e.g. max_error_rate=0.05,max_p95_ratio=1.5[,min_requests=100]."),
        click.option("--stage-timeout", "stage_timeout", default="30m", show_default=True, metavar="DURATION",
                     help="A device that has not finished this long after its assignment counts as timed out."),
        click.option("--bake", "bake", default="0s", show_default=True, metavar="DURATION",
                     help="Minimum time each stage stays before the next one starts (lets telemetry arrive)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def policy_from_options(stages: str, success_threshold: float, max_failures: str, health: str, stage_timeout: str,
                        bake: str) -> Any:
    from edgeship.toolkit.rollouts import (
        FailureThreshold,
        HealthGates,
        RolloutPolicy,
        parse_duration,
        parse_stages,
    )

    bake_s = 0.0 if bake.strip() in ("0", "0s", "") else parse_duration(bake)
    return RolloutPolicy(stages=parse_stages(stages), success_threshold_pct=success_threshold,
                         max_failures=FailureThreshold.parse(max_failures), health=HealthGates.parse(health),
                         stage_timeout_s=parse_duration(stage_timeout), bake_s=bake_s)


def open_fleet_store(db_url: str | None, *, existing: bool = False) -> Any:
    """The fleet store of ``--db`` ($EDGESHIP_DB, else ./fleet.db). ``existing``: a command
    that only reads or changes what is there refuses a SQLite file that does not exist (a
    mistyped --db would otherwise show an empty fleet and leave a new file behind)."""
    import os

    from edgeship.toolkit.store import DEFAULT_DB_URL, open_store

    url = db_url or os.environ.get("EDGESHIP_DB") or DEFAULT_DB_URL
    if existing and url.startswith("sqlite:///") and ":memory:" not in url:
        path = url[len("sqlite:///"):].split("?", 1)[0]
        if not os.path.exists(path):
            raise BadInputError(f"no fleet store at {path} (the controller and `edgeship deploy` make one; "
                                "check --db or $EDGESHIP_DB)")
    return open_store(url)


WINDOW_HELP = "Telemetry window for p95 latency and error rate (e.g. 15m, 1h)."


def parse_window(text: str) -> float:
    """A telemetry window such as ``15m`` in seconds (the rollout durations' syntax)."""
    from edgeship.toolkit.rollouts import parse_duration

    return parse_duration(text)


def ago(seconds: float | None, now: float) -> str:
    """How long ago ``seconds`` (epoch) was, for a table: ``42s ago``, ``3h ago``; ``-`` for never."""
    if seconds is None:
        return "-"
    delta = max(0.0, now - seconds)
    if delta < 90:
        return f"{delta:.0f}s ago"
    if delta < 5400:
        return f"{delta / 60:.0f}m ago"
    if delta < 2 * 86400:
        return f"{delta / 3600:.0f}h ago"
    return f"{delta / 86400:.0f}d ago"
