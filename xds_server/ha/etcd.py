"""How the replicas use etcd: the store address, the key layout and the two clients.

Two clients on one address list, because the two sides of a replica need different
things: the asynchronous `aetcd` client (grpc.aio, on the server's event loop) for what
runs beside the loop (the watch, leases, the election, node status), and a synchronous
unary channel for the fenced commit, which the controller makes on the loop before it
pushes, as it does a SQLite commit (bounded by a deadline; see `SyncKV`).

Failover between members (issue 29's leader-isolated run): each channel dials every
member as one gRPC target, and gRPC moves on by itself from a member that refuses or
resets, but not from one that has gone silent (packets dropped: the connection stays
up and every call waits for its deadline). So a process keeps its own order of the
members (`Members`, one per `EtcdAddress`, shared by both clients): a call that times
out or finds etcd UNAVAILABLE, or the async client's probe (a linearizable read every
PROBE_INTERVAL, which also fails on a member cut off from the majority), moves the
member it was on to the back, and both clients dial the new order. Detection within
PROBE_INTERVAL + PROBE_TIMEOUT, well inside a lease's TTL.

TLS and a user (`etcds://`, `--store-ca/-cert/-key`, `--store-credentials`): the
address carries them (`StoreSecurity`, `ha/security.py`), so every client made from it
honours them; a TLS channel dials one member at a time (its certificate names that
member), and `check_access` says in one line why etcd refuses this process.

Not gRPC keepalive: etcd refuses pings more often than its `--grpc-keepalive-min-time`
(5 s by default) with GOAWAY too_many_pings, which ends every stream of the connection,
and a ping every 5 s plus its timeout is slower than a 3 s lease. Ordinary calls with
short deadlines work with any etcd configuration, and tell a member without a majority
from a healthy one, which a ping cannot.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc, watcher
from aetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError

from xds_server.ha.security import (
    StoreAccessError,
    StoreSecurity,
    SyncAuth,
    Token,
    TokenInterceptor,
    is_stale,
    probe_member,
    quiet_grpc_core,
)

log = logging.getLogger("xds_server.ha.etcd")

T = TypeVar("T")

DEFAULT_PREFIX = "/xds-server/default"
COMMIT_TIMEOUT = 1.0
"""The longest a fenced commit may hold the event loop (etcd on loopback answers in a
few ms; a store that does not answer in this time is failing)."""
CALL_TIMEOUT = 0.8
"""The deadline of a renewal (a lease keepalive, a replica's key): etcd answers in
milliseconds; a member that has not answered by then is taken as silent, and the call
is tried again on the next one while the lease lasts."""
PROBE_INTERVAL = 0.5
PROBE_TIMEOUT = 0.8
"""The async client's probe: a linearizable read this often, within this deadline."""
LONGEST_CALL = 5.0
"""No call of a client here has a longer deadline (the aetcd client's own timeout is
capped to it): a channel left behind by a failover is closed after this and a margin,
once every call on it has ended by its own deadline."""
CONNECT_TIMEOUT = 1.0
"""How long a new TLS channel (one member) is watched for a refusal, which leaves the
member for the next one."""
CHECK_TIMEOUT = 3.0
"""`check_access`'s wait for one member (a login is a raft write and a bcrypt check)."""
FAILOVER_CODES = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE})


class StoreAddressError(ValueError):
    """`--store` that is not `etcd[s]://HOST:PORT[,HOST:PORT...]`; the message says why."""


class Members:
    """The order in which this process dials etcd's members, shared by every client of
    one `EtcdAddress`: the channels use the first member that answers; `failover` moves
    a member that stopped answering to the back, and `generation` counts the moves (a
    client whose channel is of an older generation dials again)."""

    def __init__(self, endpoints: tuple[tuple[str, int], ...], names: tuple[str, ...] = ()) -> None:
        self._order = [f"{h}:{p}" for h, p in endpoints]
        self._names = dict(zip(self._order, names or [h for h, _ in endpoints], strict=True))
        self._lock = threading.Lock()
        self.generation = 0

    def name(self, member: str) -> str:
        """The host `--store` wrote for this member (its TLS certificate names it)."""
        return self._names[member]

    def dial(self, tls: bool) -> tuple[int, str, str]:
        """(generation, gRPC target, the name its certificate must show): every member in
        the current order; with TLS the first alone (see `ha/security.py`)."""
        with self._lock:
            first = self._order[0]
            if tls:
                return self.generation, first, self._names[first]
            return self.generation, "ipv4:" + ",".join(self._order), self._names[first]

    def current(self) -> tuple[int, str]:
        """(generation, the gRPC target over every member in the current order)."""
        with self._lock:
            return self.generation, "ipv4:" + ",".join(self._order)

    @property
    def order(self) -> list[str]:
        with self._lock:
            return list(self._order)

    def failover(self, generation: int, why: str) -> bool:
        """The first member did not answer on a channel of `generation`: to the back.
        False when another client moved the order already. (The channel may be on a
        later member, when the first refused connections: then the next failover
        reaches it; gRPC does not tell a client call's peer.)"""
        with self._lock:
            if generation != self.generation or len(self._order) < 2:
                return False
            bad = self._order.pop(0)
            self._order.append(bad)
            self.generation += 1
            first = self._order[0]
        log.warning("etcd member %s did not answer (%s): dialling %s first", bad, why, first)
        return True


@dataclass(frozen=True)
class EtcdAddress:
    endpoints: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_PREFIX
    security: StoreSecurity = field(default_factory=StoreSecurity)
    """TLS and the login every client of this address uses (`etcds://`, the flags)."""
    names: tuple[str, ...] = ()
    """Each member's host as `--store` wrote it (default: its address)."""
    members: Members = field(init=False, compare=False, repr=False)
    """This process's order of the members (see `Members`), shared by the clients made
    from this address."""
    token: Token = field(init=False, compare=False, repr=False)
    """This process's etcd token (see `Token`), shared by the same clients."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", Members(self.endpoints, self.names))
        object.__setattr__(self, "token", Token(self.security.login))

    @property
    def target(self) -> str:
        """A gRPC target over every member, in the order given."""
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in self.endpoints)

    def __str__(self) -> str:
        scheme = "etcds" if self.security.tls else "etcd"
        return f"{scheme}://" + ",".join(f"{h}:{p}" for h, p in self.endpoints)


def parse_store_url(
    url: str, prefix: str = DEFAULT_PREFIX, security: StoreSecurity | None = None
) -> EtcdAddress:
    """`etcd[s]://HOST:PORT[,HOST:PORT...]` -> EtcdAddress; StoreAddressError naming the
    part that is wrong. Host names are resolved once, here (the channel wants addresses);
    TLS checks each member's certificate against the name as written. `security`: the
    TLS files and login (default: TLS as the scheme says, no files, no user)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("etcd", "etcds"):
        raise StoreAddressError(
            f"--store {url!r}: expected etcd://HOST:PORT[,HOST:PORT...] (etcds:// over TLS)"
        )
    security = security or StoreSecurity(tls=scheme == "etcds")
    if security.tls != (scheme == "etcds"):
        raise StoreAddressError(f"--store {url!r}: TLS is etcds://, plaintext etcd://")
    if not prefix.startswith("/") or prefix.endswith("/") or len(prefix) < 2:
        raise StoreAddressError(
            f"--store-prefix {prefix!r}: must start with '/' and not end with one"
        )
    endpoints, names = [], []
    for part in rest.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreAddressError(f"--store {url!r}: {part!r} is not HOST:PORT")
        try:
            ip = socket.getaddrinfo(host.strip("[]"), None, socket.AF_INET)[0][4][0]
        except OSError:
            raise StoreAddressError(f"--store {url!r}: cannot resolve host {host!r}") from None
        endpoints.append((str(ip), int(port)))
        names.append(host.strip("[]"))
    return EtcdAddress(tuple(endpoints), prefix, security, tuple(names))


def check_access(address: EtcdAddress, timeout: float = CHECK_TIMEOUT) -> None:
    """Before anything starts: can this process read its prefix from some member, as
    the user it logs in as? StoreAccessError, one line, naming the flag or file to fix
    (a member etcd refused over TLS or a login; else each member's reason)."""
    key = Keys(address.prefix).schema.encode()
    reasons: list[tuple[str, bool]] = []
    with quiet_grpc_core():
        for member in address.members.order:
            name = address.members.name(member)
            why = probe_member(address.security, member, name, key, address.prefix, timeout)
            if why is None:
                return
            reasons.append(why)
    specific = [text for text, known in reasons if known]
    if specific:
        raise StoreAccessError(specific[0])
    raise StoreAccessError(
        f"cannot reach the store {address}: " + "; ".join(text for text, _ in reasons)
    )


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

    def replica_nodes(self, replica_id: str, part: int) -> str:
        """One part of a replica's node list (`directory_parts`)."""
        return f"{self.prefix}/replica-nodes/{replica_id}/{part}"

    def replica_beat(self, replica_id: str) -> str:
        """A replica's heartbeat (`replicas.Directory._beat`): alive, and nothing else."""
        return f"{self.prefix}/replica-beats/{replica_id}"

    @property
    def everything(self) -> str:
        return f"{self.prefix}/"


def one_line(exc: BaseException) -> str:
    """An exception as one short log or error line (etcd's errors span several)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def why_left(exc: BaseException) -> str:
    """Why a member was left, short: a gRPC status and its details, or the error."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        details = exc.details() if hasattr(exc, "details") else ""
        return " ".join(f"{exc.code().name}: {details}".split())[:200]
    return one_line(exc)


def range_end(prefix: str) -> bytes:
    """etcd's end of a prefix range: the prefix with its last byte incremented."""
    raw = prefix.encode()
    return raw[:-1] + bytes([raw[-1] + 1])


def async_client(address: EtcdAddress, timeout: float = 2.0) -> FailoverClient:
    """An aetcd client over every member, moving on from a silent one (`FailoverClient`)."""
    return FailoverClient(address, timeout)


def moves_on(exc: BaseException) -> bool:
    """Is this failure one to try the next member for (a deadline passed, etcd
    UNAVAILABLE: a silent member, one without a majority, one that went away)?"""
    if isinstance(exc, (TimeoutError, ConnectionTimeoutError, ConnectionFailedError)):
        return True
    return isinstance(exc, grpc.RpcError) and exc.code() in FAILOVER_CODES


class FragmentingWatcher(watcher.Watcher):  # type: ignore[misc]
    """aetcd's watcher, with the `fragment` its `watch(..., fragment=True)` takes and then
    leaves out of the request (aetcd 1.0): etcd splits a large response into pieces
    under its request limit only when asked (`EtcdStore.watch` says why it must)."""

    def _build_watch_create_request(self, *args: Any, fragment: bool = False, **kw: Any) -> Any:
        request = super()._build_watch_create_request(*args, **kw)
        request.create_request.fragment = fragment
        return request


class FailoverClient(aetcd.Client):  # type: ignore[misc]  # (aetcd has no type hints)
    """The aetcd client, on a channel over every member in `Members`' order, that
    moves to the next member when the one it is on goes silent.

    Two ways to notice: `bounded` calls that time out or find etcd UNAVAILABLE, and a
    probe (`PROBE_INTERVAL`) that covers what has no deadline of its own, the watch
    above all. On a failover the channel is left, not closed under its calls: its watch
    stream is ended (the store's watch loop watches again on the new channel, from the
    revision it has seen), its calls end by their own deadlines, and it is closed once
    the longest of them has passed (closing it at once would cancel them, and grpc.aio
    raises a cancelled call as the caller's own CancelledError)."""

    def __init__(self, address: EtcdAddress, timeout: float = 2.0) -> None:
        self.members = address.members
        self.security = address.security
        self.token = address.token
        self.generation = -1
        """The member order's generation this client's channel dials."""
        self.auth: TokenInterceptor | None = None
        """The current channel's login (with `--store-credentials`)."""
        self._probe_key = Keys(address.prefix).leader.encode()
        self._probe: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._left: list[Any] = []
        self._opening: asyncio.Lock | None = None
        super().__init__(timeout=min(timeout, LONGEST_CALL))

    async def connect(self) -> None:
        """aetcd's connect, on this process's channel: the member order, TLS and the
        login of the address (aetcd itself dials one plaintext host)."""
        generation, _, _ = self.members.dial(self.security.tls)
        if self._connected.is_set() and generation != self.generation:
            self._leave()  # (another client of this address moved the order)
        if not self._connected.is_set():
            self._opening = self._opening or asyncio.Lock()
            async with self._opening:
                if not self._connected.is_set():
                    await self._open()
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._watch_member())

    async def _open(self) -> None:
        """A channel to the current order. Over TLS it dials the first member alone: one
        that refuses (down, or failing TLS) within CONNECT_TIMEOUT is left for the next,
        as gRPC does by itself across a plaintext channel's members."""
        members = len(self.members.order)
        for attempt in range(1, members + 1):
            generation, target, name = self.members.dial(self.security.tls)
            auth = TokenInterceptor(self.token) if self.token.login else None
            channel = self.security.aio_channel(
                target, name, [], auth.interceptors() if auth else []
            )
            if auth is not None:
                auth.bind(channel)
            if self.security.tls and attempt < members and not await _connects(channel):
                await channel.close()
                self.members.failover(generation, "connect: refused, or TLS failed")
                continue
            self.channel, self.auth, self.generation = channel, auth, generation
            self.kvstub = rpc.KVStub(channel)
            self.clusterstub = rpc.ClusterStub(channel)
            self.leasestub = rpc.LeaseStub(channel)
            self.maintenancestub = rpc.MaintenanceStub(channel)
            self.auth_stub = rpc.AuthStub(channel)
            self._watcher = FragmentingWatcher(rpc.WatchStub(channel), timeout=self._timeout)
            self._connected.set()
            return

    def forget_token(self) -> bool:
        """etcd no longer knows this channel's token (seen on a stream call, which the
        interceptor cannot repeat): the next call logs in again. False without a login."""
        token = self.token.value
        if self.token.login is None or token is None:
            return False
        self.token.forget(token)
        return True

    def failover(self, generation: int, why: str) -> None:
        """A call on a channel of `generation` timed out or found etcd UNAVAILABLE."""
        self.members.failover(generation, why)
        if self._connected.is_set() and self.generation != self.members.generation:
            self._leave()

    async def bounded(self, call: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
        """`call()` within `timeout` seconds; when it times out or etcd is UNAVAILABLE,
        this client moves on (`failover`) before the error is raised, so the caller's
        next try goes to the next member."""
        await self.connect()
        generation = self.generation
        try:
            async with asyncio.timeout(timeout):
                return await call()
        except Exception as exc:
            if moves_on(exc):
                self.failover(generation, f"{what}: {why_left(exc)}")
            raise

    async def _watch_member(self) -> None:
        """Until `close`: a linearizable read of one key every PROBE_INTERVAL, on the
        member dialled now; one that does not answer within PROBE_TIMEOUT (silent, or
        cut off from the majority) is left."""
        request = rpc.RangeRequest(key=self._probe_key, count_only=True)
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            generation = self.generation
            try:
                await self.connect()
                generation = self.generation
                await self.kvstub.Range(request, timeout=PROBE_TIMEOUT, metadata=self.metadata)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # (close(); else a call cancelled by its channel's closing)
            except Exception as exc:
                if moves_on(exc):
                    self.failover(generation, f"probe: {why_left(exc)}")
                else:
                    log.debug("etcd probe: %s", one_line(exc))

    def _leave(self) -> None:
        """Dial the current order at the next call; the old channel's watch ended now,
        the channel itself closed once its calls have passed their deadlines."""
        channel, watcher = self.channel, self._watcher
        self._init_channel_attrs()
        self._connected.clear()
        if channel is None:
            return
        self._left.append(channel)
        task = asyncio.get_running_loop().create_task(self._retire(channel, watcher))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, channel: Any, watcher: Any) -> None:
        if watcher is not None:
            await watcher.shutdown()  # (its watches end: their owners watch again)
        await asyncio.sleep(LONGEST_CALL + 1.0)
        if channel in self._left:
            self._left.remove(channel)
            await channel.close()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for channel in self._left:
            await channel.close()
        self._left.clear()
        await super().close()


async def _connects(channel: grpc.aio.Channel) -> bool:
    """False when the channel's member fails to connect (TRANSIENT_FAILURE: refused, or
    a failed handshake) within CONNECT_TIMEOUT; True once READY, or still connecting
    then: slow is not down (a silent member is the probe's to judge)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_TIMEOUT
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return False
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), deadline - loop.time())
        except TimeoutError:
            return True
        state = channel.get_state()
    return True


async def retrying(
    client: FailoverClient, call: Callable[[], Awaitable[T]], until: float, what: str
) -> T:
    """`call()` (one that may be repeated), each try within CALL_TIMEOUT on the member
    the client dials then (a silent one is left after its try), until `until`
    (monotonic) has passed: its result, or the last try's error."""
    while True:
        started = time.monotonic()
        try:
            left = until - started
            return await client.bounded(call, max(0.05, min(CALL_TIMEOUT, left)), what)
        except Exception as exc:
            if until - time.monotonic() <= 0.1:
                raise
            if is_stale(exc) and client.forget_token():
                continue  # (a lease renewal: a stream, which the interceptor cannot repeat)
            if not moves_on(exc):
                raise
            log.debug("%s: %s; trying again", what, one_line(exc))
            if time.monotonic() - started < 0.1:
                await asyncio.sleep(0.1)  # (refused at once: no busy loop)


async def renew(client: FailoverClient, lease: int, until: float, what: str) -> Any:
    """Renew `lease` (`retrying` until `until`): the reply (None or TTL <= 0: the lease
    is gone), or the last try's error."""
    return await retrying(client, lambda: client.refresh_lease(lease), until, what)


class SyncKV:
    """A blocking KV client for the commit path (etcd's own generated stubs, as shipped
    with aetcd): one call, one deadline, no event loop needed. Its channel dials the
    address's `Members` order (over TLS, the first member); a call that times out or
    finds etcd UNAVAILABLE moves the order on (a commit is not tried again here: it
    holds the event loop; a read is). With a login, each call carries the token, and a
    call etcd refused for a token it forgot is made again after a new login (etcd
    checks the token before it applies anything, so a commit too)."""

    def __init__(self, address: EtcdAddress, timeout: float = COMMIT_TIMEOUT) -> None:
        self.timeout = timeout
        self.members = address.members
        self.security = address.security
        self.token = address.token
        self._lock = threading.Lock()
        self._generation = -1
        self._channel: grpc.Channel | None = None
        self._kv: Any = None
        self._auth: SyncAuth | None = None

    def _stub(self) -> tuple[int, Any, SyncAuth]:
        with self._lock:
            generation, target, name = self.members.dial(self.security.tls)
            if generation != self._generation or self._channel is None or self._auth is None:
                if self._channel is not None:
                    self._channel.close()
                self._channel = self.security.sync_channel(target, name)
                self._kv = rpc.KVStub(self._channel)
                self._auth = SyncAuth(self._channel, self.token)
                self._generation = generation
            return generation, self._kv, self._auth

    def _call(self, method: str, request: Any) -> Any:
        generation, kv, auth = self._stub()
        try:
            return auth.call(getattr(kv, method), request, self.timeout)
        except grpc.RpcError as exc:
            if exc.code() in FAILOVER_CODES:
                self.members.failover(generation, f"{method}: {why_left(exc)}")
            raise

    def txn(self, request: Any) -> Any:
        return self._call("Txn", request)

    def range(self, key: str, end: bytes | None = None, attempts: int = 5) -> Any:
        """A read, tried again (reads are safe to repeat) while etcd answers UNAVAILABLE,
        as it does for a moment when a member is lost or its raft leader changes, or
        does not answer in time (the next try goes to the next member)."""
        req = rpc.RangeRequest(key=key.encode(), range_end=end or b"")
        for attempt in range(attempts):
            try:
                return self._call("Range", req)
            except grpc.RpcError as exc:
                if attempt == attempts - 1 or exc.code() not in FAILOVER_CODES:
                    raise
                time.sleep(0.1 * (attempt + 1))  # backoff before the next attempt
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


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
