"""The operator's web console: the fleet, a device, rollouts and A/B tests, read from the fleet store
the controller writes, acting only through the operator actions the CLI uses
(``edgeship.toolkit.fleet_actions``). docs/console.md.

- ``auth``: roles, sessions, CSRF tokens and the authorization table (pure).
- ``charts``: the SVG charts (pure).
- ``views``: what each page shows, read from the store, rendered with Jinja2.
- ``server``: the HTTP server (stdlib), its routes, cookies and security headers.
"""

from __future__ import annotations

__all__ = ["ConsoleServer"]

from .server import ConsoleServer
