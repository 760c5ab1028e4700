"""An xDS publisher on its own event loop thread, for benchmarks and the tests.

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

from xds_server.app import SpecFile
from xds_server.spec import MeshSpec
from xds_server.xds.publisher import XdsPublisher

T = TypeVar("T")


class BackgroundServer:
    def __init__(
        self,
        spec: MeshSpec,
        spec_path: Path | None = None,
        tls: tuple[bytes, bytes] | None = None,
        publisher: type[XdsPublisher] = XdsPublisher,
        client_ca: bytes | None = None,
    ) -> None:
        """`publisher`: the class to run (a test may subclass it to serve bad resources)."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="xds-server", daemon=True)
        self.thread.start()
        self.server: XdsPublisher = self.call(lambda: publisher(spec, tls=tls, client_ca=client_ca))
        self.spec_file = SpecFile(spec_path, spec) if spec_path else None
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
        """Serve each valid edit of the spec file, as `serve` does."""
        assert self.spec_file is not None, "no spec file to watch"
        self._watch = asyncio.run_coroutine_threadsafe(
            self.spec_file.watch(self.server.apply_spec, interval), self.loop
        )

    def reload_spec(self, reason: str) -> None:
        """Read the spec file again now (as SIGHUP does); a bad one is logged and ignored."""
        assert self.spec_file is not None, "no spec file to reload"

        spec_file = self.spec_file
        self.call(lambda: spec_file.poll(self.server.apply_spec, reason, force=True))

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
