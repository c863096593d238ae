"""The ``edgeship`` command line: one lazy click group. Errors become one line and
an exit status in ``edgeship.ota.cli_edge`` (shared with ``edgeship-agent``).

Subcommands live in ``edgeship.toolkit.commands.*`` and are imported only when
invoked, so ``edgeship --help`` and light commands never load TensorFlow.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from edgeship.ota.cli_edge import ErrorReportingGroup
from edgeship.ota.errors import EdgeshipError, first_line

# command name -> "module:attribute" (a click.Command or click.Group)
COMMANDS: dict[str, str] = {
    # model conversion (edgeship.converters)
    "convert": "edgeship.toolkit.commands.conversion:convert",
    "validate": "edgeship.toolkit.commands.conversion:validate",
    "inspect": "edgeship.toolkit.commands.conversion:inspect_model",
    "bench": "edgeship.toolkit.commands.conversion:bench",
    # bundles and the release repository (edgeship.ota)
    "keys": "edgeship.toolkit.commands.release:keys",
    "bundle": "edgeship.toolkit.commands.release:bundle",
    "publish": "edgeship.toolkit.commands.release:publish",
    "repo": "edgeship.toolkit.commands.release:repo",
    # broker configuration and device identities
    "broker": "edgeship.toolkit.commands.broker:broker",
    "device": "edgeship.toolkit.commands.device:device",
    # the fleet over MQTT (edgeship.toolkit)
    "controller": "edgeship.toolkit.commands.fleet:controller",
    "fleet": "edgeship.toolkit.commands.fleet:fleet",
    "deploy": "edgeship.toolkit.commands.fleet:deploy",
    "undeploy": "edgeship.toolkit.commands.fleet:undeploy",
    "rollout": "edgeship.toolkit.commands.rollout:rollout",
    "abtest": "edgeship.toolkit.commands.abtest:abtest",
    "monitoring": "edgeship.toolkit.commands.monitoring:monitoring",
    "console": "edgeship.toolkit.commands.console:console_command",
    "delta": "edgeship.toolkit.commands.delta:delta",
}

HELP: dict[str, str] = {
    "convert": "Convert and quantize a model to TFLite or ONNX, then validate it.",
    "validate": "Compare a converted model with its reference; gate on the result.",
    "inspect": "Show a model's inputs, outputs, operators and quantization.",
    "bench": "Measure latency, throughput and memory of one or more models.",
    "keys": "Create and rotate the release repository's and director's keys.",
    "bundle": "Build, inspect, verify and export signed model bundles.",
    "publish": "Publish a bundle into the release repository (TUF).",
    "repo": "Show and refresh the release repository.",
    "broker": "Generate a locked-down Mosquitto configuration, or run the embedded broker.",
    "device": "Device identities, details and provisioning.",
    "controller": "Run the fleet controller: ingest, serve blocks, reconcile rollouts.",
    "fleet": "List the fleet's devices, their models and health; provision many devices.",
    "deploy": "Assign a bundle version to one device or a selection, directly.",
    "undeploy": "Take a model off one device or a selection; its other models stay.",
    "rollout": "Staged rollouts with automatic abort and rollback.",
    "abtest": "A/B tests between two bundle versions, with a statistical verdict.",
    "monitoring": "Export the Prometheus alert rules and Grafana dashboards.",
    "console": "Serve the operator's web console (fleet, devices, rollouts, A/B tests).",
    "delta": "Build, apply and inspect deltas between two bundles.",
}


class LazyGroup(ErrorReportingGroup):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str], short_help: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = lazy
        self._short_help = short_help

    def translate_error(self, exc: Exception) -> EdgeshipError | None:
        """The fleet store's database errors (a store made by another version, a locked
        or unreachable database) in one line; only when SQLAlchemy is loaded at all."""
        sa_exc = sys.modules.get("sqlalchemy.exc")
        if sa_exc is not None and isinstance(exc, sa_exc.SQLAlchemyError):
            cause = getattr(exc, "orig", None) or exc
            return EdgeshipError(f"fleet store: {type(cause).__name__}: {first_line(cause)}")
        return None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self._lazy:
            return super().get_command(ctx, cmd_name)
        if ctx.resilient_parsing or "--help" in sys.argv[1:2]:
            # `edgeship --help` lists commands without importing them.
            return click.Command(cmd_name, short_help=self._short_help.get(cmd_name, ""))
        module_name, attribute = self._lazy[cmd_name].split(":")
        module = importlib.import_module(module_name)
        command = getattr(module, attribute)
        if not isinstance(command, click.Command):  # pragma: no cover - wiring error
            raise RuntimeError(f"{self._lazy[cmd_name]} is not a click command")
        return command


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    short_help=HELP,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="edgeship")
def main() -> None:
    """edgeship: convert, validate, bundle, sign and roll out ML models to edge fleets."""


if __name__ == "__main__":  # pragma: no cover
    main()
