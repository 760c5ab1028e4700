"""Rollout groups and `after:` (issue 31): the pure rules (`rollout/groups.py`), and the
controller that follows them, driven by hand against the doubles of
tests/test_controller.py (`InMemoryDataPlane`, `ScriptedMetricSource`) and a real SQLite
store: no Envoy, no Prometheus, nothing sleeps.

Two services, `features` and `recommender`, in group `ranking`; `ranker` is production
only unless a test gives it a canary. Every loop of a test is what `RolloutController.run`
does once: reconcile, then a tick of every live rollout, one interval later.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_controller import PLAN, FakeClock, InMemoryDataPlane, ScriptedMetricSource
from xds_server.rollout import decide as sm
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.audit_codec import (
    GROUP_COLUMN,
    entry_doc,
    from_document,
    from_row,
    to_document,
    to_row,
)
from xds_server.rollout.controller import RolloutController, StoreUnavailable
from xds_server.rollout.decision import EntryKind
from xds_server.rollout.evidence import Measurement
from xds_server.rollout.groups import (
    after_block,
    lockstep_hold,
    passed,
    rollback_targets,
    start_block,
)
from xds_server.rollout.ports import StoreWriteError
from xds_server.rollout.state import (
    LIVE,
    PAUSED,
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    Phase,
    RegionState,
    RolloutState,
)
from xds_server.rollout.store import Store
from xds_server.rollout.waves import advance
from xds_server.spec import MeshSpec, RolloutPlan, validate_spec
from xds_server.traffic import PRODUCTION_ONLY, TrafficState
from xds_server.xds.resources import cluster_name

REGIONS = ("us-east", "eu-west")
MEMBERS = ("features", "recommender")
RANKING = {"name": "ranking", "services": list(MEMBERS)}


def service(name: str, port: int, canary: bool = True, **extra: Any) -> dict[str, Any]:
    def pool(version: str, offset: int) -> dict[str, Any]:
        eps = {r: [f"127.0.0.1:{port + offset + 10 * i}"] for i, r in enumerate(REGIONS)}
        return {"version": version, "endpoints": eps}

    pools = {"production": pool("v1", 0), "baseline": pool("v1", 1)}
    if canary:
        pools["canary"] = pool("v2", 2)
    return {"name": name, "domains": [f"{name}.local"], "pools": pools, **extra}


def make_spec(groups: list[Any] | None = None, **services: dict[str, Any]) -> MeshSpec:
    """`features`, `recommender` (canaries v2) and `ranker` (production only); keyword
    arguments replace a service's fields (`canary=False` drops its canary)."""
    base: dict[str, dict[str, Any]] = {
        "features": {"port": 9100},
        "recommender": {"port": 9200},
        "ranker": {"port": 9300, "canary": False},
    }
    out = []
    for name, args in base.items():
        args = {**args, **services.get(name, {})}
        out.append(service(name, **args))
    doc: dict[str, Any] = {"regions": list(REGIONS), "rollout": PLAN, "services": out}
    doc["rollout_groups"] = [RANKING] if groups is None else groups
    return validate_spec(doc)


# ---- the rig ----


class GroupMetrics(ScriptedMetricSource):
    """The scripted source, with a canary that fails per service and region."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[tuple[str, str]] = set()
        """(service, region) whose canary fails 30% of requests."""

    async def measure(
        self,
        plan: RolloutPlan,
        region: str,
        cluster: str,
        window_s: float,
        *,
        p99: bool = True,
        buckets: bool = False,
    ) -> Measurement:
        m = await super().measure(plan, region, cluster, window_s, p99=p99, buckets=buckets)
        bad = any(cluster == cluster_name(s, "canary") for s, r in self.failing if r == region)
        return replace(m, errors=300) if bad else m


class WatchingDataPlane(InMemoryDataPlane):
    """Also keeps, at each push, every rollout's phase as the store held it then."""

    def __init__(self, clock: FakeClock, store: Store) -> None:
        super().__init__(clock, store)
        self.stored: list[dict[str, Phase]] = []

    def set_traffic(self, traffic: TrafficState, *, urgent: bool, reason: str) -> None:
        assert self.store is not None
        self.stored.append({s.service: s.phase for s in self.store.load_rollouts()})
        super().set_traffic(traffic, urgent=urgent, reason=reason)


@dataclass
class GroupRig:
    spec: MeshSpec
    store: Store
    clock: FakeClock = field(default_factory=FakeClock)
    metrics: GroupMetrics = field(default_factory=GroupMetrics)
    dataplane: WatchingDataPlane = field(init=False)
    controller: RolloutController = field(init=False)
    seen: list[dict[str, RolloutState]] = field(default_factory=list)
    """Every rollout's state after each loop."""

    def __post_init__(self) -> None:
        self.dataplane = WatchingDataPlane(self.clock, self.store)
        self.controller = RolloutController(
            lambda: self.spec, self.dataplane, self.store, self.metrics, clock=self.clock
        )

    def state(self, service: str) -> RolloutState:
        return self.controller.rollouts[service]

    async def start(self) -> None:
        self.controller.restore()
        await self.controller.reconcile()

    async def loop(self) -> None:
        """One interval later: reconcile, then every live rollout's tick."""
        self.clock.advance(1.0)
        await self.controller.reconcile()
        live = [s for s, st in self.controller.rollouts.items() if st.phase in LIVE]
        await asyncio.gather(*(self.controller.tick(s) for s in live))
        self.seen.append(dict(self.controller.rollouts))

    async def loop_until(self, done: Any, limit: int = 60) -> None:
        for _ in range(limit):
            if done():
                return
            await self.loop()
        raise AssertionError(f"not done after {limit} loops: {self.controller.rollouts}")

    def audit(self, service: str) -> list[AuditEntry]:
        return self.store.audit(service)

    def rollback_pushes(self) -> list[int]:
        return [i for i, p in enumerate(self.dataplane.pushes) if p.reason == "rollback"]


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.in_dir(tmp_path)
    yield s
    s.close()


def run(body: Any) -> None:
    asyncio.run(body)


def production_only(traffic: TrafficState, *services: str) -> bool:
    return all(traffic.split(s, r) == PRODUCTION_ONLY for s in services for r in REGIONS)


def lockstep_kept(spec: MeshSpec, rollouts: dict[str, RolloutState]) -> None:
    """No member is past a step another member has not passed, in any region: a region
    at step s >= 1 needs every other member's region to have passed s - 1; a promoted
    one, every other member's region to have passed the last step."""
    for name, state in rollouts.items():
        group = spec.group_of(name)
        if group is None:
            continue
        last = len(spec.service(name).rollout.steps) - 1
        for region, rs in state.regions.items():
            need = last if rs.phase == PROMOTED else rs.step - 1
            if rs.phase not in (*LIVE, PROMOTED) or need < 0:
                continue
            for other in group.services:
                theirs = rollouts.get(other)
                if other == name or theirs is None or theirs.phase == ROLLED_BACK:
                    continue
                assert passed(theirs.regions[region], need), (name, region, rs, theirs)


# ---- the controller ----


def test_a_group_promotes_together_the_early_member_holding_once_per_step(store: Store) -> None:
    """recommender's steps take 2 s, features' 5 s: recommender passes each step first
    and holds, recorded once per region and step, until features has passed it too."""
    spec = make_spec(features={"rollout": {**PLAN, "step_duration": "5s"}})
    rig = GroupRig(spec, store)

    async def body() -> None:
        await rig.start()
        assert set(rig.controller.rollouts) == set(MEMBERS)
        await rig.loop_until(lambda: all(rig.state(m).phase == PROMOTED for m in MEMBERS))

    run(body())
    for rollouts in rig.seen:
        lockstep_kept(spec, rollouts)
    audit = rig.audit("recommender")
    for pct in ("5%", "20%", "100%"):
        held = [
            e
            for e in audit
            if e.reason.startswith(f"group ranking: waiting for features to pass {pct}")
        ]
        assert sorted(e.region for e in held if e.region) == sorted(REGIONS), pct
        assert {e.kind for e in held} == {EntryKind.CHECK}
    assert {e.group for e in audit} == {"ranking"}
    assert {e.group for e in rig.audit("features")} == {"ranking"}
    promoted = [
        e.time for m in MEMBERS for e in rig.audit(m) if e.region is None and e.phase_to == PROMOTED
    ]
    assert len(promoted) == 2 and abs(promoted[0] - promoted[1]) <= 1.0  # one interval
    # Each step's weights went out for both members before either moved on.
    assert rig.dataplane.traffic.split("features", "us-east").canary == 10000
    assert rig.dataplane.traffic.split("recommender", "eu-west").canary == 10000


def test_no_member_is_promoted_while_another_still_bakes(store: Store) -> None:
    """Both bake 3 s at 100%; features' steps take 5 s, so recommender's bake is over
    first. It holds until features' bake is over too: features failing in its bake
    still rolls recommender back (a promotion could not be undone)."""
    slow = {"rollout": {**PLAN, "step_duration": "5s", "bake": "3s"}}
    spec = make_spec(features=slow, recommender={"rollout": {**PLAN, "bake": "3s"}})
    rig = GroupRig(spec, store)
    last = 2

    def waiting_for_the_bake() -> bool:
        return rig.state("recommender").regions["us-east"].reason == (
            "group ranking: waiting for features to bake in us-east"
        )

    async def body() -> None:
        await rig.start()
        await rig.loop_until(waiting_for_the_bake)
        features = rig.state("features").regions["us-east"]
        assert (features.step, features.step_passed) == (last, True)
        rig.metrics.failing.add(("features", "eu-west"))
        await rig.loop_until(lambda: rig.state("features").phase == ROLLED_BACK)

    run(body())
    assert rig.state("recommender").phase == ROLLED_BACK
    assert not [e for e in rig.audit("recommender") if e.phase_to == PROMOTED]


def test_a_failing_member_rolls_back_every_member_in_one_push(store: Store) -> None:
    rig = GroupRig(make_spec(), store)

    async def body() -> None:
        await rig.start()
        await rig.loop_until(lambda: rig.state("features").regions["us-east"].step == 1)
        rig.metrics.failing.add(("features", "eu-west"))
        await rig.loop_until(lambda: rig.state("features").phase == ROLLED_BACK)

    run(body())
    assert rig.state("recommender").phase == ROLLED_BACK
    assert {rs.phase for m in MEMBERS for rs in rig.state(m).regions.values()} == {ROLLED_BACK}
    (i,) = rig.rollback_pushes()  # ONE set_traffic for both members
    push = rig.dataplane.pushes[i]
    assert production_only(push.traffic, *MEMBERS)
    assert not production_only(rig.dataplane.pushes[i - 1].traffic, "features")
    assert not production_only(rig.dataplane.pushes[i - 1].traffic, "recommender")
    assert push.versions == {r: i + 1 for r in REGIONS}  # one snapshot per region
    # Both committed before that push.
    assert rig.dataplane.stored[i] == {"features": ROLLED_BACK, "recommender": ROLLED_BACK}
    culprit = [e for e in rig.audit("features") if e.phase_to == ROLLED_BACK and e.verdict]
    assert culprit and all(e.group == "ranking" for e in culprit)
    taken = [e for e in rig.audit("recommender") if e.phase_to == ROLLED_BACK]
    assert {e.region for e in taken} == {*REGIONS, None}
    for e in taken:
        assert e.group == "ranking" and e.verdict is None
        assert "group ranking: member features rolled back: eu-west: step 1" in e.reason
        assert e.snapshot_version == i + 1 or e.region is None


def test_a_group_rollback_cut_short_between_commits_is_finished_after_a_restart(
    store: Store,
) -> None:
    """A crash after features' rollback was committed but before recommender's: the
    restarted controller finds recommender live beside a rolled-back member and rolls
    it back at its next tick (level-triggered), naming the member and its cause."""
    rig = GroupRig(make_spec(), store)

    async def body() -> None:
        await rig.start()
        await rig.loop_until(lambda: rig.state("features").regions["us-east"].step == 1)

    run(body())
    cause = "eu-west: step 1 (20%): error_rate 0.3 > limit 0.05"
    crashed = sm.rollback(rig.state("features"), rig.clock(), cause)
    store.record(crashed.state, [])  # only this member's commit made it
    assert store.rollout("recommender", "v2").phase == PROGRESSING  # type: ignore[union-attr]

    again = GroupRig(make_spec(), store, clock=rig.clock)

    async def after_restart() -> None:
        await again.start()
        assert again.state("recommender").phase == PROGRESSING
        await again.loop()

    run(after_restart())
    taken = again.state("recommender")
    assert taken.phase == ROLLED_BACK
    assert taken.reason == f"group ranking: member features rolled back: {cause}"
    assert production_only(again.dataplane.traffic, *MEMBERS)


def test_after_holds_until_the_dependency_passed_its_last_step_and_its_rollback_takes_it(
    store: Store,
) -> None:
    """recommender after features (no group); features bakes 5 s at 100%: recommender
    starts once every region of features passed 100%, and features failing in its bake
    rolls recommender back in the same push."""
    spec = make_spec(
        [],
        features={"rollout": {**PLAN, "bake": "5s"}},
        recommender={"after": ["features"]},
    )
    rig = GroupRig(spec, store)

    async def body() -> None:
        await rig.start()
        assert set(rig.controller.rollouts) == {"features"}
        assert rig.controller.waiting == {
            "recommender": "after features: features at 5% in us-east"
        }
        await rig.loop_until(lambda: "recommender" in rig.controller.rollouts)
        features = rig.state("features")
        assert features.phase == PROGRESSING  # baking
        assert all(rs.step == 2 and rs.step_passed for rs in features.regions.values())
        assert rig.controller.waiting == {}
        await rig.loop()
        rig.metrics.failing.add(("features", "us-east"))
        await rig.loop_until(lambda: rig.state("features").phase == ROLLED_BACK)

    run(body())
    assert rig.controller.waiting == {}
    recommender = rig.state("recommender")
    assert recommender.phase == ROLLED_BACK
    assert recommender.reason.startswith("after features: features rolled back: us-east: ")
    (i,) = rig.rollback_pushes()
    assert production_only(rig.dataplane.pushes[i].traffic, "features", "recommender")
    assert {e.group for e in rig.audit("recommender")} == {None}


def test_after_releases_when_the_dependency_is_promoted(store: Store) -> None:
    spec = make_spec([], recommender={"after": ["features"]})
    rig = GroupRig(spec, store)
    reasons: list[str] = []

    async def body() -> None:
        await rig.start()
        while "recommender" not in rig.controller.rollouts:
            reasons.append(rig.controller.waiting["recommender"])
            await rig.loop()

    run(body())
    assert rig.state("features").phase == PROMOTED  # (no bake: straight to promoted)
    assert reasons[0] == "after features: features at 5% in us-east"
    assert "after features: features at 20% in us-east" in reasons
    assert rig.state("recommender").phase == PROGRESSING


def test_a_group_starts_only_when_every_member_has_a_canary(store: Store) -> None:
    rig = GroupRig(make_spec(recommender={"canary": False}), store)

    async def body() -> None:
        await rig.start()
        await rig.loop()
        assert rig.controller.rollouts == {}
        assert rig.controller.waiting == {
            "features": "group ranking: waiting for a canary of recommender"
        }
        assert rig.dataplane.pushes == []
        rig.spec = make_spec()
        await rig.loop()

    run(body())
    assert set(rig.controller.rollouts) == set(MEMBERS)
    assert rig.controller.waiting == {}
    (push,) = rig.dataplane.pushes  # the group starts in one push
    assert push.traffic == rig.dataplane.traffic
    assert not production_only(rig.dataplane.traffic, "features")
    assert not production_only(rig.dataplane.traffic, "recommender")


def test_act_on_group_acts_on_every_member_with_one_push(store: Store) -> None:
    rig = GroupRig(make_spec(), store)
    ctl = rig.controller

    async def body() -> None:
        with pytest.raises(ValueError, match="group ranking: no member has a rollout"):
            ctl.act_on_group("ranking", "pause", "too soon", "alice")
        await rig.start()
        await rig.loop()

    run(body())
    with pytest.raises(KeyError):
        ctl.act_on_group("nope", "pause", "x", "alice")
    with pytest.raises(ValueError, match="no group action 'explode'"):
        ctl.act_on_group("ranking", "explode", "x", "alice")
    pushes = len(rig.dataplane.pushes)
    states = ctl.act_on_group("ranking", "pause", "looking at latency", "alice")
    assert [s.service for s in states] == list(MEMBERS)
    assert {s.phase for s in states} == {PAUSED}
    assert len(rig.dataplane.pushes) == pushes  # (a pause keeps the weights)
    for m in MEMBERS:
        (entry,) = [e for e in rig.audit(m) if e.phase_to == PAUSED]
        assert (entry.actor, entry.group) == ("alice", "ranking")
        assert entry.reason == "paused: looking at latency (group ranking)"
    # One member's resume (and pause, abort) acts on the group.
    assert ctl.resume("recommender", "seen enough", "bob").phase == PROGRESSING
    assert ctl.rollouts["features"].phase == PROGRESSING
    assert ctl.pause("features", "again", "bob").phase == PAUSED
    assert ctl.rollouts["recommender"].phase == PAUSED
    ctl.abort("recommender", "wrong build", "bob")
    assert {ctl.rollouts[m].phase for m in MEMBERS} == {ROLLED_BACK}
    assert len(rig.dataplane.pushes) == pushes + 1  # ONE push for both
    assert production_only(rig.dataplane.pushes[-1].traffic, *MEMBERS)
    assert rig.dataplane.stored[-1] == {m: ROLLED_BACK for m in MEMBERS}
    with pytest.raises(
        ValueError, match="group ranking: cannot pause: features: rollout is rolled_back"
    ):
        ctl.act_on_group("ranking", "pause", "x", "alice")


def test_act_on_group_promote_moves_every_member_a_step(store: Store) -> None:
    rig = GroupRig(make_spec(), store)

    async def body() -> None:
        await rig.start()
        await rig.loop()

    run(body())
    pushes = len(rig.dataplane.pushes)
    states = rig.controller.act_on_group("ranking", "promote", "confident", "alice")
    assert [{rs.step for rs in s.regions.values()} for s in states] == [{1}, {1}]
    assert len(rig.dataplane.pushes) == pushes + 1  # one push for both
    assert all(rig.dataplane.pushes[-1].traffic.split(m, "us-east").canary == 2000 for m in MEMBERS)


# ---- the pure rules ----


def region(step: int, phase: Phase = PROGRESSING, passed: bool = False) -> RegionState:
    return RegionState(phase, step, step_passed=passed)


def rollout(service: str, *regions: RegionState, phase: Phase = PROGRESSING) -> RolloutState:
    return RolloutState(service, "v2", phase, dict(zip(REGIONS, regions, strict=True)), 0, 0)


def test_lockstep_hold_names_the_member_step_and_region() -> None:
    spec = make_spec()
    ahead = rollout("recommender", region(1, passed=True), region(1, passed=True))
    behind = rollout("features", region(1, passed=True), region(1))
    rollouts = {"recommender": ahead, "features": behind}
    assert lockstep_hold(spec, "recommender", rollouts, 0.0) == (
        "group ranking: waiting for features to pass 20% in eu-west"
    )
    assert lockstep_hold(spec, "features", rollouts, 0.0) is None
    rollouts["features"] = rollout("features", region(2), region(1, passed=True))
    assert lockstep_hold(spec, "recommender", rollouts, 0.0) is None
    assert lockstep_hold(make_spec([]), "recommender", rollouts, 0.0) is None  # no group
    baking = {"rollout": {**PLAN, "bake": "3s"}}
    spec = make_spec(features=baking, recommender=baking)
    at_last = region(2, passed=True)
    since = replace(at_last, gate_since=10.0)
    rollouts = {
        "recommender": rollout("recommender", since, since),
        "features": rollout("features", since, at_last),
    }
    assert lockstep_hold(spec, "recommender", rollouts, 20.0) == (
        "group ranking: waiting for features to bake in eu-west"
    )
    rollouts["features"] = rollout("features", since, since)
    assert lockstep_hold(spec, "recommender", rollouts, 12.0) == (
        "group ranking: waiting for features to bake in us-east"
    )
    assert lockstep_hold(spec, "recommender", rollouts, 13.0) is None


def test_start_block_and_after_block_reasons() -> None:
    spec = make_spec(ranker={"canary": True, "after": ["recommender"]})
    assert start_block(spec, "features", {}) is None  # recommender has a canary
    assert after_block(spec, "ranker", {}) == "after recommender: recommender v2 has not started"
    done = rollout("recommender", region(2, passed=True), region(2, PAUSED, passed=True))
    assert after_block(spec, "ranker", {"recommender": done}) is None
    baking = rollout("recommender", region(2, passed=True), region(2))
    assert after_block(spec, "ranker", {"recommender": baking}) == (
        "after recommender: recommender at 100% (not passed yet) in eu-west"
    )
    back = rollout("recommender", region(1), region(1), phase=ROLLED_BACK)
    assert after_block(spec, "ranker", {"recommender": back}) == (
        "after recommender: recommender v2 was rolled back"
    )
    assert start_block(spec, "features", {"recommender": back}) == (
        "group ranking: waiting for a new canary of recommender (recommender v2 rolled_back)"
    )
    chained = make_spec(features={"after": ["ranker"]}, ranker={"canary": True})
    assert start_block(chained, "recommender", {}) == (
        "group ranking: waiting for features: after ranker: ranker v2 has not started"
    )


def test_rollback_targets_take_the_group_and_the_dependents_in_turn() -> None:
    spec = make_spec(ranker={"canary": True, "after": ["recommender"]})
    live = {m: rollout(m, region(0), region(0)) for m in (*MEMBERS, "ranker")}
    assert rollback_targets(spec, "features", live) == {
        "recommender": "group ranking: member features rolled back",
        "ranker": "after recommender: recommender rolled back",
    }
    assert rollback_targets(spec, "ranker", live) == {}
    finished = {**live, "recommender": rollout("recommender", region(2), region(2), phase=PROMOTED)}
    assert rollback_targets(spec, "features", finished) == {}


WAVES = {**PLAN, "regions": {"waves": [["us-east"], ["eu-west"]]}}
WAVED = make_spec(features={"rollout": WAVES}, recommender={"rollout": WAVES})
MEMBER_PLAN = WAVED.service("features").rollout


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(MEMBERS), st.booleans()), max_size=80))
def test_no_member_ever_moves_past_a_step_another_has_not_passed(
    ops: list[tuple[str, bool]],
) -> None:
    """Any order of judgements (a member's live regions pass their step) and looks (the
    wave moves on unless something holds it), over two waves: lockstep holds throughout,
    and, judged and looked at fairly afterwards, both members are promoted (no deadlock)."""
    rollouts = {m: sm.start(MEMBER_PLAN, m, "v2", REGIONS, 0).state for m in MEMBERS}

    def step(now: int, member: str, judged: bool) -> None:
        state = rollouts[member]
        if state.phase != PROGRESSING:
            return
        if judged:
            regions = {
                r: replace(rs, step_passed=True) if rs.phase in LIVE else rs
                for r, rs in state.regions.items()
            }
            rollouts[member] = replace(state, regions=regions)
        else:
            hold = lockstep_hold(WAVED, member, rollouts, float(now))
            rollouts[member] = advance(MEMBER_PLAN, state, float(now), group=hold)[0]
        lockstep_kept(WAVED, rollouts)

    for now, (member, judged) in enumerate(ops):
        step(now, member, judged)
    for now in range(len(ops), len(ops) + 40):
        for member in MEMBERS:
            step(now, member, now % 2 == 0)
    assert {s.phase for s in rollouts.values()} == {PROMOTED}


# ---- the audit record's group ----


def entry(group: str | None) -> AuditEntry:
    return AuditEntry(
        1.0, "features", "v2", "us-east", EntryKind.CHECK, 0, PROGRESSING, PROGRESSING,
        None, None, None, None, "held", None, "controller", 7, group,
    )  # fmt: skip


def test_an_entrys_group_round_trips_and_no_group_writes_no_key() -> None:
    grouped, plain = entry("ranking"), entry(None)
    assert from_row(to_row(grouped) | {"id": 7}) == grouped
    assert to_row(grouped)[GROUP_COLUMN] == "ranking" and GROUP_COLUMN not in to_row(plain)
    assert from_document(to_document(grouped), 7, 0) == grouped
    assert '"group"' not in to_document(plain) and entry_doc(grouped)["group"] == "ranking"
    assert "group" not in entry_doc(plain)
    assert from_row(to_row(plain) | {"id": 7}) == plain


def test_a_store_made_before_groups_gets_the_column_and_its_rows_read_as_no_group(
    tmp_path: Path,
) -> None:
    old = Path(__file__).parent / "data" / "audit_v1.sqlite3"
    (tmp_path / "rollouts.sqlite3").write_bytes(old.read_bytes())
    store = Store.in_dir(tmp_path)
    try:
        before = store.audit()
        assert before and {e.group for e in before} == {None}
        store.record(rollout("features", region(0), region(0)), [entry("ranking")])
        assert store.audit("features")[-1].group == "ranking"
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "rollouts.sqlite3")
    assert GROUP_COLUMN in {row[1] for row in db.execute("PRAGMA table_info(audit)")}
    db.close()


# ---- when the store cannot be written ----


class BreakableStore(Store):
    """The SQLite store, refusing every write while `broken` (an I/O error)."""

    broken = False

    def record(
        self,
        state: RolloutState,
        entries: Sequence[AuditEntry],
        *,
        critical: bool = False,
        regions: Collection[str] = (),
    ) -> None:
        if self.broken:
            raise StoreWriteError("disk I/O error")
        super().record(state, entries, critical=critical, regions=regions)


def test_a_group_rollback_is_pushed_whatever_the_store_says_and_saved_later(
    tmp_path: Path,
) -> None:
    store = BreakableStore(tmp_path / "rollouts.sqlite3")
    rig = GroupRig(make_spec(), store)
    ctl = rig.controller

    async def body() -> None:
        await rig.start()
        await rig.loop_until(lambda: rig.state("features").regions["us-east"].step == 1)
        store.broken = True
        with pytest.raises(StoreUnavailable):  # a group action that moves: nothing changes
            ctl.act_on_group("ranking", "promote", "x", "alice")
        assert {ctl.rollouts[m].regions["us-east"].step for m in MEMBERS} == {1}
        rig.metrics.failing.add(("recommender", "us-east"))
        await rig.loop_until(lambda: rig.state("recommender").phase == ROLLED_BACK)

    try:
        run(body())
        assert ctl.rollouts["features"].phase == ROLLED_BACK
        (i,) = rig.rollback_pushes()
        assert production_only(rig.dataplane.pushes[i].traffic, *MEMBERS)
        assert ctl.store_health.unsaved_rollbacks == 2
        assert {s.phase for s in store.load_rollouts()} == {PROGRESSING}  # not written yet
        store.broken = False
        rig.clock.advance(2.0)
        ctl.retry_store()
        assert ctl.store_health.unsaved_rollbacks == 0
        assert {s.phase for s in store.load_rollouts()} == {ROLLED_BACK}
        taken = [e for e in store.audit("features") if e.phase_to == ROLLED_BACK]
        assert taken and all(e.reason.count("member recommender rolled back") == 1 for e in taken)
    finally:
        store.close()
