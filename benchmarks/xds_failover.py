"""How fast Envoys leave a frozen or cut-off replica (issue 27): time until they are
SYNCED on another replica.

One local mesh with `ha` (a three-member etcd cluster, two `serve --store` replicas
that each serve both regions, `--envoys-per-region` real Envoys per region whose
bootstraps list both replicas, their own region's first, Prometheus, load through every
Envoy). The second replica is restarted with its store behind relays (one per etcd
member, `lab/relay.py`), so it alone can be cut off from etcd. Each run:

1. SIGSTOP the replica that holds every Envoy's stream (the first): for each Envoy, the
   time until the other replica holds its stream and says it is SYNCED on the routes
   version the store implies, which the Envoy itself reports it applied. Then SIGCONT,
   and wait until the woken replica answers SERVING again.
2. Cut the second replica (now holding every Envoy) from etcd: the same time, to the
   first replica. Then heal, and time until the cut one answers SERVING again.

No request may fail; failures are counted and printed.

    python benchmarks/xds_failover.py [--runs 5] [--leader-ttl 3] [--envoys-per-region 2]
                                      [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from xds_server.ha.etcd import parse_store_url
from xds_server.ha.store import EtcdStore
from xds_server.lab.layout import MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.polling import wait_for
from xds_server.lab.procs import Envoy, Process, http_get
from xds_server.lab.relay import Relay
from xds_server.xds.service import HEALTH_SERVICE, SERVING

REGIONS = ("us-east", "eu-west")
POLL = 0.05


def health(port: int) -> bytes | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return bytes(channel.unary_unary(f"/{HEALTH_SERVICE}/Check")(b"", timeout=1))
        except grpc.RpcError:
            return None


class Mesh:
    """The mesh, read the way the measurements need it."""

    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh
        assert mesh.processes.etcd is not None
        self.store = EtcdStore(parse_store_url(mesh.processes.etcd.url))

    def routes_version(self, region: str) -> str:
        self.store.read()
        return str(self.store.routes_version(region))

    def synced_on(self, envoy: Envoy, replica: str) -> bool:
        ui = self.mesh.layout.replica_ports[replica]["ui"]
        try:
            status, body, _ = http_get(f"http://127.0.0.1:{ui}/api/nodes", timeout=1)
        except OSError:
            return False
        if status != 200:
            return False
        nodes = [n for n in json.loads(body)["nodes"] if n["id"] == envoy.opts.node_id]
        if not nodes or nodes[0]["sync_state"] != "SYNCED":
            return False
        (route,) = [t for t in nodes[0]["types"] if t["type"] == "route"]
        expected = self.routes_version(envoy.opts.region)
        applied = envoy.applied_versions().get("route")
        return route["current_version"] == route["acked_version"] == applied == expected

    def serving(self, replica: str) -> bool:
        return health(self.mesh.layout.replica_ports[replica]["xds"]) == SERVING

    def back(self, replica: str, since: float) -> bool:
        """Has `replica` rewritten its key after `since` (wall clock), and does it answer
        SERVING? (Just woken, it may not have noticed yet that it lost the store.)"""
        self.store.read()
        doc = self.store.view.replicas.get(replica)
        return bool(doc and doc.get("updated", 0) > since and self.serving(replica))

    def wait_moved(self, to: str, since: float, timeout: float = 30) -> list[float]:
        """Seconds from `since` until each Envoy was SYNCED on `to`."""
        left = {e.opts.node_id: e for e in self.mesh.processes.envoys}
        out: dict[str, float] = {}

        def done() -> bool:
            for node, envoy in list(left.items()):
                if self.synced_on(envoy, to):
                    out[node] = time.monotonic() - since
                    del left[node]
            return not left

        wait_for(done, f"every Envoy SYNCED on {to}", timeout=timeout, interval=POLL)
        return sorted(out.values())


def behind_relays(
    mesh: LocalMesh, replica: str, moved: Callable[[], bool] = lambda: True
) -> list[Relay]:
    """Restart `replica` with its store reached through a relay per etcd member, once
    `moved` says its Envoys left it (else an Envoy whose health check had not yet seen
    it stop reconnects to it, and the runs start with streams on both replicas)."""
    assert mesh.processes.etcd is not None
    relays = [Relay(("127.0.0.1", m.client_port)) for m in mesh.processes.etcd.members]
    old = mesh.processes.replicas[replica]
    argv = list(old.argv)
    argv[argv.index("--store") + 1] = "etcd://" + ",".join(r.address for r in relays)
    old.stop()
    wait_for(moved, f"every Envoy off {replica}", timeout=30)
    log = old.log_path.with_name(old.log_path.stem + "-relayed.log")
    mesh.processes.replicas[replica] = Process(old.name, argv, log)
    return relays


def run_once(m: Mesh, first: str, second: str, relays: list[Relay]) -> dict[str, Any]:
    processes = m.mesh.processes
    led = m.mesh.state.leader()
    stopped = time.monotonic()
    processes.replicas[first].signal(signal.SIGSTOP)
    try:
        frozen = m.wait_moved(second, stopped)
    finally:
        woken = time.time()
        processes.replicas[first].signal(signal.SIGCONT)
    wait_for(lambda: m.back(first, woken), f"{first} back", timeout=30, interval=POLL)
    cut_led = m.mesh.state.leader()
    cut = time.monotonic()
    for r in relays:
        r.cut()
    try:
        moved = m.wait_moved(first, cut)
        wait_for(lambda: not m.serving(second), "NOT_SERVING", timeout=10, interval=POLL)
    finally:
        healed, healed_wall = time.monotonic(), time.time()
        for r in relays:
            r.heal()
    wait_for(lambda: m.back(second, healed_wall), f"{second} back", timeout=30, interval=POLL)
    return {
        "sigstop_to_synced": frozen,
        "cut_to_synced": moved,
        "heal_to_serving": time.monotonic() - healed,  # (key rewritten, and SERVING)
        "frozen_led": led == first,
        "cut_led": cut_led == second,
    }


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name}: n={len(values)} min {min(values):.2f}s median "
        f"{statistics.median(values):.2f}s max {max(values):.2f}s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--leader-ttl", type=float, default=3.0)
    parser.add_argument("--envoys-per-region", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="xds-failover-"))
    opts = MeshOptions(
        regions=REGIONS,
        envoys_per_region=args.envoys_per_region,
        ha=True,
        leader_ttl=args.leader_ttl,
        load_rate=40,
    )
    out = sys.stderr if args.json else sys.stdout
    runs: list[dict[str, Any]] = []
    with LocalMesh(workdir / "mesh", opts) as mesh:
        first, second = REGIONS
        m = Mesh(mesh)
        envoys = mesh.processes.envoys
        relays = behind_relays(mesh, second, lambda: all(m.synced_on(e, first) for e in envoys))
        try:
            wait_for(lambda: m.serving(second), f"{second} SERVING", timeout=30)
            load = mesh.processes.start_load(3600)
            for envoy in envoys:  # (all on the first: the second restarted after they left)
                wait_for(lambda e=envoy: m.synced_on(e, first), "placement", timeout=30)
            for i in range(args.runs):
                result = run_once(m, first, second, relays)
                runs.append(result)
                print(f"run {i + 1}: SIGSTOP{' (the leader)' * result['frozen_led']} -> "
                      f"SYNCED elsewhere "
                      f"{', '.join(f'{t:.2f}' for t in result['sigstop_to_synced'])}s; "
                      f"cut from etcd{' (the leader)' * result['cut_led']} -> SYNCED elsewhere "
                      f"{', '.join(f'{t:.2f}' for t in result['cut_to_synced'])}s; "
                      f"healed -> SERVING {result['heal_to_serving']:.2f}s",
                      file=out, flush=True)  # fmt: skip
            failures = len(load.failures())
            statuses = dict(load.statuses())
        finally:
            for r in relays:
                r.close()
            m.store.close()
    figures = _figures(runs, lambda r: r["sigstop_to_synced"], lambda r: r["cut_to_synced"])
    figures.update(requests=statuses, failed_requests=failures, runs=runs)
    for line in figures["lines"]:
        print(line, file=out)
    print(f"requests: {statuses}, failed {failures}", file=out)
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


def _figures(
    runs: list[dict[str, Any]],
    frozen: Callable[[dict[str, Any]], list[float]],
    cut: Callable[[dict[str, Any]], list[float]],
) -> dict[str, Any]:
    a = [t for r in runs for t in frozen(r)]
    b = [t for r in runs for t in cut(r)]
    heal = [r["heal_to_serving"] for r in runs]
    return {
        "lines": [
            summary("SIGSTOP -> every Envoy SYNCED on the other replica", a),
            summary("cut from etcd -> every Envoy SYNCED on the other replica", b),
            summary("healed -> SERVING", heal),
        ],
        "sigstop_to_synced": a,
        "cut_to_synced": b,
    }


if __name__ == "__main__":
    sys.exit(main())
