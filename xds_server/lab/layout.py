"""What one lab is asked for (`MeshOptions`) and where everything of it goes (`MeshLayout`).

Every port is chosen when the lab is made, before anything starts: Prometheus's
configuration is written once, with every target, and a region's Envoys need their
replicas' addresses in their bootstraps. The rooms of `LocalMesh` (processes,
credentials, spec, faults, state and traffic reads) all read this one plan; none of them
picks a port, an address or a path of its own.

With `netns` (issue 29) the plan also holds the lab's network (`lab/netns.py`): each
region's processes run in that region's namespace and bind its address, Prometheus and
the control plane without `ha` in `ops`; every address anything is given or dialled
comes from `host(key)` (127.0.0.1 without namespaces), so the lab's driver, in the root
namespace, reaches them all over the bridge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xds_server.lab import netns
from xds_server.lab.procs import free_port

SERVICE = "recommender"
FEATURES = "features"
"""The lab's second service (`MeshOptions.features`): the recommender's dependency."""
GROUP = "ranking"
"""The rollout group of the two services (`rollout_groups:`), with the `features` option."""
VERSIONS = {"production": "v1", "baseline": "v1", "canary": "v2"}
DEFAULT_REGIONS = ("us-east", "eu-west", "ap-south")
LOOPBACK = "127.0.0.1"
ETCD_MEMBERS = 3
"""At least this many etcd members (with `ha`): one per region, and with fewer regions
the rest in `ops` (with `netns`), so cutting one region never takes the majority."""


@dataclass
class MeshOptions:
    regions: tuple[str, ...] = DEFAULT_REGIONS
    envoys_per_region: int = 1
    rollout: dict[str, Any] = field(default_factory=dict)
    """The spec's `rollout:` section."""
    load_rate: float = 50.0
    """Requests per second through each region (shared by its Envoys)."""
    admin_token: str | None = None
    """Require this bearer token for admin API changes."""
    mtls: bool = False
    """xDS over mTLS: a CA and a certificate per Envoy from hack/make-certs.sh; the
    server checks each Envoy's region and node id against its certificate."""
    notify_url: str | None = None
    """Send every rollout event there as a CloudEvent (a top-level `notifications:`
    section with one `webhook` target, `lab`)."""
    protocol: str = "http"
    """What Envoys and callers speak to the model servers: "http" (the Open Inference
    Protocol's REST binding) or "grpc" (its gRPC binding; the service's pools are then
    `protocol: grpc`, on the model servers' gRPC ports)."""
    proxyless_per_region: int = 0
    """Proxyless gRPC client processes per region (`xds:///recommender`); needs "grpc"."""
    proxyless_rate: float = 10.0
    """Requests per second of each region's proxyless clients together, beside the load
    through its Envoys."""
    ha: bool = False
    """Replicas on etcd: a three-member etcd cluster and one `serve --store` replica per
    region, serving its region and the next (`served_by`); each Envoy's bootstrap lists
    its region's replica first, then the neighbour's that also serves it."""
    leader_ttl: float = 3.0
    """The replicas' `--leader-ttl` (with `ha`)."""
    etcd_quota_bytes: int | None = None
    """With `ha`: each etcd member's `--quota-backend-bytes`, told to the replicas
    (`--store-quota-bytes`); None: etcd's default, 2 GiB. A small one fills soon, to
    etcd's NOSPACE alarm (tests/test_ha_nospace.py)."""
    store_retention: float | None = None
    """With `ha`: the replicas' `--store-compaction-retention`, seconds (a soak's short
    one applies within its run); None: serve's default, an hour."""
    audit_retention: float | None = None
    """The server's or replicas' `--audit-retention`, seconds (a soak's short one archives
    finished rollouts within its run); None: serve's default, 30 days."""
    registry_ttl: float = 3.0
    """With `ha`: the model servers register themselves (the spec lists no endpoints),
    on leases of this TTL."""
    models: str = "builtin"
    """Who serves the pools: "builtin" (the lab's own model server, with fault knobs) or
    "mlserver" (a real MLServer process per pool and region, `lab/mlserver.py`)."""
    canary_model: str = "healthy"
    """With "mlserver": the scenario whose canary model the canary serves
    (`lab/mlserver.py`'s `CANARY_MODELS`)."""
    features: bool = False
    """A second service, `features` (pools v1/v1/v2 on model servers of its own in every
    region, its own virtual host: the domain `features`), which the recommender's model
    servers call through their region's Envoys for each inference, propagating
    `x-xds-arm`; the two are the consistent rollout group `ranking` (the spec's shape
    can change: `SpecWriter.shape`). Over HTTP with the lab's own servers, without `ha`."""

    netns: bool = False
    """Each region in a network namespace of its own, Prometheus and the control plane
    without `ha` in `ops` (`lab/netns.py`; needs root: without it the lab says why in
    one line and runs on loopback)."""

    def problems(self) -> list[str]:
        """What of these options cannot go together (empty: nothing)."""
        out = []
        if self.netns and self.models != "builtin":
            out.append("MLServer binds loopback only: --netns runs the built-in model servers")
        if not self.features:
            return out
        if self.protocol != "http":
            out.append("the features service is called over HTTP only (protocol http)")
        if self.models != "builtin":
            out.append(
                "only the lab's own model servers call the features service (models builtin)"
            )
        if self.ha:
            out.append("the features service's servers do not register themselves (no ha)")
        return out


@dataclass(frozen=True)
class EnvoySlot:
    """One Envoy of the plan: its region, its number there and its two ports."""

    region: str
    index: int
    admin_port: int
    listen_port: int

    @property
    def node_id(self) -> str:
        return f"{self.region}-envoy-{self.index}"


class MeshLayout:
    """The lab's directory, files, ports (free ones on 127.0.0.1) and, with `netns`,
    its network's plan (made by `LocalMesh.start`, not here)."""

    def __init__(self, workdir: Path, opts: MeshOptions) -> None:
        self.workdir = workdir
        self.opts = opts
        self.net: netns.NetworkPlan | None = None
        """With `netns` on a machine that can: the lab's network, planned."""
        self.netns_unavailable: str | None = None
        """With `netns` on a machine that cannot: why, in one line (the lab runs on
        loopback)."""
        if opts.netns:
            self.netns_unavailable = netns.available()
            if self.netns_unavailable is None:
                self.net = netns.plan_network(opts.regions)
        self.spec_path = workdir / "mesh.yaml"
        self.state_dir = workdir / "state"
        """The server's `--state-dir` (without `ha`)."""
        self.spare_ports = {(r, "canary"): free_port() for r in opts.regions} if opts.ha else {}
        """A port per region for a second canary instance (`add_instance`), scraped by
        Prometheus from the start (its configuration is written once)."""
        self.model_ports = {(r, p): free_port() for r in opts.regions for p in VERSIONS}
        """(region, pool) -> the model server's REST port."""
        problems = opts.problems()
        if problems:
            raise ValueError("lab options: " + "; ".join(problems))
        self.feature_ports = (
            {(r, p): free_port() for r in opts.regions for p in VERSIONS} if opts.features else {}
        )
        """With `features`: (region, pool) -> the features service's model server's port."""
        self.grpc_ports = (
            {key: free_port() for key in self.model_ports}
            if opts.protocol == "grpc" or opts.models == "mlserver"
            else {}
        )
        """(region, pool) -> the model server's gRPC port (MLServer always has one)."""
        self.mlserver_metrics_ports = (
            {key: free_port() for key in self.model_ports} if opts.models == "mlserver" else {}
        )
        """(region, pool) -> its MLServer's metrics server (`/metrics`, scraped as the
        built-in servers' REST port is: the scores' histogram of the output gate)."""
        self.replica_ports = {
            r: {k: free_port() for k in ("xds", "admin", "metrics", "ui")}
            for r in (opts.regions if opts.ha else ())
        }
        """With `ha`: region -> its replica's ports (`--replica-id` is the region's name)."""
        first = self.replica_ports.get(opts.regions[0]) if opts.ha else None
        # The server's (with `ha`: the first region's replica's, as a default).
        self.xds_port = first["xds"] if first else free_port()
        self.metrics_port = first["metrics"] if first else free_port()
        self.admin_port = first["admin"] if first else free_port()
        self.ui_port = first["ui"] if first else free_port()
        self.prometheus_port = free_port()
        self.envoys = [
            EnvoySlot(r, i, free_port(), free_port())
            for r in opts.regions
            for i in range(1, opts.envoys_per_region + 1)
        ]
        self.extra_hosts: dict[int, str] = {}
        """Ports taken while running (`add_instance`) -> their address (`port_host`)."""

    # ---- where each process runs and binds ----

    def host(self, key: str) -> str:
        """The address of namespace `key` (a region, or `netns.OPS`): where its
        processes bind and are reached; 127.0.0.1 without namespaces."""
        return self.net.address(key) if self.net is not None else LOOPBACK

    def exec_prefix(self, key: str) -> list[str]:
        """Prepended to a command to run it in namespace `key` (nothing without)."""
        return self.net.exec_prefix(key) if self.net is not None else []

    @property
    def server_key(self) -> str:
        """Where the server runs without `ha`: `ops`, beside Prometheus (it is every
        region's control plane, none's own)."""
        return netns.OPS

    def replica_key(self, region: str) -> str:
        """The namespace of a region's replica (with `ha`): its region's."""
        return region

    def server_host(self) -> str:
        """The address of `server` (with `ha`: the first region's replica)."""
        return self.host(self.opts.regions[0] if self.opts.ha else self.server_key)

    def region_xds_host(self, region: str) -> str:
        return self.host(self.replica_key(region) if self.opts.ha else self.server_key)

    def replica_host(self, region: str) -> str:
        """The admin/xDS address of the replica of `region` (the server without `ha`)."""
        return self.region_xds_host(region)

    @property
    def prometheus_host(self) -> str:
        return self.host(netns.OPS)

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.prometheus_host}:{self.prometheus_port}"

    def etcd_keys(self) -> list[str]:
        """The namespace of each etcd member (with `ha`): one per region, then `ops`
        up to `ETCD_MEMBERS`."""
        regions = list(self.opts.regions)
        return regions + [netns.OPS] * max(0, ETCD_MEMBERS - len(regions))

    def port_host(self, port: int) -> str:
        """The address of whatever of the plan listens on `port` (a model server's
        REST, gRPC or metrics port, an Envoy's): for readers that know a port only.
        127.0.0.1 without namespaces, or for a port the plan does not know."""
        for ports in (
            self.model_ports,
            self.feature_ports,
            self.grpc_ports,
            self.mlserver_metrics_ports,
            self.spare_ports,
        ):
            for (region, _), p in ports.items():
                if p == port:
                    return self.host(region)
        for e in self.envoys:
            if port in (e.admin_port, e.listen_port):
                return self.host(e.region)
        return self.extra_hosts.get(port, LOOPBACK)

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.server_host()}:{self.ui_port}/"

    def pool_port(self, region: str, pool: str) -> int:
        """The port Envoy (and proxyless clients) send a pool's requests to."""
        if self.opts.protocol == "grpc":
            return self.grpc_ports[(region, pool)]
        return self.model_ports[(region, pool)]

    def services(self) -> tuple[str, ...]:
        """The services of the lab's spec: the recommender, and with `features` its
        dependency."""
        return (SERVICE, FEATURES) if self.opts.features else (SERVICE,)

    def service_ports(self, service: str) -> dict[tuple[str, str], int]:
        """(region, pool) -> the REST port of one service's model servers."""
        return self.feature_ports if service == FEATURES else self.model_ports

    def region_listeners(self, region: str) -> list[str]:
        """HOST:PORT of the region's Envoys' listeners (where a caller in the region goes)."""
        host = self.host(region)
        return [f"{host}:{e.listen_port}" for e in self.envoys if e.region == region]

    def region_xds_port(self, region: str) -> int:
        return self.replica_ports[region]["xds"] if self.opts.ha else self.xds_port

    def replica_admin(self, region: str) -> int:
        return self.replica_ports[region]["admin"] if self.opts.ha else self.admin_port

    def served_by(self, replica: str) -> tuple[str, ...]:
        """The regions a replica serves (`--regions`): its own and the next one's, in a
        ring, so every region has two replicas: its own first, a neighbour's second."""
        regions = list(self.opts.regions)
        i = regions.index(replica)
        return tuple(dict.fromkeys([replica, regions[(i + 1) % len(regions)]]))

    def xds_fallbacks(self, region: str) -> tuple[tuple[str, int], ...]:
        """The other replicas that serve the region: where its Envoys go when their own
        replica is down."""
        return tuple(
            (self.host(self.replica_key(r)), ports["xds"])
            for r, ports in self.replica_ports.items()
            if r != region and region in self.served_by(r)
        )

    def proxyless_nodes(self) -> list[tuple[str, str]]:
        """(region, node id) of every proxyless client."""
        n = self.opts.proxyless_per_region
        return [(r, f"{r}-grpc-{i}") for r in self.opts.regions for i in range(1, n + 1)]
