"""Rollback latency: from a canary fault in one region to every Envoy at 0% canary.

Each run starts a local mesh (three regions, one real Envoy each, real Prometheus with a
1 s scrape, `xds-server serve` with a 1 s interval, 50 requests/s through each Envoy),
waits for the rollout to reach 20% everywhere, makes one region's canary fail 20% of
requests, and measures until every Envoy's own /config_dump shows 0% canary.

    python benchmarks/rollback_latency.py [--runs 5] [--json] [--notify-hanging] [--explain]

`--explain` prints, for each run, where the time went: the faulty region's audit from
the fault to the decision (each tick's time, the canary's window as the judge saw it,
the verdict) and the samples Prometheus holds of the canary's counters (when each
scrape landed and what it carried), all in seconds since the fault.

`--notify-hanging` also sends the lab's notifications to a receiver that accepts each
connection and never answers: the rollback must not wait for it.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from xds_server.lab.layout import SERVICE, MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.polling import wait_for
from xds_server.lab.procs import http_get
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.lab.traffic import canary_share
from xds_server.rollout.audit import AuditEntry

PLAN = FAST_PLAN
"""The lab's low-traffic analysis settings with the rollout tests' short steps."""

FAULTY = "eu-west"
"""The region whose canary fails."""


def explain(
    entries: list[AuditEntry], fault: float, samples: dict[str, list[tuple[float, float]]]
) -> str:
    """The faulty region's ticks from just before the fault to the decision, and the
    canary's raw samples in Prometheus (seconds since the fault)."""
    lines = []
    for e in entries:
        if e.time < fault - 1.5 or (e.region not in (FAULTY, None)):
            continue
        m = e.measurements.canary if e.measurements else None
        seen = (
            f"window req {m.requests or 0:5.1f} err {m.errors or 0:4.1f} "
            f"rate {(m.error_rate or 0):5.3f}"
            if m is not None
            else "-"
        )
        why = (e.verdict.reason if e.verdict else e.reason)[:150]
        ps = ""
        if e.verdict is not None:
            ps = " ".join(
                f"{r.name}:{r.classification}(p={r.p_value:.2g})"
                for r in e.verdict.metrics
                if r.p_value is not None and not math.isnan(r.p_value)
            )
        lines.append(f"    tick {e.time - fault:+6.2f}s {e.kind:<10} {seen} | {why} {ps}")
        if e.phase_to == "rolled_back":
            break
    for name, points in samples.items():
        shown = " ".join(f"{t - fault:+.2f}:{v:g}" for t, v in points if t > fault - 2.5)
        lines.append(f"    {name}: {shown}")
    return "\n".join(lines)


def raw_samples(prometheus_url: str, window_s: int = 30) -> dict[str, list[tuple[float, float]]]:
    """The faulty canary's request and 5xx counters as scraped: (scrape time, value)."""
    cluster = f"{SERVICE}|canary"
    out: dict[str, list[tuple[float, float]]] = {}
    labels = f'region="{FAULTY}",envoy_cluster_name="{cluster}"'
    for name, selector in (
        ("requests", f"envoy_cluster_upstream_rq_total{{{labels}}}"),
        ("5xx", f'envoy_cluster_upstream_rq_xx{{{labels},envoy_response_code_class="5"}}'),
    ):
        q = f"{selector}[{window_s}s]"
        url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        status, body, _ = http_get(url)
        if status != 200:
            continue
        for r in json.loads(body)["data"]["result"]:
            out[name] = [(float(t), float(v)) for t, v in r["values"]]
    return out


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


def one_run(
    workdir: Path, notify_url: str | None = None, explained: list[str] | None = None
) -> dict[str, float]:
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
        mesh.faults.set(FAULTY, "canary", error_rate=0.2)
        wait_for(
            lambda: all(canary_share(e) == 0 for e in mesh.processes.envoys),
            "0% canary",
            timeout=30,
            interval=0.02,
        )
        total = time.time() - fault
        entries = mesh.state.audit()
        decided = next(e.time for e in entries if e.region is None and e.phase_to == "rolled_back")
        if explained is not None:
            assert mesh.processes.prometheus is not None
            explained.append(explain(entries, fault, raw_samples(mesh.processes.prometheus.url)))
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
    p.add_argument("--explain", action="store_true", help="print each run's audit and scrapes")
    a = p.parse_args()
    receiver = HangingReceiver() if a.notify_hanging else None
    runs = []
    for i in range(a.runs):
        with tempfile.TemporaryDirectory(prefix="rollback-") as d:
            explained: list[str] | None = [] if a.explain else None
            runs.append(one_run(Path(d), receiver.url if receiver else None, explained))
        if not a.json:
            r = runs[-1]
            print(
                f"run {i + 1}: fault -> decision {r['fault_to_decision_s']:.2f}s, "
                f"decision -> every Envoy 0% {r['decision_to_all_envoys_s'] * 1000:.0f}ms, "
                f"total {r['fault_to_all_envoys_s']:.2f}s",
                flush=True,
            )
            if explained:
                print(explained[0], flush=True)
    if receiver is not None:
        print(f"the hanging receiver holds {len(receiver.held)} unanswered connections")
        receiver.close()
    totals = sorted(r["fault_to_all_envoys_s"] for r in runs)
    p95 = totals[math.ceil(0.95 * len(totals)) - 1]  # nearest rank: 19th of 20 runs
    summary = {
        "runs": runs,
        "min_s": totals[0],
        "median_s": statistics.median(totals),
        "p95_s": p95,
        "max_s": totals[-1],
    }
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"fault -> every Envoy at 0% canary over {len(runs)} runs: min {totals[0]:.2f}s, "
            f"median {statistics.median(totals):.2f}s, p95 {p95:.2f}s, max {totals[-1]:.2f}s"
        )


if __name__ == "__main__":
    main()
