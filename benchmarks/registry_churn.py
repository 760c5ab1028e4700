"""Registry churn: N registered instances coming and going, three replicas serving them.

A real three-member etcd cluster on loopback, a spec pushed with `xds-server spec push`
whose pools list no `endpoints:` (registry pools: `recommender` production v1 and
canary v2, in `--regions` regions), and three replicas (`xds-server serve --store URL
--replica-id rN`, each serving every region, JSON logs). No Envoy, no Prometheus.

The instances are not processes: this process writes their registry keys itself, as
`xds-server register` would (`Keys.registry`, `instance_to_json`), with aetcd: for each
instance a lease of `--ttl` seconds, granted, then its key put on it; every live lease
renewed every third of the TTL over one LeaseKeepAlive stream. Then:

- wave 0: every instance registers, `--rate` a second (a fleet starting);
- waves 1..`--waves`: `--churn` of the live instances, drawn at random, stop renewing
  (their keys go when etcd expires the lease), and those that stopped in the wave before
  register again (same address, a new lease), spread over the wave (`--wave-seconds`);
- then the last ones to stop expire, and every replica must serve exactly the live set.

Observed: one ADS stream per replica and region (a child process, so this process's
writes do not delay their clocks), subscribed to EDS for every pool's cluster and
ACKing every response at once, notes when each address appears or disappears in each
replica's snapshot of its region; an etcd watch here notes when each key is put and
deleted. Reported:

- registration -> every replica: from the put's return until the address is in the EDS
  of all three replicas (the region's streams), p50/p99/max, for the wave-0 burst and
  for the churn waves, and per replica; split at the push that carried it (the replica
  logs each push with the version its EDS response carries); and how long after the put
  a replica still pushed without it (its view of the store behind etcd);
- expiry -> every replica: from the key's deletion (the lease expired; seen by the watch
  here) until the address is gone from all three; and the lease's end (last keepalive +
  TTL) -> the deletion (etcd's lessor);
- the push rate: pushes per second per replica and region during the churn (the replicas'
  `push ... reason=registry changed` log lines, the EDS responses on the streams, and
  `xds_pushes_total`), against the store's changes a second. Registry changes are
  coalesced for `REGISTRY_COALESCE_SECONDS` (50 ms) and then the publisher's own
  `COALESCE_SECONDS` (5 ms), so a region gets at most ~18 pushes a second whatever the
  churn;
- CPU of every process during the churn (replicas, etcd members, this process, the
  observers), how long each Python process's event loop waited for a CPU (a shared
  machine), etcd's signs of overload, and the mean time to build a push
  (`xds_push_duration_seconds`).

A lease found gone while still renewed (renewals starved of CPU) is reported, and that
instance registers again in the next wave.

`--leases shared`: the keys are put on a few long leases of this process's and an
instance that stops renewing has its key deleted by this process at the moment its own
lease would have run out (its last renewal + TTL), which etcd's watch reports exactly as
an expiry. The replicas see the same puts and deletions; what is not simulated is etcd's
lessor and the renewals' load (one a third of the TTL per instance: 10,000 a second at
10,000 instances and a 3 s TTL, more than one Python process renews on a shared 2-core
machine: ~50-90 us of its CPU each, `grpc.aio` or sync; the leases then run out under
the run and it measures re-registrations). With `--workdir` the replicas' and etcd's
logs stay there, with raw.json: every timestamp behind the figures.

    python benchmarks/registry_churn.py [--instances 1000] [--regions 3] [--ttl 3]
        [--waves 5] [--churn 0.3] [--wave-seconds 5] [--rate 500] [--timeout 60]
        [--leases own|shared] [--seed 1] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import calendar
import collections
import contextlib
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import random
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xds_server.app import REGISTRY_COALESCE_SECONDS
from xds_server.ha.etcd import Keys, async_client, parse_store_url
from xds_server.ha.instances import Instance, instance_to_json
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.layout import DEFAULT_REGIONS
from xds_server.lab.procs import Process, free_port, http_get
from xds_server.xds.publisher import COALESCE_SECONDS

SERVICE = "recommender"
POOLS = {"production": "v1", "canary": "v2"}
CLUSTERS = [f"{SERVICE}|{pool}" for pool in POOLS]
CANARY_EVERY = 5
"""Every fifth instance is v2 (the canary pool); the others v1 (production)."""
REPLICAS = ("r1", "r2", "r3")
CLI = [sys.executable, "-m", "xds_server.cli"]
CONCURRENCY = 64
"""Registrations in flight at once (lease grant, then put)."""
POLL = 0.02
SHARED_LEASE_TTL = 30
"""--leases shared: the TTL of this process's leases (renewed every third of it)."""
SHARED_LEASE_KEYS = 1000
"""--leases shared: keys put on one lease before the next is granted."""
PROGRESS = {"to": sys.stdout}
"""Where the running commentary goes (stderr with --json: stdout is the JSON)."""


def progress(text: str) -> None:
    print(text, file=PROGRESS["to"], flush=True)


def region_names(n: int) -> tuple[str, ...]:
    return tuple((*DEFAULT_REGIONS, *(f"region-{i}" for i in range(4, n + 1)))[:n])


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def stats(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": quantile(values, 0.5),
        "p90": quantile(values, 0.9),
        "p99": quantile(values, 0.99),
        "max": max(values),
    }


# ---- the mesh: etcd, the spec, three replicas ----


def spec_doc(regions: Sequence[str]) -> dict[str, Any]:
    """tests/conftest.py's make_spec_doc without `endpoints:`: registry pools."""
    return {
        "regions": list(regions),
        "listener": {"port": 10000},
        "services": [
            {
                "name": SERVICE,
                "domains": ["*"],
                "prefix": "/",
                "pools": {pool: {"version": version} for pool, version in POOLS.items()},
            }
        ],
    }


@dataclass
class Replica:
    name: str
    process: Process
    xds: int
    metrics: int

    @property
    def log_path(self) -> Path:
        return self.process.log_path


def push_spec(workdir: Path, url: str, regions: Sequence[str]) -> None:
    path = workdir / "mesh.yaml"
    path.write_text(yaml.safe_dump(spec_doc(regions), sort_keys=False))
    argv = [*CLI, "spec", "push", "--spec", str(path), "--store", url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"spec push failed: {done.stderr.strip() or done.stdout.strip()}")


def start_replica(workdir: Path, url: str, name: str) -> Replica:
    """As tests/test_ha_replicas.py starts one, with JSON logs."""
    xds, admin, metrics = free_port(), free_port(), free_port()
    argv = [*CLI, "serve", "--store", url, "--replica-id", name,
            "--xds-address", f"127.0.0.1:{xds}", "--admin-address", f"127.0.0.1:{admin}",
            "--metrics-address", f"127.0.0.1:{metrics}", "--ui-address", "",
            "--prometheus-url", f"http://127.0.0.1:{free_port()}",
            "--log-format", "json"]  # fmt: skip
    return Replica(name, Process(f"replica-{name}", argv, workdir / f"{name}.log"), xds, metrics)


# ---- the observers (a child process): one ADS stream per replica and region ----


Target = tuple[str, int, str]
"""(replica, its xDS port, the region the stream's node is in)."""


def observe(targets: list[Target], out: Any, stop: Any, max_seconds: float) -> None:
    """The child process: every target's stream until `stop` (or `max_seconds`). Puts
    ("synced", i), ("eds", i, time, version, [(cluster, added, removed, total)]) and
    ("error", i, text) on `out`."""
    asyncio.run(_observe_all(targets, out, stop, max_seconds))


async def _observe_all(targets: list[Target], out: Any, stop: Any, max_seconds: float) -> None:
    deadline = time.monotonic() + max_seconds
    tasks = [asyncio.create_task(_observe_one(i, t, out, deadline)) for i, t in enumerate(targets)]
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        if await loop.run_in_executor(None, stop.wait, 0.2):
            break
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out.put(("done",))


async def _observe_one(i: int, target: Target, out: Any, deadline: float) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from xds_server.xds.types import CLUSTER, ENDPOINT

    replica, port, region = target
    node = base_pb2.Node(
        id=f"churn-{replica}-{region}", cluster=region, locality=base_pb2.Locality(region=region)
    )
    known: dict[str, set[bytes]] = {}
    """cluster -> its hosts (each LbEndpoint's encoding) in the last response."""
    raw: dict[str, bytes] = {}
    """cluster -> its last load assignment's encoding."""

    def host_of(encoded: bytes) -> str:
        socket = endpoint_components_pb2.LbEndpoint.FromString(encoded).endpoint.address
        return f"{socket.socket_address.address}:{socket.socket_address.port_value}"

    synced = False
    attempt = 0
    while time.monotonic() < deadline:
        if attempt:
            await asyncio.sleep(0.2)
        attempt += 1
        requests: asyncio.Queue[Any] = asyncio.Queue()
        first = discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=node)
        requests.put_nowait(first)

        async def feed(q: asyncio.Queue[Any] = requests) -> Any:
            while (item := await q.get()) is not None:
                yield item

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources(feed())
            asked_eds = False
            try:
                async for resp in call:
                    now = time.time()
                    names = CLUSTERS if resp.type_url == ENDPOINT else []
                    requests.put_nowait(
                        discovery_pb2.DiscoveryRequest(
                            type_url=resp.type_url,
                            version_info=resp.version_info,
                            response_nonce=resp.nonce,
                            resource_names=names,
                        )
                    )
                    if resp.type_url == CLUSTER and not asked_eds:
                        asked_eds = True
                        requests.put_nowait(
                            discovery_pb2.DiscoveryRequest(
                                type_url=ENDPOINT, resource_names=CLUSTERS
                            )
                        )
                    if resp.type_url != ENDPOINT:
                        continue
                    changes: list[tuple[str, list[str], list[str], int]] = []
                    for res in resp.resources:
                        cla = endpoint_pb2.ClusterLoadAssignment.FromString(res.value)
                        name = cla.cluster_name
                        if raw.get(name) == res.value:  # (unchanged: not looked at again)
                            changes.append((name, [], [], len(known[name])))
                            continue
                        raw[name] = res.value
                        # Hosts by their encoding (a C call each), decoded only when they
                        # come or go: at 10,000 instances a string per host per response
                        # kept this process busy, and late to timestamp the next response.
                        now_there = {
                            lb.SerializeToString()
                            for loc in cla.endpoints
                            for lb in loc.lb_endpoints
                        }
                        before = known.get(name, set())
                        known[name] = now_there
                        changes.append(
                            (
                                name,
                                sorted(map(host_of, now_there - before)),
                                sorted(map(host_of, before - now_there)),
                                len(now_there),
                            )
                        )
                    out.put(("eds", i, now, resp.version_info, changes))
                    if not synced:
                        synced = True
                        out.put(("synced", i))
                if synced:
                    out.put(("error", i, "the server ended the stream"))
            except grpc.aio.AioRpcError as exc:
                if synced:  # (before: connection refused while the replica starts)
                    out.put(("error", i, f"{exc.code().name}: {exc.details()}"))
            finally:
                requests.put_nowait(None)
                call.cancel()


class Observed:
    """What the observers saw, drained from their queue by a thread of this process."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self.lock = threading.Lock()
        self.present: list[set[str]] = [set() for _ in targets]
        self.changes: dict[str, list[tuple[float, int, bool, str]]] = {}
        """address -> (time, target, now present, the response's version) in order."""
        self.responses: list[list[float]] = [[] for _ in targets]
        """Per target: when each EDS response came."""
        self.added_per_response: list[list[int]] = [[] for _ in targets]
        self.errors: list[str] = []
        self.synced: set[int] = set()
        self.done = threading.Event()

    def drain(self, q: Any, max_seconds: float) -> None:
        end = time.monotonic() + max_seconds
        while time.monotonic() < end:
            try:
                item = q.get(timeout=0.2)
            except queue.Empty:
                continue
            if item[0] == "done":
                break
            with self.lock:
                self._take(item)
        self.done.set()

    def _take(self, item: tuple[Any, ...]) -> None:
        kind, i = item[0], item[1]
        if kind == "synced":
            self.synced.add(i)
        elif kind == "error":
            self.errors.append(f"{self.targets[i][0]}/{self.targets[i][2]}: {item[2]}")
        elif kind == "eds":
            t, version, changes = item[2], item[3], item[4]
            self.responses[i].append(t)
            n = 0
            for _cluster, added, removed, _total in changes:
                for a in added:
                    self.present[i].add(a)
                    self.changes.setdefault(a, []).append((t, i, True, version))
                for a in removed:
                    self.present[i].discard(a)
                    self.changes.setdefault(a, []).append((t, i, False, version))
                n += len(added) + len(removed)
            self.added_per_response[i].append(n)

    def first(
        self, address: str, target: int, present: bool, since: float
    ) -> tuple[float, str] | None:
        """When `address` first appeared (or went) on `target` at or after `since`, and
        the EDS version that brought the change."""
        with self.lock:
            for t, i, there, version in self.changes.get(address, ()):
                if i == target and there == present and t >= since:
                    return t, version
        return None

    def is_present(self, target: int, address: str) -> bool:
        with self.lock:
            return address in self.present[target]

    def snapshot(self) -> list[set[str]]:
        with self.lock:
            return [set(p) for p in self.present]


# ---- the instances (this process, asyncio) ----


REGISTER_ATTEMPTS = 3


def call_cancelled(exc: BaseException) -> bool:
    """Is this a call that failed, rather than this task being cancelled? grpc.aio raises
    CancelledError for a call cancelled under it (the etcd client moving to another
    member cancels its calls in flight): that is one failed call, not the end of the run."""
    if not isinstance(exc, asyncio.CancelledError):
        return True
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


@dataclass
class Member:
    """One simulated instance."""

    index: int
    region: str
    version: str
    address: str
    key: bytes
    lease: int = 0
    alive: bool = False
    """Registered and renewed."""
    next_keepalive: float = 0.0
    last_keepalive: float = 0.0
    registered: float = 0.0
    """When its current key's put was sent."""
    epoch: int = 0
    """Its registrations so far (--leases shared: an expiry is for one of them)."""
    deleting: bool = False
    """--leases shared: its key's deletion is on its way to etcd."""


@dataclass
class Registration:
    member: int
    address: str
    region: str
    wave: int
    put_start: float
    put_done: float
    granted: float
    """The lease grant's start (the put follows it)."""


@dataclass
class Stop:
    member: int
    address: str
    region: str
    wave: int
    last_keepalive: float
    """Its lease's last renewal sent (the lease then ends at this + TTL)."""
    registered: float
    """When the put of the key it stops renewing was sent."""
    stopped: float


class Fleet:
    """The simulated instances: leases, keys, renewals, and a watch on their keys."""

    def __init__(
        self, url: str, regions: Sequence[str], n: int, ttl: int, shared: bool = False
    ) -> None:
        address = parse_store_url(url)
        self.keys = Keys(address.prefix)
        self.client = async_client(address, timeout=5)
        self.ttl = ttl
        self.shared = shared
        """--leases shared: keys on this process's leases, deleted when their own would
        have run out (see the module's docstring)."""
        self._shared_leases: list[tuple[int, int]] = []
        """--leases shared: (lease, keys put on it), the last one being filled."""
        self._expiries: dict[int, asyncio.Task[None]] = {}
        """--leases shared: each stopped member's coming deletion."""
        self.members: list[Member] = []
        for i in range(n):
            region = regions[i % len(regions)]
            version = POOLS["canary"] if i % CANARY_EVERY == 0 else POOLS["production"]
            addr = f"127.1.{i // 250}.{i % 250 + 1}:8080"
            key = self.keys.registry(SERVICE, region, version, addr).encode()
            self.members.append(Member(i, region, version, addr, key))
        self.registrations: list[Registration] = []
        self.stops: list[Stop] = []
        self.watched: dict[str, list[tuple[float, str]]] = {}
        """address -> (time seen, PUT or DELETE) by the watch here."""
        self.watch_times: list[tuple[float, str]] = []
        self.lost: list[tuple[float, Member]] = []
        """Leases found gone (a keepalive answered with TTL 0) while still renewed: the
        renewals came too late (this process or etcd starved of CPU)."""
        self._lost_unclaimed: list[Member] = []
        self._by_lease: dict[int, Member] = {}
        self._due: collections.deque[tuple[float, Member, int]] = collections.deque()
        """(next renewal, member, its lease) in renewal order (see `_renew`)."""
        self.keepalives_sent = 0
        self.errors: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._by_key = {m.key.decode(): m for m in self.members}

    async def start(self, max_seconds: float) -> None:
        await self.client.connect()
        deadline = time.monotonic() + max_seconds
        watch = await self.client.watch_prefix(self.keys.registry().encode())
        self._tasks = [
            asyncio.create_task(self._watch(watch, deadline)),
            asyncio.create_task(self._renew(deadline)),
        ]

    async def close(self) -> None:
        tasks = [*self._tasks, *self._expiries.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.client.close()

    async def _watch(self, watch: Any, deadline: float) -> None:
        async for event in watch:
            now = time.time()
            kind = str(event.kind.value if hasattr(event.kind, "value") else event.kind)
            member = self._by_key.get(event.kv.key.decode())
            if member is not None:
                self.watched.setdefault(member.address, []).append((now, kind))
            self.watch_times.append((now, kind))
            if time.monotonic() > deadline:
                break

    async def _renew(self, deadline: float) -> None:
        """Every live lease renewed every third of the TTL, over one LeaseKeepAlive stream
        (as many `refresh_lease` streams as leases would swamp this process). The leases
        due are taken from the front of a queue in renewal order (each renewal goes to the
        back, a third of the TTL later), so a tick costs the renewals due, not a look at
        every member: at 10,000 instances a scan of all every 20 ms starved the loop."""
        from aetcd import rpc

        every = self.ttl / 3
        while time.monotonic() < deadline:
            call = self.client.leasestub.LeaseKeepAlive()
            reader = asyncio.create_task(self._read_keepalives(call))
            try:
                while time.monotonic() < deadline and not reader.done():
                    now = time.monotonic()
                    due = self._due
                    while due and due[0][0] <= now:
                        _, m, lease = due.popleft()
                        if not (m.alive and m.lease == lease):
                            continue  # (stopped, or registered again on a new lease)
                        # Queued again first: a write that fails must not end its renewals.
                        m.next_keepalive = now + (every if m.index >= 0 else SHARED_LEASE_TTL / 3)
                        due.append((m.next_keepalive, m, lease))
                        await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
                        m.last_keepalive = time.time()
                        self.keepalives_sent += 1
                    await asyncio.sleep(0.02)
            except (Exception, asyncio.CancelledError) as exc:
                if not call_cancelled(exc):
                    raise
                self.errors.append(f"keepalive stream: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)
            finally:
                reader.cancel()
                call.cancel()

    async def _read_keepalives(self, call: Any) -> None:
        async for reply in call:
            m = self._by_lease.get(reply.ID)
            if reply.TTL <= 0 and m is not None and m.index < 0:
                self.errors.append(f"shared lease {reply.ID} lost: its keys are gone")
            elif reply.TTL <= 0 and m is not None and m.alive and m.lease == reply.ID:
                m.alive = False
                self.lost.append((time.time(), m))
                self._lost_unclaimed.append(m)

    def take_lost(self) -> list[Member]:
        """The members whose lease was lost since the last call (to register again)."""
        out, self._lost_unclaimed = self._lost_unclaimed, []
        return out

    async def register(self, members: Sequence[Member], rate: float, wave: int) -> None:
        """Register `members`, one every 1/rate s (at most CONCURRENCY in flight)."""
        gate = asyncio.Semaphore(CONCURRENCY)
        start = time.monotonic()

        async def one(k: int, m: Member) -> None:
            await asyncio.sleep(max(0.0, start + k / rate - time.monotonic()))
            async with gate:
                await self._before_registering(m)
                for attempt in range(REGISTER_ATTEMPTS):  # (a failed call: etcd's, or ours)
                    granted = time.time()
                    try:
                        lease: int = (
                            await self._shared_lease()
                            if self.shared
                            else (await self.client.lease(self.ttl)).id
                        )
                        doc = Instance(
                            SERVICE, m.version, m.region, m.address, time.time(), self.ttl
                        )
                        put_start = time.time()
                        await self.client.put(m.key, instance_to_json(doc), lease)
                        put_done = time.time()
                        break
                    except (Exception, asyncio.CancelledError) as exc:
                        if not call_cancelled(exc):
                            raise
                        if attempt + 1 == REGISTER_ATTEMPTS:
                            self.errors.append(f"register {m.address}: {type(exc).__name__}: {exc}")
                            return
                m.lease, m.alive, m.registered = lease, True, put_start
                m.next_keepalive = time.monotonic() + self.ttl / 3
                m.last_keepalive = put_done
                if not self.shared:
                    self._by_lease[lease] = m
                    self._due.append((m.next_keepalive, m, lease))
                self.registrations.append(
                    Registration(m.index, m.address, m.region, wave, put_start, put_done, granted)
                )

        await asyncio.gather(*(one(k, m) for k, m in enumerate(members)))

    def stop(self, members: Iterable[Member], wave: int) -> None:
        """These stop renewing: each key goes when etcd expires its lease (--leases
        shared: when this process deletes it, at the moment its lease would expire)."""
        now = time.time()
        for m in members:
            m.alive = False
            if self.shared:  # (its renewals, every third of the TTL since the put)
                every = self.ttl / 3
                m.last_keepalive += every * math.floor((now - m.last_keepalive) / every)
                at = m.last_keepalive + self.ttl
                self._expiries[m.index] = asyncio.create_task(self._expire(m, m.epoch, at))
            self.stops.append(
                Stop(m.index, m.address, m.region, wave, m.last_keepalive, m.registered, now)
            )

    async def _shared_lease(self) -> int:
        """--leases shared: the lease the next key goes on (a new one every
        SHARED_LEASE_KEYS keys), renewed with the others every third of its TTL."""
        if not self._shared_leases or self._shared_leases[-1][1] >= SHARED_LEASE_KEYS:
            self._shared_leases.append(((await self.client.lease(SHARED_LEASE_TTL)).id, 0))
            lease = self._shared_leases[-1][0]
            holder = Member(-len(self._shared_leases), "", "", "", b"", lease, alive=True)
            self._by_lease[lease] = holder
            self._due.append((time.monotonic() + SHARED_LEASE_TTL / 3, holder, lease))
        lease, n = self._shared_leases[-1]
        self._shared_leases[-1] = (lease, n + 1)
        return lease

    async def _expire(self, m: Member, epoch: int, at: float) -> None:
        """--leases shared: delete `m`'s key at `at` (its own lease's end)."""
        await asyncio.sleep(max(0.0, at - time.time()))
        if m.epoch != epoch or m.alive:
            return
        m.deleting = True
        try:
            await self.client.delete(m.key)
        except (Exception, asyncio.CancelledError) as exc:
            if not call_cancelled(exc):
                raise
            self.errors.append(f"expire {m.address}: {type(exc).__name__}: {exc}")
        finally:
            m.deleting = False
            self._expiries.pop(m.index, None)

    async def _before_registering(self, m: Member) -> None:
        """A member registering again: the new key must outlive the old one's expiry (as
        a key put on a new lease does: the old lease's end no longer deletes it), so
        --leases shared forgets a coming deletion, or lets one already sent land first."""
        m.epoch += 1
        task = self._expiries.pop(m.index, None)
        if task is None or task.done():
            return
        if m.deleting:
            await asyncio.gather(task, return_exceptions=True)
        else:
            task.cancel()

    async def missing_from_store(self, addresses: Iterable[str]) -> int:
        """How many of these members' keys etcd does not hold (a mismatch's cause: the
        replicas, or the store)."""
        held = {kv.key for kv in await self.client.get_prefix(self.keys.registry().encode())}
        by_address = {m.address: m for m in self.members}
        return sum(1 for a in addresses if by_address[a].key not in held)

    def deleted_at(self, address: str, since: float) -> float | None:
        """The first deletion of the key seen after `since`."""
        return next(
            (t for t, k in self.watched.get(address, ()) if k == "DELETE" and t >= since), None
        )

    def put_seen(self, address: str, since: float) -> float | None:
        return next(
            (t for t, k in self.watched.get(address, ()) if k == "PUT" and t >= since), None
        )


# ---- measuring a replica's process, its log, its metrics ----


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def runqueue_wait(pid: int) -> float:
    """Seconds the process's main thread (a replica's event loop) has spent runnable but
    waiting for a CPU (/proc/PID/schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return float("nan")


def system_busy() -> tuple[float, float]:
    """(busy, total) jiffies over every CPU since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


PUSH_LINE = re.compile(r"push region=(\S+) version=(\d+) types=(\S+) nodes=\d+ reason=(.*)")


def log_pushes(path: Path) -> list[tuple[float, str, str, str, str]]:
    """(time, region, version, types, reason) of every push the replica logged (its JSON
    lines; the time to the millisecond)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{") or "push region=" not in line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        match = PUSH_LINE.match(doc.get("message", ""))
        if match is None:
            continue
        stamp = doc["time"]
        when = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
        out.append((when + int(stamp[20:23]) / 1000, match[1], match[2], match[3], match[4]))
    return out


METRIC_LINE = re.compile(
    r'^(xds_pushes_total|xds_push_duration_seconds_(?:sum|count))\{region="([^"]+)"\} (\S+)$'
)


def push_metrics(port: int) -> dict[str, dict[str, float]]:
    """metric -> region -> value, from a replica's /metrics."""
    status, body, _ = http_get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    if status != 200:
        return {}
    out: dict[str, dict[str, float]] = {}
    for line in body.decode().splitlines():
        if match := METRIC_LINE.match(line):
            out.setdefault(match[1], {})[match[2]] = float(match[3])
    return out


def rate_figures(times: Sequence[float], start: float, end: float) -> dict[str, Any]:
    """How many of `times` fall in [start, end], a second, the most in any 1 s, and the
    shortest gap between two of them."""
    inside = sorted(t for t in times if start <= t <= end)
    most = 0
    for k, t in enumerate(inside):
        most = max(most, bisect.bisect_right(inside, t + 1.0) - k)
    gaps = [b - a for a, b in itertools.pairwise(inside)]
    return {
        "count": len(inside),
        "per_s": len(inside) / max(1e-9, end - start),
        "max_in_1s": most,
        "min_gap_ms": min(gaps) * 1000 if gaps else None,
        "median_gap_ms": quantile(gaps, 0.5) * 1000 if gaps else None,
    }


ETCD_COUNTERS = (
    "etcd_server_leader_changes_seen_total",
    "etcd_server_heartbeat_send_failures_total",
    "etcd_server_slow_apply_total",
    "etcd_server_slow_read_indexes_total",
)


ETCD_GAUGES = (
    "etcd_debugging_mvcc_slow_watcher_total",
    "etcd_debugging_mvcc_pending_events_total",
)
"""Watchers that etcd could not send to as fast as events came (their stream's buffer
full: the client reads too slowly), and the events waiting for them (gauges)."""


def etcd_values(cluster: EtcdCluster, names: Sequence[str]) -> dict[str, float]:
    """These metrics of etcd's, summed over the members."""
    out = dict.fromkeys(names, 0.0)
    for m in cluster.members:
        try:
            status, body, _ = http_get(f"{m.client_url}/metrics", timeout=5)
        except OSError:
            continue
        if status != 200:
            continue
        for line in body.decode().splitlines():
            name, _, value = line.partition(" ")
            if name in out:
                out[name] += float(value)
    return out


# ---- the run ----


@dataclass
class Windows:
    storm: tuple[float, float] = (0.0, 0.0)
    churn: tuple[float, float] = (0.0, 0.0)


@dataclass
class Run:
    args: dict[str, Any]
    targets: list[Target]
    windows: Windows = field(default_factory=Windows)
    storm_rate: float = 0.0
    converged_storm_s: float | None = None
    converged_final_s: float | None = None
    final_mismatch: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped_reregistrations: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    wait: dict[str, float] = field(default_factory=dict)
    """% of the churn's wall time each Python process's main thread waited for a CPU."""
    system_busy_pct: float = 0.0
    cores: int = 0
    metrics_before: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    metrics_after: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    etcd: dict[str, float] = field(default_factory=dict)
    """etcd's counters over the churn (and the last expirations)."""


def expected(fleet: Fleet) -> dict[str, set[str]]:
    """Each region's live instances (one pass over the fleet: polled every 20 ms)."""
    out: dict[str, set[str]] = {}
    for m in fleet.members:
        if m.alive:
            out.setdefault(m.region, set()).add(m.address)
    return out


async def wait_converged(
    fleet: Fleet, observed: Observed, targets: list[Target], timeout: float
) -> float | None:
    """Wait until every stream shows exactly the live instances of its region; how long
    that took (None: not within `timeout`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        seen, want = observed.snapshot(), expected(fleet)
        if all(seen[i] == want.get(t[2], set()) for i, t in enumerate(targets)):
            return time.monotonic() - start
        await asyncio.sleep(POLL)
    return None


async def mismatch(
    fleet: Fleet, observed: Observed, targets: list[Target]
) -> dict[str, dict[str, int]]:
    """Per stream that does not serve exactly the live instances: how many are missing
    (and of those, how many etcd does not hold either), how many are extra."""
    seen, live = observed.snapshot(), expected(fleet)
    out = {}
    for i, (replica, _, region) in enumerate(targets):
        want = live.get(region, set())
        if seen[i] != want:
            missing = want - seen[i]
            try:
                absent = await fleet.missing_from_store(missing)
            except Exception:
                absent = -1
            out[f"{replica}/{region}"] = {
                "missing": len(missing),
                "missing_not_in_etcd": absent,
                "extra": len(seen[i] - want),
            }
    return out


def gone_everywhere(observed: Observed, targets: list[Target], m: Member) -> bool:
    return not any(
        observed.is_present(i, m.address) for i, t in enumerate(targets) if t[2] == m.region
    )


async def churn(
    a: argparse.Namespace,
    fleet: Fleet,
    observed: Observed,
    targets: list[Target],
    replicas: list[Replica],
    pids: dict[str, int],
    run: Run,
    etcd: EtcdCluster,
) -> None:
    rng = random.Random(a.seed)
    fleet_budget = a.instances / a.rate + a.waves * a.wave_seconds + 4 * a.timeout + 3 * a.ttl + 60
    await fleet.start(fleet_budget)
    peaks = dict.fromkeys(ETCD_GAUGES, 0.0)

    async def sample() -> None:  # (the gauges' peaks, every 0.5 s)
        end = time.monotonic() + fleet_budget
        while time.monotonic() < end:
            got = await asyncio.to_thread(etcd_values, etcd, ETCD_GAUGES)
            for k, v in got.items():
                peaks[k] = max(peaks[k], v)
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())

    # wave 0: every instance registers
    progress(f"wave 0: registering {a.instances} instances at {a.rate:g}/s")
    t0 = time.time()
    await fleet.register(fleet.members, a.rate, 0)
    t1 = time.time()
    run.storm_rate = len(fleet.registrations) / max(1e-9, t1 - t0)
    run.converged_storm_s = await wait_converged(fleet, observed, targets, a.timeout)
    if run.converged_storm_s is None:
        run.final_mismatch = await mismatch(fleet, observed, targets)
        raise TimeoutError(f"wave 0 not served within {a.timeout:g}s: {run.final_mismatch}")
    run.windows.storm = (t0, t1 + run.converged_storm_s)
    progress(
        f"wave 0: {len(fleet.registrations)} registered in {t1 - t0:.2f}s "
        f"({run.storm_rate:.0f}/s); every replica serves them all "
        f"{run.converged_storm_s:.2f}s after the last put"
    )
    await asyncio.sleep(1.0)  # (quiet: wave 0's pushes apart from the churn's)

    # waves 1..W: stop some, bring back the previous wave's
    etcd_before = await asyncio.to_thread(etcd_values, etcd, ETCD_COUNTERS)
    run.metrics_before = {r.name: push_metrics(r.metrics) for r in replicas}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wait0 = {name: runqueue_wait(pid) for name, pid in pids.items()}
    busy0 = system_busy()
    start = time.time()
    stopped_before: list[Member] = []
    for wave in range(1, a.waves + 1):
        wave_start = time.monotonic()
        live = [m for m in fleet.members if m.alive]
        stopping = rng.sample(live, round(a.churn * len(live)))
        fleet.stop(stopping, wave)
        stopped_before += fleet.take_lost()
        back = [m for m in stopped_before if gone_everywhere(observed, targets, m)]
        # By index: `m not in back` compared dataclasses pairwise, quadratic (at 10,000
        # instances it blocked this loop, and so the renewals, for seconds).
        brought = {m.index for m in back}
        waiting = [m for m in stopped_before if m.index not in brought]
        run.skipped_reregistrations += len(waiting)
        rate = max(1.0, len(back) / (0.8 * a.wave_seconds))
        again = f"{len(back)} register again ({rate:.0f}/s)" if back else "none to bring back"
        late = f", {len(waiting)} not yet gone everywhere" if waiting else ""
        progress(f"wave {wave}: {len(stopping)} stop renewing, {again}{late}")
        await fleet.register(back, rate, wave)
        stopped_before = stopping + waiting
        await asyncio.sleep(max(0.0, wave_start + a.wave_seconds - time.monotonic()))
    end = time.time()
    cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wait1 = {name: runqueue_wait(pid) for name, pid in pids.items()}
    busy1 = system_busy()
    run.metrics_after = {r.name: push_metrics(r.metrics) for r in replicas}
    run.windows.churn = (start, end)
    run.cpu = {name: 100 * (cpu1[name] - cpu0[name]) / (end - start) for name in pids}
    run.wait = {
        name: 100 * (wait1[name] - wait0[name]) / (end - start)
        for name in pids
        if not name.startswith("etcd")  # (Go: its main thread is not where it works)
    }
    run.cores = os.cpu_count() or 1
    run.system_busy_pct = 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])

    # the last ones to stop expire; every replica serves exactly the live set
    progress(f"churn over after {end - start:.1f}s; waiting for the last expirations")
    run.converged_final_s = await wait_converged(fleet, observed, targets, a.ttl + 2 + a.timeout)
    run.final_mismatch = await mismatch(fleet, observed, targets)
    etcd_after = await asyncio.to_thread(etcd_values, etcd, ETCD_COUNTERS)
    run.etcd = {k.removeprefix("etcd_server_"): etcd_after[k] - etcd_before[k] for k in etcd_after}
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    run.etcd.update({f"max {k.removeprefix('etcd_debugging_mvcc_')}": v for k, v in peaks.items()})
    await asyncio.sleep(0.5)  # (the last deletions' events)


def run_all(a: argparse.Namespace, workdir: Path) -> tuple[Run, Fleet, Observed, list[Replica]]:
    regions = region_names(a.regions)
    budget = a.instances / a.rate + a.waves * a.wave_seconds + 5 * a.timeout + 3 * a.ttl + 120
    etcd = EtcdCluster(workdir / "etcd")
    replicas: list[Replica] = []
    stop = None
    child = None
    try:
        etcd.start()
        progress(f"etcd: {etcd.url}")
        push_spec(workdir, etcd.url, regions)
        replicas = [start_replica(workdir, etcd.url, name) for name in REPLICAS]
        targets = [(r.name, r.xds, region) for r in replicas for region in regions]
        ctx = mp.get_context("spawn")
        out, stop = ctx.Queue(), ctx.Event()
        child = ctx.Process(target=observe, args=(targets, out, stop, budget), daemon=True)
        child.start()
        observed = Observed(targets)
        drainer = threading.Thread(target=observed.drain, args=(out, budget + 10), daemon=True)
        drainer.start()
        deadline = time.monotonic() + a.timeout
        while len(observed.synced) < len(targets):
            for r in replicas:
                if not r.process.alive():
                    raise RuntimeError(f"replica {r.name} exited:\n{r.process.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(observed.synced)} of {len(targets)} streams synced")
            time.sleep(0.1)
        progress(f"3 replicas up, {len(targets)} ADS streams synced (workdir {workdir})")
        pids = {r.name: r.process.pid for r in replicas}
        pids.update({f"etcd{k}": p.pid for k, p in enumerate(etcd.processes())})
        pids["benchmark"] = os.getpid()
        assert child.pid is not None
        pids["observers"] = child.pid
        run = Run(vars(a) | {"workdir": str(workdir)}, targets)
        fleet = Fleet(etcd.url, regions, a.instances, a.ttl, shared=a.leases == "shared")

        async def go() -> None:
            try:
                await churn(a, fleet, observed, targets, replicas, pids, run, etcd)
            finally:
                await fleet.close()

        asyncio.run(go())
        for r in replicas:
            if not r.process.alive():
                observed.errors.append(f"replica {r.name} exited: {r.process.tail(5)}")
        return run, fleet, observed, replicas
    finally:
        if stop is not None:
            stop.set()
        if child is not None:
            child.join(10)
            if child.is_alive():
                child.terminate()
                child.join(5)
        for r in replicas:
            r.process.stop()
        etcd.stop()


# ---- the figures ----


def streams_by_region(targets: list[Target]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, target in enumerate(targets):
        out.setdefault(target[2], []).append(i)
    return out


Built = dict[tuple[str, str, str], float]
"""(replica, region, snapshot version) -> when the replica logged the push."""


def built_index(replicas: list[Replica]) -> tuple[Built, dict[tuple[str, str], list[float]]]:
    """Every push each replica logged by version; and its registry pushes' times by
    (replica, region), in order."""
    built: Built = {}
    registry: dict[tuple[str, str], list[float]] = {}
    for r in replicas:
        for when, region, version, _types, why in log_pushes(r.log_path):
            built[(r.name, region, version)] = when
            if why == "registry changed":
                registry.setdefault((r.name, region), []).append(when)
    return built, registry


STALE_MARGIN = 0.025
"""A registry push logged this long after a put returned was built after the put (the
build is a few ms after the timer fires): if it lacks the registration, the replica's
view of the store was behind."""


def registration_figures(
    fleet: Fleet,
    observed: Observed,
    targets: list[Target],
    replicas: list[Replica],
    built: Built,
    registry_pushes: dict[tuple[str, str], list[float]],
) -> dict[str, Any]:
    """put returned -> on every replica (by phase), -> on each replica, split at the push
    that carried it (the replica's log: its version is the EDS response's); the put's
    own time; put returned -> the watch here; registrations never seen everywhere."""
    by_region = streams_by_region(targets)
    to_built: list[float] = []
    built_to_eds: list[float] = []
    every: dict[str, list[float]] = {"storm": [], "churn": []}
    per_replica: dict[str, list[float]] = {r.name: [] for r in replicas}
    watch_lag: list[float] = []
    put_s: list[float] = []
    stale: dict[str, list[float]] = {r.name: [] for r in replicas}
    """Per replica: how long after the put it still pushed without it (0: never)."""
    unseen = 0
    for reg in fleet.registrations:
        put_s.append(reg.put_done - reg.put_start)
        if (seen := fleet.put_seen(reg.address, reg.put_start)) is not None:
            watch_lag.append(seen - reg.put_done)
        arrivals = []
        for i in by_region[reg.region]:
            got = observed.first(reg.address, i, True, reg.put_start)
            if got is None:
                unseen += 1
                break
            when, version = got
            arrivals.append(when - reg.put_done)
            per_replica[targets[i][0]].append(when - reg.put_done)
            replica = targets[i][0]
            if (pushed := built.get((replica, reg.region, version))) is not None:
                to_built.append(pushed - reg.put_done)
                built_to_eds.append(when - pushed)
                times = registry_pushes.get((replica, reg.region), [])
                k = bisect.bisect_left(times, pushed) - 1  # the push before the one with it
                behind = times[k] - reg.put_done if k >= 0 else 0.0
                stale[replica].append(behind if behind > STALE_MARGIN else 0.0)
        else:
            every["storm" if reg.wave == 0 else "churn"].append(max(arrivals))
    return {
        "every": every,
        "per_replica": per_replica,
        "put_s": put_s,
        "watch_lag": watch_lag,
        "unseen": unseen,
        "to_built": to_built,
        "built_to_eds": built_to_eds,
        "stale": stale,
    }


def expiry_figures(
    fleet: Fleet, observed: Observed, targets: list[Target], built: Built
) -> dict[str, Any]:
    """lease end -> key deleted; key deleted -> gone from every replica, split at the push
    that carried it; how many were never deleted."""
    by_region = streams_by_region(targets)
    to_built: list[float] = []
    built_to_eds: list[float] = []
    gone: list[float] = []
    lessor: list[float] = []
    not_deleted = 0
    lost_first = 0
    for stop in fleet.stops:
        deleted = fleet.deleted_at(stop.address, stop.registered)
        if deleted is None:
            not_deleted += 1
            continue
        if deleted < stop.stopped:  # (its lease was lost before it was stopped)
            lost_first += 1
            continue
        lessor.append(deleted - (stop.last_keepalive + fleet.ttl))
        times = []
        for i in by_region[stop.region]:
            got = observed.first(stop.address, i, False, stop.registered)
            if got is None:
                break
            times.append(got[0])
            if (pushed := built.get((targets[i][0], stop.region, got[1]))) is not None:
                to_built.append(pushed - deleted)
                built_to_eds.append(got[0] - pushed)
        else:
            gone.append(max(times) - deleted)
    return {
        "lessor": lessor,
        "gone": gone,
        "not_deleted": not_deleted,
        "lost_first": lost_first,
        "to_built": to_built,
        "built_to_eds": built_to_eds,
    }


def push_figures(run: Run, replicas: list[Replica], observed: Observed) -> dict[str, Any]:
    """Pushes during the churn (and wave 0): the replicas' logs, the EDS responses on the
    streams, xds_pushes_total, the mean build time."""
    regions = list(streams_by_region(run.targets))
    start, end = run.windows.churn
    s_start, s_end = run.windows.storm
    churn_s = max(1e-9, end - start)
    logged_churn: dict[str, dict[str, Any]] = {}
    logged_storm: dict[str, dict[str, Any]] = {}
    other: dict[str, int] = {}
    for r in replicas:
        logged = log_pushes(r.log_path)
        for when, _region, _version, _types, reason in logged:
            if start <= when <= end and reason != "registry changed":
                other[reason] = other.get(reason, 0) + 1
        for region in regions:
            times = [
                when
                for when, where, _version, _types, why in logged
                if where == region and why == "registry changed"
            ]
            logged_churn[f"{r.name}/{region}"] = rate_figures(times, start, end)
            logged_storm[f"{r.name}/{region}"] = rate_figures(times, s_start, s_end)
    eds = {
        f"{target[0]}/{target[2]}": rate_figures(observed.responses[i], start, end)
        for i, target in enumerate(run.targets)
    }
    metric_pushes: dict[str, float] = {}
    build_ms: dict[str, float | None] = {}
    for r in replicas:
        before, after = run.metrics_before.get(r.name, {}), run.metrics_after.get(r.name, {})
        for region in regions:
            new = after.get("xds_pushes_total", {}).get(region, 0.0)
            old = before.get("xds_pushes_total", {}).get(region, 0.0)
            metric_pushes[f"{r.name}/{region}"] = (new - old) / churn_s

        def delta(metric: str, b: Any = before, a: Any = after) -> float:
            return float(sum(a.get(metric, {}).values()) - sum(b.get(metric, {}).values()))

        count = delta("xds_push_duration_seconds_count")
        total = delta("xds_push_duration_seconds_sum")
        build_ms[r.name] = 1000 * total / count if count > 0 else None
    return {
        "pushes_registry_logged": logged_churn,
        "pushes_registry_logged_storm": logged_storm,
        "pushes_other_reasons_in_churn": other,
        "eds_responses": eds,
        "xds_pushes_total_per_s": metric_pushes,
        "push_build_ms_mean": build_ms,
    }


def summarize(
    run: Run, fleet: Fleet, observed: Observed, replicas: list[Replica]
) -> dict[str, Any]:
    built, registry_pushes = built_index(replicas)
    reg = registration_figures(fleet, observed, run.targets, replicas, built, registry_pushes)
    exp = expiry_figures(fleet, observed, run.targets, built)
    start, end = run.windows.churn
    churn_s = max(1e-9, end - start)
    changes = [t for t, _ in fleet.watch_times if start <= t <= end]
    puts = [t for t, k in fleet.watch_times if k == "PUT" and start <= t <= end]
    dels = [t for t, k in fleet.watch_times if k == "DELETE" and start <= t <= end]
    bound = 1 / (REGISTRY_COALESCE_SECONDS + COALESCE_SECONDS)
    return {
        "registration_to_every_replica_s": {k: stats(v) for k, v in reg["every"].items()},
        "registration_to_replica_s": {k: stats(v) for k, v in reg["per_replica"].items()},
        "registration_split_s": {
            "put_returned_to_push_logged": stats(reg["to_built"]),
            "push_logged_to_eds_received": stats(reg["built_to_eds"]),
        },
        "replica_pushed_without_it_s": {
            name: {
                **stats(v),
                "share": sum(1 for x in v if x > 0) / len(v) if v else 0.0,
            }
            for name, v in reg["stale"].items()
        },
        "registrations": {
            "storm": sum(1 for r in fleet.registrations if r.wave == 0),
            "churn": sum(1 for r in fleet.registrations if r.wave > 0),
            "not_seen_everywhere": reg["unseen"],
            "storm_rate_per_s": run.storm_rate,
            "put_s": stats(reg["put_s"]),
            "put_to_watch_here_s": stats(reg["watch_lag"]),
            "skipped_not_yet_gone": run.skipped_reregistrations,
        },
        "expiry": {
            "stops": len(fleet.stops),
            "never_deleted": exp["not_deleted"],
            "lease_lost_before_stop": exp["lost_first"],
            "lease_end_to_delete_s": stats(exp["lessor"]),
            "delete_to_gone_everywhere_s": stats(exp["gone"]),
            "delete_to_push_logged_s": stats(exp["to_built"]),
            "push_logged_to_eds_received_s": stats(exp["built_to_eds"]),
        },
        "churn_window_s": churn_s,
        "storm_window_s": run.windows.storm[1] - run.windows.storm[0],
        "store_changes_per_s": {
            "all": len(changes) / churn_s,
            "puts": len(puts) / churn_s,
            "deletes": len(dels) / churn_s,
        },
        **push_figures(run, replicas, observed),
        "coalesce_bound_per_s": bound,
        "converged_storm_s": run.converged_storm_s,
        "converged_final_s": run.converged_final_s,
        "final_mismatch": run.final_mismatch,
        "cpu_pct_of_one_core": run.cpu,
        "main_thread_runqueue_wait_pct": run.wait,
        "system_busy_pct": run.system_busy_pct,
        "cores": run.cores,
        "leases_lost_while_renewed": len(fleet.lost),
        "etcd_counters_during_churn": run.etcd,
        "keepalives_per_s": fleet.keepalives_sent
        / max(1e-9, run.windows.churn[1] - run.windows.storm[0]),
        "errors": (fleet.errors + observed.errors)[:20],
    }


def report(command: str, a: argparse.Namespace, s: dict[str, Any]) -> None:
    def ms(v: dict[str, Any]) -> str:
        if not v["n"]:
            return "no data"
        return (
            f"p50 {v['p50'] * 1000:.0f} ms, p99 {v['p99'] * 1000:.0f} ms, "
            f"max {v['max'] * 1000:.0f} ms (n={v['n']})"
        )

    def per_region(figs: dict[str, dict[str, Any]], key: str, fmt: str) -> str:
        return ", ".join(
            f"{name.split('/')[1]} " + (fmt.format(f[key]) if f[key] is not None else "-")
            for name, f in figs.items()
        )

    rule = "=" * 78
    reg = s["registrations"]
    exp = s["expiry"]
    ch = s["store_changes_per_s"]
    print(rule)
    print(f"$ {command}")
    print(
        f"etcd: 3 members; replicas: {', '.join(REPLICAS)} (each serves every region); "
        f"{a.regions} regions; {a.instances} instances (1 in {CANARY_EVERY} canary v2); "
        f"lease TTL {a.ttl} s; {a.waves} waves of {a.churn:.0%} churn every "
        f"{a.wave_seconds:g} s; "
        + (
            "a lease per instance"
            if a.leases == "own"
            else "keys on shared leases, deleted by the benchmark at their TTL (--leases shared)"
        )
    )
    print(
        f"registrations: {reg['storm']} in wave 0 ({reg['storm_rate_per_s']:.0f}/s), "
        f"{reg['churn']} in the churn waves ({reg['skipped_not_yet_gone']} put off: not yet "
        f"gone everywhere); {reg['not_seen_everywhere']} never seen on every replica"
    )
    split = s["registration_split_s"]
    every = s["registration_to_every_replica_s"]
    rows: list[tuple[str, dict[str, Any]]] = [
        ("  put (put sent -> put returned)", reg["put_s"]),
        ("  put returned -> the etcd watch here", reg["put_to_watch_here_s"]),
        ("registration (put returned) -> in the EDS of all 3 replicas:", {}),
        ("  wave 0 (burst)", every["storm"]),
        ("  churn waves", every["churn"]),
        *(
            (f"  replica {name} alone (both phases)", v)
            for name, v in s["registration_to_replica_s"].items()
        ),
        ("  split: put returned -> replica logs the push", split["put_returned_to_push_logged"]),
        ("         push logged -> its EDS received", split["push_logged_to_eds_received"]),
        (
            "  a replica's view behind etcd: its last push without the registration, "
            "after the put returned (0 if none):",
            {},
        ),
        *(
            (f"    {name} ({v['share']:.0%} of registrations)", v)
            for name, v in s["replica_pushed_without_it_s"].items()
        ),
        (
            f"expirations: {exp['stops']} stopped renewing; {exp['never_deleted']} never "
            f"deleted; {exp['lease_lost_before_stop']} had lost their lease already",
            {},
        ),
        (
            "  lease end (last keepalive + TTL) -> deleted"
            if a.leases == "own"
            else "  lease end -> deleted (by the benchmark)",
            exp["lease_end_to_delete_s"],
        ),
        ("  key deleted (watch here) -> gone from all 3", exp["delete_to_gone_everywhere_s"]),
        ("  split: key deleted -> replica logs the push", exp["delete_to_push_logged_s"]),
        ("         push logged -> its EDS received", exp["push_logged_to_eds_received_s"]),
    ]
    for label, v in rows:
        print(f"{label:<48}{ms(v)}" if v else label)
    print(
        f"churn: {s['churn_window_s']:.1f} s, store changes {ch['all']:.0f}/s "
        f"({ch['puts']:.0f} registrations/s, {ch['deletes']:.0f} expirations/s)"
    )
    print(
        f"pushes per region during the churn (bound from coalescing: "
        f"1/({REGISTRY_COALESCE_SECONDS * 1000:.0f} ms + {COALESCE_SECONDS * 1000:.0f} ms) = "
        f"{s['coalesce_bound_per_s']:.1f}/s):"
    )
    logged = s["pushes_registry_logged"]
    eds = s["eds_responses"]
    for r in REPLICAS:
        mine = {k: v for k, v in logged.items() if k.startswith(r + "/")}
        seen = {k: v for k, v in eds.items() if k.startswith(r + "/")}
        print(f"  {r} logged 'registry changed': {per_region(mine, 'per_s', '{:.1f}/s')}")
        print(f"     most in any 1 s:           {per_region(mine, 'max_in_1s', '{}')}")
        print(f"     shortest gap:              {per_region(mine, 'min_gap_ms', '{:.0f} ms')}")
        print(f"     EDS responses on streams:  {per_region(seen, 'per_s', '{:.1f}/s')}")
        mp_ = {k: v for k, v in s["xds_pushes_total_per_s"].items() if k.startswith(r + "/")}
        print(
            "     xds_pushes_total:          "
            + ", ".join(f"{k.split('/')[1]} {v:.1f}/s" for k, v in mp_.items())
        )
    rates = [v["per_s"] for v in logged.values()]
    if rates and ch["all"]:
        print(
            f"  => {ch['all']:.0f} store changes/s became {min(rates):.1f}-{max(rates):.1f} "
            f"pushes/s per replica and region ({ch['all'] / max(rates):.1f} changes a push)"
        )
    storm = s["pushes_registry_logged_storm"]
    window = s["storm_window_s"]
    if storm and window > 0:
        srates = [v["per_s"] for v in storm.values()]
        print(
            f"  wave 0: {reg['storm']} registrations in {window:.1f} s (to served everywhere; "
            f"{reg['storm'] / window:.0f}/s) became {min(srates):.1f}-{max(srates):.1f} "
            f"pushes/s per replica and region (most in any 1 s: "
            f"{max(v['max_in_1s'] for v in storm.values())})"
        )
    if s["pushes_other_reasons_in_churn"]:
        print(f"  other pushes during the churn: {s['pushes_other_reasons_in_churn']}")
    build = ", ".join(
        f"{k} {v:.1f} ms" if v is not None else f"{k} -" for k, v in s["push_build_ms_mean"].items()
    )
    print(f"mean push build time (xds_push_duration_seconds, churn): {build}")
    cpu = ", ".join(f"{k} {v:.0f}%" for k, v in s["cpu_pct_of_one_core"].items())
    print(f"CPU during the churn (% of one core): {cpu}")
    wait = ", ".join(f"{k} {v:.0f}%" for k, v in s["main_thread_runqueue_wait_pct"].items())
    print(f"  main thread runnable but waiting for a CPU (% of the churn): {wait}")
    ours = sum(v for v in s["cpu_pct_of_one_core"].values() if v == v)
    print(
        f"  machine: {s['system_busy_pct']:.0f}% of {s['cores']} cores busy "
        f"(these processes: {ours / s['cores']:.0f}%, anything else on the machine: "
        f"{max(0.0, s['system_busy_pct'] - ours / s['cores']):.0f}%)"
    )
    final = s["converged_final_s"]
    print(
        "final: every replica serves exactly the live instances: "
        + (
            f"yes ({final:.2f} s after the churn)"
            if final is not None
            else f"NO {s['final_mismatch']}"
        )
    )
    print(
        f"etcd during the churn: {s['keepalives_per_s']:.0f} lease keepalives/s from this "
        "process; "
        + ", ".join(
            f"{k} {'' if k.startswith('max') else '+'}{v:g}"
            for k, v in s["etcd_counters_during_churn"].items()
        )
    )
    if s["leases_lost_while_renewed"]:
        print(
            f"LEASES LOST while renewed: {s['leases_lost_while_renewed']} (renewals every "
            f"TTL/3 came too late: this process or etcd short of CPU; see etcd below)"
        )
    if s["errors"]:
        print(f"errors: {s['errors']}")
    print(rule)


def dump_raw(path: Path, run: Run, fleet: Fleet, observed: Observed) -> None:
    """Every timestamp behind the figures (with --workdir), for a closer look."""
    doc = {
        "windows": {"storm": run.windows.storm, "churn": run.windows.churn},
        "targets": run.targets,
        "registrations": [vars(r) for r in fleet.registrations],
        "stops": [vars(st) for st in fleet.stops],
        "watch": fleet.watch_times,
        "eds_responses": observed.responses,
        "changes_per_response": observed.added_per_response,
        "address_changes": observed.changes,
    }
    path.write_text(json.dumps(doc))
    progress(f"raw timestamps in {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=1000, help="simulated instances")
    p.add_argument("--regions", type=int, default=3)
    p.add_argument("--ttl", type=int, default=3, help="each instance's lease TTL (s)")
    p.add_argument("--waves", type=int, default=5, help="churn waves after wave 0")
    p.add_argument("--churn", type=float, default=0.3, help="live instances stopping a wave")
    p.add_argument("--wave-seconds", type=float, default=5.0, help="each churn wave's length")
    p.add_argument("--rate", type=float, default=500.0, help="wave 0's registrations a second")
    p.add_argument("--timeout", type=float, default=60.0, help="the longest any one wait")
    p.add_argument(
        "--leases",
        choices=["own", "shared"],
        default="own",
        help="own: a lease per instance, renewed (as `register`); shared: keys on a few "
        "leases, deleted when their own lease would have run out (see above)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workdir", type=Path, help="keep etcd's data and the replicas' logs here")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.instances < 1 or a.regions < 1 or a.waves < 0 or not 0 <= a.churn < 1:
        p.error("--instances, --regions >= 1; --waves >= 0; 0 <= --churn < 1")
    if a.ttl < 1 or a.instances > 60_000:
        p.error("--ttl >= 1 (etcd's leases are whole seconds); --instances <= 60000")
    if a.wave_seconds < a.ttl + 1:
        p.error("--wave-seconds must be at least --ttl + 1 (a stopped lease expires in a wave)")
    command = shlex.join(["python", *sys.argv])
    if a.json:
        PROGRESS["to"] = sys.stderr
    if a.workdir is not None:
        a.workdir.mkdir(parents=True, exist_ok=True)
        run, fleet, observed, replicas = run_all(a, a.workdir)
        s = summarize(run, fleet, observed, replicas)
        dump_raw(a.workdir / "raw.json", run, fleet, observed)
    else:
        with tempfile.TemporaryDirectory(prefix="registry-churn-") as d:
            run, fleet, observed, replicas = run_all(a, Path(d))
            s = summarize(run, fleet, observed, replicas)  # (the logs are read here)
    if a.json:
        print(json.dumps({"command": command, **s}, indent=2))
    else:
        report(command, a, s)


if __name__ == "__main__":
    main()
