"""Bundle names and versions: what is allowed, and how versions of one name are ordered.

Versions follow Semantic Versioning's precedence (https://semver.org, section 11)
with two relaxations: the numeric core may have any number of parts (``3``,
``1.2``, ``2024.11.3``) and missing trailing parts count as zero. Two spellings
that compare equal (``1.2`` and ``1.2.0``) name the *same* version, so publishing
one after the other is refused as "not newer": within one name the order is total.
Build metadata (``+...``) is refused rather than ignored, because two bundles that
differ only by it would be indistinguishable to the ordering.
"""

from __future__ import annotations

__all__ = ["NAME_PATTERN", "parse_version", "compare_versions", "check_name", "ParsedVersion"]

import re
from typing import Union

from .errors import BadInputError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
"""Bundle names: lower case, digits, ``.``, ``_``, ``-``; they become TUF target paths."""

_VERSION = re.compile(r"^(\d{1,9}(?:\.\d{1,9}){0,5})(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$")

_Identifier = tuple[int, Union[int, str]]
ParsedVersion = tuple[tuple[int, ...], int, tuple[_Identifier, ...]]
"""(numeric core without trailing zeros, 1 for a release / 0 for a pre-release, pre-release ids)."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid bundle name, else raise BadInputError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise BadInputError(
            f"bundle name {name!r} is not allowed: use 1-64 characters of a-z, 0-9, '.', '_', '-' "
            "starting with a letter or digit"
        )
    return name


def parse_version(version: str) -> ParsedVersion:
    """Parse ``version`` into a key that sorts by precedence.

    Raises:
        BadInputError: the string is not a version (the message shows the form).
    """
    match = _VERSION.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise BadInputError(
            f"version {version!r} is not a version: use numbers separated by dots, optionally "
            "followed by a pre-release tag (e.g. 1.4.0, 2.0.0-rc.1)"
        )
    core = [int(part) for part in match.group(1).split(".")]
    while len(core) > 1 and core[-1] == 0:
        core.pop()
    pre = match.group(2)
    if pre is None:
        return (tuple(core), 1, ())
    identifiers: list[_Identifier] = []
    for ident in pre.split("."):
        # SemVer: numeric identifiers sort numerically and before alphanumeric ones.
        identifiers.append((0, int(ident)) if ident.isdigit() else (1, ident))
    return (tuple(core), 0, tuple(identifiers))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is older than, the same as, or newer than ``b``."""
    key_a, key_b = parse_version(a), parse_version(b)
    return (key_a > key_b) - (key_a < key_b)
