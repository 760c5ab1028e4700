"""Keeping etcd bounded (issue 30), the I/O: `StoreMaintainer` polls etcd's status and
alarms on every replica (so any replica's `/metrics` and `xdsctl status` show them) and,
on the leader, compacts, defragments and makes room after NOSPACE, as `ha/maintenance.py`
decides. `EtcdMetrics` is its part of `/metrics`.

One channel per member, not the replicas' failover client: Status and Defragment answer
for the member they reach, and each member keeps its own file (and quota check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd import rpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from xds_server.ha.etcd import EtcdAddress, range_end, why_left
from xds_server.ha.maintenance import (
    ALARMS,
    NOSPACE,
    Alarm,
    Defrags,
    EtcdStatus,
    MaintenanceOptions,
    MemberStatus,
    Narrator,
    Recovery,
    RevisionClock,
    is_nospace,
    room_made,
    size,
    writes_held,
)
from xds_server.ha.security import TokenInterceptor
from xds_server.ha.store import EtcdStore
from xds_server.rollout.commits import StoreHealth

log = logging.getLogger("xds_server.ha.maintainer")

STATUS_TIMEOUT = 1.0
COMPACT_TIMEOUT = 30.0
DEFRAG_TIMEOUT = 120.0
"""Defragmenting rewrites the member's whole file: seconds per GiB."""
ALARM_NAMES = {rpc.AlarmType.Value(name): name for name in ALARMS}


@dataclass(frozen=True)
class Done:
    """A compaction or defragmentation this replica made: when, what, how long."""

    at: float
    """Wall clock."""
    what: str
    seconds: float

    def describe(self) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(self.at))
        return f"{self.what} at {clock} in {self.seconds:.2f}s"


class EtcdMetrics:
    """etcd as the replicas see it: `xds_etcd_*` (every replica polls; the leader acts)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self.db_size = gauge(
            "xds_etcd_db_size_bytes",
            "Each member's database file (what etcd checks its quota against)",
            ("member",),
        )
        self.in_use = gauge(
            "xds_etcd_db_size_in_use_bytes",
            "Each member's bytes in use (the rest of the file: free pages)",
            ("member",),
        )
        self.quota = gauge("xds_etcd_quota_bytes", "etcd's quota (--store-quota-bytes)")
        self.keys = gauge("xds_etcd_keys", "Keys under the store's prefix")
        self.revision = gauge("xds_etcd_revision", "The store's revision")
        self.compacted = gauge(
            "xds_etcd_compacted_revision", "The newest revision this replica compacted etcd to"
        )
        self.alarm = gauge("xds_etcd_alarm", "1 while etcd has this alarm raised", ("alarm",))
        self.held = gauge(
            "xds_etcd_writes_held",
            "1 while only rollbacks are written (NOSPACE, or above the high-water mark)",
        )
        self.compactions = Counter(
            "xds_etcd_compactions", "Compactions this replica made", registry=registry
        )
        self.defrags = Counter(
            "xds_etcd_defrags", "Member defragmentations this replica made", registry=registry
        )

    def show(self, status: EtcdStatus, options: MaintenanceOptions) -> None:
        self.quota.set(options.quota_bytes)
        for m in status.answered:
            self.db_size.labels(m.endpoint).set(m.db_size)
            self.in_use.labels(m.endpoint).set(m.in_use)
        if status.answered:
            self.revision.set(status.revision)
            for kind in ALARMS:
                self.alarm.labels(kind).set(1 if status.raised(kind) else 0)
        if status.keys >= 0:
            self.keys.set(status.keys)
        self.held.set(0 if writes_held(status, options) is None else 1)


class StoreMaintainer:
    """Polls etcd every `options.interval` (at once when `poke`d); leads its upkeep
    while this replica holds the fence. `admit` is the store's write gate."""

    def __init__(
        self,
        store: EtcdStore,
        options: MaintenanceOptions,
        metrics: EtcdMetrics | None = None,
        channel: Callable[[str], grpc.aio.Channel] | None = None,
    ) -> None:
        """`channel`: a channel to one member (HOST:PORT); default: as the store's
        address says (TLS, a login: `member_channel`)."""
        self.store = store
        self._dial = channel or (lambda endpoint: member_channel(store.address, endpoint))
        self.options = options
        self.metrics = metrics
        self.status: EtcdStatus | None = None
        self.revisions = RevisionClock(options)
        self.defrags = Defrags()
        self.recovery = Recovery()
        self.narrator = Narrator()
        self.last_compaction: Done | None = None
        self.last_defrag: Done | None = None
        self.last_recovery = ""
        """What the last NOSPACE recovery did, in one line."""
        self.rollbacks_waiting = 0
        """Rollbacks the leader pushed but could not write (`store_health`)."""
        self.defrag_refused = ""
        """Why etcd refuses to defragment to this process's user; "": it does not."""
        self.room_made: list[Callable[[], None]] = []
        """Told once NOSPACE is disarmed: the leader writes what it pushed meanwhile."""
        self._polled = 0.0
        self._poke: asyncio.Event | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.endpoints = [f"{h}:{p}" for h, p in store.address.endpoints]

    @property
    def leads(self) -> bool:
        return self.store.fence is not None

    # ---- what others call ----

    def admit(self, critical: bool) -> str | None:
        """Why a write may not go ahead now (None: it may). Rollbacks always may; the
        rest wait while NOSPACE is raised or the store is above its high-water mark, as
        of a poll at most a few intervals old."""
        if critical or time.monotonic() - self._polled > 5 * self.options.interval + 2:
            return None
        return writes_held(self.status, self.options)

    def poke(self) -> None:
        """Poll now (a write was refused for NOSPACE)."""
        if self._poke is not None:
            self._poke.set()

    def store_health(self, health: StoreHealth) -> None:
        """The leader's writes (`CommitLog`): a refusal for NOSPACE is acted on at once,
        not at the next poll; a rollback kept unsaved makes room-making urgent."""
        self.rollbacks_waiting = health.unsaved_rollbacks
        if is_nospace(health.error):
            self.poke()

    # ---- the loop ----

    async def run(self) -> None:
        """Until cancelled: poll, report, and (leading) keep etcd bounded."""
        self._poke = asyncio.Event()
        try:
            while True:
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("etcd upkeep failed; again at the next poll")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.options.interval):  # the poll period
                        await self._poke.wait()
                self._poke.clear()
        finally:
            await self.close()

    async def step(self) -> EtcdStatus:
        status = await self.poll()
        if self.leads and status.answered:
            await self.maintain(status)
        return self.status or status

    async def poll(self) -> EtcdStatus:
        """Every member's status, the alarms and the prefix's keys, now; reported."""
        members = await asyncio.gather(*(self._member(e) for e in self.endpoints))
        alarms = self.status.alarms if self.status else ()
        keys, errors = -1, []
        answering = [m.endpoint for m in members if m.answered]
        if answering:
            try:
                alarms = await self._alarms(answering[0])
            except grpc.RpcError as exc:  # (unknown: the last ones stand)
                errors.append(f"alarms: {why_left(exc)}")
            try:
                keys = await self._keys(answering[0])
            except grpc.RpcError as exc:
                errors.append(f"keys: {why_left(exc)}")
        status = EtcdStatus(time.time(), tuple(members), alarms, keys, "; ".join(errors))
        self.revisions.note(time.monotonic(), status.revision)
        self._report(status)
        return status

    async def maintain(self, status: EtcdStatus) -> None:
        """The leader's upkeep after a poll: room after NOSPACE first; else compaction
        by the retention, then a defragmentation that is due."""
        now = time.monotonic()
        if self.recovery.due(status, now, urgent=self.rollbacks_waiting > 0):
            await self.make_room(status)
            return
        if (target := self.revisions.due(now)) is not None:
            await self.compact(target)
        for endpoint in self.defrags.due(status, self.options, now):
            await self.defrag(endpoint)

    async def make_room(self, status: EtcdStatus) -> bool:
        """NOSPACE: compact to the current revision, defragment every member, and disarm
        the alarm once there is room; then tell `room_made` (rollbacks first)."""
        started = time.monotonic()
        before = status.db_size
        log.warning(
            "etcd is out of space: compacting to revision %d, defragmenting %d member(s)",
            status.revision,
            len(status.answered),
        )
        await self.compact(status.revision)
        for m in sorted(status.answered, key=lambda m: m.raft_leader):
            await self.defrag(m.endpoint)
        after = await self.poll()
        took = time.monotonic() - started
        if not room_made(after, self.options):
            self.recovery.done(after, self.options, time.monotonic(), disarmed=False)
            self.last_recovery = (
                f"no room made at {time.strftime('%H:%M:%S')}: {size(after.in_use)} of data in "
                f"use against a {size(self.options.quota_bytes)} quota; delete data or raise "
                "the quota (rollbacks are pushed meanwhile, written once there is room)"
                if not self.defrag_refused
                else f"no room made at {time.strftime('%H:%M:%S')}: {self.defrag_refused}"
            )
            log.error("etcd: %s", self.last_recovery)
            return False
        try:
            await self.disarm([a for a in after.alarms if a.kind == NOSPACE])
        except grpc.RpcError as exc:
            log.warning("etcd: NOSPACE could not be disarmed: %s", why_left(exc))
            self.recovery.done(after, self.options, time.monotonic(), disarmed=False)
            return False
        self.recovery.done(after, self.options, time.monotonic(), disarmed=True)
        self.last_recovery = (
            f"room made at {time.strftime('%H:%M:%S')} in {took:.2f}s: "
            f"{size(before)} -> {size(after.db_size)}, NOSPACE disarmed"
        )
        log.warning("etcd: %s", self.last_recovery)
        for listener in list(self.room_made):
            try:
                listener()
            except Exception:
                log.exception("a listener of etcd's room failed; continuing")
        await self.poll()
        return True

    # ---- etcd ----

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        if endpoint not in self._channels:
            self._channels[endpoint] = self._dial(endpoint)
        return self._channels[endpoint]

    async def _member(self, endpoint: str) -> MemberStatus:
        stub = rpc.MaintenanceStub(self._channel(endpoint))
        try:
            got = await stub.Status(rpc.StatusRequest(), timeout=STATUS_TIMEOUT)
        except grpc.RpcError as exc:
            return MemberStatus(endpoint, error=why_left(exc))
        return MemberStatus(
            endpoint,
            member_id=got.header.member_id,
            db_size=got.dbSize,
            in_use=got.dbSizeInUse,
            revision=got.header.revision,
            raft_leader=got.leader == got.header.member_id,
        )

    async def _alarms(self, endpoint: str) -> tuple[Alarm, ...]:
        """etcd's alarms, every member's, as the cluster agreed them."""
        got = await rpc.MaintenanceStub(self._channel(endpoint)).Alarm(
            rpc.AlarmRequest(action=rpc.AlarmRequest.GET), timeout=STATUS_TIMEOUT
        )
        return tuple(
            Alarm(a.memberID, ALARM_NAMES.get(a.alarm, str(a.alarm)))
            for a in got.alarms
            if a.alarm != rpc.AlarmType.Value("NONE")
        )

    async def _keys(self, endpoint: str) -> int:
        """The keys under the prefix (a serializable count: no round of the raft group)."""
        prefix = self.store.keys.everything
        request = rpc.RangeRequest(
            key=prefix.encode(), range_end=range_end(prefix), count_only=True, serializable=True
        )
        counted = await rpc.KVStub(self._channel(endpoint)).Range(request, timeout=STATUS_TIMEOUT)
        return int(counted.count)

    def _any(self) -> str:
        """A member that answered the last poll (else the first)."""
        answered = self.status.answered if self.status else ()
        return answered[0].endpoint if answered else self.endpoints[0]

    async def compact(self, revision: int) -> bool:
        """Compact etcd's history below `revision` (physical: returns once freed)."""
        if revision <= self.revisions.compacted:
            return False
        started = time.monotonic()
        request = rpc.CompactionRequest(revision=revision, physical=True)
        try:
            await rpc.KVStub(self._channel(self._any())).Compact(request, timeout=COMPACT_TIMEOUT)
        except grpc.RpcError as exc:
            if "required revision has been compacted" in (_details(exc)):
                self.revisions.done(revision)  # (someone else compacted further)
                return False
            log.warning("etcd compaction to revision %d failed: %s", revision, why_left(exc))
            return False
        took = time.monotonic() - started
        self.revisions.done(revision)
        self.last_compaction = Done(time.time(), f"to revision {revision}", took)
        if self.metrics is not None:
            self.metrics.compactions.inc()
            self.metrics.compacted.set(revision)
        log.log(
            logging.INFO if took >= 1.0 else logging.DEBUG,
            "compacted etcd to revision %d in %.3fs",
            revision,
            took,
        )
        return True

    async def defrag(self, endpoint: str) -> bool:
        """Defragment one member (it is blocked meanwhile: one at a time)."""
        before = (
            next((m for m in self.status.answered if m.endpoint == endpoint), None)
            if self.status
            else None
        )
        started = time.monotonic()
        self.defrags.last[endpoint] = started
        stub = rpc.MaintenanceStub(self._channel(endpoint))
        try:
            await stub.Defragment(rpc.DefragmentRequest(), timeout=DEFRAG_TIMEOUT)
        except grpc.RpcError as exc:
            self._defrag_failed(endpoint, exc)
            return False
        took = time.monotonic() - started
        after = await self._member(endpoint)
        was = size(before.db_size) if before else "?"
        self.last_defrag = Done(time.time(), f"{endpoint}: {was} -> {size(after.db_size)}", took)
        if self.metrics is not None:
            self.metrics.defrags.inc()
        log.info("defragmented etcd member %s in %.2fs", self.last_defrag.what, took)
        return True

    def _defrag_failed(self, endpoint: str, exc: grpc.RpcError) -> None:
        """One line; etcd refusing it to this user says what to do, once."""
        if "permission denied" not in _details(exc):
            log.warning("etcd member %s: defragmentation failed: %s", endpoint, why_left(exc))
            return
        user = self.store.address.security.describe_user()
        refused = (
            f"etcd refuses to defragment to {user}: it needs etcd's root role (grant it, or "
            "run `etcdctl defrag` on each member when etcd is near its quota); compaction "
            "still bounds the history"
        )
        if self.defrag_refused != refused:
            log.error("%s", refused)
        self.defrag_refused = refused

    async def disarm(self, alarms: list[Alarm]) -> None:
        for a in alarms:
            request = rpc.AlarmRequest(
                action=rpc.AlarmRequest.DEACTIVATE,
                memberID=a.member_id,
                alarm=rpc.AlarmType.Value(a.kind),
            )
            await rpc.MaintenanceStub(self._channel(self._any())).Alarm(
                request, timeout=STATUS_TIMEOUT * 2
            )

    def _report(self, status: EtcdStatus) -> None:
        self.status, self._polled = status, time.monotonic()
        for level, line in self.narrator.lines(status, self.options):
            log.log(level, "%s", line)
        if self.metrics is not None:
            self.metrics.show(status, self.options)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


def member_channel(address: EtcdAddress, endpoint: str) -> grpc.aio.Channel:
    """A channel to one member, as the replicas' clients reach etcd: over TLS naming
    the host as `--store` wrote it, with the login's token on every call."""
    security = address.security
    hosts = [f"{h}:{p}" for h, p in address.endpoints]
    names = address.names or tuple(h for h, _ in address.endpoints)
    name = names[hosts.index(endpoint)] if endpoint in hosts else endpoint.rpartition(":")[0]
    auth = TokenInterceptor(address.token) if address.token.login else None
    channel = security.aio_channel(endpoint, name, [], auth.interceptors() if auth else [])
    if auth is not None:
        auth.bind(channel)
    return channel


def _details(exc: Any) -> str:
    details = getattr(exc, "details", None)
    return str(details() if callable(details) else exc)
