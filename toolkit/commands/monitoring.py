"""``edgeship monitoring export``: the Prometheus alert rules and the Grafana dashboards that ship
with edgeship, written where an operator's Prometheus and Grafana read them (docs/monitoring.md)."""

from __future__ import annotations

__all__ = ["monitoring"]

import shutil
from importlib import resources
from pathlib import Path

import click

from ..output import emit_json

SHIPPED = ("prometheus-alerts.yml", "grafana-fleet.json", "grafana-device.json")


@click.group("monitoring")
def monitoring() -> None:
    """Prometheus alert rules and Grafana dashboards for the fleet and its devices."""


@monitoring.command("export")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the rules and dashboards into (made if missing).")
@click.option("--json", "as_json", is_flag=True, help="Print the written paths as JSON.")
def export(out: Path, as_json: bool) -> None:
    """Write the alert rules and the fleet and device dashboards into OUT."""
    out.mkdir(parents=True, exist_ok=True)
    folder = resources.files("edgeship.toolkit") / "monitoring"
    written = []
    for name in SHIPPED:
        with resources.as_file(folder / name) as source:
            shutil.copyfile(source, out / name)
        written.append(str(out / name))
    if as_json:
        emit_json({"written": written})
        return
    for path in written:
        click.echo(path)  # plain lines: a path must never be wrapped, on a terminal or through a pipe
    click.echo("Load the rules with Prometheus' rule_files; import the dashboards in Grafana "
               "(Dashboards > New > Import) and pick your Prometheus data source.", err=True)
