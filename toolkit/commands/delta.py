"""``edgeship delta``: build, apply and inspect deltas between two bundles (docs/deltas.md)."""

from __future__ import annotations

__all__ = ["delta"]

import hashlib
from pathlib import Path

import click

from edgeship.ota.errors import BadInputError

from ..output import emit_json

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group("delta")
def delta() -> None:
    """Deltas between two bundles: send what changed, rebuild the new bundle bit for bit."""


@delta.command("build")
@click.argument("old", type=_FILE)
@click.argument("new", type=_FILE)
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The delta file to write.")
@click.option("--level", type=click.IntRange(1, 22), default=None, help="zstd level (default 12).")
@click.option("--json", "as_json", is_flag=True, help="Print the sizes as JSON.")
def build(old: Path, new: Path, out: Path, level: int | None, as_json: bool) -> None:
    """Build the delta that rebuilds bundle NEW from bundle OLD.

    Exit 1 without writing a file when no delta is smaller than NEW compressed with zstd.
    """
    from edgeship.ota.errors import EdgeshipError
    from edgeship.toolkit.deltas import DEFAULT_LEVEL, build_delta

    built = build_delta(old.read_bytes(), new.read_bytes(), level or DEFAULT_LEVEL)
    doc = {"method": built.method, "tensors": built.tensors, "seconds": round(built.seconds, 3), **built.sizes,
           "ratio_to_zstd_full": round(built.sizes["delta"] / built.sizes["full_zstd"], 4) if built.sizes["full_zstd"]
           else None, "out": str(out) if built.data else None}
    if built.data is None:
        raise EdgeshipError(f"no delta from {old.name} to {new.name} is smaller than {new.name} compressed "
                            f"({built.sizes['full_zstd']} bytes): send the full bundle")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(built.data)
    tmp.replace(out)
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"{out}: {built.method} delta, {built.sizes['delta']:,} bytes = {doc['ratio_to_zstd_full']:.1%} of "
                   f"the bundle compressed ({built.sizes['full_zstd']:,}); {built.tensors} tensors")


@delta.command("apply")
@click.argument("delta_file", type=_FILE)
@click.option("--base", "base", required=True, type=_FILE, help="The bundle the delta was built from.")
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The rebuilt bundle.")
@click.option("--sha256", "expected", default=None, help="Refuse unless the result has this hash (the signed one).")
@click.option("--json", "as_json", is_flag=True)
def apply(delta_file: Path, base: Path, out: Path, expected: str | None, as_json: bool) -> None:
    """Rebuild a bundle from BASE and DELTA_FILE (exit 4 when the delta does not rebuild its target)."""
    from edgeship.ota.delta import apply_delta

    if out.resolve() == base.resolve():
        raise BadInputError("--out must not be the base bundle")
    digest = apply_delta(delta_file, base, out, expected_target_sha256=expected)
    if as_json:
        emit_json({"out": str(out), "sha256": digest, "size": out.stat().st_size})
    else:
        click.echo(f"{out}: sha256 {digest}")


@delta.command("inspect")
@click.argument("delta_file", type=_FILE)
@click.option("--json", "as_json", is_flag=True)
def inspect(delta_file: Path, as_json: bool) -> None:
    """What a delta rebuilds, from what, and how."""
    from edgeship.ota.delta import delta_summary, read_header

    with open(delta_file, "rb") as f:
        header, _ = read_header(f)
    doc = {**delta_summary(header), "file_size": delta_file.stat().st_size,
           "file_sha256": hashlib.sha256(delta_file.read_bytes()).hexdigest()}
    if as_json:
        emit_json(doc)
        return
    for key, value in doc.items():
        click.echo(f"{key}: {value}")
