"""Bounded etcd (issue 30), measured against a real one-member etcd on loopback, through
the replicas' own `StoreMaintainer` (`ha/maintainer.py`):

- `alarm`: from etcd's first refusal of a write (NOSPACE raised) to the maintainer's
  status showing the alarm: by its poll alone (every STATUS_INTERVAL), and when the
  leader's refused write pokes it (`store_health`, as `serve` wires it);
- `compaction`: the time to compact (physical) a store holding N revisions of the
  replicas' kind of writes (a key rewritten, 1.4 KiB each), and to defragment it after;
- `growth`: the database over a run of the replicas' write pattern (two replicas'
  keys rewritten every 0.1 s, a rollout's state and routes every second), with the
  leader's compaction at a short retention and without any.

    python benchmarks/etcd_upkeep.py [--runs 5] [--revisions 1000,5000,20000]
                                     [--seconds 60] [--retention 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from aetcd import rpc

from xds_server.ha.etcd import async_client, parse_store_url
from xds_server.ha.maintainer import StoreMaintainer
from xds_server.ha.maintenance import MaintenanceOptions, size
from xds_server.ha.store import EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.rollout.commits import StoreHealth

QUOTA = 64 * 1024**2
PREFIX = "/bench/upkeep"
NOSPACE = "RESOURCE_EXHAUSTED: etcdserver: mvcc: database space exceeded"


def maintainer(url: str, retention: float = 3600.0, interval: float = 1.0) -> StoreMaintainer:
    address = parse_store_url(url, PREFIX)
    store = EtcdStore(address, async_client(address))
    store.fence = 1  # (leads: the upkeep is the leader's)
    options = MaintenanceOptions(retention=retention, quota_bytes=QUOTA, interval=interval)
    return StoreMaintainer(store, options)


async def close(m: StoreMaintainer) -> None:
    await m.close()
    await m.store.client.close()


async def fill(kv: rpc.KVStub) -> float:
    """Rewrite one key with 256 KiB values until etcd refuses: when it did (monotonic)."""
    while True:
        try:
            await kv.Put(rpc.PutRequest(key=b"/bench/junk", value=b"x" * 262144), timeout=5)
        except grpc.aio.AioRpcError:
            return time.monotonic()


async def alarm_latency(url: str, endpoint: str, poke: bool) -> float:
    """One NOSPACE: seconds from the refusal to the alarm in the maintainer's status."""
    m = maintainer(url)
    m.room_made.clear()
    async with grpc.aio.insecure_channel(endpoint) as channel:
        await m.poll()
        task = asyncio.get_running_loop().create_task(m.run())
        try:
            await asyncio.sleep(0.1 + (time.monotonic() % 1.0))  # (a random phase of the poll)
            refused = await fill(rpc.KVStub(channel))
            if poke:
                m.store_health(StoreHealth(ok=False, error=NOSPACE, unsaved_rollbacks=1))
            while not (m.status and m.status.raised("NOSPACE")):
                await asyncio.sleep(0.001)  # (the measurement's resolution)
            seen = time.monotonic() - refused
            while m.status.raised("NOSPACE"):  # (the leader makes room)
                await asyncio.sleep(0.01)
            return seen
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await close(m)


async def compaction(url: str, endpoint: str, revisions: int) -> tuple[float, float, int, int]:
    """(compaction seconds, defragmentation seconds, db size before, after)."""
    m = maintainer(url)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        kv = rpc.KVStub(channel)
        value = b"y" * 1400
        for _ in range(revisions):
            await kv.Put(rpc.PutRequest(key=f"{PREFIX}/replicas/r1".encode(), value=value))
        status = await m.poll()
        before = status.db_size
        started = time.monotonic()
        await m.compact(status.revision)
        compacted = time.monotonic() - started
        started = time.monotonic()
        await m.defrag(endpoint)
        defragged = time.monotonic() - started
        after = (await m.poll()).db_size
    await close(m)
    return compacted, defragged, before, after


async def growth(url: str, endpoint: str, seconds: float, retention: float | None) -> list[int]:
    """The db size every tenth of the run, under the replicas' write pattern; the leader
    compacts at `retention` (None: never)."""
    m = maintainer(url, retention or 0.0, interval=min(1.0, (retention or 10) / 10))
    task = asyncio.get_running_loop().create_task(m.run())
    sizes = []
    async with grpc.aio.insecure_channel(endpoint) as channel:
        kv = rpc.KVStub(channel)
        started, ticks = time.monotonic(), 0
        while (elapsed := time.monotonic() - started) < seconds:
            for r in ("r1", "r2"):  # each replica's key, rewritten (ACKs, heartbeats)
                await kv.Put(
                    rpc.PutRequest(key=f"{PREFIX}/replicas/{r}".encode(), value=b"n" * 2048)
                )
            if ticks % 10 == 0:  # a decision a second: the state and a region's routes
                await kv.Put(
                    rpc.PutRequest(key=f"{PREFIX}/rollouts/svc/v2".encode(), value=b"s" * 1024)
                )
                await kv.Put(rpc.PutRequest(key=f"{PREFIX}/routes/us-east".encode(), value=b"1"))
            if ticks % max(1, int(seconds)) == 0:
                sizes.append((await m.poll()).db_size)
            ticks += 1
            await asyncio.sleep(max(0.0, ticks * 0.1 - elapsed))  # the write pattern's pace
        sizes.append((await m.poll()).db_size)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await close(m)
    return sizes


async def reset(endpoint: str) -> None:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        kv, maint = rpc.KVStub(channel), rpc.MaintenanceStub(channel)
        gone = await kv.DeleteRange(rpc.DeleteRangeRequest(key=b"\0", range_end=b"\0"))
        with contextlib.suppress(grpc.aio.AioRpcError):  # (compacted there already)
            await kv.Compact(rpc.CompactionRequest(revision=gone.header.revision, physical=True))
        await maint.Defragment(rpc.DefragmentRequest())
        alarms = await maint.Alarm(rpc.AlarmRequest(action=rpc.AlarmRequest.GET))
        for a in alarms.alarms:
            request = rpc.AlarmRequest(
                action=rpc.AlarmRequest.DEACTIVATE, memberID=a.memberID, alarm=a.alarm
            )
            await maint.Alarm(request)


async def run(args: argparse.Namespace, url: str, endpoint: str) -> None:
    for poke in (False, True):
        seen = []
        for _ in range(args.runs):
            seen.append(await alarm_latency(url, endpoint, poke))
            await reset(endpoint)
        how = "a refused write pokes the poll" if poke else "the poll alone (every 1 s)"
        print(f"alarm seen, {how}: median {statistics.median(seen):.3f}s, "
              f"max {max(seen):.3f}s over {len(seen)} NOSPACEs")  # fmt: skip
    for n in (int(x) for x in args.revisions.split(",")):
        compacted, defragged, before, after = await compaction(url, endpoint, n)
        print(f"compaction of {n:,} revisions (1.4 KiB each): {compacted * 1000:.1f} ms; "
              f"defragmentation after: {defragged * 1000:.1f} ms "
              f"({size(before)} -> {size(after)})")  # fmt: skip
        await reset(endpoint)
    for retention in (args.retention, None):
        sizes = await growth(url, endpoint, args.seconds, retention)
        label = f"compaction at {retention:g}s retention" if retention else "no compaction"
        print(f"growth over {args.seconds:g}s, {label}: " + " ".join(size(s) for s in sizes))
        await reset(endpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--revisions", default="1000,5000,20000")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--retention", type=float, default=10.0)
    args = parser.parse_args()
    logging.getLogger("xds_server").setLevel(logging.CRITICAL)  # (the figures only)
    with (
        tempfile.TemporaryDirectory() as tmp,
        EtcdCluster(Path(tmp), members=1, quota_bytes=QUOTA) as etcd,
    ):
        asyncio.run(run(args, etcd.url, etcd.members[0].client_address))


if __name__ == "__main__":
    main()
