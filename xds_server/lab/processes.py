"""Every process of one lab: model servers, etcd, Prometheus, the server or its replicas,
Envoys, proxyless clients and the load; started on `MeshLayout`'s ports, stopped by pid.

`lab/procs.py` has what one process is (`Process`, `Envoy`, ...); this room knows which
ones a lab runs and with what arguments. `LocalMesh.start` decides the order.

With namespaces (`MeshOptions.netns`) each process runs in its namespace (`wrap`:
`MeshLayout.exec_prefix`) and binds that namespace's address (`MeshLayout.host`): a
region's model servers, Envoys, replica, etcd member and load in the region's; the
server without `ha`, Prometheus and the `ops` etcd members in `ops`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from xds_server.lab import mlserver
from xds_server.lab.credentials import Credentials
from xds_server.lab.etcd import EtcdCluster, Place
from xds_server.lab.layout import FEATURES, LOOPBACK, SERVICE, VERSIONS, MeshLayout
from xds_server.lab.load import LoadGenerator, LoadResults, ResultFiles
from xds_server.lab.netns import OPS
from xds_server.lab.oip.model import N_FEATURES
from xds_server.lab.polling import wait_for
from xds_server.lab.procs import Envoy, Process, ProxylessClient, free_port, http_get
from xds_server.lab.prometheus import Prometheus, ScrapeTarget
from xds_server.render.bootstrap import BootstrapOptions, GrpcBootstrapOptions


class MeshProcesses:
    def __init__(self, layout: MeshLayout, credentials: Credentials) -> None:
        self.layout = layout
        self.opts = layout.opts
        self.credentials = credentials
        self.models: dict[tuple[str, str], Process] = {}
        self.feature_models: dict[tuple[str, str], Process] = {}
        """With `features`: (region, pool) -> the features service's model server."""
        self.extra_models: dict[tuple[str, str, int], Process] = {}
        """Instances added while running (`add_instance`): (region, pool, port)."""
        self.registrations: dict[tuple[str, str], Process] = {}
        """With MLServer and `ha`: an `xds-server register` process per model server
        (MLServer cannot register itself)."""
        self.proxyless: list[ProxylessClient] = []
        self.envoys: list[Envoy] = []
        self.server: Process | None = None
        """The server (with `ha`: the first region's replica, as a default)."""
        self.replicas: dict[str, Process] = {}
        """With `ha`: region -> its replica (`--replica-id` is the region's name)."""
        self.etcd: EtcdCluster | None = None
        self.prometheus: Prometheus | None = None
        self.load: LoadResults | None = None
        self.load_processes: list[Process] = []
        """With namespaces: a load process per region, in its namespace."""

    def all(self) -> list[Process]:
        """Every process running now (what `lab.json` lists for `lab down`)."""
        procs: list[Process | None] = [
            *self.proxyless,
            *self.envoys,
            *(self.replicas.values() if self.replicas else [self.server]),
            self.prometheus,
            *self.registrations.values(),
            *self.models.values(),
            *self.feature_models.values(),
            *self.extra_models.values(),
            *(self.etcd.processes() if self.etcd else []),
            *self.load_processes,
        ]
        return [p for p in procs if p is not None]

    def stop(self) -> None:
        if self.load is not None:
            self.load.stop()
        for p in self.all():
            p.stop()
        if self.etcd is not None:
            self.etcd.stop()  # (resumes a paused cluster first)

    # ---- model servers ----

    def start_models(self) -> None:
        """Every (region, pool)'s model server, then until each answers its /healthz."""
        if self.opts.models == "mlserver":
            self.start_mlservers()
            return
        lay = self.layout
        for (region, pool), port in lay.model_ports.items():
            self.models[(region, pool)] = self.start_model(region, pool, port)
        for (region, pool), port in lay.feature_ports.items():
            self.feature_models[(region, pool)] = self.start_model(
                region, pool, port, service=FEATURES
            )
        for (region, pool), port in [*lay.model_ports.items(), *lay.feature_ports.items()]:
            host = lay.host(region)
            wait_for(answers(host, port), f"model server {region}/{pool} on {port}", timeout=20)

    def start_model(
        self,
        region: str,
        pool: str,
        port: int,
        grpc_port: int | None = None,
        name: str = "",
        service: str = SERVICE,
    ) -> Process:
        """A model server; with `ha` it registers itself in the shared registry (its lease
        of `registry_ttl`), as the spec lists no endpoints then. With `features`, the
        recommender's call the features service through their region's Envoys."""
        if grpc_port is None:
            grpc_port = self.layout.grpc_ports.get((region, pool))
        grpc = ["--grpc-port", str(grpc_port)] if grpc_port else []
        register = (
            ["--register", self.etcd.url, "--register-ttl", f"{self.opts.registry_ttl:g}",
             *self.etcd.client_flags()]
            if self.etcd is not None
            else []
        )  # fmt: skip
        downstream: list[str] = []
        if self.opts.features and service == SERVICE:
            for listener in self.layout.region_listeners(region):
                downstream += ["--downstream", listener]
            downstream += ["--downstream-host", FEATURES, "--downstream-model", FEATURES]
        name = name or (f"{region}-{pool}" if service == SERVICE else f"{service}-{region}-{pool}")
        return Process(
            f"model-{name}",
            [sys.executable, "-m", "xds_server.lab.upstream", "--port", str(port),
             "--host", self.layout.host(region),
             "--region", region, "--pool", pool, "--version", VERSIONS[pool],
             "--model", service, "--service", service, *grpc, *register, *downstream],
            self.layout.workdir / "models" / f"{name}.log",
            wrap=self.layout.exec_prefix(region),
        )  # fmt: skip

    def start_mlservers(self) -> None:
        """An MLServer per (region, pool), its models trained first (`lab/mlserver.py`),
        then until each says it is ready; with `ha`, each registered by an
        `xds-server register` gated on its readiness."""
        venv = mlserver.find_venv()
        root = self.layout.workdir / "mlserver"
        mlserver.train(venv, root / "trained")
        canary = mlserver.CANARY_MODELS[self.opts.canary_model]
        lay = self.layout
        for (region, pool), port in lay.model_ports.items():
            model = canary if pool == "canary" else mlserver.CanaryModel(mlserver.POOL_MODELS[pool])
            slot = mlserver.MLServerSlot(
                f"{region}-{pool}",
                port,
                lay.grpc_ports[(region, pool)],
                lay.mlserver_metrics_ports[(region, pool)],
                root / "trained" / f"{model.model}.joblib",
                VERSIONS[pool],
                model.served_name,
            )
            self.models[(region, pool)] = mlserver.start_mlserver(venv, root / slot.name, slot)
        for (region, pool), port in lay.model_ports.items():
            wait_for(mlserver.ready(port), f"MLServer {region}/{pool} ready", timeout=90)
            if self.etcd is not None:
                self.registrations[(region, pool)] = self._register(region, pool, port)

    def _register(self, region: str, pool: str, rest_port: int) -> Process:
        """`xds-server register` for one model server that cannot register itself."""
        assert self.etcd is not None
        only = pool if pool in ("baseline", "production") else ""
        return Process(
            f"register-{region}-{pool}",
            [sys.executable, "-m", "xds_server.cli", "register", "--store", self.etcd.url,
             *self.etcd.client_flags(),
             "--service", SERVICE, "--version", VERSIONS[pool], "--region", region,
             "--address", f"127.0.0.1:{self.layout.pool_port(region, pool)}",
             "--ttl", f"{self.opts.registry_ttl:g}s", "--pool", only,
             "--health-url", mlserver.health_url(rest_port)],
            self.layout.workdir / "models" / f"register-{region}-{pool}.log",
        )  # fmt: skip

    def add_instance(self, region: str, pool: str) -> tuple[int, int]:
        """One more registered instance of a pool in a region (with `ha`): the port
        Envoy sends to, and its REST port (`/stats`)."""
        port = self.layout.spare_ports.pop((region, pool), None) or free_port()
        grpc_port = free_port() if self.opts.protocol == "grpc" else None
        n = 1 + sum(1 for k in self.extra_models if k[:2] == (region, pool))
        for taken in (port, grpc_port):
            if taken:
                self.layout.extra_hosts[taken] = self.layout.host(region)
        proc = self.start_model(region, pool, port, grpc_port, f"{region}-{pool}-{n + 1}")
        self.extra_models[(region, pool, grpc_port or port)] = proc
        wait_for(
            answers(self.layout.host(region), port),
            f"model server {region}/{pool} #{n + 1}",
            timeout=20,
        )
        return grpc_port or port, port

    # ---- the control plane: etcd, the server or its replicas ----

    def start_etcd(self) -> EtcdCluster:
        """etcd's members: with namespaces, one in each region's (then `ops`). With
        `mtls`, over TLS with client certificates and etcd's users (issue 30): every
        replica, registration and push then gives the store flags."""
        lay = self.layout
        keys = lay.etcd_keys()
        places = [Place(lay.host(k), tuple(lay.exec_prefix(k))) for k in keys]
        secure, quota = self.opts.mtls, self.opts.etcd_quota_bytes
        cluster = EtcdCluster(lay.workdir / "etcd", len(keys), places, quota, secure=secure)
        self.etcd = cluster.start()
        return self.etcd

    def start_server(self) -> None:
        lay = self.layout
        host = lay.host(lay.server_key)
        argv = [sys.executable, "-m", "xds_server.cli", "serve", "--spec", str(lay.spec_path),
                "--xds-address", f"{host}:{lay.xds_port}",
                "--state-dir", str(lay.state_dir),
                "--prometheus-url", lay.prometheus_url,
                "--metrics-address", f"{host}:{lay.metrics_port}",
                "--admin-address", f"{host}:{lay.admin_port}",
                "--ui-address", f"{host}:{lay.ui_port}",
                "--log-format", "json", *self.credentials.server_args(),
                *off_loopback(host)]  # fmt: skip
        argv += self._audit_retention()
        wrap = lay.exec_prefix(lay.server_key)
        self.server = Process("xds-server", argv, lay.workdir / "xds-server.log", wrap=wrap)

    def _audit_retention(self) -> list[str]:
        """`--audit-retention` when the lab sets one (`MeshOptions.audit_retention`)."""
        retention = self.opts.audit_retention
        return [] if retention is None else ["--audit-retention", f"{retention:g}s"]

    def start_replica(self, region: str) -> Process:
        assert self.etcd is not None
        lay = self.layout
        ports = lay.replica_ports[region]
        host = lay.host(lay.replica_key(region))
        argv = [sys.executable, "-m", "xds_server.cli", "serve",
                "--store", self.etcd.url, *self.etcd.client_flags(),
                "--regions", ",".join(lay.served_by(region)),
                "--replica-id", region,
                "--leader-ttl", f"{self.opts.leader_ttl:g}",
                "--xds-address", f"{host}:{ports['xds']}",
                "--prometheus-url", lay.prometheus_url,
                "--metrics-address", f"{host}:{ports['metrics']}",
                "--admin-address", f"{host}:{ports['admin']}",
                "--ui-address", f"{host}:{ports['ui']}",
                "--log-format", "json", *self.credentials.server_args(),
                *off_loopback(host)]  # fmt: skip
        if self.opts.etcd_quota_bytes is not None:
            argv += ["--store-quota-bytes", str(self.opts.etcd_quota_bytes)]
        if self.opts.store_retention is not None:
            argv += ["--store-compaction-retention", f"{self.opts.store_retention:g}s"]
        argv += self._audit_retention()
        self.replicas[region] = Process(
            f"xds-server-{region}",
            argv,
            lay.workdir / f"xds-server-{region}.log",
            wrap=lay.exec_prefix(lay.replica_key(region)),
        )
        return self.replicas[region]

    def start_replicas(self) -> None:
        """One replica per region; the first region's is `server`, as a default."""
        for region in self.opts.regions:
            self.start_replica(region)
        self.server = self.replicas[self.opts.regions[0]]

    # ---- Prometheus ----

    def start_prometheus(self) -> None:
        """Prometheus scraping every Envoy, the server (or each replica) and every model
        server, spare ports included; until it is ready."""
        lay = self.layout
        self.prometheus = Prometheus(
            lay.workdir / "prometheus",
            lay.prometheus_port,
            scrape_targets(lay),
            host=lay.prometheus_host,
            wrap=lay.exec_prefix(OPS),
        )
        self.prometheus.wait_ready()
        if self.opts.models == "mlserver":
            servers = len(self.layout.mlserver_metrics_ports)
            scraped = mlserver.scraped_twice(self.prometheus.url, servers)
            wait_for(scraped, "Prometheus to scrape every MLServer twice", timeout=30)

    # ---- the data plane and its callers ----

    def start_envoys(self) -> None:
        """Every Envoy of the plan, then until each is ready."""
        lay = self.layout
        for slot in lay.envoys:
            ca, cert, key = self.credentials.client_tls(slot.region, slot.node_id)
            host = lay.host(slot.region)
            bootstrap = BootstrapOptions(
                region=slot.region,
                node_id=slot.node_id,
                xds_host=lay.region_xds_host(slot.region),
                xds_port=lay.region_xds_port(slot.region),
                xds_fallbacks=lay.xds_fallbacks(slot.region),
                admin_port=slot.admin_port,
                admin_host=host,
                listen=f"{host}:{slot.listen_port}",
                xds_tls_ca=ca,
                xds_tls_cert=cert,
                xds_tls_key=key,
            )
            wrap = lay.exec_prefix(slot.region)
            self.envoys.append(Envoy(bootstrap, lay.workdir / "envoy", wrap=wrap))
        for e in self.envoys:
            e.wait_ready()

    def start_load(self, max_seconds: float = 600) -> LoadResults:
        """`load_rate` through each region's Envoys: from this process, or with
        namespaces from a process in each region's (`start_region_loads`)."""
        if self.layout.net is not None:
            self.load = self.start_region_loads(max_seconds)
            return self.load
        targets = {e.opts.node_id: e.opts.listen or "" for e in self.envoys}
        self.load = LoadGenerator(
            targets,
            rate=self.opts.load_rate / self.opts.envoys_per_region,
            max_seconds=max_seconds,
            protocol=self.opts.protocol,
            model=SERVICE,
            n_features=self._n_features(),
        ).start()
        return self.load

    def _n_features(self) -> int:
        return mlserver.N_FEATURES if self.opts.models == "mlserver" else N_FEATURES

    def start_region_loads(self, max_seconds: float) -> ResultFiles:
        """A load process per region, inside its namespace, sending to its own Envoys'
        listeners: a region cut off from the others keeps its callers (the lab's own
        process, in the root namespace, would not). Results come back by file."""
        lay = self.layout
        paths = []
        for region in self.opts.regions:
            path = lay.workdir / "load" / f"{region}.jsonl"
            path.unlink(missing_ok=True)  # a folder used again: none of the last lab's
            targets = [
                f"--target={e.opts.node_id}={e.opts.listen}"
                for e in self.envoys
                if e.opts.region == region
            ]
            argv = [sys.executable, "-m", "xds_server.lab.load", *targets,
                    "--rate", f"{self.opts.load_rate / self.opts.envoys_per_region:g}",
                    "--duration", f"{max_seconds:g}", "--protocol", self.opts.protocol,
                    "--model", SERVICE, "--n-features", str(self._n_features()),
                    "--out", str(path)]  # fmt: skip
            log = lay.workdir / "load" / f"{region}.log"
            self.load_processes.append(
                Process(f"load-{region}", argv, log, wrap=lay.exec_prefix(region))
            )
            paths.append(path)
        return ResultFiles(paths, list(self.load_processes))

    def start_proxyless(self, max_seconds: float = 600) -> None:
        """`proxyless_per_region` gRPC client processes per region, each dialing
        `xds:///recommender` with a gRPC xDS bootstrap of its region."""
        for region, node_id in self.layout.proxyless_nodes():
            ca, cert, key = self.credentials.client_tls(region, node_id)
            client = ProxylessClient(
                GrpcBootstrapOptions(
                    region,
                    node_id,
                    ((self.layout.server_host(), self.layout.xds_port),),
                    xds_tls_ca=ca,
                    xds_tls_cert=cert,
                    xds_tls_key=key,
                ),
                self.layout.workdir / "proxyless",
                service=SERVICE,
                rate=self.opts.proxyless_rate / self.opts.proxyless_per_region,
                max_seconds=max_seconds,
                wrap=self.layout.exec_prefix(region),
            )
            self.proxyless.append(client)


def off_loopback(host: str) -> list[str]:
    """`serve`'s flag for binding a lab namespace's address without TLS and tokens
    (`--insecure`: issue 30's secure default refuses such a bind). The lab's network is
    a bridge of its own that only this machine's root namespace reaches; its driver and
    Prometheus read the server plainly, and the admin token still guards actions."""
    return [] if host == LOOPBACK else ["--insecure"]


def answers(host: str, port: int) -> Callable[[], bool]:
    """Does the model server on this address answer its /healthz?"""
    return lambda: http_get(f"http://{host}:{port}/healthz")[0] == 200


def scrape_targets(lay: MeshLayout) -> list[ScrapeTarget]:
    """What the lab's Prometheus scrapes: every Envoy (`region`, `node`), the server or
    each replica, and every model server (`region`, `pool`; the features service's with
    `service`)."""
    opts = lay.opts
    targets = [
        ScrapeTarget(
            f"{lay.host(e.region)}:{e.admin_port}",
            "/stats/prometheus",
            {"region": e.region, "node": e.node_id},
        )
        for e in lay.envoys
    ]
    if opts.ha:
        targets += [
            ScrapeTarget(
                f"{lay.host(lay.replica_key(r))}:{p['metrics']}", "/metrics", {"replica": r}
            )
            for r, p in lay.replica_ports.items()
        ]
    else:
        server = f"{lay.host(lay.server_key)}:{lay.metrics_port}"
        targets.append(ScrapeTarget(server, "/metrics", {}))
    # The model servers' own series (outputs, tenants): `region` and `pool` come from
    # here, never from the exporter, so they cannot clash. MLServer serves them on
    # its metrics port (the lab runtime's score histogram).
    if opts.models == "mlserver":
        ports = list(lay.mlserver_metrics_ports.items())
    else:
        ports = [*lay.model_ports.items(), *lay.spare_ports.items()]
    targets += [
        ScrapeTarget(f"{lay.host(r)}:{port}", "/metrics", {"region": r, "pool": p}, job="model")
        for (r, p), port in ports
    ]
    # The features service's servers, told apart by `service` (the built-in
    # model-side queries do not ask for it: a plan for both services leaves them out).
    targets += [
        ScrapeTarget(
            f"{lay.host(r)}:{port}",
            "/metrics",
            {"region": r, "pool": p, "service": FEATURES},
            job="model",
        )
        for (r, p), port in lay.feature_ports.items()
    ]
    return targets
