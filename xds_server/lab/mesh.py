"""A whole local mesh on loopback: model servers, Prometheus, `xds-server serve`, Envoys.

The rollout tests and the lab both run on this, so they start and stop things the same
way. Everything runs on 127.0.0.1 with free ports; `stop()` ends every process it
started, by pid.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xds_server.ha.etcd import parse_store_url
from xds_server.ha.store import EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.load import LoadGenerator
from xds_server.lab.procs import (
    Envoy,
    Process,
    ProxylessClient,
    free_port,
    http_get,
    http_post_json,
    wait_for,
)
from xds_server.lab.prometheus import Prometheus, ScrapeTarget
from xds_server.render.bootstrap import BootstrapOptions, GrpcBootstrapOptions
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.state import RolloutState
from xds_server.rollout.store import FILE_NAME, Store

SERVICE = "recommender"
MAKE_CERTS = Path(__file__).resolve().parents[2] / "hack" / "make-certs.sh"
"""The repository's certificate script (the lab runs from a checkout)."""
VERSIONS = {"production": "v1", "baseline": "v1", "canary": "v2"}


@dataclass
class MeshOptions:
    regions: tuple[str, ...] = ("us-east", "eu-west", "ap-south")
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
    registry_ttl: float = 3.0
    """With `ha`: the model servers register themselves (the spec lists no endpoints),
    on leases of this TTL."""


class LocalMesh:
    def __init__(self, workdir: Path, options: MeshOptions | None = None) -> None:
        self.workdir = workdir
        self.opts = options or MeshOptions()
        self.models: dict[tuple[str, str], Process] = {}
        self.extra_models: dict[tuple[str, str, int], Process] = {}
        """Instances added while running (`add_instance`): (region, pool, port)."""
        self.spare_ports = (
            {(r, "canary"): free_port() for r in self.opts.regions} if self.opts.ha else {}
        )
        """A port per region for a second canary instance (`add_instance`), scraped by
        Prometheus from the start (its configuration is written once)."""
        self.model_ports = {(r, p): free_port() for r in self.opts.regions for p in VERSIONS}
        self.grpc_ports = (
            {key: free_port() for key in self.model_ports} if self.opts.protocol == "grpc" else {}
        )
        self.proxyless: list[ProxylessClient] = []
        self.envoys: list[Envoy] = []
        self.server: Process | None = None
        """The server (with `ha`: the first region's replica, as a default)."""
        self.replicas: dict[str, Process] = {}
        """With `ha`: region -> its replica (`--replica-id` is the region's name)."""
        self.replica_ports = {
            r: {k: free_port() for k in ("xds", "admin", "metrics", "ui")}
            for r in (self.opts.regions if self.opts.ha else ())
        }
        self.etcd: EtcdCluster | None = None
        self._etcd_store: EtcdStore | None = None
        self.prometheus: Prometheus | None = None
        self.load: LoadGenerator | None = None
        first = self.replica_ports.get(self.opts.regions[0]) if self.opts.ha else None
        self.xds_port = first["xds"] if first else free_port()
        self.metrics_port = first["metrics"] if first else free_port()
        self.admin_port = first["admin"] if first else free_port()
        self.ui_port = first["ui"] if first else free_port()
        self.prometheus_port = free_port()
        self._state_store: Store | None = None
        self.spec_path = workdir / "mesh.yaml"
        self.state_dir = workdir / "state"
        self._envoy_ports = [
            (r, i, free_port(), free_port())
            for r in self.opts.regions
            for i in range(1, self.opts.envoys_per_region + 1)
        ]

    # ---- lifecycle ----

    def start(self) -> LocalMesh:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.opts.ha:
            # The store first: model servers register in it, and check the spec's there.
            self.etcd = EtcdCluster(self.workdir / "etcd").start()
            self.write_spec(with_canary=False)
        for (region, pool), port in self.model_ports.items():
            self.models[(region, pool)] = self.start_model(region, pool, port)
        for (region, pool), port in self.model_ports.items():
            wait_for(
                lambda p=port: http_get(f"http://127.0.0.1:{p}/healthz")[0] == 200,  # type: ignore[misc]
                20,
                f"model server {region}/{pool}",
            )
        if not self.opts.ha:
            self.write_spec(with_canary=False)
        if self.opts.mtls:
            self.make_certs()
        self.start_prometheus()
        if self.opts.ha:
            for region in self.opts.regions:
                self.start_replica(region)
            self.server = self.replicas[self.opts.regions[0]]
            self.wait_replicas()
        else:
            self.start_server()
        for region, i, admin, listen in self._envoy_ports:
            node_id = f"{region}-envoy-{i}"
            ca, cert, key = self._client_tls(region, node_id)
            self.envoys.append(
                Envoy(
                    BootstrapOptions(
                        region=region,
                        node_id=node_id,
                        xds_port=self.region_xds_port(region),
                        xds_fallbacks=self.xds_fallbacks(region),
                        admin_port=admin,
                        listen=f"127.0.0.1:{listen}",
                        xds_tls_ca=ca,
                        xds_tls_cert=cert,
                        xds_tls_key=key,
                    ),
                    self.workdir / "envoy",
                )
            )
        for e in self.envoys:
            e.wait_ready()
        return self

    def start_model(
        self, region: str, pool: str, port: int, grpc_port: int | None = None, name: str = ""
    ) -> Process:
        """A model server; with `ha` it registers itself in the shared registry (its lease
        of `registry_ttl`), as the spec lists no endpoints then."""
        grpc = ["--grpc-port", str(grpc_port)] if grpc_port else self._grpc_args(region, pool)
        register = (
            ["--register", self.etcd.url, "--register-ttl", f"{self.opts.registry_ttl:g}"]
            if self.etcd is not None
            else []
        )
        name = name or f"{region}-{pool}"
        return Process(
            f"model-{name}",
            [sys.executable, "-m", "xds_server.lab.upstream", "--port", str(port),
             "--region", region, "--pool", pool, "--version", VERSIONS[pool],
             "--model", SERVICE, "--service", SERVICE, *grpc, *register],
            self.workdir / "models" / f"{name}.log",
        )  # fmt: skip

    def add_instance(self, region: str, pool: str) -> tuple[int, int]:
        """One more registered instance of a pool in a region (with `ha`): the port
        Envoy sends to, and its REST port (`/stats`)."""
        port = self.spare_ports.pop((region, pool), None) or free_port()
        grpc_port = free_port() if self.opts.protocol == "grpc" else None
        n = 1 + sum(1 for k in self.extra_models if k[:2] == (region, pool))
        proc = self.start_model(region, pool, port, grpc_port, f"{region}-{pool}-{n + 1}")
        self.extra_models[(region, pool, grpc_port or port)] = proc
        wait_for(
            lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200,
            20,
            f"model server {region}/{pool} #{n + 1}",
        )
        return grpc_port or port, port

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

    def _grpc_args(self, region: str, pool: str) -> list[str]:
        port = self.grpc_ports.get((region, pool))
        return ["--grpc-port", str(port)] if port else []

    def processes(self) -> list[Process]:
        procs: list[Process | None] = [
            *self.proxyless,
            *self.envoys,
            *(self.replicas.values() if self.replicas else [self.server]),
            self.prometheus,
            *self.models.values(),
            *self.extra_models.values(),
            *(self.etcd.processes() if self.etcd else []),
        ]
        return [p for p in procs if p is not None]

    def stop(self) -> None:
        if self.load is not None:
            self.load.stop()
        for p in self.processes():
            p.stop()
        if self.etcd is not None:
            self.etcd.stop()  # (resumes a paused cluster first)
        if self._state_store is not None:
            self._state_store.close()
            self._state_store = None
        if self._etcd_store is not None:
            self._etcd_store.close()
            self._etcd_store = None

    def __enter__(self) -> LocalMesh:
        try:
            return self.start()
        except BaseException:
            self.stop()  # what did start must not outlive a start that failed
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_server(self) -> None:
        argv = [sys.executable, "-m", "xds_server.cli", "serve", "--spec", str(self.spec_path),
                "--xds-address", f"127.0.0.1:{self.xds_port}",
                "--state-dir", str(self.state_dir),
                "--prometheus-url", f"http://127.0.0.1:{self.prometheus_port}",
                "--metrics-address", f"127.0.0.1:{self.metrics_port}",
                "--admin-address", f"127.0.0.1:{self.admin_port}",
                "--ui-address", f"127.0.0.1:{self.ui_port}",
                "--log-format", "json", *self._token_args(), *self._mtls_args()]  # fmt: skip
        self.server = Process("xds-server", argv, self.workdir / "xds-server.log")

    # ---- replicas on etcd (`ha`) ----

    def region_xds_port(self, region: str) -> int:
        return self.replica_ports[region]["xds"] if self.opts.ha else self.xds_port

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
            ("127.0.0.1", ports["xds"])
            for r, ports in self.replica_ports.items()
            if r != region and region in self.served_by(r)
        )

    def start_replica(self, region: str) -> Process:
        assert self.etcd is not None
        ports = self.replica_ports[region]
        argv = [sys.executable, "-m", "xds_server.cli", "serve",
                "--store", self.etcd.url, "--regions", ",".join(self.served_by(region)),
                "--replica-id", region,
                "--leader-ttl", f"{self.opts.leader_ttl:g}",
                "--xds-address", f"127.0.0.1:{ports['xds']}",
                "--prometheus-url", f"http://127.0.0.1:{self.prometheus_port}",
                "--metrics-address", f"127.0.0.1:{ports['metrics']}",
                "--admin-address", f"127.0.0.1:{ports['admin']}",
                "--ui-address", f"127.0.0.1:{ports['ui']}",
                "--log-format", "json", *self._token_args(), *self._mtls_args()]  # fmt: skip
        self.replicas[region] = Process(
            f"xds-server-{region}", argv, self.workdir / f"xds-server-{region}.log"
        )
        return self.replicas[region]

    def wait_replicas(self, timeout: float = 30) -> None:
        """Until every replica has its key in the store (it does once its xDS port is
        open): an Envoy started earlier would settle on its neighbour's replica."""

        def listed() -> bool:
            store = self.etcd_store()
            store.read()
            return set(store.view.replicas) >= set(self.replicas)

        wait_for(listed, timeout, "every replica's key in the store", interval=0.1)

    def etcd_store(self) -> EtcdStore:
        """A reader of the replicas' store (its view re-read on each call's `read()`)."""
        assert self.etcd is not None
        if self._etcd_store is None:
            self._etcd_store = EtcdStore(parse_store_url(self.etcd.url))
        return self._etcd_store

    def leader(self) -> str | None:
        """The replica (region) that holds the leader key now, if any."""
        store = self.etcd_store()
        store.read()
        return store.view.leader.replica if store.view.leader else None

    def wait_leader(self, timeout: float = 30, other_than: str | None = None) -> str:
        def elected() -> str | None:
            lead = self.leader()
            return lead if lead and lead != other_than else None

        return wait_for(
            elected,
            timeout,
            "a leader replica" + (f" other than {other_than}" if other_than else ""),
            interval=0.05,
        )

    def replica_admin(self, region: str) -> int:
        return self.replica_ports[region]["admin"] if self.opts.ha else self.admin_port

    @property
    def certs(self) -> Path:
        return self.workdir / "certs"

    def make_certs(self) -> None:
        """A CA, the server's certificate and one per Envoy and proxyless client
        (hack/make-certs.sh)."""
        nodes = [f"{r}/{r}-envoy-{i}" for r, i, _, _ in self._envoy_ports]
        nodes += [f"{r}/{node}" for r, node in self._proxyless_nodes()]
        subprocess.run(
            ["bash", str(MAKE_CERTS), str(self.certs), *nodes],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def _client_tls(self, region: str, node_id: str) -> tuple[str | None, ...]:
        """(CA, certificate, key) files for a node's bootstrap; Nones without mTLS."""
        if not self.opts.mtls:
            return None, None, None
        node = self.certs / region / node_id
        return str(self.certs / "ca.pem"), f"{node}.pem", f"{node}.key"

    def _mtls_args(self) -> list[str]:
        if not self.opts.mtls:
            return []
        return ["--xds-tls-cert", str(self.certs / "server.pem"),
                "--xds-tls-key", str(self.certs / "server.key"),
                "--xds-tls-client-ca", str(self.certs / "ca.pem")]  # fmt: skip

    def _token_args(self) -> list[str]:
        if self.opts.admin_token is None:
            return []
        path = self.workdir / "admin-token"
        path.write_text(self.opts.admin_token)
        path.chmod(0o600)
        return ["--admin-token-file", str(path)]

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}/"

    @property
    def token_file(self) -> Path | None:
        """The admin token's file (for `xdsctl --token-file`), when there is a token."""
        return self.workdir / "admin-token" if self.opts.admin_token is not None else None

    def kill_server(self) -> None:
        assert self.server is not None
        self.server.kill()

    def start_prometheus(self) -> None:
        targets = [
            ScrapeTarget(
                f"127.0.0.1:{admin}",
                "/stats/prometheus",
                {"region": region, "node": f"{region}-envoy-{i}"},
            )
            for region, i, admin, _ in self._envoy_ports
        ]
        if self.opts.ha:
            targets += [
                ScrapeTarget(f"127.0.0.1:{p['metrics']}", "/metrics", {"replica": r})
                for r, p in self.replica_ports.items()
            ]
        else:
            targets.append(ScrapeTarget(f"127.0.0.1:{self.metrics_port}", "/metrics", {}))
        # The model servers' own series (outputs, tenants): `region` and `pool` come from
        # here, never from the exporter, so they cannot clash.
        targets += [
            ScrapeTarget(f"127.0.0.1:{port}", "/metrics", {"region": r, "pool": p}, job="model")
            for (r, p), port in [*self.model_ports.items(), *self.spare_ports.items()]
        ]
        self.prometheus = Prometheus(self.workdir / "prometheus", self.prometheus_port, targets)
        self.prometheus.wait_ready()

    def wait_latency_series(self, timeout: float = 30) -> None:
        """Until Prometheus can answer, for every region's production pool, what a
        rollout checks at its start: Envoy exports counters at once but histograms only
        at its stats flush, and `increase()` needs two samples of the model servers'
        output histogram; a rollout started in between would find a query empty for a
        pool that takes traffic (a configuration error: it pauses)."""
        assert self.prometheus is not None
        window = str(self.opts.rollout.get("window", "5s"))
        queries = [
            "count by (region) (increase(envoy_cluster_upstream_rq_time_bucket"
            f'{{envoy_cluster_name="{SERVICE}|production"}}[{window}]) > 0)',
            "count by (region) (increase(model_prediction_score_bucket"
            f'{{pool="production"}}[{window}]) > 0)',
        ]

        def every_region(query: str) -> bool:
            url = f"{self.prometheus.url}/api/v1/query?query={urllib.parse.quote(query)}"  # type: ignore[union-attr]
            status, body, _ = http_get(url)
            found = {r["metric"].get("region") for r in json.loads(body)["data"]["result"]}
            return status == 200 and found >= set(self.opts.regions)

        wait_for(
            lambda: all(every_region(q) for q in queries),
            timeout,
            "every region's latency and output histograms in Prometheus",
            0.2,
        )

    def stop_prometheus(self) -> None:
        assert self.prometheus is not None
        self.prometheus.stop()

    # ---- the scenario's knobs ----

    def write_spec(self, with_canary: bool) -> None:
        pools = ("production", "baseline", "canary") if with_canary else ("production",)
        doc: dict[str, Any] = {
            "regions": list(self.opts.regions),
            "listener": {"port": 10000},
            "rollout": self.opts.rollout,
            "services": [
                {
                    "name": SERVICE,
                    "domains": ["*"],
                    "prefix": "/",
                    "protocol": self.opts.protocol,
                    "pools": {pool: self._pool_doc(pool) for pool in pools},
                }
            ],
        }
        if self.opts.notify_url:
            doc["notifications"] = {
                "targets": [{"name": "lab", "type": "webhook", "url": self.opts.notify_url}]
            }
        tmp = self.spec_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        tmp.replace(self.spec_path)  # atomic: the server never reads half a file
        if self.etcd is not None:  # replicas read the spec from the store: push it there
            subprocess.run(
                [sys.executable, "-m", "xds_server.cli", "spec", "push",
                 "--spec", str(self.spec_path), "--store", self.etcd.url],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip

    def _pool_doc(self, pool: str) -> dict[str, Any]:
        """A pool of the spec: with `ha` its version only (the registry's instances)."""
        if self.opts.ha:
            return {"version": VERSIONS[pool]}
        endpoints = {r: [f"127.0.0.1:{self.pool_port(r, pool)}"] for r in self.opts.regions}
        return {"version": VERSIONS[pool], "endpoints": endpoints}

    def pool_port(self, region: str, pool: str) -> int:
        """The port Envoy (and proxyless clients) send a pool's requests to."""
        return self.grpc_ports.get((region, pool)) or self.model_ports[(region, pool)]

    def begin_rollout(self) -> None:
        """Add the baseline and canary pools: the server sees a new canary and starts."""
        self.write_spec(with_canary=True)

    def start_load(self, max_seconds: float = 600) -> LoadGenerator:
        rate = self.opts.load_rate / self.opts.envoys_per_region
        targets = {e.opts.node_id: e.opts.listen or "" for e in self.envoys}
        self.load = LoadGenerator(
            targets,
            rate=rate,
            max_seconds=max_seconds,
            protocol=self.opts.protocol,
            model=SERVICE,
        ).start()
        return self.load

    def start_proxyless(self, max_seconds: float = 600) -> None:
        """`proxyless_per_region` gRPC client processes per region, each dialing
        `xds:///recommender` with a gRPC xDS bootstrap of its region."""
        for region, node_id in self._proxyless_nodes():
            ca, cert, key = self._client_tls(region, node_id)
            client = ProxylessClient(
                GrpcBootstrapOptions(
                    region,
                    node_id,
                    (("127.0.0.1", self.xds_port),),
                    xds_tls_ca=ca,
                    xds_tls_cert=cert,
                    xds_tls_key=key,
                ),
                self.workdir / "proxyless",
                service=SERVICE,
                rate=self.opts.proxyless_rate / self.opts.proxyless_per_region,
                max_seconds=max_seconds,
            )
            self.proxyless.append(client)

    def _proxyless_nodes(self) -> list[tuple[str, str]]:
        """(region, node id) of every proxyless client."""
        n = self.opts.proxyless_per_region
        return [(r, f"{r}-grpc-{i}") for r in self.opts.regions for i in range(1, n + 1)]

    def proxyless_counts(self, region: str | None = None) -> dict[str, Any]:
        """What the proxyless clients (of `region`, or all) have sent so far, added up
        (from their own files, rewritten every second)."""
        return add_counts(c.counts() for c in self.proxyless if region in (None, c.region))

    def proxyless_since(self, since: float, calls: int, timeout: float = 15) -> dict[str, Any]:
        """The proxyless clients' calls counted after `since` (from the first file each
        wrote after it), once there are at least `calls` of them: what they do now."""

        def written_after() -> list[dict[str, Any]] | None:
            seen = [c.counts_at() for c in self.proxyless]
            return [counts for _, counts in seen] if all(t > since for t, _ in seen) else None

        start = add_counts(wait_for(written_after, timeout, "the proxyless clients' counts"))

        def grown() -> dict[str, Any] | None:
            delta = sub_counts(self.proxyless_counts(), start)
            return delta if delta.get("sent", 0) >= calls else None

        return wait_for(grown, timeout, f"{calls} more proxyless calls")

    def set_fault(
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
    ) -> None:
        """Change a model server's fault knobs while it runs (its POST /fault); None
        leaves a knob as it is. `lab/upstream.py` says what each one does."""
        knobs = {
            "error_rate": error_rate,
            "latency_ms": latency_ms,
            "healthy": healthy,
            "shadow_error_rate": shadow_error_rate,
            "drift": drift,
            "tenant_latency_ms": dict(tenant_latency_ms) if tenant_latency_ms is not None else None,
            "stall_fraction": stall_fraction,
        }
        body = {k: v for k, v in knobs.items() if v is not None}
        http_post_json(f"http://127.0.0.1:{self.model_ports[(region, pool)]}/fault", body)

    def model_stats(self, region: str, pool: str) -> dict[str, int]:
        """How many user and shadow requests a model server has answered (and stalled)."""
        return self.model_stats_at(self.model_ports[(region, pool)])

    def model_stats_at(self, rest_port: int) -> dict[str, int]:
        status, body, _ = http_get(f"http://127.0.0.1:{rest_port}/stats")
        assert status == 200, body
        return dict(json.loads(body))

    # ---- reading what happened ----

    def _store(self) -> Store | None:
        """One read connection to the server's state, once the server has created it."""
        if self._state_store is None and (self.state_dir / FILE_NAME).exists():
            self._state_store = Store.in_dir(self.state_dir)
        return self._state_store

    def rollout_state(self) -> dict[str, Any] | None:
        states = self._states()
        if not states:
            return None
        s = states[-1]
        return {
            "phase": s.phase,
            "reason": s.reason,
            "canary_version": s.canary_version,
            "regions": {r: {"phase": rs.phase, "step": rs.step} for r, rs in s.regions.items()},
        }

    def wait_phase(self, phases: set[str], timeout: float) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            state = self.rollout_state()
            return state if state is not None and state["phase"] in phases else None

        return wait_for(reached, timeout, f"rollout phase in {sorted(phases)}", interval=0.1)

    def audit(self, after_id: int | None = None) -> list[AuditEntry]:
        if self.etcd is not None:
            store = self.etcd_store()
            store.read()
            return store.audit(after_id=after_id)
        sqlite = self._store()
        return sqlite.audit(after_id=after_id) if sqlite else []

    def _states(self) -> list[RolloutState]:
        if self.etcd is not None:
            store = self.etcd_store()
            store.read()
            return store.load_rollouts()
        sqlite = self._store()
        return sqlite.load_rollouts() if sqlite else []


def envoy_weights(envoy: Envoy) -> dict[str, int]:
    """The weighted clusters this Envoy reports it routes by, from its own /config_dump."""
    for cfg in envoy.config_dump().get("configs", []):
        if cfg.get("@type", "").endswith("RoutesConfigDump"):
            for dyn in cfg.get("dynamic_route_configs", []):
                for vh in dyn["route_config"].get("virtual_hosts", []):
                    if vh["name"] != SERVICE:
                        continue
                    for route in vh["routes"]:  # (canary_match routes come first)
                        if "weighted_clusters" in route.get("route", {}):
                            clusters = route["route"]["weighted_clusters"]["clusters"]
                            return {
                                c["name"].split("|")[1]: int(c.get("weight", 0)) for c in clusters
                            }
    return {}


def canary_share(envoy: Envoy) -> float:
    w = envoy_weights(envoy)
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
