"""How the replicas use etcd: the store address, the key layout and the two clients.

Two clients on one address list, because the two sides of a replica need different
things: the asynchronous `aetcd` client (grpc.aio, on the server's event loop) for what
runs beside the loop (the watch, leases, the election, node status), and a synchronous
unary channel for the fenced commit, which the controller makes on the loop before it
pushes, as it does a SQLite commit (bounded by a deadline; see `SyncKV`).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

import aetcd
import grpc
from aetcd import rpc

DEFAULT_PREFIX = "/xds-server/default"
COMMIT_TIMEOUT = 1.0
"""The longest a fenced commit may hold the event loop (etcd on loopback answers in a
few ms; a store that does not answer in this time is failing)."""


class StoreAddressError(ValueError):
    """`--store` that is not `etcd://HOST:PORT[,HOST:PORT...]`; the message says why."""


@dataclass(frozen=True)
class EtcdAddress:
    endpoints: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_PREFIX

    @property
    def target(self) -> str:
        """A gRPC target over every member: the channel moves to another when one fails."""
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def __str__(self) -> str:
        return "etcd://" + ",".join(f"{h}:{p}" for h, p in self.endpoints)


def parse_store_url(url: str, prefix: str = DEFAULT_PREFIX) -> EtcdAddress:
    """`etcd://HOST:PORT[,HOST:PORT...]` -> EtcdAddress; StoreAddressError naming the part
    that is wrong. Host names are resolved once, here (the channel wants addresses)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "etcd":
        raise StoreAddressError(f"--store {url!r}: expected etcd://HOST:PORT[,HOST:PORT...]")
    if not prefix.startswith("/") or prefix.endswith("/") or len(prefix) < 2:
        raise StoreAddressError(
            f"--store-prefix {prefix!r}: must start with '/' and not end with one"
        )
    endpoints = []
    for part in rest.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreAddressError(f"--store {url!r}: {part!r} is not HOST:PORT")
        try:
            ip = socket.getaddrinfo(host.strip("[]"), None, socket.AF_INET)[0][4][0]
        except OSError:
            raise StoreAddressError(f"--store {url!r}: cannot resolve host {host!r}") from None
        endpoints.append((str(ip), int(port)))
    return EtcdAddress(tuple(endpoints), prefix)


@dataclass(frozen=True)
class Keys:
    """Where each thing lives under the prefix."""

    prefix: str

    @property
    def spec(self) -> str:
        return f"{self.prefix}/spec"

    def spec_history(self, version: int = 0) -> str:
        """Each pushed spec, by its number (1, 2, ...); version 0: the folder."""
        return f"{self.prefix}/spec-history/" + (f"{version:012d}" if version else "")

    def rollout(self, service: str = "", version: str = "") -> str:
        return f"{self.prefix}/rollouts/" + (f"{service}/{version}" if service else "")

    def audit(self, seq: int = 0) -> str:
        return f"{self.prefix}/audit/" + (f"{seq:016d}" if seq else "")

    def routes(self, region: str = "") -> str:
        """A region's weights, written with each decision that changes them: the key's
        revision is the region's routes version on every replica."""
        return f"{self.prefix}/routes/" + region

    def registry(
        self, service: str = "", region: str = "", version: str = "", address: str = ""
    ) -> str:
        """An instance's key, registry/SERVICE/REGION/VERSION/HOST:PORT (on its lease);
        fewer parts give the folder that holds them."""
        parts = [p for p in (service, region, version, address) if p]
        tail = "/".join(parts)
        return f"{self.prefix}/registry/" + (tail if len(parts) == 4 else tail + "/" * bool(tail))

    @property
    def schema(self) -> str:
        """The store's schema version (issue 30): absent in stores made before versions."""
        return f"{self.prefix}/schema"

    @property
    def leader(self) -> str:
        return f"{self.prefix}/leader"

    def replica(self, replica_id: str = "") -> str:
        return f"{self.prefix}/replicas/" + replica_id

    @property
    def everything(self) -> str:
        return f"{self.prefix}/"


def one_line(exc: BaseException) -> str:
    """An exception as one short log or error line (etcd's errors span several)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def range_end(prefix: str) -> bytes:
    """etcd's end of a prefix range: the prefix with its last byte incremented."""
    raw = prefix.encode()
    return raw[:-1] + bytes([raw[-1] + 1])


def async_client(address: EtcdAddress, timeout: float = 2.0) -> aetcd.Client:
    """An aetcd client over every member (host:port of aetcd's own form cannot list
    several: the gRPC target does)."""
    target = address.target
    host, _, port = target.rpartition(":")
    return aetcd.Client(host=host, port=int(port), timeout=timeout)


class SyncKV:
    """A blocking KV client for the commit path (etcd's own generated stubs, as shipped
    with aetcd): one call, one deadline, no event loop needed."""

    def __init__(self, address: EtcdAddress, timeout: float = COMMIT_TIMEOUT) -> None:
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address.target)
        self._kv = rpc.KVStub(self._channel)

    def txn(self, request: Any) -> Any:
        return self._kv.Txn(request, timeout=self.timeout)

    def range(self, key: str, end: bytes | None = None, attempts: int = 5) -> Any:
        """A read, tried again (reads are safe to repeat) while etcd answers UNAVAILABLE,
        as it does for a moment when a member is lost or its raft leader changes."""
        req = rpc.RangeRequest(key=key.encode(), range_end=end or b"")
        for attempt in range(attempts):
            try:
                return self._kv.Range(req, timeout=self.timeout)
            except grpc.RpcError as exc:
                if attempt == attempts - 1 or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.1 * (attempt + 1))  # backoff before the next attempt
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._channel.close()


def put_op(key: str, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=value, lease=lease))


def compare_create_revision(key: str, revision: int) -> Any:
    """Holds while `key` exists with this create revision (0: while it does not exist)."""
    return rpc.Compare(
        key=key.encode(),
        result=rpc.Compare.EQUAL,
        target=rpc.Compare.CREATE,
        create_revision=revision,
    )


def compare_mod_revision(key: str, revision: int) -> Any:
    """Holds while `key` was last written at this revision (0: while it does not exist)."""
    return rpc.Compare(
        key=key.encode(), result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=revision
    )


def compare_version(key: str, version: int) -> Any:
    return rpc.Compare(
        key=key.encode(), result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, version=version
    )
