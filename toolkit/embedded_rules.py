"""The broker's rules, as far as the embedded broker (amqtt) can follow them.

``edgeship broker run --broker-dir DIR`` starts the embedded broker with two
amqtt plugins that read the broker folder's registry (identities.json):

- ``RegistryPasswordAuth``: a client logs in with the user name and password of
  an active *password* identity (the same ``$7$`` entries Mosquitto's passwd
  holds) and a client id bound to it (``broker_config.client_id_allowed``: a
  device's is its id); anonymous clients and everyone else are refused;
- ``DeviceTopicRules``: the same per-device topic rules as the Mosquitto ACL
  (``broker_config.render_amqtt_topic_acl``, from the same topic tables), checked
  when a client publishes, subscribes, and before each message is delivered.

Both re-read the registry when it changes, so ``edgeship device revoke`` takes
effect at the next check without a restart (a revoked device's open connection
can no longer publish or receive).

What the embedded broker cannot do, and Mosquitto does (docs/security.md):
TLS and client certificates (a certificate identity cannot log in here),
MQTT 5, a CRL; passwords cross the loopback in clear. Development only.
"""

from __future__ import annotations

__all__ = ["DeviceTopicRules", "RegistryPasswordAuth", "RuledEmbeddedBroker", "rules_from_registry"]

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.plugins.topic_checking import TopicAccessControlListPlugin

from edgeship.ota.errors import BadInputError

from .broker_config import (
    AclIdentity,
    client_id_allowed,
    render_amqtt_topic_acl,
    verify_password_entry,
)
from .embedded_broker import EmbeddedBroker
from .identities import REGISTRY_FILE, BrokerFolder


class _RegistryCache:
    """identities.json, re-read when its mtime changes (one per broker folder)."""

    def __init__(self, folder: str) -> None:
        self.folder = BrokerFolder(folder)
        self._lock = threading.Lock()
        self._stamp: float | None = None
        self.passwords: dict[str, str] = {}
        self.rules: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}

    def refresh(self) -> _RegistryCache:
        path = self.folder.path / REGISTRY_FILE
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = -1
        with self._lock:
            if stamp != self._stamp:
                self.passwords, self.rules = rules_from_registry(self.folder)
                self.kinds = {r.name: r.kind for r in self.folder.records().values() if r.active}
                self._stamp = stamp
        return self


def rules_from_registry(folder: BrokerFolder) -> tuple[dict[str, str], dict[str, Any]]:
    """(user -> password entry, amqtt topic rules) of the folder's active identities."""
    active = [r for r in folder.records().values() if r.active]
    passwords = {r.name: r.password_entry for r in active if r.auth == "password" and r.password_entry}
    rules = render_amqtt_topic_acl([AclIdentity(r.name, r.kind, r.fleet) for r in active],
                                   prefix=folder.settings().prefix)
    return passwords, rules


_CACHES: dict[str, _RegistryCache] = {}


def _cache(folder: str) -> _RegistryCache:
    key = os.path.realpath(folder)
    if key not in _CACHES:
        _CACHES[key] = _RegistryCache(key)
    return _CACHES[key].refresh()


class RegistryPasswordAuth(BaseAuthPlugin):
    """Password authentication against the registry's active password identities."""

    @dataclass
    class Config:
        broker_dir: str = ""

    async def authenticate(self, *, session: Any) -> bool | None:
        if session is None or not session.username or session.password is None:
            return False
        cache = _cache(self.config.broker_dir)
        entry = cache.passwords.get(session.username)
        password = session.password.decode() if isinstance(session.password, bytes) else str(session.password)
        if entry is None or not verify_password_entry(entry, password):
            return False
        # the client id is bound to the identity: device A's password cannot take devB's session
        return client_id_allowed(cache.kinds.get(session.username, "device"), session.username,
                                 str(getattr(session, "client_id", "") or ""))


class DeviceTopicRules(BaseTopicPlugin):
    """The per-device topic rules for publish, subscribe and delivery (receive)."""

    @dataclass
    class Config:
        broker_dir: str = ""

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        if not topic:
            return False
        rules = _cache(self.config.broker_dir).rules
        key = {Action.PUBLISH: "publish-acl", Action.SUBSCRIBE: "subscribe-acl",
               Action.RECEIVE: "receive-acl"}.get(action)
        if key is None:
            return False
        user = (session.username if session is not None else None) or "anonymous"
        allowed = rules.get(key, {}).get(user, [])
        return any(TopicAccessControlListPlugin.topic_ac(topic, a) for a in allowed)


class RuledEmbeddedBroker(EmbeddedBroker):
    """EmbeddedBroker with the registry's passwords and topic rules instead of anonymous access."""

    def __init__(self, host: str, port: int, broker_dir: str | os.PathLike[str]) -> None:
        super().__init__(host, port)
        folder = BrokerFolder(broker_dir).require()
        settings = folder.settings()
        if settings.auth == "cert":
            raise BadInputError(
                f"the embedded broker authenticates with passwords only, and the broker in {folder.path} "
                "issues certificates; make a folder with `edgeship broker config --auth password`"
            )
        if not any(r.auth == "password" and r.active for r in folder.records().values()):
            raise BadInputError(f"the broker in {folder.path} has no active password identity")
        self.broker_dir = str(Path(folder.path))

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config["plugins"] = {
            f"{__name__}.RegistryPasswordAuth": {"broker_dir": self.broker_dir},
            f"{__name__}.DeviceTopicRules": {"broker_dir": self.broker_dir},
        }
        return config
