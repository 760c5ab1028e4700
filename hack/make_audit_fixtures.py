"""Make the audit log compatibility fixtures in tests/data/ with the code of a checkout.

The typed audit record (`rollout/audit.py`, `rollout/audit_codec.py`) must read what
earlier versions wrote. This runs one real `RolloutController` scenario (the test
doubles of tests/test_controller.py: no Envoy, no Prometheus) twice, once on each store,
and keeps what they wrote:

- tests/data/audit_v1.sqlite3: the SQLite `Store`'s file;
- tests/data/audit_v1_etcd.json: every key under the `EtcdStore`'s prefix (a real
  one-member etcd), its value as text and its revisions.

The scenario: a warm-up with shadow traffic (weights with a `shadow` share), a hold for
want of data in one region, passed steps, an operator's pause and resume, a canary that
fails in one region (a failed guardrail and a `high` analysis metric: a rollback), then
a second rollout that an operator aborts.

The committed fixtures were made on commit d026d5c (the code before the typed record),
from that checkout (/work/base, a worktree of it):

    cd /work/base && PYTHONPATH=/work/base /work/main/.venv/bin/python \\
        /work/main/hack/make_audit_fixtures.py /work/main/tests/data

They are kept as made; run this again only to make fixtures of a newer format (under
new names), never to overwrite these.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.test_controller import (
    CANARY,
    SERVICE,
    FakeClock,
    InMemoryDataPlane,
    Rig,
    ScriptedMetricSource,
    make_spec,
)
from xds_server.ha.etcd import async_client, parse_store_url, range_end
from xds_server.ha.store import EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.rollout.judge import Measurement
from xds_server.rollout.state import PROGRESSING, ROLLED_BACK
from xds_server.rollout.store import FILE_NAME, Store
from xds_server.spec import MeshSpec, RolloutPlan

PREFIX = "/fixture"
WARMUP = {"health_check": {}, "shadow": {"percent": 20, "duration": "2s"}}


class QuietSource(ScriptedMetricSource):
    """The scripted source, and regions with no data at all (`quiet`): a hold."""

    def __init__(self) -> None:
        super().__init__()
        self.quiet: set[str] = set()

    async def measure(
        self,
        plan: RolloutPlan,
        region: str,
        cluster: str,
        window_s: float,
        *,
        p99: bool = True,
        buckets: bool = False,
    ) -> Measurement:
        got = await super().measure(plan, region, cluster, window_s, p99=p99, buckets=buckets)
        return Measurement() if region in self.quiet else got


def mesh(canary: str) -> MeshSpec:
    """tests/test_controller.py's mesh (three regions; `recommender` with production,
    baseline and canary pools), its canary at version `canary`, with a warm-up."""
    spec = make_spec(warmup=WARMUP)
    svc = spec.service(SERVICE)
    pools = {**svc.pools, "canary": replace(svc.pools["canary"], version=canary)}
    services = tuple(replace(s, pools=pools) if s.name == SERVICE else s for s in spec.services)
    return replace(spec, services=services)


async def scenario(rig: Rig) -> None:
    metrics = rig.metrics
    assert isinstance(metrics, QuietSource)

    def regions_at(step: int) -> bool:
        return all(rs.step >= step for rs in rig.state().regions.values())

    await rig.start()
    await rig.tick_until(lambda: regions_at(0))
    metrics.quiet.add("ap-south")
    await rig.tick()
    await rig.tick()
    metrics.quiet.clear()
    await rig.tick_until(lambda: regions_at(1))
    rig.controller.pause(SERVICE, "looking at the latency graph", "alice")
    await rig.tick()
    rig.controller.resume(SERVICE, "the graph is fine", "alice")
    # At 20%, against the baseline: the guardrail and the analysis both fail.
    metrics.bad.add("eu-west")
    await rig.tick_until(lambda: rig.state().phase == ROLLED_BACK)
    metrics.bad.clear()

    rig.spec = mesh("v3")
    await rig.controller.reconcile()
    await rig.tick_until(lambda: rig.state().phase == PROGRESSING and regions_at(0))
    rig.controller.abort(SERVICE, "wrong build", "bob")


def make_rig(store: Any, clock: FakeClock) -> Rig:
    return Rig(mesh(CANARY), clock, store, InMemoryDataPlane(clock, store), QuietSource())


def sqlite_fixture(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.in_dir(tmp)
        asyncio.run(scenario(make_rig(store, FakeClock())))
        store.close()
        db = sqlite3.connect(Path(tmp) / FILE_NAME)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        print(f"{out}: {len(Store.read_only(tmp).audit())} entries")
        shutil.copyfile(Path(tmp) / FILE_NAME, out)


async def etcd_scenario(url: str) -> list[dict[str, Any]]:
    address = parse_store_url(url, PREFIX)
    store = EtcdStore(address, async_client(address))
    await store.start()
    # This process leads: a leader key of its own, as an election would put it.
    await store.client.put(store.keys.leader.encode(), b"fixture")
    leader = await store.client.get(store.keys.leader.encode())
    store.fence = leader.create_revision
    await scenario(make_rig(store, FakeClock()))
    got = store.kv.range(store.keys.everything, range_end(store.keys.everything))
    store.close()
    await store.client.close()
    return [
        {
            "key": kv.key.decode(),
            "value": kv.value.decode(),
            "create_revision": kv.create_revision,
            "mod_revision": kv.mod_revision,
            "version": kv.version,
        }
        for kv in got.kvs
    ]


def etcd_fixture(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp, EtcdCluster(Path(tmp), members=1) as cluster:
        keys = asyncio.run(etcd_scenario(cluster.url))
    doc = {"prefix": PREFIX, "made_on": "d026d5c", "keys": keys}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{out}: {len(keys)} keys")


def main() -> None:
    data = Path(sys.argv[1])
    sqlite_fixture(data / "audit_v1.sqlite3")
    etcd_fixture(data / "audit_v1_etcd.json")


if __name__ == "__main__":
    main()
