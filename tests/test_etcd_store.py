"""Replicas on etcd: the store (`ha.store.EtcdStore`) and the election (`ha.leader`), on a
real three-member etcd cluster: the fence, atomic commits, the watch through a member's
death, spec pushes, and leaders that stop renewing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REGIONS, make_spec_doc
from tests.support import wait_for_async
from xds_server.ha.etcd import async_client, parse_store_url, range_end
from xds_server.ha.leader import Election
from xds_server.ha.store import VERSION_SCALE, EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.rollout import decide as sm
from xds_server.rollout.audit import AuditEntry, Weights, transition_entry
from xds_server.rollout.decision import EntryKind
from xds_server.rollout.ports import StoreFenced, StoreWriteError
from xds_server.rollout.state import PROGRESSING, RolloutState
from xds_server.spec import RolloutPlan, parse_spec

WATCH_LATENCY = 1.0
"""How soon a replica's watch must show another replica's commit."""


# ---- helpers ----


async def open_store(url: str, prefix: str) -> EtcdStore:
    address = parse_store_url(url, prefix)
    store = EtcdStore(address, async_client(address))
    await store.start()
    return store


async def close_store(store: EtcdStore) -> None:
    store.close()
    with contextlib.suppress(Exception):
        await store.client.close()


@dataclass
class Replica:
    """A store and an election, wired as `app.replica` wires them (`app.electors.EtcdElector`)."""

    store: EtcdStore
    election: Election
    elected: list[int] = field(default_factory=list)
    deposed: list[str] = field(default_factory=list)
    fenced: list[str] = field(default_factory=list)
    elected_at: list[float] = field(default_factory=list)
    valid_when_others_won: list[bool] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def run(self) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(self.election.run()))

    def watch(self) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(self.store.watch()))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=2)
            # A cancel that lands in the tick a leader steps down is lost on Python 3.11
            # (asyncio.wait_for in Election._lead returns instead): cancel again.
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        await close_store(self.store)


async def replica(url: str, prefix: str, name: str, ttl: float) -> Replica:
    store = await open_store(url, prefix)
    box: list[Replica] = []

    def elected(fence: int) -> None:
        store.fence = fence
        box[0].elected.append(fence)
        box[0].elected_at.append(time.monotonic())

    def deposed(why: str) -> None:
        store.fence = None
        box[0].deposed.append(why)

    election = Election(store.client, store.keys, name, ttl, elected, deposed)
    rep = Replica(store, election)
    box.append(rep)

    def fenced(why: str) -> None:
        rep.fenced.append(why)
        election.step_down(why)

    store.on_fenced = fenced
    store.may_write = election.valid
    return rep


AT_5 = Weights(production=90.0, baseline=5.0, canary=5.0)


def started(
    regions: Sequence[str] = ("us-east", "eu-west"), service: str = "svc", now: float = 10.0
) -> tuple[RolloutState, list[AuditEntry]]:
    """A rollout's first decision: its state, an entry for the rollout (no snapshot
    version) and one per region, naming a snapshot version (the store puts the commit's)."""
    d = sm.start(RolloutPlan(), service, "v2", tuple(regions), now=now)
    entries = [
        transition_entry(d.state, t, now, None, AT_5, None, 1 if t.region else None)
        for t in d.transitions
    ]
    assert [e.region for e in entries] == [None, *regions]
    return d.state, entries


def later(state: RolloutState, reason: str, now: float) -> tuple[RolloutState, list[AuditEntry]]:
    """The same rollout, a decision later: a new state and a region entry (with a snapshot
    version) plus an entry that carries none."""
    new = replace(state, updated_at=now, reason=reason)
    region = sorted(state.regions)[0]
    entry = AuditEntry(
        time=now,
        service=state.service,
        canary_version=state.canary_version,
        region=region,
        kind=EntryKind.TRANSITION,
        step=1,
        phase_from=PROGRESSING,
        phase_to=PROGRESSING,
        weights_before=AT_5,
        weights_after=Weights(production=80.0, baseline=10.0, canary=10.0),
        measurements=None,
        verdict=None,
        reason=reason,
        snapshot_version=1,
        actor="controller",
    )
    note = replace(entry, region=None, kind=EntryKind.CHECK, snapshot_version=None, step=None)
    return new, [entry, note]


def raw(store: EtcdStore) -> dict[str, Any]:
    """Every key under the store's prefix, straight from etcd (not from any view)."""
    got = store.kv.range(store.keys.everything, range_end(store.keys.everything))
    return {kv.key.decode(): kv for kv in got.kvs}


def spec_text(tmp_path: Path, regions: tuple[str, ...] = REGIONS, port: int = 18100) -> str:
    ports = {(r, p): port for r in regions for p in ("production", "canary")}
    text = yaml.safe_dump(make_spec_doc(ports, regions=regions), sort_keys=False)
    parse_spec(text, str(tmp_path / "mesh.yaml"))  # pushes are of validated specs
    return text


def local_peer_ports() -> set[int]:
    """Remote ports of this process's established TCP connections (Linux /proc): which
    etcd members our gRPC channels are talking to."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "01" and cols[9] in inodes:  # ESTABLISHED, ours
                    ports.add(int(cols[2].rsplit(":", 1)[1], 16))
    return ports


# ---- the fence ----


def test_a_deposed_leader_is_fenced_and_commits_nothing(shared_etcd: EtcdCluster) -> None:
    async def scenario() -> None:
        prefix = "/test/fence"
        # A's lease is long: when it loses the key, A still believes it leads (its own
        # deadline has not passed), so only the transaction's fence can stop it.
        a = await replica(shared_etcd.url, prefix, "a", ttl=30)
        b = await replica(shared_etcd.url, prefix, "b", ttl=2)
        try:
            a.run()
            await wait_for_async(lambda: a.elected, "A to win the election", timeout=5)
            b.run()
            state, entries = started()
            a.store.record(state, entries, regions=("us-east",))
            b.store.read()
            assert b.store.rollout("svc", "v2") == state
            assert [e.id for e in b.store.audit()] == [1, 2, 3]
            assert not b.elected, "B won while A held the key"

            # A loses the key as if its lease expired (A's own process does not notice).
            assert a.election.lease is not None
            await b.store.client.revoke_lease(a.election.lease)
            await wait_for_async(lambda: b.elected, "B to win the key A lost", timeout=3)
            assert a.election.leading and a.election.valid() and a.store.fence is not None

            stale, stale_entries = later(state, "A's stale decision", now=20.0)
            with pytest.raises(StoreFenced, match="another replica leads"):
                a.store.record(stale, stale_entries, regions=("us-east", "eu-west"))
            assert a.store.fence is None
            assert len(a.fenced) == 1 and "no longer the one this replica won" in a.fenced[0]
            assert a.deposed and not a.election.leading

            # Nothing of A's decision reached etcd: B reads exactly what it read before,
            # and the newest key under the prefix is B's own leader key.
            b.store.read()
            assert b.store.rollout("svc", "v2") == state
            assert [e.reason for e in b.store.audit()] == [e.reason for e in entries]
            assert set(b.store.view.routes) == {"us-east"}
            assert max(kv.mod_revision for kv in raw(b.store).values()) == b.elected[0]
            assert all("stale" not in kv.value.decode() for kv in raw(b.store).values())

            # A stays fenced; B, the new leader, writes (the audit log goes on from 3).
            with pytest.raises(StoreFenced, match="does not lead"):
                a.store.record(stale, stale_entries)
            newer, newer_entries = later(state, "B's decision", now=30.0)
            b.store.record(newer, newer_entries, regions=("eu-west",))
            a.store.read()
            assert a.store.rollout("svc", "v2") == newer
            assert [e.id for e in a.store.audit()] == [1, 2, 3, 4, 5]
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_leader_past_its_deadline_writes_nothing(shared_etcd: EtcdCluster) -> None:
    """`may_write` (the election's deadline) is checked before the transaction: a leader
    that cannot know whether its lease still holds is refused without a round trip."""

    async def scenario() -> None:
        a = await replica(shared_etcd.url, "/test/deadline", "a", ttl=5)
        try:
            a.run()
            await wait_for_async(lambda: a.elected, "A to win the election", timeout=5)
            state, entries = started()
            a.store.may_write = lambda: False
            with pytest.raises(StoreFenced, match="not renewed in time"):
                a.store.record(state, entries, regions=("us-east",))
            assert a.fenced and a.deposed and a.store.fence is None
            assert not [k for k in raw(a.store) if "/rollouts/" in k or "/audit/" in k]
            # It gave its key up (the lease revoked), and campaigns again.
            await wait_for_async(lambda: len(a.elected) == 2, "A to be elected again", timeout=3)
            assert a.elected[1] > a.elected[0]
        finally:
            await a.close()

    asyncio.run(scenario())


# ---- atomic commits and versions ----


def test_record_commits_state_entries_and_routes_in_one_transaction(
    shared_etcd: EtcdCluster, tmp_path: Path
) -> None:
    async def scenario() -> None:
        prefix = "/test/atomic"
        a = await replica(shared_etcd.url, prefix, "a", ttl=5)
        try:
            pushed = await a.store.push_spec(spec_text(tmp_path), "mesh.yaml")
            assert pushed is not None
            a.store.read()  # (the watch would bring it; this test runs none)
            a.run()
            await wait_for_async(lambda: a.elected, "A to win the election", timeout=5)

            state, entries = started(("us-east", "eu-west", "ap-south"))
            a.store.record(state, entries, regions=("us-east", "eu-west"))
            keys = raw(a.store)
            written = {
                k: kv.mod_revision
                for k, kv in keys.items()
                if any(p in k for p in ("/rollouts/", "/audit-log/", "/audit-seq", "/routes/"))
            }
            assert sorted(k.removeprefix(prefix + "/").split("/")[0] for k in written) == [
                *["audit-log"] * 4,  # (audit-log/svc/v2/ID: the rollout's own log)
                "audit-seq",
                "rollouts",
                *["routes"] * 2,
            ]
            (revision,) = set(written.values())  # one transaction: one revision
            assert revision > pushed.revision
            assert [e.id for e in a.store.audit()] == [1, 2, 3, 4]
            assert [e.snapshot_version for e in a.store.audit()] == [
                None,  # the rollout's own entry had none
                *[revision * VERSION_SCALE] * 3,
            ]
            assert a.store.routes_version("us-east") == revision * VERSION_SCALE
            assert a.store.routes_version("eu-west") == revision * VERSION_SCALE
            # A region whose weights did not change keeps the spec's version.
            assert a.store.routes_version("ap-south") == pushed.revision * VERSION_SCALE

            # The next decision: the next ids, its own revision, only its regions move.
            new, new_entries = later(state, "advance", now=20.0)
            a.store.record(new, new_entries, regions=("ap-south",))
            second = raw(a.store)[a.store.keys.routes("ap-south")].mod_revision
            assert second > revision
            audit = a.store.audit()
            assert [e.id for e in audit] == [1, 2, 3, 4, 5, 6]
            assert audit[4].snapshot_version == second * VERSION_SCALE
            assert audit[5].snapshot_version is None
            assert a.store.routes_version("ap-south") == second * VERSION_SCALE
            assert a.store.routes_version("us-east") == revision * VERSION_SCALE

            # Every replica derives the same versions from the store.
            b = await open_store(shared_etcd.url, prefix)
            try:
                c = EtcdStore(b.address, b.client)
                c.read()  # (the blocking reader)
                for other in (b, c):
                    assert other.load_rollouts() == a.store.load_rollouts() == [new]
                    assert other.audit() == audit
                    for region in REGIONS:
                        assert other.routes_version(region) == a.store.routes_version(region)
                c.close()
            finally:
                await close_store(b)
        finally:
            await a.close()

    asyncio.run(scenario())


def test_a_record_that_fails_commits_none_of_its_parts(shared_etcd: EtcdCluster) -> None:
    """An audit id given behind the leader's back (audit-seq moved) fails the
    transaction: neither the state, nor any entry, nor a routes key is written."""

    async def scenario() -> None:
        a = await replica(shared_etcd.url, "/test/all-or-nothing", "a", ttl=5)
        try:
            a.run()
            await wait_for_async(lambda: a.elected, "A to win the election", timeout=5)
            state, entries = started()
            a.store.record(state, entries, regions=("us-east",))
            before = {k: kv.mod_revision for k, kv in raw(a.store).items()}
            squatter = a.store.log_keys.seq  # ids taken by another writer
            await a.store.client.put(squatter.encode(), b"5")

            new, new_entries = later(state, "advance", now=20.0)
            with pytest.raises(StoreWriteError):
                a.store.record(new, new_entries, regions=("us-east", "eu-west"))
            after = {k: kv.mod_revision for k, kv in raw(a.store).items()}
            assert {k: r for k, r in after.items() if k != squatter} == {
                k: r for k, r in before.items() if k != squatter
            }
            reader = await open_store(shared_etcd.url, "/test/all-or-nothing")
            try:
                assert reader.rollout("svc", "v2") == state
                assert [e.id for e in reader.audit()] == [1, 2, 3]
                assert set(reader.view.routes) == {"us-east"}
            finally:
                await close_store(reader)
        finally:
            await a.close()

    asyncio.run(scenario())


def test_a_new_leader_whose_view_lags_keeps_the_lead_and_commits_nothing(
    shared_etcd: EtcdCluster,
) -> None:
    """B loaded its view before A's last commit and has not seen it when it wins the key
    (a watch that lags; here, none). B's first commit would reuse A's audit ids: it is
    refused as a failed write (not as fenced: B leads), commits nothing, and once B's view
    is current its next commit goes through with the next ids."""

    async def scenario() -> None:
        prefix = "/test/lagging"
        a = await replica(shared_etcd.url, prefix, "a", ttl=30)
        b = await replica(shared_etcd.url, prefix, "b", ttl=2)  # view loaded now, no watch
        try:
            a.run()
            await wait_for_async(lambda: a.elected, "A to win the election", timeout=5)
            state, entries = started()
            a.store.record(state, entries, regions=("us-east",))
            a.tasks[0].cancel()  # A stops cleanly: it campaigns no more, and resigns
            await asyncio.wait(a.tasks)
            await a.election.resign()
            b.run()
            await wait_for_async(lambda: b.elected, "B to win the key A gave up", timeout=3)
            before = {k: kv.mod_revision for k, kv in raw(b.store).items()}

            new, new_entries = later(state, "B's first decision", now=20.0)
            with pytest.raises(StoreWriteError) as refused:
                b.store.record(new, new_entries, regions=("eu-west",))
            assert not isinstance(refused.value, StoreFenced), refused.value
            assert b.store.fence == b.elected[0] and b.election.leading and not b.deposed
            assert {k: kv.mod_revision for k, kv in raw(b.store).items()} == before

            b.store.read()  # B's view catches up (the watch's job)
            b.store.record(new, new_entries, regions=("eu-west",))
            reader = await open_store(shared_etcd.url, prefix)
            try:
                assert [e.id for e in reader.audit()] == [1, 2, 3, 4, 5]
                assert [e.reason for e in reader.audit()][3:] == ["B's first decision"] * 2
                assert reader.rollout("svc", "v2") == new
                assert reader.audit() == b.store.audit()
            finally:
                await close_store(reader)
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


# ---- the watch ----


def test_the_watch_follows_commits_through_a_member_failure(etcd_cluster: EtcdCluster) -> None:
    async def scenario() -> None:
        prefix = "/test/watch"
        a = await replica(etcd_cluster.url, prefix, "a", ttl=5)
        b = await replica(etcd_cluster.url, prefix, "b", ttl=5)
        told: list[frozenset[str]] = []
        b.store.subscribe(told.append)
        try:
            b.watch()
            a.run()
            await wait_for_async(lambda: a.elected, "A to win the election", timeout=5)
            await wait_for_async(
                lambda: b.store.view.leader, "B's watch to see A lead", timeout=WATCH_LATENCY
            )
            told.clear()

            state, entries = started()
            a.store.record(state, entries, regions=("us-east", "eu-west"))
            committed = time.monotonic()
            await wait_for_async(
                lambda: b.store.rollout("svc", "v2"), "B to see it", timeout=WATCH_LATENCY
            )
            assert time.monotonic() - committed < WATCH_LATENCY
            await wait_for_async(lambda: told, "B's listener to be told", timeout=WATCH_LATENCY)
            assert frozenset({"rollouts", "routes", "audit"}) in told
            assert b.store.rollout("svc", "v2") == state
            assert b.store.audit() == a.store.audit()
            for region in REGIONS:
                assert b.store.routes_version(region) == a.store.routes_version(region)

            # Kill the member our channels use (gRPC's pick_first: the first address).
            used = etcd_cluster.members[0].client_port
            assert used in local_peer_ports(), "expected our channels on the first member"
            etcd_cluster.kill(0)
            new, new_entries = later(state, "after a member died", now=20.0)
            # The first commit may fail (not fenced) when the member led raft: a new raft
            # leader takes longer than the commit's 1 s deadline. The next goes through.
            failures = []
            deadline = time.monotonic() + 5
            while True:
                try:
                    a.store.record(new, new_entries, regions=("us-east",))
                    break
                except StoreWriteError as exc:
                    failures.append(str(exc))
                    assert not isinstance(exc, StoreFenced), f"fenced by a member's death: {exc}"
                    assert time.monotonic() < deadline, f"no write for 5 s: {failures}"
                    await asyncio.sleep(0.1)  # retry backoff, bounded by the deadline
            assert a.store.fence is not None and a.election.leading
            await wait_for_async(
                lambda: b.store.rollout("svc", "v2") == new,
                "B's watch to deliver a commit made after a member died",
                timeout=3,
            )
            assert b.store.audit() == a.store.audit()
            assert [e.id for e in b.store.audit()] == [1, 2, 3, 4, 5]
            for region in REGIONS:
                assert b.store.routes_version(region) == a.store.routes_version(region)
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_watch_that_starts_far_behind_catches_up_past_grpcs_message_limit(
    shared_etcd: EtcdCluster,
) -> None:
    """A replica that fell behind (a reconnect; too busy to read its stream) is sent
    every revision since in one catch-up: 8 rewrites of a 1 MB directory key are 8 MB,
    twice what a gRPC message may be. The watch must still deliver them (in fragments),
    not break and start again from the same revision forever."""

    async def scenario() -> None:
        prefix = "/test/watch-behind"
        behind = await open_store(shared_etcd.url, prefix)
        writer = await open_store(shared_etcd.url, prefix)
        task: asyncio.Task[None] | None = None
        try:
            pad = "x" * 1_000_000
            for n in range(8):
                doc = {"id": "big", "regions": [], "n": n, "pad": pad}
                await writer.client.put(
                    behind.keys.replica("big").encode(), json.dumps(doc).encode()
                )
            task = asyncio.get_running_loop().create_task(behind.watch())
            await wait_for_async(
                lambda: behind.view.replicas.get("big", {}).get("n") == 7,
                "the watch to catch up on 8 MB of events",
                timeout=15,
            )
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await close_store(behind)
            await close_store(writer)

    asyncio.run(scenario())


# ---- the spec ----


def test_push_spec_numbers_changes_and_ignores_repeats(
    shared_etcd: EtcdCluster, tmp_path: Path
) -> None:
    async def scenario() -> None:
        prefix = "/test/spec"
        store = await open_store(shared_etcd.url, prefix)
        other = await open_store(shared_etcd.url, prefix)
        try:
            first, second = spec_text(tmp_path), spec_text(tmp_path, port=18200)
            assert first != second
            one = await store.push_spec(first, "a.yaml")
            assert one is not None and one.number == 1 and one.text == first
            assert await store.push_spec(first, "a.yaml") is None
            assert await other.push_spec(first, "elsewhere.yaml") is None
            two = await store.push_spec(second, "b.yaml")
            assert two is not None and two.number == 2 and two.revision > one.revision
            history = await other.spec_history()
            assert [(s.number, s.text, s.source) for s in history] == [
                (1, first, "a.yaml"),
                (2, second, "b.yaml"),
            ]
            assert history[0].revision == one.revision and history[1].revision == two.revision

            # The same new text from two clients at once: one push, no error.
            third = spec_text(tmp_path, port=18300)
            results = await asyncio.gather(
                store.push_spec(third, "x.yaml"), other.push_spec(third, "y.yaml")
            )
            assert sorted(r is None for r in results) == [False, True], results
            history = await store.spec_history()
            assert [s.number for s in history] == [1, 2, 3] and history[-1].text == third

            # A view loaded now, and a routes version from the spec's revision.
            reader = await open_store(shared_etcd.url, prefix)
            try:
                assert reader.view.spec is not None and reader.view.spec.text == third
                assert reader.view.spec.number == 3
                assert reader.routes_version("us-east") == history[-1].revision * VERSION_SCALE
            finally:
                await close_store(reader)
        finally:
            await close_store(store)
            await close_store(other)

    asyncio.run(scenario())


# ---- the election ----


def test_a_follower_takes_over_when_the_leader_stops_renewing(shared_etcd: EtcdCluster) -> None:
    """The leader's process stops (its task cancelled, nothing resigned or revoked): the
    key goes with its lease, after the TTL, and the follower wins; by then the old
    leader's own deadline has passed, so the two never both believe they may write."""

    async def scenario() -> None:
        ttl = 2
        prefix = "/test/takeover"
        a = await replica(shared_etcd.url, prefix, "a", ttl=ttl)
        b = await replica(shared_etcd.url, prefix, "b", ttl=ttl)
        try:
            a.run()
            await wait_for_async(lambda: a.elected, "A to win the election", timeout=5)
            b.run()
            # B watches the leader key as a replica does (the store's watch wakes it).
            b.store.subscribe(lambda changed: b.election.wake() if "leader" in changed else None)
            b.watch()

            b_elected = b.election.on_elected

            def b_wins(fence: int) -> None:
                a.valid_when_others_won.append(a.election.valid())
                b_elected(fence)

            b.election.on_elected = b_wins
            stopped = time.monotonic()
            a.tasks[0].cancel()  # the process stops: no resign, no revoke
            with contextlib.suppress(asyncio.CancelledError):
                await a.tasks[0]
            assert a.election.leading  # (it never learnt otherwise)

            await wait_for_async(lambda: b.elected, "B to take over", timeout=ttl + 1.5)
            took = b.elected_at[0] - stopped
            assert ttl / 3 < took <= ttl + 1.0, f"B took over {took:.2f} s after A stopped"
            assert a.valid_when_others_won == [False]
            assert b.elected[0] > a.elected[0]
            assert not a.election.valid()
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_an_election_ends_when_cancelled_in_the_tick_it_steps_down(
    shared_etcd: EtcdCluster,
) -> None:
    """A replica stopping (its tasks cancelled) just as a write fenced it: `Election.run`
    must end. On Python 3.11, `asyncio.wait_for` returns the inner result when the inner
    future completes and the task is cancelled in the same tick, so `_lead`'s wait on
    `_deposed` swallows the cancel and the election campaigns on (and may win again after
    `resign`)."""

    async def scenario() -> None:
        a = await replica(shared_etcd.url, "/test/cancel", "a", ttl=5)
        try:
            a.run()
            await wait_for_async(lambda: a.elected, "A to win the election", timeout=5)
            task = a.tasks[0]
            a.election.step_down("a write was fenced")  # as EtcdStore.record does
            task.cancel()  # and the replica stops, in the same tick
            done, _ = await asyncio.wait([task], timeout=2)
            assert done, (
                "Election.run ignored its cancellation (it stepped down in the same tick) "
                f"and was elected again {len(a.elected) - 1} time(s) after"
            )
        finally:
            await a.close()

    asyncio.run(scenario())


def test_a_leader_cut_off_from_etcd_stops_before_its_lease_can_expire(
    etcd_cluster: EtcdCluster,
) -> None:
    async def scenario() -> None:
        ttl = 2
        a = await replica(etcd_cluster.url, "/test/paused", "a", ttl=ttl)
        try:
            a.run()
            await wait_for_async(lambda: a.elected, "A to win the election", timeout=5)
            etcd_cluster.pause()
            try:
                paused = time.monotonic()
                await wait_for_async(
                    lambda: not a.election.valid(), "valid() to turn False", timeout=ttl
                )
                invalid_after = time.monotonic() - paused
                # etcd counts the lease from when it got the last renewal, which was sent
                # at `_renewed_at`: the lease may still be alive, the leader stops anyway.
                assert time.monotonic() < a.election._renewed_at + ttl, "valid() outlived it"
                await wait_for_async(lambda: a.deposed, "on_deposed", timeout=ttl)
                assert a.store.fence is None
                state, entries = started()
                with pytest.raises(StoreFenced):
                    a.store.record(state, entries)
            finally:
                etcd_cluster.resume()
            assert invalid_after < ttl
            # Once etcd answers again, it campaigns again and wins a new fence.
            await wait_for_async(
                lambda: len(a.elected) == 2, "A to be elected again", timeout=3 * ttl
            )
            assert a.elected[1] > a.elected[0] and a.election.valid()
        finally:
            await a.close()

    asyncio.run(scenario())
