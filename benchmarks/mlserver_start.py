"""MLServer as the lab runs it: time from process start to ready, and memory per process.

Trains the lab's scikit-learn models (`lab/mlserver.py`), then starts MLServer 1.7.1
(`MLSERVER_PARALLEL_WORKERS=0`: one process) `--runs` times, one at a time, each
serving one model, and prints for each: the seconds from the process's start to its
first 200 on `/v2/health/ready`, its resident memory (VmRSS of the process and any
children) when ready, and after 200 REST inferences of the lab's 30 features.

    python benchmarks/mlserver_start.py [--runs 3] [--model v1|v2|shuffled|narrow]

Needs MLServer's virtual environment (`make mlserver`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from xds_server.lab import mlserver
from xds_server.lab.load import draw_features, rest_body
from xds_server.lab.procs import free_port, http_get


def rss_mib(pid: int) -> float:
    """VmRSS of a process and its children, in MiB."""
    total_kib = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def answers(url: str) -> bool:
    try:
        return http_get(url, timeout=1)[0] == 200
    except OSError:  # not listening yet
        return False


def infer(port: int, n: int) -> int:
    """n REST inferences; how many answered 200."""
    import http.client
    import random

    rng = random.Random(0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    ok = 0
    for i in range(n):
        body = rest_body(draw_features(rng, mlserver.N_FEATURES), str(i))
        conn.request("POST", f"/v2/models/{mlserver.MODEL_NAME}/infer", body=body)
        resp = conn.getresponse()
        resp.read()
        ok += resp.status == 200
    conn.close()
    return ok


def one_run(venv: Path, root: Path, model: str, i: int) -> dict[str, float]:
    slot = mlserver.MLServerSlot(
        f"bench-{i}", free_port(), free_port(), None, root / f"{model}.joblib", "v1"
    )
    t0 = time.monotonic()
    proc = mlserver.start_mlserver(venv, root / slot.name, slot)
    try:
        while not answers(mlserver.health_url(slot.http_port)):
            if not proc.alive:
                raise RuntimeError(f"MLServer exited: {proc.tail()}")
            time.sleep(0.02)  # polling for readiness: what is measured
        ready_s = time.monotonic() - t0
        at_ready = rss_mib(proc.pid)
        ok = infer(slot.http_port, 200)
        return {
            "ready_s": ready_s,
            "rss_ready_mib": at_ready,
            "rss_after_200_mib": rss_mib(proc.pid),
            "ok": ok,
        }
    finally:
        proc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", default="v1", choices=("v1", "v2", "shuffled", "narrow"))
    args = p.parse_args()
    venv = mlserver.find_venv()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.monotonic()
        mlserver.train(venv, root)
        print(f"trained the lab's models in {time.monotonic() - t0:.2f}s")
        runs = [one_run(venv, root, args.model, i) for i in range(args.runs)]
    for i, r in enumerate(runs):
        print(json.dumps({"run": i, **{k: round(v, 2) for k, v in r.items()}}))
    for key in ("ready_s", "rss_ready_mib", "rss_after_200_mib"):
        values = [r[key] for r in runs]
        print(f"{key}: median {statistics.median(values):.2f}, max {max(values):.2f}")


if __name__ == "__main__":
    main()
