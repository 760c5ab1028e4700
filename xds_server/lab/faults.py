"""What a scenario or a test breaks on purpose: a model server's fault knobs (while it
runs), processes killed or stopped (the server, Prometheus, a replica, an etcd member, a
model server instance), and, in a lab with namespaces (issue 29), the network between
them cut and healed.

A knob is a model server's own (`lab/upstream.py` says what each does); a kill is
a SIGKILL of one process this lab started (`lab/processes.py`); a cut is nftables
drops in one of the lab's namespaces (`lab/netns.py`), each returned as the `Change`
it made (when it took effect), for the report.
"""

from __future__ import annotations

from collections.abc import Mapping

from xds_server.lab import netns
from xds_server.lab.layout import SERVICE, MeshLayout
from xds_server.lab.processes import MeshProcesses
from xds_server.lab.procs import http_post_json


class FaultInjector:
    def __init__(self, layout: MeshLayout, processes: MeshProcesses) -> None:
        self.layout = layout
        self.processes = processes

    def set(
        self,
        region: str,
        pool: str,
        error_rate: float | None = None,
        latency_ms: float | None = None,
        healthy: bool | None = None,
        shadow_error_rate: float | None = None,
        drift: bool | None = None,
        tenant_latency_ms: Mapping[str, float] | None = None,
        stall_fraction: float | None = None,
        model_name: str | None = None,
        service: str = SERVICE,
    ) -> None:
        """Change a model server's fault knobs while it runs (its POST /fault); None
        leaves a knob as it is. `service`: whose server (with `features`, either)."""
        knobs = {
            "error_rate": error_rate,
            "latency_ms": latency_ms,
            "healthy": healthy,
            "shadow_error_rate": shadow_error_rate,
            "drift": drift,
            "tenant_latency_ms": dict(tenant_latency_ms) if tenant_latency_ms is not None else None,
            "stall_fraction": stall_fraction,
            "model_name": model_name,
        }
        body = {k: v for k, v in knobs.items() if v is not None}
        port = self.layout.service_ports(service)[(region, pool)]
        http_post_json(f"http://{self.layout.host(region)}:{port}/fault", body)

    def kill_server(self) -> None:
        assert self.processes.server is not None
        self.processes.server.kill()

    def stop_prometheus(self) -> None:
        """Prometheus gone (`processes.start_prometheus()` brings it back)."""
        assert self.processes.prometheus is not None
        self.processes.prometheus.stop()

    def kill_replica(self, region: str) -> None:
        """SIGKILL a region's replica (with `ha`)."""
        self.processes.replicas[region].kill()

    def kill_etcd_member(self) -> str:
        """SIGKILL the last etcd member; its name."""
        etcd = self.processes.etcd
        assert etcd is not None
        index = len(etcd.members) - 1
        name = etcd.members[index].name
        etcd.kill(index)
        return name

    def kill_model(self, region: str, pool: str) -> int:
        """SIGKILL a pool's first model server in a region; the port Envoy sent it to."""
        self.processes.models[(region, pool)].kill()
        return self.layout.pool_port(region, pool)

    # ---- partitions (issue 29): the lab's network, with `netns` ----

    def network(self) -> netns.NetworkPlan:
        """The lab's network; a clear error for a lab on loopback."""
        if self.layout.net is None:
            why = self.layout.netns_unavailable or "the lab runs without --netns"
            raise RuntimeError(f"a partition needs the lab's network namespaces: {why}")
        return self.layout.net

    def cut_region(self, region: str) -> netns.Change:
        """The region cut off from every other namespace (the driver still reaches it):
        its processes reach only each other."""
        return self.network().isolate(region)

    def cut_from_regions(self, region: str) -> netns.Change:
        """The region cut from the other regions' namespaces only: their replicas and
        etcd members (a leader keeps its Envoys, its own etcd member and Prometheus)."""
        return self.network().cut(region, [r for r in self.layout.opts.regions if r != region])

    def cut_prometheus(self, region: str) -> netns.Change:
        """Prometheus's namespace (`ops`) cut from the region's: its targets there go
        stale, every other region's stay fresh."""
        return self.network().cut(netns.OPS, [region])

    def drop_xds(self, region: str) -> netns.Change:
        """The region's replica's xDS port dropped for the region's own addresses: the
        replica reaches etcd and everything else, its own Envoys cannot reach it."""
        port = self.layout.region_xds_port(region)
        return self.network().drop_port(region, port, [region])

    def heal(self, key: str | None = None) -> list[netns.Change]:
        """Every cut in namespace `key` (all of them when None) removed."""
        return self.network().heal(key)
