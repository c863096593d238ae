"""The zero-setup broker: amqtt (pure Python, MQTT 3.1.1) on a background thread.

``EmbeddedBroker(host, port).start()`` returns once the broker accepts
connections; ``stop()`` shuts it down and joins its thread. It is for the demo,
for development and for a small fleet on one machine; a real deployment runs
Mosquitto (or EMQX, HiveMQ, VerneMQ) with the configuration ``edgeship broker``
generates.

What the embedded broker does not do (docs/protocol.md, "Brokers"):

- MQTT 5: amqtt speaks MQTT 3.1.1 only. :class:`~edgeship.ota.transport.MqttConnection`
  connects with ``protocol="auto"`` (its default), which falls back to 3.1.1
  when a broker refuses MQTT 5, so agents and the controller work unchanged.
- shared subscriptions (``$share/...``): one controller per embedded broker.
- authentication and ACLs: anonymous, bound to loopback by default.
- persistence: retained messages live as long as the process.

Run it standalone with ``python -m edgeship.toolkit.embedded_broker [--host H] [--port P]``
(``edgeship broker run`` wraps the same class).
"""

from __future__ import annotations

__all__ = ["EmbeddedBroker", "main"]

import asyncio
import logging
import socket
import sys
import threading
import time
from typing import Any

from edgeship.ota.errors import BadInputError, EdgeshipError, first_line, require_module

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """An amqtt broker on its own thread and event loop.

    Args:
        host: address to listen on (``127.0.0.1`` keeps it on this machine).
        port: TCP port; 0 picks a free one (read it back from ``.port`` after start).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        if not 0 <= port < 65536:
            raise BadInputError(f"broker port must be 0-65535, got {port}")
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 10000}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        """Start the broker; return once it accepts TCP connections.

        Raises:
            MissingExtraError: amqtt is not installed (``pip install 'edgeship[host]'``).
            EdgeshipError: the port is taken or the broker did not come up within ``timeout``.
        """
        if self._thread is not None:
            raise RuntimeError("EmbeddedBroker.start() was already called")
        require_module("amqtt.broker", "host")
        # Bind here first (as asyncio will, with SO_REUSEADDR): an unknown host, an address that is not
        # this machine's or a taken port is then one clear error, not amqtt's logged traceback.
        try:
            family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
                probe.listen(1)
                if self.port == 0:
                    self.port = int(probe.getsockname()[1])
        except OSError as exc:
            raise EdgeshipError(f"embedded MQTT broker could not listen on {self.host}:{self.port} "
                                f"({type(exc).__name__}: {first_line(exc)})") from None
        self._thread = threading.Thread(target=self._run, name=f"amqtt-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            error = self._error
            self.stop()
            detail = f"{type(error).__name__}: {error}" if error else f"not ready within {timeout:g} s"
            raise EdgeshipError(f"embedded MQTT broker could not listen on {self.host}:{self.port} ({detail})")
        log.info("embedded MQTT broker listening on %s", self.url)
        return self

    def _run(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            self._broker = Broker(self._config(), loop=loop)
            await self._broker.start()

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:  # noqa: BLE001 - the port is taken, a config error: report it to start()
            self._error = exc
            self._ready.set()
            loop.close()
            self._stopped.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                loop.close()
                self._stopped.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down (clients see their connection drop) and join its thread."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and not loop.is_closed() and self._broker is not None and self._error is None:
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                future.result(timeout)
            except Exception as exc:  # noqa: BLE001 - a broker that fails to shut down cleanly is still stopped below
                log.warning("embedded broker shutdown: %s", exc)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None
        self._loop = None
        self._broker = None
        self._ready.clear()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list | None = None) -> None:
    """``python -m edgeship.toolkit.embedded_broker``: run until interrupted (what
    ``edgeship broker run`` does without --broker-dir)."""
    import argparse

    parser = argparse.ArgumentParser(description="Run edgeship's embedded MQTT broker (amqtt, MQTT 3.1.1).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        broker = EmbeddedBroker(args.host, args.port).start()
    except EdgeshipError as exc:  # the port is taken, amqtt is missing: one line, as `edgeship broker run`
        print(f"error: {exc.message}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    print(f"edgeship embedded broker on {broker.url} (Ctrl-C to stop)", flush=True)
    try:
        while broker.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
