"""Where an update's bundle comes from: the seam between the update driver and a transport.

A source does two things for the driver, both through issue 3's verification API
(``edgeship.ota.director`` / ``edgeship.ota.updater``):

- ``admit`` (state DISK_CHECK): verify the director's signed desired state and say
  what it names (bundle, version, signed length, sequence);
- ``fetch`` (state FETCHING): TUF refresh, bounded download, the two-repository
  check and the safe extraction, leaving a verified bundle folder.

Sources are rebuilt after a restart from ``to_record()`` (kept in the update
record), through ``SourceRegistry``. Kinds here:

- ``package``: an offline package from ``edgeship bundle export`` (USB updates,
  ``edgeship-agent install PACKAGE``);
- ``director``: a signed desired-state envelope plus any ``FetcherInterface``; the
  fleet (issue 5) registers a factory for its own kind that rebuilds its fetcher
  (MQTT blocks) and returns a ``DirectorSource``;
- ``slot``: a bundle kept in a slot on this device (``edgeship-agent rollback``): no
  transfer, its files are re-hashed against the manifest they were verified with.

ota's verification modules (tuf, cryptography) are imported only when an update
runs, so serving starts without them; for an offline package they are imported
only in a short-lived child process (isolated.py), so the agent idles after an
update as small as before it.
"""

from __future__ import annotations

__all__ = [
    "VERIFY_IN_PROCESS_ENV",
    "Admission",
    "BundleSource",
    "DirectorSource",
    "HttpFetchPlan",
    "OfflinePackageSource",
    "SlotSource",
    "SourceContext",
    "SourceRegistry",
    "StagedBundle",
    "verify_in_child",
]

import datetime as _dt
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from edgeship.ota.errors import BadInputError, EdgeshipError, SecurityError

from .config import AgentConfig
from .persistence import InstalledBundle
from .slots import free_bytes

VERIFY_IN_PROCESS_ENV = "EDGESHIP_AGENT_VERIFY_IN_PROCESS"


def verify_in_child() -> bool:
    """Whether update verification runs in a short-lived child (the default), or in
    the agent's own process (``EDGESHIP_AGENT_VERIFY_IN_PROCESS=1``)."""
    return os.environ.get(VERIFY_IN_PROCESS_ENV) != "1"
"""Set to ``1``: an offline package is verified in the agent's own process (the
behaviour before isolated.py; costs ~15 MB of idle RSS for good)."""

PACKAGE_COPIES = 3
"""An offline package's bytes exist up to three times during an install: the unpacked
package, the bundle downloaded from it, and the extracted bundle."""


@dataclass(frozen=True)
class Admission:
    """What a verified desired state names."""

    name: str
    version: str
    length: int
    sequence: int | None = None
    deployment: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class StagedBundle:
    """A verified bundle, extracted into ``root`` (FETCHING's result, kept in the record)."""

    root: str
    manifest: dict[str, Any]
    in_place: bool = False  # True: ``root`` is already a slot (rollback to a kept bundle)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagedBundle:
        return cls(
            root=str(data["root"]),
            manifest=dict(data["manifest"]),
            in_place=bool(data.get("in_place")),
        )


@dataclass
class SourceContext:
    config: AgentConfig
    last_sequence: int
    now: _dt.datetime
    work_dir: Path
    trust_dir: Path
    cache: dict[str, Any] = field(default_factory=dict)


class BundleSource(ABC):
    """One update's origin. Implementations must be rebuildable from ``to_record()``."""

    kind: ClassVar[str] = ""

    @abstractmethod
    def to_record(self) -> dict[str, Any]:
        """JSON-able description, kept in the update record; must include ``kind``."""

    @abstractmethod
    def admit(self, ctx: SourceContext) -> Admission:
        """Verify what is asked (SecurityError: REJECTED) and say its size."""

    @abstractmethod
    def fetch(self, ctx: SourceContext) -> StagedBundle:
        """Transfer, verify and extract the bundle under ``ctx.work_dir``."""

    def describe(self) -> str:
        return self.kind

    def cleanup(self, ctx: SourceContext) -> None:  # noqa: B027 - optional hook, nothing by default
        """Remove what the source left in the work folder (after the update ends)."""
        return None


@dataclass(frozen=True)
class HttpFetchPlan:
    """A fleet link's HTTPS release repository: what a (child) verifier needs to
    build its ``HttpFetcher`` (no TUF import to describe it)."""

    url: str
    work_dir: str
    ca_file: str | None = None


class DirectorSource(BundleSource):
    """A director envelope and a fetcher: the path every fleet update takes.

    ``fetcher``: a TUF ``FetcherInterface``, an ``MqttBlockDownloader`` (the fleet
    link's, made without TUF) or an ``HttpFetchPlan``. ``isolate``: admit and fetch
    run in a short-lived child (isolated.py), which downloads through this
    process's fetcher (or, for HTTPS, by itself); the fleet link sets it so that
    the verification's imports (TUF, cryptography) never enter the agent.
    """

    kind = "director"

    def __init__(
        self,
        envelope: dict[str, Any],
        fetcher: Any,
        record: dict[str, Any] | None = None,
        *,
        isolate: bool = False,
    ) -> None:
        self.envelope = envelope
        self.fetcher = fetcher
        self.isolate = isolate
        self._record = dict(record or {"kind": self.kind})
        self._record.setdefault("envelope", envelope)

    def _run_isolated(self, op: str, ctx: SourceContext) -> Any:
        from .isolated import run_isolated

        plan: dict[str, Any] = {"director": True, "http": None}
        if isinstance(self.fetcher, HttpFetchPlan):
            plan["http"] = (self.fetcher.url, self.fetcher.work_dir, self.fetcher.ca_file)
        return run_isolated(op, self.to_record(), ctx, fetcher=self.fetcher, plan=plan)

    def _tuf_fetcher(self) -> Any:
        """The fetcher as the TUF client wants it (in-process work)."""
        fetcher = self.fetcher
        if isinstance(fetcher, HttpFetchPlan):
            from edgeship.ota.http_fetcher import HttpFetcher

            return HttpFetcher(fetcher.url, work_dir=fetcher.work_dir, ca_file=fetcher.ca_file)
        if hasattr(fetcher, "chunks") and not hasattr(fetcher, "download_bytes"):
            from edgeship.ota.blocks import DownloaderFetcher

            return DownloaderFetcher(fetcher)
        return fetcher

    def to_record(self) -> dict[str, Any]:
        return dict(self._record)

    def describe(self) -> str:
        signed = self.envelope.get("signed", {}) if isinstance(self.envelope, dict) else {}
        return (
            f"{self._record.get('kind')}: {signed.get('bundle', '?')} {signed.get('version', '?')}"
        )

    def _desired(self, ctx: SourceContext) -> Any:
        from edgeship.ota.director import load_director_public_key, verify_desired_state

        if "desired" not in ctx.cache:
            try:
                key = load_director_public_key(ctx.config.director_key)
            except SecurityError:
                raise
            except EdgeshipError as exc:
                raise EdgeshipError(
                    f"director key {ctx.config.director_key}: {exc.message}"
                ) from None
            ctx.cache["desired"] = verify_desired_state(
                self.envelope,
                key,
                device=ctx.config.device_id,
                fleet=ctx.config.fleet,
                last_sequence=ctx.last_sequence,
                now=ctx.now,
            )
        return ctx.cache["desired"]

    def admit(self, ctx: SourceContext) -> Admission:
        if self.isolate:
            result: Admission = self._run_isolated("admit", ctx)
            return result
        desired = self._desired(ctx)
        return Admission(
            name=desired.bundle,
            version=desired.version,
            length=int(desired.length),
            sequence=int(desired.sequence),
            deployment=desired.deployment,
            target=desired.target,
        )

    def fetch(self, ctx: SourceContext) -> StagedBundle:
        if self.isolate:
            staged: StagedBundle = self._run_isolated("fetch", ctx)
            return staged
        from edgeship.ota.updater import fetch_verified_bundle

        desired = self._desired(ctx)
        _seed_trust(ctx)
        verified = fetch_verified_bundle(
            trust_dir=ctx.trust_dir,
            desired=desired,
            fetcher=self._tuf_fetcher(),
            work_dir=ctx.work_dir / "bundle",
            now=ctx.now,
        )
        return StagedBundle(root=str(verified.root), manifest=verified.manifest.to_dict())


def _seed_trust(ctx: SourceContext) -> None:
    """The device's TUF folder starts from the provisioned root metadata."""
    root = ctx.trust_dir / "root.json"
    if root.exists():
        return
    ctx.trust_dir.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(ctx.config.root_metadata, root)
    except OSError as exc:
        raise EdgeshipError(
            f"trusted root metadata {ctx.config.root_metadata} cannot be read ({exc.strerror or exc}); "
            "provision the device with the release repository's root.json"
        ) from None


class OfflinePackageSource(BundleSource):
    """``edgeship bundle export`` package: TUF metadata, the bundle and a director
    document for device ``"*"`` of the fleet, verified exactly like a fleet update."""

    kind = "package"

    def __init__(self, path: str | Path, *, isolate: bool | None = None) -> None:
        self.path = Path(path).resolve()
        # admit and fetch (TUF, cryptography, tar extraction) run in a short-lived child
        # interpreter so their imports never enter the serving process (isolated.py);
        # EDGESHIP_AGENT_VERIFY_IN_PROCESS=1 keeps them in-process (diagnostics, the
        # benchmark's comparison; docs/agent.md)
        if isolate is None:
            isolate = verify_in_child()
        self.isolate = isolate

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path)}

    def describe(self) -> str:
        return f"offline package {self.path}"

    def _check_space(self, ctx: SourceContext) -> None:
        """The package exists and its copies fit, before the first copy is made."""
        if not self.path.is_file():
            raise BadInputError(
                f"offline package {self.path}: no such file (was the medium removed?)"
            )
        size = self.path.stat().st_size
        need = size * PACKAGE_COPIES + (1 << 20)
        free = free_bytes(ctx.work_dir)
        if free < need:  # before the first copy: the same clear message as DISK_CHECK's
            raise EdgeshipError(
                f"insufficient disk: need {need} bytes (offline package {size} bytes, unpacked, "
                f"downloaded and extracted), free {free} bytes on {ctx.config.data_dir}"
            )

    def _director(self, ctx: SourceContext) -> DirectorSource:
        if "package" not in ctx.cache:
            from edgeship.ota.updater import open_offline_package

            unpack = ctx.work_dir / "package"
            shutil.rmtree(unpack, ignore_errors=True)
            self._check_space(ctx)
            package = open_offline_package(self.path, unpack)
            ctx.cache["package"] = DirectorSource(package.desired_envelope, package.fetcher)
        source: DirectorSource = ctx.cache["package"]
        return source

    def admit(self, ctx: SourceContext) -> Admission:
        if self.isolate:
            from .isolated import run_isolated

            self._check_space(ctx)  # here too: no child is started for a package that cannot fit
            result: Admission = run_isolated("admit", self.to_record(), ctx)
            return result
        return self._director(ctx).admit(ctx)

    def fetch(self, ctx: SourceContext) -> StagedBundle:
        if self.isolate:  # the package is unpacked and the desired state verified again there
            from .isolated import run_isolated

            staged: StagedBundle = run_isolated("fetch", self.to_record(), ctx)
            return staged
        return self._director(ctx).fetch(ctx)

    def cleanup(self, ctx: SourceContext) -> None:
        shutil.rmtree(ctx.work_dir / "package", ignore_errors=True)


class SlotSource(BundleSource):
    """A bundle kept on this device (rollback): re-hashed, not transferred."""

    kind = "slot"

    def __init__(self, bundle: InstalledBundle) -> None:
        self.bundle = bundle

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.kind, "bundle": self.bundle.to_dict()}

    def describe(self) -> str:
        return f"kept slot {self.bundle.slot} ({self.bundle.label})"

    def admit(self, ctx: SourceContext) -> Admission:
        return Admission(name=self.bundle.name, version=self.bundle.version, length=0)

    def fetch(self, ctx: SourceContext) -> StagedBundle:
        import json

        root = ctx.config.slots_dir / self.bundle.slot
        try:
            manifest = json.loads((root / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise EdgeshipError(
                f"kept bundle {self.bundle.label} in {root} has no readable manifest ({exc})"
            ) from None
        files = manifest.get("files") or {}
        if files != self.bundle.files:
            raise SecurityError(
                f"kept bundle {self.bundle.label}: manifest in {root} differs from the one installed"
            )
        return StagedBundle(root=str(root), manifest=manifest, in_place=True)


SourceFactory = Callable[[dict[str, Any]], BundleSource]


class SourceRegistry:
    """kind -> factory that rebuilds a source from its record (after a restart)."""

    def __init__(self) -> None:
        self._factories: dict[str, SourceFactory] = {
            OfflinePackageSource.kind: lambda r: OfflinePackageSource(r["path"]),
            SlotSource.kind: lambda r: SlotSource(InstalledBundle.from_dict(r["bundle"])),
        }

    def register(self, kind: str, factory: SourceFactory) -> None:
        """Add a kind (the fleet's MQTT source registers here)."""
        self._factories[kind] = factory

    def rebuild(self, record: dict[str, Any]) -> BundleSource:
        kind = record.get("kind")
        factory = self._factories.get(str(kind))
        if factory is None:
            raise EdgeshipError(
                f"update source of kind {kind!r} cannot be rebuilt here (known: {sorted(self._factories)}); "
                "was the agent restarted without the plug-in that started this update?"
            )
        return factory(record)
