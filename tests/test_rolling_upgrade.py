"""A rolling upgrade without downtime (issue 30): a running three-replica deployment of
the previous release (`OLD_COMMIT`'s code, `git archive`d into tmp and run by this venv's
interpreter) is upgraded to this tree's code one replica at a time while a canary rolls
out, under steady load through real Envoys (one per region), with a real three-member
etcd cluster, Prometheus and model servers. In each mixed state the rollout moves a step
further, every Envoy routes it and is SYNCED on a live replica; no request fails.

The order: a follower, then the leader, then the last follower. Leader in between, not
last, so that a new replica leads while an old one still follows: the old follower
serves what the new leader commits to Envoys of its own, and the new leader's ACK gate
counts them from the old follower's directory key; a schema bump, if this tree has one,
is migrated by the new leader under the fence while old code still runs. Before that,
the old leader decides with a new follower in the directory (holding no Envoy: an Envoy
never moves back to a restarted replica until the one it moved to goes). Who wins the
election when the old leader goes is a race between the new follower and the old one;
the old one is held still (SIGSTOP, for the moment of the election: well under its key's
silence threshold and its Envoys' keepalive) so that the new code leads. (Operators
upgrade the leader last, docs/ha.md says why; this order is the harder one.)

The refusals: a replica of the old release started against the upgraded store refuses in
one line and exits non-zero when the schema moved on (at the same schema, the store's
schema key is first written one version higher); this tree's running replicas, once the
schema key moves past them, stop leading and stand no more, each saying why in one line.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aetcd import rpc

from tests.support import (
    holds_for,
    release_env,
    release_tree,
    started_with,
    wait_for,
    wait_shares,
)
from tests.test_ha_faults import (
    KEEPALIVE_TIMEOUT,
    THREE,
    ha_options,
    messages,
    recent,
    region_steps,
    start_load,
    transitions,
    wait_synced,
)
from tests.test_schema_versions import one_line, serve
from xds_server.ha.etcd import put_op
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import Process
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.lab.traffic import canary_share
from xds_server.rollout.store import SCHEMA_VERSION

OLD_COMMIT = "65a7a25"
"""The release upgraded from: the code at the start of issue 30's session (schema 2)."""
PLAN = {
    **FAST_PLAN,
    "steps": list(range(20, 101, 4)),
    "guardrails": {"max_error_rate": 0.05, "max_p99_ms": 5000, "min_requests": 5},
    "max_hold": "60s",
}
"""The tests' fast plan (3 s steps) from 20%, whose canary has a step's samples within
seconds (from 5%, one step took 15 s of the load's requests), in steps enough that the
rollout cannot finish during the test (it moves on while replicas are swapped too); the
guardrails only against errors: this test is about the control plane, and a machine at
load 40 gave the canary a p99 of 314 ms, over the lab's 250 (rolled back), and at load 25
Prometheus left a region without evidence for the lab's 30 s `max_hold` (paused)."""
LEADER_TTL = 8.0
"""Every stop here is clean (the lease revoked: the next leader is elected within
milliseconds), so the TTL only says how long a leader may go without renewing: at load
40 a new leader that went 2.2 s without a renewal stepped down, and an old replica,
which cannot write the migrated store, took the lead."""


def schema_of(env: dict[str, str]) -> int:
    """The schema version the release that `env` runs understands."""
    with started_with(env):
        got = subprocess.run(
            [sys.executable, "-c",
             "from xds_server.rollout.store import SCHEMA_VERSION; print(SCHEMA_VERSION)"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    return int(got.stdout)


def runs_code_of(pid: int) -> str:
    """The PYTHONPATH a process was started with (where its package came from)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = [e[len(b"PYTHONPATH=") :] for e in environ if e.startswith(b"PYTHONPATH=")]
    return found[0].decode() if found else ""


def schema_key(mesh: LocalMesh) -> tuple[dict[str, object], int]:
    """The schema key's document and etcd's count of its writes."""
    store = mesh.state.etcd_store()
    got = store.kv.range(store.keys.schema)
    assert got.kvs, "no schema key in the store"
    return json.loads(got.kvs[0].value), got.kvs[0].version


@dataclass(frozen=True)
class Swap:
    """What one replica's swap took, in seconds from its SIGTERM."""

    keyed: float
    """Until the new replica's key was in the store."""
    synced: float
    """Until every Envoy was SYNCED again."""
    held: float = 0.0
    """How long the replica held still for the election was stopped."""

    def __str__(self) -> str:
        held = f", held still {self.held:.2f}s" if self.held else ""
        return f"key {self.keyed:.2f}s, SYNCED {self.synced:.2f}s{held}"


def swap(mesh: LocalMesh, region: str, *, hold_still: str | None = None) -> Swap:
    """Replace `region`'s replica with this tree's code: SIGTERM (a clean stop: its lease
    revoked, its key withdrawn), then `serve` again with the same id and ports; until the
    new one's key is in the store and every Envoy is SYNCED on a live replica, on the
    routes the store implies. `hold_still`: a replica SIGSTOPped while the old one goes,
    until another leads (the election's race decided)."""
    began, began_wall = time.monotonic(), time.time()
    old = mesh.processes.replicas[region]
    held = mesh.processes.replicas[hold_still] if hold_still else None
    held_for = 0.0
    if held is not None:
        held.signal(signal.SIGSTOP)
    try:
        old.signal(signal.SIGTERM)
        if held is not None:
            mesh.state.wait_leader(LEADER_TTL + 5, other_than=region)
    finally:
        if held is not None:
            held.signal(signal.SIGCONT)
            held_for = time.monotonic() - began
    old.proc.wait(10)
    assert old.stop() == 0, old.tail()
    new = mesh.processes.start_replica(region)

    def listed() -> bool:
        if not new.alive():
            raise AssertionError(f"{region}'s new replica exited:\n{new.tail()}")
        doc = mesh.state.etcd_store().view.replicas.get(region)
        return bool(doc and doc.get("started", 0) >= began_wall)

    wait_for(listed, f"{region}'s new replica's key in the store", timeout=30)
    keyed = time.monotonic() - began
    for envoy in mesh.processes.envoys:
        wait_synced(mesh, envoy, 20)
    return Swap(keyed, time.monotonic() - began, held_for)


def write_schema(mesh: LocalMesh, version: int) -> int:
    """The store's schema key at `version`, as a newer release's leader leaves it."""
    store = mesh.state.etcd_store()
    doc = json.dumps({"version": version}).encode()
    store.kv.txn(rpc.TxnRequest(success=[put_op(store.keys.schema, doc)]))
    return version


def no_leader(mesh: LocalMesh) -> None:
    assert mesh.state.leader() is None, recent(mesh)


def advance(mesh: LocalMesh) -> str:
    """Wait until the rollout is a step further than it is now (or promoted), every
    Envoy routes at least that step's share and is SYNCED on a live replica; what
    happened, for the test's output."""
    state = mesh.state.rollout()
    assert state is not None and state["phase"] == "progressing", recent(mesh)
    before = max(region_steps(mesh).values())
    began = time.monotonic()

    def moved() -> str | None:
        now = mesh.state.rollout()
        assert now is not None and now["phase"] in ("progressing", "promoted"), recent(mesh)
        if now["phase"] == "promoted":
            return "promoted"
        steps = set(region_steps(mesh).values())
        return "progressing" if min(steps) > before else None

    try:
        phase = wait_for(moved, f"the rollout past step {before}", timeout=60)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; {recent(mesh)}") from None
    took = time.monotonic() - began
    share = 100 if phase == "promoted" else PLAN["steps"][min(region_steps(mesh).values())]
    wait_for(
        lambda: all(canary_share(e) >= share for e in mesh.processes.envoys),
        f"every Envoy routing {share}% or more to the canary",
        timeout=15,
    )
    for envoy in mesh.processes.envoys:
        wait_synced(mesh, envoy, 15)
    return f"step {before} -> {phase} at {share}% in {took:.2f}s"


@pytest.mark.timeout(240)
def test_a_rolling_upgrade_mid_rollout_loses_no_request(tmp_path: Path) -> None:
    old_env = release_env(release_tree(OLD_COMMIT, tmp_path / "old"))
    old_schema = schema_of(old_env)
    assert old_schema <= SCHEMA_VERSION
    options = replace(ha_options(THREE), rollout=PLAN, leader_ttl=LEADER_TTL)
    mesh = LocalMesh(tmp_path / "mesh", options)
    with contextlib.ExitStack() as stack:
        # The deployment as the old release made it: its replicas, its spec pushes and
        # its model servers' registrations.
        with started_with(old_env):
            stack.enter_context(mesh)
        for region, process in mesh.processes.replicas.items():
            assert runs_code_of(process.pid) == old_env["PYTHONPATH"], region
        load = start_load(mesh)
        leader = mesh.state.wait_leader()
        first, last = [r for r in THREE if r != leader]
        with started_with(old_env):
            mesh.spec.add_canary()
        wait_shares(mesh.processes.envoys, PLAN["steps"][0], timeout=30)
        print(f"\nold release {OLD_COMMIT} (schema {old_schema}) -> this tree "
              f"(schema {SCHEMA_VERSION}); leader {leader}")  # fmt: skip

        # In each mixed state the rollout goes on (a step further, routed by every
        # Envoy, each SYNCED on a live replica).
        took = {first: swap(mesh, first)}
        print(f"old leader {leader}, new follower {first}: {advance(mesh)}")
        took[leader] = swap(mesh, leader, hold_still=last)
        assert mesh.state.leader() == first, recent(mesh)
        if old_schema < SCHEMA_VERSION:
            # Migrated by the new leader before its first write, the old one running.
            wait_for(
                lambda: schema_key(mesh)[0]["version"] == SCHEMA_VERSION,
                f"the schema migrated to {SCHEMA_VERSION}",
                timeout=15,
            )
        went = advance(mesh)
        hosts = {e.opts.node_id: wait_synced(mesh, e, 15) for e in mesh.processes.envoys}
        print(f"new leader {first}, old follower {last}: {went}; Envoys on {hosts}")
        # The old follower serves what the new leader committed, to Envoys of its own
        # (its region's, unless holding still outlasted their keepalive).
        held = took[leader].held
        assert last in hosts.values() or held >= KEEPALIVE_TIMEOUT, (hosts, held)
        assert runs_code_of(mesh.processes.replicas[last].pid) == old_env["PYTHONPATH"]
        took[last] = swap(mesh, last)
        print("swaps, from SIGTERM: " + "; ".join(f"{r} {s}" for r, s in took.items()))
        for region, process in mesh.processes.replicas.items():
            assert runs_code_of(process.pid) != old_env["PYTHONPATH"], region
        print(f"all new: {advance(mesh)}")
        audit = mesh.state.audit()
        for region, step in region_steps(mesh).items():  # no step repeated or undone
            assert transitions(audit, region) == list(range(step + 1)), recent(mesh)
        statuses = load.statuses()
        print(f"requests over the whole run: {dict(statuses)}")
        assert set(statuses) == {200}, load.failures()[:5]

        # The schema key at this tree's version, written once per version moved.
        doc, writes = schema_key(mesh)
        assert doc["version"] == SCHEMA_VERSION
        if old_schema < SCHEMA_VERSION:
            assert (doc["migrated_from"], writes) == (old_schema, 2)
        else:
            assert (doc["migrated_from"], writes) == (1, 1)  # (made by the old leader)

        # An old replica meeting a newer schema refuses, in one line.
        assert mesh.processes.etcd is not None
        url = mesh.processes.etcd.url
        newer = SCHEMA_VERSION
        if newer == old_schema:  # (no bump in this tree: a newer release's key)
            newer = write_schema(mesh, newer + 1)
        with started_with(old_env):
            line = one_line(serve(tmp_path, "--store", url, "--replica-id", "old-release"))
        assert line.startswith("xds-server: ") and line.endswith(
            f"/schema: the store's schema is version {newer}, newer than this xds-server "
            f"understands ({old_schema}): run a release that knows it"
        ), line

        # So do this tree's running replicas once a newer release migrates the store:
        # none stands for leader (it could write nothing), each says why in one line,
        # and they go on serving their Envoys.
        newer = write_schema(mesh, SCHEMA_VERSION + 1)
        wait_for(lambda: mesh.state.leader() is None, "the leader to step down", timeout=10)
        holds_for(lambda: no_leader(mesh), 1.0)
        said = (
            f"/schema: the store's schema is version {newer}, newer than this xds-server "
            f"understands ({SCHEMA_VERSION}): run a release that knows it"
        )

        def says_why(process: Process) -> bool:
            return any(
                m.startswith("not standing for leader: ") and m.endswith(said)
                for m in messages(process.log_path.read_text())
            )

        for region, process in mesh.processes.replicas.items():
            wait_for(
                lambda process=process: says_why(process),
                f"{region} to say why it does not stand",
                timeout=10,
            )
        for envoy in mesh.processes.envoys:
            wait_synced(mesh, envoy, 15)
