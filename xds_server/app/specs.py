"""Where `serve` gets its spec: a file it owns (`FileSpecSource`), or the store that
replicas share (`StoreSpecSource`: the pushed spec plus the shared registry's instances).

Either way a bad spec is logged, a line per problem, and the last good one keeps being
served; the server is told of each good change through a `SpecTarget`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Gauge

from xds_server.ha.etcd import one_line
from xds_server.ha.instances import RegistryIndex, Served
from xds_server.ha.store import EtcdStore, StoredSpec
from xds_server.spec import MeshSpec, SpecError, load_spec, parse_spec
from xds_server.traffic import TrafficState

log = logging.getLogger("xds_server.app")

Task = Callable[[], Coroutine[Any, Any, None]]

REGISTRY_COALESCE_SECONDS = 0.05
"""Registry changes within this long are served as one push (bounds the push rate of a
churning fleet to 20 a second per region)."""


class SpecTarget(Protocol):
    """What a spec source tells the server."""

    def spec_changed(self, spec: MeshSpec, reason: str) -> None:
        """A new spec: serve it, and let the rollouts follow it."""

    def endpoints_changed(self, spec: MeshSpec, reason: str) -> None:
        """Only hosts came or went (the registry): serve them; no rollout is concerned."""


class SpecSource(Protocol):
    @property
    def spec(self) -> MeshSpec:
        """The spec to serve now."""
        ...

    def tasks(self, target: SpecTarget) -> list[Task]:
        """What watches for changes, until cancelled."""
        ...

    def reload(self, target: SpecTarget, reason: str) -> None:
        """Look again now (SIGHUP)."""
        ...


class SpecFile:
    """The spec file and the last good spec read from it."""

    def __init__(self, path: Path, spec: MeshSpec | None = None) -> None:
        self.path = path
        self.spec = spec if spec is not None else load_spec(path)
        self._signature = _file_signature(path)

    def reload(self, reason: str = "spec file changed") -> MeshSpec | None:
        """Read the file again: the new spec, or None (every problem logged, a line each)
        if it is bad. Never raises: whatever the file holds, the last good spec stays."""
        try:
            spec = load_spec(self.path)
        except SpecError as exc:
            for line in exc.render().splitlines():
                log.error("spec rejected (%s), keeping the last good one: %s", reason, line)
            return None
        except Exception as exc:  # a checker bug must not cost the last good spec
            log.error(
                "spec rejected (%s), keeping the last good one: %s: cannot check it: %s",
                reason,
                self.path,
                _error_line(exc),
            )
            log.debug("why %s could not be checked", self.path, exc_info=True)
            return None
        self.spec = spec
        return spec

    def changed(self) -> bool:
        """Has the file's content changed since the last look (content, not just mtime)?"""
        sig = _file_signature(self.path)
        if sig == self._signature:
            return False
        self._signature = sig
        return True

    async def watch(
        self, on_change: Callable[[MeshSpec, str], None], interval: float = 0.2
    ) -> None:
        """Apply each valid change of the file until cancelled. Nothing a file holds
        stops it: a bad spec is logged and the last good one kept, and the next change
        is read as usual (no SIGHUP needed)."""
        while True:
            await asyncio.sleep(interval)  # the file's poll period
            self.poll(on_change)

    def poll(
        self,
        on_change: Callable[[MeshSpec, str], None],
        reason: str = "spec file changed",
        force: bool = False,
    ) -> None:
        """One look at the file (`force`: read it even if unchanged, as SIGHUP does);
        every failure is logged as one line, never raised."""
        previous = self.spec
        try:
            changed = self.changed()
            if (changed or force) and (spec := self.reload(reason)) is not None:
                on_change(spec, reason)
        except Exception as exc:
            self.spec = previous  # (what the rest of serve still runs on)
            log.error(
                "spec change not applied, keeping the last good spec: %s: %s",
                self.path,
                _error_line(exc),
            )
            log.debug("why the change of %s was not applied", self.path, exc_info=True)


class FileSpecSource:
    """One process: the spec file is the spec."""

    def __init__(self, path: Path) -> None:
        self.file = SpecFile(path)

    @property
    def spec(self) -> MeshSpec:
        return self.file.spec

    def tasks(self, target: SpecTarget) -> list[Task]:
        return [lambda: self.file.watch(target.spec_changed)]

    def reload(self, target: SpecTarget, reason: str) -> None:
        self.file.poll(target.spec_changed, reason, force=True)


class StoreSpecSource:
    """Replicas: the spec pushed to the store, with the shared registry's instances
    added (a pool that lost every host while it takes traffic keeps its last ones:
    `ha/instances.py`). With `--spec FILE`, the file's valid changes are pushed to the
    store and served from there, like anyone's push."""

    def __init__(
        self,
        store: EtcdStore,
        stored: MeshSpec,
        traffic: TrafficState,
        metrics: RegistryMetrics,
        spec_file: SpecFile | None = None,
    ) -> None:
        self.store = store
        self.stored = stored
        """The spec as pushed; what is served adds the registry's instances."""
        self.index = RegistryIndex()
        """The registry as last served, grouped: an update costs what changed."""
        self.index.update(store.view.registry)
        self.served: Served = self.index.serve(stored, None, traffic)
        self.traffic: Callable[[], TrafficState] = lambda: traffic
        """The weights served now (the server points this at its publisher)."""
        self.file = spec_file
        self.metrics = metrics
        self.metrics.set(self.index)
        self._text = store.view.spec.text if store.view.spec else ""
        """The text of the spec served now (a watch event for the same text is no news)."""
        self._registry_handle: asyncio.TimerHandle | None = None
        self._target: SpecTarget | None = None

    @property
    def spec(self) -> MeshSpec:
        return self.served.spec

    def live_hosts(self, region: str, cluster: str) -> int | None:
        """Hosts really there for a pool (static or registered; none for a held pool)."""
        service, _, pool = cluster.partition("|")
        return self.served.live.get((region, service, pool))

    def tasks(self, target: SpecTarget) -> list[Task]:
        self._target = target
        spec_file = self.file
        if spec_file is None:
            return []
        return [lambda: spec_file.watch(self._push_file)]

    def reload(self, target: SpecTarget, reason: str) -> None:
        if self.file is not None:
            self.file.poll(self._push_file, reason, force=True)

    def store_changed(self, changed: frozenset[str]) -> None:
        """The store's watch saw these parts change."""
        if "spec" in changed:
            self._apply_stored_spec()
        if "registry" in changed and self._registry_handle is None:
            # Coalesced: a burst of registrations (a fleet starting) is one push a region.
            self._registry_handle = asyncio.get_running_loop().call_later(
                REGISTRY_COALESCE_SECONDS, self._registry_changed
            )

    def _apply_stored_spec(self) -> None:
        stored = self.store.view.spec
        if stored is None or stored.text == self._text:
            return
        try:
            spec = parse_spec(stored.text, f"{self.store.address}{self.store.keys.spec}")
        except SpecError as exc:  # (pushes are validated: only a hand-written key gets here)
            for line in exc.render().splitlines():
                log.error("stored spec rejected, keeping the last good one: %s", line)
            return
        self._text = stored.text
        self.stored = spec
        self._serve()
        if self._target is not None:
            self._target.spec_changed(self.spec, f"spec {stored.number} from the store")

    def _registry_changed(self) -> None:
        self._registry_handle = None
        self._serve()
        self.metrics.set(self.index)
        if self._target is not None:
            self._target.endpoints_changed(self.spec, "registry changed")

    def _serve(self) -> None:
        self.index.update(self.store.view.registry)
        self.served = self.index.serve(self.stored, self.served.spec, self.traffic())
        for region, service, pool in sorted(self.served.held):
            log.warning(
                "%s %s in %s has no host left while it takes traffic: keeping its last "
                "hosts; its rollout holds there", service, pool, region,
            )  # fmt: skip

    def _push_file(self, spec: MeshSpec, reason: str) -> None:
        del spec, reason  # validated: the store gets the file's text, every replica parses it
        assert self.file is not None
        text = self.file.path.read_text()
        task = asyncio.get_running_loop().create_task(
            self.store.push_spec(text, str(self.file.path))
        )
        task.add_done_callback(_log_push)


class RegistryMetrics:
    """`xds_registered_instances`: the shared registry, as this replica sees it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registered = Gauge(
            "xds_registered_instances",
            "Instances in the shared registry (replicas on etcd)",
            ["service", "version", "region"],
            registry=registry,
        )

    def set(self, index: RegistryIndex) -> None:
        self.registered.clear()
        for (region, service, version), n in index.counts().items():
            self.registered.labels(service, version, region).set(n)


def _file_signature(path: Path) -> tuple[int, int, bytes] | None:
    try:
        st = os.stat(path)
        return st.st_mtime_ns, st.st_size, path.read_bytes()
    except OSError:
        return None


def _error_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _log_push(task: asyncio.Task[StoredSpec | None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("could not push the spec file to the store: %s", one_line(exc))
    elif (stored := task.result()) is not None:
        log.info("pushed the spec file as spec %d", stored.number)
