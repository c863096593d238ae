"""The HTTP(S) base URL of a copy of the release repository, checked without the
TUF client: the agent checks its ``[broker] repository_url`` setting at start with
this, and only the short-lived verification process builds the fetcher itself
(``edgeship.ota.http_fetcher.HttpFetcher``, which checks with this too)."""

from __future__ import annotations

__all__ = ["check_http_base_url"]

import urllib.parse

from .errors import BadInputError


def check_http_base_url(base_url: str) -> urllib.parse.SplitResult:
    """``base_url``'s parts, or BadInputError: it must be http(s)://HOST[:PORT][/PATH]
    without a query or fragment."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadInputError(f"HTTP fetcher base URL {base_url!r} must be http://HOST[:PORT][/PATH] or https://...")
    if parts.query or parts.fragment:
        raise BadInputError(f"HTTP fetcher base URL {base_url!r} must not have a query or fragment")
    return parts
