"""The rollout controller: a level-triggered loop around the pure decision function.

Each interval, for each live rollout: observe every region (`observe.Observer`), turn
each region's observation into an event and fold them into a decision (`decide`),
commit the decision with its audit entries to the store, push the weights the new state
implies to the data plane, then tell the sinks. Weights are always derived from rollout
state, so a restarted controller that reloads the state pushes exactly the weights it
had announced.

It talks to the world only through ports: `StateStore`, `MetricSource`, `DataPlane`
and `TrafficSink`s (rollout/ports.py, xds/dataplane.py).

Commit discipline, when the store fails (a full disk, an I/O error): the in-memory
state never runs ahead of what is committed, and a step forward is never announced or
pushed without its commit. A rollback is the exception, safety first: it is pushed even
when it cannot be written, kept, and committed as soon as the store works again (before
anything else is). Failures are logged, counted and shown (`store_health`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace

from xds_server.rollout import decide as sm
from xds_server.rollout.audit import AuditEntry, decision_entries
from xds_server.rollout.commits import CommitLog, NotLeader, StoreHealth
from xds_server.rollout.decide import Decision, Observation, RegionEvent
from xds_server.rollout.groups import (
    fallen,
    group_rollbacks,
    lockstep_hold,
    start_block,
)
from xds_server.rollout.observe import Observer
from xds_server.rollout.operations import OperatorActions
from xds_server.rollout.ports import Committed, MetricSource, StateStore, TrafficSink
from xds_server.rollout.state import (
    LIVE,
    PROGRESSING,
    RolloutState,
    current_rollouts,
    rollout_traffic,
)
from xds_server.spec import MeshSpec, Service
from xds_server.traffic import TrafficState
from xds_server.xds.dataplane import DataPlane
from xds_server.xds.resources import cluster_name

log = logging.getLogger("xds_server.rollout")


class StoreUnavailable(Exception):
    """A decision that was not made because the store cannot be written (nothing changed)."""


__all__ = ["NotLeader", "RolloutController", "StoreHealth", "StoreUnavailable"]


class RolloutController(OperatorActions):
    def __init__(
        self,
        spec: Callable[[], MeshSpec],
        dataplane: DataPlane,
        store: StateStore,
        metrics: MetricSource,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 0.1,
    ) -> None:
        self._spec = spec
        """The current spec (the app owns it and swaps it on a reload)."""
        self.dataplane = dataplane
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.observer = Observer(dataplane, metrics, clock)
        self.rollouts: dict[str, RolloutState] = {}
        self._pushed = TrafficState()
        """The weights last given to the data plane."""
        self._next_due: dict[str, float] = {}
        self._sinks: list[TrafficSink] = []
        self.commits = CommitLog(store, clock)
        self._waiting: dict[str, str] = {}

    @property
    def spec(self) -> MeshSpec:
        return self._spec()

    def subscribe(self, sink: TrafficSink) -> Callable[[], None]:
        """Tell `sink` after every committed decision and every spec change; returns
        unsubscribe."""
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink)

    def watch_store(self, listener: Callable[[StoreHealth], None]) -> None:
        """Call `listener` on every failed write and on recovery."""
        self.commits.watch(listener)

    @property
    def store_health(self) -> StoreHealth:
        return self.commits.health

    @property
    def waiting(self) -> Mapping[str, str]:
        """Service -> why its canary's rollout has not started (a member of its rollout
        group without a canary, an `after:` dependency not through yet): as the last
        reconcile saw it, level-triggered, never stored."""
        return dict(self._waiting)

    def traffic(self) -> TrafficState:
        """The weights every rollout's state implies; production only where none."""
        return rollout_traffic(self.spec, self.rollouts)

    # ---- start-up and spec changes ----

    def restore(self) -> None:
        """Load persisted rollouts of the spec's current canaries and push their weights.

        Called before the xDS port opens, so no Envoy ever sees production-only weights
        for a rollout that was in progress when the previous process died.
        """
        self.rollouts = current_rollouts(self.spec, self.store.load_rollouts())
        for state in self.rollouts.values():
            if state.phase in LIVE:
                steps = {r: s.step for r, s in state.regions.items()}
                log.info(
                    "resuming rollout of %s %s: %s at steps %s",
                    state.service,
                    state.canary_version,
                    state.phase,
                    steps,
                )
        self._push(urgent=True, reason="restored rollout state")

    def spec_changed(self) -> None:
        """The app swapped the spec: serve what the rollouts imply under it, and tell the
        sinks (objects can change without a decision). New canaries start at the next
        reconcile."""
        self._push(urgent=False, reason="spec changed")

    def _push(
        self,
        *,
        urgent: bool,
        reason: str,
        decisions: Sequence[Decision] = (),
        actor: str = "controller",
    ) -> None:
        """One push of the weights every rollout implies (if they changed), then the
        sinks told once per decision (once, with none, after a restore or spec change)."""
        traffic = self.traffic()
        if traffic != self._pushed:
            self.dataplane.set_traffic(traffic, urgent=urgent, reason=reason)
            self._pushed = traffic
        rollouts = dict(self.rollouts)
        for decision in decisions or (None,):
            event = Committed(self.clock(), self.spec, rollouts, traffic, decision, actor)
            for sink in list(self._sinks):
                try:
                    sink.follow(event)
                except Exception:
                    log.exception("a traffic sink failed to follow a decision; continuing")

    # ---- the loop ----

    async def run(self) -> None:
        while True:
            try:
                self.retry_store()
                await self.reconcile()
                now = self.clock()
                due = [
                    s
                    for s, st in self.rollouts.items()
                    if st.phase in LIVE and self._next_due.get(s, 0) <= now
                ]
                if due:
                    await asyncio.gather(*(self.tick(s) for s in due))
            except StoreUnavailable:
                pass  # logged when the store began to fail; retried next interval
            except NotLeader as exc:
                log.warning("rollout controller stopped: %s", exc)
                return
            except Exception:
                log.exception("controller loop error; continuing")
            # The loop's period, not a wait for state; shorter when a look is due sooner.
            soonest = min(
                (self._next_due.get(s, 0) for s, st in self.rollouts.items() if st.phase in LIVE),
                default=math.inf,
            )
            await asyncio.sleep(min(self.tick_seconds, max(0.01, soonest - self.clock())))

    async def reconcile(self) -> None:
        """Start rollouts for new canary versions (once their group and `after:` let
        them: `waiting` says why not), all in one push (a group starts as one); retire
        those the spec no longer has."""
        waiting: dict[str, str] = {}
        starts: list[tuple[Service, Decision]] = []
        for svc in self.spec.services:
            canary = svc.pools.get("canary")
            current = self.rollouts.get(svc.name)
            if current is not None and (canary is None or canary.version != current.canary_version):
                self._retire(svc, current)
                current = None
            if canary is None or current is not None:
                continue
            stored = self.store.rollout(svc.name, canary.version)
            if stored is not None:
                self.rollouts[svc.name] = stored
                self._push(urgent=True, reason="rollout state")
            elif svc.canary_version is not None:
                if why := start_block(self.spec, svc.name, self.rollouts):
                    if self._waiting.get(svc.name) != why:
                        log.info("rollout of %s %s waits: %s", svc.name, canary.version, why)
                    waiting[svc.name] = why
                else:
                    starts.append((svc, await self._start(svc, svc.canary_version)))
        self._waiting = waiting
        if starts:
            self.commit_all(starts)
        # Said again as things stand once this reconcile's rollouts started.
        self._waiting = {n: w for n in waiting if (w := start_block(self.spec, n, self.rollouts))}
        known = {s.name for s in self.spec.services}
        for name in [n for n in self.rollouts if n not in known]:
            del self.rollouts[name]

    def _retire(self, svc: Service, current: RolloutState) -> None:
        if current.phase in LIVE:
            canary = svc.pools.get("canary")
            why = (
                "canary pool removed from the spec"
                if canary is None
                else f"superseded by canary {canary.version}"
            )
            self.commit(svc, sm.abort(current, self.clock(), why), actor="spec")
        del self.rollouts[svc.name]

    async def _start(self, svc: Service, version: str) -> Decision:
        """The decision that starts a rollout of `version` (paused when its queries
        cannot be judged); the caller commits it."""
        decision = sm.start(svc.rollout, svc.name, version, self.spec.regions, self.clock())
        checks = await asyncio.gather(
            *(
                self.metrics.check_queries(
                    svc.rollout,
                    region,
                    cluster_name(svc.name, "canary"),
                    cluster_name(svc.name, "production"),
                    {name: pool.version for name, pool in svc.pools.items()},
                )
                for region in self.spec.regions
            )
        )
        problems = sorted({p for found in checks for p in found.problems})
        if problems:
            why = "configuration error: " + "; ".join(problems)
            log.error("rollout of %s %s cannot be judged: %s", svc.name, version, why)
            paused = sm.pause(decision.state, self.clock(), why)
            decision = Decision(paused.state, decision.transitions + paused.transitions)
        elif unreachable := sorted({c.unreachable for c in checks if c.unreachable}):
            why = (
                f"queries not checked at start: {'; '.join(unreachable)}; "
                "each step holds until the metrics answer"
            )
            log.warning("rollout of %s %s: %s", svc.name, version, why)
            note = sm.Transition(
                None, PROGRESSING, PROGRESSING, -1, 0, why, kind=sm.EntryKind.CHECK
            )
            decision = replace(decision, transitions=(*decision.transitions, note))
        log.info(
            "rollout of %s: canary %s has not been rolled out yet: starting", svc.name, version
        )
        return decision

    async def tick(self, service: str) -> None:
        svc = self.spec.service(service)
        plan = svc.rollout
        due = self.clock() + plan.interval
        self._next_due[service] = due
        state = self.rollouts[service]
        if (why := fallen(self.spec, service, self.rollouts)) is not None:
            self.commit(svc, sm.rollback(state, self.clock(), why))
            return
        events: dict[str, RegionEvent] = {}

        def seen(region: str, obs: Observation) -> bool:
            rs = state.regions[region]
            ev = sm.region_event(plan, region, rs, obs, self.clock(), len(state.regions))
            events[region] = ev
            return bool(ev.rollback)  # enough to roll back: decide now

        observations = await self.observer.observe(svc, state, self.traffic(), seen)
        newest = self.rollouts.get(service)
        if newest is None:
            return
        hold = lockstep_hold(self.spec, service, self.rollouts, self.clock())  # (its group's)
        if newest is not state:
            # An operator acted while we were observing: decide on the newest state.
            decision = sm.decide(plan, newest, observations, self.clock(), hold)
        else:
            for region, obs in observations.items():
                if region not in events:
                    seen(region, obs)
            decision = sm.fold(plan, state, events, observations, self.clock(), hold)
        # A quiet tick (nothing recorded, nothing but the clock changed) writes nothing.
        if decision.transitions or replace(decision.state, updated_at=newest.updated_at) != newest:
            self.commit(svc, decision)
        # The next look: each region read just after its own next scrape lands.
        self._next_due[service] = self.observer.next_look(
            service, list(observations), due, plan.interval
        )

    # ---- committing ----

    def commit(self, svc: Service, decision: Decision, actor: str = "controller") -> None:
        """Persist the decision with its audit entries, then push its weights (a rollback
        takes its group and the services `after:` it along: `commit_all`).

        When the store cannot be written: a decision that moves the rollout (a phase, a
        step, weights) raises StoreUnavailable and changes nothing; a rollback is pushed
        all the same and saved later; a decision that only keeps the books of a step
        (its clock, failures in a row, a hold) stands in memory, so judging goes on, and
        is saved with the next write that succeeds (its check entries are lost)."""
        self.commit_all([(svc, decision)], actor)

    def commit_all(
        self, decisions: Sequence[tuple[Service, Decision]], actor: str = "controller"
    ) -> None:
        """Several rollouts' decisions as one: each one's state and audit entries
        committed in turn, then ONE push of the weights they imply together (one
        snapshot per region), then the sinks told of each. A rollback among them takes
        along every live rollout that goes with it (`groups.group_rollbacks`). The
        discipline is `commit`'s, decision by decision: when one that moves cannot be
        written, the ones before it (committed) stand and are pushed, and it and the rest
        change nothing (StoreUnavailable); rollbacks go first, so they are always pushed."""
        now = self.clock()
        batch = list(decisions)
        for _, decision in [d for d in batch if d[1].rollback]:
            taken = {s.name for s, _ in batch}
            more = group_rollbacks(self.spec, decision, self.rollouts, now)
            batch += [(s, d) for s, d in more if s.name not in taken]
        batch.sort(key=lambda d: not d[1].rollback)  # (stable: the deciding one first)
        before = self._pushed
        after = rollout_traffic(self.spec, {**self.rollouts, **{s.name: d.state for s, d in batch}})
        changed = before.regions_changed(after)
        versions = {r: self.dataplane.next_version(r) for r in changed}
        done: list[tuple[Service, Decision]] = []
        for svc, decision in batch:
            group = self.spec.group_of(svc.name)
            entries = decision_entries(
                decision, before, after, versions, now, actor, group.name if group else None
            )
            moved = any(before.split(svc.name, r) != after.split(svc.name, r) for r in changed)
            try:
                self._save(svc, decision, entries, changed, moved)
            except StoreUnavailable:
                self._apply(done, actor)  # (committed: they stand)
                raise
            done.append((svc, decision))
        self._apply(done, actor)

    def _save(
        self,
        svc: Service,
        decision: Decision,
        entries: list[AuditEntry],
        regions: Collection[str],
        moved: bool,
    ) -> None:
        """Commit one decision, or keep a rollback that cannot be written (it is pushed),
        or raise StoreUnavailable for one that moves the rollout (`moved`: its weights)."""
        if self.commits.save(decision.state, entries, critical=decision.rollback, regions=regions):
            return
        if decision.rollback:
            log.error(
                "pushing the rollback of %s %s although it is not saved; it is saved "
                "as soon as the store works again",
                svc.name,
                decision.state.canary_version,
            )
            self.commits.keep_unsaved(decision.state, entries, regions)
        elif moved or _moves(self.rollouts.get(svc.name), decision.state):
            raise StoreUnavailable(
                f"the state store cannot be written ({self.store_health.error}): "
                f"nothing was changed for {svc.name}"
            )

    def _apply(self, done: Sequence[tuple[Service, Decision]], actor: str) -> None:
        """Decisions committed (or rollbacks kept): into memory, one push, the sinks."""
        if not done:
            return
        for svc, decision in done:
            self.rollouts[svc.name] = decision.state
            _log_transitions(decision)
        rollback = any(d.rollback for _, d in done)
        reason = "rollback" if rollback else "rollout step"
        self._push(urgent=True, reason=reason, decisions=[d for _, d in done], actor=actor)

    def retry_store(self) -> None:
        """Save the rollbacks pushed while the store failed, once a retry is due."""
        if self.commits.retry_due():
            self.commits.save_unsaved()


def _log_transitions(decision: Decision) -> None:
    state = decision.state
    for t in decision.transitions:
        log.log(
            logging.INFO if t.kind == sm.EntryKind.TRANSITION else logging.DEBUG,
            "%s %s%s: %s -> %s: %s",
            state.service,
            state.canary_version,
            f" {t.region}" if t.region else "",
            t.phase_from,
            t.phase_to,
            t.reason,
        )


def _moves(old: RolloutState | None, new: RolloutState) -> bool:
    """Does `new` change where the rollout stands (its phase, a region's phase, step or
    hand-set weights), rather than only the books of the current step?"""
    if old is None or old.phase != new.phase or old.wave != new.wave:
        return True
    for region, rs in new.regions.items():
        was = old.regions.get(region)
        if was is None or (was.phase, was.step, was.manual_canary, was.manual_baseline) != (
            rs.phase,
            rs.step,
            rs.manual_canary,
            rs.manual_baseline,
        ):
            return True
    return False
