"""Bounded etcd (issue 30): the policy of `ha/maintenance.py` alone, then the leader's
upkeep (`ha/maintainer.py`) against a real one-member etcd started with a 2 MiB
`--quota-backend-bytes`: compaction by the retention, NOSPACE seen and reported, room
made and a rollback written first, a store full of live data left alarmed until data
goes. (End to end, with replicas, Envoys and a failing canary: tests/test_ha_nospace.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from aetcd import rpc
from prometheus_client import CollectorRegistry

from tests.support import wait_for_async
from tests.test_etcd_store import Replica, replica, started
from xds_server.ha.maintainer import EtcdMetrics, StoreMaintainer
from xds_server.ha.maintenance import (
    CORRUPT,
    NOSPACE,
    Alarm,
    Defrags,
    EtcdStatus,
    MaintenanceOptions,
    MemberStatus,
    Narrator,
    Recovery,
    RevisionClock,
    defrag_due,
    is_nospace,
    room_made,
    writes_held,
)
from xds_server.lab.etcd import EtcdCluster
from xds_server.rollout import decide as sm
from xds_server.rollout.audit import transition_entry
from xds_server.rollout.commits import StoreHealth
from xds_server.rollout.ports import StoreWriteError

MIB = 1024**2
QUOTA = 2 * MIB
OPTIONS = MaintenanceOptions(retention=60.0, quota_bytes=100 * MIB)


def status(
    *sizes: tuple[int, int], alarms: tuple[Alarm, ...] = (), revision: int = 10
) -> EtcdStatus:
    """A poll's result: (db size, in use) per member, in MiB."""
    members = tuple(
        MemberStatus(f"m{i}:2379", i + 1, db * MIB, used * MIB, revision, raft_leader=i == 0)
        for i, (db, used) in enumerate(sizes)
    )
    return EtcdStatus(0.0, members, alarms, keys=7)


# ---- the policy ----


def test_compaction_targets_the_newest_revision_older_than_the_retention() -> None:
    clock = RevisionClock(MaintenanceOptions(retention=60.0, interval=1.0))
    assert clock.options.sample_every == 6.0  # a tenth of the retention
    for t in range(0, 200):
        clock.note(float(t), 1000 + 10 * t)
    assert [t for t, _ in clock.samples][:3] == [0.0, 6.0, 12.0]
    assert clock.due(59.0) is None  # nothing noted 60 s ago yet
    assert clock.due(150.0) == 1000 + 10 * 90  # the sample at t=90
    clock.done(1900)
    assert clock.due(150.0) is None and clock.samples[0][1] > 1900
    assert clock.due(300.0) == 1000 + 10 * 198
    never = RevisionClock(MaintenanceOptions(retention=0))
    never.note(0.0, 5)
    assert never.due(1e9) is None
    assert MaintenanceOptions(retention=3600).sample_every == 60.0
    assert MaintenanceOptions(retention=2, interval=0.5).sample_every == 0.5


def test_above_the_high_water_mark_or_at_nospace_only_rollbacks_are_written() -> None:
    assert writes_held(None, OPTIONS) is None
    assert writes_held(status((89, 50), (70, 50)), OPTIONS) is None
    held = writes_held(status((20, 20), (91, 80)), OPTIONS)
    assert held is not None and "91% of its 100.0 MiB quota" in held and "rollbacks" in held
    nospace = writes_held(status((20, 20), alarms=(Alarm(1, NOSPACE),)), OPTIONS)
    assert nospace is not None and nospace.startswith("etcd raised NOSPACE")
    assert writes_held(status((20, 20), alarms=(Alarm(1, CORRUPT),)), OPTIONS) is None
    nobody = EtcdStatus(0.0, (MemberStatus("m:1", error="UNAVAILABLE"),))
    assert writes_held(nobody, OPTIONS) is None  # nothing known: etcd itself will say


def test_defragmentation_only_when_it_takes_back_enough() -> None:
    def member(db: int, used: int) -> MemberStatus:
        return MemberStatus("m:1", 1, db * MIB, used * MIB)

    assert not defrag_due(member(40, 5), OPTIONS)  # a small file: leave it
    assert defrag_due(member(60, 25), OPTIONS)  # past half the quota, half of it free
    assert not defrag_due(member(60, 40), OPTIONS)
    assert defrag_due(member(92, 85), OPTIONS)  # at the gate: 7 MiB is worth it
    assert not defrag_due(member(92, 90), OPTIONS)
    defrags = Defrags()
    two = status((60, 20), (60, 20))
    assert defrags.due(two, OPTIONS, 0.0) == ["m1:2379", "m0:2379"]  # the raft leader last
    defrags.last["m1:2379"] = 0.0
    assert defrags.due(two, OPTIONS, 10.0) == ["m0:2379"]


def test_nospace_is_disarmed_only_with_room_and_a_failed_recovery_waits() -> None:
    assert room_made(status((50, 50), (94, 94)), OPTIONS)
    assert not room_made(status((50, 50), (96, 96)), OPTIONS)
    recovery = Recovery()
    full = status((101, 101), alarms=(Alarm(1, NOSPACE),), revision=10)
    assert recovery.due(full, 0.0)
    # No room found (the data fills the quota): not every second; soon once deleted.
    recovery.done(full, OPTIONS, 0.0, disarmed=False)
    assert not recovery.due(full, 5.0) and not recovery.due(full, 5.0, urgent=True)
    assert recovery.due(full, 31.0)
    deleted = status((101, 60), alarms=(Alarm(1, NOSPACE),), revision=11)
    assert not recovery.due(deleted, 0.5) and recovery.due(deleted, 1.0)
    # Room made, little of it (93%): the alarm comes back as writes go in; again only
    # for a rollback that waits.
    recovery.done(status((93, 93), revision=12), OPTIONS, 0.0, disarmed=True)
    again = status((100, 93), alarms=(Alarm(1, NOSPACE),), revision=30)
    assert not recovery.due(again, 2.0) and recovery.due(again, 2.0, urgent=True)
    # Room made, plenty: a new NOSPACE is met at once.
    recovery.done(status((5, 5), revision=12), OPTIONS, 0.0, disarmed=True)
    assert recovery.due(again, 0.1)
    assert not Recovery().due(status((101, 101)), 0.0)  # no alarm, nothing to recover


def test_log_lines_come_once_per_change_that_matters() -> None:
    narrator = Narrator()
    first = narrator.lines(status((10, 5)), OPTIONS)
    assert [level for level, _ in first] == [logging.INFO]
    assert first[0][1] == (
        "etcd's database is 10.0 MiB of its 100.0 MiB quota (10%; 5.0 MiB in use), "
        "7 keys, revision 10"
    )
    assert narrator.lines(status((11, 5)), OPTIONS) == []  # the same tenth
    alarm = (Alarm(0xABC, NOSPACE),)
    lines = narrator.lines(status((100, 99), alarms=alarm), OPTIONS)
    assert [level for level, _ in lines] == [logging.ERROR, logging.WARNING, logging.WARNING]
    assert lines[0][1].startswith("etcd raised NOSPACE on member abc: every write is refused")
    assert lines[2][1].startswith("etcd raised NOSPACE (100.0 MiB")
    assert narrator.lines(status((100, 99), alarms=alarm), OPTIONS) == []
    lines = narrator.lines(status((1, 1)), OPTIONS)
    assert next(text for _, text in lines) == "etcd's NOSPACE alarm on member abc is cleared"
    assert lines[-1][1] == "etcd has room again: every write goes ahead"


def test_nospace_is_recognised_in_a_write_error() -> None:
    assert is_nospace("RESOURCE_EXHAUSTED: etcdserver: mvcc: database space exceeded")
    assert not is_nospace("UNAVAILABLE: etcdserver: leader changed")

    class Refused:
        def details(self) -> str:
            return "etcdserver: mvcc: database space exceeded"

    assert is_nospace(Refused())


# ---- against a real etcd with a small quota ----


@pytest.fixture(scope="module")
def small_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member, 2 MiB of quota: filled in a fraction of a second. Each test leaves it
    empty and without alarms (`reset`)."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), members=1, quota_bytes=QUOTA) as cluster:
        yield cluster


def endpoint(etcd: EtcdCluster) -> str:
    return etcd.members[0].client_address


async def fill(etcd: EtcdCluster, prefix: str, *, live: bool) -> int:
    """Write 64 KiB values under `prefix` until etcd refuses for NOSPACE: one key
    rewritten (history, which compaction frees), or new keys (`live`: data it cannot).
    How many writes went in."""
    async with grpc.aio.insecure_channel(endpoint(etcd)) as channel:
        kv = rpc.KVStub(channel)
        for n in range(1000):
            key = f"{prefix}/{n if live else 0}".encode()
            try:
                await kv.Put(rpc.PutRequest(key=key, value=b"x" * 65536), timeout=5)
            except grpc.aio.AioRpcError as exc:
                assert is_nospace(exc), exc
                return n
    raise AssertionError("etcd never refused a write: is the quota set?")


async def reset(etcd: EtcdCluster) -> None:
    """Disarmed (etcd refuses even deletions while CORRUPT), everything deleted,
    compacted and defragmented."""
    async with grpc.aio.insecure_channel(endpoint(etcd)) as channel:
        kv, maintenance = rpc.KVStub(channel), rpc.MaintenanceStub(channel)
        alarms = await maintenance.Alarm(rpc.AlarmRequest(action=rpc.AlarmRequest.GET))
        for a in alarms.alarms:
            await maintenance.Alarm(
                rpc.AlarmRequest(
                    action=rpc.AlarmRequest.DEACTIVATE, memberID=a.memberID, alarm=a.alarm
                )
            )
        deleted = await kv.DeleteRange(rpc.DeleteRangeRequest(key=b"\0", range_end=b"\0"))
        with contextlib.suppress(grpc.aio.AioRpcError):  # (compacted there already)
            await kv.Compact(rpc.CompactionRequest(revision=deleted.header.revision, physical=True))
        await maintenance.Defragment(rpc.DefragmentRequest())


@contextlib.asynccontextmanager
async def leader(
    etcd: EtcdCluster, prefix: str, retention: float = 3600.0
) -> AsyncIterator[tuple[Replica, StoreMaintainer, CollectorRegistry]]:
    """An elected replica's store, its maintainer (with its metrics) as `serve` wires
    them, not running: the test steps it."""
    rep = await replica(etcd.url, prefix, "r1", ttl=5.0)
    registry = CollectorRegistry()
    options = MaintenanceOptions(retention=retention, quota_bytes=QUOTA, interval=0.1)
    maintainer = StoreMaintainer(rep.store, options, EtcdMetrics(registry))
    rep.store.admit = maintainer.admit
    rep.run()
    rep.watch()
    try:
        await wait_for_async(lambda: rep.elected, "the replica to lead", timeout=10)
        yield rep, maintainer, registry
    finally:
        await maintainer.close()
        await rep.close()
        await reset(etcd)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels or None)


def test_the_leader_compacts_revisions_older_than_the_retention(small_etcd: EtcdCluster) -> None:
    async def scenario() -> None:
        async with leader(small_etcd, "/compaction", retention=0.5) as (rep, maintainer, registry):
            client = rep.store.client
            for i in range(300):  # (history: one key rewritten)
                await client.put(b"/compaction/churn", str(i).encode())
            first = await maintainer.step()
            old = first.revision
            assert first.keys >= 2 and not first.alarms  # the leader key, churn
            assert sample(registry, "xds_etcd_revision") == old
            # Once `old` is half a second old it is compacted away, and nothing newer.
            await wait_for_async_step(maintainer, lambda: maintainer.revisions.compacted >= old)
            async with grpc.aio.insecure_channel(endpoint(small_etcd)) as channel:
                request = rpc.RangeRequest(key=b"/compaction/churn", revision=old - 1)
                with pytest.raises(grpc.aio.AioRpcError, match="has been compacted"):
                    await rpc.KVStub(channel).Range(request)
                request = rpc.RangeRequest(key=b"/compaction/churn", revision=old)
                assert (await rpc.KVStub(channel).Range(request)).kvs  # (kept: not older)
            assert sample(registry, "xds_etcd_compactions_total") >= 1
            assert sample(registry, "xds_etcd_compacted_revision") >= old
            assert maintainer.last_compaction is not None

    asyncio.run(scenario())


async def wait_for_async_step(
    maintainer: StoreMaintainer, done: object, timeout: float = 10.0
) -> None:
    """Step the maintainer (a poll, then the leader's upkeep) until `done()`."""
    assert callable(done)
    async with asyncio.timeout(timeout):
        while not done():
            await maintainer.step()
            await asyncio.sleep(0.05)  # the poll period


def test_nospace_is_seen_reported_and_room_is_made_for_the_rollback_first(
    small_etcd: EtcdCluster,
) -> None:
    async def scenario() -> None:
        async with leader(small_etcd, "/nospace") as (rep, maintainer, registry):
            store = rep.store
            state, entries = started()
            store.record(state, entries, regions=["us-east", "eu-west"])
            written = await fill(small_etcd, "/elsewhere", live=False)
            seen = await maintainer.poll()
            # Seen, reported: the alarm, its metric, writes held.
            assert seen.raised(NOSPACE), seen
            assert sample(registry, "xds_etcd_alarm", alarm="NOSPACE") == 1
            assert sample(registry, "xds_etcd_alarm", alarm="CORRUPT") == 0
            assert sample(registry, "xds_etcd_writes_held") == 1
            assert sample(registry, "xds_etcd_db_size_bytes", member=endpoint(small_etcd)) >= QUOTA
            # A step forward is not written (held here); a rollback is tried, and etcd
            # refuses it (NOSPACE): the controller pushes it and keeps it.
            forward = sm.pause(state, 20.0, "operator")
            with pytest.raises(StoreWriteError, match="only rollbacks are written"):
                store.record(forward.state, [], regions=[])
            back = sm.rollback(state, 21.0, "canary failed in us-east")
            rollback_entries = [
                transition_entry(back.state, t, 21.0, None, None, None, None)
                for t in back.transitions
            ]
            with pytest.raises(StoreWriteError, match="database space exceeded"):
                store.record(back.state, rollback_entries, critical=True, regions=["us-east"])
            # The leader makes room (compaction to now, defragmentation, disarm), then
            # the rollback is written before anything else.
            written_after: list[str] = []

            def write_rollback() -> None:
                store.record(back.state, rollback_entries, critical=True, regions=["us-east"])
                written_after.append(back.state.phase)

            maintainer.room_made.append(write_rollback)
            await maintainer.maintain(seen)
            assert written_after == [back.state.phase]
            assert store.rollout(state.service, state.canary_version) == back.state
            assert not maintainer.status.alarms
            assert sample(registry, "xds_etcd_alarm", alarm="NOSPACE") == 0
            assert sample(registry, "xds_etcd_writes_held") == 0
            assert maintainer.status.db_size < QUOTA / 4
            assert "NOSPACE disarmed" in maintainer.last_recovery
            assert sample(registry, "xds_etcd_defrags_total") == 1
            print(f"\n{written} writes of 64 KiB to NOSPACE; {maintainer.last_recovery}")

    asyncio.run(scenario())


def test_a_store_full_of_live_data_stays_alarmed_until_data_goes(small_etcd: EtcdCluster) -> None:
    async def scenario() -> None:
        async with leader(small_etcd, "/live") as (rep, maintainer, _registry):
            await fill(small_etcd, "/junk", live=True)
            seen = await maintainer.poll()
            assert seen.raised(NOSPACE)
            assert not await maintainer.make_room(seen)
            assert maintainer.status.raised(NOSPACE)
            assert maintainer.last_recovery.startswith("no room made")
            assert "delete data or raise the quota" in maintainer.last_recovery
            # Not again at every poll ...
            before = maintainer.defrags.last.copy()
            await maintainer.step()
            assert maintainer.defrags.last == before
            # ... but once an operator deletes data (a deletion is a revision).
            await rep.store.client.delete_prefix(b"/junk/")
            await wait_for_async_step(maintainer, lambda: not maintainer.status.raised(NOSPACE))
            assert "NOSPACE disarmed" in maintainer.last_recovery

    asyncio.run(scenario())


def test_a_write_refused_for_nospace_polls_at_once(small_etcd: EtcdCluster) -> None:
    async def scenario() -> None:
        async with leader(small_etcd, "/poke") as (_rep, maintainer, _registry):
            slow = MaintenanceOptions(retention=3600.0, quota_bytes=QUOTA, interval=30.0)
            maintainer.options = slow
            task = asyncio.get_running_loop().create_task(maintainer.run())
            await wait_for_async(lambda: maintainer.status, "the first poll", timeout=5)
            await fill(small_etcd, "/elsewhere", live=False)
            polled = maintainer.status.at
            error = "RESOURCE_EXHAUSTED: etcdserver: mvcc: database space exceeded"
            maintainer.store_health(StoreHealth(ok=False, error=error, unsaved_rollbacks=1))
            # Made room well before the 30 s interval would have polled again.
            await wait_for_async(
                lambda: "disarmed" in maintainer.last_recovery, "room made", timeout=10
            )
            assert maintainer.status.at > polled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_corrupt_is_reported_and_left_to_an_operator(small_etcd: EtcdCluster) -> None:
    async def scenario() -> None:
        async with leader(small_etcd, "/corrupt") as (_rep, maintainer, registry):
            member = (await maintainer.poll()).members[0].member_id
            async with grpc.aio.insecure_channel(endpoint(small_etcd)) as channel:
                corrupt = rpc.AlarmType.Value("CORRUPT")
                request = rpc.AlarmRequest(
                    action=rpc.AlarmRequest.ACTIVATE, memberID=member, alarm=corrupt
                )
                await rpc.MaintenanceStub(channel).Alarm(request)  # (as etcd's check would)
            status = await maintainer.step()
            assert [a.kind for a in status.alarms] == [CORRUPT]
            assert sample(registry, "xds_etcd_alarm", alarm="CORRUPT") == 1
            assert sample(registry, "xds_etcd_alarm", alarm="NOSPACE") == 0
            assert maintainer.last_recovery == ""  # (never disarmed here)
            assert [a.kind for a in (await maintainer.step()).alarms] == [CORRUPT]

    asyncio.run(scenario())
