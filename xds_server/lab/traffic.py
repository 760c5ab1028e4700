"""What the data plane does, read from the processes themselves: each Envoy's weights and
hosts (its admin API), each model server's counts (`/stats`), the proxyless clients'
counts (their files), and whether Prometheus has the series a rollout needs.

The control plane's side (the rollout, the audit log) is `lab/state.py`'s.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from xds_server.lab.layout import SERVICE, MeshLayout
from xds_server.lab.polling import wait_for
from xds_server.lab.processes import MeshProcesses
from xds_server.lab.procs import Envoy, http_get
from xds_server.render.bootstrap import XDS_CLUSTER


class TrafficReader:
    def __init__(self, layout: MeshLayout, processes: MeshProcesses) -> None:
        self.layout = layout
        self.processes = processes

    def envoy_hosts(self, envoy: Envoy, pool: str) -> set[int]:
        """The ports of a pool's hosts in this Envoy, from its own /clusters."""
        doc = envoy.admin_get("/clusters?format=json")
        for cluster in doc.get("cluster_statuses", []):
            if cluster["name"] == f"{SERVICE}|{pool}":
                return {
                    h["address"]["socket_address"]["port_value"]
                    for h in cluster.get("host_statuses", [])
                }
        return set()

    def xds_servers(self, envoy: Envoy) -> set[str]:
        """HOST:PORT of the xDS servers this Envoy has a connection open to now (its
        `xds_server` cluster's hosts with an active connection, from its /clusters)."""
        doc = envoy.admin_get("/clusters?format=json")
        out: set[str] = set()
        for cluster in doc.get("cluster_statuses", []):
            if cluster["name"] != XDS_CLUSTER:
                continue
            for host in cluster.get("host_statuses", []):
                stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
                if stats.get("cx_active", 0) > 0:
                    addr = host["address"]["socket_address"]
                    out.add(f"{addr['address']}:{addr['port_value']}")
        return out

    def model_stats(self, region: str, pool: str, service: str = SERVICE) -> dict[str, int]:
        """How many user and shadow requests a model server has answered (and stalled);
        the arms its requests carried and its calls to the next service."""
        return self.model_stats_at(self.layout.service_ports(service)[(region, pool)])

    def service_stats(self, service: str = SERVICE) -> dict[str, int]:
        """One service's model servers' counts (`model_stats`), added up over every
        region and pool: its crossed arms (`arm_crossed`), requests without the arm
        header (`arm_missing`), calls answered by another arm (`downstream_crossed`)."""
        ports = self.layout.service_ports(service)
        return add_counts(self.model_stats_at(port) for port in ports.values())

    def crossings(self, service: str = SERVICE) -> list[dict[str, Any]]:
        """The latest calls of a service's model servers answered by another arm of the
        next service (each server's `GET /crossings`), each with the server's region and
        pool, in the order they were answered."""
        out: list[dict[str, Any]] = []
        for (region, pool), port in self.layout.service_ports(service).items():
            url = f"http://{self.layout.port_host(port)}:{port}/crossings"
            status, body, _ = http_get(url)
            assert status == 200, body
            out += [{**c, "region": region, "pool": pool} for c in json.loads(body)["crossings"]]
        return sorted(out, key=lambda c: float(c["at"]))

    def model_stats_at(self, rest_port: int) -> dict[str, int]:
        status, body, _ = http_get(f"http://{self.layout.port_host(rest_port)}:{rest_port}/stats")
        assert status == 200, body
        return dict(json.loads(body))

    def proxyless_counts(self, region: str | None = None) -> dict[str, Any]:
        """What the proxyless clients (of `region`, or all) have sent so far, added up
        (from their own files, rewritten every second)."""
        clients = self.processes.proxyless
        return add_counts(c.counts() for c in clients if region in (None, c.region))

    def proxyless_since(self, since: float, calls: int, timeout: float = 15) -> dict[str, Any]:
        """The proxyless clients' calls counted after `since` (from the first file each
        wrote after it), once there are at least `calls` of them: what they do now."""

        def written_after() -> list[dict[str, Any]] | None:
            seen = [c.counts_at() for c in self.processes.proxyless]
            return [counts for _, counts in seen] if all(t > since for t, _ in seen) else None

        start = add_counts(
            wait_for(written_after, "the proxyless clients' counts", timeout=timeout)
        )

        def grown() -> dict[str, Any] | None:
            delta = sub_counts(self.proxyless_counts(), start)
            return delta if delta.get("sent", 0) >= calls else None

        return wait_for(grown, f"{calls} more proxyless calls", timeout=timeout)

    def targets_up(self, region: str) -> bool:
        """Does Prometheus scrape every Envoy of the region now (`up` 1 on each)?"""
        prometheus = self.processes.prometheus
        assert prometheus is not None
        query = f'up{{job="envoy",region="{region}"}}'
        url = f"{prometheus.url}/api/v1/query?query={urllib.parse.quote(query)}"
        status, body, _ = http_get(url)
        found = json.loads(body)["data"]["result"] if status == 200 else []
        envoys = [e for e in self.layout.envoys if e.region == region]
        return len(found) == len(envoys) and all(r["value"][1] == "1" for r in found)

    def wait_latency_series(self, timeout: float = 30) -> None:
        """Until Prometheus can answer, for every region's production pool, what a
        rollout checks at its start: Envoy exports counters at once but histograms only
        at its stats flush, and `increase()` needs two samples of the model servers'
        output histogram; a rollout started in between would find a query empty for a
        pool that takes traffic (a configuration error: it pauses)."""
        prometheus = self.processes.prometheus
        assert prometheus is not None
        regions = set(self.layout.opts.regions)
        window = str(self.layout.opts.rollout.get("window", "5s"))
        queries = [
            *(
                "count by (region) (increase(envoy_cluster_upstream_rq_time_bucket"
                f'{{envoy_cluster_name="{service}|production"}}[{window}]) > 0)'
                for service in self.layout.services()
            ),
            "count by (region) (increase(model_prediction_score_bucket"
            f'{{pool="production"}}[{window}]) > 0)',
        ]
        if self.layout.opts.models == "mlserver":
            queries = queries[:-1]  # MLServer exports no score histogram

        def every_region(query: str) -> bool:
            url = f"{prometheus.url}/api/v1/query?query={urllib.parse.quote(query)}"
            status, body, _ = http_get(url)
            found = {r["metric"].get("region") for r in json.loads(body)["data"]["result"]}
            return status == 200 and found >= regions

        wait_for(
            lambda: all(every_region(q) for q in queries),
            "every region's latency and output histograms in Prometheus",
            timeout=timeout,
            interval=0.2,
        )


def envoy_weights(envoy: Envoy, service: str = SERVICE) -> dict[str, int]:
    """The weighted clusters this Envoy reports it routes a service by, from its own
    /config_dump."""
    for cfg in envoy.config_dump().get("configs", []):
        if cfg.get("@type", "").endswith("RoutesConfigDump"):
            for dyn in cfg.get("dynamic_route_configs", []):
                for vh in dyn["route_config"].get("virtual_hosts", []):
                    if vh["name"] != service:
                        continue
                    # (canary_match and a consistent group's arm routes come first: each
                    # goes to one cluster, never by weight)
                    for route in vh["routes"]:
                        if "weighted_clusters" in route.get("route", {}):
                            clusters = route["route"]["weighted_clusters"]["clusters"]
                            return {
                                c["name"].split("|")[1]: int(c.get("weight", 0)) for c in clusters
                            }
    return {}


def canary_share(envoy: Envoy, service: str = SERVICE) -> float:
    w = envoy_weights(envoy, service)
    total = sum(w.values())
    return w.get("canary", 0) * 100 / total if total else 0.0


def add_counts(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Nested counts added up key by key (numbers summed, mappings merged the same way);
    what is neither is left out."""
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, Mapping):
                total[key] = add_counts([total.get(key, {}), value])
    return total


def sub_counts(total: Mapping[str, Any], part: Mapping[str, Any]) -> dict[str, Any]:
    """`total` minus `part`, key by key (as `add_counts` adds them); zeros left out."""
    out: dict[str, Any] = {}
    for key, value in total.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            if value - part.get(key, 0):
                out[key] = value - part.get(key, 0)
        elif isinstance(value, Mapping):
            inner = sub_counts(value, part.get(key, {}))
            if inner:
                out[key] = inner
    return out
