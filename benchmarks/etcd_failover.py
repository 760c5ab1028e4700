"""How soon a replica's etcd clients leave a member that goes silent (issue 29's
leader-isolated run): a real three-member etcd cluster on loopback, each member behind a
relay (`lab.relay`); the relay in front of the first member, the one the clients dial
first, is cut (its packets stop, nothing is reset). Times, from the cut:

- `moved`: the client's member order moves on (`Members.failover`);
- `renewed`: the first lease renewal that goes through (`ha.etcd.renew`, as the leader's
  and the replicas' renewals go), started as the member went silent;
- `watched`: a write made straight to the third member reaches the client's watch.

Each run heals the relay and starts from a fresh client, connected through the first
member.

    python benchmarks/etcd_failover.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from aetcd import rpc

from xds_server.ha.etcd import SyncKV, async_client, parse_store_url, put_op, renew
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.relay import Relay

PREFIX = b"/bench/failover/"


async def one_run(url: str, third: str, run: int) -> dict[str, float]:
    address = parse_store_url(url)
    client = async_client(address)
    try:
        lease = await client.lease(5)
        revision = (await client.get_prefix(PREFIX)).header.revision
        await client.refresh_lease(lease.id)  # (connected through the first member)
        return await _cut_and_time(client, address, lease.id, revision, third, run)
    finally:
        await client.close()


async def _cut_and_time(
    client: Any, address: Any, lease: int, revision: int, third: str, run: int
) -> dict[str, float]:
    """As `EtcdStore.watch` does: a watch that ends (its channel left) is made again
    from the revision it has seen."""
    watch = await client.watch_prefix(PREFIX, start_revision=revision + 1)
    RELAYS[0].cut()
    cut = time.monotonic()
    try:
        moved = asyncio.create_task(_moved(address, cut))
        renewal = asyncio.create_task(renew(client, lease, cut + 5.0, "bench lease"))
        key = PREFIX + str(run).encode()
        outside = SyncKV(parse_store_url(f"etcd://{third}"))
        try:
            outside.txn(rpc.TxnRequest(success=[put_op(key.decode(), b"x")]))
        finally:
            outside.close()
        async with asyncio.timeout(10):
            while True:
                async for event in watch:
                    if event.kv.key == key:
                        break
                else:  # (the watch ended: the client left its channel)
                    watch = await client.watch_prefix(PREFIX, start_revision=revision + 1)
                    continue
                break
            watched = time.monotonic() - cut
            await renewal
            renewed = time.monotonic() - cut
            return {"moved": await moved, "renewed": renewed, "watched": watched}
    finally:
        RELAYS[0].heal()


async def _moved(address: Any, cut: float) -> float:
    while address.members.generation == 0:
        await asyncio.sleep(0.005)
    return time.monotonic() - cut


RELAYS: list[Relay] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EtcdCluster(Path(tmp)) as cluster:
        RELAYS[:] = [Relay(("127.0.0.1", m.client_port)) for m in cluster.members]
        try:
            url = "etcd://" + ",".join(r.address for r in RELAYS)
            third = cluster.members[2].client_address
            runs = [asyncio.run(one_run(url, third, i)) for i in range(args.runs)]
        finally:
            for relay in RELAYS:
                relay.close()
    if args.json:
        print(json.dumps(runs))
        return
    print(f"etcd failover, first member silent ({args.runs} runs; seconds from the cut)")
    for name in ("moved", "renewed", "watched"):
        values = [r[name] for r in runs]
        print(
            f"  {name:8} median {statistics.median(values):.2f}  "
            f"max {max(values):.2f}  ({', '.join(f'{v:.2f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
