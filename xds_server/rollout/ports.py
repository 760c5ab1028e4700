"""What the rollout controller needs from the world, as narrow `typing.Protocol`s.

The controller depends on these and on the data plane's port (`xds.dataplane`) only;
the server (`app/server.py`) decides which implementation each one gets:

| port          | implemented by                                   |
| ------------- | ------------------------------------------------ |
| MetricSource  | `rollout.metrics.PrometheusSource`               |
| HostProber    | `rollout.probes.NetworkProber`                   |
| StateStore    | `rollout.store.Store` (SQLite), `ha.store.EtcdStore` |
| TrafficSink   | `rollout.exported.RolloutMetrics`, the leader's sinks       |
|               | (`app.leader.LEADER_SINKS`), the admin event stream  |
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.decision import Decision
from xds_server.rollout.evidence import Measurement, MetricReading, Signals
from xds_server.rollout.state import RolloutState
from xds_server.spec import Endpoint, HealthCheck, MeshSpec, MetricSpec, RolloutPlan
from xds_server.traffic import TrafficState


@dataclass(frozen=True)
class QueryCheck:
    problems: tuple[str, ...] = ()
    """What makes the rollout unjudgeable: a query rejected, or one that returns nothing
    for a pool that takes traffic now. A configuration error: the rollout pauses."""
    unreachable: str | None = None
    """Why the source could not be asked (down, or no answer in time): not a
    configuration error; the steps hold until it answers."""


@dataclass(frozen=True)
class Where:
    """One pool of one service in one region: what a query's placeholders name."""

    region: str
    service: str
    pool: str
    version: str
    cluster: str


@runtime_checkable
class NodeFilter(Protocol):
    """A `MetricSource` that can leave some nodes' traffic out of a region's reads: the
    nodes not known to route by the step's weights (stragglers, nodes not applied yet:
    `xds.acks.Gate.excluded`), told before each look; () puts every node back."""

    def exclude_nodes(self, region: str, nodes: Collection[str]) -> None: ...


class MetricSource(Protocol):
    """Canary, baseline and production health, as the region's Envoys report it. A
    failure never raises: it is a Measurement with a `problem` (no evidence)."""

    async def measure(
        self,
        plan: RolloutPlan,
        region: str,
        cluster: str,
        window_s: float,
        *,
        p99: bool = True,
        buckets: bool = False,
    ) -> Measurement: ...

    async def pool_health(
        self, plan: RolloutPlan, region: str, cluster: str
    ) -> tuple[float, float]:
        """(hosts, healthy hosts) summed over the region's Envoys; raises when unknown."""
        ...

    async def check_queries(
        self,
        plan: RolloutPlan,
        region: str,
        cluster: str,
        serving: str | None = None,
        versions: Mapping[str, str] | None = None,
    ) -> QueryCheck:
        """Run every query once, at a rollout's start (bounded in time). `versions`: each
        pool's version, for templates that name `{version}`."""
        ...

    async def read(
        self, plan: RolloutPlan, metric: MetricSpec, where: Where, window_s: float
    ) -> MetricReading:
        """A user metric of the spec (ratio, value, distribution, output) for one pool."""
        ...

    async def tenant(
        self, plan: RolloutPlan, where: Where, tenant: str, window_s: float
    ) -> Measurement:
        """One tenant's slice of a pool: requests, errors, p99 (from the model servers)."""
        ...

    async def throughput(
        self, plan: RolloutPlan, where: Where, window_s: float
    ) -> tuple[float | None, float | None]:
        """(what `where`'s cluster delivered: responses that are not 5xx; every request
        the service's pools were sent in the region)."""
        ...

    async def signals(
        self,
        plan: RolloutPlan,
        region: str,
        service: str,
        configured: Mapping[str, float],
        step_age: float,
    ) -> Signals:
        """The region's signal health over the step: how fresh the Envoy targets'
        samples are, whether they are up, counter resets, and the requests Envoy routed
        to each pool (`configured`: each pool's share, 0-1). Never raises: a `problem`."""
        ...


class HostProber(Protocol):
    """Asks one host the warm-up's health check, as the control plane itself (Envoy's
    stats say how many hosts are healthy, not why one is not; and Envoy cannot send an
    OIP `ModelReady` over gRPC). Never raises."""

    async def probe(
        self, hc: HealthCheck, grpc_service: bool, ep: Endpoint, timeout: float
    ) -> str | None:
        """None when the host passes the check, else the cause (`HTTP 503 from GET
        /v2/health/ready`, `UNIMPLEMENTED: ...`, `connection refused`, `timeout: ...`)."""
        ...


class StoreWriteError(Exception):
    """A `StateStore.record` that committed nothing; the message says why."""


class StoreFenced(StoreWriteError):
    """A write refused because this process no longer leads (replicas on a shared store):
    it must stop deciding, and push nothing it decided."""


class StateStore(Protocol):
    """Rollout state and the append-only audit log. `record` is atomic: the state and
    its entries are committed together, or neither is (StoreWriteError)."""

    def load_rollouts(self) -> list[RolloutState]: ...

    def rollout(self, service: str, version: str) -> RolloutState | None: ...

    def record(
        self,
        state: RolloutState,
        entries: Sequence[AuditEntry],
        *,
        critical: bool = False,
        regions: Collection[str] = (),
    ) -> None:
        """`critical`: a rollback, which may use room kept for it (a full disk).
        `regions`: those whose weights this decision changes (a replicated store marks
        them, so that every replica gives their new routes one version)."""
        ...

    def audit(
        self,
        service: str | None = None,
        region: str | None = None,
        since: float | None = None,
        kind: str | None = None,
        limit: int | None = None,
        after_id: int | None = None,
        before_id: int | None = None,
        version: str | None = None,
    ) -> list[AuditEntry]:
        """The live log's and the archives' entries that match, in id order; with
        `limit`, the newest `limit` (pages: `before_id`, the oldest id seen). Blocking
        (a store read): on an event loop, run it in a thread."""
        ...

    def latest_checks(self, service: str, version: str) -> dict[str, AuditEntry]: ...


@dataclass(frozen=True)
class Committed:
    """What a sink is told after each committed decision, and after a spec change or a
    restore (then `decision` is None): the whole view, so a sink never has to ask."""

    time: float
    spec: MeshSpec
    rollouts: Mapping[str, RolloutState]
    """Every service's current rollout."""
    traffic: TrafficState
    """The weights those rollouts imply, as pushed to the data plane."""
    decision: Decision | None = None
    actor: str = "controller"

    @property
    def state(self) -> RolloutState | None:
        return self.decision.state if self.decision else None


class TrafficSink(Protocol):
    """Anything that follows committed decisions: metrics, the Istio applier, the admin
    event stream, later notifications. Called on the controller's loop after the commit
    and the push; it must not block (hand slow work to a task or a thread)."""

    def follow(self, event: Committed) -> None: ...


__all__ = [
    "Committed",
    "HostProber",
    "MetricSource",
    "QueryCheck",
    "StateStore",
    "StoreFenced",
    "StoreWriteError",
    "TrafficSink",
    "Where",
]
