"""The servers benchmarks/push_fanout.py measures, each behind the same few calls:
`start` (the xDS ports), `connected`, `push(i)` (a key), `acked(key)` (stream -> when
the server had its ACK; None: the clients' own stamps time it), `cpu_seconds`, `rss_mb`,
`close`.

- `InProcess`: `XdsPublisher` on its own loop thread in the benchmark's process (as
  `serve` runs it, with its metrics); a push is `set_split`, urgent.
- `ServeProcesses`: `xds-server serve` processes: one (`--serve-workers N`: N workers
  under a supervisor, sharing the xDS port) on SQLite, or R replicas on a real
  three-member etcd (`--replicas R`). A push is an operator's decision, `SetWeights`
  on the admin API of the process that decides; its CPU is the sum over every process
  of the servers' trees (and apart, etcd's), read from /proc.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from fanout_bare import push_split
from fanout_fleet import cpu_seconds
from prometheus_client import CollectorRegistry

from xds_server.admin.v1 import admin_pb2, admin_pb2_grpc
from xds_server.admin.wire import ACTOR_KEY
from xds_server.lab.background import BackgroundServer
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.polling import wait_for
from xds_server.lab.procs import Process, free_port
from xds_server.spec import MeshSpec
from xds_server.xds.metrics import XdsMetrics
from xds_server.xds.status import NodeStatus
from xds_server.xds.types import ROUTE

ACTOR = "push-fanout-benchmark"


def proc_rss_mb(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree(roots: list[int]) -> list[int]:
    """`roots` and every process descending from them (from /proc's parent links)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(roots), list(roots)
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in found]
        found.update(children)
        frontier += children
    return sorted(found)


class InProcess:
    """The server in this process; its ACK times are taken as the server records them."""

    where = "in process"

    def __init__(self, spec: MeshSpec) -> None:
        t0 = time.perf_counter()
        self.server = BackgroundServer(spec)
        self.build_s = time.perf_counter() - t0
        # As `xds-server serve` runs it: with its own metrics listening to every node event.
        self.server.call(lambda: XdsMetrics(CollectorRegistry()).attach(self.server.server))
        self.region = spec.regions[0]
        self._acks: dict[str, dict[int, float]] = {}

        def on_node(status: NodeStatus) -> None:  # (no lock: one dict operation each)
            v = status.types[ROUTE].acked_version
            if v:
                self._acks.setdefault(v, {}).setdefault(status.stream_id, time.time())

        self.server.call(lambda: self.server.server.nodes.subscribe(on_node))

    def start(self) -> list[int]:
        return [self.server.start()]

    def connected(self) -> int:
        return self.server.call(lambda: len(self.server.server.nodes.nodes(self.region)))

    def settle(self) -> None:
        """Collect what the fleet's connections left before the pushes: thousands of
        streams' objects wait for the collector's first pass, which the next allocations
        set off (0.1-0.4 s at 5,000 streams, in whichever push comes first; the bare
        server too). A push is measured without it."""
        self.server.call(gc.collect)

    def push(self, i: int) -> str:
        pub = self.server.server
        self.server.call(lambda: pub.set_split("svc-0", push_split(i), urgent=True))
        return self.server.call(lambda: pub.snapshot(self.region).type_version(ROUTE))

    def acked(self, key: str) -> dict[int, float] | None:
        return dict(self._acks.get(key, {}))  # (a copy made under the GIL, in one go)

    def acked_count(self, key: str) -> int | None:
        return len(self._acks.get(key, ()))

    def cpu_seconds(self) -> float:
        return time.process_time()

    def rss_mb(self) -> float:
        return proc_rss_mb()

    def close(self) -> None:
        self.server.close()


class ServeProcesses:
    """`xds-server serve` as processes: `replicas` 0: one on SQLite (the spec file, a
    state directory); else that many replicas on a new three-member etcd cluster. Each
    runs `--workers N` when `workers` > 1."""

    def __init__(self, spec_doc: dict[str, Any], workers: int, replicas: int) -> None:
        self.where = (f"{replicas} replica(s) on etcd" if replicas else "serve") + (
            f", --workers {workers}" if workers > 1 else ""
        )
        self.workers, self.replicas = workers, replicas
        self.build_s = 0.0
        self.dir = Path(tempfile.mkdtemp(prefix="push-fanout-"))
        self.spec_path = self.dir / "mesh.yaml"
        self.spec_path.write_text(yaml.safe_dump(spec_doc, sort_keys=False))
        self.etcd: EtcdCluster | None = None
        self.procs: list[Process] = []
        self.admins: list[int] = []
        self._decider: int | None = None
        self._channels: dict[int, grpc.Channel] = {}

    def _argv(self, name: str, xds: int, admin: int) -> list[str]:
        import sys

        argv = [sys.executable, "-m", "xds_server.cli", "serve",
                "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}",
                "--metrics-address", f"127.0.0.1:{free_port()}", "--ui-address", "",
                "--prometheus-url", f"http://127.0.0.1:{free_port()}",
                "--log-level", "warning"]  # fmt: skip
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        if self.etcd is None:
            return [*argv, "--spec", str(self.spec_path), "--state-dir", str(self.dir / "state")]
        argv += ["--store", self.etcd.url, "--replica-id", name, "--leader-ttl", "5",
                 "--state-dir", str(self.dir / f"state-{name}")]  # fmt: skip
        return argv + (["--spec", str(self.spec_path)] if name == "r0" else [])

    def start(self) -> list[int]:
        if self.replicas:
            self.etcd = EtcdCluster(self.dir / "etcd", members=3).start()
        ports = []
        for r in range(max(1, self.replicas)):
            xds, admin = free_port(), free_port()
            name = f"r{r}"
            self.procs.append(Process(name, self._argv(name, xds, admin), self.dir / f"{name}.log"))
            ports.append(xds)
            self.admins.append(admin)
            if r == 0 and self.etcd is not None:  # (r0 pushes the spec: the others read it)
                wait_for(lambda: self._rollout(0), "the rollout on r0", timeout=120, interval=0.2)
        wait_for(
            lambda: all(self._rollout(i) for i in range(len(self.admins))),
            "every server's admin API and the rollout",
            timeout=120,
            interval=0.2,
        )
        return ports

    def _stub(self, i: int) -> admin_pb2_grpc.AdminStub:
        port = self.admins[i]
        if port not in self._channels:
            self._channels[port] = grpc.insecure_channel(f"127.0.0.1:{port}")
        return admin_pb2_grpc.AdminStub(self._channels[port])

    def _rollout(self, i: int) -> bool:
        for p in self.procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited: {p.tail()}")
        try:
            self._stub(i).GetRollout(admin_pb2.GetRolloutRequest(service="svc-0"), timeout=2)
            return True
        except grpc.RpcError:
            return False

    def connected(self) -> int:
        return -1  # (not asked of the servers: the fleet says when every client synced)

    def settle(self) -> None:
        """Until the servers are quiet (their processes together under a fifth of a core
        over half a second; at most 30 s): after thousands of streams synced, replicas
        rewrite and read each other's directory keys and collect the connections'
        garbage for several seconds, which a push measured then pays (the first push of
        3 x 3,000 streams: 0.7 CPU-s a replica, the later ones 0.4)."""
        deadline = time.monotonic() + 30
        before = self.cpu_seconds() + self.etcd_cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(0.5)  # the quiet check's period, bounded by the deadline
            now = self.cpu_seconds() + self.etcd_cpu_seconds()
            if now - before < 0.1:
                return
            before = now

    def push(self, i: int) -> str:
        canary = 10.0 + i % 80  # (the rollout starts at its first step: every push differs)
        request = admin_pb2.SetWeightsRequest(
            service="svc-0", canary_percent=canary, reason=f"push-fanout benchmark push {i + 1}"
        )
        order = range(len(self.admins))
        if self._decider is not None:
            order = [self._decider, *(j for j in order if j != self._decider)]
        errors = []
        for j in order:  # (a replica that does not decide refuses: UNAVAILABLE)
            try:
                self._stub(j).SetWeights(request, metadata=[(ACTOR_KEY, ACTOR)], timeout=30)
                self._decider = j
                return str(i)
            except grpc.RpcError as exc:
                errors.append(f"r{j}: {exc.code().name} {exc.details()}")
        raise RuntimeError(f"no server took the weights: {errors}")

    def acked(self, key: str) -> dict[int, float] | None:
        return None

    def acked_count(self, key: str) -> int | None:
        return None

    def server_pids(self) -> list[int]:
        return tree([p.pid for p in self.procs])

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.server_pids())

    def etcd_cpu_seconds(self) -> float:
        return cpu_seconds([p.pid for p in self.etcd.processes()]) if self.etcd else 0.0

    def rss_mb(self) -> float:
        return sum(proc_rss_mb(pid) for pid in self.server_pids())

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        for p in self.procs:
            p.stop(timeout=15)
        if self.etcd is not None:
            self.etcd.stop()
        shutil.rmtree(self.dir, ignore_errors=True)  # (etcd's data: hundreds of MB a run)
