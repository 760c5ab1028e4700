"""Failover of replicas on etcd: a killed leader's successor, and decisions to every Envoy.

One local mesh with `ha` (a three-member etcd cluster, one `serve --store` replica per
region serving its region and the next one's, each region's Envoys on their own region's
replica first, real Prometheus, load through every Envoy) runs a rollout that holds at
its first step (a one-hour step), so the leader commits a check entry per region every
interval (1 s).

1. Leader failover: SIGKILL the replica that holds the leader key, `--kills` times. For
   each kill: the time to a new holder of the leader key (polled in etcd every 10 ms),
   to the new leader's first committed decision (the first audit entry after the kill,
   seen in etcd), and to the killed replica's Envoys connected to the other replica of
   their region (the replicas' keys). The killed replica is then started again; the next
   kill waits until its key is back in the store and every Envoy is connected.
2. Decision -> every Envoy: `--decisions` operator changes of the weights
   (`xdsctl rollout set-weights` on the leader's admin API, every region at once). For
   each: from the commit (its audit entry's time) until each Envoy's own /config_dump
   shows the routes version of the commit (every Envoy polled every `--poll-ms`).
   Envoys on the leader's replica and on the followers are reported apart.

    python benchmarks/failover.py [--kills 5] [--leader-ttl 3] [--regions 3]
                                  [--decisions 10] [--envoys-per-region 2] [--poll-ms 5]
                                  [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import http.client
import io
import json
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aetcd import rpc

from xds_server.ctl import main as xdsctl
from xds_server.ha.etcd import Keys, parse_store_url, range_end
from xds_server.ha.store import VERSION_SCALE
from xds_server.lab.layout import DEFAULT_REGIONS, SERVICE, MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.polling import wait_for
from xds_server.lab.procs import Envoy
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.rollout.state import LIVE

PLAN: dict[str, Any] = {**FAST_PLAN, "step_duration": "1h", "max_hold": "1h"}
"""The rollout tests' plan, held at its first step (5%): every interval (1 s) the leader
judges each region and commits a check entry; a step never passes by itself."""
ACTOR = "failover-benchmark"
STORE_POLL = 0.01
"""How often the leader key and the audit log are read from etcd while waiting."""

T = TypeVar("T")
PROGRESS = {"to": sys.stdout}
"""Where the running commentary goes (stderr with --json: stdout is the JSON)."""


def progress(text: str) -> None:
    print(text, file=PROGRESS["to"], flush=True)


def poll(what: Callable[[], T | None], timeout: float, interval: float, name: str) -> T:
    """`what()` until it returns something other than None; TimeoutError after `timeout`.
    (Store reads that fail are retried: a member may be busy.)"""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = what()
            if value is not None:
                return value
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {name}")
        time.sleep(interval)


# ---- reading the store (a few keys at a time, never the whole prefix) ----


@dataclass(frozen=True)
class Entry:
    seq: int
    time: float
    kind: str
    actor: str
    region: str | None
    reason: str
    revision: int
    """The commit's store revision (its routes version is this times 1000)."""


class StoreReader:
    def __init__(self, url: str) -> None:
        address = parse_store_url(url)
        self.keys = Keys(address.prefix)
        self._channel = grpc.insecure_channel(address.target)
        self._kv = rpc.KVStub(self._channel)

    def _range(self, key: str, end: bytes | None = None, **kw: Any) -> Any:
        req = rpc.RangeRequest(key=key.encode(), range_end=end or b"", **kw)
        return self._kv.Range(req, timeout=2.0)

    def leader(self) -> tuple[str, int] | None:
        """(replica, the key's create revision) of the leader key's holder, if any."""
        got = self._range(self.keys.leader)
        return (got.kvs[0].value.decode(), got.kvs[0].create_revision) if got.kvs else None

    def replicas(self) -> dict[str, dict[str, Any]]:
        prefix = self.keys.replica()
        got = self._range(prefix, range_end(prefix))
        return {kv.key.decode()[len(prefix) :]: json.loads(kv.value) for kv in got.kvs}

    def last_seq(self) -> int:
        """The last audit id given (`audit-seq`, ha/audit_log.py)."""
        got = self._range(f"{self.keys.prefix}/audit-seq")
        return int(got.kvs[0].value) if got.kvs else 0

    def entries_after(self, seq: int) -> list[Entry]:
        """Every live entry after `seq`, by id (the log is kept per rollout)."""
        prefix = f"{self.keys.prefix}/audit-log/"
        got = self._range(prefix, range_end(prefix))
        out = []
        for kv in got.kvs:
            doc = json.loads(kv.value)
            id_ = int(kv.key.decode().rpartition("/")[2])
            if id_ > seq:
                out.append(Entry(id_, doc["time"], doc["kind"], doc["actor"], doc["region"],
                                 doc["reason"], kv.mod_revision))  # fmt: skip
        return sorted(out, key=lambda e: e.seq)

    def close(self) -> None:
        self._channel.close()


# ---- watching Envoys' routes versions ----


ROUTES_DUMP = "/config_dump?resource=dynamic_route_configs"
VERSION_INFO = re.compile(rb'"version_info":\s*"(\d+)"')


class RoutesVersion:
    """The version of the routes an Envoy reports it applied (its own /config_dump, the
    dynamic route configs only), over one kept-alive admin connection."""

    def __init__(self, envoy: Envoy) -> None:
        self.port = envoy.opts.admin_port
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)

    def read(self) -> int | None:
        try:
            self.conn.request("GET", ROUTES_DUMP)
            resp = self.conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()  # (reconnects on the next request)
            return None
        if resp.status != 200:
            return None
        return max((int(v) for v in VERSION_INFO.findall(body)), default=None)

    def close(self) -> None:
        self.conn.close()


class VersionWatch:
    """One thread per Envoy polling its routes version; keeps when each version was first
    seen, so a decision's arrival is looked up after the fact."""

    def __init__(self, envoys: Sequence[Envoy], interval: float, max_seconds: float) -> None:
        self.envoys = list(envoys)
        self.interval = interval
        self.max_seconds = max_seconds
        self.seen: dict[str, list[tuple[float, int]]] = {e.opts.node_id: [] for e in envoys}
        self.polls = 0
        self.started = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(e,), daemon=True) for e in self.envoys
        ]

    def start(self) -> VersionWatch:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def _run(self, envoy: Envoy) -> None:
        seen = self.seen[envoy.opts.node_id]
        admin = RoutesVersion(envoy)
        end = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < end:
            version = admin.read()
            now = time.time()  # (the version was applied before this answer)
            with self._lock:
                self.polls += 1
                if version is not None and (not seen or seen[-1][1] != version):
                    seen.append((now, version))
            self._stop.wait(self.interval)
        admin.close()

    def period_ms(self) -> float:
        """The mean time between two polls of one Envoy so far (the resolution)."""
        elapsed = time.monotonic() - self.started
        return elapsed * 1000 * len(self.envoys) / max(1, self.polls)

    def latest(self) -> dict[str, int | None]:
        """node id -> the routes version it showed last."""
        with self._lock:
            return {n: seen[-1][1] if seen else None for n, seen in self.seen.items()}

    def reached(self, node_id: str, version: int) -> float | None:
        """When this Envoy was first seen with routes at `version` or newer."""
        with self._lock:
            return next((t for t, v in self.seen[node_id] if v >= version), None)


# ---- the mesh ----


def region_names(n: int) -> tuple[str, ...]:
    return tuple((*DEFAULT_REGIONS, *(f"region-{i}" for i in range(4, n + 1)))[:n])


def node_homes(store: StoreReader, dead: str | None = None) -> dict[str, str]:
    """node id -> the replica its xDS stream is on (from the replicas' keys; a `dead`
    replica's key, which outlives its process by up to a lease, left out)."""
    docs = store.replicas()
    return {n["id"]: rid for rid, doc in docs.items() if rid != dead for n in doc.get("nodes", [])}


def wait_connected(
    mesh: LocalMesh, store: StoreReader, timeout: float, dead: str | None = None
) -> dict[str, str]:
    """Wait until every Envoy is connected to a replica (its own region's, or the other
    one that serves its region); its node id -> that replica."""
    nodes = {e.opts.node_id for e in mesh.processes.envoys}

    def connected() -> dict[str, str] | None:
        homes = node_homes(store, dead)
        return homes if nodes <= homes.keys() else None

    return poll(connected, timeout, 0.02, "every Envoy connected to a replica")


def judged_regions(store: StoreReader, timeout: float, span: float = 2.5) -> list[str]:
    """Wait until the leader is deciding (a check entry committed from now on); the
    regions it commits checks for over `span` seconds (two intervals and a half)."""
    since = store.last_seq()
    poll(lambda: store.entries_after(since) or None, timeout, 0.05, "a check entry")
    time.sleep(span)
    return sorted({e.region or "*" for e in store.entries_after(since) if e.kind == "check"})


def elected_at(log: Path, after: float) -> float | None:
    """When the replica's log says it was elected leader (its own clock), after `after`."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if "elected leader" not in line or not line.startswith("{"):
            continue
        try:
            stamp = json.loads(line)["time"]
        except (ValueError, KeyError):
            continue
        when = float(calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")))
        when += int(stamp[20:23]) / 1000
        if when >= after:
            return when
    return None


# ---- 1. leader failover ----


@dataclass
class Kill:
    killed: str
    new_leader: str
    to_leader_s: float
    """SIGKILL -> a new holder of the leader key, seen in etcd."""
    to_leader_log_s: float | None
    """SIGKILL -> the new leader's own "elected leader" log line."""
    to_decision_s: float
    """SIGKILL -> its first committed audit entry, seen in etcd."""
    to_decision_entry_s: float
    """SIGKILL -> that entry's own time (the leader's clock at the commit)."""
    first_entry: str
    judged_before: list[str]
    """The regions the leader committed checks for just before the kill."""
    stranded: list[str]
    """The Envoys that were connected to the killed replica."""
    to_reconnected_s: float
    """SIGKILL -> each of them connected to another replica that serves its region."""
    restart_to_key_s: float
    """Restart -> the restarted process's own key in the store."""


def one_kill(mesh: LocalMesh, store: StoreReader, ttl: float, timeout: float) -> Kill:
    judged = judged_regions(store, timeout)
    old = store.leader()
    assert old is not None, "no leader before the kill"
    killed, fence = old
    stranded = sorted(n for n, rid in wait_connected(mesh, store, timeout).items() if rid == killed)
    since = store.last_seq()
    t_kill = time.time()
    mesh.faults.kill_replica(killed)

    seen: dict[str, float] = {}  # what has happened since the kill -> when it was seen
    found: dict[str, Any] = {}

    def everything() -> bool | None:
        if "leader" not in seen and (lead := store.leader()) and lead[1] != fence:
            found["leader"], seen["leader"] = lead[0], time.time()
        if "decision" not in seen:
            fresh = [e for e in store.entries_after(since) if e.time > t_kill]
            if fresh:
                found["decision"], seen["decision"] = fresh[0], time.time()
        if "moved" not in seen and set(stranded) <= node_homes(store, killed).keys():
            seen["moved"] = time.time()
        return True if len(seen) == 3 else None

    try:
        poll(everything, ttl + timeout, STORE_POLL, "a new leader, its decision, the Envoys")
    except TimeoutError:
        raise TimeoutError(f"after the kill of {killed}, only {sorted(seen)} seen") from None
    leader, entry = str(found["leader"]), found["decision"]
    t_log = elected_at(mesh.workdir / f"xds-server-{leader}.log", t_kill)
    t_restart = time.time()
    mesh.processes.start_replica(killed)

    def fresh_key() -> bool | None:  # (the killed process's key lives until its lease ends)
        doc = store.replicas().get(killed)
        return True if doc is not None and doc.get("started", 0) >= t_restart else None

    poll(fresh_key, timeout, 0.05, f"{killed}'s key")
    return Kill(
        killed=killed,
        new_leader=leader,
        to_leader_s=seen["leader"] - t_kill,
        to_leader_log_s=None if t_log is None else t_log - t_kill,
        to_decision_s=seen["decision"] - t_kill,
        to_decision_entry_s=entry.time - t_kill,
        first_entry=f"{entry.kind} {entry.region or '*'}: {entry.reason[:60]}",
        judged_before=judged,
        stranded=stranded,
        to_reconnected_s=seen["moved"] - t_kill,
        restart_to_key_s=time.time() - t_restart,
    )


def failovers(mesh: LocalMesh, store: StoreReader, a: argparse.Namespace) -> list[Kill]:
    kills = []
    for i in range(a.kills):
        state = mesh.state.rollout()
        if state is None or state["phase"] not in LIVE:
            progress(f"stopping the kills: the rollout is {state and state['phase']}: "
                  f"{state and state['reason']}")  # fmt: skip
            break
        k = one_kill(mesh, store, a.leader_ttl, a.timeout)
        kills.append(k)
        log_s = "?" if k.to_leader_log_s is None else f"{k.to_leader_log_s:.2f}s"
        progress(
            f"kill {i + 1}: {k.killed} killed -> {k.new_leader} holds the key after "
            f"{k.to_leader_s:.2f}s (its log: {log_s}), first decision after "
            f"{k.to_decision_s:.2f}s ({k.first_entry}); regions judged before the kill: "
            f"{', '.join(k.judged_before)}; its Envoys ({', '.join(k.stranded) or 'none'}) "
            f"on another replica after {k.to_reconnected_s:.2f}s; restarted, its key back "
            f"in {k.restart_to_key_s:.2f}s"
        )
    return kills


# ---- 2. decision -> every Envoy ----


@dataclass
class Push:
    canary: float
    version: int
    leader: str
    call_s: float
    """The xdsctl call, process start to exit."""
    per_envoy_s: dict[str, float] = field(default_factory=dict)
    """node id -> commit (audit entry time) -> that Envoy showed the version."""
    on_leader: dict[str, bool] = field(default_factory=dict)


def set_weights(mesh: LocalMesh, leader: str, canary: float, i: int) -> float:
    """`xdsctl rollout set-weights` on the leader's admin API (xdsctl's own `main`, in this
    process: no interpreter start-up competing with the push for the CPU)."""
    argv = ["--server", f"127.0.0.1:{mesh.layout.replica_admin(leader)}", "--actor", ACTOR,
            "rollout", "set-weights", SERVICE, "--canary", f"{canary:g}",
            "--reason", f"failover benchmark decision {i + 1}"]  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    start = time.time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = xdsctl(argv)
    if code != 0:
        raise RuntimeError(f"xdsctl set-weights failed: {err.getvalue().strip()}")
    return time.time() - start


def one_push(
    mesh: LocalMesh, store: StoreReader, watch: VersionWatch, i: int, timeout: float
) -> Push:
    lead = store.leader()
    assert lead is not None
    homes = node_homes(store)
    since = store.last_seq()
    canary = 10.0 + i % 50  # a new weight each time (the rollout starts at 5%)
    call_s = set_weights(mesh, lead[0], canary, i)
    mine = [e for e in store.entries_after(since) if ACTOR in e.actor]
    assert mine, "the set-weights call committed no audit entry"
    committed = mine[0].time
    target = mine[0].revision * VERSION_SCALE
    push = Push(canary, target, lead[0], call_s)
    nodes = [e.opts.node_id for e in mesh.processes.envoys]

    def arrived() -> dict[str, float] | None:
        times = [(n, watch.reached(n, target)) for n in nodes]
        return {n: t for n, t in times if t is not None} if all(t for _, t in times) else None

    try:
        times = poll(arrived, timeout, 0.01, f"every Envoy at routes {target}")
    except TimeoutError:
        raise TimeoutError(f"not every Envoy reached routes {target}: {watch.latest()}") from None
    for node, t in times.items():
        push.per_envoy_s[node] = t - committed
        push.on_leader[node] = homes.get(node) == lead[0]
    return push


def pushes(
    mesh: LocalMesh, store: StoreReader, a: argparse.Namespace
) -> tuple[list[Push], float | None]:
    """The decisions, and how often each Envoy was polled in fact (ms between polls)."""
    state = mesh.state.rollout()
    if state is None or state["phase"] not in LIVE:
        progress(f"no decisions measured: the rollout is {state and state['phase']}")
        return [], None
    homes = wait_connected(mesh, store, a.timeout)
    by_replica = {
        rid: sorted(n for n, r in homes.items() if r == rid) for rid in mesh.processes.replicas
    }
    progress(f"Envoys by replica: {by_replica}")
    budget = a.decisions * (a.timeout + 35) + 30
    watch = VersionWatch(mesh.processes.envoys, a.poll_ms / 1000, budget).start()
    out = []
    try:
        for i in range(a.decisions):
            p = one_push(mesh, store, watch, i, a.timeout)
            out.append(p)
            worst = max(p.per_envoy_s.values())
            progress(
                f"decision {i + 1}: canary {p.canary:g}% (routes {p.version}, leader "
                f"{p.leader}): every Envoy after {worst * 1000:.0f}ms "
                f"({', '.join(f'{n} {s * 1000:.0f}' for n, s in p.per_envoy_s.items())})"
            )
            time.sleep(0.5)  # let the routes settle before the next change
    finally:
        period = watch.period_ms()
        watch.stop()
    progress(f"({watch.polls} polls of Envoy admin pages: one per Envoy every {period:.1f} ms)")
    return out, period


# ---- the figures ----


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(kills: list[Kill], done: list[Push], period_ms: float | None) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, Any]:
        if not values:
            return {"n": 0}
        return {
            "n": len(values),
            "p50": statistics.median(values),
            "p90": quantile(values, 0.9),
            "max": max(values),
            "values": [round(v, 4) for v in values],
        }

    every = [max(p.per_envoy_s.values()) for p in done]
    leader = [s for p in done for n, s in p.per_envoy_s.items() if p.on_leader[n]]
    follower = [s for p in done for n, s in p.per_envoy_s.items() if not p.on_leader[n]]
    return {
        "kill_to_new_leader_s": stats([k.to_leader_s for k in kills]),
        "kill_to_first_decision_s": stats([k.to_decision_s for k in kills]),
        "kill_to_envoys_reconnected_s": stats([k.to_reconnected_s for k in kills if k.stranded]),
        "decision_to_every_envoy_s": stats(every),
        "decision_to_envoy_on_leader_s": stats(leader),
        "decision_to_envoy_on_follower_s": stats(follower),
        "envoy_poll_period_ms": period_ms,
    }


def report(command: str, a: argparse.Namespace, s: dict[str, Any]) -> None:
    def secs(key: str) -> str:
        v = s[key]
        if not v["n"]:
            return "no data"
        each = ", ".join(f"{x:.2f}" for x in v["values"])
        return f"p50 {v['p50']:.2f}s, max {v['max']:.2f}s  (n={v['n']}: {each})"

    def ms(key: str) -> str:
        v = s[key]
        if not v["n"]:
            return "no data"
        return (
            f"p50 {v['p50'] * 1000:.0f}ms, p90 {v['p90'] * 1000:.0f}ms, "
            f"max {v['max'] * 1000:.0f}ms  (n={v['n']})"
        )

    rule = "=" * 78
    print(rule)
    print(f"$ {command}")
    print(
        f"{a.regions} regions, {a.envoys_per_region} Envoy(s) each, --leader-ttl {a.leader_ttl:g}, "
        f"{a.kills} kills, {a.decisions} decisions"
    )
    period = s["envoy_poll_period_ms"]
    polled = "not polled" if period is None else f"{period:.1f} ms between polls of one Envoy"
    print(f"Envoys polled every {a.poll_ms:g} ms + the request ({polled}: the resolution)")
    print(f"SIGKILL leader -> new leader key holder:   {secs('kill_to_new_leader_s')}")
    print(f"SIGKILL leader -> its first decision:      {secs('kill_to_first_decision_s')}")
    print(f"SIGKILL leader -> its Envoys reconnected:  {secs('kill_to_envoys_reconnected_s')}")
    print(f"decision -> every Envoy, every region:    {ms('decision_to_every_envoy_s')}")
    print(f"decision -> an Envoy on the leader:       {ms('decision_to_envoy_on_leader_s')}")
    print(f"decision -> an Envoy on a follower:       {ms('decision_to_envoy_on_follower_s')}")
    print(rule)


def run(a: argparse.Namespace, workdir: Path) -> tuple[list[Kill], list[Push], float | None]:
    opts = MeshOptions(regions=region_names(a.regions), envoys_per_region=a.envoys_per_region,
                       rollout=PLAN, load_rate=50, ha=True, leader_ttl=a.leader_ttl)  # fmt: skip
    budget = a.kills * (a.leader_ttl + 4 * a.timeout) + a.decisions * (a.timeout + 35) + 300
    with LocalMesh(workdir, opts) as mesh:
        assert mesh.processes.etcd is not None
        store = StoreReader(mesh.processes.etcd.url)
        try:
            progress(f"mesh up in {workdir}; leader: {mesh.state.wait_leader()}")
            load = mesh.processes.start_load(budget)
            wait_for(lambda: len(load.snapshot()) >= 20, "load through the Envoys", timeout=15)
            mesh.traffic.wait_latency_series()  # (a rollout needs every pool's series to start)
            mesh.spec.add_canary()
            mesh.state.wait_phase({"progressing"}, 60)
            kills = failovers(mesh, store, a)
            done, period = pushes(mesh, store, a)
            state = mesh.state.rollout()
            progress(f"rollout at the end: {state['phase'] if state else None}")
            return kills, done, period
        finally:
            store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5, help="leader SIGKILLs")
    p.add_argument("--leader-ttl", type=float, default=3.0, help="the replicas' --leader-ttl")
    p.add_argument("--regions", type=int, default=3, help="regions (one replica each)")
    p.add_argument("--decisions", type=int, default=10, help="weight changes to follow")
    p.add_argument("--envoys-per-region", type=int, default=2)
    p.add_argument("--poll-ms", type=float, default=5.0, help="Envoy admin poll interval")
    p.add_argument("--timeout", type=float, default=30.0, help="the longest any one wait")
    p.add_argument("--workdir", type=Path, help="keep the mesh (and its logs) here")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.regions < 2:
        p.error("--regions: at least 2 (a killed leader needs a successor)")
    command = shlex.join(["python", *sys.argv])
    if a.json:
        PROGRESS["to"] = sys.stderr
    if a.workdir is not None:
        kills, done, period = run(a, a.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="failover-") as d:
            kills, done, period = run(a, Path(d))
    s = summary(kills, done, period)
    if a.json:
        doc = {"command": command, **s, "kills": [asdict(k) for k in kills]}
        print(json.dumps({**doc, "decisions": [asdict(x) for x in done]}, indent=2))
    else:
        report(command, a, s)


if __name__ == "__main__":
    main()
