"""What a replica holds of the audit, and what retention does to etcd (issue 30).

A store with the audit of ROLLOUTS finished rollouts (each DECISIONS looks over three
regions: entries with measurements and verdicts, ~1.4 KB each as etcd keeps them, like
the lab's) is written the way the release before this one wrote it (the flat log,
`audit/ID`). Then, on one real etcd member on loopback:

- replicas are started alone (each leads; their spec has no canary, so they write
  nothing) on an empty store and on this one: their RSS (VmRSS, once their admin API
  answers), and the difference per entry: the release BEFORE (`git archive` of that
  commit); this tree on the flat log (it reads it once, to its heads), then on the
  per-rollout log (the store migrated), then once every rollout is archived;
- this tree's replica with `--audit-retention 1` archives every rollout: how long from
  its start; etcd's keys and database before and after (and after a compaction and a
  defragmentation, what an operator's etcd upkeep gets back);
- audit reads, in process, against the live store and the archived one (median of
  RUNS): the newest page of 200, one service's newest 50, one rollout's entries, and
  everything.

The release before cannot start on a store whose audit exceeds about 4 MB (its one read
of the whole prefix passes gRPC's message limit): its figure is then why.

    python benchmarks/audit_memory.py [--rollouts 40] [--decisions 8] [--before COMMIT]
        [--runs 5] [--json]

Prints one line per figure (or the figures as JSON); each replica is stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import yaml
from aetcd import rpc

from xds_server.ha.etcd import SyncKV, parse_store_url, put_op, range_end
from xds_server.ha.store import EtcdStore
from xds_server.lab.etcd import EtcdCluster
from xds_server.lab.polling import wait_for
from xds_server.lab.procs import Process, free_port
from xds_server.rollout.audit import AuditEntry, Measurements, PoolNumbers, Weights
from xds_server.rollout.audit_codec import to_document
from xds_server.rollout.decision import EntryKind
from xds_server.rollout.evidence import Check, MetricClass, MetricResult, Outcome, Verdict
from xds_server.rollout.state import (
    PROGRESSING,
    ROLLED_BACK,
    RegionState,
    RolloutState,
    state_to_json,
)
from xds_server.spec import NoDataRule

REGIONS = ("us-east", "eu-west", "ap-south")
REPO = Path(__file__).resolve().parent.parent
BEFORE = "5894f4c^"
"""The last commit before the audit left the replicas' memory."""


# ---- the store's contents ----


def verdict(i: int) -> Verdict:
    metrics = tuple(
        MetricResult(name, MetricClass.PASS, 0.001 * i, 0.4, f"{name}: canary within bounds",
                     "quality", name == "error_rate", NoDataRule.PAUSE, 0.05)
        for name in ("error_rate", "latency_p99", "throughput")
    )  # fmt: skip
    checks = (Check("error_rate", 0.001, 0.01, True), Check("p99_ms", 180.0, 400.0, True))
    return Verdict(Outcome.PASS, "canary within bounds on 3 metrics", checks, metrics, 0.9, False)


def numbers(requests: float) -> PoolNumbers:
    return PoolNumbers(requests, requests * 0.001, 0.001, 182.5)


def entries(service: str, version: str, decisions: int, t0: float) -> list[AuditEntry]:
    at = Weights(90.0, 5.0, 5.0)
    out = []
    for i in range(decisions):
        for region in REGIONS:
            m = Measurements(numbers(200.0 + i), numbers(900.0 + i), "baseline", numbers(910.0))
            out.append(AuditEntry(
                time=t0 + i, service=service, canary_version=version, region=region,
                kind=EntryKind.CHECK if i % 4 else EntryKind.TRANSITION, step=i // 4,
                phase_from=PROGRESSING, phase_to=PROGRESSING, weights_before=at,
                weights_after=at, measurements=m, verdict=verdict(i),
                reason=f"step {i // 4}: canary within bounds in {region}", snapshot_version=1,
                actor="controller",
            ))  # fmt: skip
    return out


def write_flat_store(url: str, prefix: str, rollouts: int, decisions: int) -> int:
    """The release before's layout (no schema key, `audit/ID`): finished rollouts' states
    and entries; the number of entries."""
    kv = SyncKV(parse_store_url(url, prefix))
    seq = 0
    t0 = time.time() - 86400
    try:
        for r in range(rollouts):
            service, version = f"svc{r % 5}", f"v{r}"
            regions = {x: RegionState(ROLLED_BACK, 0, reason="rolled back") for x in REGIONS}
            state = RolloutState(service, version, ROLLED_BACK, regions, t0, t0 + decisions)
            ops = [put_op(f"{prefix}/rollouts/{service}/{version}", state_to_json(state).encode())]
            for e in entries(service, version, decisions, t0):
                seq += 1
                ops.append(put_op(f"{prefix}/audit/{seq:016d}", to_document(e).encode()))
            for i in range(0, len(ops), 100):
                kv.txn(rpc.TxnRequest(success=ops[i : i + 100]))
    finally:
        kv.close()
    return seq


# ---- replicas ----


def spec_file(workdir: Path) -> Path:
    """A spec with one service and no canary: a replica that leads decides nothing."""
    endpoints = {r: [f"127.0.0.1:{free_port()}"] for r in REGIONS}
    doc = {
        "regions": list(REGIONS),
        "services": [{"name": "svc0", "domains": ["svc0.local"],
                      "pools": {"production": {"version": "v0", "endpoints": endpoints}}}],
    }  # fmt: skip
    path = workdir / "mesh.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def replica(
    workdir: Path, name: str, url: str, prefix: str, env: Mapping[str, str], *args: str
) -> tuple[Process, str]:
    admin = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "xds_server.cli", "serve", "--store", url,
            "--store-prefix", prefix, "--spec", str(spec_file(workdir)),
            "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address", admin,
            "--metrics-address", "127.0.0.1:0", "--ui-address", "", "--prometheus-url",
            f"http://127.0.0.1:{free_port()}", "--replica-id", name, *args]  # fmt: skip
    proc = Process(name, argv, workdir / f"{name}.log", env={**env} if env else None)
    return proc, admin


def admin_answers(admin: str, proc: Process) -> Callable[[], bool]:
    def check() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        with grpc.insecure_channel(admin) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
            except grpc.FutureTimeoutError:
                return False
        return True

    return check


def settled_rss(proc: Process, admin: str) -> int:
    """VmRSS once the admin API answers and two seconds more (the view loaded)."""
    wait_for(admin_answers(admin, proc), f"{proc.name}'s admin API", timeout=60, interval=0.2)
    time.sleep(2.0)  # a measurement's settling time, not a wait for state
    return rss_kib(proc.pid)


# ---- etcd ----


def migrate(url: str, prefix: str) -> None:
    """The flat log moved to the per-rollout log, as a leader does before its first write
    (here in process, on a leader key written for it and removed after)."""
    store = EtcdStore(parse_store_url(url, prefix))
    try:
        reply = store.kv.txn(rpc.TxnRequest(success=[put_op(store.keys.leader, b"bench")]))
        store.read()
        store.fence = reply.header.revision
        store.migrate()
        gone = rpc.DeleteRangeRequest(key=store.keys.leader.encode())
        store.kv.txn(rpc.TxnRequest(success=[rpc.RequestOp(request_delete_range=gone)]))
    finally:
        store.close()


def etcd_figures(url: str, prefix: str) -> dict[str, int]:
    kv = SyncKV(parse_store_url(url, prefix))
    try:
        count = kv._call(
            "Range",
            rpc.RangeRequest(key=f"{prefix}/".encode(), range_end=range_end(f"{prefix}/"),
                             count_only=True),
        ).count  # fmt: skip
        target = parse_store_url(url, prefix).target
        with grpc.insecure_channel(target) as channel:
            status = rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=5)
        return {"keys": int(count), "db_bytes": status.dbSize, "db_in_use": status.dbSizeInUse,
                "revision": status.header.revision}  # fmt: skip
    finally:
        kv.close()


def compact_and_defrag(url: str, revision: int) -> None:
    target = parse_store_url(url).target
    with grpc.insecure_channel(target) as channel:
        rpc.KVStub(channel).Compact(rpc.CompactionRequest(revision=revision, physical=True))
        rpc.MaintenanceStub(channel).Defragment(rpc.DefragmentRequest(), timeout=30)


# ---- reads ----


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    times, got = [], None
    for _ in range(runs):
        start = time.perf_counter()
        got = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, got


def read_figures(url: str, prefix: str, runs: int) -> dict[str, Any]:
    store = EtcdStore(parse_store_url(url, prefix))
    try:
        store.read()
        out: dict[str, Any] = {}
        for name, call in (
            ("newest 200", lambda: store.audit(limit=200)),
            ("svc1's newest 50", lambda: store.audit(service="svc1", limit=50)),
            ("one rollout", lambda: store.audit(service="svc1", version="v1")),
            ("everything", lambda: store.audit()),
        ):
            ms, got = timed(call, runs)
            out[name] = {"ms": round(ms, 1), "entries": len(got)}
        return out
    finally:
        store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rollouts", type=int, default=40)
    p.add_argument("--decisions", type=int, default=8)
    p.add_argument("--before", default=BEFORE, help="the release to compare with")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.support import release_env, release_tree

    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, EtcdCluster(Path(tmp) / "etcd", members=1) as etcd:
        work = Path(tmp)
        url, full = etcd.url, "/bench/full"
        n = write_flat_store(url, full, args.rollouts, args.decisions)
        sizes = [len(to_document(e)) for e in entries("s", "v", 1, 0.0)]
        figures["entries"] = n
        figures["entry_bytes"] = round(statistics.mean(sizes))
        old_env = release_env(release_tree(args.before, work / "before"))

        def measure(name: str, prefix: str, env: Mapping[str, str]) -> int | None:
            """The replica's RSS; None (and why, in the figures) when it did not start."""
            proc, admin = replica(work, name, url, prefix, env)
            try:
                figures[f"rss_kib {name}"] = got = settled_rss(proc, admin)
                return got
            except (RuntimeError, TimeoutError) as exc:
                figures[f"rss_kib {name}"] = f"did not start: {str(exc).splitlines()[-1]}"
                return None
            finally:
                proc.stop()

        def per_entry(label: str, got: int | None, base: int | None) -> None:
            if got is not None and base is not None:
                figures[f"kib_per_entry {label}"] = round((got - base) / n, 2)

        base_before = measure("before-empty", "/bench/empty", old_env)
        per_entry("before", measure("before-flat", full, old_env), base_before)
        base = measure("this-empty", "/bench/empty", {})
        per_entry("this (flat log, before its migration)", measure("this-flat", full, {}), base)
        migrate(url, full)
        per_entry("this (per-rollout log, live)", measure("this-live", full, {}), base)
        figures["reads (live store)"] = read_figures(url, full, args.runs)

        figures["etcd before"] = etcd_figures(url, full)
        proc, _ = replica(work, "archiver", url, full, {}, "--audit-retention", "1")
        started = time.monotonic()
        try:

            def archived() -> bool:
                if not proc.alive():
                    raise RuntimeError(f"the archiver exited: {proc.tail()}")
                reader = EtcdStore(parse_store_url(url, full))
                try:
                    reader.read()
                    return len(reader.view.log.archives) == int(args.rollouts)
                finally:
                    reader.close()

            wait_for(archived, "every rollout archived", timeout=300, interval=0.2)
            figures["archived_s (from the replica's start)"] = round(time.monotonic() - started, 1)
        finally:
            proc.stop()
        after = etcd_figures(url, full)
        figures["etcd after"] = after
        compact_and_defrag(url, after["revision"])
        figures["etcd after compaction+defrag"] = etcd_figures(url, full)
        per_entry("this (archived)", measure("this-archived", full, {}), base)
        figures["reads (archived store)"] = read_figures(url, full, args.runs)

    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for key, value in figures.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
