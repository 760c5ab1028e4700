"""`xds-server serve`: one server for both deployments.

A deployment is three choices (`Deployment`): where the spec comes from (a file, or the
store replicas share), who decides (the holder of a lock file, or of the leader key on
an etcd lease), and the store the decisions are committed to (SQLite, or etcd). The
server is the same for both: it serves xDS from the publisher, follows the committed
state while another process decides, and runs a `LeaderRuntime` (the controller and
every leader-only sink) while this one does. `local` and `replica` build the two
deployments.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import start_http_server

from xds_server.admin.service import AdminService, run_admin_server
from xds_server.admin.web import Dashboard
from xds_server.app.electors import Elector, EtcdElector, LockFileElector
from xds_server.app.follower import Follower
from xds_server.app.leader import LeaderRuntime
from xds_server.app.metrics import ProcessMetrics
from xds_server.app.options import ServeOptions
from xds_server.app.running import Roles, Running
from xds_server.app.specs import FileSpecSource, SpecFile, SpecSource, StoreSpecSource, Task
from xds_server.app.workers import WorkerRole
from xds_server.ha.etcd import async_client, one_line, parse_store_url
from xds_server.ha.maintainer import StoreMaintainer
from xds_server.ha.maintenance import MaintenanceOptions
from xds_server.ha.replicas import ClusterDataPlane, Directory, ReplicaInfo, served_regions
from xds_server.ha.store import EtcdStore
from xds_server.rollout.metrics import PrometheusSource
from xds_server.rollout.ports import StateStore
from xds_server.rollout.state import current_rollouts, rollout_traffic
from xds_server.rollout.store import Store, StoreVersionError
from xds_server.spec import MeshSpec, SpecError, load_spec, parse_spec
from xds_server.traffic import TrafficState
from xds_server.xds.dataplane import DataPlane
from xds_server.xds.publisher import XdsPublisher

log = logging.getLogger("xds_server.app")


class StoreError(Exception):
    """The replica's store cannot be used; the message says which and why (one line)."""


async def _nothing() -> None:
    return None


@dataclass
class Deployment:
    store: StateStore
    specs: SpecSource
    elector: Elector
    publisher: XdsPublisher
    metrics: ProcessMetrics
    leader_dataplane: DataPlane
    """What the controller pushes through (replicas: an ACK gate over every replica)."""
    watched: bool = False
    """The store tells of its changes (etcd's watch); else a follower reads it again
    every `follow_interval`."""
    directory: Directory | None = None
    maintainer: StoreMaintainer | None = None
    """Replicas: etcd's status polled, and bounded by the leader (`ha/maintainer.py`)."""
    background: list[Task] = field(default_factory=list)
    """What the deployment runs beside the server (the store's watch, the directory)."""
    close: Callable[[], Awaitable[None]] = _nothing
    follower: Follower | None = None
    """How this process follows while another decides (None: the store's committed
    state, `Follower`)."""
    worker: WorkerRole | None = None
    """One worker of `serve --workers N` (`app/workers.py`); None: the only process."""


class Server:
    def __init__(self, options: ServeOptions, deployment: Deployment) -> None:
        self.options = options
        self.deployment = d = deployment
        self.publisher = d.publisher
        self.metrics = d.metrics
        self.metrics.xds.attach(d.publisher)
        self.metrics.rollouts.set_weights(d.publisher.traffic, d.publisher.spec)
        self.roles = Roles()
        self.follower = d.follower or Follower(
            lambda: d.specs.spec, d.store, d.publisher, options.follow_interval
        )
        self.roles.follower = self.follower
        self.view = Running(d.publisher, d.store, d.directory, self.roles, d.maintainer)
        """The read-only view the admin API and the dashboard get."""
        if d.worker is not None:
            self.view.listing = d.worker.listing

    @property
    def spec(self) -> MeshSpec:
        return self.deployment.specs.spec

    @property
    def leader(self) -> LeaderRuntime | None:
        return self.roles.leader

    # ---- leadership ----

    def _take_lead(self) -> LeaderRuntime:
        d = self.deployment
        leader = LeaderRuntime(
            lambda: d.specs.spec,
            d.leader_dataplane,
            d.store,
            PrometheusSource(self.options.prometheus_url),
            self.metrics.rollouts,
            self.metrics.sinks,
            audit_retention=self.options.audit_retention,
        )
        self.roles.leader = leader
        self.metrics.leadership.leading(True)
        if (maintainer := d.maintainer) is not None:  # (NOSPACE on a write: act at once)
            leader.controller.watch_store(maintainer.store_health)
        leader.restore()
        return leader

    def elected(self) -> None:
        self._take_lead().start()
        if (directory := self.deployment.directory) is not None:
            directory.leading = True
            directory.changed()

    def deposed(self, why: str) -> None:
        leader, self.roles.leader = self.roles.leader, None
        if leader is not None:
            leader.stop(timeout=0)
        if (directory := self.deployment.directory) is not None:
            directory.leading = False
            directory.changed()
        self.metrics.leadership.leading(False)
        log.warning("following the store: %s", why)
        self.follower.try_refresh()
        self.publisher.refresh_versions("following the store")

    def room_made(self) -> None:
        """etcd has room again after NOSPACE: the rollbacks pushed meanwhile are written
        now, before anything else takes the room."""
        if (leader := self.roles.leader) is not None:
            try:
                leader.controller.commits.save_unsaved()
            except Exception as exc:  # (NotLeader: the controller's loop stops on its own)
                log.warning("could not write the rollbacks kept: %s", one_line(exc))

    # ---- changes: the spec's, the store's ----

    def spec_changed(self, spec: MeshSpec, reason: str) -> None:
        self.publisher.apply_spec(spec, reason)
        if self.roles.leader is not None:
            self.roles.leader.controller.spec_changed()
        else:
            self.follower.try_refresh()

    def endpoints_changed(self, spec: MeshSpec, reason: str) -> None:
        self.publisher.apply_spec(spec, reason)

    def store_changed(self, changed: frozenset[str]) -> None:
        """Replicas: the store's watch saw these parts change (after the elector and the
        spec source, which the store tells first)."""
        if self.roles.leader is None and changed & {"spec", "rollouts", "routes"}:
            self.follower.try_refresh()
            if changed & {"spec", "routes"}:  # (a check entry moves no version)
                self.publisher.refresh_versions("following the store")

    def reload(self, reason: str) -> None:
        self.deployment.specs.reload(self, reason)

    async def _follow_by_polling(self) -> None:
        while True:
            if self.roles.leader is None:
                self.follower.try_refresh()
            await asyncio.sleep(self.follower.interval)  # the follower's poll period

    # ---- running ----

    def tasks(self) -> list[Task]:
        """What runs beside the xDS server, until it stops."""
        d = self.deployment
        tasks: list[Task] = [
            *d.background,
            *d.specs.tasks(self),
            lambda: self.metrics.xds.sample_nodes_forever(self.publisher),
        ]
        if not d.watched:
            tasks.append(self._follow_by_polling)
        if d.worker is not None:
            return [*tasks, self._as_worker]
        return [*tasks, lambda: d.elector.run(self.elected, self.deposed), *self._port_tasks()]

    def _port_tasks(self) -> list[Task]:
        """The admin API and the dashboard."""
        opts = self.options
        admin = AdminService(self.view, opts.admin_tokens, opts.admin_auth_reads, opts.admin_scopes)
        admin.xds_address = opts.xds_address
        tasks: list[Task] = [lambda: run_admin_server(admin, opts.admin_address, opts.admin_tls)]
        if opts.ui_address:
            dashboard = Dashboard(self.view, admin.operator)
            tasks.append(lambda: dashboard.run(opts.ui_address, opts.ui_tls))
        return tasks

    def _start_metrics(self) -> None:
        if self.options.metrics_address is not None:
            host, port = self.options.metrics_address
            start_http_server(port, addr=host, registry=self.metrics.registry)
            log.info("metrics on http://%s:%d/metrics", host, port)

    async def _as_worker(self) -> None:
        """One worker of several: serve xDS only until this worker may decide (SQLite:
        it holds the controller's lock; etcd: the host's lock, then it campaigns), then
        bind the host's admin, dashboard and metrics ports too."""
        d, worker = self.deployment, self.deployment.worker
        assert worker is not None
        lead: list[Task] = []
        if worker.host_lock is not None:
            await worker.host_lock.hold()
            lead.append(lambda: d.elector.run(self.elected, self.deposed))
        else:
            await d.elector.run(self.elected, self.deposed)  # returns once it leads
        log.info("%s binds the admin API on %s", worker.me.name, self.options.admin_address)
        for told in worker.on_ports:
            told(self.options.admin_address)
        self._start_metrics()
        await asyncio.gather(*(run() for run in [*lead, *self._port_tasks()]))

    async def serve(self) -> None:
        """Restore (or follow), open the ports, run until SIGTERM or SIGINT; SIGHUP
        reloads the spec.

        The committed state is served before the xDS port opens, so no Envoy ever sees
        production-only weights for a rollout that was in progress."""
        leader = self._take_lead() if self.deployment.elector.lead_now() else None
        if leader is None:
            self.follower.try_refresh()
        if self.deployment.worker is None:
            self._start_metrics()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reload("SIGHUP"))
        await self.publisher.start(self.options.xds_address)
        if leader is not None:
            leader.start()
        running = [asyncio.create_task(run()) for run in self.tasks()]
        try:
            await stop.wait()
            log.info("stopping: signal received")
        finally:
            for task in running:
                task.cancel()
            if self.roles.leader is not None:
                self.roles.leader.stop(timeout=1.0)
            await self.publisher.stop()
            await self.deployment.elector.resign()
            await self.deployment.close()


# ---- the two deployments ----


def local(options: ServeOptions) -> Server:
    """One process on SQLite under `state_dir`; the spec file is the spec."""
    assert options.spec_path is not None, "one process serves a spec file"
    specs = FileSpecSource(options.spec_path)
    options.state_dir.mkdir(parents=True, exist_ok=True)
    publisher = _publisher(options, specs.spec)
    deployment = Deployment(
        store=Store.in_dir(options.state_dir),
        specs=specs,
        elector=LockFileElector(options.state_dir, options.follow_interval),
        publisher=publisher,
        metrics=ProcessMetrics.create(),
        leader_dataplane=publisher,
    )
    return Server(options, deployment)


async def replica(options: ServeOptions) -> Server:
    """One replica of several on etcd: the spec and the decisions are the store's; the
    holder of the leader key decides. StoreError (one line) when the store cannot be
    reached or holds no spec."""
    store, spec = await _open_store(options)
    replica_id = options.replica_id or _default_replica_id(options.xds_address)
    traffic = rollout_traffic(spec, current_rollouts(spec, store.load_rollouts()))
    metrics = ProcessMetrics.create()
    spec_file = SpecFile(options.spec_path, spec) if options.spec_path else None
    specs = StoreSpecSource(store, spec, traffic, metrics.registered, spec_file)
    # The committed weights from the first snapshot on: a replica that started
    # production-only and then followed would give the same routes a new version.
    publisher = _publisher(options, specs.spec, store, traffic)
    specs.traffic = lambda: publisher.traffic
    info = ReplicaInfo(
        replica_id, options.regions, options.xds_address, options.admin_address, time.time()
    )
    directory = Directory(store, info, publisher, options.leader_ttl)
    if options.regions:
        publisher.ads.served = options.regions
        publisher.ads.elsewhere = lambda region: ", ".join(directory.serving(region))

    elector = EtcdElector(store, replica_id, options.leader_ttl)
    upkeep = MaintenanceOptions(options.store_retention, options.store_quota_bytes)
    maintainer = StoreMaintainer(store, upkeep, metrics.etcd)
    store.admit = maintainer.admit

    async def close() -> None:
        await directory.withdraw()
        await maintainer.close()
        store.close()

    deployment = Deployment(
        store=store,
        specs=specs,
        elector=elector,
        publisher=publisher,
        metrics=metrics,
        leader_dataplane=ClusterDataPlane(publisher, directory, specs.live_hosts),
        watched=True,
        directory=directory,
        maintainer=maintainer,
        background=[store.watch, directory.run, directory.watch_store, maintainer.run],
        close=close,
    )
    server = Server(options, deployment)
    maintainer.room_made.append(server.room_made)
    store.subscribe(elector.store_changed)
    store.subscribe(specs.store_changed)
    store.subscribe(server.store_changed)
    log.info(
        "replica %s on %s: serving %s",
        replica_id,
        store.address,
        ", ".join(options.regions) or "every region",
    )
    return server


def _publisher(
    options: ServeOptions,
    spec: MeshSpec,
    store: EtcdStore | None = None,
    traffic: TrafficState | None = None,
    routes_version: Callable[[str], int] | None = None,
) -> XdsPublisher:
    """`routes_version`: the regions' routes versions when not the store's (workers on
    SQLite: the board's)."""
    return XdsPublisher(
        spec,
        tls=options.xds_tls,
        client_ca=options.xds_client_ca,
        trust_domain=options.xds_trust_domain,
        routes_version=store.routes_version if store is not None else routes_version,
        traffic=traffic,
        reuse_port=options.workers > 1,
    )


async def _open_store(options: ServeOptions) -> tuple[EtcdStore, MeshSpec]:
    """Load the store (pushing `--spec FILE` first when it differs)."""
    assert options.store_url is not None
    address = parse_store_url(options.store_url, options.store_prefix, options.store_security)
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
    except StoreVersionError as exc:  # (a newer schema: its own line, not "cannot reach")
        raise StoreError(str(exc)) from None
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
    return store, spec


def _default_replica_id(xds_address: str) -> str:
    return f"{socket.gethostname()}-{xds_address.rpartition(':')[2]}"
