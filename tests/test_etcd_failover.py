"""A replica's etcd clients move on from a member that goes silent (issue 29's
leader-isolated run): on a real three-member etcd cluster, each member behind a relay
(`lab.relay`), the relay in front of the first member, the one every client dials
first, is cut: the member's packets are dropped, not refused, so nothing resets the
connections. Every connection a replica holds keeps going through the other members:
the leader's lease, its fenced commit, the watch, the replica's own key, a model
server's registration, and the one-shot commands (`spec push`, the store read once).
Without the failover each of these waits on the silent member until its lease runs out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from aetcd import rpc

from tests.conftest import REGIONS, make_spec_doc
from tests.support import wait_for_async
from tests.test_etcd_store import replica, spec_text, started
from xds_server.ha.etcd import SyncKV, parse_store_url, put_op
from xds_server.ha.oneshot import push_spec, read_once
from xds_server.ha.registry import registered
from xds_server.ha.replicas import Directory, ReplicaInfo
from xds_server.ha.store import EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.relay import Relay
from xds_server.rollout.ports import StoreWriteError
from xds_server.spec import validate_spec
from xds_server.xds.publisher import XdsPublisher

TTL = 3
"""The lab's `--leader-ttl`: a lease renewed every second, a leader that stops deciding
2.25 s after its last renewal, a replica that steps aside after 2.5 s without its key."""


@pytest.fixture
def relays(shared_etcd: EtcdCluster) -> Iterator[list[Relay]]:
    """One relay per member, in the members' order (the store URL's order)."""
    out = [Relay(("127.0.0.1", m.client_port)) for m in shared_etcd.members]
    yield out
    for relay in out:
        relay.close()


def through(relays: list[Relay]) -> str:
    return "etcd://" + ",".join(r.address for r in relays)


def test_a_leader_whose_first_member_goes_silent_keeps_leading_through_the_others(
    tmp_path: Path, shared_etcd: EtcdCluster, relays: list[Relay]
) -> None:
    prefix = "/test/failover"
    url = through(relays)

    async def scenario() -> None:
        rep = await replica(url, prefix, "a", ttl=TTL)
        spec = validate_spec(yaml.safe_load(spec_text(tmp_path)), "mesh.yaml")
        publisher = XdsPublisher(spec)
        info = ReplicaInfo("a", (), "127.0.0.1:1", "127.0.0.1:2", time.time())
        directory = Directory(rep.store, info, publisher, ttl=TTL)
        loop = asyncio.get_running_loop()
        rep.tasks.append(loop.create_task(directory.run()))
        rep.watch()
        rep.run()
        try:
            await rep.store.push_spec(spec_text(tmp_path), "mesh.yaml")
            async with registered(
                url, "recommender", "v2", "us-east", "127.0.0.1:9", ttl=TTL, prefix=prefix
            ):
                await wait_for_async(lambda: rep.elected, "A to lead", timeout=10)
                await wait_for_async(
                    lambda: "a" in rep.store.view.replicas and rep.store.view.registry,
                    "its key and the registration in its view",
                    timeout=10,
                )
                registration = dict(rep.store.view.registry)
                fence = rep.store.fence
                state, entries = started()
                rep.store.record(state, entries, regions=("us-east",))

                relays[0].cut()  # the member every client dials first: silent
                cut = time.monotonic()
                # Another writer, straight to the third member: the watch must bring it.
                outside = SyncKV(parse_store_url(f"etcd://{shared_etcd.members[2].client_address}"))
                try:
                    put = put_op(f"{prefix}/routes/eu-west", b"7")
                    outside.txn(rpc.TxnRequest(success=[put]))
                finally:
                    outside.close()
                await wait_for_async(
                    lambda: "eu-west" in rep.store.view.routes,
                    "the watch to bring a write made past the silent member",
                    timeout=2 * TTL,
                )
                committed = await _commit_when_possible(rep.store, time.monotonic() + TTL)
                # Past two TTLs: a lease kept only through the silent member is gone by now.
                while time.monotonic() < cut + 2 * TTL:
                    assert directory.store_lost() is None, directory.store_lost()
                    await asyncio.sleep(0.1)
                assert rep.deposed == [] and rep.fenced == [], (rep.deposed, rep.fenced)
                assert rep.election.leading and rep.store.fence == fence
                assert committed and rep.store.view.leader is not None
                assert rep.store.view.leader.create_revision == fence
                # The registration's key is the same key on the same lease, still there.
                assert rep.store.view.registry == registration
                heard = rep.store.view.heard["a"][1]
                assert time.monotonic() - heard < 2 * TTL / 3, "its key is not rewritten"
                assert rep.store.client.members.order[-1] == relays[0].address
        finally:
            await rep.close()

    asyncio.run(scenario())


async def _commit_when_possible(store: EtcdStore, until: float) -> bool:
    """A fenced commit after the cut: the first may fail (it went to the silent member,
    and moved the commit channel on); the next one goes through another member."""
    state, entries = started(("us-east", "eu-west"), service="after-cut", now=20.0)
    failures = []
    while time.monotonic() < until:
        try:
            store.record(state, entries, regions=("eu-west",))
            return True
        except StoreWriteError as exc:
            failures.append(str(exc))
            await asyncio.sleep(0.1)
    raise AssertionError(f"no commit went through: {failures}")


def test_a_reader_and_the_one_shot_commands_move_past_a_member_gone_silent(
    relays: list[Relay],
) -> None:
    """A reader that keeps its connection (the lab's driver reads the store all along)
    reads through the other members once the one it is on goes silent; `spec push` and
    a read made once (`manifests istio --store`) answer too. (A new connection to a
    silent member never gets etcd's HTTP/2 settings and gRPC moves on by itself: what
    fails without the failover is a connection made before the member went silent.)"""
    address = parse_store_url(through(relays), "/test/failover-oneshot")
    reader = EtcdStore(address)
    try:
        reader.read()  # (connected to the first member)
        assert reader.view.spec is None
        relays[0].cut()
        ports = {(r, p): 18100 for r in REGIONS for p in ("production", "canary")}
        text = yaml.safe_dump(make_spec_doc(ports))
        pushed = push_spec(address, text, "mesh.yaml")
        assert pushed is not None and pushed.number == 1
        reader.read()
        assert reader.view.spec is not None and reader.view.spec.text == text
        stored = read_once(address)
        assert stored.spec is not None and stored.spec.text == text
        assert address.members.order[-1] == relays[0].address
    finally:
        reader.close()
