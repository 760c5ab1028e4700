"""Real-fleet convergence: N real Envoys (--concurrency 1) across 3 regions; one weight
change; the time from the decision (the push) to the last Envoy whose own admin endpoint
reports the new routes.

Each Envoy is polled by its own thread (`/config_dump?resource=dynamic_route_configs`,
every 10 ms, bounded by a deadline).

    python benchmarks/fleet_convergence.py [--envoys 30] [--mode sotw delta] [--pushes 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from xds_server.lab.background import BackgroundServer
from xds_server.lab.procs import Envoy, free_port, http_get
from xds_server.render.bootstrap import BootstrapOptions
from xds_server.spec import validate_spec
from xds_server.traffic import Split

REGIONS = ("us-east", "eu-west", "ap-south")


def route_version(envoy: Envoy) -> str:
    status, body, _ = http_get(envoy.admin + "/config_dump?resource=dynamic_route_configs")
    if status != 200:
        return ""
    configs = json.loads(body).get("configs", [])
    return str(configs[0].get("version_info", "")) if configs else ""


def run(n: int, mode: str, pushes: int, workdir: Path) -> dict[str, Any]:
    spec = validate_spec(
        {
            "regions": list(REGIONS),
            "services": [
                {
                    "name": "recommender",
                    "pools": {
                        p: {
                            "version": "v1",
                            "endpoints": {
                                r: [f"127.0.0.1:{9000 + i}"] for i, r in enumerate(REGIONS)
                            },
                        }
                        for p in ("production", "canary")
                    },
                }
            ],
        },
        "fleet",
    )
    server = BackgroundServer(spec)
    port = server.start()
    envoys = [
        Envoy(
            BootstrapOptions(
                region=REGIONS[i % 3],
                node_id=f"envoy-{i}",
                xds_port=port,
                admin_port=free_port(),
                listen=f"127.0.0.1:{free_port()}",
                delta=mode == "delta",
            ),
            workdir,
        )
        for i in range(n)
    ]
    try:
        for e in envoys:
            e.wait_ready(60)
        rounds = []
        for i in range(pushes):
            t0 = time.time()
            server.call(
                lambda i=i: server.server.set_split(  # type: ignore[misc]
                    "recommender", Split.from_percent({"canary": 10 * (i + 1)}), urgent=True
                )
            )
            want = {r: server.route_version(r, delta=mode == "delta") for r in REGIONS}
            seen: dict[str, float] = {}

            def watch(e: Envoy, want: dict[str, str] = want, seen: dict[str, float] = seen) -> None:
                deadline = time.time() + 30
                while time.time() < deadline:
                    if route_version(e) == want[e.opts.region]:
                        seen[e.opts.node_id] = time.time()
                        return
                    time.sleep(0.01)  # the poll period, bounded by the deadline

            threads = [threading.Thread(target=watch, args=(e,)) for e in envoys]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            lat = sorted(t - t0 for t in seen.values())
            rounds.append(
                {"converged": len(lat), "p50_s": statistics.median(lat), "max_s": lat[-1]}
            )
        return {
            "mode": mode,
            "envoys": n,
            "rounds": rounds,
            "p50_s": statistics.median(r["p50_s"] for r in rounds),
            "max_s": max(r["max_s"] for r in rounds),
            "all_converged": all(r["converged"] == n for r in rounds),
        }
    finally:
        for e in envoys:
            e.stop()
        server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envoys", type=int, default=30)
    p.add_argument("--mode", nargs="+", default=["sotw", "delta"], choices=["sotw", "delta"])
    p.add_argument("--pushes", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    rows = []
    for mode in a.mode:
        with tempfile.TemporaryDirectory(prefix="fleet-") as d:
            rows.append(run(a.envoys, mode, a.pushes, Path(d)))
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{a.envoys} real Envoys over {len(REGIONS)} regions, {a.pushes} weight changes "
        "(time from the push to each Envoy's admin reporting the new routes)"
    )
    print(f"{'mode':>5} {'converged':>9} {'p50 ms':>7} {'max ms':>7}")
    for r in rows:
        conv = min(x["converged"] for x in r["rounds"])
        print(
            f"{r['mode']:>5} {conv:>5}/{r['envoys']:<3} {r['p50_s'] * 1000:>7.0f} "
            f"{r['max_s'] * 1000:>7.0f}"
        )


if __name__ == "__main__":
    main()
