"""Real-fleet convergence: N real Envoys (--concurrency 1) across 3 regions; one weight
change; the time from the push to the last Envoy applying the new routes.

The push's time is taken by the server, on its event loop, just before it publishes (an
urgent change: no coalescing). When each Envoy applied the routes is read from the Envoy
itself: its admin's `config_dump` gives each route configuration's `last_updated`
(Envoy's wall clock, to the millisecond: the same clock, one machine). The admins are
polled only to learn that every Envoy has the version, by a few threads sweeping them,
and when a sweep first saw each one is reported too (an upper bound, late by up to a
sweep).

The server runs in a process of its own, as `serve` does. `--legacy` measures as this
benchmark did before: the server on a thread of this process and each Envoy polled by a
thread of its own every 10 ms until it shows the version (100 threads opening a
connection and parsing JSON every 10 ms share one GIL with the server's push, and the
Envoys' CPUs): its figure is the first poll that saw the routes.

    python benchmarks/fleet_convergence.py [--envoys 30] [--mode sotw delta] [--pushes 5]
        [--legacy] [--json]
"""

from __future__ import annotations

import argparse
import calendar
import json
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from xds_server.lab.background import BackgroundServer
from xds_server.lab.procs import Envoy, free_port, http_get
from xds_server.render.bootstrap import BootstrapOptions
from xds_server.spec import MeshSpec, validate_spec
from xds_server.traffic import Split
from xds_server.xds.types import ROUTE

REGIONS = ("us-east", "eu-west", "ap-south")
SWEEPERS = 4
"""Threads sweeping the admins (each request a few ms of CPU): enough to see the fleet
converged within a sweep, few enough to leave the CPUs to the Envoys and the server."""
SWEEP_PAUSE = 0.02


def fleet_spec() -> MeshSpec:
    return validate_spec(
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


def push(server: BackgroundServer, percent: int, delta: bool) -> tuple[float, dict[str, str]]:
    """Set the canary's weight (urgent); the wall time just before the push, on the
    server's loop, and the routes version each region's Envoys will report."""

    def go() -> float:
        t0 = time.time()
        split = Split.from_percent({"canary": percent})
        server.server.set_split("recommender", split, urgent=True)
        return t0

    t0 = server.call(go)
    return t0, {r: server.route_version(r, delta=delta) for r in REGIONS}


def route_sends(server: BackgroundServer) -> dict[str, tuple[float | None, float | None]]:
    """node id -> (when the server last sent it routes, when it got their ACK)."""

    def read() -> dict[str, tuple[float | None, float | None]]:
        out = {}
        for n in server.server.node_status():
            ts = n.types[ROUTE]
            out[n.node_id] = (ts.sent_at, ts.acked_at)
        return out

    return server.call(read)


def serve_in_child(conn: Any) -> None:
    """The server's process: a BackgroundServer, driven over `conn`."""
    server = BackgroundServer(fleet_spec())
    try:
        conn.send(server.start())
        while (msg := conn.recv()) is not None:
            conn.send(push(server, *msg) if msg else route_sends(server))
    finally:
        server.close()


class ServerProcess:
    """The server in a child process (as `serve` runs it): its port, and pushes."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve_in_child, args=(child,), daemon=True)
        self.proc.start()
        if not self.conn.poll(60):
            raise TimeoutError("the server process did not start")
        self.port: int = self.conn.recv()

    def push(self, percent: int, delta: bool) -> tuple[float, dict[str, str]]:
        self.conn.send((percent, delta))
        t0, want = self.conn.recv()
        return float(t0), dict(want)

    def route_sends(self) -> dict[str, tuple[float | None, float | None]]:
        self.conn.send(())
        return dict(self.conn.recv())

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()


class InProcessServer:
    """--legacy: the server on a thread of this process."""

    def __init__(self) -> None:
        self.server = BackgroundServer(fleet_spec())
        self.port = self.server.start()

    def push(self, percent: int, delta: bool) -> tuple[float, dict[str, str]]:
        return push(self.server, percent, delta)

    def route_sends(self) -> dict[str, tuple[float | None, float | None]]:
        return route_sends(self.server)

    def close(self) -> None:
        self.server.close()


def routes_seen(envoy: Envoy) -> tuple[str, float | None]:
    """The routes version an Envoy's admin shows, and when Envoy updated them."""
    status, body, _ = http_get(envoy.admin + "/config_dump?resource=dynamic_route_configs")
    if status != 200:
        return "", None
    configs = json.loads(body).get("configs", [])
    if not configs:
        return "", None
    return str(configs[0].get("version_info", "")), parse_stamp(configs[0].get("last_updated"))


def parse_stamp(text: str | None) -> float | None:
    """Envoy's RFC 3339 UTC time ('2026-12-06T08:39:02.356Z') as a Unix time."""
    if not text:
        return None
    whole, _, frac = text.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
    return seconds + (float(f"0.{frac}") if frac else 0.0)


Seen = dict[str, tuple[float, float | None]]
"""node id -> (when a poll first saw the version, Envoy's own update time)."""


def sweep(envoys: Sequence[Envoy], want: dict[str, str], deadline: float) -> Seen:
    """A few threads sweep the admins not yet seen with the version, until all are."""
    seen: Seen = {}
    lock = threading.Lock()

    def look(e: Envoy) -> None:
        version, updated = routes_seen(e)
        if version == want[e.opts.region]:
            with lock:
                seen.setdefault(e.opts.node_id, (time.time(), updated))

    with ThreadPoolExecutor(SWEEPERS) as pool:
        while len(seen) < len(envoys) and time.time() < deadline:
            todo = [e for e in envoys if e.opts.node_id not in seen]
            list(pool.map(look, todo))
            if len(seen) < len(envoys):
                time.sleep(SWEEP_PAUSE)  # the sweep's period, bounded by the deadline
    return seen


def poll_threads(envoys: Sequence[Envoy], want: dict[str, str], deadline: float) -> Seen:
    """--legacy: a thread per Envoy, polling every 10 ms until it shows the version."""
    seen: Seen = {}

    def watch(e: Envoy) -> None:
        while time.time() < deadline:
            version, updated = routes_seen(e)
            if version == want[e.opts.region]:
                seen[e.opts.node_id] = (time.time(), updated)
                return
            time.sleep(0.01)  # the poll period, bounded by the deadline

    threads = [threading.Thread(target=watch, args=(e,)) for e in envoys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


def figures(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_s": statistics.median(ordered), "max_s": ordered[-1]} if ordered else {}


def run(n: int, mode: str, pushes: int, legacy: bool, workdir: Path) -> dict[str, Any]:
    server: ServerProcess | InProcessServer = InProcessServer() if legacy else ServerProcess()
    poll: Callable[[Sequence[Envoy], dict[str, str], float], Seen] = (
        poll_threads if legacy else sweep
    )
    envoys = [
        Envoy(
            BootstrapOptions(
                region=REGIONS[i % 3],
                node_id=f"envoy-{i}",
                xds_port=server.port,
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
        rounds: list[dict[str, Any]] = []
        for i in range(pushes):
            t0, want = server.push(10 * (i + 1), mode == "delta")
            seen = poll(envoys, want, time.time() + 30)
            sends = server.route_sends()
            applied = [u - t0 for _, u in seen.values() if u is not None]
            polled = [s - t0 for s, _ in seen.values()]
            sent = {n: s for n, (s, _) in sends.items() if s is not None and s >= t0}
            rounds.append(
                {
                    "converged": len(seen),
                    "applied": figures(applied),
                    "polled": figures(polled),
                    # where the time goes: the server's send, then the Envoy
                    "sent": figures([s - t0 for s in sent.values()]),
                    "sent_to_applied": figures(
                        [u - sent[n] for n, (_, u) in seen.items() if n in sent and u is not None]
                    ),
                    "acked": figures(
                        [a - t0 for _, a in sends.values() if a is not None and a >= t0]
                    ),
                }
            )

        def worst(kind: str, key: str) -> float:
            return max(float(r[kind][key]) for r in rounds if r[kind])

        def mid(kind: str) -> float:
            return statistics.median(float(r[kind]["p50_s"]) for r in rounds if r[kind])

        kinds = ("applied", "polled", "sent", "sent_to_applied", "acked")
        return {
            "mode": mode,
            "envoys": n,
            "legacy": legacy,
            "rounds": rounds,
            **{f"{k}_p50_s": mid(k) for k in kinds},
            **{f"{k}_max_s": worst(k, "max_s") for k in kinds},
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
    p.add_argument(
        "--legacy",
        action="store_true",
        help="measure as before: the server in this process, a polling thread per Envoy",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    rows = []
    for mode in a.mode:
        with tempfile.TemporaryDirectory(prefix="fleet-") as d:
            rows.append(run(a.envoys, mode, a.pushes, a.legacy, Path(d)))
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    how = (
        "--legacy: server in this process, a thread per Envoy polling every 10 ms"
        if a.legacy
        else f"server in its own process, {SWEEPERS} threads sweeping the admins"
    )
    print(
        f"{a.envoys} real Envoys over {len(REGIONS)} regions, {a.pushes} weight changes; "
        f"from the push to each Envoy's routes ({how})"
    )
    columns = {
        "applied": "applied (Envoy's clock)",
        "polled": "first seen by a poll",
        "sent": "server sent the routes",
        "sent_to_applied": "sent -> applied",
        "acked": "server got the ACK",
    }
    print("ms after the push, p50 / max over the rounds (the max is the worst round's):")
    print(f"{'mode':>5} {'converged':>9}  " + "  ".join(f"{t:>23}" for t in columns.values()))
    for r in rows:
        conv = min(x["converged"] for x in r["rounds"])
        cells = (
            f"{r[f'{k}_p50_s'] * 1000:>11.0f} {r[f'{k}_max_s'] * 1000:>11.0f}" for k in columns
        )
        print(f"{r['mode']:>5} {conv:>5}/{r['envoys']:<3}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
