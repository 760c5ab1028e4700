"""The rollout controller against in-memory doubles of its ports: no Envoy, no Prometheus.

`RolloutController` is driven by hand: `restore()`, `reconcile()` (which starts the
rollout of the spec's canary), then `tick()` while a fake clock moves on; the `run()`
loop is never started and nothing sleeps. The data plane and the metric source are
test doubles defined here (`InMemoryDataPlane`, `ScriptedMetricSource`); the state store
is the real SQLite `Store` under tmp_path, so "committed before pushed" is checked on
what a restarted server would read.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import steps
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.controller import RolloutController
from xds_server.rollout.decision import EntryKind
from xds_server.rollout.evidence import Measurement, MetricReading
from xds_server.rollout.ports import Committed, QueryCheck, Where
from xds_server.rollout.state import (
    PAUSED,
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    RolloutState,
    rollout_traffic,
)
from xds_server.rollout.store import Store
from xds_server.spec import MeshSpec, MetricSpec, RolloutPlan, validate_spec
from xds_server.traffic import PRODUCTION_ONLY, Split, TrafficState
from xds_server.xds.dataplane import Applied, Pending, Rejected, RouteStatus
from xds_server.xds.resources import cluster_name
from xds_server.xds.status import NodeStatus

REGIONS = ("us-east", "eu-west", "ap-south")
SERVICE = "recommender"
CANARY = "v2"
STEP_DURATION = 2.0
ACK_TIMEOUT = 5.0
PLAN: dict[str, Any] = {
    "steps": [5, 20, 100],
    "step_duration": f"{STEP_DURATION:g}s",
    "interval": "1s",
    "window": "2s",
    "ack_timeout": f"{ACK_TIMEOUT:g}s",
    "max_hold": "10s",
    "failures_before_rollback": 2,
}

# The split rule (traffic.Split.at_canary_percent), production/baseline/canary, of 10,000.
AT_5 = Split(production=9000, baseline=500, canary=500)
AT_20 = Split(production=6000, baseline=2000, canary=2000)
AT_100 = Split(production=0, baseline=0, canary=10000)

LATENCY = ((10.0, 300.0), (25.0, 800.0), (50.0, 980.0), (100.0, 1000.0), (float("inf"), 1000.0))
"""A cumulative request-time histogram (ms, count), as in tests/test_decide.py: canary and
comparator alike, with enough samples that the analysis passes."""


def make_spec(production: str = "v1", canary: str = CANARY, **rollout: Any) -> MeshSpec:
    """Three regions; `recommender` with production, baseline and canary pools (the
    addresses are never contacted) and `ranker`, production only, which has no rollout."""

    def pool(version: str, port: int) -> dict[str, Any]:
        return {
            "version": version,
            "endpoints": {r: [f"127.0.0.1:{port + 100 * i}"] for i, r in enumerate(REGIONS)},
        }

    return validate_spec(
        {
            "regions": list(REGIONS),
            "listener": {"port": 10000},
            "rollout": {**PLAN, **rollout},
            "services": [
                {
                    "name": SERVICE,
                    "domains": ["recommender.local"],
                    "prefix": "/",
                    "pools": {
                        "production": pool(production, 9101),
                        "baseline": pool(production, 9102),
                        "canary": pool(canary, 9103),
                    },
                },
                {
                    "name": "ranker",
                    "domains": ["ranker.local"],
                    "prefix": "/",
                    "pools": {"production": pool("v1", 9104)},
                },
            ],
        }
    )


def everywhere(split: Split) -> TrafficState:
    return TrafficState({(SERVICE, r): split for r in REGIONS})


# ---- test doubles of the controller's ports ----


class FakeClock:
    """The controller's clock: a float that moves only when a test says so."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Push:
    """One `set_traffic` call, as the data plane double saw it."""

    at: float
    traffic: TrafficState
    urgent: bool
    reason: str
    versions: dict[str, int]
    """The snapshot version each region whose weights changed got from this push."""
    stored: RolloutState | None
    """The watched rollout as the store held it at the moment of the push."""
    audit: list[AuditEntry]
    """The store's audit log at the moment of the push."""


class InMemoryDataPlane:
    """Test double of the `DataPlane` port: an in-memory stand-in for the xDS publisher
    (`xds.publisher.XdsPublisher`) and the Envoys behind it.

    Records every push. Each region's snapshot version counts the pushes that changed its
    weights; by default a region's Envoys apply a push at once (`Applied` at the push's
    time). A test can script a region to lag (`Pending`) or to NACK (`Rejected`), and
    `ack` it later. With a store, each push also records what the store held then.
    """

    def __init__(
        self,
        clock: FakeClock,
        store: Store | None = None,
        watch: tuple[str, str] = (SERVICE, CANARY),
    ) -> None:
        self.clock = clock
        self.store = store
        self.watch = watch
        self.pushes: list[Push] = []
        self.traffic = TrafficState()
        self._versions: dict[str, int] = {}
        self._published_at: dict[str, float] = {}
        self._applied_at: dict[str, float] = {}
        self._scripted: dict[str, RouteStatus] = {}
        self.hosts: dict[tuple[str, str], int] = {}
        """(region, cluster) -> hosts, as a registry would give them; unknown: None."""

    # the port

    def set_traffic(self, traffic: TrafficState, *, urgent: bool, reason: str) -> None:
        now = self.clock()
        versions = {}
        for region in sorted(self.traffic.regions_changed(traffic)):
            versions[region] = self._versions[region] = self.next_version(region)
            self._published_at[region] = self._applied_at[region] = now
        self.traffic = traffic
        stored = self.store.rollout(*self.watch) if self.store else None
        audit = self.store.audit(self.watch[0]) if self.store else []
        self.pushes.append(Push(now, traffic, urgent, reason, versions, stored, audit))

    def next_version(self, region: str) -> int:
        return self._versions.get(region, 0) + 1

    def pool_hosts(self, region: str, cluster: str) -> int | None:
        return self.hosts.get((region, cluster))

    def routes_applied(self, region: str) -> RouteStatus:
        if region in self._scripted:
            return self._scripted[region]
        return Applied(self._version(region), at=self._applied_at.get(region, 0.0), nodes=1)

    def node_status(self, region: str | None = None) -> list[NodeStatus]:
        return []

    # the script

    def lag(self, region: str, *nodes: str) -> None:
        """The region's `nodes` have not ACKed its current routes (nor will, until `ack`)."""
        since = self._published_at.get(region, 0.0)
        self._scripted[region] = Pending(self._version(region), since, tuple(nodes))

    def reject(self, region: str, node: str, error: str) -> None:
        """`node` NACKs the region's current routes."""
        self._scripted[region] = Rejected(self._version(region), node, error)

    def ack(self, region: str) -> None:
        """The region's Envoys apply its current routes now."""
        self._scripted.pop(region, None)
        self._applied_at[region] = self.clock()

    def _version(self, region: str) -> str:
        return str(self._versions.get(region, 0))


@dataclass(frozen=True)
class MeasureCall:
    region: str
    cluster: str
    window_s: float
    p99: bool
    buckets: bool


class ScriptedMetricSource:
    """Test double of the `MetricSource` port: an in-memory stand-in for Prometheus.

    Every pool of every region is healthy (1000 requests, no errors, p99 50 ms, the
    LATENCY histogram), unless a test puts a region in `bad` (its canary then fails 30%
    of requests) or in `stalled` (its measurements wait on that event). Counts calls.
    """

    def __init__(self) -> None:
        self.bad: set[str] = set()
        self.stalled: dict[str, asyncio.Event] = {}
        self.problems: list[str] = []
        """What `check_queries` reports (a rollout with problems cannot be judged)."""
        self.unreachable: str | None = None
        """Why `check_queries` could not ask the source, as a hanging Prometheus."""
        self.calls: list[MeasureCall] = []
        self.check_calls: list[tuple[str, str, str | None]] = []
        self.health_calls = 0

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
        self.calls.append(MeasureCall(region, cluster, window_s, p99, buckets))
        if region in self.stalled:
            await self.stalled[region].wait()
        bad = region in self.bad and cluster == cluster_name(SERVICE, "canary")
        return Measurement(
            requests=1000,
            errors=300 if bad else 0,
            p99_ms=50 if p99 else None,
            latency_buckets=LATENCY if buckets else None,
        )

    async def pool_health(
        self, plan: RolloutPlan, region: str, cluster: str
    ) -> tuple[float, float]:
        self.health_calls += 1
        return 1.0, 1.0

    async def check_queries(
        self,
        plan: RolloutPlan,
        region: str,
        cluster: str,
        serving: str | None = None,
        versions: Any = None,
    ) -> QueryCheck:
        self.check_calls.append((region, cluster, serving))
        return QueryCheck(tuple(self.problems), self.unreachable)

    async def read(
        self, plan: RolloutPlan, metric: MetricSpec, where: Where, window_s: float
    ) -> MetricReading:
        return MetricReading(problem="the scripted source has no user metrics")

    async def tenant(
        self, plan: RolloutPlan, where: Where, tenant: str, window_s: float
    ) -> Measurement:
        return Measurement(problem="the scripted source has no tenants")

    async def throughput(
        self, plan: RolloutPlan, where: Where, window_s: float
    ) -> tuple[float | None, float | None]:
        return None, None  # (not judged)


class RecordingSink:
    """A TrafficSink that keeps every event it is told."""

    def __init__(self) -> None:
        self.events: list[Committed] = []

    def follow(self, event: Committed) -> None:
        self.events.append(event)


class BrokenSink:
    """A TrafficSink that fails every time it is told."""

    def __init__(self) -> None:
        self.calls = 0

    def follow(self, event: Committed) -> None:
        self.calls += 1
        raise RuntimeError("sink is broken")


# ---- the rig: a controller over the doubles and a real store ----


@dataclass
class Rig:
    spec: MeshSpec
    clock: FakeClock
    store: Store
    dataplane: InMemoryDataPlane
    metrics: ScriptedMetricSource
    controller: RolloutController = field(init=False)

    def __post_init__(self) -> None:
        self.controller = RolloutController(
            lambda: self.spec, self.dataplane, self.store, self.metrics, clock=self.clock
        )

    @property
    def pushes(self) -> list[Push]:
        return self.dataplane.pushes

    def state(self) -> RolloutState:
        return self.controller.rollouts[SERVICE]

    async def start(self) -> None:
        """What `serve` does before its loop: restore, then start the canary's rollout."""
        self.controller.restore()
        await self.controller.reconcile()

    async def tick(self, seconds: float = 1.0) -> None:
        """One interval later, one tick."""
        self.clock.advance(seconds)
        await self.controller.tick(SERVICE)

    async def tick_until(self, done: Callable[[], bool], limit: int = 40) -> int:
        """Tick until `done()`; how many ticks it took."""
        for n in range(limit):
            if done():
                return n
            await self.tick()
        raise AssertionError(f"not done after {limit} ticks: {self.state()}")


def make_rig(state_dir: Path, spec: MeshSpec | None = None, clock: FakeClock | None = None) -> Rig:
    clock = clock or FakeClock()
    store = Store.in_dir(state_dir)
    return Rig(
        spec or make_spec(), clock, store, InMemoryDataPlane(clock, store), ScriptedMetricSource()
    )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = make_rig(tmp_path)
    yield r
    r.store.close()


def run(body: Coroutine[Any, Any, None]) -> None:
    asyncio.run(body)


def phases(state: RolloutState) -> set[str]:
    return {str(rs.phase) for rs in state.regions.values()}


# ---- the tests ----


def test_a_healthy_canary_walks_every_step_everywhere_and_is_promoted(rig: Rig) -> None:
    """The happy path end to end: three steps, every region in lockstep, and the weights
    at each step are the split rule's (5 -> 90/5/5, 20 -> 60/20/20, 100 -> 0/0/100),
    each pushed urgently and held at least step_duration."""

    async def body() -> None:
        await rig.start()
        await rig.tick_until(lambda: rig.state().phase == PROMOTED)

    run(body())
    assert [p.traffic for p in rig.pushes] == [
        everywhere(AT_5),
        everywhere(AT_20),
        everywhere(AT_100),
    ]
    assert all(p.urgent for p in rig.pushes)
    assert {p.reason for p in rig.pushes} == {"rollout step"}
    for before, after in itertools.pairwise(rig.pushes):
        assert after.at - before.at >= STEP_DURATION
    stored = rig.store.rollout(SERVICE, CANARY)
    assert stored is not None and stored.phase == PROMOTED
    assert phases(stored) == {PROMOTED}
    assert rig.dataplane.traffic == rig.controller.traffic() == everywhere(AT_100)


def test_each_decision_is_committed_before_its_weights_are_pushed(rig: Rig) -> None:
    """A server killed between commit and push must restart at the step it announced:
    when set_traffic is called the store already holds the state that implies exactly
    those weights, and the decision's audit entries carry the snapshot version each
    region's push gets (the one `next_version` predicted)."""

    async def body() -> None:
        await rig.start()
        await rig.tick_until(lambda: rig.state().phase == PROMOTED)

    run(body())
    assert len(rig.pushes) == 3
    for push in rig.pushes:
        assert push.stored is not None, "pushed before the state was stored"
        assert rollout_traffic(rig.spec, {SERVICE: push.stored}) == push.traffic
        assert set(push.versions) == set(REGIONS)
        decision = [e for e in push.audit if e.time == push.at]
        assert decision, "pushed before the decision's audit entries were stored"
        for region in REGIONS:
            mine = [e for e in decision if e.region == region]
            assert any(e.kind == "transition" for e in mine)
            assert {e.snapshot_version for e in mine} == {push.versions[region]}
        assert {e.snapshot_version for e in decision if e.region is None} <= {None}
    # The predicted versions are the data plane's own counters, one per changed push.
    assert [p.versions["eu-west"] for p in rig.pushes] == [1, 2, 3]


@pytest.mark.parametrize("bad", REGIONS)
def test_one_bad_region_rolls_back_every_region_in_one_urgent_push(rig: Rig, bad: str) -> None:
    """Any region failing rolls every region back, at once and together: one push, canary
    at 0 everywhere; the audit log says which region failed and with what verdict."""

    async def body() -> None:
        await rig.start()
        await rig.tick()  # the step's clock starts
        rig.metrics.bad.add(bad)
        await rig.tick()  # the first look: a conclusive analysis failure

    run(body())
    assert rig.state().phase == ROLLED_BACK
    assert phases(rig.state()) == {ROLLED_BACK}
    first, rollback = rig.pushes
    assert first.traffic == everywhere(AT_5)
    assert rollback.traffic == everywhere(PRODUCTION_ONLY)
    assert rollback.urgent and rollback.reason == "rollback"
    assert set(rollback.versions) == set(REGIONS)
    stored = rig.store.rollout(SERVICE, CANARY)
    assert stored is not None and stored.phase == ROLLED_BACK
    entries = rig.store.audit(SERVICE, since=rollback.at)
    (overall,) = [e for e in entries if e.region is None]
    assert overall.phase_to == ROLLED_BACK
    assert overall.reason.startswith(f"rolled back everywhere: {bad}: step 0 (5%)")
    assert {e.region for e in entries if e.phase_to == ROLLED_BACK} == {*REGIONS, None}
    (culprit,) = [e for e in entries if e.region == bad]
    assert culprit.verdict is not None and culprit.verdict.outcome == "fail"
    assert culprit.snapshot_version == rollback.versions[bad]


def test_the_step_clock_starts_only_when_the_data_plane_has_applied_the_step(rig: Rig) -> None:
    """No promotion without evidence: while one region's Envoys have not ACKed the step,
    no region moves on, however long that takes (within ack_timeout); once they do, the
    step lasts a full step_duration from that ACK."""

    async def body() -> None:
        await rig.start()
        rig.dataplane.lag("eu-west", "envoy-eu-west-1")
        for _ in range(4):  # twice step_duration, still within ack_timeout
            await rig.tick()
        assert len(rig.pushes) == 1
        assert steps(rig.state()) == {0} and rig.state().phase == PROGRESSING
        assert rig.state().regions["eu-west"].step_started is None
        # The others were judged and passed: it is eu-west alone that holds the step.
        assert rig.state().regions["us-east"].step_passed
        acked_at = rig.clock()
        rig.dataplane.ack("eu-west")
        await rig.tick_until(lambda: len(rig.pushes) > 1)
        assert rig.state().regions["eu-west"].step == 1
        assert rig.pushes[1].traffic == everywhere(AT_20)
        assert rig.pushes[1].at - acked_at >= STEP_DURATION

    run(body())


def test_no_ack_within_ack_timeout_rolls_back_naming_the_lagging_node(rig: Rig) -> None:
    """A step the data plane cannot apply fails: after ack_timeout without an ACK the
    rollout rolls back, and the reason names the Envoy that lagged."""

    async def body() -> None:
        await rig.start()
        published = rig.clock()
        rig.dataplane.lag("ap-south", "envoy-ap-south-7")
        await rig.tick_until(lambda: rig.state().phase == ROLLED_BACK)
        assert rig.clock() - published > ACK_TIMEOUT
        assert rig.clock() - published <= ACK_TIMEOUT + 1  # the first tick past it

    run(body())
    assert rig.pushes[-1].traffic == everywhere(PRODUCTION_ONLY) and rig.pushes[-1].urgent
    reason = rig.state().reason
    assert reason.startswith("ap-south: step 0 (5%) not applied by the data plane")
    assert "envoy-ap-south-7" in reason and f"within {ACK_TIMEOUT:g}s" in reason
    stored = rig.store.rollout(SERVICE, CANARY)
    assert stored is not None and stored.reason == reason


def test_a_nack_rolls_back_naming_the_node_and_its_error(rig: Rig) -> None:
    """An Envoy that rejects the step's routes keeps its last good config: the step can
    never be applied there, so the rollout rolls back at once, saying who and why."""

    async def body() -> None:
        await rig.start()
        await rig.tick()
        rig.dataplane.reject("us-east", "envoy-us-east-3", "route weights must sum to 10000")
        await rig.tick()

    run(body())
    assert rig.state().phase == ROLLED_BACK
    assert rig.pushes[-1].traffic == everywhere(PRODUCTION_ONLY)
    reason = rig.state().reason
    assert "us-east" in reason
    assert "Envoy envoy-us-east-3 rejected routes 1: route weights must sum to 10000" in reason


def test_sinks_are_told_each_decision_and_a_failing_sink_stops_nothing(rig: Rig) -> None:
    """Every committed decision reaches every subscribed sink with the whole view (the
    rollouts and the weights just pushed); a sink that raises is logged and skipped, and
    an unsubscribed sink hears nothing more."""
    broken, sink = BrokenSink(), RecordingSink()
    rig.controller.subscribe(broken)
    unsubscribe = rig.controller.subscribe(sink)

    async def body() -> None:
        await rig.start()
        while rig.state().phase != PROMOTED:
            pushes, events = len(rig.pushes), len(sink.events)
            stored = rig.store.rollout(SERVICE, CANARY)
            await rig.tick()
            if rig.store.rollout(SERVICE, CANARY) == stored:
                continue
            assert len(sink.events) > events, "a committed decision the sinks were not told"
            last = sink.events[-1]
            assert last.decision is not None and last.state == rig.state()
            assert last.rollouts[SERVICE] == rig.store.rollout(SERVICE, CANARY)
            assert last.traffic == rig.dataplane.traffic == rig.controller.traffic()
            if len(rig.pushes) > pushes:
                assert last.traffic == rig.pushes[-1].traffic

    run(body())
    decisions = [e for e in sink.events if e.decision is not None]
    # The start, then one event per push at least, and the sink saw each pushed traffic.
    assert decisions[0].traffic == everywhere(AT_5) and decisions[0].actor == "controller"
    assert [p.traffic for p in rig.pushes] == [
        t for t, _ in itertools.groupby(e.traffic for e in decisions)
    ]
    for event in sink.events:
        assert rollout_traffic(event.spec, event.rollouts) == event.traffic
    assert broken.calls == len(sink.events)
    unsubscribe()
    told = len(sink.events)
    rig.controller.spec_changed()  # tells the sinks too (decision None)
    assert len(sink.events) == told and broken.calls == told + 1


@pytest.mark.parametrize("at", [PROMOTED, "20%"])
def test_a_new_canary_in_the_spec_gets_no_weight_of_the_rollout_before_it(
    rig: Rig, at: str
) -> None:
    """The next release named in the spec (v2 now in production, v3 the canary) starts
    at its first step: the spec change's own push gives it none of v2's weights (100%
    once promoted, 20% mid-rollout), which were pushed before the reconcile retired v2's
    rollout."""

    async def body() -> None:
        await rig.start()
        reached = everywhere(AT_100 if at == PROMOTED else AT_20)
        await rig.tick_until(lambda: rig.dataplane.traffic == reached)
        before = len(rig.pushes)
        rig.spec = make_spec(production=CANARY, canary="v3")
        rig.controller.spec_changed()
        await rig.controller.reconcile()
        pushed = [p.traffic for p in rig.pushes[before:]]
        # v2 alone (now production's version), then v3 at its first step.
        assert pushed == [TrafficState(), everywhere(AT_5)], pushed

    run(body())


def test_pause_holds_the_step_and_resume_continues(rig: Rig) -> None:
    """An operator's pause keeps the weights and stops advancing, however long; resume
    moves on from where the rollout was (the step already passed is not re-run)."""

    async def body() -> None:
        await rig.start()
        await rig.tick()
        paused = rig.controller.pause(SERVICE, "looking at a dashboard", "alice")
        assert paused.phase == PAUSED and phases(paused) == {PAUSED}
        for _ in range(5):
            await rig.tick()
        assert rig.pushes[-1].traffic == everywhere(AT_5) and len(rig.pushes) == 1
        assert rig.state().phase == PAUSED and steps(rig.state()) == {0}
        resumed = rig.controller.resume(SERVICE, "looks fine", "alice")
        assert resumed.phase == PROGRESSING
        await rig.tick()
        assert steps(rig.state()) == {1}

    run(body())
    assert [p.traffic for p in rig.pushes] == [everywhere(AT_5), everywhere(AT_20)]
    by_alice = [e for e in rig.store.audit(SERVICE) if e.actor == "alice"]
    assert [e.reason for e in by_alice] == [
        "paused: looking at a dashboard",
        "resumed: looks fine",
    ]


def test_abort_rolls_back_everywhere(rig: Rig) -> None:
    """An operator's abort is a rollback: canary at 0 everywhere, in one urgent push."""

    async def body() -> None:
        await rig.start()
        await rig.tick()
        aborted = rig.controller.abort(SERVICE, "bad feeling", "bob")
        assert aborted.phase == ROLLED_BACK and phases(aborted) == {ROLLED_BACK}

    run(body())
    assert rig.pushes[-1].traffic == everywhere(PRODUCTION_ONLY)
    assert rig.pushes[-1].urgent and rig.pushes[-1].reason == "rollback"
    stored = rig.store.rollout(SERVICE, CANARY)
    assert stored is not None and stored.reason == "aborted: bad feeling"
    entries = rig.store.audit(SERVICE, since=rig.clock())
    assert {e.actor for e in entries if e.kind != EntryKind.CHECK} == {"bob"}


def test_set_weights_pauses_with_the_given_weights(rig: Rig) -> None:
    """Weights set by hand are pushed where asked (elsewhere the step's stay) and pause
    the rollout, so the controller does not move them on its own."""

    async def body() -> None:
        await rig.start()
        await rig.tick()
        state = rig.controller.set_weights(SERVICE, ("eu-west",), 50, 10, "debugging", "carol")
        assert state.phase == PAUSED
        # What `rollout get` shows for the region says why it is where it is.
        assert state.regions["eu-west"].reason.startswith("weights set by hand to canary 50%")
        for _ in range(5):
            await rig.tick()

    run(body())
    by_hand = Split(production=4000, baseline=1000, canary=5000)
    assert [p.traffic for p in rig.pushes] == [
        everywhere(AT_5),
        everywhere(AT_5).with_split(SERVICE, ["eu-west"], by_hand),
    ]
    assert rig.pushes[-1].urgent
    assert rig.state().phase == PAUSED and steps(rig.state()) == {0}


def test_operator_errors(rig: Rig) -> None:
    """An unknown service or region is a KeyError; an action the rollout's phase does not
    allow (or a service without a rollout) is a ValueError; none of them pushes."""

    async def body() -> None:
        await rig.start()

    run(body())
    c = rig.controller
    with pytest.raises(KeyError):
        c.pause("no-such-service", "why", "alice")
    with pytest.raises(KeyError):
        c.set_weights("no-such-service", (), 50, 0, "why", "alice")
    with pytest.raises(KeyError):
        c.set_weights(SERVICE, ("mars",), 50, 0, "why", "alice")
    with pytest.raises(ValueError, match="has no rollout"):
        c.pause("ranker", "why", "alice")
    with pytest.raises(ValueError, match="not paused"):
        c.resume(SERVICE, "why", "alice")
    c.abort(SERVICE, "why", "alice")
    pushed = len(rig.pushes)
    for act in (c.pause, c.resume, c.abort):
        with pytest.raises(ValueError):
            act(SERVICE, "why", "alice")
    with pytest.raises(ValueError):
        c.set_weights(SERVICE, (), 50, 0, "why", "alice")
    assert len(rig.pushes) == pushed
    assert rig.state().phase == ROLLED_BACK


def test_a_restarted_controller_pushes_exactly_what_was_last_pushed(tmp_path: Path) -> None:
    """A new process over the same state dir resumes the rollout where it was: its first
    push is the weights the old one last pushed (not production only, not step 0), it
    does not start the rollout again, and it carries on to the end."""
    clock = FakeClock()
    first = make_rig(tmp_path, clock=clock)

    async def before_the_crash() -> None:
        await first.start()
        await first.tick_until(lambda: len(first.pushes) == 2)  # at 20%
        await first.tick()

    run(before_the_crash())
    first.store.close()
    started = [e for e in Store.in_dir(tmp_path).audit(SERVICE) if e.region is None]
    second = make_rig(tmp_path, clock=clock)

    async def after_the_restart() -> None:
        second.controller.restore()
        assert len(second.pushes) == 1
        await second.controller.reconcile()
        assert len(second.pushes) == 1
        await second.tick_until(lambda: second.state().phase == PROMOTED)

    run(after_the_restart())
    restored = second.pushes[0]
    assert restored.traffic == first.pushes[-1].traffic == everywhere(AT_20)
    assert restored.urgent
    assert [p.traffic for p in second.pushes] == [everywhere(AT_20), everywhere(AT_100)]
    overall = [e for e in second.store.audit(SERVICE) if e.region is None]
    assert overall[: len(started)] == started and len(started) == 1
    assert [e.phase_to for e in overall] == [PROGRESSING, PROMOTED]
    second.store.close()


def test_the_judge_runs_once_per_region_per_tick(rig: Rig) -> None:
    """Each tick measures each judged region once: the canary over the window, the canary
    over the step, and its comparator (baseline below 100%; none at 100%); the tick that
    starts a step's clock measures too, the step being a second old (its Envoys applied
    it a tick ago): a canary failing from the step's first second is seen a look earlier."""
    per_tick: list[dict[str, list[MeasureCall]]] = []

    async def body() -> None:
        await rig.start()
        while rig.state().phase != PROMOTED:
            seen = len(rig.metrics.calls)
            await rig.tick()
            calls = rig.metrics.calls[seen:]
            per_tick.append({r: [c for c in calls if c.region == r] for r in REGIONS})

    run(body())
    canary, baseline = cluster_name(SERVICE, "canary"), cluster_name(SERVICE, "baseline")
    judged = 0
    for ticks in per_tick:
        if not any(ticks.values()):
            continue
        judged += 1
        age = 1.0 if judged % 2 else float(STEP_DURATION)  # the step's first look, then its second
        window = (canary, age, True, False)  # the guardrails' sliding window
        step = (canary, age, False, True)  # the analysis: canary over the step...
        comparator = (baseline, age, True, True)  # ...and its comparator
        for region, calls in ticks.items():
            got = sorted((c.cluster, c.window_s, c.p99, c.buckets) for c in calls)
            assert got in (sorted([window, step, comparator]), sorted([window, step])), region
    assert judged == 6  # two looks per step: each passes at its first full step_duration
    assert [len(t["us-east"]) for t in per_tick] == [3, 3, 3, 3, 2, 2]
    assert rig.metrics.health_calls == 0
    assert len(rig.metrics.check_calls) == len(REGIONS)


def test_a_bad_region_is_acted_on_without_waiting_for_a_slow_one(tmp_path: Path) -> None:
    """A region whose observation alone means rollback is decided on as soon as it is
    in: a region whose queries hang (until the interval's deadline, a minute here) must
    not hold the rollback."""
    r = make_rig(tmp_path, make_spec(interval="60s"))

    async def body() -> None:
        await r.start()
        await r.tick()
        r.metrics.stalled["ap-south"] = asyncio.Event()  # never set
        r.metrics.bad.add("eu-west")
        await asyncio.wait_for(r.tick(), timeout=5)

    try:
        run(body())
    finally:
        r.store.close()
    assert r.state().phase == ROLLED_BACK
    assert r.state().reason.startswith("eu-west:")
    assert r.pushes[-1].traffic == everywhere(PRODUCTION_ONLY)
    assert any(c.region == "ap-south" for c in r.metrics.calls)  # it was asked, and hung


def test_a_nack_is_acted_on_without_waiting_for_a_slow_region(tmp_path: Path) -> None:
    """As for a bad canary: a NACK alone means rollback, so a region whose queries hang
    must not hold it (observe.py's docstring promises as much)."""
    r = make_rig(tmp_path, make_spec(interval="60s"))

    async def body() -> None:
        await r.start()
        await r.tick()
        r.metrics.stalled["ap-south"] = asyncio.Event()  # never set
        r.dataplane.reject("eu-west", "envoy-eu-west-1", "bad route")
        await asyncio.wait_for(r.tick(), timeout=1)

    try:
        run(body())
    finally:
        r.store.close()
    assert r.state().phase == ROLLED_BACK


def test_a_canary_that_cannot_be_judged_starts_paused(rig: Rig) -> None:
    """At start every region's queries are checked against production; a query that
    cannot judge the canary pauses the rollout before it can advance."""
    rig.metrics.problems = ["query 'errors' returned nothing for recommender|production"]

    async def body() -> None:
        await rig.start()
        for _ in range(5):
            await rig.tick()

    run(body())
    production = cluster_name(SERVICE, "production")
    assert {(r, s) for r, _, s in rig.metrics.check_calls} == {(r, production) for r in REGIONS}
    assert rig.state().phase == PAUSED and steps(rig.state()) == {0}
    assert rig.state().reason.startswith("configuration error: query 'errors'")
    assert [p.traffic for p in rig.pushes] == [everywhere(AT_5)]


def test_a_source_that_cannot_be_asked_at_start_is_audited_and_the_rollout_holds(
    rig: Rig,
) -> None:
    """A hanging Prometheus at start: not a configuration error (no pause), but said in
    the log and the audit; the first step then holds for want of evidence."""
    rig.metrics.unreachable = "Prometheus unreachable at http://127.0.0.1:9: ReadTimeout"

    async def body() -> None:
        await rig.start()

    run(body())
    assert rig.state().phase == PROGRESSING
    notes = [e for e in rig.store.audit(SERVICE) if e.kind == "check" and e.region is None]
    assert len(notes) == 1 and "ReadTimeout" in notes[0].reason
    assert "holds until the metrics answer" in notes[0].reason


def test_metrics_that_never_answer_are_no_evidence_and_max_hold_is_kept_by_the_clock(
    tmp_path: Path,
) -> None:
    """Every region's queries hang: each interval is judged as no data (and audited),
    the step never advances, and once the hold reaches max_hold the plan's rule applies
    (error_rate's `on_no_data: pause` by default), however long the queries would take."""
    r = make_rig(tmp_path, make_spec(max_hold="4s"))

    async def body() -> None:
        await r.start()
        for region in REGIONS:
            r.metrics.stalled[region] = asyncio.Event()  # never set
        for _ in range(12):
            if r.state().phase != PROGRESSING:
                break
            await asyncio.wait_for(r.tick(), timeout=10)
        for event in r.metrics.stalled.values():
            event.set()

    run(body())
    assert r.state().phase == PAUSED
    assert "no evidence for 4s" in r.state().reason and "no answer within" in r.state().reason
    assert steps(r.state()) == {0}
    holds = [
        e
        for e in r.store.audit(SERVICE)
        if e.kind == "check" and e.verdict and e.verdict.outcome == "no_data"
    ]
    assert holds and all("no answer within" in e.reason for e in holds)
    r.store.close()


def test_a_canary_that_lost_every_host_holds_its_region_and_fails_at_max_hold(
    tmp_path: Path,
) -> None:
    """Registered instances whose leases ran out leave a weighted canary with no host in
    a region (the data plane keeps its last hosts): the step holds there, audited each
    interval, and once the hold reaches max_hold it is a failure: every region rolls
    back (not a metric's `on_no_data`, which would pause)."""
    r = make_rig(tmp_path, make_spec(max_hold="4s"))

    async def body() -> None:
        await r.start()
        r.dataplane.hosts[("eu-west", f"{SERVICE}|canary")] = 0
        for _ in range(12):
            if r.state().phase != PROGRESSING:
                break
            await asyncio.wait_for(r.tick(), timeout=10)

    run(body())
    assert r.state().phase == ROLLED_BACK
    assert "eu-west: step 0 (5%): the canary has no host left in eu-west for 4s" in (
        r.state().reason
    )
    holds = [e for e in r.store.audit(SERVICE, region="eu-west") if "holding:" in e.reason]
    assert holds and all(e.step == 0 for e in holds)
    r.store.close()
