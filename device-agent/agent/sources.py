"""Where an update's bundle comes from: the seam between the update driver and a transport.

A source does two things for the driver, both through the verification API that host
and device share (``edgeship.ota.director`` / ``edgeship.ota.updater``):

- ``admit`` (state DISK_CHECK): verify the director's signed desired state and say
  what it names (bundle, version, signed length, sequence);
- ``fetch`` (state FETCHING): TUF refresh, bounded download, the two-repository
  check and the safe extraction, leaving a verified bundle folder.

Sources are rebuilt after a restart from ``to_record()`` (kept in the update
record), through ``SourceRegistry``. Kinds here:

- ``package``: an offline package from ``edgeship bundle export`` (USB updates,
  ``edgeship-agent install PACKAGE``);
- ``director``: a signed desired-state envelope plus any ``FetcherInterface``; the
  fleet link registers a factory for its own kind that rebuilds its fetcher
  (MQTT blocks) and returns a ``DirectorSource``;
- ``slot``: a bundle kept in a slot on this device (``edgeship-agent rollback``): no
  transfer, its files are re-hashed against the manifest they were verified with.

ota's verification modules (tuf, cryptography) are imported only when an update
runs, so serving starts without them. The agent runs a package's or a director's
source wrapped in ``isolated.IsolatedSource``: its ``admit`` and ``fetch`` run in a
short-lived child process, so the agent idles after an update as small as before it.
This module does not know about that wrapper (the child runs these same classes).
"""

from __future__ import annotations

__all__ = [
    "Admission",
    "BundleSource",
    "DirectorSource",
    "HttpFetchPlan",
    "OfflinePackageSource",
    "SlotSource",
    "SourceContext",
    "SourceRegistry",
    "StagedBundle",
]

import datetime as _dt
import shutil
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from edgeship.ota.errors import BadInputError, EdgeshipError, SecurityError

from .config import AgentConfig
from .persistence import InstalledBundle
from .slots import free_bytes

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
    serving_version: int | None = None
    rollout: str | None = None


@dataclass(frozen=True)
class StagedBundle:
    """A verified bundle, extracted into ``root`` (FETCHING's result, kept in the record)."""

    root: str
    manifest: dict[str, Any]
    in_place: bool = False  # True: ``root`` is already a slot (rollback to a kept bundle)
    transfer: dict[str, Any] | None = None  # what travelled (edgeship.ota.delivery.TransferRecord)

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
            transfer=dict(data["transfer"]) if isinstance(data.get("transfer"), dict) else None,
        )


@dataclass
class SourceContext:
    config: AgentConfig
    last_sequence: int
    now: _dt.datetime
    work_dir: Path
    trust_dir: Path
    base_bundle: Path | None = None
    """The bundle file of the model's active slot, if it kept one: a delta from it is tried first."""
    base_version: str | None = None


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

    def precheck(self, ctx: SourceContext) -> None:
        """Cheap checks before any work (an isolated source runs them in the agent, before
        a child starts): e.g. the package exists and fits on the disk."""
        return None

    def cleanup(self, ctx: SourceContext) -> None:
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
    link's, made without TUF) or an ``HttpFetchPlan``. ``model``: which model's entry of
    a schema-2 document this update installs (None: a schema-1 document's one bundle).
    """

    kind = "director"

    def __init__(
        self,
        envelope: dict[str, Any],
        fetcher: Any,
        record: dict[str, Any] | None = None,
        *,
        model: str | None = None,
    ) -> None:
        self.envelope = envelope
        self.fetcher = fetcher
        self._record = dict(record or {"kind": self.kind})
        self._record.setdefault("envelope", envelope)
        if model is not None:
            self._record["model"] = model
        self.model: str | None = self._record.get("model")
        self._verified: Any = None
        self._entry: Any = None

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
        if self.model is not None:
            entry = (signed.get("models") or {}).get(self.model) if isinstance(signed.get("models"), dict) else None
            if isinstance(entry, dict):
                signed = entry
        return f"{self._record.get('kind')}: {signed.get('bundle', '?')} {signed.get('version', '?')}"

    def _desired(self, ctx: SourceContext) -> Any:
        """The verified document, narrowed to this source's model (verified once per source)."""
        from edgeship.ota.director import load_director_public_key, verify_desired_state

        if self._verified is None:
            try:
                key = load_director_public_key(ctx.config.director_key)
            except SecurityError:
                raise
            except EdgeshipError as exc:
                raise EdgeshipError(f"director key {ctx.config.director_key}: {exc.message}") from None
            desired = verify_desired_state(
                self.envelope,
                key,
                device=ctx.config.device_id,
                fleet=ctx.config.fleet,
                last_sequence=ctx.last_sequence,
                now=ctx.now,
            )
            name = self.model or desired.bundle
            self._entry = desired.models().get(name)
            self._verified = desired if self.model is None and not desired.schema2 else desired.for_model(name)
        return self._verified

    def admit(self, ctx: SourceContext) -> Admission:
        desired = self._desired(ctx)
        entry = self._entry
        return Admission(
            name=desired.bundle,
            version=desired.version,
            length=int(desired.length),
            sequence=int(desired.sequence),
            deployment=desired.deployment,
            target=desired.target,
            serving_version=entry.serving_version if entry is not None else None,
            rollout=desired.rollout,
        )

    def fetch(self, ctx: SourceContext) -> StagedBundle:
        from edgeship.ota.updater import fetch_verified_bundle

        desired = self._desired(ctx)
        _seed_trust(ctx)
        verified = fetch_verified_bundle(
            trust_dir=ctx.trust_dir,
            desired=desired,
            fetcher=self._tuf_fetcher(),
            work_dir=ctx.work_dir / "bundle",
            now=ctx.now,
            base_bundle=ctx.base_bundle,
            base_version=ctx.base_version,
            free_bytes=free_bytes,
        )
        return StagedBundle(root=str(verified.root), manifest=verified.manifest.to_dict(), transfer=verified.transfer)


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
    document for device ``"*"`` of the fleet, verified exactly like a fleet update.
    ``model``: which model of a package that carries several (None: its only one)."""

    kind = "package"

    def __init__(self, path: str | Path, *, model: str | None = None) -> None:
        self.path = Path(path).resolve()
        self.model = model
        self._director: DirectorSource | None = None

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": self.kind, "path": str(self.path)}
        if self.model is not None:
            record["model"] = self.model
        return record

    def describe(self) -> str:
        return f"offline package {self.path}" + (f" (model {self.model})" if self.model else "")

    def precheck(self, ctx: SourceContext) -> None:
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

    def _opened(self, ctx: SourceContext) -> DirectorSource:
        if self._director is None:
            from edgeship.ota.updater import open_offline_package

            unpack = ctx.work_dir / "package"
            shutil.rmtree(unpack, ignore_errors=True)
            self.precheck(ctx)
            package = open_offline_package(self.path, unpack)
            self._director = DirectorSource(package.desired_envelope, package.fetcher, model=self.model)
        return self._director

    def admit(self, ctx: SourceContext) -> Admission:
        return self._opened(ctx).admit(ctx)

    def fetch(self, ctx: SourceContext) -> StagedBundle:
        return self._opened(ctx).fetch(ctx)

    def cleanup(self, ctx: SourceContext) -> None:
        shutil.rmtree(ctx.work_dir / "package", ignore_errors=True)


class SlotSource(BundleSource):
    """A bundle kept on this device (rollback): re-hashed, not transferred."""

    kind = "slot"

    def __init__(self, bundle: InstalledBundle, slots_dir: Path | None = None) -> None:
        self.bundle = bundle
        self.slots_dir = slots_dir
        """The model's slots folder (None: the config's, one model per agent)."""

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": self.kind, "bundle": self.bundle.to_dict()}
        if self.slots_dir is not None:
            record["slots_dir"] = str(self.slots_dir)
        return record

    def describe(self) -> str:
        return f"kept slot {self.bundle.slot} ({self.bundle.label})"

    def admit(self, ctx: SourceContext) -> Admission:
        return Admission(name=self.bundle.name, version=self.bundle.version, length=0)

    def fetch(self, ctx: SourceContext) -> StagedBundle:
        import json

        root = (self.slots_dir or ctx.config.slots_dir) / self.bundle.slot
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
    """kind -> factory that rebuilds a source from its record (after a restart).

    ``wrap``: applied to every rebuilt source (the agent passes the isolation wrapper, so a
    resumed update is verified in a child like a new one)."""

    def __init__(self, wrap: Callable[[BundleSource], BundleSource] | None = None) -> None:
        self.wrap = wrap
        self._factories: dict[str, SourceFactory] = {
            OfflinePackageSource.kind: lambda r: OfflinePackageSource(r["path"], model=r.get("model")),
            SlotSource.kind: lambda r: SlotSource(
                InstalledBundle.from_dict(r["bundle"]), Path(r["slots_dir"]) if r.get("slots_dir") else None
            ),
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
        source = factory(record)
        return self.wrap(source) if self.wrap is not None else source
