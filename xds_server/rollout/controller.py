"""The rollout controller: a level-triggered loop around the pure `decide` function.

Each interval, for each live rollout: observe every region (has the data plane applied
the step? what do canary and baseline look like in Prometheus?), decide, write the
decision and its audit entries to the store, then push the weights that the new state
implies. Weights are always derived from rollout state, so a restarted controller that
reloads the state pushes exactly the weights it had announced.

Observation never holds up a rollback: regions are observed concurrently, and as soon
as one region's result alone is enough to roll back, the controller decides without
waiting for the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from xds_server.config import MeshSpec, Service
from xds_server.rollout import decide as sm
from xds_server.rollout.decide import Decision, Observation, RolloutState
from xds_server.rollout.judge import FAIL, Comparison, judge
from xds_server.rollout.metrics import PrometheusSource
from xds_server.rollout.plan import LATENCY, TAIL, RolloutPlan
from xds_server.rollout.store import Store, transition_entry
from xds_server.rollout.webhooks import hook_context, run_webhooks
from xds_server.server import XdsServer
from xds_server.traffic import WEIGHT_TOTAL, Split, TrafficState, WeightError
from xds_server.xds.resources import cluster_name
from xds_server.xds.types import ROUTE

log = logging.getLogger("xds_server.rollout")


@dataclass(frozen=True)
class RolloutEvent:
    """What listeners (metrics, the admin event stream, the lab's live view) receive."""

    time: float
    state: RolloutState
    decision: Decision
    actor: str


class RolloutController:
    def __init__(
        self,
        server: XdsServer,
        store: Store,
        metrics: PrometheusSource,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 0.1,
    ) -> None:
        self.server = server
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.rollouts: dict[str, RolloutState] = {}
        self._next_due: dict[str, float] = {}
        self._pushed_at: dict[tuple[str, str], float] = {}
        self._listeners: list[Callable[[RolloutEvent], None]] = []
        self._hooks: dict[tuple[str, str, str], asyncio.Future[str | None]] = {}
        """Warm-up webhook runs by (service, canary version, region): None when passed."""
        self._hook_threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook")

    @property
    def spec(self) -> MeshSpec:
        return self.server.spec

    def subscribe(self, listener: Callable[[RolloutEvent], None]) -> Callable[[], None]:
        """Call `listener` after every committed decision; returns unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # ---- start-up ----

    def restore(self) -> None:
        """Load persisted rollouts of the spec's current canaries and push their weights.

        Called before the xDS port opens, so no Envoy ever sees production-only weights
        for a rollout that was in progress when the previous process died.
        """
        now = self.clock()
        stored = {(s.service, s.canary_version): s for s in self.store.load_rollouts()}
        for svc in self.spec.services:
            canary = svc.pools.get("canary")
            state = stored.get((svc.name, canary.version)) if canary else None
            if canary is None or state is None:
                continue
            self.rollouts[svc.name] = state
            for region in self.spec.regions:
                self._pushed_at[(svc.name, region)] = now
            if state.phase in sm.LIVE:
                steps = {r: s.step for r, s in state.regions.items()}
                log.info(
                    "resuming rollout of %s %s: %s at steps %s",
                    svc.name,
                    canary.version,
                    state.phase,
                    steps,
                )
        self.server.set_traffic(self.traffic(), urgent=True, reason="restored rollout state")

    # ---- the loop ----

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile()
                now = self.clock()
                due = [
                    s
                    for s, st in self.rollouts.items()
                    if st.phase in sm.LIVE and self._next_due.get(s, 0) <= now
                ]
                if due:
                    await asyncio.gather(*(self.tick(s) for s in due))
            except Exception:
                log.exception("controller loop error; continuing")
            await asyncio.sleep(self.tick_seconds)

    async def reconcile(self) -> None:
        """Start rollouts for new canary versions; retire those the spec no longer has."""
        for svc in self.spec.services:
            canary = svc.pools.get("canary")
            current = self.rollouts.get(svc.name)
            if current is not None and (canary is None or canary.version != current.canary_version):
                why = (
                    "canary pool removed from the spec"
                    if canary is None
                    else f"superseded by canary {canary.version}"
                )
                if current.phase in sm.LIVE:
                    self.commit(svc, sm.abort(current, self.clock(), why), actor="spec")
                del self.rollouts[svc.name]
                current = None
            if canary is None or current is not None:
                continue
            stored = self.store.rollout(svc.name, canary.version)
            if stored is not None:
                self.rollouts[svc.name] = stored
                self.server.set_traffic(self.traffic(), urgent=True, reason="rollout state")
                continue
            if canary.version == svc.pools["production"].version:
                continue
            await self._start(svc, canary.version)
        known = {s.name for s in self.spec.services}
        for name in [n for n in self.rollouts if n not in known]:
            del self.rollouts[name]

    async def _start(self, svc: Service, version: str) -> None:
        decision = sm.start(svc.rollout, svc.name, version, self.spec.regions, self.clock())
        checks = await asyncio.gather(
            *(
                asyncio.to_thread(
                    self.metrics.check_queries,
                    svc.rollout,
                    region,
                    cluster_name(svc.name, "canary"),
                    cluster_name(svc.name, "production"),
                )
                for region in self.spec.regions
            )
        )
        problems = [p for found in checks for p in found]
        if problems:
            why = "configuration error: " + "; ".join(sorted(set(problems)))
            log.error("rollout of %s %s cannot be judged: %s", svc.name, version, why)
            paused = sm.pause(decision.state, self.clock(), why)
            decision = Decision(paused.state, decision.transitions + paused.transitions)
        log.info(
            "rollout of %s: canary %s has not been rolled out yet: starting", svc.name, version
        )
        self.commit(svc, decision)

    async def tick(self, service: str) -> None:
        svc = self.spec.service(service)
        plan = svc.rollout
        self._next_due[service] = self.clock() + plan.interval
        observations = await self.observe(svc, self.rollouts[service])
        # Decide on the newest state: an operator may have acted while we were observing.
        decision = sm.decide(plan, self.rollouts[service], observations, self.clock())
        if decision.transitions or decision.state != self.rollouts[service]:
            self.commit(svc, decision)

    # ---- observing ----

    async def observe(self, svc: Service, state: RolloutState) -> dict[str, Observation]:
        now = self.clock()
        plan = svc.rollout
        out: dict[str, Observation] = {}
        pending: dict[asyncio.Task[Observation], str] = {}
        for region, rs in state.regions.items():
            if rs.phase not in sm.LIVE:
                continue
            if rs.step == sm.WARMUP_STEP and not rs.shadowing:
                if rs.step_passed:
                    continue  # warm, waiting for the rest of its wave
                task = asyncio.create_task(self._warmup_status(svc, state, region))
                pending[task] = region
                continue
            obs = self._applied(svc.name, region, plan, now)
            out[region] = obs
            started = rs.step_started or obs.applied_at
            if obs.applied_at is None or obs.apply_error or started is None:
                continue
            if now - started < 1 or rs.step_started is None:
                continue  # the step's clock has just started: nothing to judge yet
            task = asyncio.create_task(self._measure(svc, region, obs, now - started))
            pending[task] = region
        deadline = now + max(plan.interval, 0.5)
        while pending:
            done, _ = await asyncio.wait(
                pending,
                timeout=max(0.0, deadline - self.clock()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                break  # slow queries: those regions hold this interval
            for task in done:
                region = pending.pop(task)
                obs = out[region] = task.result()
                if obs.canary is None:
                    continue
                rs = state.regions[region]
                verdict = judge(plan, obs.canary, obs.step, regions=len(state.regions))
                if verdict.outcome == FAIL and (
                    verdict.conclusive or rs.failures + 1 >= plan.failures_before_rollback
                ):
                    pending.clear()  # enough to roll back: decide now
                    break
        return out

    def comparator(self, svc: Service, region: str) -> str | None:
        """The pool the canary is compared with: baseline when it takes traffic (or shadow
        traffic), else production when that does; None when the canary takes it all."""
        split = self.server.traffic.effective(svc, region)
        if "baseline" in svc.pools and (split.baseline or split.shadow):
            return "baseline"
        return "production" if split.production else None

    async def _measure(
        self, svc: Service, region: str, obs: Observation, step_age: float
    ) -> Observation:
        plan = svc.rollout
        buckets = any(m.kind in (LATENCY, TAIL) for m in plan.analysis.metrics)
        pool = self.comparator(svc, region)
        window = min(step_age, plan.window)
        canary_cluster = cluster_name(svc.name, "canary")
        jobs = [
            self.metrics.measure(plan, region, canary_cluster, window),
            self.metrics.measure(
                plan, region, canary_cluster, step_age, p99=False, buckets=buckets
            ),
        ]
        if pool is not None:
            jobs.append(
                self.metrics.measure(
                    plan, region, cluster_name(svc.name, pool), step_age, buckets=buckets
                )
            )
        results = await asyncio.gather(*jobs)
        comparison = Comparison(results[1], results[2] if pool else None, pool or "")
        return replace(obs, canary=results[0], step=comparison)

    async def _warmup_status(self, svc: Service, state: RolloutState, region: str) -> Observation:
        """What keeps a warming region's pools from shadow traffic or their first step."""
        plan = svc.rollout
        waiting: list[str] = []
        if plan.warmup.health_check is not None:
            for pool in ("canary", "baseline"):
                if pool not in svc.pools:
                    continue
                try:
                    total, healthy = await asyncio.to_thread(
                        self.metrics.pool_health, plan, region, cluster_name(svc.name, pool)
                    )
                except Exception as exc:  # unreachable, rejected, or an unreadable answer
                    waiting.append(f"{pool} health unknown: {exc}")
                    continue
                if total == 0:
                    waiting.append(f"{pool}: no hosts in the region's Envoys yet")
                elif healthy < plan.warmup.min_healthy * total:
                    waiting.append(f"{pool}: {healthy:.0f} of {total:.0f} hosts healthy")
        if plan.warmup.webhooks and not waiting:
            # Hooks (smoke tests, cache primers) run against healthy pools only, in their
            # own threads: a slow hook must not take a thread a measurement needs.
            key = (svc.name, state.canary_version, region)
            run = self._hooks.get(key)
            if run is None:
                context = hook_context(svc, state, region)
                run = self._hooks[key] = asyncio.ensure_future(
                    asyncio.get_running_loop().run_in_executor(
                        self._hook_threads, run_webhooks, plan.warmup.webhooks, context
                    )
                )
            if not run.done():
                waiting.append("warm-up webhooks running")
            elif run.exception() is not None:
                return Observation(warmup_error=f"warm-up webhooks failed: {run.exception()!r}")
            elif run.result():
                return Observation(warmup_error=run.result())
        return Observation(warmup_pending=tuple(waiting))

    def _applied(self, service: str, region: str, plan: RolloutPlan, now: float) -> Observation:
        """Has every Envoy of the region ACKed the routes that carry the current weights?"""
        version = self.server.snapshot(region).type_version(ROUTE)
        nodes = self.server.nodes.nodes(region)
        for n in nodes:
            ts = n.types[ROUTE]
            if ts.nack_version == version and ts.acked_version != version:
                return Observation(
                    apply_error=f"Envoy {n.node_id} rejected routes {version}: {ts.nack_error}"
                )
        pushed_at = self._pushed_at.get((service, region), now)
        lagging = [n.node_id for n in nodes if n.types[ROUTE].acked_version != version]
        if lagging:
            if now - pushed_at > plan.ack_timeout:
                return Observation(
                    apply_error=f"no ACK of routes {version} within "
                    f"{plan.ack_timeout:g}s from {', '.join(lagging)}"
                )
            return Observation()
        acked = [t for n in nodes if (t := n.types[ROUTE].acked_at) is not None]
        return Observation(applied_at=max([pushed_at, *acked]))

    # ---- deciding and pushing ----

    def traffic(self) -> TrafficState:
        """The weights every rollout's state implies; production only where none."""
        splits = {}
        for svc in self.spec.services:
            state = self.rollouts.get(svc.name)
            if state is None:
                continue
            for region, rs in state.regions.items():
                if region in self.spec.regions:
                    splits[(svc.name, region)] = sm.split_of(
                        svc.rollout, rs, "baseline" in svc.pools
                    )
        return TrafficState(splits)

    def commit(self, svc: Service, decision: Decision, actor: str = "controller") -> None:
        """Persist the decision with its audit entries, then push its weights."""
        now = self.clock()
        old = self.server.traffic
        self.rollouts[svc.name] = decision.state
        new = self.traffic()
        changed = old.regions_changed(new)
        versions = {r: self.server.snapshot(r).version + 1 for r in changed}
        entries = []
        for t in decision.transitions:
            region = t.region
            obs = decision.observations.get(region) if region else None
            measurements = None
            if obs is not None and obs.canary is not None:
                step = obs.step
                measurements = {
                    "canary": obs.canary.as_dict(),
                    "canary_step": step.canary.as_dict() if step else None,
                    "comparator": step.comparator_pool if step else None,
                    "baseline": step.comparator.as_dict() if step and step.comparator else None,
                }
            before = _audit_weights(old.split(svc.name, region)) if region else None
            after = _audit_weights(new.split(svc.name, region)) if region else None
            entries.append(
                transition_entry(
                    t,
                    now,
                    before,
                    after,
                    measurements,
                    versions.get(region) if region else None,
                    actor,
                )
            )
        self.store.record(decision.state, entries)
        for t in decision.transitions:
            level = logging.INFO if t.kind == "transition" else logging.DEBUG
            log.log(
                level,
                "%s %s%s: %s -> %s: %s",
                svc.name,
                decision.state.canary_version,
                f" {t.region}" if t.region else "",
                t.phase_from,
                t.phase_to,
                t.reason,
            )
        if changed:
            self.server.set_traffic(
                new, urgent=True, reason="rollback" if decision.rollback else "rollout step"
            )
            for region in changed:
                self._pushed_at[(svc.name, region)] = now
        event = RolloutEvent(now, decision.state, decision, actor)
        for listener in list(self._listeners):
            listener(event)

    # ---- operator actions (the admin API) ----
    # Each raises KeyError for an unknown service or region, ValueError when the rollout's
    # phase does not allow it, WeightError for weights that cannot be applied.

    def pause(self, service: str, reason: str, actor: str) -> RolloutState:
        return self._operate(service, actor, lambda st, now: sm.pause(st, now, reason))

    def resume(self, service: str, reason: str, actor: str) -> RolloutState:
        # A webhook that blocked the warm-up runs again after a resume.
        for key in [k for k, t in self._hooks.items() if k[0] == service]:
            run = self._hooks[key]
            if run.done() and (run.exception() is not None or run.result()):
                del self._hooks[key]
        return self._operate(service, actor, lambda st, now: sm.resume(st, now, reason))

    def abort(self, service: str, reason: str, actor: str) -> RolloutState:
        return self._operate(service, actor, lambda st, now: sm.abort(st, now, reason))

    def promote(
        self, service: str, reason: str, actor: str, all_the_way: bool = False
    ) -> RolloutState:
        plan = self.spec.service(service).rollout
        return self._operate(
            service, actor, lambda st, now: sm.promote(plan, st, now, reason, all_the_way)
        )

    def set_weights(
        self,
        service: str,
        regions: tuple[str, ...],
        canary: float,
        baseline: float,
        reason: str,
        actor: str,
    ) -> RolloutState:
        svc = self.spec.service(service)
        if baseline and "baseline" not in svc.pools:
            raise WeightError(f"service {service!r} has no baseline pool")
        return self._operate(
            service,
            actor,
            lambda st, now: sm.set_weights(st, regions, canary, baseline, now, reason),
        )

    def _operate(
        self, service: str, actor: str, act: Callable[[RolloutState, float], Decision]
    ) -> RolloutState:
        state = self.rollouts.get(service)
        if state is None:
            self.spec.service(service)  # KeyError: unknown service
            raise ValueError(f"service {service!r} has no rollout")
        decision = act(state, self.clock())
        self.commit(self.spec.service(service), decision, actor=actor)
        return decision.state


def _audit_weights(split: Split) -> dict[str, float]:
    """Percent per pool, and the mirrored share when there is one (warm-up)."""
    out = split.percent()
    if split.shadow:
        out["shadow"] = split.shadow * 100 / WEIGHT_TOTAL
    return out
