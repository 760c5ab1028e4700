"""What one registry update costs a replica, in CPU, without etcd or a network: the
registry changes by `--changes` instances (half new registrations, half expiries), then
the replica's path from the store's view to encoded EDS responses runs once: the served
spec (`StoreSpecSource`: the registry's instances added to the pushed spec), each
region's resources (`RegionBuilder`), the snapshot (`Snapshot.successor`) and its
endpoints response, encoded once for a stream.

`benchmarks/registry_churn.py` measures the same path end to end on a real etcd with
three replicas; on a shared machine its latencies mostly measure the wait for a CPU.
This says what the path itself costs (process CPU time, the median of `--updates`
updates), so two commits can be compared: run it with PYTHONPATH pointing at each.

    python benchmarks/registry_update_cost.py [--instances 10000] [--changes 100]
        [--regions 3] [--updates 30]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from xds_server.ha.instances import Instance
from xds_server.spec import validate_spec
from xds_server.traffic import TrafficState
from xds_server.xds.resources import RegionBuilder
from xds_server.xds.snapshot import Snapshot
from xds_server.xds.types import ENDPOINT

SERVICE = "recommender"
REGIONS = ("us-east", "eu-west", "ap-south")


def served_spec_function() -> Callable[[Any, dict[str, Instance], Any], Any]:
    """spec, registry, previous -> the served spec: by a `RegistryIndex` kept from one
    update to the next where there is one, else `with_registered` from scratch (the
    code before it)."""
    try:
        from xds_server.ha.instances import RegistryIndex
    except ImportError:
        from xds_server.ha.instances import with_registered

        return lambda spec, registry, previous: (
            with_registered(spec, registry.values(), previous, TrafficState()).spec
        )
    index = RegistryIndex()

    def serve(spec: Any, registry: dict[str, Instance], previous: Any) -> Any:
        index.update(registry)
        return index.serve(spec, previous, TrafficState()).spec

    return serve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--changes", type=int, default=100, help="instances changed per update")
    p.add_argument("--regions", type=int, default=3)
    p.add_argument("--updates", type=int, default=30)
    a = p.parse_args()
    regions = REGIONS[: a.regions]
    spec = validate_spec(
        {
            "regions": list(regions),
            "services": [
                {
                    "name": SERVICE,
                    "pools": {"production": {"version": "v1"}, "canary": {"version": "v2"}},
                }
            ],
        },
        "registry",
    )
    rng = random.Random(1)
    revision = iter(range(1, 10**9))

    def instance(i: int) -> tuple[str, Instance]:
        region, version = regions[i % len(regions)], "v2" if i % 5 == 0 else "v1"
        address = f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}:8080"
        key = f"registry/{SERVICE}/{region}/{version}/{address}"
        return key, Instance(SERVICE, version, region, address, 0.0, 3.0, 1, next(revision))

    registry = dict(instance(i) for i in range(a.instances))
    serve = served_spec_function()
    builders = {r: RegionBuilder(r) for r in regions}
    served = serve(spec, registry, None)
    snaps = {
        r: Snapshot.first(builders[r].build(served, TrafficState()), ("0.0.0.0", 1))
        for r in regions
    }
    for snap in snaps.values():
        snap.encoded(ENDPOINT, None)
    next_index = a.instances
    costs: dict[str, list[float]] = {"served spec": [], "resources": [], "snapshot + EDS": []}
    for _ in range(a.updates):
        for key in rng.sample(sorted(registry), a.changes // 2):
            del registry[key]
        for _ in range(a.changes - a.changes // 2):
            key, inst = instance(next_index)
            registry[key] = inst
            next_index += 1
        t0 = time.process_time()
        served = serve(spec, registry, served)
        t1 = time.process_time()
        built = {r: builders[r].build(served, TrafficState()) for r in regions}
        t2 = time.process_time()
        for r in regions:
            snaps[r] = snaps[r].successor(built[r], ("0.0.0.0", 1))
            snaps[r].encoded(ENDPOINT, None)
        t3 = time.process_time()
        costs["served spec"].append(t1 - t0)
        costs["resources"].append(t2 - t1)
        costs["snapshot + EDS"].append(t3 - t2)
    print(
        f"{a.instances} instances over {len(regions)} regions, {a.changes} changed per update; "
        f"CPU per update (median of {a.updates}):"
    )
    total = 0.0
    for name, values in costs.items():
        ms = statistics.median(values) * 1000
        total += ms
        print(f"  {name:<16} {ms:7.1f} ms")
    print(f"  {'total':<16} {total:7.1f} ms")


if __name__ == "__main__":
    main()
