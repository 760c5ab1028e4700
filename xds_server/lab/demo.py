"""`xds-server demo`: one real Envoy per region, routed live by the server.

Starts tiny model servers (production v1 and canary v2 per region), the xDS server and
one Envoy per region on loopback, then moves the canary share 0% -> 20% -> 50% and shows
where each region's requests land. Everything started is stopped on exit.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import yaml

from xds_server.config import load_spec
from xds_server.lab.background import BackgroundServer
from xds_server.lab.procs import Envoy, free_port, http_get, wait_for
from xds_server.lab.upstream import ModelServer
from xds_server.render.bootstrap import BootstrapOptions
from xds_server.traffic import Split

REGIONS = ("us-east", "eu-west", "ap-south")
POOLS = {"production": "v1", "canary": "v2"}


def run_demo(requests_per_step: int = 200, workdir: Path | None = None) -> int:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="xds-demo-"))
    models = {
        (r, p): ModelServer(("127.0.0.1", 0), r, p, v).start_in_thread()
        for r in REGIONS
        for p, v in POOLS.items()
    }
    spec_path = workdir / "mesh.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "regions": list(REGIONS),
                "listener": {"port": 10000},
                "services": [
                    {
                        "name": "recommender",
                        "domains": ["*"],
                        "prefix": "/",
                        "pools": {
                            p: {
                                "version": v,
                                "endpoints": {
                                    r: [f"127.0.0.1:{models[(r, p)].port}"] for r in REGIONS
                                },
                            }
                            for p, v in POOLS.items()
                        },
                    }
                ],
            },
            sort_keys=False,
        )
    )
    server = BackgroundServer(load_spec(spec_path), spec_path)
    envoys: list[Envoy] = []
    try:
        port = server.start()
        print(f"xDS server on 127.0.0.1:{port}; spec {spec_path}")
        for region in REGIONS:
            listen = f"127.0.0.1:{free_port()}"
            envoys.append(
                Envoy(
                    BootstrapOptions(
                        region=region,
                        node_id=f"{region}-envoy-1",
                        xds_port=port,
                        admin_port=free_port(),
                        listen=listen,
                    ),
                    workdir,
                )
            )
        for e in envoys:
            e.wait_ready()
            print(f"  {e.name}: listener {e.opts.listen}, admin {e.admin}")
        for canary in (0, 20, 50):
            server.call(
                lambda c=canary: server.server.set_split(  # type: ignore[misc]
                    "recommender", Split.from_percent({"canary": c})
                )
            )
            print(
                f"\ncanary at {canary}% in every region; {requests_per_step} requests "
                "through each region's Envoy:"
            )
            for e in envoys:
                want = server.route_version(e.opts.region)
                wait_for(
                    lambda e=e, w=want: e.applied_versions().get("route") == w,  # type: ignore[misc]
                    10,
                    f"{e.name} to apply routes {want}",
                )
                seen = Counter(_pool(e) for _ in range(requests_per_step))
                shares = "  ".join(
                    f"{pool} {n * 100 / requests_per_step:5.1f}%"
                    for pool, n in sorted(seen.items())
                )
                print(f"  {e.opts.region:<9} routes version {want}: {shares}")
        print(
            "\nEach region's Envoy followed the server within a push; see "
            f"{workdir} for the Envoy bootstraps and logs."
        )
        return 0
    finally:
        for e in envoys:
            e.stop()
        server.close()
        for m in models.values():
            m.shutdown()
            m.server_close()


def _pool(envoy: Envoy) -> str:
    assert envoy.opts.listen
    status, body, _ = http_get(f"http://{envoy.opts.listen}/predict?a=1&b=2&c=3")
    if status != 200:
        return f"HTTP {status}"
    answer = json.loads(body)
    return f"{answer['pool']}({answer['version']})"
