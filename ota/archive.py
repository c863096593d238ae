"""Safe, streaming reading of POSIX (ustar) tar archives: bundles and offline packages.

The reader parses tar headers itself instead of using :mod:`tarfile`, because
``tarfile`` reads pax and GNU long-name headers into memory whatever size they
claim, follows no policy on member types, and extracts first and checks later.
Here every header is judged *before* a byte of its content is read:

- the header checksum must be right (a compressed file is named as such and never
  decompressed: a decompression bomb is refused at its first block);
- member names must be UTF-8, relative, without ``..``, no longer than the limit;
  pax/GNU extension headers are refused (a bundle never needs them);
- only regular files: links, directories, devices and fifos are refused;
- a member's size is capped before it is read, and the whole stream is capped as it
  is read (an endless stream stops at the cap, not at the end of the disk).

Content is read in 1 MiB chunks, so memory does not grow with the archive. The
policy about *which* members may appear (the bundle manifest) lives with the
caller; see :mod:`edgeship.ota.bundle`.
"""

from __future__ import annotations

__all__ = [
    "CHUNK_SIZE",
    "ArchiveTooLargeError",
    "CompressedArchiveError",
    "DuplicateMemberError",
    "ExtractionLimits",
    "MalformedArchiveError",
    "ManifestError",
    "MemberHashError",
    "MemberSizeError",
    "MissingMemberError",
    "TarMember",
    "TarStreamReader",
    "TruncatedArchiveError",
    "UnexpectedMemberError",
    "UnsafeBundleError",
    "UnsafeMemberNameError",
    "UnsafeMemberTypeError",
    "check_member_path",
]

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .errors import SecurityError
from .hashing import CHUNK_SIZE

BLOCK = 512
MAX_TRAILING_PADDING = 1 << 20
"""Zero bytes accepted after the end-of-archive marker (tar pads to 10 KiB records; some tools more)."""

_COMPRESSED_MAGICS = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}
_TYPE_NAMES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a fifo",
    b"7": "a contiguous file",
    b"x": "a pax extended header",
    b"g": "a pax global header",
    b"K": "a GNU long link name",
    b"S": "a GNU sparse file",
}


class UnsafeBundleError(SecurityError):
    """A bundle or package archive is hostile or corrupt; nothing was extracted."""


class MalformedArchiveError(UnsafeBundleError):
    """The file is not a well-formed uncompressed POSIX tar archive."""


class CompressedArchiveError(MalformedArchiveError):
    """The file is compressed; edgeship archives are plain tar and are never decompressed."""


class TruncatedArchiveError(MalformedArchiveError):
    """The archive ends in the middle of a header or a member."""


class ArchiveTooLargeError(UnsafeBundleError):
    """The archive stream is longer than the configured cap (an endless stream)."""


class UnsafeMemberNameError(UnsafeBundleError):
    """A member name is absolute, climbs out with '..', is not UTF-8, or is too long."""


class UnsafeMemberTypeError(UnsafeBundleError):
    """A member is not a regular file: a link, directory, device, fifo or extension header."""


class DuplicateMemberError(UnsafeBundleError):
    """The same member name appears twice."""


class UnexpectedMemberError(UnsafeBundleError):
    """A member is not listed in the manifest (or not allowed in a package)."""


class MissingMemberError(UnsafeBundleError):
    """A member the manifest lists is not in the archive."""


class MemberSizeError(UnsafeBundleError):
    """A member is larger than its declared size or a configured cap."""


class MemberHashError(UnsafeBundleError):
    """A member's content does not match the sha256 in the manifest."""


class ManifestError(UnsafeBundleError):
    """The bundle's manifest is missing, misplaced, too large or malformed."""


@dataclass(frozen=True)
class ExtractionLimits:
    """Caps applied while an archive streams (bytes unless noted).

    The defaults fit a large edge model (a few hundred MB); a device lowers them
    in its configuration to what its storage allows.
    """

    max_member_bytes: int = 2 * 1024**3
    max_total_bytes: int = 4 * 1024**3
    max_manifest_bytes: int = 1024**2
    max_members: int = 64
    """Number of members, the manifest included."""
    max_name_bytes: int = 100
    """Longest member name; ustar's plain name field holds 100 bytes."""

    def __post_init__(self) -> None:
        for field_name in ("max_member_bytes", "max_total_bytes", "max_manifest_bytes", "max_members",
                           "max_name_bytes"):
            if int(getattr(self, field_name)) <= 0:
                raise ValueError(f"ExtractionLimits.{field_name} must be positive")


@dataclass(frozen=True)
class TarMember:
    """One regular-file member, as its header declares it."""

    name: str
    size: int
    index: int
    """Position in the archive, 0 for the first member."""


def check_member_path(name: str, raw: bytes, max_name_bytes: int, *, nested: bool = False) -> None:
    """Refuse member names that could escape the extraction folder or are unreadable.

    Args:
        name: the decoded name.
        raw: the name as stored (for the length check, in bytes).
        max_name_bytes: the longest name allowed.
        nested: whether ``a/b`` paths are allowed (offline packages); bundles are flat.
    """
    shown = name if len(name) <= 80 else name[:77] + "..."
    if len(raw) > max_name_bytes:
        raise UnsafeMemberNameError(
            f"member name {shown!r} is {len(raw)} bytes long, longer than the {max_name_bytes} allowed"
        )
    if not name:
        raise UnsafeMemberNameError("a member has an empty name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeMemberNameError(f"member {shown!r} has an absolute path")
    parts = name.split("/")
    if ".." in parts or "\\" in name:
        raise UnsafeMemberNameError(f"member {shown!r} climbs out of the archive with '..'")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafeMemberNameError(f"member {shown!r} has control characters in its name")
    if not nested and len(parts) > 1:
        raise UnsafeMemberNameError(f"member {shown!r} is in a folder; bundle members are flat files")
    if any(part in ("", ".") for part in parts):
        raise UnsafeMemberNameError(f"member {shown!r} has an empty or '.' path component")


class TarStreamReader:
    """Read an uncompressed ustar archive from a stream, one member at a time.

    Usage::

        reader = TarStreamReader(stream, limits)
        while (member := reader.next_member()) is not None:
            for chunk in reader.read_content(member):
                ...
        reader.finish()   # checks that only zero padding follows the end marker

    ``next_member`` skips whatever content of the previous member was not read.
    Each error is an :class:`UnsafeBundleError` subclass naming the member.
    """

    def __init__(self, stream: BinaryIO, limits: ExtractionLimits | None = None, *, nested: bool = False,
                 what: str = "bundle") -> None:
        self._stream = stream
        self.limits = limits or ExtractionLimits()
        self._nested = nested
        self._what = what
        self.bytes_read = 0
        self._pending = 0  # content + padding of the current member not yet consumed
        self._index = 0
        self._ended = False

    # -- low level ------------------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        """Read up to ``n`` bytes, counting them against the stream cap."""
        data = self._stream.read(n)
        self.bytes_read += len(data)
        if self.bytes_read > self.limits.max_total_bytes + 2 * CHUNK_SIZE:
            raise ArchiveTooLargeError(
                f"the {self._what} stream goes on past {self.limits.max_total_bytes} bytes, the configured cap; "
                "stopped reading"
            )
        return data

    def _read_exact(self, n: int, where: str) -> bytes:
        parts = []
        remaining = n
        while remaining:
            data = self._read(min(remaining, CHUNK_SIZE))
            if not data:
                raise TruncatedArchiveError(f"the {self._what} is truncated: it ends {where}")
            parts.append(data)
            remaining -= len(data)
        return b"".join(parts)

    def _skip(self, n: int, where: str) -> None:
        while n:
            step = min(n, CHUNK_SIZE)
            self._read_exact(step, where)
            n -= step

    # -- headers --------------------------------------------------------------------------------

    def next_member(self) -> TarMember | None:
        """Parse and judge the next header; None at the end-of-archive marker."""
        if self._ended:
            return None
        if self._pending:
            self._skip(self._pending, "inside a member")
            self._pending = 0
        header = self._read_exact(BLOCK, "inside a member header") if self.bytes_read else self._first_block()
        if header == bytes(BLOCK):
            if self._read_exact(BLOCK, "at the end-of-archive marker") != bytes(BLOCK):
                raise MalformedArchiveError(f"the {self._what} has a broken end-of-archive marker")
            self._ended = True
            return None
        self._check_checksum(header)
        typeflag = header[156:157]
        if typeflag == b"L":
            raise UnsafeMemberNameError(
                f"member {self._index} has a GNU long name (longer than 100 bytes); bundle member names are "
                f"at most {self.limits.max_name_bytes} bytes"
            )
        raw_name = header[0:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        raw = prefix + b"/" + raw_name if prefix else raw_name
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UnsafeMemberNameError(
                f"member {self._index} has a name that is not UTF-8: {raw[:80]!r}"
            ) from None
        if typeflag not in (b"0", b"\0", b""):
            kind = _TYPE_NAMES.get(typeflag, f"of unsupported tar type {typeflag!r}")
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise UnsafeMemberTypeError(f"member {shown!r} is {kind}; only regular files are allowed")
        check_member_path(name, raw, self.limits.max_name_bytes, nested=self._nested)
        size = self._parse_size(header[124:136], name)
        if self._index >= self.limits.max_members:
            raise UnsafeBundleError(
                f"the {self._what} has more than {self.limits.max_members} members, the configured cap"
            )
        if size > self.limits.max_member_bytes:
            raise MemberSizeError(
                f"member {name!r} declares {size} bytes, more than the {self.limits.max_member_bytes} allowed "
                "per member; refused before reading it"
            )
        member = TarMember(name=name, size=size, index=self._index)
        self._index += 1
        self._pending = size + (-size % BLOCK)
        return member

    def _first_block(self) -> bytes:
        first = self._read(BLOCK)
        if not first:
            raise TruncatedArchiveError(f"the {self._what} is empty")
        while len(first) < BLOCK:  # a stream may deliver the first block in pieces
            more = self._read(BLOCK - len(first))
            if not more:
                break
            first += more
        for magic, kind in _COMPRESSED_MAGICS.items():
            if first.startswith(magic):
                raise CompressedArchiveError(
                    f"the {self._what} is {kind}-compressed; edgeship {self._what}s are plain (uncompressed) "
                    "tar files and are never decompressed"
                )
        if len(first) < BLOCK:
            raise TruncatedArchiveError(f"the {self._what} is truncated: it ends inside the first header")
        return first

    def _check_checksum(self, header: bytes) -> None:
        stored_field = header[148:156]
        try:
            stored = int(stored_field.replace(b"\0", b" ").strip() or b"-1", 8)
        except ValueError:
            stored = -1
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != computed:
            raise MalformedArchiveError(
                f"the {self._what} is not a tar archive, or is corrupt: header {self._index} at byte "
                f"{self.bytes_read - BLOCK} has a bad checksum"
            )

    def _parse_size(self, field: bytes, name: str) -> int:
        if field[:1] and field[0] & 0x80:  # GNU base-256: sizes of 8 GiB and more
            value = int.from_bytes(field[1:], "big")
            if field[0] & 0x40:
                raise MalformedArchiveError(f"member {name!r} has a negative size")
            return value
        # octal digits only: int() would also take a sign ("-1" once became read(-1), the whole
        # stream at once) or underscores
        digits = field.replace(b"\0", b" ").strip()
        if digits.strip(b"01234567"):
            raise MalformedArchiveError(f"member {name!r} has an unreadable size field {field!r}")
        return int(digits or b"0", 8)

    # -- content --------------------------------------------------------------------------------

    def read_content(self, member: TarMember, *, cap: int | None = None) -> Iterator[bytes]:
        """Yield the member's content in chunks of at most 1 MiB.

        Args:
            cap: a smaller limit for this member (its declared size); checked as the
                bytes stream, so a member that grows past it is stopped there.
        """
        remaining = member.size
        delivered = 0
        while remaining:
            chunk = self._read(min(remaining, CHUNK_SIZE))
            if not chunk:
                raise TruncatedArchiveError(f"the {self._what} is truncated: it ends inside member {member.name!r}")
            remaining -= len(chunk)
            self._pending -= len(chunk)
            delivered += len(chunk)
            if cap is not None and delivered > cap:
                raise MemberSizeError(
                    f"member {member.name!r} grows past its declared size of {cap} bytes; stopped while streaming"
                )
            yield chunk
        padding = -member.size % BLOCK
        if padding:
            self._read_exact(padding, f"inside the padding of member {member.name!r}")
        self._pending = 0

    def read_small(self, member: TarMember, cap: int) -> bytes:
        """The whole content of a small member (manifest, metadata), refused above ``cap``."""
        if member.size > cap:
            raise MemberSizeError(f"member {member.name!r} is {member.size} bytes; at most {cap} are allowed")
        return b"".join(self.read_content(member, cap=cap))

    def finish(self) -> None:
        """After the end marker, only zero padding may follow (tar pads to 10 KiB records)."""
        if not self._ended:
            raise MalformedArchiveError(f"the {self._what} has no end-of-archive marker")
        padding = 0
        while True:
            data = self._read(64 * 1024)
            if not data:
                return
            if data.count(0) != len(data):
                raise MalformedArchiveError(f"the {self._what} has data after its end-of-archive marker")
            padding += len(data)
            if padding > MAX_TRAILING_PADDING:
                raise ArchiveTooLargeError(
                    f"the {self._what} goes on for more than {MAX_TRAILING_PADDING} bytes after its end-of-archive "
                    "marker; stopped reading"
                )
