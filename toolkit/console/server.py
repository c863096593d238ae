"""The console's HTTP server: stdlib ``http.server`` (as the controller's metrics and the agent's
API), one thread per connection, bounded bodies, strict security headers.

Routes (docs/console.md): ``/`` fleet, ``/devices/ID``, ``/rollouts``, ``/rollouts/ID``,
``/abtests``, ``/abtests/ID``, each with ``?part=live`` (the region the page re-fetches);
``POST /rollouts/ID/{pause,resume,abort,rollback}``, ``POST /abtests/ID/promote``;
``/login``, ``/logout``, ``/static/...``, ``/healthz``. Who may do what is ``auth.authorize``.
"""

from __future__ import annotations

__all__ = ["ConsoleServer"]

import logging
import threading
import time
import urllib.parse
from http import cookies
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from edgeship.ota.errors import BadInputError, EdgeshipError, GateFailedError, first_line

from . import views
from .auth import Credentials, Role, SessionSigner, authorize, route_kind

log = logging.getLogger(__name__)

COOKIE = "edgeship_session"
MAX_FORM_BYTES = 16 * 1024
LOGIN_FAILURE_DELAY_S = 0.5
"""A wrong secret answers after this long: guessing a 16+ character secret stays hopeless."""

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
STATIC_FILES = ("console.css", "console.js")


class _Answer(Exception):
    """Ends a request early with a status and a message page (or a redirect)."""

    def __init__(self, status: int, message: str = "", location: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.location = status, message, location


def _safe_next(target: str) -> str:
    """Only a path of this console: an open redirect would send a logged-in user elsewhere."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


class ConsoleServer:
    """Serves the console over an open fleet store; ``promotion_policy`` is the rollout policy an A/B
    promotion starts (``edgeship console`` takes it with the same options as ``abtest promote``)."""

    def __init__(self, store: Any, credentials: Credentials, host: str = "127.0.0.1", port: int = 8080,
                 signer: SessionSigner | None = None, promotion_policy: Any = None) -> None:
        views.load_templates()
        self.store = store
        self.credentials = credentials
        self.signer = signer or SessionSigner()
        self.promotion_policy = promotion_policy
        self.rollout_health = views.RolloutHealth()
        self.rollout_reader = views.RolloutReader()
        self._static = {name: (resources.files("edgeship.toolkit.console") / "static" / name).read_bytes()
                        for name in STATIC_FILES}
        console = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "edgeship-console"
            sys_version = ""
            timeout = 30  # a connection idle this long is closed

            def do_GET(self) -> None:
                console._handle(self, "GET")

            def do_POST(self) -> None:
                console._handle(self, "POST")

            def do_HEAD(self) -> None:
                console._send(self, 405, b"", "text/plain")

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("console: " + format, *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise BadInputError(f"cannot serve the console on {host}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"

    def start(self) -> ConsoleServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="console", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- one request ------------------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        parsed = urllib.parse.urlsplit(request.path)
        path = urllib.parse.unquote(parsed.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        started = time.monotonic()
        try:
            form = self._read_form(request) if method == "POST" else {}
            session, role, bearer = self._identify(request)
            kind = route_kind(method, path)
            decision = authorize(role, kind, bearer=bearer,
                                 csrf_ok=bool(session) and self.signer.check_csrf(session, form.get("csrf", "")),
                                 same_origin=self._same_origin(request))
            if decision.status == 401:
                if method == "GET" and query.get("part") != "live":
                    nxt = urllib.parse.quote(request.path, safe="")
                    raise _Answer(303, location=f"/login?next={nxt}")
                raise _Answer(401, decision.reason)
            if decision.status != 200:
                raise _Answer(decision.status, decision.reason)
            self._route(request, method, path, query, form, session, role)
        except _Answer as answer:
            if answer.location:
                self._redirect(request, answer.location)
            else:
                self._message(request, answer.status, answer.message)
        except Exception as exc:  # a bug behind one page must not take the console down: log it, answer 500
            log.exception("console %s %s failed", method, path)
            self._message(request, 500, f"internal error: {first_line(exc)}")
        finally:
            log.debug("console %s %s in %.1f ms", method, path, (time.monotonic() - started) * 1000)

    def _read_form(self, request: BaseHTTPRequestHandler) -> dict[str, str]:
        length_text = request.headers.get("Content-Length")
        if request.headers.get("Transfer-Encoding"):
            raise _Answer(411, "send a Content-Length")
        try:
            length = int(length_text or "0")
        except ValueError:
            raise _Answer(400, "bad Content-Length") from None
        if length < 0 or length > MAX_FORM_BYTES:
            raise _Answer(413, f"form over {MAX_FORM_BYTES} bytes")
        body = request.rfile.read(length).decode("utf-8", "replace")
        return {k: v[-1] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}

    def _identify(self, request: BaseHTTPRequestHandler) -> tuple[str, Role | None, bool]:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return "", self.credentials.role_for(auth[len("Bearer "):].strip()), True
        jar = cookies.SimpleCookie()
        try:
            jar.load(request.headers.get("Cookie", ""))
        except cookies.CookieError:
            return "", None, False
        morsel = jar.get(COOKIE)
        if morsel is None:
            return "", None, False
        return morsel.value, self.signer.verify(morsel.value), False

    @staticmethod
    def _same_origin(request: BaseHTTPRequestHandler) -> bool:
        host = request.headers.get("Host", "")
        source = request.headers.get("Origin") or request.headers.get("Referer") or ""
        if not host or not source or source == "null":
            return False
        return urllib.parse.urlsplit(source).netloc == host

    def _route(self, request: BaseHTTPRequestHandler, method: str, path: str, query: dict[str, str],
               form: dict[str, str], session: str, role: Role | None) -> None:
        parts = [p for p in path.split("/") if p]
        if path == "/healthz" and method == "GET":
            self._send(request, 200, b"ok\n", "text/plain; charset=utf-8")
            return
        if parts[:1] == ["static"] and method == "GET":
            name = "/".join(parts[1:])
            if name not in self._static:
                raise _Answer(404, "no such file")
            self._send(request, 200, self._static[name], STATIC_TYPES["." + name.rsplit(".", 1)[-1]],
                       cache="public, max-age=300")
            return
        if path == "/login":
            self._login(request, method, query, form)
            return
        if path == "/logout":
            if method != "POST":
                raise _Answer(405, "log out with POST")
            self._redirect(request, "/login", set_cookie=f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict")
            return
        if method == "POST":
            self._act(request, parts, form)
            return
        if method != "GET":
            raise _Answer(405, "method not allowed")
        page = self._page(parts, query)
        base = {"role": role.value if role else "", "csrf": self.signer.csrf_token(session) if session else "",
                "section": (parts[:1] or ["fleet"])[0].replace("devices", "fleet"), "title": page.title,
                "live_url": _with_query(path, {**query, "part": "live"}), "flash": query.get("done", ""),
                "flash_kind": "info"}
        template = page.template.replace(".html", "_live.html") if query.get("part") == "live" else page.template
        body = views.render(template, {**page.context, **base}).encode("utf-8")
        self._send(request, 200, body, "text/html; charset=utf-8")

    def _page(self, parts: list[str], query: dict[str, str]) -> views.Page:
        # The fleet page's filters are the caller's words (400); every other page reads one record
        # by the id in its path, and the store refusing it means there is no such record (404).
        try:
            flt = views.FleetFilter.from_query(query) if not parts else None
            devices_flt = views.RolloutDevicesFilter.from_query(query) if parts[:1] == ["rollouts"] else None
        except EdgeshipError as exc:
            raise _Answer(400, exc.message) from None
        if flt is not None:
            return views.fleet_page(self.store, flt)
        try:
            if parts[0] == "devices" and len(parts) == 2:
                return views.device_page(self.store, parts[1])
            if parts == ["rollouts"]:
                return views.rollouts_page(self.store, query.get("fleet", ""))
            if parts[0] == "rollouts" and len(parts) == 2:
                return views.rollout_page(self.store, parts[1], self.rollout_reader, self.rollout_health, devices_flt)
            if parts == ["abtests"]:
                return views.abtests_page(self.store)
            if parts[0] == "abtests" and len(parts) == 2:
                return views.abtest_page(self.store, parts[1])
        except EdgeshipError as exc:
            raise _Answer(404, exc.message) from None
        raise _Answer(404, "no such page")

    def _act(self, request: BaseHTTPRequestHandler, parts: list[str], form: dict[str, str]) -> None:
        from edgeship.toolkit.fleet_actions import (
            ROLLOUT_OPERATIONS,
            operate_rollout,
            promote_abtest,
        )

        try:
            if len(parts) == 3 and parts[0] == "rollouts" and parts[2] in ROLLOUT_OPERATIONS:
                done_word = {"pause": "paused", "resume": "resumed", "abort": "aborted", "rollback": "rolled back"}
                result = operate_rollout(self.store, parts[1], parts[2],
                                         reason=f"{done_word[parts[2]]} by the operator in the console")
                done = f"rollout {result.rollout_id} is {result.state}"
                if result.rollbacks:
                    done += f"; {len(result.rollbacks)} device(s) queued to roll back"
                self._redirect(request, _with_query(f"/rollouts/{urllib.parse.quote(parts[1])}", {"done": done}))
                return
            if len(parts) == 3 and parts[0] == "abtests" and parts[2] == "promote":
                arm = form.get("arm") or None
                if arm not in (None, "A", "B"):
                    raise _Answer(400, "arm: A or B")
                if self.promotion_policy is None:
                    raise _Answer(409, "this console was started without a promotion policy")
                promoted = promote_abtest(self.store, parts[1], self.promotion_policy, arm)
                self._redirect(request, _with_query(f"/rollouts/{urllib.parse.quote(promoted.rollout_id)}",
                                                    {"done": f"promoted {promoted.arm}: rollout {promoted.rollout_id}"}))
                return
        except GateFailedError as exc:
            raise _Answer(409, exc.message) from None
        except EdgeshipError as exc:
            raise _Answer(404 if "unknown" in exc.message else 409, exc.message) from None
        raise _Answer(404, "no such action")

    def _login(self, request: BaseHTTPRequestHandler, method: str, query: dict[str, str],
               form: dict[str, str]) -> None:
        if method == "GET":
            body = views.render("login.html", {"error": "", "next": _safe_next(query.get("next", "/"))})
            self._send(request, 200, body.encode(), "text/html; charset=utf-8")
            return
        role = self.credentials.role_for(form.get("secret", ""))
        if role is None:
            time.sleep(LOGIN_FAILURE_DELAY_S)
            body = views.render("login.html", {"error": "That token is not the operator's or a viewer's.",
                                               "next": _safe_next(form.get("next", "/"))})
            self._send(request, 401, body.encode(), "text/html; charset=utf-8")
            return
        cookie = self.signer.issue(role)
        self._redirect(request, _safe_next(form.get("next", "/")),
                       set_cookie=f"{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict; "
                                  f"Max-Age={int(self.signer.lifetime_s)}")

    # -- answers ----------------------------------------------------------------------------------

    def _send(self, request: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str,
              cache: str | None = None, extra: dict[str, str] | None = None) -> None:
        request.send_response(status)
        for name, value in SECURITY_HEADERS.items():
            request.send_header(name, cache if (name == "Cache-Control" and cache) else value)
        for name, value in (extra or {}).items():
            request.send_header(name, value)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)

    def _redirect(self, request: BaseHTTPRequestHandler, location: str, set_cookie: str | None = None) -> None:
        extra = {"Location": location}
        if set_cookie:
            extra["Set-Cookie"] = set_cookie
        self._send(request, 303, b"", "text/plain", extra=extra)

    def _message(self, request: BaseHTTPRequestHandler, status: int, message: str) -> None:
        body = views.render("message.html", {"status": status, "message": message}).encode()
        self._send(request, status, body, "text/html; charset=utf-8")


def _with_query(path: str, query: dict[str, str]) -> str:
    return path + ("?" + urllib.parse.urlencode(query) if query else "")
