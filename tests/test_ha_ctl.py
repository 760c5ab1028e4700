"""`xdsctl` against replicas on etcd: `status` lists every replica, `--server A,B,...`
skips an address nothing answers on, and a change reaches the leader wherever it runs.

Real processes: a three-member etcd cluster, two `xds-server serve --store` replicas
(one serves us-east, the other eu-west and ap-south) and `xdsctl` itself. Prometheus is
not running, so the rollout the canary pool starts just holds: enough to steer it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import wait_for
from xds_server.admin.v1 import admin_pb2, admin_pb2_grpc
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import Process, free_port

from .conftest import REGIONS, make_spec_doc, write_spec

CTL = [sys.executable, "-m", "xds_server.ctl"]
SERVICE = "recommender"
SERVES = {"us-east": ("us-east",), "eu-west": ("eu-west", "ap-south")}
"""Replica id -> the regions it serves."""


@dataclass
class Replica:
    name: str
    admin: str
    xds: str
    process: Process

    def replicas(self) -> list[Any]:
        """`ListReplicas` straight over gRPC ([] while it does not answer)."""
        with grpc.insecure_channel(self.admin) as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            try:
                reply = stub.ListReplicas(admin_pb2.ListReplicasRequest(), timeout=2)
            except grpc.RpcError:
                return []
        return list(reply.replicas)


@dataclass
class Cluster:
    replicas: dict[str, Replica]

    def leader(self) -> Replica:
        return next(r for r in self.replicas.values() if _leads(r))

    def follower(self) -> Replica:
        return next(r for r in self.replicas.values() if not _leads(r))


def _leads(replica: Replica) -> bool:
    return any(r.leader and r.this for r in replica.replicas())


def xdsctl(servers: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [*CTL, "--server", servers, "--timeout", "5", "--actor", "test-operator", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def ctl_json(servers: str, *args: str) -> Any:
    res = xdsctl(servers, "-o", "json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def start_replica(name: str, store: str, workdir: Path) -> Replica:
    admin, xds = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "xds_server.cli", "serve",
            "--store", store, "--replica-id", name, "--regions", ",".join(SERVES[name]),
            "--xds-address", xds, "--admin-address", admin,
            "--prometheus-url", f"http://127.0.0.1:{free_port()}",
            "--metrics-address", "127.0.0.1:0", "--ui-address", ""]  # fmt: skip
    return Replica(name, admin, xds, Process(f"xds-{name}", argv, workdir / f"{name}.log"))


@pytest.fixture
def cluster(etcd_cluster: EtcdCluster, tmp_path: Path) -> Iterator[Cluster]:
    """Two replicas on etcd, a spec with a canary pool pushed, one of them elected and
    deciding the rollout."""
    ports = {(r, pool): free_port() for r in REGIONS for pool in ("production", "canary")}
    spec = tmp_path / "mesh.yaml"
    write_spec(spec, make_spec_doc(ports))
    push = [sys.executable, "-m", "xds_server.cli", "spec", "push",
            "--spec", str(spec), "--store", etcd_cluster.url]  # fmt: skip
    pushed = subprocess.run(push, capture_output=True, text=True, timeout=30)
    assert pushed.returncode == 0, pushed.stderr
    replicas = {name: start_replica(name, etcd_cluster.url, tmp_path) for name in SERVES}
    try:
        for r in replicas.values():

            def ready(r: Replica = r) -> bool:
                if not r.process.alive():
                    raise RuntimeError(f"{r.name} exited:\n{r.process.tail()}")
                listed = r.replicas()
                return len(listed) == len(SERVES) and sum(x.leader for x in listed) == 1

            wait_for(ready, f"replica {r.name} to see every replica and one leader", timeout=20)
        lead = Cluster(replicas).leader()
        wait_for(
            lambda: ctl_json(lead.admin, "rollout", "list"),
            "the leader to start a rollout",
            timeout=15,
        )
        yield Cluster(replicas)
    finally:
        for r in replicas.values():  # every replica told first: their stops overlap
            r.process.signal(signal.SIGTERM)
        for r in replicas.values():
            r.process.stop()


def test_status_lists_every_replica_with_one_leader(cluster: Cluster) -> None:
    both = ",".join(r.admin for r in cluster.replicas.values())
    data = ctl_json(both, "status")
    by_id = {r["id"]: r for r in data["replicas"]}
    assert set(by_id) == set(SERVES)
    assert [r["id"] for r in data["replicas"] if r["leader"]] == [cluster.leader().name]
    for name, replica in cluster.replicas.items():
        assert tuple(by_id[name]["regions"]) == SERVES[name]
        assert by_id[name]["admin_address"] == replica.admin
        assert by_id[name]["xds_address"] == replica.xds
        assert by_id[name]["started"] > 0
    first = next(iter(cluster.replicas.values()))
    assert [r["id"] for r in data["replicas"] if r["this"]] == [first.name]
    assert data["server"] == first.admin
    assert data["replica_store"].startswith("etcd://")
    # An address nothing listens on is skipped: the next one answers.
    dead = f"127.0.0.1:{free_port()}"
    follower = cluster.follower()
    res = xdsctl(f"{dead},{follower.admin}", "status")
    assert res.returncode == 0, res.stderr
    assert f"admin API {follower.admin}: reachable" in res.stdout
    table = res.stdout[res.stdout.index("ID ") :].splitlines()
    assert table[0].split() == ["ID", "REGIONS", "XDS", "ADMIN", "NODES", "ROLE"]
    rows = {line.split()[0]: line.split() for line in table[1 : 1 + len(SERVES)]}
    assert rows[cluster.leader().name][-1] == "leader"
    assert rows[follower.name][-1] == "follower"
    assert rows[follower.name][1] == "*"  # the one that answered
    # When every address fails, each is named with why, one line each.
    other = f"127.0.0.1:{free_port()}"
    res = xdsctl(f"{dead},{other}", "status")
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert lines == [
        "xdsctl: no admin API could answer ListNodes (2 tried):",
        f"  {dead}: cannot reach it: connection refused",
        f"  {other}: cannot reach it: connection refused",
    ]


def test_a_change_reaches_the_leader_and_a_follower_alone_names_it(cluster: Cluster) -> None:
    leader, follower = cluster.leader(), cluster.follower()
    assert ctl_json(leader.admin, "rollout", "get", SERVICE)["phase"] == "progressing"
    # A follower alone refuses, naming the leader: one line, a non-zero exit.
    res = xdsctl(follower.admin, "rollout", "pause", SERVICE, "--reason", "x")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "xdsctl: UNAVAILABLE: this replica does not decide rollouts; "
        f"the leader is {leader.name} (admin {leader.admin})"
    ]
    assert ctl_json(leader.admin, "rollout", "get", SERVICE)["phase"] == "progressing"
    # The follower first, then the leader: the change goes on to the leader.
    dead = f"127.0.0.1:{free_port()}"
    paused = ctl_json(
        f"{dead},{follower.admin},{leader.admin}", "rollout", "pause", SERVICE, "--reason", "x"
    )
    assert paused["phase"] == "paused"
    assert ctl_json(leader.admin, "rollout", "get", SERVICE)["phase"] == "paused"
    # The follower serves the committed state: it shows the pause too (from the store).
    wait_for(
        lambda: ctl_json(follower.admin, "rollout", "get", SERVICE)["phase"] == "paused",
        "the follower to read the pause from the store",
        timeout=10,
    )
    audit = ctl_json(f"{follower.admin},{leader.admin}", "audit", "--service", SERVICE)
    assert any(e["actor"].startswith("test-operator") for e in audit)
    # Every address refusing: each named with why.
    res = xdsctl(f"{dead},{follower.admin}", "rollout", "resume", SERVICE, "--reason", "x")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "xdsctl: no admin API could answer ResumeRollout (2 tried):",
        f"  {dead}: cannot reach it: connection refused",
        f"  {follower.admin}: UNAVAILABLE: this replica does not decide rollouts; "
        f"the leader is {leader.name} (admin {leader.admin})",
    ]
