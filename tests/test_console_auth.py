"""The console's access rules, table by table (pure): who may see a page, who may press a button,
what a session cookie and a CSRF token prove, and which secrets the console accepts."""

from __future__ import annotations

import pytest

from edgeship.ota.errors import BadInputError
from edgeship.toolkit.console.auth import Credentials, Role, SessionSigner, authorize, route_kind

OPERATOR, VIEWER = "o" * 24, "v" * 24


@pytest.mark.parametrize("method,path,kind", [
    ("GET", "/login", "public"), ("POST", "/login", "public"), ("GET", "/static/console.js", "public"),
    ("GET", "/healthz", "public"), ("GET", "/", "page"), ("GET", "/rollouts/r-1", "page"),
    ("GET", "/rollouts/r-1?part=live", "page"), ("POST", "/logout", "page"),
    ("POST", "/rollouts/r-1/abort", "action"), ("POST", "/abtests/t-1/promote", "action"),
    ("POST", "/", "action"),
])
def test_route_kinds(method: str, path: str, kind: str) -> None:
    assert route_kind(method, path.split("?")[0]) == kind


@pytest.mark.parametrize("role,kind,csrf,origin,bearer,status", [
    # anonymous: only the public routes
    (None, "public", False, False, False, 200),
    (None, "page", False, False, False, 401),
    (None, "action", True, True, False, 401),
    (None, "action", False, False, True, 401),  # a wrong bearer token identifies nobody
    # viewer: every page, no button
    (Role.VIEWER, "page", False, False, False, 200),
    (Role.VIEWER, "action", True, True, False, 403),
    (Role.VIEWER, "action", False, False, True, 403),
    # operator: buttons with the session's CSRF token from the console's own origin, or a bearer token
    (Role.OPERATOR, "page", False, False, False, 200),
    (Role.OPERATOR, "action", True, True, False, 200),
    (Role.OPERATOR, "action", False, True, False, 403),
    (Role.OPERATOR, "action", True, False, False, 403),
    (Role.OPERATOR, "action", False, False, True, 200),
])
def test_authorization_table(role: Role | None, kind: str, csrf: bool, origin: bool, bearer: bool,
                             status: int) -> None:
    assert authorize(role, kind, csrf_ok=csrf, same_origin=origin, bearer=bearer).status == status


def test_credentials_name_each_role_and_compare_whole_secrets() -> None:
    creds = Credentials.from_environment({"EDGESHIP_CONSOLE_OPERATOR_TOKEN": OPERATOR,
                                          "EDGESHIP_CONSOLE_VIEWER_TOKEN": VIEWER})
    assert creds.role_for(OPERATOR) is Role.OPERATOR
    assert creds.role_for(VIEWER) is Role.VIEWER
    for wrong in ("", OPERATOR[:-1], OPERATOR + "x", VIEWER.upper(), "é" * 24):
        assert creds.role_for(wrong) is None


@pytest.mark.parametrize("environ,words", [
    ({}, "needs a secret"),
    ({"EDGESHIP_CONSOLE_OPERATOR_TOKEN": "short"}, "at least 16"),
    ({"EDGESHIP_CONSOLE_OPERATOR_TOKEN": OPERATOR, "EDGESHIP_CONSOLE_VIEWER_TOKEN": OPERATOR}, "the same"),
])
def test_credentials_refuse_what_would_be_unsafe(environ: dict[str, str], words: str) -> None:
    with pytest.raises(BadInputError, match=words):
        Credentials.from_environment(environ)


def test_viewer_only_console_has_no_operator() -> None:
    creds = Credentials.from_environment({"EDGESHIP_CONSOLE_VIEWER_TOKEN": VIEWER})
    assert creds.role_for(VIEWER) is Role.VIEWER and creds.role_for("") is None


def test_session_cookies_prove_their_role_until_they_expire() -> None:
    signer = SessionSigner(lifetime_s=60)
    cookie = signer.issue(Role.VIEWER, now=1000.0)
    assert signer.verify(cookie, now=1030.0) is Role.VIEWER
    assert signer.verify(cookie, now=1061.0) is None  # expired
    role, expiry, nonce, signature = cookie.split(".")
    assert signer.verify(f"operator.{expiry}.{nonce}.{signature}", now=1030.0) is None  # promoted by hand
    assert signer.verify(f"{role}.{int(expiry) + 9999}.{nonce}.{signature}", now=1030.0) is None  # extended
    assert signer.verify(cookie + "0", now=1030.0) is None
    assert signer.verify("garbage", now=1030.0) is None
    assert SessionSigner(lifetime_s=60).verify(cookie, now=1030.0) is None  # another process's key


def test_csrf_token_belongs_to_its_session() -> None:
    signer = SessionSigner()
    one, two = signer.issue(Role.OPERATOR), signer.issue(Role.OPERATOR)
    assert signer.check_csrf(one, signer.csrf_token(one))
    assert not signer.check_csrf(one, signer.csrf_token(two))
    assert not signer.check_csrf(one, "")
