"""What a replica's directory key costs at fleet scale, in CPU, without etcd: one
replica with `--nodes` connected nodes (every one has ACKed the routes) encodes its
key (`ha/replicas.py` `Directory`: inline, or in parts past one etcd value), first
with nothing cached, then again after `--acks` of its nodes ACK a new version (what a
rewrite during a push's ACKs pays); a peer decodes it; and how long the key waits
between rewrites at that size (`Directory.coalesce`).

`benchmarks/push_fanout.py --replicas R` measures the whole path on a real etcd; this
says what the directory's own part costs (the median of `--repeat` runs), so two
commits can be compared.

    python benchmarks/directory_cost.py [--nodes 1000 3000 10000] [--acks 300]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable

from xds_server.ha import directory_parts
from xds_server.ha.etcd import parse_store_url
from xds_server.ha.replicas import Directory, ReplicaInfo
from xds_server.ha.store import EtcdStore
from xds_server.spec import validate_spec
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.types import ROUTE

REGIONS = ("us-east", "eu-west")


def spec_doc() -> dict[str, object]:
    return {
        "regions": list(REGIONS),
        "listener": {"port": 10000},
        "services": [
            {
                "name": "recommender",
                "pools": {
                    pool: {"version": v, "endpoints": {r: ["127.0.0.1:1"] for r in REGIONS}}
                    for pool, v in (("production", "v1"), ("canary", "v2"))
                },
            }
        ],
    }


def median_ms(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.process_time()
        work()
        times.append(time.process_time() - started)
    return statistics.median(times) * 1000


def measure(nodes: int, acks: int, repeat: int) -> dict[str, float]:
    spec = validate_spec(spec_doc(), "directory_cost")
    publisher = XdsPublisher(spec)
    version = publisher.snapshot("us-east").type_version(ROUTE)
    fleet = []
    for i in range(nodes):
        n = publisher.nodes.connect(f"us-east-envoy-{i:05d}", "us-east", user_agent="envoy/1.40")
        publisher.nodes.record_sent(n, ROUTE, version)
        publisher.nodes.record_ack(n, ROUTE, version)
        fleet.append(n)
    store = EtcdStore(parse_store_url("etcd://127.0.0.1:1"))  # (no call is made)
    info = ReplicaInfo("r1", (), "127.0.0.1:1", "127.0.0.1:2", 0.0)

    def fresh() -> Directory:
        return Directory(store, info, publisher, ttl=10)

    def encode(d: Directory) -> tuple[bytes, list[bytes]]:
        return directory_parts.encode(d.document(with_nodes=False), d._node_fragments())

    cold = median_ms(lambda: encode(fresh()), repeat)
    warm_dir = fresh()
    encode(warm_dir)

    def after_acks() -> None:
        for k, n in enumerate(fleet[:acks]):
            publisher.nodes.record_ack(n, ROUTE, f"{version}-{k}-{time.monotonic()}")
        encode(warm_dir)

    acked = median_ms(after_acks, repeat)
    head, parts = encode(warm_dir)
    size = len(head) + sum(len(p) for p in parts)

    def decode() -> None:
        directory_parts.merged(
            json.loads(head), {k: directory_parts.read_part(p) for k, p in enumerate(parts)}
        )

    warm_dir._written_bytes = size
    return {
        "nodes": nodes,
        "mb": size / 1e6,
        "parts": len(parts),
        "encode_cold_ms": cold,
        "encode_after_acks_ms": acked,
        "decode_ms": median_ms(decode, repeat),
        "coalesce_s": warm_dir.coalesce(beat=10 / 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[1000, 3000, 10000])
    p.add_argument("--acks", type=int, default=300, help="nodes that ACK between rewrites")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    logging.disable(logging.INFO)
    print(f"directory key per replica ({a.acks} ACKs between rewrites; median of {a.repeat})")
    print("  nodes     MB  parts  encode ms (cold)  encode ms (after ACKs)  decode ms  waits s")
    # (waits: between rewrites, `Directory.coalesce`, with the default 10 s lease)
    for n in a.nodes:
        r = measure(n, min(a.acks, n), a.repeat)
        print(
            f"{r['nodes']:7d} {r['mb']:6.2f} {r['parts']:6d} {r['encode_cold_ms']:17.1f}"
            f" {r['encode_after_acks_ms']:23.1f} {r['decode_ms']:10.1f} {r['coalesce_s']:8.2f}"
        )


if __name__ == "__main__":
    main()
