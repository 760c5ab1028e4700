"""A real etcd cluster on loopback (Debian's `etcd-server`, etcd 3.4): the lab's and the
tests' store for replicas. Each member is its own process with its own data directory,
so a test can kill, pause or restart one. In a lab with namespaces (issue 29) each
member has a `Place`: the address it binds and the namespace it runs in (a region's own
member, cut off with its region)."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xds_server.lab.polling import wait_for
from xds_server.lab.procs import Process, free_port, http_get

ETCD_BINARY = "etcd"


def etcd_binary() -> str:
    found = shutil.which(ETCD_BINARY)
    if found is None:
        raise FileNotFoundError(
            "etcd not found: install Debian's etcd-server package (make setup does)"
        )
    return found


@dataclass(frozen=True)
class Place:
    """Where a member runs: the address it binds (client and peer URLs) and its
    command's prefix (`ip netns exec NS`, or nothing)."""

    host: str = "127.0.0.1"
    wrap: tuple[str, ...] = field(default=())


class EtcdMember:
    def __init__(
        self,
        name: str,
        workdir: Path,
        client_port: int,
        peer_port: int,
        place: Place = Place(),
        quota_bytes: int | None = None,
    ) -> None:
        self.name = name
        self.quota_bytes = quota_bytes
        """etcd's `--quota-backend-bytes`; None: etcd's default (2 GiB)."""
        self.workdir = workdir
        self.client_port = client_port
        self.peer_port = peer_port
        self.place = place
        self.process: Process | None = None

    @property
    def client_address(self) -> str:
        return f"{self.place.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.client_address}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.place.host}:{self.peer_port}"

    def start(self, initial_cluster: str, state: str = "new") -> None:
        argv = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.workdir / self.name),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", "xds-server-lab",
            # Loopback: short heartbeats, so a lost member is noticed (and a new raft
            # leader elected) in well under a second.
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        if self.quota_bytes is not None:
            argv += ["--quota-backend-bytes", str(self.quota_bytes)]
        log = self.workdir / f"{self.name}.log"
        self.process = Process(f"etcd-{self.name}", argv, log, wrap=self.place.wrap)

    def healthy(self) -> bool:
        if self.process is None or not self.process.alive():
            return False
        status, body, _ = http_get(f"{self.client_url}/health", timeout=1.0)
        return status == 200 and b'"true"' in body


class EtcdCluster:
    """`members` etcd processes forming one cluster; `endpoints` for `--store`."""

    def __init__(
        self,
        workdir: Path,
        members: int = 3,
        places: Sequence[Place] = (),
        quota_bytes: int | None = None,
    ) -> None:
        """`places`: each member's (as many as `members`); loopback without.
        `quota_bytes`: each member's `--quota-backend-bytes` (a small one fills soon:
        etcd's NOSPACE alarm); None: etcd's default."""
        self.workdir = workdir
        places = list(places) or [Place()] * members
        if len(places) != members:
            raise ValueError(f"etcd: {members} members, {len(places)} places")
        self.members = [
            EtcdMember(f"etcd{i}", workdir, free_port(), free_port(), place, quota_bytes)
            for i, place in enumerate(places)
        ]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def url(self) -> str:
        """`etcd://127.0.0.1:P1,127.0.0.1:P2,...`, for `serve --store`."""
        return "etcd://" + ",".join(m.client_address for m in self.members)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            m.start(self.initial_cluster)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_for(
            lambda: all(m.healthy() for m in self.members if m.process and m.process.alive()),
            "every running etcd member to report healthy",
            timeout=timeout,
            interval=0.1,
        )

    def kill(self, index: int) -> None:
        """SIGKILL one member (its data stays: `restart` brings it back)."""
        process = self.members[index].process
        assert process is not None
        process.kill()

    def restart(self, index: int) -> None:
        self.members[index].start(self.initial_cluster, state="existing")

    def pause(self) -> None:
        """SIGSTOP every member: etcd is unreachable from every replica (connections hang,
        as over a partition), until `resume`."""
        for m in self.members:
            if m.process is not None and m.process.alive():
                m.process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        for m in self.members:
            if m.process is not None and m.process.alive():
                m.process.signal(signal.SIGCONT)

    def processes(self) -> list[Process]:
        return [m.process for m in self.members if m.process is not None]

    def stop(self) -> None:
        self.resume()  # a stopped process ignores SIGTERM until continued
        for p in self.processes():
            p.stop()

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
