"""An XdsServer on its own event loop thread, for the demo, the lab and the tests.

`serve` runs the server on the main thread's loop; code that also needs the main thread
(a load generator, a test) runs it here and calls into it with `call`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from xds_server.config import MeshSpec
from xds_server.server import XdsServer

T = TypeVar("T")


class BackgroundServer:
    def __init__(
        self, spec: MeshSpec, spec_path: Path | None = None, tls: tuple[bytes, bytes] | None = None
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="xds-server", daemon=True)
        self.thread.start()
        self.server: XdsServer = self.call(lambda: XdsServer(spec, spec_path=spec_path, tls=tls))
        self.port = 0
        self._watch: Future[None] | None = None

    def call(self, fn: Callable[[], T], timeout: float = 10) -> T:
        """Run `fn` on the server's loop and return its result."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, port: int = 0) -> int:
        self.port = self.run(self.server.start(f"127.0.0.1:{port}"))
        return self.port

    def watch_spec(self, interval: float = 0.1) -> None:
        self._watch = asyncio.run_coroutine_threadsafe(
            self.server.watch_spec_file(interval), self.loop
        )

    def route_version(self, region: str, delta: bool = False) -> str:
        """The routes version served to `region`, after pushing any coalesced change.

        As an Envoy reports it: state of the world names the snapshot's routes version;
        delta names the route configuration's own (content) version.
        """
        from xds_server.xds.resources import ROUTE_CONFIG_NAME
        from xds_server.xds.types import ROUTE

        def pushed() -> str:
            self.server.flush()
            snap = self.server.snapshot(region)
            if delta:
                return snap.delta_items(ROUTE)[ROUTE_CONFIG_NAME].version
            return snap.type_version(ROUTE)

        return self.call(pushed)

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self.run(self.server.stop(0.2))

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
