"""Who may do what in the console. Pure: secrets, roles, session cookies, CSRF tokens and the
authorization table, with no HTTP in them (the server asks; docs/console.md lists the rules).

- Two roles: ``viewer`` reads every page; ``operator`` also presses buttons (pause, resume,
  abort, roll back, promote). Each role has its own secret (a token, or a password: any string
  of 16+ characters), from the environment, never from a file in the repository.
- A login trades the secret for a session cookie: ``role.expiry.nonce.signature``, signed with
  HMAC-SHA256 under a key made at start (sessions end with the process), ``HttpOnly``,
  ``SameSite=Strict``. Scripts may send ``Authorization: Bearer SECRET`` instead.
- Every state-changing request is a POST that carries the session's CSRF token (an HMAC of the
  session) and an ``Origin`` (or ``Referer``) of the console itself; a bearer-token request needs
  no CSRF token (a browser never adds that header on its own).
"""

from __future__ import annotations

__all__ = ["MIN_SECRET_LENGTH", "Credentials", "Decision", "Role", "SessionSigner", "authorize", "route_kind"]

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from edgeship.ota.errors import BadInputError

MIN_SECRET_LENGTH = 16
OPERATOR_ENV = "EDGESHIP_CONSOLE_OPERATOR_TOKEN"
VIEWER_ENV = "EDGESHIP_CONSOLE_VIEWER_TOKEN"


class Role(str, Enum):
    VIEWER = "viewer"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Credentials:
    """The secrets of the two roles (a role without a secret cannot log in)."""

    operator: str | None
    viewer: str | None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Credentials:
        env = os.environ if environ is None else environ
        found = cls(operator=env.get(OPERATOR_ENV) or None, viewer=env.get(VIEWER_ENV) or None)
        for name, value in ((OPERATOR_ENV, found.operator), (VIEWER_ENV, found.viewer)):
            if value is not None and len(value) < MIN_SECRET_LENGTH:
                raise BadInputError(f"{name} is {len(value)} characters long; use at least {MIN_SECRET_LENGTH} "
                                    "(for example: python3 -c 'import secrets; print(secrets.token_urlsafe(24))')")
        if found.operator is None and found.viewer is None:
            raise BadInputError(f"the console needs a secret: set {OPERATOR_ENV} (and {VIEWER_ENV} for read-only "
                                "users) in its environment")
        if found.operator is not None and found.operator == found.viewer:
            raise BadInputError(f"{OPERATOR_ENV} and {VIEWER_ENV} are the same: a viewer would be an operator")
        return found

    def role_for(self, secret: str) -> Role | None:
        """The role whose secret this is, compared in constant time (both compared, always)."""
        given = secret.encode("utf-8", "surrogateescape")
        is_operator = self.operator is not None and hmac.compare_digest(given, self.operator.encode())
        is_viewer = self.viewer is not None and hmac.compare_digest(given, self.viewer.encode())
        if is_operator:
            return Role.OPERATOR
        if is_viewer:
            return Role.VIEWER
        return None


class SessionSigner:
    """Session cookies and CSRF tokens signed with one key per console process."""

    def __init__(self, key: bytes | None = None, lifetime_s: float = 12 * 3600.0) -> None:
        self._key = key or secrets.token_bytes(32)
        self.lifetime_s = lifetime_s

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def issue(self, role: Role, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + self.lifetime_s)
        body = f"{role.value}.{expiry}.{secrets.token_hex(8)}"
        return f"{body}.{self._sign(body)}"

    def verify(self, cookie: str, now: float | None = None) -> Role | None:
        """The session's role, or None for a forged, altered or expired cookie."""
        parts = cookie.split(".")
        if len(parts) != 4:
            return None
        body, signature = ".".join(parts[:3]), parts[3]
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            role, expiry = Role(parts[0]), int(parts[1])
        except ValueError:
            return None
        return role if expiry > (time.time() if now is None else now) else None

    def csrf_token(self, cookie: str) -> str:
        return self._sign("csrf:" + cookie)

    def check_csrf(self, cookie: str, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.csrf_token(cookie).encode())


ROUTE_KINDS = ("public", "page", "action")


def route_kind(method: str, path: str) -> str:
    """``public`` (login, static assets, health), ``action`` (a POST that changes the fleet) or ``page``."""
    if path in ("/login", "/healthz") or path.startswith("/static/"):
        return "public"
    if method == "POST" and path != "/logout":
        return "action"
    return "page"


@dataclass(frozen=True)
class Decision:
    status: int  # 200 allowed; 401 log in first; 403 not for this role or failed CSRF/origin
    reason: str = ""


def authorize(role: Role | None, kind: str, *, csrf_ok: bool, same_origin: bool, bearer: bool) -> Decision:
    """The console's access rule, as a table (docs/console.md):

    | who | public | page (GET, logout) | action (POST) |
    | anonymous | 200 | 401 | 401 |
    | viewer | 200 | 200 | 403 |
    | operator | 200 | 200 (logout: CSRF) | 200 with CSRF token and same origin, or bearer |
    """
    if kind == "public":
        return Decision(200)
    if role is None:
        return Decision(401, "log in first")
    if kind == "page":
        return Decision(200)
    if role is not Role.OPERATOR:
        return Decision(403, "read-only: this needs the operator role")
    if bearer:
        return Decision(200)
    if not same_origin:
        return Decision(403, "refused: the request did not come from the console's own pages")
    if not csrf_ok:
        return Decision(403, "refused: missing or wrong CSRF token (reload the page)")
    return Decision(200)
