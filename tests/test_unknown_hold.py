"""Unknown is no evidence (issues 27 and 29): a region whose nodes nobody can see holds.

A region cut off from the control plane (its replica silent, then gone) has nodes that
are *unknown*: not known to have applied the step, nor known not to have. The ACK gate
must not count that as a failure at `ack_timeout` (the region-partition scenario rolled
back a healthy canary for it): the region holds, audited when the hold begins and when
its reason changes, until its nodes are seen applying the step again (the step goes
on, its evidence afresh) or the hold reaches `max_hold` (then `on_max_hold`). Nodes
that are seen and do not ACK are still judged by `ack_timeout`.

The controller runs against the doubles of tests/test_controller.py (a fake clock, the
scripted metric source, the real SQLite store); the data plane double is given a region
whose nodes are unknown, as `ha.replicas.ClusterDataPlane` reports them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_controller import (
    ACK_TIMEOUT,
    SERVICE,
    FakeClock,
    InMemoryDataPlane,
    Rig,
    ScriptedMetricSource,
    make_spec,
)
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.state import PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK
from xds_server.rollout.store import Store
from xds_server.xds.acks import ack_gate
from xds_server.xds.dataplane import NodeAck, Pending, RouteStatus

CUT = "eu-west"
MAX_HOLD = 10.0
"""tests/test_controller.py's plan: max_hold 10 s, ack_timeout 5 s, 1 s interval."""
CANARY_CLUSTER = f"{SERVICE}|canary"
GONE_AFTER = 3.0
"""The cut replica's key is silent, then gone this long after the cut (its lease)."""


class CutDataPlane(InMemoryDataPlane):
    """The in-memory data plane, where a region can be cut off: its two nodes unknown,
    as the leader's gate sees them (their replica silent for a while, then gone, the
    why naming how long); `stuck`: nodes of the region that are seen (on a replica
    heard from) and have not ACKed its routes."""

    def __init__(self, clock: FakeClock, store: Store) -> None:
        super().__init__(clock, store)
        self.cut_at: dict[str, float] = {}
        self.stuck: dict[str, tuple[str, ...]] = {}

    def cut(self, region: str, *stuck: str) -> None:
        """Cut off: its nodes unknown, and its canary hosts' registrations lapsed (they
        cannot renew their leases either)."""
        self.cut_at[region] = self.clock()
        self.stuck[region] = stuck
        self.hosts[(region, CANARY_CLUSTER)] = 0

    def heal(self, region: str) -> None:
        """Its nodes seen again, applying its routes (an ACK now); its hosts register
        again later (`registered`)."""
        del self.cut_at[region]
        self.stuck.pop(region, None)
        self.ack(region)

    def registered(self, region: str) -> None:
        del self.hosts[(region, CANARY_CLUSTER)]

    def routes_applied(self, region: str) -> RouteStatus:
        if region not in self.cut_at:
            return super().routes_applied(region)
        lost, quiet = self.cut_at[region], self.clock() - self.cut_at[region]
        if quiet < GONE_AFTER:
            why = f"replica {region} silent for {quiet:.1f}s"
        else:
            why = f"replica {region} gone {quiet - GONE_AFTER:.1f}s ago"
        unknown = tuple(NodeAck(f"{region}-envoy-{i}", lost, unknown=why) for i in (1, 2))
        published = max(self._published_at.get(region, 0.0), 0.0)
        seen = tuple(NodeAck(node, published) for node in self.stuck.get(region, ()))
        held = (*seen, *unknown)
        return Pending(
            self._version(region),
            min(a.since for a in held),
            tuple(a.node for a in seen),
            tuple(f"{a.node} ({a.unknown})" for a in unknown),
            holdouts=held,
        )


@pytest.fixture
def rig_for(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """A rig over `CutDataPlane` with the plan's `rollout` overrides (its store closed
    after the test)."""
    made: list[Rig] = []

    def make(**rollout: Any) -> Rig:
        clock = FakeClock()
        store = Store.in_dir(tmp_path / f"state{len(made)}")
        spec = make_spec(**rollout)
        made.append(Rig(spec, clock, store, CutDataPlane(clock, store), ScriptedMetricSource()))
        return made[-1]

    yield make
    for rig in made:
        rig.store.close()


def dataplane(rig: Rig) -> CutDataPlane:
    assert isinstance(rig.dataplane, CutDataPlane)
    return rig.dataplane


async def cut_at_step_1(rig: Rig, *stuck: str) -> float:
    """Start, let every region apply step 1 (20%), then cut CUT: when."""
    await rig.start()
    await rig.tick_until(lambda: rig.state().regions[CUT].step == 1)
    await rig.tick()  # (applied: its clock runs)
    assert rig.state().regions[CUT].step_started is not None
    dataplane(rig).cut(CUT, *stuck)
    return rig.clock()


def holds(rig: Rig) -> list[AuditEntry]:
    return [e for e in rig.store.audit(SERVICE, region=CUT) if "holding:" in e.reason]


def test_unknown_nodes_past_ack_timeout_hold_then_pause_at_max_hold(
    rig_for: Callable[..., Rig],
) -> None:
    """on_max_hold: pause. Well past ack_timeout the cut region still holds (no rollback,
    no step passed); the hold is audited when it begins and when its replica goes from
    silent to gone, not at every look; at max_hold of the hold the rollout pauses,
    keeping every region's weights. Its canary's registrations lapsed with the cut: no
    rollback for "no host left" either (nobody can tell they are gone)."""
    rig = rig_for(on_max_hold="pause")

    async def body() -> None:
        cut = await cut_at_step_1(rig)
        await rig.tick_until(lambda: rig.clock() - cut > ACK_TIMEOUT + 2)
        assert rig.state().phase == PROGRESSING, rig.state().reason
        assert rig.state().regions[CUT].hold_since == cut + 1  # (the first look after it)
        await rig.tick_until(lambda: rig.state().phase != PROGRESSING)

    asyncio.run(body())
    state = rig.state()
    assert state.phase == PAUSED, state.reason
    assert state.reason.startswith(f"{CUT}: step 1 (20%): no evidence for {MAX_HOLD:g}s")
    assert "not known to be applied" in state.reason and f"{CUT}-envoy-1" in state.reason
    paused = [e for e in rig.store.audit(SERVICE) if e.phase_to == PAUSED and not e.region]
    assert paused[0].time - (rig.state().regions[CUT].hold_since or 0) == MAX_HOLD
    assert all(
        e.step == 1
        for e in rig.store.audit(SERVICE, region=CUT)
        if e.time >= paused[0].time - MAX_HOLD
    )
    held = holds(rig)
    assert [("silent" in e.reason, "gone" in e.reason) for e in held] == [
        (True, False),
        (False, True),
    ], [e.reason for e in held]
    assert "s ago" not in held[1].reason and "for 1.0s" not in held[0].reason  # no durations
    assert not [e for e in rig.store.audit(SERVICE) if e.phase_to == ROLLED_BACK]
    assert rig.pushes[-1].traffic == rig.controller.traffic()  # (nothing pushed since step 1)


def test_unknown_nodes_roll_back_at_max_hold_when_on_max_hold_says_so(
    rig_for: Callable[..., Rig],
) -> None:
    """on_max_hold: rollback (the default). Not at ack_timeout: at max_hold of the hold,
    every region the control plane reaches goes back to production."""
    rig = rig_for()

    async def body() -> None:
        cut = await cut_at_step_1(rig)
        await rig.tick_until(lambda: rig.state().phase != PROGRESSING)
        assert rig.clock() - cut == MAX_HOLD + 1  # (the hold began at the first look)

    asyncio.run(body())
    assert rig.state().phase == ROLLED_BACK
    assert rig.state().reason.startswith(f"{CUT}: step 1 (20%): no evidence for {MAX_HOLD:g}s")
    assert "not applied by the data plane" not in rig.state().reason


def test_a_known_node_that_does_not_ack_still_rolls_back_at_ack_timeout(
    rig_for: Callable[..., Rig],
) -> None:
    """Quorum 1.0, one node of the cut region seen (on a replica heard from) and not
    ACKing, the others unknown: the quorum is out of reach once the seen node passes
    ack_timeout, so the step fails then, naming it; the unknown ones do not hide it."""
    rig = rig_for(on_max_hold="pause")
    stuck = f"{CUT}-envoy-9"

    async def body() -> None:
        await rig.start()
        await rig.tick_until(lambda: rig.state().regions[CUT].step == 1)
        pushed = rig.pushes[-1].at
        dataplane(rig).cut(CUT, stuck)
        await rig.tick_until(lambda: rig.state().phase != PROGRESSING)
        assert ACK_TIMEOUT < rig.clock() - pushed <= ACK_TIMEOUT + 1

    asyncio.run(body())
    reason = rig.state().reason
    assert rig.state().phase == ROLLED_BACK, reason
    assert reason.startswith(f"{CUT}: step 1 (20%) not applied by the data plane: no ACK")
    assert f"not ACKed yet: {stuck}" in reason and "quorum 3 of 3 nodes out of reach" in reason
    assert "2 unknown" in reason, reason


def test_nodes_seen_again_applying_let_the_step_go_on_from_then(
    rig_for: Callable[..., Rig],
) -> None:
    """Cut past ack_timeout (but within max_hold), then seen again ACKing: the hold ends
    (audited), the step's evidence starts again at that look (what the region routed
    out of sight is not known to be the step's), and the rollout promotes, never
    rolled back nor paused. Its canary hosts register again a few looks after the heal,
    past max_hold of the whole: that wait has a hold clock of its own."""
    rig = rig_for()
    seen_again: list[float] = []

    async def body() -> None:
        cut = await cut_at_step_1(rig)
        await rig.tick_until(lambda: rig.clock() - cut > ACK_TIMEOUT + 1)
        dataplane(rig).heal(CUT)
        await rig.tick()
        seen_again.append(rig.clock())
        rs = rig.state().regions[CUT]
        assert rs.step == 1 and rs.hold_since is None and rs.step_started == rig.clock()
        assert not rs.step_passed
        for _ in range(4):
            await rig.tick()
        assert rig.clock() - cut > MAX_HOLD and rig.state().phase == PROGRESSING
        dataplane(rig).registered(CUT)
        await rig.tick_until(lambda: rig.state().phase == PROMOTED)

    asyncio.run(body())
    audit = rig.store.audit(SERVICE)
    assert not [e for e in audit if e.phase_to in (ROLLED_BACK, PAUSED)]
    (again,) = [e for e in audit if e.region == CUT and "routes applied again" in e.reason]
    assert again.time == seen_again[0] and "evidence starts again" in again.reason
    advanced = [e for e in audit if e.kind == "transition" and e.step == 2 and e.region == CUT]
    assert advanced and advanced[0].time - seen_again[0] >= 2.0  # a whole step_duration


# ---- the gate itself, on hand-made standings ----


def _standing(applied: int, unknown: int, lagging: int, since: float) -> Pending:
    held = tuple(NodeAck(f"u{i}", since, unknown="replica r gone 9.5s ago") for i in range(unknown))
    held += tuple(NodeAck(f"k{i}", since) for i in range(lagging))
    return Pending(
        "v",
        since,
        tuple(a.node for a in held if not a.unknown),
        tuple(f"{a.node} ({a.unknown})" for a in held if a.unknown),
        applied,
        tuple(since for _ in range(applied)),
        held,
    )


def test_the_gate_holds_for_unknown_nodes_whatever_their_time() -> None:
    late = 100.0 + ACK_TIMEOUT + 50
    every = ack_gate(_standing(0, 2, 0, 100.0), 1.0, 0, ACK_TIMEOUT, late)
    assert every.error is None and every.applied_at is None
    assert (
        every.unknown
        == "routes v not known to be applied (unknown: u0 (replica r gone), u1 (replica r gone))"
    )
    assert every.stragglers == ()
    # Quorum 0.9 of 10: 8 applied, one seen and late, one unknown: 9 still reachable.
    short = ack_gate(_standing(8, 1, 1, 100.0), 0.9, 0, ACK_TIMEOUT, late)
    assert short.error is None and short.unknown is not None and "u0" in short.unknown
    assert short.stragglers == ("k0 (no ACK within 5s of its send)",)
    # 9 applied: the quorum holds without the unknown node, named a straggler.
    done = ack_gate(_standing(9, 1, 0, 100.0), 0.9, 0, ACK_TIMEOUT, late)
    assert done.applied_at == 100.0 and done.stragglers[0].startswith("u0 (not known")
    # Two seen and late: out of reach even if the unknown one applied.
    failed = ack_gate(_standing(7, 1, 2, 100.0), 0.9, 0, ACK_TIMEOUT, late)
    assert failed.error is not None and "(7 applied, 1 unknown)" in failed.error, failed.error
    # A data plane that gives no standing: unknown alone holds, a late lagging node fails.
    coarse = Pending("v", 100.0, (), ("u0 (replica r silent for 3.2s)",))
    assert ack_gate(coarse, 1.0, 0, ACK_TIMEOUT, late).unknown == (
        "routes v not known to be applied (unknown: u0 (replica r silent))"
    )
    lagging = Pending("v", 100.0, ("k0",), ("u0 (replica r silent for 3.2s)",))
    assert ack_gate(lagging, 1.0, 0, ACK_TIMEOUT, late).error is not None
