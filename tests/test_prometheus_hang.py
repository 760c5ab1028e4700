"""A Prometheus that hangs (SIGSTOP: it still accepts connections, it never answers),
with real Envoys, a real `xds-server serve` and load through them.

A timed-out query is no evidence, logged and audited like any other; a hang at the
start of a rollout costs one bounded check and a note in the audit; during a step the
step holds, and `max_hold` is kept by the clock whatever the queries do.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import mesh_steps, mesh_under_load, wait_for
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.scenarios import FAST_PLAN

MAX_HOLD = 20
"""Room for step 0 after the hang at its start: the latency metric needs 20 samples a
side, which at 5% of 50 requests/s takes about 8 s by itself (at 8 s, a region was
seen paused for want of evidence before its first passing check; at 12 s, in a CI run,
one paused with 4 of the 5 canary requests it needed in its window)."""


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    plan = {**FAST_PLAN, "max_hold": f"{MAX_HOLD}s", "on_max_hold": "pause"}
    with mesh_under_load(tmp_path / "mesh", plan) as m:
        yield m


def hang(mesh: LocalMesh) -> None:
    assert mesh.processes.prometheus is not None
    mesh.processes.prometheus.signal(signal.SIGSTOP)


def answer(mesh: LocalMesh) -> None:
    assert mesh.processes.prometheus is not None
    mesh.processes.prometheus.signal(signal.SIGCONT)


def test_a_hanging_prometheus_is_no_evidence_and_max_hold_is_kept(mesh: LocalMesh) -> None:
    # A hang at the start: the rollout starts after one bounded check, and says so.
    hang(mesh)
    try:
        mesh.spec.add_canary()
        wait_for(lambda: mesh.state.rollout() is not None, "the rollout to start", timeout=30)
        notes = [e for e in mesh.state.audit() if e.kind == "check" and e.region is None]
        assert notes and "queries not checked at start" in notes[0].reason, notes
        # While it hangs, step 0 is judged as no data and nothing advances.
        wait_for(
            lambda: any(
                e.kind == "check" and e.verdict and e.verdict.outcome == "no_data"
                for e in mesh.state.audit()
            ),
            "a no-data check while Prometheus hangs",
            timeout=15,
        )
        assert mesh_steps(mesh) == {0}
    finally:
        answer(mesh)
    wait_for(lambda: mesh_steps(mesh) == {1}, "every region at step 1 once it answers", timeout=60)

    # A hang during a step: the step holds, and max_hold pauses it during the hang.
    hung_at = time.time()
    hang(mesh)
    try:
        state = mesh.state.wait_phase({"paused", "rolled_back", "promoted"}, 60)
    finally:
        answer(mesh)
    assert state["phase"] == "paused", state
    assert f"no evidence for {MAX_HOLD}s" in state["reason"], state["reason"]
    assert mesh_steps(mesh) == {1}
    holds = [
        e
        for e in mesh.state.audit()
        if e.time >= hung_at and e.kind == "check" and e.verdict and e.verdict.outcome == "no_data"
    ]
    assert holds, "the hold is audited"
    assert all("no answer within" in e.reason or "Timeout" in e.reason for e in holds), [
        e.reason for e in holds
    ]
