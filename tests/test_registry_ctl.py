"""`xdsctl registry` (the admin API's `ListInstances`) against real processes.

A three-member etcd cluster, a spec whose canary pool lists no endpoints (a registry
pool) pushed with `xds-server spec push`, one `xds-server serve --store` replica, and
model server instances registered with `xds-server register` on 3-second leases: the
replica lists them with the time their leases have left, filters them, names the spec's
services for an unknown one, and counts them on /metrics. One process on a spec file
has no registry: it says so in one line.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import wait_for
from xds_server.admin.v1 import admin_pb2, admin_pb2_grpc
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.procs import Process, free_port, http_get

from .conftest import make_spec_doc, write_spec

CLI = [sys.executable, "-m", "xds_server.cli"]
CTL = [sys.executable, "-m", "xds_server.ctl"]
SERVICE = "recommender"
REGIONS = ("us-east", "eu-west")
TTL = 3.0
NO_REGISTRY = (
    "xdsctl: FAILED_PRECONDITION: no registry: this server runs without --store etcd://..."
)


@dataclass
class Mesh:
    workdir: Path
    store: str
    admin: str
    metrics: str
    replica: Process
    registered: dict[str, Process] = field(default_factory=dict)
    """`xds-server register` processes by the address they registered."""

    def register(self, region: str, version: str = "v2") -> str:
        address = f"127.0.0.1:{free_port()}"
        argv = [*CLI, "register", "--store", self.store, "--service", SERVICE,
                "--version", version, "--region", region, "--address", address,
                "--ttl", f"{TTL:g}s"]  # fmt: skip
        log = self.workdir / f"register-{len(self.registered)}.log"
        self.registered[address] = Process(f"register-{address}", argv, log)
        return address


def xdsctl(server: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [*CTL, "--server", server, "--timeout", "5", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def ctl_json(server: str, *args: str) -> Any:
    res = xdsctl(server, "-o", "json", "registry", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def listed(admin: str) -> list[Any]:
    """`ListInstances` straight over gRPC (fast to poll); [] while it does not answer."""
    with grpc.insecure_channel(admin) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            reply = stub.ListInstances(admin_pb2.ListInstancesRequest(), timeout=3)
        except grpc.RpcError:
            return []
    return list(reply.instances)


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 1 and res.stdout == "", (res.returncode, res.stdout)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture
def mesh(tmp_path: Path, etcd_cluster: EtcdCluster) -> Iterator[Mesh]:
    """The spec pushed (its canary pool from the registry) and one replica answering."""
    ports = {(r, pool): free_port() for r in REGIONS for pool in ("production", "canary")}
    doc = make_spec_doc(ports, regions=REGIONS)
    del doc["services"][0]["pools"]["canary"]["endpoints"]
    spec = tmp_path / "mesh.yaml"
    write_spec(spec, doc)
    push = [*CLI, "spec", "push", "--spec", str(spec), "--store", etcd_cluster.url]
    pushed = subprocess.run(push, capture_output=True, text=True, timeout=30)
    assert pushed.returncode == 0, pushed.stderr
    admin, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    argv = [*CLI, "serve", "--store", etcd_cluster.url, "--replica-id", "a",
            "--leader-ttl", "2", "--xds-address", f"127.0.0.1:{free_port()}",
            "--admin-address", admin, "--metrics-address", metrics, "--ui-address", "",
            "--prometheus-url", f"http://127.0.0.1:{free_port()}"]  # fmt: skip
    replica = Process("replica-a", argv, tmp_path / "a.log")
    m = Mesh(tmp_path, etcd_cluster.url, admin, metrics, replica)
    try:

        def answers() -> bool:
            if not replica.alive():
                raise AssertionError(f"the replica exited:\n{replica.tail()}")
            with grpc.insecure_channel(admin) as channel:
                stub = admin_pb2_grpc.AdminStub(channel)
                stub.ListInstances(admin_pb2.ListInstancesRequest(), timeout=1)
            return True

        wait_for(answers, "the replica's admin API to answer ListInstances", timeout=20)
        yield m
    finally:
        for p in m.registered.values():  # every one told first: their stops overlap
            p.signal(signal.SIGTERM)
        for p in [*m.registered.values(), replica]:
            p.stop()


def test_xdsctl_registry_lists_filters_and_counts_the_instances(mesh: Mesh) -> None:
    east = sorted([mesh.register("us-east"), mesh.register("us-east")])
    west = mesh.register("eu-west")

    def all_three() -> bool:
        for address, p in mesh.registered.items():
            if not p.alive():
                raise AssertionError(f"register {address} exited:\n{p.tail()}")
        return len(listed(mesh.admin)) == 3

    wait_for(all_three, "three instances in the replica's registry", timeout=15)
    # JSON: every instance, by service, region, version and address; leases alive.
    data = ctl_json(mesh.admin)
    assert [(i["region"], i["address"]) for i in data] == [
        ("eu-west", west),
        *(("us-east", a) for a in east),
    ]
    for i in data:
        assert (i["service"], i["version"]) == (SERVICE, "v2"), i
        assert 0 < i["lease_ttl_left"] <= TTL, i
        assert i["ttl"] == TTL and int(i["lease"]) > 0, i
        assert 0 <= i["age_seconds"] < 30 and i["registered_at"] > 0, i
    # Filters.
    assert [i["address"] for i in ctl_json(mesh.admin, "--region", "us-east")] == east
    assert len(ctl_json(mesh.admin, "--service", SERVICE)) == 3
    # An unknown service: NOT_FOUND naming the spec's services, one line.
    err = one_line_error(xdsctl(mesh.admin, "registry", "--service", "nope"))
    assert err == f"xdsctl: NOT_FOUND: unknown service 'nope' (services: {SERVICE})"
    err = one_line_error(xdsctl(mesh.admin, "registry", "--region", "mars"))
    assert err.startswith("xdsctl: NOT_FOUND: unknown region 'mars' (regions: "), err
    # The table, from the second address of two (nothing listens on the first).
    dead = f"127.0.0.1:{free_port()}"
    res = xdsctl(f"{dead},{mesh.admin}", "registry")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["SERVICE", "VERSION", "REGION", "ADDRESS", "AGE", "LEASE-LEFT"]
    rows = [line.split() for line in lines[1:]]
    assert [r[:4] for r in rows] == [
        [SERVICE, "v2", "eu-west", west],
        *([SERVICE, "v2", "us-east", a] for a in east),
    ]
    assert all(r[4].endswith("s") and r[5] in ("1s", "2s", "3s") for r in rows), rows
    yaml_out = xdsctl(mesh.admin, "-o", "yaml", "registry", "--region", "eu-west")
    assert yaml_out.returncode == 0 and f"address: {west}" in yaml_out.stdout, yaml_out
    # /metrics counts them per service, version and region.
    url = f"http://{mesh.metrics}/metrics"

    def counted() -> bool:
        body = http_get(url)[1].decode()
        return (
            'xds_registered_instances{region="us-east",service="recommender",version="v2"} 2.0'
            in body.splitlines()
            and 'xds_registered_instances{region="eu-west",service="recommender",version="v2"} 1.0'
            in body.splitlines()
        )

    wait_for(counted, "xds_registered_instances on the replica's /metrics", timeout=10)
    # A clean stop revokes the lease: the instance leaves the registry at once.
    mesh.registered[west].stop()
    wait_for(lambda: len(listed(mesh.admin)) == 2, "the eu-west instance to leave", timeout=10)
    res = xdsctl(mesh.admin, "registry", "--region", "eu-west")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"no instances registered in {mesh.store} (--region eu-west)"


def test_one_process_without_a_store_has_no_registry(tmp_path: Path) -> None:
    ports = {(r, pool): free_port() for r in REGIONS for pool in ("production", "canary")}
    spec = tmp_path / "mesh.yaml"
    write_spec(spec, make_spec_doc(ports, regions=REGIONS))
    admin = f"127.0.0.1:{free_port()}"
    argv = [*CLI, "serve", "--spec", str(spec), "--state-dir", str(tmp_path / "state"),
            "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address", admin,
            "--metrics-address", "127.0.0.1:0", "--ui-address", "",
            "--prometheus-url", f"http://127.0.0.1:{free_port()}"]  # fmt: skip
    server = Process("server", argv, tmp_path / "server.log")
    try:

        def answers() -> bool:
            if not server.alive():
                raise AssertionError(f"the server exited:\n{server.tail()}")
            with grpc.insecure_channel(admin) as channel:
                stub = admin_pb2_grpc.AdminStub(channel)
                stub.ListReplicas(admin_pb2.ListReplicasRequest(), timeout=1)
            return True

        wait_for(answers, "the server's admin API to answer", timeout=20)
        assert one_line_error(xdsctl(admin, "registry")) == NO_REGISTRY
        assert one_line_error(xdsctl(admin, "-o", "json", "registry")) == NO_REGISTRY
    finally:
        server.stop()
