"""The mesh spec's models: regions, the ingress listener, services and their pools, and
the optional `istio:` section. Frozen data; `spec.mesh` builds them from a document."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from xds_server.spec.rollout import GRPC_SERVER_FAULTS, HealthCheck, RolloutPlan

POOL_NAMES: tuple[str, ...] = ("production", "baseline", "canary")
"""The pools a service may have, in the order they are listed everywhere."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    health_port: int | None = None
    """Where the warm-up's health check asks this host, when not on `port` (and not on the
    check's own `port:`): hosts that share an address serve their health on ports of
    their own (`{address: HOST:PORT, health_port: N}` in the spec)."""

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Protocol(StrEnum):
    """What a service's model servers speak, and so how Envoy talks to them and what
    counts as an error."""

    HTTP = "http"
    """HTTP/1.1 upstreams; a 5xx is an error."""
    GRPC = "grpc"
    """HTTP/2 upstreams, `grpc.health.v1` health checks; a call that ends in one of the
    service's `grpc.error_codes` is an error, whatever its HTTP status."""


@dataclass(frozen=True)
class Pool:
    name: str
    version: str
    endpoints: Mapping[str, tuple[Endpoint, ...]]
    """Endpoints per region; with static endpoints, every region of the spec has at least
    one. Replicas on etcd add the registry's instances of the pool's version."""
    registered: bool = False
    """No `endpoints:` in the spec: the pool's hosts are the registry's instances of its
    service and version, region by region (replicas on etcd)."""
    health_check: HealthCheck | None = None
    """The pool's own warm-up check (`pools.<pool>.health_check`), in place of the
    service's: its servers answer another one (another model name, another server)."""


NOTIFY_EVENTS: tuple[str, ...] = (
    "rollout.started",
    "rollout.step",
    "rollout.paused",
    "rollout.resumed",
    "rollout.rolled_back",
    "rollout.promoted",
    "apply.failed",
)
"""The events a notification target may choose (`on:`); CloudEvents types, prefixed
with the project's reverse domain when sent."""


class NotifyKind(StrEnum):
    SLACK = "slack"
    """Incoming-webhook JSON (`text` and `blocks`): Slack, Mattermost, Teams workflows."""
    WEBHOOK = "webhook"
    """A CloudEvents 1.0 JSON event (structured mode)."""


@dataclass(frozen=True)
class NotificationTarget:
    name: str
    kind: NotifyKind
    url: str
    on: frozenset[str] = frozenset(NOTIFY_EVENTS)
    timeout: float = 5.0
    retries: int = 3


@dataclass(frozen=True)
class Notifications:
    """Where rollout events go; a service's own section replaces the top-level one."""

    targets: tuple[NotificationTarget, ...] = ()
    queue: int = 1000
    """Events waiting to be sent, per target; past it the oldest is dropped (counted)."""


@dataclass(frozen=True)
class Service:
    name: str
    domains: tuple[str, ...]
    prefix: str
    pools: Mapping[str, Pool]
    """Pools by name, always with `production`, in POOL_NAMES order."""
    rollout: RolloutPlan = field(default_factory=RolloutPlan, compare=False)
    """How a canary of this service is rolled out (spec defaults + the service's own)."""
    notifications: Notifications | None = field(default=None, compare=False)
    """The service's own `notifications:`; None: the spec's top-level section."""
    protocol: Protocol = Protocol.HTTP
    grpc_error_codes: tuple[str, ...] = GRPC_SERVER_FAULTS
    """gRPC statuses counted as errors (`grpc.error_codes`); read by the default queries."""
    after: tuple[str, ...] = ()
    """Services whose canary must be promoted (serving 100%) before this one's rollout
    starts (`after:`); a rollback of one of them rolls this one back too."""

    def pool_names(self) -> tuple[str, ...]:
        return tuple(self.pools)

    def health_check(self, pool: str) -> HealthCheck | None:
        """The warm-up's check of a pool: its own, else the service's (None: none)."""
        own = self.pools[pool].health_check if pool in self.pools else None
        return own if own is not None else self.rollout.warmup.health_check

    @property
    def canary_version(self) -> str | None:
        """The version a rollout would bring: the canary pool's, unless it is production's
        own (then there is nothing to roll out)."""
        canary = self.pools.get("canary")
        if canary is None or canary.version == self.pools["production"].version:
            return None
        return canary.version

    @property
    def has_baseline(self) -> bool:
        return "baseline" in self.pools


@dataclass(frozen=True)
class Listener:
    address: str = "127.0.0.1"
    port: int = 10000


@dataclass(frozen=True)
class IstioCluster:
    """Where one region's Istio objects are applied: a kubeconfig context, or in-cluster."""

    context: str | None = None
    kubeconfig: str | None = None
    """A path (relative ones are relative to the spec file); None: $KUBECONFIG or
    ~/.kube/config, as kubectl does."""
    in_cluster: bool = False
    """Use the pod's ServiceAccount (xds-server running inside that region's cluster)."""


@dataclass(frozen=True)
class IstioConfig:
    """The `istio:` section: how rollout state becomes Istio objects, and where they go."""

    namespace: str = "default"
    version_label: str = "version"
    pool_label: str = "xds-server/pool"
    """Second subset label, so that baseline (same version as production) selects its own
    pods; "" selects by version only."""
    cluster_domain: str = "cluster.local"
    apply: bool = False
    """Apply each region's objects to its cluster after every decision (`serve`)."""
    clusters: Mapping[str, IstioCluster] = field(default_factory=dict)
    retry_initial: float = 1.0
    retry_max: float = 60.0
    timeout: float = 10.0
    """Per request to a cluster's API server (connect and read), in seconds."""
    resync: float = 300.0
    """Re-apply unchanged objects this often, undoing hand edits (level-triggered)."""
    instance: str = "default"
    """Labels every object; with `prune`, only this instance's objects are deleted, so
    xds-servers sharing a namespace need different instances."""
    prune: bool = True
    """Delete this instance's objects of services no longer in the spec."""

    def host(self, service: str) -> str:
        return f"{service}.{self.namespace}.svc.{self.cluster_domain}"


ARM_HEADER = "x-xds-arm"
"""The request header that carries the arm (`production`, `baseline`, `canary`) a
request was routed to, from one member of a `consistent` rollout group to the next: a
plain header, which Envoy and Istio match exactly and every HTTP or gRPC library
propagates as it is told (W3C baggage would need parsing in the route)."""


@dataclass(frozen=True)
class RolloutGroup:
    """Services that roll out, and roll back, as one (`rollout_groups:`)."""

    name: str
    services: tuple[str, ...]
    consistent: bool = False
    """Version-consistent routing: a request routed to one member's arm carries
    `ARM_HEADER`, and every member's routes send a request carrying it to the same arm."""


@dataclass(frozen=True)
class MeshSpec:
    regions: tuple[str, ...]
    listener: Listener
    services: tuple[Service, ...]
    source: str = "<memory>"
    istio: IstioConfig | None = None
    """The optional `istio:` section; None when the spec has none."""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The parsed YAML document, for sections that later layers interpret themselves."""
    notifications: Notifications = field(default_factory=Notifications, compare=False)
    rollout_groups: tuple[RolloutGroup, ...] = ()

    def group_of(self, service: str) -> RolloutGroup | None:
        """The rollout group `service` belongs to (a service is in at most one)."""
        for group in self.rollout_groups:
            if service in group.services:
                return group
        return None

    def group(self, name: str) -> RolloutGroup:
        for group in self.rollout_groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def notifications_for(self, service: str) -> Notifications:
        own = self.service(service).notifications
        return own if own is not None else self.notifications

    def service(self, name: str) -> Service:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)


@dataclass(frozen=True)
class SpecProblem:
    path: str
    message: str


class SpecError(Exception):
    """A spec that cannot be used; `problems` lists every problem found."""

    def __init__(self, source: str, problems: list[SpecProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [
            f"{self.source}: {p.path}: {p.message}" if p.path else f"{self.source}: {p.message}"
            for p in self.problems
        ]
        return "\n".join(lines)
