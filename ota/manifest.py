"""The bundle manifest (``manifest.json``, schema ``SCHEMA_VERSION``): what a bundle holds.

Pure: a validated frozen dataclass from JSON and back; docs/bundle-format.md
documents every field. :mod:`edgeship.ota.bundle` builds, reads and extracts
bundles around it.
"""

from __future__ import annotations

__all__ = [
    "GOLDEN_NAME",
    "LABELS_NAME",
    "MANIFEST_NAME",
    "MODEL_FILES",
    "REPORT_NAME",
    "SCHEMA_VERSION",
    "BundleManifest",
]

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .archive import ManifestError
from .errors import BadInputError
from .versions import check_name, parse_version

SCHEMA_VERSION = 1
"""The manifest schema this code writes and reads (``"schema"`` in manifest.json)."""
MANIFEST_NAME = "manifest.json"
MODEL_FILES = {"tflite": "model.tflite", "onnx": "model.onnx"}
GOLDEN_NAME = "golden.npz"
LABELS_NAME = "labels.txt"
REPORT_NAME = "report.json"
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BundleManifest:
    """What a bundle holds, as ``manifest.json`` states it (schema ``SCHEMA_VERSION``).

    Attributes:
        files: member name -> ``{"size": int, "sha256": hex}`` for every member but
            the manifest itself.
        runtime: runtime requirements: ``runtime`` (tflite | onnxruntime), ``min_version``,
            ``architectures``, ``int8_io``, ``operators``, ``delegates``.
        signature: ``ModelSignature.to_dict()`` of the model.
        golden: ``{"file", "atol", "rtol"}`` or None when the bundle has no golden vectors.
        labels: the class labels, in output order (also in ``labels.txt``); empty if none.
        quality: the conversion's figures (accuracy, agreement, size...), as reported.
    """

    name: str
    version: str
    format: str
    model_file: str
    files: dict[str, dict[str, Any]]
    runtime: dict[str, Any] = field(default_factory=dict)
    signature: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    golden: dict[str, Any] | None = None
    labels: tuple[str, ...] = ()
    quality: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)
    created: str = ""
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "model_file": self.model_file,
            "files": {k: {"size": int(v["size"]), "sha256": str(v["sha256"])} for k, v in sorted(self.files.items())},
            "runtime": self.runtime,
            "signature": self.signature,
            "preprocessing": self.preprocessing,
            "golden": self.golden,
            "labels": list(self.labels),
            "quality": self.quality,
            "tags": list(self.tags),
            "meta": dict(self.meta),
            "created": self.created,
        }

    def to_json_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> BundleManifest:
        """Validate and load a manifest; a malformed one raises ManifestError."""
        if not isinstance(doc, Mapping):
            raise ManifestError("manifest.json is not a JSON object")
        schema = doc.get("schema")
        if schema != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema {schema!r} is not supported (this edgeship reads schema {SCHEMA_VERSION}); "
                "upgrade edgeship or rebuild the bundle"
            )
        try:
            name = check_name(doc.get("name"))  # type: ignore[arg-type]
            version = str(doc.get("version"))
            parse_version(version)
        except BadInputError as exc:
            raise ManifestError(f"manifest: {exc.message}") from None
        fmt = doc.get("format")
        if fmt not in MODEL_FILES:
            raise ManifestError(f"manifest: format {fmt!r} is not one of {sorted(MODEL_FILES)}")
        files_doc = doc.get("files")
        if not isinstance(files_doc, Mapping) or not files_doc:
            raise ManifestError("manifest: 'files' must be a non-empty object")
        files: dict[str, dict[str, Any]] = {}
        folded: dict[str, str] = {}
        for member, info in files_doc.items():
            if not isinstance(member, str) or not _MEMBER_NAME.fullmatch(member) or member == MANIFEST_NAME:
                raise ManifestError(f"manifest: file name {member!r} is not allowed (flat names of a-z, 0-9, . _ -)")
            # on a case-insensitive file system (macOS, FAT on a USB stick) both would be one file
            twin = folded.setdefault(member.lower(), member)
            if member.lower() == MANIFEST_NAME:
                twin = MANIFEST_NAME
            if twin != member:
                raise ManifestError(f"manifest: file names {twin!r} and {member!r} differ only by case")
            if not isinstance(info, Mapping):
                raise ManifestError(f"manifest: files[{member!r}] must be an object")
            size, digest = info.get("size"), info.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ManifestError(f"manifest: files[{member!r}].size must be a non-negative integer")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise ManifestError(f"manifest: files[{member!r}].sha256 must be 64 lower-case hex digits")
            files[member] = {"size": size, "sha256": digest}
        model_file = doc.get("model_file")
        if model_file != MODEL_FILES[fmt] or model_file not in files:
            raise ManifestError(
                f"manifest: model_file {model_file!r} must be {MODEL_FILES[fmt]!r} and listed in 'files'"
            )

        def obj(key: str) -> dict[str, Any]:
            value = doc.get(key) or {}
            if not isinstance(value, Mapping):
                raise ManifestError(f"manifest: {key!r} must be an object")
            return dict(value)

        golden = doc.get("golden")
        if golden is not None:
            if not isinstance(golden, Mapping) or golden.get("file") not in files:
                raise ManifestError("manifest: 'golden' must be an object whose 'file' is listed in 'files'")
            golden = dict(golden)
        labels = doc.get("labels") or []
        tags = doc.get("tags") or []
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ManifestError("manifest: 'labels' must be a list of strings")
        if not isinstance(tags, list) or not all(isinstance(x, str) for x in tags):
            raise ManifestError("manifest: 'tags' must be a list of strings")
        meta = obj("meta")
        return cls(
            name=name,
            version=version,
            format=str(fmt),
            model_file=str(model_file),
            files=files,
            runtime=obj("runtime"),
            signature=obj("signature"),
            preprocessing=obj("preprocessing"),
            golden=golden,
            labels=tuple(labels),
            quality=obj("quality"),
            tags=tuple(tags),
            meta={str(k): str(v) for k, v in meta.items()},
            created=str(doc.get("created") or ""),
        )

    @classmethod
    def from_json_bytes(cls, data: bytes) -> BundleManifest:
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(f"manifest.json is not valid UTF-8 JSON: {exc}") from None
        return cls.from_dict(doc)
