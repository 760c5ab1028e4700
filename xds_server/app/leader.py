"""What runs only while this process decides: the rollout controller and the leader's
sinks (outputs that act on the world once per decision, whichever replica serves).

`LEADER_SINKS` is the one place to add such an output: a function that registers the
output's metrics on the process's registry once, and returns how to build the output
for a leadership term from the spec (None: the spec does not ask for it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry

from xds_server.outputs.istio_apply import istio_sinks
from xds_server.outputs.notify import notification_sinks
from xds_server.rollout.archive import DEFAULT_RETENTION, Archiving
from xds_server.rollout.controller import RolloutController
from xds_server.rollout.exported import RolloutMetrics
from xds_server.rollout.ports import Committed, MetricSource, StateStore
from xds_server.rollout.retention import AuditRetention
from xds_server.spec import MeshSpec
from xds_server.xds.dataplane import DataPlane

log = logging.getLogger("xds_server.app")


class LeaderSink(Protocol):
    """A `TrafficSink` that only the leader runs, with work of its own."""

    def follow(self, event: Committed) -> None: ...

    async def run(self) -> None:
        """Background work for the term (cancelled when it ends)."""

    def close(self, timeout: float) -> None:
        """Stop; what is still in hand gets up to `timeout` seconds."""


SinkFactory = Callable[[MeshSpec], LeaderSink | None]

LEADER_SINKS: tuple[Callable[[CollectorRegistry], SinkFactory], ...] = (
    istio_sinks,  # the istio output mode: server-side apply per region
    notification_sinks,  # `notifications:` targets (cheap without any)
)


class LeaderRuntime:
    """One leadership term: built when this process starts deciding, closed when it stops."""

    def __init__(
        self,
        spec: Callable[[], MeshSpec],
        dataplane: DataPlane,
        store: StateStore,
        metric_source: MetricSource,
        metrics: RolloutMetrics,
        sinks: tuple[SinkFactory, ...],
        audit_retention: float = DEFAULT_RETENTION,
    ) -> None:
        self.controller = RolloutController(spec, dataplane, store, metric_source)
        self.retention = (
            AuditRetention(store, audit_retention) if isinstance(store, Archiving) else None
        )
        """Finished rollouts' audit to the archive, under this term's writes (issue 30)."""
        self.controller.subscribe(metrics)
        self.controller.watch_store(metrics.store.on_health)
        current = spec()
        self.sinks = [sink for build in sinks if (sink := build(current)) is not None]
        for sink in self.sinks:
            self.controller.subscribe(sink)
        self._tasks: list[asyncio.Task[None]] = []

    def restore(self) -> None:
        """Take up the committed rollouts: their weights are pushed at once (before the
        xDS port opens, when the process leads from its start)."""
        self.controller.restore()

    def start(self) -> None:
        """Run the controller's loop and the sinks' work, until `stop`."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.controller.run())]
        self._tasks += [loop.create_task(sink.run()) for sink in self.sinks]
        if self.retention is not None:
            self._tasks.append(loop.create_task(self.retention.run()))

    def stop(self, timeout: float) -> None:
        """The term ends: stop deciding; each sink gets up to `timeout` seconds to finish."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        for sink in self.sinks:
            sink.close(timeout)


def leader_sinks(registry: CollectorRegistry) -> tuple[SinkFactory, ...]:
    """Every leader sink's builder, its metrics registered (once per process)."""
    return tuple(register(registry) for register in LEADER_SINKS)
