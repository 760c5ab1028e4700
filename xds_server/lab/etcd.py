"""A real etcd cluster on loopback (Debian's `etcd-server`, etcd 3.4): the lab's and the
tests' store for replicas. Each member is its own process with its own data directory,
so a test can kill, pause or restart one. In a lab with namespaces (issue 29) each
member has a `Place`: the address it binds and the namespace it runs in (a region's own
member, cut off with its region).

`secure=True` (the lab's `--ha --mtls`, issue 30): TLS on the client and peer ports,
client certificates required on both, and etcd's authentication on, with root and the
lab's user (`lab/credentials.py`), whose role may read and write `ETCD_PREFIX` only.
Every client then needs `client_flags()` (commands) or `security()` (in process)."""

from __future__ import annotations

import shutil
import signal
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aetcd import rpc

from xds_server.ha.security import StoreSecurity
from xds_server.lab.credentials import ETCD_PREFIX, EtcdCredentials, make_etcd_credentials
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
        self.tls: EtcdCredentials | None = None
        """With TLS and users: the cluster's files (set before `start`)."""
        self.extra: list[str] = []
        """More of etcd's flags (the cluster's `--auth-token-ttl`)."""

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def client_address(self) -> str:
        return f"{self.place.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.client_address}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.place.host}:{self.peer_port}"

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        cert, key = (str(f) for f in self.tls.member(self.name))
        ca = str(self.tls.ca)
        return ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca,
                "--client-cert-auth",
                "--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca,
                "--peer-client-cert-auth",
                # Logins check a bcrypt hash: etcd's default cost (10) is for passwords
                # people choose; the lab's are 144 random bits, and a dozen processes
                # logging in at once on a loaded machine timed out at cost 10.
                "--bcrypt-cost", "4"]  # fmt: skip

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
        argv += [*self._tls_args(), *self.extra]
        log = self.workdir / f"{self.name}.log"
        self.process = Process(f"etcd-{self.name}", argv, log, wrap=self.place.wrap)

    def healthy(self) -> bool:
        if self.process is None or not self.process.alive():
            return False
        if self.tls is None:
            status, body, _ = http_get(f"{self.client_url}/health", timeout=1.0)
            return status == 200 and b'"true"' in body
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.load_cert_chain(*(str(f) for f in self.tls.client))
        try:
            url = f"{self.client_url}/health"
            with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
                return resp.status == 200 and b'"true"' in resp.read()
        except (urllib.error.URLError, OSError):
            return False


class EtcdCluster:
    """`members` etcd processes forming one cluster; `endpoints` for `--store`."""

    def __init__(
        self,
        workdir: Path,
        members: int = 3,
        places: Sequence[Place] = (),
        quota_bytes: int | None = None,
        secure: bool = False,
        auth_token_ttl: int = 0,
    ) -> None:
        """`places`: each member's (as many as `members`); loopback without.
        `quota_bytes`: each member's `--quota-backend-bytes` (a small one fills soon:
        etcd's NOSPACE alarm); None: etcd's default. `secure`: TLS and users (see the
        module). `auth_token_ttl`: etcd's `--auth-token-ttl` (a short one makes clients
        log in again; 0: etcd's 300 s)."""
        self.workdir = workdir
        places = list(places) or [Place()] * members
        if len(places) != members:
            raise ValueError(f"etcd: {members} members, {len(places)} places")
        self.members = [
            EtcdMember(f"etcd{i}", workdir, free_port(), free_port(), place, quota_bytes)
            for i, place in enumerate(places)
        ]
        self.secure = secure
        self.tls: EtcdCredentials | None = None
        for m in self.members:
            m.extra = ["--auth-token-ttl", str(auth_token_ttl)] if auth_token_ttl else []

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def url(self) -> str:
        """`etcd://127.0.0.1:P1,127.0.0.1:P2,...` (`etcds://` when secure), for `--store`."""
        scheme = "etcds" if self.secure else "etcd"
        return f"{scheme}://" + ",".join(m.client_address for m in self.members)

    def client_flags(self) -> list[str]:
        """The store flags every command needs besides `--store` (none when plaintext)."""
        return self.tls.flags() if self.tls is not None else []

    def security(self) -> StoreSecurity | None:
        """The same for a client made in this process (`parse_store_url(url, prefix, ...)`)."""
        return self.tls.security() if self.tls is not None else None

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.secure:
            named = [(m.name, m.place.host) for m in self.members]
            self.tls = make_etcd_credentials(self.workdir / "tls", named)
        for m in self.members:
            m.tls = self.tls  # (all first: the initial cluster names https peers)
        for m in self.members:
            m.start(self.initial_cluster)
        self.wait_healthy(timeout)
        if self.tls is not None:
            enable_auth(self.members[0], self.tls)
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


def enable_auth(member: EtcdMember, tls: EtcdCredentials) -> None:
    """etcd's users, on a new cluster (over its client certificate, before auth is on):
    root, and the lab's user with a role that reads and writes `ETCD_PREFIX`; then
    authentication on (etcdctl user add / role add / grant-permission / auth enable)."""
    cert, key = (f.read_bytes() for f in tls.client)
    credentials = grpc.ssl_channel_credentials(tls.ca.read_bytes(), key, cert)
    options = [("grpc.ssl_target_name_override", member.place.host)]
    prefix = ETCD_PREFIX.encode()
    role, deadline = tls.user, 10.0
    grant = rpc.Permission(
        permType=rpc.Permission.READWRITE, key=prefix, range_end=prefix[:-1] + b"0"
    )
    with grpc.secure_channel(member.client_address, credentials, options) as channel:
        auth = rpc.AuthStub(channel)
        for method, request in (
            (auth.UserAdd, rpc.AuthUserAddRequest(name="root", password=tls.password("root"))),
            (auth.UserGrantRole, rpc.AuthUserGrantRoleRequest(user="root", role="root")),
            (auth.RoleAdd, rpc.AuthRoleAddRequest(name=role)),
            (auth.RoleGrantPermission, rpc.AuthRoleGrantPermissionRequest(name=role, perm=grant)),
            (auth.UserAdd, rpc.AuthUserAddRequest(name=tls.user, password=tls.password())),
            (auth.UserGrantRole, rpc.AuthUserGrantRoleRequest(user=tls.user, role=role)),
            (auth.AuthEnable, rpc.AuthEnableRequest()),
        ):
            method(request, timeout=deadline)
