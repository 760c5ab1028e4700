"""Replicas on etcd under faults, end to end: a three-member etcd cluster, one
`serve --store` replica per region (the region's Envoys list it first, then the other
replicas that serve the region), real Envoys, Prometheus and model servers, steady
load. Each test is one mesh that takes several faults in turn, in one rollout:

- an etcd member lost, then the leader SIGKILLed (2 regions);
- a follower SIGKILLed, then a rollback decided while another follower is frozen
  (3 regions: a leader and two followers);
- etcd unreachable from every replica, then the leader frozen past its lease (2 regions).
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.support import holds_for, wait_for, wait_shares
from xds_server.lab.layout import MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import Envoy, Process, http_get
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.lab.traffic import canary_share, envoy_weights
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.metrics import PrometheusSource
from xds_server.spec.rollout import DEFAULT_QUERIES

TTL = 3.0
"""The replicas' `--leader-ttl`."""
INTERVAL = 1.0
"""The plan's decision interval (FAST_PLAN's `interval`)."""
STEP_SECONDS = 3.0
"""FAST_PLAN's `step_duration`."""
KEEPALIVE_TIMEOUT = 0.5
"""A frozen replica keeps its Envoys for this long at least: their HTTP/2 PINGs to it go
unanswered for 0.5 s before the stream is dropped (and its gRPC health check times out
after 1 s);
then they move on to the next server of their bootstrap (about 2 to 3 s, measured by
benchmarks/xds_failover.py)."""
TWO = ("us-east", "eu-west")
THREE = ("us-east", "eu-west", "ap-south")
RESUMED = "resuming rollout of recommender v2"
DONE = {"promoted", "rolled_back", "paused"}


def ha_options(regions: tuple[str, ...]) -> MeshOptions:
    assert FAST_PLAN["interval"] == f"{INTERVAL:g}s"
    assert FAST_PLAN["step_duration"] == f"{STEP_SECONDS:g}s"
    return MeshOptions(
        regions=regions,
        envoys_per_region=1,
        ha=True,
        leader_ttl=TTL,
        rollout=FAST_PLAN,
        load_rate=40,
    )


# ---- reading the mesh ----


def region_steps(mesh: LocalMesh) -> dict[str, int]:
    state = mesh.state.rollout()
    return {r: s["step"] for r, s in state["regions"].items()} if state else {}


def recent(mesh: LocalMesh) -> str:
    """Where the rollout is and its last decisions, and what the replicas refused: for
    failure messages."""
    entries = [f"{e.id} {e.region} {e.kind} {e.step}: {e.reason}" for e in mesh.state.audit()[-6:]]
    refused = [
        line[-200:]
        for p in mesh.processes.replicas.values()
        for line in p.tail(400).splitlines()
        if "refused" in line or "stepping down" in line
    ]
    return f"state {mesh.state.rollout()}; last: {entries}; replicas said: {refused[-6:]}"


def wait_step(mesh: LocalMesh, step: int, timeout: float) -> None:
    """Wait until every region is at `step`; on timeout, say where the rollout was."""

    def reached() -> bool:
        state = mesh.state.rollout()
        return bool(state and state["phase"] == "progressing") and set(
            region_steps(mesh).values()
        ) == {step}

    try:
        wait_for(reached, f"every region at step {step}", timeout=timeout)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; {recent(mesh)}") from None


def log_size(process: Process) -> int:
    return process.log_path.stat().st_size


def log_since(process: Process, offset: int) -> str:
    """What a process logged after `offset` (a `log_size` taken before)."""
    return process.log_path.read_bytes()[offset:].decode(errors="replace")


def messages(text: str) -> list[str]:
    """The messages of a replica's JSON log lines."""
    out = []
    for line in text.splitlines():
        try:
            out.append(str(json.loads(line)["message"]))
        except (ValueError, KeyError, TypeError):
            out.append(line)
    return out


def etcd_raft_leader(mesh: LocalMesh) -> int:
    """Which etcd member leads the raft group now (its `etcd_server_is_leader` is 1)."""
    assert mesh.processes.etcd is not None

    def leader() -> int | None:
        assert mesh.processes.etcd is not None
        for i, member in enumerate(mesh.processes.etcd.members):
            status, body, _ = http_get(f"{member.client_url}/metrics")
            if status == 200 and re.search(rb"^etcd_server_is_leader 1", body, re.M):
                return i + 1  # (0 is falsy to wait_for)
        return None

    return wait_for(leader, "the etcd raft leader", timeout=10) - 1


def replica_nodes(mesh: LocalMesh, region: str) -> list[dict[str, Any]]:
    """The nodes connected to a region's replica, from its dashboard's /api/nodes."""
    status, body, _ = http_get(
        f"http://127.0.0.1:{mesh.layout.replica_ports[region]['ui']}/api/nodes"
    )
    assert status == 200, body
    return list(json.loads(body)["nodes"])


def serving(mesh: LocalMesh, node_id: str) -> tuple[str, dict[str, Any]] | None:
    """(the replica that holds this node's stream, the node as it reports it), among the
    live replicas."""
    for region, process in mesh.processes.replicas.items():
        if not process.alive():
            continue
        for node in replica_nodes(mesh, region):
            if node["id"] == node_id:
                return region, node
    return None


def route_version(node: dict[str, Any]) -> tuple[str, str]:
    """(the routes version the replica serves the node's region now, the one it ACKed)."""
    (route,) = [t for t in node["types"] if t["type"] == "route"]
    return str(route["current_version"]), str(route["acked_version"])


def store_routes_version(mesh: LocalMesh, region: str) -> str:
    """The routes version every replica derives for `region` from the store."""
    store = mesh.state.etcd_store()
    store.read()
    return str(store.routes_version(region))


def wait_synced(mesh: LocalMesh, envoy: Envoy, timeout: float) -> str:
    """Wait until a live replica holds this Envoy's stream and says it is SYNCED, on the
    routes version the store implies for its region, which the Envoy itself reports it
    applied; the replica's region."""

    def synced() -> str | None:
        found = serving(mesh, envoy.opts.node_id)
        if found is None or found[1]["sync_state"] != "SYNCED":
            return None
        current, acked = route_version(found[1])
        applied = envoy.applied_versions().get("route")
        expected = store_routes_version(mesh, envoy.opts.region)
        return found[0] if current == acked == applied == expected else None

    try:
        return wait_for(synced, f"{envoy.opts.node_id} SYNCED on a live replica", timeout=timeout)
    except TimeoutError as exc:
        raise AssertionError(
            f"{exc}: it is on {serving(mesh, envoy.opts.node_id)}, applied "
            f"{envoy.applied_versions()}; {recent(mesh)}"
        ) from None


def placement(mesh: LocalMesh) -> dict[str, str]:
    """node id -> the live replica that holds its stream, once every Envoy has one.

    Normally its own region's replica, but the tests do not count on it: an Envoy that
    once connected while its own replica was not answering stays on the next one its
    bootstrap lists (an ADS stream is never moved back)."""

    def placed() -> dict[str, str] | None:
        where = {
            e.opts.node_id: (serving(mesh, e.opts.node_id) or ("",))[0]
            for e in mesh.processes.envoys
        }
        return where if all(where.values()) else None

    return wait_for(placed, "every Envoy connected to a replica", timeout=15)


def goes_to(mesh: LocalMesh, envoy: Envoy, down: Iterable[str]) -> str | None:
    """The replica an Envoy reconnects to when `down` are: the first of its bootstrap's
    xDS servers (its region's replica, then the fallbacks) that is not down."""
    by_port = {ports["xds"]: r for r, ports in mesh.layout.replica_ports.items()}
    order = [by_port[envoy.opts.xds_port], *(by_port[p] for _, p in envoy.opts.xds_fallbacks)]
    return next((r for r in order if r not in set(down)), None)


def transitions(audit: list[AuditEntry], region: str) -> list[int | None]:
    """The steps a region was moved to, in commit order."""
    return [
        e.step
        for e in audit
        if e.region == region and e.kind == "transition" and e.phase_to == "progressing"
    ]


class ShareWatcher:
    """Every Envoy's canary share, polled from its /config_dump until `stop()`."""

    def __init__(self, envoys: list[Envoy]) -> None:
        self.envoys = envoys
        self.shares: dict[str, list[float]] = {e.opts.node_id: [] for e in envoys}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ShareWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():  # bounded by the test's stop()
            for e in self.envoys:
                self.shares[e.opts.node_id].append(canary_share(e))
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def start_load(mesh: LocalMesh) -> Any:
    """Load through every Envoy, until Prometheus has every region's production latency
    histogram over a window: a rollout begun before that is paused at once as a
    configuration error ("query 'latency_buckets' returns no data for ... which
    receives traffic"), since the request counter shows traffic a scrape earlier."""
    load = mesh.processes.start_load(200)
    wait_for(
        lambda: (
            {r.target for r in load.snapshot() if r.status == 200}
            == {e.opts.node_id for e in mesh.processes.envoys}
        ),
        "load through every Envoy",
        timeout=15,
    )
    source = PrometheusSource(f"http://127.0.0.1:{mesh.layout.prometheus_port}")
    template = DEFAULT_QUERIES["latency_buckets"]
    queries = [
        template.format(region=r, cluster="recommender|production", window=FAST_PLAN["window"])
        for r in mesh.opts.regions
    ]
    wait_for(
        lambda: all(source.buckets(q) for q in queries),
        "every region's production latency in Prometheus",
        timeout=20,
        interval=0.2,
    )
    return load


def fault_pair(mesh: LocalMesh, followers: list[str], where: dict[str, str]) -> tuple[str, str]:
    """(the follower to kill, the one to freeze after): the first holds Envoys now, the
    second holds some once the first one's have moved."""
    by_id = {e.opts.node_id: e for e in mesh.processes.envoys}
    for killed in followers:
        (frozen,) = [r for r in followers if r != killed]
        after = {
            node: goes_to(mesh, by_id[node], [killed]) if replica == killed else replica
            for node, replica in where.items()
        }
        if killed in where.values() and frozen in after.values():
            return killed, frozen
    raise AssertionError(f"no two followers hold Envoys to test with: {where}")


# ---- the faults ----


@pytest.mark.timeout(240)
def test_etcd_member_loss_then_leader_sigkill_mid_rollout_lose_no_request(
    tmp_path: Path,
) -> None:
    """(b) One etcd member of three killed at step 1 changes nothing; (a) the leader
    SIGKILLed at step 2: the follower leads within TTL + one interval, resumes the same
    step with the same weights, the canary is promoted, no request fails."""
    with LocalMesh(tmp_path / "mesh", ha_options(TWO)) as mesh:
        assert mesh.processes.etcd is not None
        load = start_load(mesh)
        leader = mesh.state.wait_leader()
        (follower,) = [r for r in TWO if r != leader]
        where = placement(mesh)
        print(f"\nleader {leader}; Envoys on {where}")
        mesh.spec.add_canary()
        wait_step(mesh, 1, 60)
        wait_shares(mesh.processes.envoys, 20)

        # (b) The raft leader among the etcd members, the worst one to lose.
        member = etcd_raft_leader(mesh)
        offset = log_size(mesh.processes.replicas[leader])
        lost_at = time.monotonic()
        mesh.processes.etcd.kill(member)
        wait_step(mesh, 2, 30)
        print(f"etcd member {member} (raft leader) killed -> step 2: "
              f"{time.monotonic() - lost_at:.2f}s")  # fmt: skip
        assert mesh.state.leader() == leader
        assert "stepping down" not in log_since(mesh.processes.replicas[leader], offset)
        wait_shares(mesh.processes.envoys, 75)

        # (a) The leader SIGKILLed at 75%.
        before = region_steps(mesh)
        assert set(before.values()) == {2}
        # (Which Envoys hold a stream to the leader depends on start-up order: see
        # `placement`. Those that do must move; the rest must not notice.)
        on_leader = [e for e in mesh.processes.envoys if where[e.opts.node_id] == leader]
        assert all(goes_to(mesh, e, [leader]) == follower for e in on_leader)
        watcher = ShareWatcher(mesh.processes.envoys).start()
        offset = log_size(mesh.processes.replicas[follower])
        killed_at = time.monotonic()
        mesh.faults.kill_replica(leader)
        try:
            new_leader = mesh.state.wait_leader(TTL + 10, other_than=leader)
            failover = time.monotonic() - killed_at
            print(f"leader {leader} SIGKILLed -> {new_leader} leads: {failover:.2f}s")
            assert new_leader == follower
            assert failover <= TTL + INTERVAL, f"{failover:.2f}s"
            # The Envoys it served move to the other replica and are SYNCED there.
            for envoy in on_leader:
                assert wait_synced(mesh, envoy, 15) == follower
            print(f"leader {leader} SIGKILLed -> its {len(on_leader)} Envoys SYNCED on "
                  f"{follower}: {time.monotonic() - killed_at:.2f}s")  # fmt: skip
            said = wait_for(
                lambda: [m for m in messages(log_since(mesh.processes.replicas[follower], offset))
                         if m.startswith(RESUMED)],
                "the new leader to resume the rollout",
                timeout=10,
            )  # fmt: skip
            assert said[0] == f"{RESUMED}: progressing at steps {before}", said
            state = mesh.state.wait_phase(DONE, 60)
            assert state["phase"] == "promoted", recent(mesh)
            # Every Envoy, those that moved too, ends on the committed 100%, on the
            # routes version the store implies.
            wait_shares(mesh.processes.envoys, 100)
            for envoy in mesh.processes.envoys:
                wait_synced(mesh, envoy, 15)
        finally:
            watcher.stop()
        # From the kill on, no Envoy's canary share went back: 75% until the new leader
        # advanced, never 0% or an earlier step's share in between.
        for node_id, shares in watcher.shares.items():
            assert shares and shares[0] == 75, (node_id, shares[:5])
            assert shares == sorted(shares), (node_id, shares)
            assert shares[-1] == 100, (node_id, shares[-5:])
        audit = mesh.state.audit()
        for region in TWO:
            assert transitions(audit, region) == [0, 1, 2, 3]  # no step repeated
        assert [e.phase_to for e in audit if e.region is None][-1] == "promoted"
        for envoy in mesh.processes.envoys:
            assert envoy_weights(envoy) == {"canary": 10_000}
        statuses = load.statuses()
        print(f"requests over the whole run: {dict(statuses)}")
        assert set(statuses) == {200}, load.failures()[:5]


@pytest.mark.timeout(240)
def test_a_killed_follower_fails_over_and_a_frozen_follower_hears_the_rollback(
    tmp_path: Path,
) -> None:
    """(d) A follower SIGKILLed at step 1: the Envoys it served move to another replica
    (their bootstrap's next) and stay SYNCED as the rollout advances, no request fails.
    (e) Another follower frozen (SIGSTOP) while a failing canary elsewhere is rolled
    back: its Envoys keep the old weights, then get 0% canary as soon as it runs again
    (SIGCONT)."""
    with LocalMesh(tmp_path / "mesh", ha_options(THREE)) as mesh:
        load = start_load(mesh)
        leader = mesh.state.wait_leader()
        followers = [r for r in THREE if r != leader]
        where = placement(mesh)
        print(f"\nleader {leader}; Envoys on {where}")
        killed, frozen = fault_pair(mesh, followers, where)
        killed_envoys = [e for e in mesh.processes.envoys if where[e.opts.node_id] == killed]
        mesh.spec.add_canary()
        wait_step(mesh, 1, 60)
        wait_shares(mesh.processes.envoys, 20)

        # (d) A follower SIGKILLed at 20%.
        killed_at = time.monotonic()
        mesh.faults.kill_replica(killed)
        hosts = {e.opts.node_id: wait_synced(mesh, e, 15) for e in killed_envoys}
        reconnected = time.monotonic() - killed_at
        print(f"follower {killed} SIGKILLed -> its Envoys SYNCED on {hosts}: "
              f"{reconnected:.2f}s")  # fmt: skip
        assert hosts == {e.opts.node_id: goes_to(mesh, e, [killed]) for e in killed_envoys}
        # The rollout advances; they follow it from the replica they moved to.
        wait_step(mesh, 2, 30)
        wait_shares(mesh.processes.envoys, 75)
        for envoy in killed_envoys:
            assert wait_synced(mesh, envoy, 10) == hosts[envoy.opts.node_id]
        failed = load.failures()
        print(f"requests until the canary fault: {dict(load.statuses())}")
        assert failed == [], failed[:5]

        # (e) Freeze the other follower; fail the canary in the leader's region.
        on_frozen = [
            e
            for e in mesh.processes.envoys
            if (serving(mesh, e.opts.node_id) or ("",))[0] == frozen
        ]
        assert on_frozen, f"no Envoy on {frozen} now"
        others = [e for e in mesh.processes.envoys if e not in on_frozen]
        stopped_at = time.monotonic()
        mesh.processes.replicas[frozen].signal(signal.SIGSTOP)
        fault_wall = time.time()
        mesh.faults.set(leader, "canary", error_rate=1.0)
        try:
            state = mesh.state.wait_phase(DONE, 30)
            decided = time.monotonic() - stopped_at
            assert state["phase"] == "rolled_back", recent(mesh)
            assert leader in state["reason"], state["reason"]
            wait_shares(others, 0)
            # It has heard nothing: its Envoys still route by the weights it last served
            # (they keep their stream to it for KEEPALIVE_TIMEOUT at least).
            stale = {e.opts.node_id: canary_share(e) for e in on_frozen}
            frozen_for = time.monotonic() - stopped_at
            assert frozen_for >= KEEPALIVE_TIMEOUT or set(stale.values()) == {75}, stale
        finally:
            resumed_at = time.monotonic()
            mesh.processes.replicas[frozen].signal(signal.SIGCONT)
        print(f"follower {frozen} SIGSTOPped, rollback committed {decided:.2f}s later; "
              f"SIGCONT after {resumed_at - stopped_at:.2f}s")  # fmt: skip
        wait_shares(on_frozen, 0, timeout=15, interval=0.05)
        heard = time.monotonic() - resumed_at
        print(f"follower {frozen} SIGCONT -> its Envoys at 0% canary: {heard:.2f}s")
        assert heard <= 5, f"{heard:.2f}s"
        for envoy in on_frozen:
            host = wait_synced(mesh, envoy, 10)
            assert host == frozen or resumed_at - stopped_at >= KEEPALIVE_TIMEOUT, host
        for envoy in mesh.processes.envoys:
            assert envoy_weights(envoy) == {"production": 10_000}
        # Failures: only the leader's region's failing canary's (5xx), after the fault.
        failed = load.failures()
        print(f"requests over the whole run: {dict(load.statuses())}")
        leader_nodes = {e.opts.node_id for e in mesh.processes.envoys if e.opts.region == leader}
        assert failed, "the canary fault made no request fail"
        assert all(r.time >= fault_wall and r.target in leader_nodes for r in failed), [
            r for r in failed if r.time < fault_wall or r.target not in leader_nodes
        ][:5]


@pytest.mark.timeout(240)
def test_an_etcd_outage_decides_nothing_and_a_frozen_leader_is_fenced(tmp_path: Path) -> None:
    """(c) etcd unreachable from every replica at step 1: Envoys keep their weights and
    keep routing, the leader steps down, nothing is committed; on return the rollout
    goes on. (f) The leader frozen (SIGSTOP) past its lease at step 2: the other replica
    takes over; woken, the old leader steps down and commits nothing, and the rollout is
    promoted with no step going back. No request fails."""
    with LocalMesh(tmp_path / "mesh", ha_options(TWO)) as mesh:
        assert mesh.processes.etcd is not None
        load = start_load(mesh)
        leader = mesh.state.wait_leader()
        print(f"\nleader {leader}; Envoys on {placement(mesh)}")
        mesh.spec.add_canary()
        wait_step(mesh, 1, 60)
        wait_shares(mesh.processes.envoys, 20)

        # (c) Every etcd member stopped.
        weights = {e.opts.node_id: envoy_weights(e) for e in mesh.processes.envoys}
        offset = log_size(mesh.processes.replicas[leader])
        paused_wall, paused_at = time.time(), time.monotonic()
        mesh.processes.etcd.pause()
        try:
            wait_for(
                lambda: "stepping down" in log_since(mesh.processes.replicas[leader], offset),
                f"{leader} to step down",
                timeout=TTL + 5,
            )
            stepped_down, down_wall = time.monotonic() - paused_at, time.time()

            def weights_kept() -> None:
                assert {e.opts.node_id: envoy_weights(e) for e in mesh.processes.envoys} == weights

            # Hold the outage past the step's end: Envoys keep every weight throughout.
            holds_for(weights_kept, STEP_SECONDS + INTERVAL, interval=0.2)
        finally:
            resumed_wall, resumed_at = time.time(), time.monotonic()
            mesh.processes.etcd.resume()
        print(f"etcd paused -> {leader} steps down: {stepped_down:.2f}s; "
              f"outage {resumed_at - paused_at:.2f}s")  # fmt: skip
        during = [r for r in load.snapshot() if paused_wall <= r.time < resumed_wall]
        print(f"requests during the outage: {len(during)}, failed "
              f"{sum(r.status != 200 for r in during)}")  # fmt: skip
        assert during and all(r.status == 200 for r in during), [
            r for r in during if r.status != 200
        ][:5]
        new_leader = mesh.state.wait_leader(20)
        print(f"etcd resumed -> {new_leader} leads: {time.monotonic() - resumed_at:.2f}s")
        # Nothing decided once the leader stepped down. (A look it began in the outage's
        # first moments, before it could know, may land when etcd resumes: its commit was
        # sent to a paused member, and no other leader could have come in between.)
        decided = [e for e in mesh.state.audit() if down_wall <= e.time < resumed_wall]
        assert decided == [], [(e.id, e.region, e.kind, e.reason) for e in decided]
        wait_step(mesh, 2, 30)
        wait_shares(mesh.processes.envoys, 75)

        # (f) The leader frozen past its lease.
        old = mesh.state.wait_leader()
        (other,) = [r for r in TWO if r != old]
        offset = log_size(mesh.processes.replicas[old])
        stopped_wall, stopped_at = time.time(), time.monotonic()
        mesh.processes.replicas[old].signal(signal.SIGSTOP)
        try:
            new = mesh.state.wait_leader(TTL + 10, other_than=old)
            takeover = time.monotonic() - stopped_at
            assert new == other
            # The new leader's first commit: anything decided after the SIGSTOP is its.
            first = wait_for(
                lambda: [e for e in mesh.state.audit() if e.time > stopped_wall],
                "the new leader's first commit",
                timeout=15,
            )[0]
        finally:
            mesh.processes.replicas[old].signal(signal.SIGCONT)
        print(f"leader {old} SIGSTOPped -> {new} leads: {takeover:.2f}s; its first "
              f"commit {first.id} ({first.kind} {first.region}: {first.reason[:60]})")  # fmt: skip
        said = wait_for(
            lambda: [m for m in messages(log_since(mesh.processes.replicas[old], offset))
                     if "stepping down" in m or "refused" in m],
            f"{old} to step down",
            timeout=10,
        )  # fmt: skip
        print(f"{old}, woken: {said[0]}")
        state = mesh.state.wait_phase(DONE, 60)
        assert state["phase"] == "promoted", recent(mesh)
        assert mesh.state.leader() == new
        woken = messages(log_since(mesh.processes.replicas[old], offset))
        decisions = [m for m in woken if re.search(r"recommender v2( \S+)?: \w+ -> \w+", m)]
        pushes = [m for m in woken if "reason=rollout step" in m or "reason=rollback" in m]
        assert decisions == [] and pushes == [], decisions + pushes
        audit = mesh.state.audit()
        after = [e for e in audit if e.id >= first.id]
        assert all(e.time >= first.time for e in after), [(e.id, e.time) for e in after]
        for region in TWO:
            assert transitions(audit, region) == [0, 1, 2, 3]  # no step repeated or undone
            steps = [e.step for e in after if e.region == region and e.step is not None]
            assert steps == sorted(steps), (region, steps)
        wait_shares(mesh.processes.envoys, 100)
        for envoy in mesh.processes.envoys:
            wait_synced(mesh, envoy, 15)
        statuses = load.statuses()
        print(f"requests over the whole run: {dict(statuses)}")
        assert set(statuses) == {200}, load.failures()[:5]
