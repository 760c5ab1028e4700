"""Rollback latency: from a canary fault in one region to every Envoy at 0% canary.

Each run starts a local mesh (three regions, one real Envoy each, real Prometheus with a
1 s scrape, `xds-server serve` with a 1 s interval, 50 requests/s through each Envoy),
waits for the rollout to reach 20% everywhere, makes one region's canary fail 20% of
requests, and measures until every Envoy's own /config_dump shows 0% canary.

    python benchmarks/rollback_latency.py [--runs 5] [--json] [--notify-hanging]

`--notify-hanging` also sends the lab's notifications to a receiver that accepts each
connection and never answers: the rollback must not wait for it.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from xds_server.lab.layout import MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.polling import wait_for
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.lab.traffic import canary_share

PLAN = FAST_PLAN
"""The lab's low-traffic analysis settings with the rollout tests' short steps."""


class HangingReceiver:
    """Accepts connections on loopback and never answers (until closed)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.held: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/events"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def one_run(workdir: Path, notify_url: str | None = None) -> dict[str, float]:
    opts = MeshOptions(rollout=PLAN, load_rate=50, notify_url=notify_url)
    with LocalMesh(workdir, opts) as mesh:
        load = mesh.processes.start_load()
        wait_for(lambda: len(load.snapshot()) >= 30, "load", timeout=10)
        mesh.spec.add_canary()

        def at_step_one() -> bool:
            st = mesh.state.rollout()
            return bool(st) and {r["step"] for r in st["regions"].values()} == {1}  # type: ignore[index]

        wait_for(at_step_one, "step 1 everywhere", timeout=60)
        wait_for(
            lambda: all(canary_share(e) == 20 for e in mesh.processes.envoys),
            "20% in Envoy",
            timeout=10,
        )
        fault = time.time()
        mesh.faults.set("eu-west", "canary", error_rate=0.2)
        wait_for(
            lambda: all(canary_share(e) == 0 for e in mesh.processes.envoys),
            "0% canary",
            timeout=30,
            interval=0.02,
        )
        total = time.time() - fault
        decided = next(
            e.time for e in mesh.state.audit() if e.region is None and e.phase_to == "rolled_back"
        )
        return {
            "fault_to_all_envoys_s": total,
            "fault_to_decision_s": decided - fault,
            "decision_to_all_envoys_s": total - (decided - fault),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--notify-hanging", action="store_true", help="notify a receiver that hangs")
    a = p.parse_args()
    receiver = HangingReceiver() if a.notify_hanging else None
    runs = []
    for i in range(a.runs):
        with tempfile.TemporaryDirectory(prefix="rollback-") as d:
            runs.append(one_run(Path(d), receiver.url if receiver else None))
        if not a.json:
            r = runs[-1]
            print(
                f"run {i + 1}: fault -> decision {r['fault_to_decision_s']:.2f}s, "
                f"decision -> every Envoy 0% {r['decision_to_all_envoys_s'] * 1000:.0f}ms, "
                f"total {r['fault_to_all_envoys_s']:.2f}s",
                flush=True,
            )
    if receiver is not None:
        print(f"the hanging receiver holds {len(receiver.held)} unanswered connections")
        receiver.close()
    totals = sorted(r["fault_to_all_envoys_s"] for r in runs)
    summary = {
        "runs": runs,
        "min_s": totals[0],
        "median_s": statistics.median(totals),
        "max_s": totals[-1],
    }
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"fault -> every Envoy at 0% canary over {len(runs)} runs: min {totals[0]:.2f}s, "
            f"median {statistics.median(totals):.2f}s, max {totals[-1]:.2f}s"
        )


if __name__ == "__main__":
    main()
