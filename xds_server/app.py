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
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from xds_server.admin.service import AdminService, run_admin_server
from xds_server.admin.web import Dashboard
from xds_server.ha.etcd import async_client, one_line, parse_store_url
from xds_server.ha.instances import with_registered
from xds_server.ha.leader import Election
from xds_server.ha.replicas import ClusterDataPlane, Directory, ReplicaInfo, served_regions
from xds_server.ha.store import EtcdStore, StoreReadError
from xds_server.outputs.istio_apply import IstioApplier, IstioSink
from xds_server.outputs.notify import Notifier
from xds_server.rollout.controller import RolloutController
from xds_server.rollout.metrics import PrometheusSource
from xds_server.rollout.ports import StateStore
from xds_server.rollout.state import RolloutState, current_rollouts, rollout_traffic
from xds_server.rollout.store import Store
from xds_server.spec import MeshSpec, SpecError, load_spec, parse_spec
from xds_server.telemetry import Telemetry
from xds_server.traffic import TrafficState
from xds_server.xds.dataplane import DataPlane
from xds_server.xds.publisher import XdsPublisher

log = logging.getLogger("xds_server.app")

Task = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class ServeOptions:
    spec_path: Path | None
    """None only with `store_url` (the spec is then the store's)."""
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
    store_url: str | None = None
    """`etcd://HOST:PORT[,...]`: run as one replica of several on etcd (`ReplicaApp`);
    None: one process on SQLite under `state_dir`."""
    store_prefix: str = "/xds-server/default"
    leader_ttl: float = 5.0
    """The leader lease's TTL, seconds: how long a dead leader holds the rollouts up."""
    regions: tuple[str, ...] = ()
    """The regions this replica serves; (): all."""
    replica_id: str = ""
    """This replica's name in the store; "": the host name and the xDS port."""


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
        self.directory: Directory | None = None
        """Replicas on etcd: every replica's key (for `xdsctl status`)."""

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
        assert options.spec_path is not None, "one process serves a spec file"
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

    def current_spec(self) -> MeshSpec:
        return self.spec_file.spec

    def _lead(self, store: StateStore, dataplane: DataPlane | None = None) -> None:
        spec = self.current_spec()
        controller = RolloutController(
            self.current_spec,
            dataplane or self.parts.publisher,
            store,
            PrometheusSource(self.options.prometheus_url),
        )
        controller.subscribe(self.telemetry)
        controller.watch_store(self.telemetry.on_store_health)
        self.telemetry.on_leadership(True)
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
        admin.xds_address = opts.xds_address
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


class ReplicaApp(App):
    """`serve --store etcd://...`: one replica of several, all serving xDS from the state
    in etcd; the one that holds the leader key decides (ha/leader.py), the others follow
    the store's watch. Build it with `await ReplicaApp.connect(options)`."""

    def __init__(self, options: ServeOptions, store: EtcdStore, spec: MeshSpec) -> None:
        self.options = options
        self.store = store
        self.spec_source = SpecFile(options.spec_path, spec) if options.spec_path else None
        """With `--spec FILE`: its valid changes are pushed to the store (and served
        from there, like anyone's push)."""
        self.replica_id = options.replica_id or _default_replica_id(options.xds_address)
        self.stored_spec = spec
        """The spec as pushed; what is served adds the registry's instances (`served`)."""
        traffic = rollout_traffic(spec, current_rollouts(spec, store.load_rollouts()))
        self.served = with_registered(spec, store.view.registry.values(), None, traffic)
        publisher = XdsPublisher(
            self.served.spec,
            tls=options.xds_tls,
            client_ca=options.xds_client_ca,
            trust_domain=options.xds_trust_domain,
            routes_version=store.routes_version,
            # The committed weights from the first snapshot on: a replica that started
            # production-only and then followed would give the same routes a new version.
            traffic=traffic,
        )
        self.telemetry = Telemetry()
        self.telemetry.attach(publisher)
        self.parts = Parts(publisher, store)
        self.notifier = None
        self.directory = Directory(
            store,
            ReplicaInfo(
                self.replica_id,
                options.regions,
                options.xds_address,
                options.admin_address,
                time.time(),
            ),
            publisher,
            options.leader_ttl,
        )
        if options.regions:
            publisher.ads.served = options.regions
            publisher.ads.elsewhere = lambda region: ", ".join(self.directory.serving(region))
        self.parts.follower = Follower(self.current_spec, store, publisher)
        self.parts.directory = self.directory
        self.election = Election(
            store.client,
            store.keys,
            self.replica_id,
            options.leader_ttl,
            self._elected,
            self._deposed,
        )
        store.on_fenced = self.election.step_down
        store.may_write = self.election.valid
        store.subscribe(self._store_changed)
        self._leading: list[asyncio.Task[None]] = []
        self._spec_text = ""
        """The text of the spec served now (a watch event for the same text is no news)."""
        self._registry_handle: asyncio.TimerHandle | None = None
        self.telemetry.set_registry(store.view.registry.values())

    @classmethod
    async def connect(cls, options: ServeOptions) -> ReplicaApp:
        """Load the store (pushing `--spec FILE` first when it differs); StoreError with
        one line when the store cannot be reached or holds no spec."""
        assert options.store_url is not None
        address = parse_store_url(options.store_url, options.store_prefix)
        store = EtcdStore(address, async_client(address))
        try:
            if options.spec_path is not None:
                text = options.spec_path.read_text()
                load_spec(options.spec_path)  # SpecError: named file, field, problem
                if await store.push_spec(text, str(options.spec_path)):
                    log.info("pushed %s to %s", options.spec_path, address)
            await store.start()
        except (SpecError, StoreError):
            raise
        except Exception as exc:
            raise StoreError(f"cannot reach the store {address}: {one_line(exc)}") from None
        stored = store.view.spec
        if stored is None:
            raise StoreError(
                f"the store {address} holds no spec under {address.prefix}: push one with "
                "`xds-server spec push` or give `serve --spec FILE`"
            )
        spec = parse_spec(stored.text, f"{address}{store.keys.spec}")
        if options.regions:
            served_regions(options.regions, spec.regions)  # ValueError: a region it lacks
        return cls(options, store, spec)

    def current_spec(self) -> MeshSpec:
        return self.parts.publisher.spec

    # ---- the store's changes ----

    def _store_changed(self, changed: frozenset[str]) -> None:
        publisher = self.parts.publisher
        if "leader" in changed:
            self.election.wake()
        if "spec" in changed:
            self._apply_stored_spec()
        if "registry" in changed and self._registry_handle is None:
            # Coalesced: a burst of registrations (a fleet starting) is one push a region.
            self._registry_handle = asyncio.get_running_loop().call_later(
                REGISTRY_COALESCE_SECONDS, self._registry_changed
            )
        if self.parts.controller is None and changed & {"spec", "rollouts", "routes"}:
            assert self.parts.follower is not None
            self.parts.follower.try_refresh()
            if changed & {"spec", "routes"}:  # (a check entry moves no version)
                publisher.refresh_versions("following the store")

    def _apply_stored_spec(self) -> None:
        stored = self.store.view.spec
        if stored is None or stored.text == self._spec_text:
            return
        try:
            spec = parse_spec(stored.text, f"{self.store.address}{self.store.keys.spec}")
        except SpecError as exc:  # (pushes are validated: only a hand-written key gets here)
            for line in exc.render().splitlines():
                log.error("stored spec rejected, keeping the last good one: %s", line)
            return
        self._spec_text = stored.text
        self.stored_spec = spec
        self._serve(f"spec {stored.number} from the store")
        if self.parts.controller is not None:
            self.parts.controller.spec_changed()

    def _registry_changed(self) -> None:
        self._registry_handle = None
        self.telemetry.set_registry(self.store.view.registry.values())
        self._serve("registry changed")

    def _serve(self, reason: str) -> None:
        """Serve the stored spec with the registry's instances (a pool that lost every
        host while it takes traffic keeps its last ones: `ha/instances.py`)."""
        publisher = self.parts.publisher
        self.served = with_registered(
            self.stored_spec, self.store.view.registry.values(), publisher.spec, publisher.traffic
        )
        for region, service, pool in sorted(self.served.held):
            log.warning(
                "%s %s in %s has no host left while it takes traffic: keeping its last "
                "hosts; its rollout holds there", service, pool, region,
            )  # fmt: skip
        publisher.apply_spec(self.served.spec, reason)

    def live_hosts(self, region: str, cluster: str) -> int | None:
        """Hosts really there for a pool (static or registered; none for a held pool)."""
        service, _, pool = cluster.partition("|")
        return self.served.live.get((region, service, pool))

    def _push_spec_file(self, spec: MeshSpec, reason: str) -> None:
        del spec  # validated: the store gets the file's text, every replica parses it
        assert self.spec_source is not None
        text = self.spec_source.path.read_text()
        task = asyncio.get_running_loop().create_task(
            self.store.push_spec(text, str(self.spec_source.path))
        )
        task.add_done_callback(_log_push)

    # ---- leadership ----

    def _elected(self, fence: int) -> None:
        self.store.fence = fence
        try:  # decide from everything committed, not from where the watch has got to
            self.store.read()
        except StoreReadError as exc:
            log.warning("elected, but the store cannot be read (%s): stepping down", exc)
            self.election.step_down(str(exc))
            return
        self._lead(
            self.store, ClusterDataPlane(self.parts.publisher, self.directory, self.live_hosts)
        )
        controller = self.parts.controller
        assert controller is not None
        controller.restore()
        self._leading = [asyncio.get_running_loop().create_task(controller.run())]
        if self.parts.istio is not None:
            self._leading.append(asyncio.get_running_loop().create_task(self.parts.istio.run()))
        self.directory.leading = True
        self.directory.changed()

    def _deposed(self, why: str) -> None:
        self.store.fence = None
        for task in self._leading:
            task.cancel()
        self._leading = []
        self.parts.controller = None
        self.parts.istio = None
        if self.notifier is not None:
            self.notifier.close(timeout=0)
            self.notifier = None
        self.directory.leading = False
        self.directory.changed()
        self.telemetry.on_leadership(False)
        log.warning("following the store: %s", why)
        assert self.parts.follower is not None
        self.parts.follower.try_refresh()
        self.parts.publisher.refresh_versions("following the store")

    # ---- running ----

    def tasks(self) -> list[Task]:
        parts, opts = self.parts, self.options
        admin = AdminService(parts, opts.admin_tokens, opts.admin_auth_reads)
        admin.xds_address = opts.xds_address
        tasks: list[Task] = [
            self.store.watch,
            self.election.run,
            self.directory.run,
            lambda: run_admin_server(admin, opts.admin_address, opts.admin_tls),
            lambda: self.telemetry.sample_nodes_forever(parts.publisher),
        ]
        if self.spec_source is not None:
            spec_file = self.spec_source
            tasks.append(lambda: spec_file.watch(self._push_spec_file))
        if opts.ui_address:
            dashboard = Dashboard(parts, admin.operator)
            tasks.append(lambda: dashboard.run(opts.ui_address))
        return tasks

    def reload(self, reason: str) -> None:
        if self.spec_source is not None:
            self.spec_source.poll(self._push_spec_file, reason, force=True)

    async def serve(self) -> None:
        """Serve the committed state before the xDS port opens (as one process restores
        before it), then run until SIGTERM; a clean stop resigns at once."""
        assert self.parts.follower is not None
        self._spec_text = self.store.view.spec.text if self.store.view.spec else ""
        self.parts.follower.try_refresh()
        log.info(
            "replica %s on %s: serving %s",
            self.replica_id,
            self.store.address,
            ", ".join(self.options.regions) or "every region",
        )
        try:
            await super().serve()
        finally:
            for task in self._leading:
                task.cancel()
            await self.election.resign()
            await self.directory.withdraw()
            self.store.close()


REGISTRY_COALESCE_SECONDS = 0.05
"""Registry changes within this long are served as one push (bounds the push rate of a
churning fleet to 20 a second per region)."""


class StoreError(Exception):
    """The replica's store cannot be used; the message says which and why (one line)."""


def _default_replica_id(xds_address: str) -> str:
    return f"{socket.gethostname()}-{xds_address.rpartition(':')[2]}"


def _log_push(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("could not push the spec file to the store: %s", one_line(exc))
    elif (stored := task.result()) is not None:
        log.info("pushed the spec file as spec %d", stored.number)
