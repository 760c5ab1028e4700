"""Soak (issue 30's "Done when"): a lab rolling a canary out and back for minutes, with a
retention short enough to apply within the run; do the stores and the processes stay flat?

Each store in turn (`--store both`: replicas on etcd, then the one-process SQLite server)
runs a lab of three regions (one real Envoy each, real Prometheus, 50 requests/s through
each Envoy; on etcd a three-member cluster and a replica per region) on the rollout
tests' fast plan, with `--audit-retention` and (etcd) `--store-compaction-retention` of
`--retention` seconds. Round after round it pushes a canary of a new version (v3, v4,
...): even rounds a healthy one (promoted), odd rounds one whose canary fails half its
requests in one region (rolled back). On etcd each round's version is registered for
the canary's model servers (`xds-server register`), as a deploy would.

After `--warmup-rounds` (retention then applies: finished rollouts get archived, etcd
compacted; and each store's file has grown to hold a retention's worth of live audit)
and again after `--minutes` more (an even number of rounds), the soak waits for a quiet
point (no live rollout, every finished rollout's audit archived; etcd compacted past
that moment) and reads:

- etcd: the largest member's database file and bytes in use (etcd's Status), the
  revision and the replicas' compacted revision, the keys under the prefix: the live
  ones, and those kept by design for each rollout and spec push (archive objects and
  their index, rollout states, the spec's history), with their bytes;
- SQLite: the database (its pages, free ones included) and its WAL, the live audit
  rows, the archive rows and their bytes;
- each server process's RSS (VmRSS), and which replica leads.

It prints a line per round and both quiet points, then one line: `soak: ... flat` when
each judged figure ends within 10% of where it started, `soak: ... grew: WHAT` (by how
much) otherwise. Judged, at the quiet points: etcd's bytes in use and live keys,
SQLite's pages in use beside its archives and rollout states (their pages from
`dbstat`) and its WAL, each server's RSS. What is kept by design (an archive and a state
per rollout, a few KB: printed per rollout) is allowed on top of etcd's bytes in use
(BBOLT_FACTOR times its bytes); the WAL may fill up to its automatic checkpoint (1,000
pages, then written over). The files are printed, not judged: each is the high-water
mark of its data in use (kept, plus the live audit of a retention's rollouts and, on
etcd, a retention's history), which a longer rollout raises now and then; etcd's leader
defragments it back when that matters (past half the quota), SQLite's only VACUUM
shrinks. A replica whose role changed is compared with the start's process of its new
role (a leader runs more). A rollout paused on a loaded machine (no evidence in time) is
aborted after 10 s, as an operator would.

    python benchmarks/soak.py --minutes 5 [--store etcd|sqlite|both] [--retention 15]
                              [--warmup-rounds 6] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc

from xds_server.ha.etcd import DEFAULT_PREFIX, range_end
from xds_server.lab.layout import SERVICE, MeshOptions
from xds_server.lab.load import LoadGenerator
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.polling import wait_for
from xds_server.lab.procs import Process, http_get
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.rollout.state import FINISHED, PAUSED
from xds_server.rollout.store import FILE_NAME

TOLERANCE = 0.10
"""How much a judged figure may grow between the two quiet points."""
ROUND_TIMEOUT = 300.0
"""A round's rollout finishes well within this (`max_hold` rolls back, a pause is aborted)."""
PAUSE_GRACE = 10.0
"""A rollout paused this long (no evidence in time on a loaded machine) is aborted."""
BAD_ERROR_RATE = 0.5
WAL_PAGES = 1000
"""SQLite's automatic checkpoint (`wal_autocheckpoint`, the server does not change it): the
WAL file grows to about this many pages, then is written over from its start."""
KEPT_TABLES = (
    "audit_archive",
    "sqlite_autoindex_audit_archive_1",
    "archive_by_last",
    "rollouts",
    "sqlite_autoindex_rollouts_1",
)
"""SQLite's tables and indexes kept by design: one archive row and one state per rollout."""
BBOLT_FACTOR = 1.5
"""etcd's file grows by about this many bytes per byte of a kept value: bbolt stores a
value larger than a page in whole pages and splits pages half full (over a 20-minute soak
of 74 rollouts the file grew 1.45 times what the archives, states and spec pushes added,
1.5-1.6 times in stretches)."""
KEPT = ("archive/", "archive-index/", "rollouts/", "spec-history/")
"""etcd keys kept by design, one per rollout (archive objects, their index, the rollout's
state) or per spec push (its history): the live keyspace is the rest."""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def mib(n: float) -> str:
    return f"{n / 1024**2:.2f} MiB"


@dataclass
class Round:
    number: int
    version: str
    healthy: bool
    outcome: str = ""
    seconds: float = 0.0


# ---- what the stores hold ----


def etcd_counts(target: str, prefix: str) -> dict[str, int]:
    """Keys under the prefix: all, the live audit, and each kind kept by design (with
    the bytes of their values)."""
    out: dict[str, int] = {}
    with grpc.insecure_channel(target) as channel:
        kv = rpc.KVStub(channel)

        def count(sub: str) -> int:
            key = f"{prefix}/{sub}"
            req = rpc.RangeRequest(key=key.encode(), range_end=range_end(key), count_only=True)
            return int(kv.Range(req, timeout=10).count)

        out["keys"] = count("")
        out["audit_keys"] = count("audit-log/")
        kept = kept_bytes = 0
        for sub in KEPT:
            key = f"{prefix}/{sub}"
            got = kv.Range(rpc.RangeRequest(key=key.encode(), range_end=range_end(key)), timeout=10)
            kept += len(got.kvs)
            kept_bytes += sum(len(kv.value) for kv in got.kvs)
            out[f"kept {sub.rstrip('/')}"] = len(got.kvs)
        out["kept_keys"], out["kept_bytes"] = kept, kept_bytes
        out["live_keys"] = out["keys"] - kept
    return out


def etcd_figures(members: list[str], compacted: int) -> dict[str, int]:
    """The largest member's database (file, in use), the revision, the keys."""
    sizes, revision = [], 0
    for target in members:
        with grpc.insecure_channel(target) as channel:
            st = rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=10)
        sizes.append((int(st.dbSize), int(st.dbSizeInUse)))
        revision = max(revision, int(st.header.revision))
    db, in_use = max(sizes)
    return {
        "db_bytes": db,
        "db_in_use_bytes": in_use,
        "revision": revision,
        "compacted_revision": compacted,
        **etcd_counts(members[0], DEFAULT_PREFIX),
    }


def sqlite_figures(state_dir: Path) -> dict[str, int]:
    """The state file and its WAL; live audit rows, archive rows and their bytes. A
    connection of its own, closed at once (a reader left open would hold checkpoints)."""
    path = state_dir / FILE_NAME
    wal = path.with_name(path.name + "-wal")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT count(*) FROM audit").fetchone()[0]
        archives, archive_bytes = db.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0) FROM audit_archive"
        ).fetchone()
        pages, free, size = (
            db.execute(f"PRAGMA {p}").fetchone()[0]
            for p in ("page_count", "freelist_count", "page_size")
        )
        states = db.execute("SELECT coalesce(sum(length(state)), 0) FROM rollouts").fetchone()[0]
        kept = kept_pages(db, size, archive_bytes + states)
    finally:
        db.close()
    main, log = path.stat().st_size, wal.stat().st_size if wal.exists() else 0
    return {
        "file_bytes": main + log,
        "db_bytes": main,
        "wal_bytes": log,
        "pages": pages,
        "free_pages": free,
        "page_size": size,
        "kept_pages": kept,
        "audit_rows": rows,
        "archives": archives,
        "archive_bytes": archive_bytes,
    }


def kept_pages(db: sqlite3.Connection, page_size: int, kept_bytes: int) -> int:
    """The pages of what SQLite keeps by design (the archives, the rollouts' states, their
    indexes), from `dbstat`; without it (a SQLite built without), their bytes' worth."""
    names = ", ".join(f"'{n}'" for n in KEPT_TABLES)
    try:
        got = db.execute(f"SELECT count(*) FROM dbstat WHERE name IN ({names})").fetchone()[0]
    except sqlite3.OperationalError:
        return -(-kept_bytes // page_size)
    return int(got)


# ---- the soak on one lab ----


@dataclass
class Phase:
    store: str
    rounds: list[Round] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    start: dict[str, Any] = field(default_factory=dict)
    end: dict[str, Any] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)


class Soak:
    """One lab, driven round by round and read at quiet points."""

    def __init__(self, mesh: LocalMesh, retention: float, phase: Phase) -> None:
        self.mesh = mesh
        self.ha = mesh.opts.ha
        self.retention = retention
        self.phase = phase
        self.registered: list[Process] = []
        self.regions = mesh.opts.regions
        self.bad_region = self.regions[1 % len(self.regions)]
        self.t0 = time.monotonic()
        self.paused_at: float | None = None
        """When the current round's rollout was first seen paused."""
        self.paused_why = ""
        """Why it paused, once the soak aborted it."""

    # -- rounds --

    def round(self) -> Round:
        n = len(self.phase.rounds)
        r = Round(n + 1, f"v{n + 3}", healthy=n % 2 == 0)
        self.mesh.faults.set(
            self.bad_region, "canary", error_rate=0 if r.healthy else BAD_ERROR_RATE
        )
        previous, self.registered = self.registered, self._register(r.version)
        started = time.monotonic()
        self.mesh.spec.shape.canaries = {SERVICE: r.version}
        self.mesh.spec.write_shape()
        for proc in previous:  # the last canary's version leaves once the spec moved on
            proc.stop()
        self.paused_at, self.paused_why = None, ""
        r.outcome = wait_for(
            lambda: self._finished(r.version), f"rollout of {r.version} to finish",
            timeout=ROUND_TIMEOUT, interval=0.5,
        )  # fmt: skip
        r.seconds = time.monotonic() - started
        self.phase.rounds.append(r)
        return r

    def _finished(self, version: str) -> str | None:
        """The rollout's phase once finished. One paused (no evidence in time, on a loaded
        machine) for PAUSE_GRACE is aborted (rolled back), as an operator would."""
        state = self.mesh.state.rollout(SERVICE)
        if not state or state["canary_version"] != version:
            return None
        if state["phase"] in FINISHED:
            paused = f" (aborted by the soak, paused: {self.paused_why})" if self.paused_why else ""
            return f"{state['phase']}{paused}"
        if state["phase"] != PAUSED:
            self.paused_at = None
        elif self.paused_at is None:
            self.paused_at = time.monotonic()
        elif time.monotonic() - self.paused_at > PAUSE_GRACE and not self.paused_why:
            self.paused_why = str(state["reason"])[:120]
            self._abort()
        return None

    def _abort(self) -> None:
        lay = self.mesh.layout
        servers = [f"{lay.replica_host(r)}:{p['admin']}" for r, p in lay.replica_ports.items()]
        subprocess.run(
            [sys.executable, "-m", "xds_server.ctl",
             "--server", ",".join(servers) or f"{lay.server_host()}:{lay.admin_port}",
             "rollout", "abort", SERVICE, "--reason", "soak: paused"],
            check=False, capture_output=True, timeout=60,
        )  # fmt: skip

    def _register(self, version: str) -> list[Process]:
        """On etcd: the canary's model server of each region registered under `version`
        (the spec's pools are versions; the registry has their instances)."""
        etcd = self.mesh.processes.etcd
        if etcd is None:
            return []
        lay = self.mesh.layout
        procs = []
        for region in self.regions:
            host = lay.host(region)
            health = f"http://{host}:{lay.model_ports[(region, 'canary')]}/healthz"
            argv = [sys.executable, "-m", "xds_server.cli", "register", "--store", etcd.url,
                    *etcd.client_flags(), "--service", SERVICE, "--version", version,
                    "--region", region, "--address", f"{host}:{lay.pool_port(region, 'canary')}",
                    "--ttl", "3s",
                    "--health-url", health]  # fmt: skip
            path = lay.workdir / "soak" / f"register-{region}.log"
            procs.append(Process(f"register-{region}-{version}", argv, path))

        def listed() -> bool:
            view = self.mesh.state.etcd_store().view
            return {i.region for i in view.registry.values() if i.version == version} >= set(
                self.regions
            )

        try:
            wait_for(listed, f"{version} registered in every region", timeout=60, interval=0.2)
        except TimeoutError:
            for proc in procs:
                proc.stop()
            raise
        return procs

    def close(self) -> None:
        """Stop the registrations this soak made (the lab stops its own processes)."""
        for proc in self.registered:
            proc.stop()
        self.registered = []

    # -- figures --

    def servers(self) -> dict[str, Process]:
        procs = self.mesh.processes
        if self.ha:
            return dict(procs.replicas)
        assert procs.server is not None
        return {"server": procs.server}

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "at_s": round(time.monotonic() - self.t0, 1),
            "rounds": len(self.phase.rounds),
            "rss_kib": {name: rss_kib(p.pid) for name, p in self.servers().items()},
            "roles": self.roles(),
        }
        etcd = self.mesh.processes.etcd
        if etcd is not None:
            out["etcd"] = etcd_figures([m.client_address for m in etcd.members], self.compacted())
        else:
            out["sqlite"] = sqlite_figures(self.mesh.layout.state_dir)
        return out

    def metric(self, name: str) -> dict[str, float]:
        """Region -> this sample of each replica's /metrics (one that does not answer left out)."""
        lay, out = self.mesh.layout, {}
        for region, ports in lay.replica_ports.items():
            url = f"http://{lay.replica_host(region)}:{ports['metrics']}/metrics"
            status, body, _ = http_get(url, timeout=2.0)
            for line in body.decode(errors="replace").splitlines() if status == 200 else ():
                if line.startswith(f"{name} "):
                    out[region] = float(line.split()[1])
        return out

    def compacted(self) -> int:
        """The newest revision a replica compacted etcd to (`xds_etcd_compacted_revision`)."""
        return int(max(self.metric("xds_etcd_compacted_revision").values(), default=0))

    def roles(self) -> dict[str, str]:
        """Each server's role now (`xds_leader`)."""
        if not self.ha:
            return {"server": "leader"}
        leads = self.metric("xds_leader")
        return {r: "leader" if leads.get(r) == 1.0 else "follower" for r in self.regions}

    def quiet(self) -> dict[str, Any]:
        """The figures once retention has applied to everything before now: every finished
        rollout's audit archived, and (etcd) compacted past this moment's revision."""
        etcd = self.mesh.processes.etcd
        members = [m.client_address for m in etcd.members] if etcd else []
        since = etcd_figures(members, 0)["revision"] if etcd else 0

        def settled() -> bool:
            if etcd is None:
                return sqlite_figures(self.mesh.layout.state_dir)["audit_rows"] == 0
            return etcd_counts(members[0], DEFAULT_PREFIX)["audit_keys"] == 0 and (
                self.compacted() >= since
            )

        wait_for(
            settled,
            "the audit archived and etcd compacted",
            timeout=4 * self.retention + 120,
            interval=0.5,
        )
        return self.figures()


# ---- the verdict ----


@dataclass(frozen=True)
class Figure:
    """One judged figure at the two quiet points."""

    name: str
    start: float
    end: float
    allowed: float = 0.0
    """What the end may add beyond the tolerance: what the run archived (kept by design),
    or the room a bounded file has (the WAL, up to its checkpoint)."""
    unit: str = "MiB"

    def grew(self) -> bool:
        return self.end > self.start * (1 + TOLERANCE) + self.allowed

    def text(self) -> str:
        def v(x: float) -> str:
            return f"{x:.0f}" if self.unit == "keys" else mib(x)

        pct = 100 * (self.end - self.start) / self.start if self.start else float("inf")
        extra = f", {v(self.allowed)} allowed" if self.allowed else ""
        return f"{self.name} {pct:+.0f}% ({v(self.start)} -> {v(self.end)}{extra})"


def judged(phase: Phase) -> list[Figure]:
    """What must stay within TOLERANCE between the quiet points."""
    s, e = phase.start, phase.end
    out: list[Figure] = []
    if "etcd" in s:
        a, b = s["etcd"], e["etcd"]
        kept = BBOLT_FACTOR * (b["kept_bytes"] - a["kept_bytes"])
        out.append(Figure("etcd in use", a["db_in_use_bytes"], b["db_in_use_bytes"], kept))
        out.append(Figure("etcd live keys", a["live_keys"], b["live_keys"], unit="keys"))
    if "sqlite" in s:
        a, b = s["sqlite"], e["sqlite"]
        size = a["page_size"]
        rest_a, rest_b = ((f["pages"] - f["free_pages"] - f["kept_pages"]) * size for f in (a, b))
        out.append(Figure("SQLite in use beside archives and states", rest_a, rest_b))
        cap = WAL_PAGES * (size + 24) + 32  # (a frame per page, and the header)
        room = max(0.0, (cap - a["wal_bytes"]) * (1 + TOLERANCE))
        out.append(Figure("SQLite WAL", a["wal_bytes"], b["wal_bytes"], room))
    out += rss_figures(s, e)
    return out


def rss_figures(s: dict[str, Any], e: dict[str, Any]) -> list[Figure]:
    """Each server's RSS against its own at the start, or, when its role changed (a
    leader elected meanwhile), against the start's process of that role: a leader runs
    more than a follower."""
    out = []
    for name, kib in e["rss_kib"].items():
        role = e["roles"][name]
        if s["roles"].get(name) == role:
            base = s["rss_kib"][name]
        else:
            same = [k for n, k in s["rss_kib"].items() if s["roles"][n] == role]
            base = max(same, default=s["rss_kib"][name])
        label = f"RSS {name}" if name == "server" else f"RSS {name} ({role})"
        out.append(Figure(label, base * 1024, kib * 1024))
    return out


def verdict(phases: list[Phase]) -> str:
    parts = []
    for p in phases:
        minutes = (p.end["at_s"] - p.start["at_s"]) / 60
        n = p.end["rounds"] - p.start["rounds"]
        parts.append(f"{p.store} {n} rollouts in {minutes:.1f} min")
    head = "soak: " + ", ".join(parts)
    grew = [f.text() for p in phases for f in judged(p) if f.grew()]
    if grew:
        return f"{head}: grew: " + "; ".join(grew)
    return (
        f"{head}: etcd's and SQLite's data in use, etcd's live keys, SQLite's WAL and each "
        "server's RSS within 10% once retention applies (beside the archives kept): flat"
    )


# ---- printing ----


def sample_line(f: dict[str, Any]) -> str:
    lead = {n for n, r in f["roles"].items() if r == "leader" and n != "server"}
    rss = " ".join(f"{k}{'*' * (k in lead)} {v / 1024:.1f}" for k, v in f["rss_kib"].items())
    if "etcd" in f:
        e = f["etcd"]
        where = (
            f"etcd {mib(e['db_bytes'])} ({mib(e['db_in_use_bytes'])} in use), rev {e['revision']} "
            f"(compacted {e['compacted_revision']}), keys {e['keys']} (live {e['live_keys']}, "
            f"audit {e['audit_keys']}, kept {e['kept_keys']}: {e['kept_bytes'] / 1024:.1f} KiB)"
        )
    else:
        q = f["sqlite"]
        where = (
            f"SQLite {mib(q['file_bytes'])} (db {mib(q['db_bytes'])}, wal {mib(q['wal_bytes'])}, "
            f"{q['pages']} pages: {q['free_pages']} free, {q['kept_pages']} kept), "
            f"audit rows {q['audit_rows']}, "
            f"archives {q['archives']} ({q['archive_bytes'] / 1024:.1f} KiB)"
        )
    return f"{where}; RSS MiB {rss}"


def kept_line(p: Phase) -> str:
    """What the archive keeps per rollout, by design (not judged)."""
    n = p.end["rounds"] - p.start["rounds"]
    if not n:
        return ""
    if "etcd" in p.start:
        keys = p.end["etcd"]["kept_keys"] - p.start["etcd"]["kept_keys"]
        size = p.end["etcd"]["kept_bytes"] - p.start["etcd"]["kept_bytes"]
        return (
            f"  kept by design: +{keys} keys, +{size / 1024:.1f} KiB "
            f"({size / n / 1024:.1f} KiB per rollout: archive, index, state, spec push)"
        )
    size = p.end["sqlite"]["archive_bytes"] - p.start["sqlite"]["archive_bytes"]
    per = size / n / 1024
    return f"  kept by design: +{size / 1024:.1f} KiB of archives ({per:.1f} KiB per rollout)"


def leader_line(p: Phase) -> str:
    """Who led at each sample of the measured span (a change moves work between replicas)."""
    seen = [p.start, *p.samples[len(p.samples) - (p.end["rounds"] - p.start["rounds"]) :], p.end]
    leaders = [next((n for n, r in f["roles"].items() if r == "leader"), "none") for f in seen]
    changes = sum(a != b for a, b in itertools.pairwise(leaders))
    return f"  leader: {leaders[0]} at the start, {leaders[-1]} at the end, {changes} changes"


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


# ---- main ----


def run_phase(store: str, args: argparse.Namespace, workdir: Path) -> Phase:
    """One store's lab, its load, and the soak on it."""
    opts = MeshOptions(
        rollout=FAST_PLAN,
        ha=store == "etcd",
        store_retention=args.retention if store == "etcd" else None,
        audit_retention=args.retention,
    )
    phase = Phase(store)
    with LocalMesh(workdir / store, opts) as mesh:
        budget = (args.minutes + 10) * 60 + args.warmup_rounds * ROUND_TIMEOUT
        targets = {e.opts.node_id: e.opts.listen or "" for e in mesh.processes.envoys}
        load = LoadGenerator(
            targets, rate=opts.load_rate, max_seconds=budget, max_requests=10**8, model=SERVICE
        )
        mesh.processes.load = load.start()  # (stopped with the lab)
        wait_for(lambda: len(load.snapshot()) >= 30, "load", timeout=30)
        mesh.traffic.wait_latency_series(timeout=60)  # (what a rollout checks at its start)
        soak = Soak(mesh, args.retention, phase)
        try:
            drive(soak, args)
        finally:
            soak.close()
        statuses = load.statuses()
        phase.requests = {str(k): v for k, v in sorted(statuses.items())}
    return phase


def drive(soak: Soak, args: argparse.Namespace) -> None:
    """The warm-up, the first quiet point, rounds for `--minutes` (an even number), the
    last quiet point; each printed as it comes (unless `--json`)."""
    phase, out = soak.phase, args.json

    def one() -> None:
        r = soak.round()
        f = soak.figures()
        phase.samples.append({"round": asdict(r), **f})
        kind = "healthy" if r.healthy else "bad"
        line = f"  round {r.number} {r.version} {kind}: {r.outcome} in {r.seconds:.1f} s"
        log(f"{line} | {sample_line(f)}", out)

    log(f"{phase.store}: warm-up, {args.warmup_rounds} rounds", out)
    for _ in range(args.warmup_rounds):
        one()
    phase.start = soak.quiet()
    log(f"{phase.store} start (quiet): {sample_line(phase.start)}", out)
    until = time.monotonic() + args.minutes * 60
    while time.monotonic() < until or (len(phase.rounds) - args.warmup_rounds) % 2:
        one()
    phase.end = soak.quiet()
    log(f"{phase.store} end (quiet):   {sample_line(phase.end)}", out)
    log(kept_line(phase), out)
    if soak.ha:
        log(leader_line(phase), out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="per store, after the warm-up")
    p.add_argument("--store", choices=("etcd", "sqlite", "both"), default="both")
    p.add_argument("--retention", type=float, default=15.0, help="seconds: audit and compaction")
    p.add_argument("--warmup-rounds", type=int, default=6)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    stores = ("etcd", "sqlite") if args.store == "both" else (args.store,)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        phases = [run_phase(s, args, workdir) for s in stores]
    line = verdict(phases)
    if args.json:
        print(json.dumps({"phases": [asdict(ph) for ph in phases], "verdict": line}, indent=2))
    print(line)


if __name__ == "__main__":
    main()
