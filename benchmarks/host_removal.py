"""How long a host removed from a health-checked pool still gets requests (issue 26:
"removal is removal", within 1 s).

A real Envoy, the in-process xDS server following a spec file, two lab model servers as
the canary (health-checked every 0.2 s, 100% of the traffic). A thread sends requests
through Envoy without pause; the spec drops one host; this prints, per run, the seconds
from the spec file's write to the removed host's last request, and to Envoy's ACK of
the new endpoints (the xDS server polls the file every 50 ms).

    python benchmarks/host_removal.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from xds_server.lab.background import BackgroundServer
from xds_server.lab.polling import wait_for
from xds_server.lab.procs import Envoy, free_port, http_get
from xds_server.lab.upstream import ModelServer
from xds_server.render.bootstrap import BootstrapOptions
from xds_server.spec import load_spec
from xds_server.traffic import Split
from xds_server.xds.types import ENDPOINT

REGION = "us-east"
SERVICE = "recommender"


def spec_doc(servers: dict[str, ModelServer], canary: list[str]) -> dict[str, Any]:
    """tests/test_host_removal.py's spec: production, a canary checked every 0.2 s."""

    def eps(names: list[str]) -> dict[str, list[str]]:
        return {REGION: [f"127.0.0.1:{servers[n].port}" for n in names]}

    return {
        "regions": [REGION],
        "rollout": {"warmup": {"health_check": {"interval": "0.2s", "timeout": "0.5s"}}},
        "services": [
            {
                "name": SERVICE,
                "pools": {
                    "production": {"version": "v1", "endpoints": eps(["prod"])},
                    "canary": {"version": "v2", "endpoints": eps(canary)},
                },
            }
        ],
    }


def served_without(server: BackgroundServer, port: int) -> str | None:
    def check() -> str | None:
        server.server.flush()
        snap = server.server.snapshot(REGION)
        cla = snap.resources.by_type[ENDPOINT][f"{SERVICE}|canary"]
        lbs = cla.endpoints[0].lb_endpoints  # type: ignore[attr-defined]
        ports = {lb.endpoint.address.socket_address.port_value for lb in lbs}
        return snap.type_version(ENDPOINT) if port not in ports else None

    return server.call(check)


def one_run(workdir: Path) -> tuple[float, float]:
    servers = {
        n: ModelServer(("127.0.0.1", 0), REGION, p, v).start_in_thread()
        for n, p, v in [("prod", "production", "v1"), ("a", "canary", "v2"), ("b", "canary", "v2")]
    }
    path = workdir / "mesh.yaml"
    path.write_text(yaml.safe_dump(spec_doc(servers, ["a", "b"])))
    server = BackgroundServer(load_spec(path), path)
    envoy: Envoy | None = None
    stop = threading.Event()
    try:
        server.start()
        server.watch_spec(0.05)
        server.call(
            lambda: server.server.set_split(
                SERVICE, Split.from_percent({"canary": 100}), urgent=True
            )
        )
        listen = free_port()
        opts = BootstrapOptions(
            REGION, "bench-1", xds_port=server.port, admin_port=free_port(),
            listen=f"127.0.0.1:{listen}",
        )  # fmt: skip
        envoy = Envoy(opts, workdir)
        envoy.wait_ready()
        url = f"http://127.0.0.1:{listen}/predict"
        b = servers["b"]
        wait_for(
            lambda: http_get(url)[0] == 200 and b.stats()["user_requests"] > 5,
            "requests reaching b",
            timeout=15,
        )
        last_b = [time.monotonic()]

        def load() -> None:
            seen = b.stats()["user_requests"]
            while not stop.is_set():
                http_get(url)
                now_seen = b.stats()["user_requests"]
                if now_seen != seen:
                    seen, last_b[0] = now_seen, time.monotonic()

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        written = time.monotonic()
        path.write_text(yaml.safe_dump(spec_doc(servers, ["a"])))
        version = wait_for(lambda: served_without(server, b.port), "served without b")
        wait_for(
            lambda: all(
                n.types[ENDPOINT].acked_version == version
                for n in server.call(lambda: server.server.node_status(REGION))
            ),
            "Envoy's ACK",
            timeout=10,
        )
        acked = time.monotonic() - written
        time.sleep(1.0)  # the observation: does b get anything after the ACK?
        stop.set()
        thread.join(5)
        return max(0.0, last_b[0] - written), acked
    finally:
        stop.set()
        if envoy is not None:
            envoy.stop()
        server.close()
        for s in servers.values():
            s.shutdown()
            s.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    last, acks = [], []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            gone, acked = one_run(Path(tmp))
        last.append(gone)
        acks.append(acked)
        print(f"run {i + 1}: last request to the removed host {gone:.3f}s after the write; "
              f"Envoy ACKed the endpoints after {acked:.3f}s")  # fmt: skip
    median_last, median_ack = statistics.median(last), statistics.median(acks)
    print(f"median: last request {median_last:.3f}s, ACK {median_ack:.3f}s; "
          f"max last request {max(last):.3f}s")  # fmt: skip


if __name__ == "__main__":
    main()
