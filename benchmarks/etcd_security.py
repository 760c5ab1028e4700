"""What etcd over TLS with a login costs a replica (issue 30): the same calls against a
three-member etcd on loopback in plaintext and one with TLS on client and peer ports,
client certificates required and authentication on (`EtcdCluster(secure=True)`, the
lab's `--ha --mtls` store, bcrypt cost 4). Per store:

- `check`: `check_access`, the command line's one check before anything starts (a new
  channel, a login, a read);
- `first`: a new address's first blocking read (channel, handshake, login);
- `commit`: the fenced commit's call, a blocking `Txn` of one put (median and p99 of
  `--calls`);
- `get`: the async client's read (median and p99);
- `login`: a login forced (the token forgotten) and the read after it.

    python benchmarks/etcd_security.py [--calls 200] [--json]
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

from xds_server.ha.etcd import SyncKV, async_client, check_access, parse_store_url, put_op
from xds_server.lab.etcd import EtcdCluster

PREFIX = "/xds-server/bench-security"


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def spread(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median": ms(statistics.median(ordered)), "p99": ms(ordered[int(len(ordered) * 0.99)])}


def timed(call: Any) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(cluster: EtcdCluster, calls: int) -> dict[str, Any]:
    address = parse_store_url(cluster.url, PREFIX, cluster.security())
    out: dict[str, Any] = {"check": ms(timed(lambda: check_access(address)))}
    kv = SyncKV(address)
    key = f"{PREFIX}/k"
    try:
        out["first"] = ms(timed(lambda: kv.range(key)))
        request = rpc.TxnRequest(success=[put_op(key, b"x" * 200)])
        out["commit"] = spread([timed(lambda: kv.txn(request)) for _ in range(calls)])
        if address.token.login is not None:
            address.token.value = "forgotten"
            out["login"] = ms(timed(lambda: kv.range(key)))
    finally:
        kv.close()

    async def gets() -> list[float]:
        client = async_client(address)
        try:
            await client.get(key.encode())
            samples = []
            for _ in range(calls):
                started = time.perf_counter()
                await client.get(key.encode())
                samples.append(time.perf_counter() - started)
            return samples
        finally:
            await client.close()

    out["get"] = spread(asyncio.run(gets()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="etcd-security-") as tmp:
        for name, secure in (("plaintext", False), ("tls+login", True)):
            with EtcdCluster(Path(tmp) / name, secure=secure) as cluster:
                results[name] = measure(cluster, args.calls)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, r in results.items():
        login = f", login forced {r['login']} ms" if "login" in r else ""
        print(
            f"{name:10} check {r['check']} ms, first read {r['first']} ms, "
            f"commit median {r['commit']['median']} / p99 {r['commit']['p99']} ms, "
            f"async get median {r['get']['median']} / p99 {r['get']['p99']} ms{login}"
        )


if __name__ == "__main__":
    main()
