"""The one place where an error becomes what a person sees: a click group for the
``edgeship`` and ``edgeship-agent`` entry points.

Every failure leaves as one line on stderr (``error: ...``) and its exit status:
an EdgeshipError with its own code, a usage mistake (a bad option value, a missing
argument) with 2, an operating-system error nothing closer caught (a full disk, a
folder that is a file) with 1 and the system's own words, an interrupt with 130. Nothing else in edgeship calls sys.exit.
"""

from __future__ import annotations

__all__ = ["ErrorReportingGroup"]

import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from .errors import EXIT_BAD_INPUT, EXIT_FAILURE, EdgeshipError, describe_os_error


def _fail(message: str, exit_code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(exit_code)


class ErrorReportingGroup(click.Group):
    """A click group whose errors are one line each (see the module docstring)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeshipError as exc:
            _fail(exc.message, exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as exc:  # a full disk, a folder that is a file, a permission: the system's words
            _fail(describe_os_error(exc), EXIT_FAILURE)
        except Exception as exc:  # translated when it is a known library error, re-raised otherwise
            known = self.translate_error(exc)
            if known is None:
                raise
            _fail(known.message, known.exit_code)

    def translate_error(self, exc: Exception) -> EdgeshipError | None:
        """A third-party error this program knows how to say in one line (None: a bug,
        which keeps its traceback). Subclasses add theirs."""
        return None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # a caller that handles click's exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else self.name
            _fail(f"{exc.format_message()} (see '{where} --help')", EXIT_BAD_INPUT)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        sys.exit(result if isinstance(result, int) else 0)
