"""`xds-server serve`, wired: which implementation each port gets, who owns the spec,
and who decides.

- The spec file is owned here (`SpecFile`): watched, reloaded on SIGHUP, a bad edit
  logged line by line while the last good spec keeps being served.
- Leadership is the state directory's lock file (`Leadership`): the process holding it
  runs the `RolloutController`; any other process on the same state directory is a
  `Follower` that serves exactly the weights the leader committed.
- Everything else is plumbing: the xDS publisher (the `DataPlane`), the SQLite
  `StateStore`, Prometheus as the `MetricSource`, and the `TrafficSink`s (telemetry,
  the Istio applier, notifications) the controller tells after each commit.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from xds_server.admin.service import AdminService, run_admin_server
from xds_server.admin.web import Dashboard
from xds_server.outputs.istio_apply import IstioApplier, IstioSink
from xds_server.outputs.notify import Notifier
from xds_server.rollout.controller import RolloutController
from xds_server.rollout.metrics import PrometheusSource
from xds_server.rollout.ports import StateStore
from xds_server.rollout.state import RolloutState, current_rollouts, rollout_traffic
from xds_server.rollout.store import Store
from xds_server.spec import MeshSpec, SpecError, load_spec
from xds_server.telemetry import Telemetry
from xds_server.traffic import TrafficState
from xds_server.xds.dataplane import DataPlane
from xds_server.xds.publisher import XdsPublisher

log = logging.getLogger("xds_server.app")

Task = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class ServeOptions:
    spec_path: Path
    xds_address: str = "127.0.0.1:18000"
    state_dir: Path = Path("xds-state")
    prometheus_url: str = "http://127.0.0.1:9090"
    metrics_address: tuple[str, int] | None = ("127.0.0.1", 18002)
    """None: no /metrics."""
    admin_address: str = "127.0.0.1:18001"
    admin_tokens: Mapping[str, str] | None = None
    """Name -> bearer token (`--admin-token-file`); None: the admin API asks for none."""
    admin_auth_reads: bool = False
    """Reads need a token too, not only changes."""
    xds_tls: tuple[bytes, bytes] | None = None
    """(certificate chain, private key) in PEM."""
    xds_client_ca: bytes | None = None
    """Require client certificates signed by this CA (PEM), whose identity names the
    node's region and id (mTLS)."""
    xds_trust_domain: str | None = None
    admin_tls: tuple[bytes, bytes] | None = None
    follow_interval: float = 0.5
    """How often a follower reads the committed state."""
    ui_address: str = "127.0.0.1:18080"
    """The web dashboard; "" turns it off."""


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
                "spec rejected (%s), keeping the last good one: %s: cannot check it: %s: %s",
                reason,
                self.path,
                type(exc).__name__,
                " ".join(str(exc).split()),
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
                "spec change not applied, keeping the last good spec: %s: %s: %s",
                self.path,
                type(exc).__name__,
                " ".join(str(exc).split()),
            )
            log.debug("why the change of %s was not applied", self.path, exc_info=True)


def _file_signature(path: Path) -> tuple[int, int, bytes] | None:
    try:
        st = os.stat(path)
        return st.st_mtime_ns, st.st_size, path.read_bytes()
    except OSError:
        return None


class Leadership:
    """One writer: the process holding `STATE_DIR/controller.lock` decides rollouts."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "controller.lock"
        self._handle: IO[str] | None = None

    def try_acquire(self) -> bool:
        handle = open(self.path, "a")  # noqa: SIM115 (held for the life of the process)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._handle = handle
        return True


class Follower:
    """A replica that does not decide: it reads the committed rollout state and serves
    exactly the weights it implies, so every Envoy of a region gets one split whichever
    replica it is connected to."""

    def __init__(
        self,
        spec: Callable[[], MeshSpec],
        store: StateStore,
        dataplane: DataPlane,
        interval: float = 0.5,
    ) -> None:
        self._spec = spec
        self.store = store
        self.dataplane = dataplane
        self.interval = interval
        self.rollouts: dict[str, RolloutState] = {}
        self._served = TrafficState()

    def refresh(self) -> None:
        """Serve what the committed state implies under the current spec."""
        spec = self._spec()
        self.rollouts = current_rollouts(spec, self.store.load_rollouts())
        traffic = rollout_traffic(spec, self.rollouts)
        if traffic != self._served:
            self._served = traffic
            self.dataplane.set_traffic(traffic, urgent=True, reason="following committed state")

    def try_refresh(self) -> None:
        try:
            self.refresh()
        except Exception as exc:  # a locked or failing store: the next poll tries again
            log.warning("follower could not read the committed state: %s", exc)


class Parts:
    """The running pieces of one `serve`: what the admin API and telemetry read."""

    def __init__(
        self,
        publisher: XdsPublisher,
        store: StateStore | None = None,
        controller: RolloutController | None = None,
        follower: Follower | None = None,
        istio: IstioApplier | None = None,
    ) -> None:
        self.publisher = publisher
        self.store = store
        self.controller = controller
        self.follower = follower
        self.istio = istio

    @property
    def spec(self) -> MeshSpec:
        return self.publisher.spec

    def rollouts(self) -> Mapping[str, RolloutState]:
        if self.controller is not None:
            return self.controller.rollouts
        return self.follower.rollouts if self.follower is not None else {}


class App:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.spec_file = SpecFile(options.spec_path)
        options.state_dir.mkdir(parents=True, exist_ok=True)
        publisher = XdsPublisher(
            self.spec_file.spec,
            tls=options.xds_tls,
            client_ca=options.xds_client_ca,
            trust_domain=options.xds_trust_domain,
        )
        store = Store.in_dir(options.state_dir)
        self.leadership = Leadership(options.state_dir)
        self.telemetry = Telemetry()
        self.telemetry.attach(publisher)
        self.parts = Parts(publisher, store)
        self.notifier: Notifier | None = None
        """The leader's notifications (`notifications:` targets); followers send none."""
        if self.leadership.try_acquire():
            self._lead(store)
        else:
            log.warning(
                "another xds-server holds %s: serving the committed state, not deciding",
                self.leadership.path,
            )
            self.parts.follower = Follower(
                lambda: self.spec_file.spec, store, publisher, options.follow_interval
            )

    def _lead(self, store: StateStore) -> None:
        spec = self.spec_file.spec
        controller = RolloutController(
            lambda: self.spec_file.spec,
            self.parts.publisher,
            store,
            PrometheusSource(self.options.prometheus_url),
        )
        controller.subscribe(self.telemetry)
        controller.watch_store(self.telemetry.on_store_health)
        if spec.istio is not None and spec.istio.apply:
            # The istio output mode: only the process that decides applies (one writer).
            applier = IstioApplier(spec.istio)
            controller.subscribe(IstioSink(applier))
            self.telemetry.attach_istio(applier)
            self.parts.istio = applier
            log.info(
                "istio output: applying to %s",
                ", ".join(f"{st.region} ({st.target})" for st in applier.status()),
            )
        # Cheap without targets (nothing is rendered); targets come and go with the spec.
        self.notifier = Notifier()
        controller.subscribe(self.notifier)
        self.telemetry.attach_notifier(self.notifier)
        self.parts.controller = controller

    def on_spec_change(self, spec: MeshSpec, reason: str) -> None:
        self.parts.publisher.apply_spec(spec, reason)
        if self.parts.controller is not None:
            self.parts.controller.spec_changed()
        if self.parts.follower is not None:
            self.parts.follower.try_refresh()

    def reload(self, reason: str) -> None:
        self.spec_file.poll(self.on_spec_change, reason, force=True)

    def tasks(self) -> list[Task]:
        """What runs beside the xDS server, until it stops."""
        parts, opts = self.parts, self.options
        admin = AdminService(parts, opts.admin_tokens, opts.admin_auth_reads)
        tasks: list[Task] = [
            lambda: self.spec_file.watch(self.on_spec_change),
            lambda: run_admin_server(admin, opts.admin_address, opts.admin_tls),
            lambda: self.telemetry.sample_nodes_forever(parts.publisher),
        ]
        if opts.ui_address:
            dashboard = Dashboard(parts, admin.operator)
            tasks.append(lambda: dashboard.run(opts.ui_address))
        if parts.controller is not None:
            tasks.append(parts.controller.run)
        if parts.follower is not None:
            tasks.append(self._follow_then_lead)
        if parts.istio is not None:
            tasks.append(parts.istio.run)
        return tasks

    async def _follow_then_lead(self) -> None:
        """Follow the committed state until the lock is free (its holder stopped or
        died: the kernel releases it), then take over: restore and decide."""
        follower = self.parts.follower
        assert follower is not None and self.parts.store is not None
        while not self.leadership.try_acquire():
            follower.try_refresh()
            await asyncio.sleep(follower.interval)  # the follower's poll period
        log.warning("took over the rollout controller: %s is free", self.leadership.path)
        self._lead(self.parts.store)
        self.parts.follower = None
        controller = self.parts.controller
        assert controller is not None
        controller.restore()
        runs = [controller.run()]
        if self.parts.istio is not None:
            runs.append(self.parts.istio.run())
        await asyncio.gather(*runs)

    async def serve(self) -> None:
        """Restore, open the ports, run until SIGTERM or SIGINT; SIGHUP reloads the spec.

        State is restored before the xDS port opens, so no Envoy ever sees
        production-only weights for a rollout that was in progress."""
        parts = self.parts
        if parts.controller is not None:
            parts.controller.restore()
        if parts.follower is not None:
            parts.follower.try_refresh()
        if self.options.metrics_address is not None:
            host, port = self.options.metrics_address
            self.telemetry.serve(host, port)
            log.info("metrics on http://%s:%d/metrics", host, port)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reload("SIGHUP"))
        await parts.publisher.start(self.options.xds_address)
        running = [asyncio.create_task(run()) for run in self.tasks()]
        try:
            await stop.wait()
            log.info("stopping: signal received")
        finally:
            for task in running:
                task.cancel()
            if self.notifier is not None:
                self.notifier.close(timeout=1.0)
            await parts.publisher.stop()
