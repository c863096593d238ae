"""``edgeship keys``, ``bundle``, ``publish`` and ``repo``: bundles and the release repository.

Thin: each command parses its options, calls ``edgeship.ota.bundle`` /
``edgeship.ota.release`` and prints the result (``--json``: one document on stdout).
"""

from __future__ import annotations

__all__ = ["bundle", "keys", "publish", "repo"]

import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Any

import click

from edgeship.ota.errors import BadInputError
from edgeship.toolkit.output import console, emit_json, progress_reporter

PASSPHRASE_ENV = "EDGESHIP_ROOT_PASSPHRASE"
NEW_PASSPHRASE_ENV = "EDGESHIP_NEW_ROOT_PASSPHRASE"

_repo_option = click.option(
    "--repo", "repo_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="The release repository folder.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


def _passphrase(*, confirm: bool, env: str = PASSPHRASE_ENV, prompt: str = "Root key passphrase") -> str:
    """The root passphrase: from ``env`` for automation, else a hidden prompt."""
    value = os.environ.get(env)
    if value:
        return value
    return str(click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True))


def _expiry_options(values: tuple[str, ...]) -> dict[str, int]:
    from edgeship.ota.release import ROLES, parse_duration

    result: dict[str, int] = {}
    for item in values:
        role, sep, duration = item.partition("=")
        if not sep or role not in ROLES:
            raise BadInputError(f"--expires {item!r}: use ROLE=DURATION with ROLE one of {', '.join(ROLES)} "
                                "(e.g. timestamp=1d, targets=1y)")
        result[role] = parse_duration(duration)
    return result


def _progress(as_json: bool) -> Any:
    return progress_reporter(enabled=sys.stderr.isatty())


def _echo_fingerprints(info: dict[str, Any]) -> None:
    out = console()
    for role, keyids in info["keys"].items():
        for keyid in keyids:
            out.print(f"  {role:<10} {keyid}")
    out.print(f"  {'director':<10} {info['director_key']}")
    out.print("Provision each device with:")
    out.print(f"  trusted root metadata: {info['root_metadata']}")
    out.print(f"  director public key:   {info['director_public_key']}")


# -- keys ------------------------------------------------------------------------------------------

@click.group()
def keys() -> None:
    """Create and rotate the release repository's and director's keys."""


@keys.command("init")
@_repo_option
@click.option("--expires", "expires", multiple=True, metavar="ROLE=DURATION",
              help="Validity of a role's metadata, e.g. timestamp=1d, snapshot=7d, targets=1y (repeatable).")
@_json_option
def keys_init(repo_dir: Path, expires: tuple[str, ...], as_json: bool) -> None:
    """Create the root, targets, snapshot, timestamp and director keys and the first metadata.

    The root key is encrypted with a passphrase (prompted, or EDGESHIP_ROOT_PASSPHRASE).
    """
    from edgeship.ota.release import ReleaseRepository

    expiry = _expiry_options(expires)
    repository = ReleaseRepository(repo_dir)
    if repository.exists():
        raise BadInputError(f"{repo_dir} already holds a release repository; nothing was changed")
    passphrase = _passphrase(confirm=True)
    defaults = repository.expiry()
    defaults.update(expiry)
    info = repository.init(root_passphrase=passphrase, expiry=defaults)
    if as_json:
        emit_json(info)
        return
    console().print(f"Created release repository {repo_dir}. Key fingerprints:")
    _echo_fingerprints(info)


@keys.command("rotate")
@click.argument("role", type=click.Choice(["root", "targets", "snapshot", "timestamp", "director"]))
@_repo_option
@_json_option
def keys_rotate(role: str, repo_dir: Path, as_json: bool) -> None:
    """Give ROLE a new key; the old one is revoked (devices stop trusting it).

    Rotating root signs the new root with the old and the new key, so devices on
    the old root follow. The new root key's passphrase is EDGESHIP_NEW_ROOT_PASSPHRASE
    (or a prompt; empty keeps the current one).
    """
    from edgeship.ota.release import ReleaseRepository

    repository = ReleaseRepository(repo_dir)
    repository.fingerprints()  # refuses a folder that is not a repository, before any prompt
    passphrase: str | None = None
    new_passphrase: str | None = None
    if role != "director":
        passphrase = _passphrase(confirm=False)
    if role == "root":
        new_passphrase = os.environ.get(NEW_PASSPHRASE_ENV) or None
        if new_passphrase is None and not os.environ.get(PASSPHRASE_ENV):
            entered = click.prompt("New root key passphrase (empty: keep the current one)", hide_input=True,
                                   default="", show_default=False, err=True)
            new_passphrase = entered or None
    result = repository.rotate(role, root_passphrase=passphrase, new_root_passphrase=new_passphrase)
    info = repository.fingerprints()
    result["fingerprints"] = info
    if as_json:
        emit_json(result)
        return
    if role == "director":
        console().print(f"New director key {result['director_key']}; provision devices with "
                        f"{result['director_public_key']}")
        return
    console().print(f"Rotated {role}: revoked {', '.join(result['revoked'])}; new key {result['new_key']}; "
                    f"root is now version {result['root_version']}.")
    _echo_fingerprints(info)


# -- bundle ----------------------------------------------------------------------------------------

@click.group()
def bundle() -> None:
    """Build, inspect, verify and export model bundles."""


def _meta_options(values: tuple[str, ...]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInputError(f"--meta {item!r}: use KEY=VALUE")
        meta[key] = value
    return meta


@bundle.command("build")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Bundle name (a-z, 0-9, '.', '_', '-').")
@click.option("--version", "version", required=True, help="Bundle version, e.g. 1.4.0.")
@click.option("--golden", type=click.Path(path_type=Path), help="Golden vectors (default: MODEL.golden.npz).")
@click.option("--labels", type=click.Path(path_type=Path), help="Labels, one per line.")
@click.option("--report", type=click.Path(path_type=Path), help="Converter report (default: MODEL.report.json).")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Free metadata (repeatable).")
@click.option("--tag", "tags", multiple=True, help="A device tag the bundle is meant for (repeatable).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The bundle file to write.")
@_json_option
def bundle_build(model: Path, name: str, version: str, golden: Path | None, labels: Path | None,
                 report: Path | None, meta: tuple[str, ...], tags: tuple[str, ...], out: Path,
                 as_json: bool) -> None:
    """Pack MODEL, its manifest, golden vectors, labels and report into one bundle file."""
    from edgeship.ota.bundle_build import build_bundle, sidecar_files

    found = sidecar_files(model)
    golden = golden or found["golden"]
    report = report or found["report"]
    for label, path in (("golden vectors", golden), ("labels", labels), ("report", report)):
        if path is not None and not path.is_file():
            raise BadInputError(f"{label} file {path}: no such file")
    with _progress(as_json) as progress:
        manifest = build_bundle(model, name=name, version=version, out=out, golden=golden, labels=labels,
                                report=report, meta=_meta_options(meta), tags=list(tags), progress=progress)
    if as_json:
        emit_json({"bundle": str(out), "size": out.stat().st_size, "manifest": manifest.to_dict()})
        return
    used = [f"{k} {p}" for k, p in (("golden", golden), ("report", report), ("labels", labels)) if p]
    console().print(f"Wrote {out} ({out.stat().st_size} bytes): {manifest.name} {manifest.version}, "
                    f"{manifest.format}" + (f"; with {', '.join(used)}" if used else ""))


@bundle.command("inspect")
@click.argument("bundle_file", type=click.Path(path_type=Path))
@_json_option
def bundle_inspect(bundle_file: Path, as_json: bool) -> None:
    """Print a bundle's manifest (nothing is verified but its shape)."""
    from edgeship.ota.bundle import read_manifest

    manifest = read_manifest(bundle_file)
    if as_json:
        emit_json(manifest.to_dict())
        return
    from rich.markup import escape
    from rich.table import Table

    def e(value: Any) -> str:  # manifest text is the bundle author's: never rich markup
        return escape(str(value))

    out = console()
    out.print(f"[bold]{e(manifest.name)} {e(manifest.version)}[/bold]  format {e(manifest.format)}, created "
              f"{e(manifest.created)}")
    table = Table("file", "size", "sha256")
    for member, info in manifest.files.items():
        table.add_row(e(member), str(info["size"]), e(info["sha256"]))
    out.print(table)
    sig = Table("tensor", "name", "shape", "dtype", "quantization")
    for kind in ("inputs", "outputs"):
        tensors = manifest.signature.get(kind)
        for tensor in tensors if isinstance(tensors, list) else []:
            if not isinstance(tensor, dict):
                continue
            quant = f"scale {tensor.get('scale')}, zero {tensor.get('zero_point')}" if tensor.get("scale") else "-"
            sig.add_row(kind[:-1], e(tensor.get("name")), e(tensor.get("shape")), e(tensor.get("dtype")), e(quant))
    out.print(sig)
    out.print(f"runtime: {e(manifest.runtime)}")
    if manifest.golden:
        out.print(f"golden vectors: {e(manifest.golden)}")
    if manifest.labels:
        out.print(f"labels: {len(manifest.labels)} ({e(', '.join(manifest.labels[:5]))}"
                  f"{', ...' if len(manifest.labels) > 5 else ''})")
    for key in ("preprocessing", "quality"):
        if getattr(manifest, key):
            out.print(f"{key}: {e(getattr(manifest, key))}")
    if manifest.tags:
        out.print(f"tags: {e(', '.join(manifest.tags))}")
    if manifest.meta:
        out.print(f"meta: {e(manifest.meta)}")


@bundle.command("verify")
@click.argument("bundle_file", type=click.Path(path_type=Path))
@click.option("--repo", "repo_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Check the bundle against this release repository (offline). Without it, only the "
                   "bundle's own manifest is checked.")
@_json_option
def bundle_verify(bundle_file: Path, repo_dir: Path | None, as_json: bool) -> None:
    """Verify a bundle: its members against its manifest, and against the release repository."""
    from edgeship.ota.bundle import scan_bundle
    from edgeship.ota.release import ReleaseRepository

    with _progress(as_json) as progress:
        if repo_dir is not None:
            result = ReleaseRepository(repo_dir).verify_bundle(bundle_file, progress=progress)
        else:
            scan = scan_bundle(bundle_file, progress=progress)
            result = {"name": scan.manifest.name, "version": scan.manifest.version, "length": scan.length,
                      "sha256": scan.sha256, "verified": True, "released": None}
    if as_json:
        emit_json(result)
        return
    where = f"the release repository {repo_dir}" if repo_dir else "its manifest (no --repo: not checked as released)"
    console().print(f"OK: {bundle_file} is {result['name']} {result['version']}, matching {where}")


@bundle.command("export")
@click.argument("name")
@click.argument("version")
@_repo_option
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The offline package file to write.")
@click.option("--fleet", default="default", show_default=True, help="The fleet whose devices may install it.")
@click.option("--expires", "expires", default="30d", show_default=True,
              help="How long the package's desired state stays valid.")
@click.option("--model", "models", multiple=True, metavar="NAME=VERSION",
              help="Another model for the same package (repeatable): devices then get every model in it "
                   "(desired-state schema 2, multi-model agents only).")
@_json_option
def bundle_export(name: str, version: str, repo_dir: Path, out: Path, fleet: str, expires: str,
                  models: tuple[str, ...], as_json: bool) -> None:
    """Write an offline update package (for USB sticks): one bundle or several, the metadata and a
    signed desired state."""
    from edgeship.ota.errors import BadInputError
    from edgeship.ota.release import ReleaseRepository, parse_duration

    also = []
    for item in models:
        other, sep, other_version = item.partition("=")
        if not sep or not other or not other_version:
            raise BadInputError(f"--model {item!r}: use NAME=VERSION (e.g. kws=1.2.0)")
        also.append((other, other_version))
    result = ReleaseRepository(repo_dir).export(name, version, out, fleet=fleet,
                                                expires_in=_dt.timedelta(seconds=parse_duration(expires)),
                                                also=also)
    from edgeship.ota.director import parse_utc

    # a package whose metadata lapses well before its desired state is a trap for a USB stick
    if parse_utc(result["metadata_expires"]) < parse_utc(result["expires"]) - _dt.timedelta(hours=1):
        click.echo(f"warning: the package can be installed only until {result['metadata_expires']}, when its "
                   f"{result['metadata_expires_role']} metadata expires; for a stick that travels, first run "
                   f"`edgeship repo refresh --repo {repo_dir} --expires {result['metadata_expires_role']}={expires}`",
                   err=True)
    if as_json:
        emit_json(result)
        return
    held = ", ".join(f"{m['bundle']} {m['version']}" for m in result["models"]) if "models" in result \
        else f"{result['bundle']} {result['version']}"
    console().print(f"Wrote {out}: {held} for every device of fleet "
                    f"{fleet!r} (sequence {result['sequence']}, valid until {result['expires']})")


# -- publish ---------------------------------------------------------------------------------------

@click.command("publish")
@click.argument("bundle_file", type=click.Path(path_type=Path))
@_repo_option
@click.option("--deltas", "deltas", type=click.IntRange(0, 100), default=None,
              help="Build deltas from this many of the latest published versions (default: `deltas` in the "
                   "repository's config.json, else 2; 0: none).")
@click.option("--no-compress", "no_compress", is_flag=True,
              help="Do not publish the bundle compressed with zstd beside it.")
@_json_option
def publish(bundle_file: Path, repo_dir: Path, deltas: int | None, no_compress: bool, as_json: bool) -> None:
    """Publish BUNDLE_FILE into the release repository (new targets, snapshot, timestamp), with its
    compressed copy and deltas from earlier versions as companion targets (docs/deltas.md)."""
    import tempfile

    from edgeship.ota.release import ReleaseRepository
    from edgeship.toolkit.deltas import build_companions

    repository = ReleaseRepository(repo_dir)
    with _progress(as_json) as progress:
        info = repository.publish(bundle_file, progress=progress)
    bases = repository.delta_bases() if deltas is None else deltas
    with tempfile.TemporaryDirectory(prefix="edgeship-publish-") as scratch:
        built = build_companions(repository.targets(), info, Path(scratch), bases=bases, compress=not no_compress)
        added = repository.add_companions(info.name, info.version, built.files)
    doc = {**info.to_dict(), "companions": [c.to_dict() for c in added], "skipped": built.skipped}
    if as_json:
        emit_json(doc)
        return
    out = console()
    out.print(f"Published {info.name} {info.version} (serving version {info.serving_version}) as "
              f"{info.path} ({info.length} bytes, sha256 {info.sha256})")
    for companion in added:
        what = "compressed" if companion.kind == "compressed" else f"delta from {companion.base_version}"
        out.print(f"  {what}: {companion.path} ({companion.length} bytes, "
                  f"{companion.length / max(info.length, 1):.1%} of the bundle)")
    for skip in built.skipped:
        what = skip["kind"] + (f" from {skip['base_version']}" if skip.get("base_version") else "")
        out.print(f"  no {what}: {skip['reason']}")


# -- repo ------------------------------------------------------------------------------------------

@click.group()
def repo() -> None:
    """Show and refresh the release repository."""


@repo.command("status")
@_repo_option
@_json_option
def repo_status(repo_dir: Path, as_json: bool) -> None:
    """Published bundles, and when each role's metadata expires."""
    from edgeship.ota.release import ReleaseRepository

    status = ReleaseRepository(repo_dir).status()
    if as_json:
        emit_json(status)
        return
    from rich.table import Table

    out = console()
    roles = Table("role", "version", "expires", "in", "key")
    for role, info in status["roles"].items():
        left = info["expires_in_seconds"]
        when = "EXPIRED" if info["expired"] else (f"{left / 86400:.1f} d" if left >= 86400 else f"{left / 3600:.1f} h")
        roles.add_row(role, str(info["version"]), info["expires"], when, ", ".join(k[:16] for k in info["keys"]))
    out.print(roles)
    targets = Table("bundle", "version", "serving", "format", "bytes", "sha256", "companions")
    for target in status["targets"]:
        serving = target.get("serving_version")
        targets.add_row(target["name"], target["version"], "-" if serving is None else str(serving),
                        target["format"], str(target["length"]), target["sha256"][:16],
                        _companions_cell(target.get("companions") or []))
    out.print(targets if status["targets"] else "no bundles published yet")
    out.print(f"trusted root metadata: {status['root_metadata']}")
    out.print(f"director public key:   {status['director_public_key']}")


def _companions_cell(companions: list[dict[str, Any]]) -> str:
    """``zst 1,234; delta from 1.0.0 456`` (bytes of each companion target)."""
    parts = [("zst" if c["kind"] == "compressed" else f"delta from {c['base_version']}") + f" {c['length']:,}"
             for c in companions]
    return "; ".join(parts) or "-"


@repo.command("refresh")
@_repo_option
@click.option("--expires", "expires", multiple=True, metavar="ROLE=DURATION",
              help="New validity of a role, saved for later refreshes (e.g. timestamp=1d).")
@click.option("--targets", "with_targets", is_flag=True, default=None,
              help="Re-sign targets.json too (default: when less than a tenth of its validity is left).")
@click.option("--root", "with_root", is_flag=True,
              help="Re-sign root.json too, with the same key (needs the root passphrase).")
@_json_option
def repo_refresh(repo_dir: Path, expires: tuple[str, ...], with_targets: bool | None, with_root: bool,
                 as_json: bool) -> None:
    """Re-sign timestamp and snapshot (targets when due, root with --root) before they expire."""
    from edgeship.ota.release import ReleaseRepository

    repository = ReleaseRepository(repo_dir)
    expiry = _expiry_options(expires)
    passphrase = _passphrase(confirm=False) if with_root else None
    status = repository.refresh(expiry=expiry, targets=with_targets, root_passphrase=passphrase)
    if as_json:
        emit_json(status)
        return
    for role, info in status["roles"].items():
        console().print(f"{role:<10} v{info['version']:<4} expires {info['expires']}")
