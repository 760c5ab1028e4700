"""What a rollout group's rollback costs before its push: the controller commits every
member's state and audit entries (one fsync'd SQLite transaction each), then pushes
once. This times `RolloutController.commit` of one member's rollback, from the call to
the data plane's `set_traffic`, for groups of 1 (no group), 2, 4 and 8 members, each
over three regions, on a real SQLite store in a temp dir (on the disk the temp dir is
on) and an in-memory data plane.

    python benchmarks/group_rollback_commit.py [--runs 30] [--json]
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

from xds_server.rollout import decide as sm
from xds_server.rollout.controller import RolloutController
from xds_server.rollout.ports import QueryCheck
from xds_server.rollout.store import Store
from xds_server.spec import MeshSpec, RolloutPlan, validate_spec
from xds_server.traffic import TrafficState
from xds_server.xds.dataplane import Applied, RouteStatus
from xds_server.xds.status import NodeStatus

REGIONS = ("us-east", "eu-west", "ap-south")


class DataPlane:
    """In memory: remembers when the last push came."""

    def __init__(self) -> None:
        self.pushed_at: list[float] = []
        self.traffic = TrafficState()

    def set_traffic(self, traffic: TrafficState, *, urgent: bool, reason: str) -> None:
        self.pushed_at.append(time.perf_counter())
        self.traffic = traffic

    def next_version(self, region: str) -> int:
        return len(self.pushed_at) + 1

    def routes_applied(self, region: str) -> RouteStatus:
        return Applied(str(len(self.pushed_at)), at=time.time(), nodes=1)

    def node_status(self, region: str | None = None) -> list[NodeStatus]:
        return []

    def pool_hosts(self, region: str, cluster: str) -> int | None:
        return None


class Metrics:
    """Only what starting a rollout asks: every query answers."""

    async def check_queries(self, plan: RolloutPlan, *args: Any) -> QueryCheck:
        return QueryCheck((), None)


def spec(members: int) -> MeshSpec:
    def pool(version: str, port: int) -> dict[str, Any]:
        return {"version": version, "endpoints": {r: [f"127.0.0.1:{port}"] for r in REGIONS}}

    services = [
        {
            "name": f"s{i}",
            "domains": [f"s{i}.local"],
            "pools": {"production": pool("v1", 9000 + 2 * i), "canary": pool("v2", 9001 + 2 * i)},
        }
        for i in range(members)
    ]
    doc: dict[str, Any] = {"regions": list(REGIONS), "services": services}
    if members > 1:
        doc["rollout_groups"] = [{"name": "g", "services": [s["name"] for s in services]}]
    return validate_spec(doc)


def one_run(members: int, state_dir: Path) -> float:
    """Seconds from commit() of member s0's rollback to its (only) push."""
    mesh = spec(members)
    store = Store.in_dir(state_dir)
    dataplane = DataPlane()
    controller = RolloutController(lambda: mesh, dataplane, store, Metrics())  # type: ignore[arg-type]
    try:
        controller.restore()
        asyncio.run(controller.reconcile())
        pushes = len(dataplane.pushed_at)
        state = controller.rollouts["s0"]
        decision = sm.abort(state, time.time(), "benchmark")
        start = time.perf_counter()
        controller.commit(mesh.service("s0"), decision)
        assert len(dataplane.pushed_at) == pushes + 1, "one push"
        assert len(controller.rollouts) == members
        assert all(s.phase == "rolled_back" for s in controller.rollouts.values())
        return dataplane.pushed_at[-1] - start
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for members in (1, 2, 4, 8):
            times = [one_run(members, Path(tmp) / f"{members}-{i}") for i in range(args.runs)]
            out[members] = {
                "median_ms": statistics.median(times) * 1000,
                "p90_ms": statistics.quantiles(times, n=10)[-1] * 1000,
                "max_ms": max(times) * 1000,
            }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{'members':>7}  {'median ms':>9}  {'p90 ms':>7}  {'max ms':>7}  (commit -> push)")
    for members, t in out.items():
        print(f"{members:>7}  {t['median_ms']:>9.2f}  {t['p90_ms']:>7.2f}  {t['max_ms']:>7.2f}")


if __name__ == "__main__":
    main()
