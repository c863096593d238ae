"""``edgeship console``: the operator's web console over the fleet store (docs/console.md)."""

from __future__ import annotations

__all__ = ["console_command"]

import signal
import threading
from typing import Any

import click

from .fleet_options import db_option, open_fleet_store, policy_from_options, policy_options


@click.command("console")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on (put TLS in front of it before binding it beyond this machine).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to serve on (0: any free port).")
@policy_options
@db_option
def console_command(host: str, port: int, stages: str, success_threshold: float, max_failures: str, health: str,
                    stage_timeout: str, bake: str, db_url: str | None) -> None:
    """Serve the web console: the fleet, devices, rollouts and A/B tests, live.

    Log in with the secret in EDGESHIP_CONSOLE_OPERATOR_TOKEN (every action) or
    EDGESHIP_CONSOLE_VIEWER_TOKEN (read-only). The rollout options are the policy of the
    rollout an A/B test's "Promote" button starts, as for `edgeship abtest promote`.
    """
    from edgeship.toolkit.console import ConsoleServer
    from edgeship.toolkit.console.auth import Credentials

    credentials = Credentials.from_environment()
    policy = policy_from_options(stages, success_threshold, max_failures, health, stage_timeout, bake)
    store = open_fleet_store(db_url, existing=True)
    server = ConsoleServer(store, credentials, host=host, port=port, promotion_policy=policy)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    click.echo(f"console on {server.url} (log in with EDGESHIP_CONSOLE_OPERATOR_TOKEN or _VIEWER_TOKEN)", err=True)
    try:
        stop.wait()
    finally:
        server.stop()
        store.close()
