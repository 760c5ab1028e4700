"""What the controller sees of a rollout each interval, region by region: has the data
plane applied the step (ACKs)? how do canary and comparator look (Prometheus)? and,
while warming, are the new pools healthy and did the webhooks pass?

Regions are observed concurrently and reported as each finishes, so one region whose
observation alone means rollback never waits for a slow query elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from xds_server.rollout.decision import Observation
from xds_server.rollout.evidence import Comparison, Measurement
from xds_server.rollout.health import HealthBook, production_fails, why_unhealthy
from xds_server.rollout.ports import HostProber, MetricSource, NodeFilter
from xds_server.rollout.probes import NetworkProber
from xds_server.rollout.reads import PairBook, StepRead, read_step
from xds_server.rollout.scrapes import Scrapes, look_times
from xds_server.rollout.state import LIVE, RolloutState
from xds_server.rollout.waves import awaiting_confirmation
from xds_server.rollout.webhooks import (
    confirm_context,
    hook_context,
    run_confirm_hooks,
    run_webhooks,
)
from xds_server.spec import RolloutPlan, Service
from xds_server.traffic import WEIGHT_TOTAL, Split, TrafficState
from xds_server.xds.acks import ack_gate
from xds_server.xds.dataplane import DataPlane
from xds_server.xds.health_checks import envoy_health_check
from xds_server.xds.resources import cluster_name

log = logging.getLogger("xds_server.observe")

Seen = Callable[[str, Observation], bool]
"""Told each region's observation as it comes; True: enough seen, stop waiting."""


def comparator_pool(svc: Service, split: Split) -> str | None:
    """The pool the canary is compared with: baseline when it takes traffic (or shadow
    traffic), else production when that does; None when the canary takes it all."""
    if svc.has_baseline and (split.baseline or split.shadow):
        return "baseline"
    return "production" if split.production else None


def _probe_timeout(svc: Service) -> float:
    """The control plane's probes within the observation's budget (one interval)."""
    checks = [hc.timeout for p in svc.pools if (hc := svc.health_check(p)) is not None]
    return min([*checks, 1.0, max(svc.rollout.interval, 0.5) / 3])


def _unanswered(obs: Observation, budget: float) -> Observation:
    """A warming region waits on; a measured region gets numbers that say why it has none."""
    if obs.applied_at is None:
        return Observation(warmup_pending=(f"health not known within {budget:g}s",))
    nothing = Measurement(problem=f"no answer within {budget:g}s")
    return replace(obs, canary=nothing, step=Comparison(nothing, nothing, ""))


def _step_read(
    svc: Service,
    state: RolloutState,
    traffic: TrafficState,
    region: str,
    obs: Observation,
    now: float,
    scrapes: Scrapes | None = None,
) -> StepRead | None:
    """What to measure of a region whose step's clock runs; None when there is nothing to
    judge yet (not applied, or applied less than a second ago: half a scrape interval,
    when the region's last look told it).

    The step's clock starts when its Envoys applied it (`obs.applied_at`), which the
    look that starts the clock knows already: that look measures too. The guardrails'
    window is never shorter than two scrapes (`increase()` needs two samples: a shorter
    window reads nothing, and a canary failing from the step's first second would be
    seen a look later), so early in a step it reaches back to the last scrape before
    the step began, never further: at most one scrape interval of the same canary's
    requests at the previous weight, and never from before the rollout started."""
    rs = state.regions[region]
    started = rs.step_started if rs.step_started is not None else obs.applied_at
    soonest = 1.0 if scrapes is None else min(1.0, scrapes.interval / 2)
    if obs.applied_at is None or obs.apply_error or started is None or now - started < soonest:
        return None
    window = min(now - started, svc.rollout.window)
    if scrapes is not None:
        window = max(window, min(2 * scrapes.interval, now - started + scrapes.interval))
        # Never back past the rollout's own start: the canary cluster keeps its name
        # across versions, so before it lie the last rollout's requests (a fixed canary
        # redeployed seconds after a rollback was rolled back at 5% on the old one's
        # errors, 0.7 s after it started).
        window = min(window, now - state.started_at)
    split = traffic.effective(svc, region)
    return StepRead(
        svc,
        region,
        state.canary_version,
        comparator_pool(svc, split),
        started,
        now - started,
        window,
        split.canary / WEIGHT_TOTAL,
        rs.shadowing,
        {pool: split.get(pool) / WEIGHT_TOTAL for pool in ("production", "baseline", "canary")},
    )


class Observer:
    def __init__(
        self, dataplane: DataPlane, metrics: MetricSource, clock: Callable[[], float]
    ) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.clock = clock
        self._hooks: dict[tuple[str, str, str], asyncio.Future[str | None]] = {}
        """Warm-up webhook runs by (service, canary version, region): None when passed."""
        self._hook_threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook")
        self._pairs = PairBook()
        self._confirms: dict[tuple[str, str, int, int], asyncio.Future[str]] = {}
        """`confirm_step` runs by (service, canary version, wave, step)."""
        self.prober: HostProber = NetworkProber()
        """The control plane's own health probe of hosts (a test may swap it)."""
        self._production_passed: set[tuple[str, str, str]] = set()
        """(service, canary version, region) whose production hosts passed the check."""
        self._health = HealthBook()
        self._scrapes: dict[tuple[str, str], Scrapes] = {}
        """(service, region): when the samples its last look read were scraped."""
        self._stragglers: dict[tuple[str, str], dict[str, str]] = {}
        """(service, region): the stragglers its last look saw, node -> 'NODE (why)'
        (a change of the set is audited)."""
        self._read_after: dict[tuple[str, str], float] = {}
        """(service, region): how long after its next look starts that look reads it
        (just after its scrape lands)."""

    async def observe(
        self, svc: Service, state: RolloutState, traffic: TrafficState, seen: Seen
    ) -> dict[str, Observation]:
        """Every live region's observation, within one interval; a region whose queries
        are slower than that holds this interval (it has only its ACK state)."""
        now = self.clock()
        out, pending, last_read = self._start(svc, state, traffic, now)
        confirm = self._confirm(svc, state, now)
        budget = max(svc.rollout.interval, 0.5)
        try:
            if await self._collect(out, pending, seen, last_read + budget):
                return out
        finally:
            for task in pending:
                task.cancel()
        for region in pending.values():
            # No answer within the interval is no evidence, judged (and audited) as such:
            # the step holds, and its hold reaches max_hold by the clock.
            log.warning("%s %s: metrics did not answer within %gs", svc.name, region, budget)
            out[region] = _unanswered(out.get(region, Observation()), budget)
        answer = self._answer(confirm)
        if answer is not None:
            out = {region: replace(obs, confirmation=answer) for region, obs in out.items()}
        return out

    def _start(
        self, svc: Service, state: RolloutState, traffic: TrafficState, now: float
    ) -> tuple[dict[str, Observation], dict[asyncio.Task[Observation], str], float]:
        """What is known of each live region at once (its ACK state), and a task per
        region for what must be asked: a warming region's pools and webhooks, a judged
        region's measurements (read when its scrape lands, no later than the third
        value)."""
        out: dict[str, Observation] = {}
        pending: dict[asyncio.Task[Observation], str] = {}
        last_read = now
        for region, rs in state.regions.items():
            if rs.phase not in LIVE:
                continue
            if rs.warming and not rs.shadowing:
                if not rs.step_passed:  # else warm, waiting for the rest of its wave
                    pending[asyncio.create_task(self._warmup(svc, state, region))] = region
                continue
            obs = out[region] = self._straggler_note(
                svc.name, region, self.applied(region, svc.rollout, now)
            )
            if self.dataplane.pool_hosts(region, cluster_name(svc.name, "canary")) == 0:
                # Every host of the canary is gone (registered instances whose leases
                # ran out): the step holds, and fails at max_hold.
                out[region] = replace(obs, no_hosts=f"the canary has no host left in {region}")
                continue
            after = self._read_after.pop((svc.name, region), 0.0)
            when = now + min(after, svc.rollout.interval / 2)
            last_read = max(last_read, when)
            pending[asyncio.create_task(self._read(when, svc, state, traffic, region, obs))] = (
                region
            )
        return out, pending, last_read

    async def _read(
        self,
        when: float,
        svc: Service,
        state: RolloutState,
        traffic: TrafficState,
        region: str,
        obs: Observation,
    ) -> Observation:
        """A judged region's measurements, read at `when`: just after its Envoys' next
        scrape lands (scrapes.py), the first region's at the look's start."""
        if (wait := when - self.clock()) > 0:
            await asyncio.sleep(wait)  # the region's next scrape is queryable then
        now = self.clock()
        scrapes = self._scrapes.get((svc.name, region))
        at = _step_read(svc, state, traffic, region, obs, now, scrapes)
        return obs if at is None else await self._measure(at, obs)

    async def _collect(
        self,
        out: dict[str, Observation],
        pending: dict[asyncio.Task[Observation], str],
        seen: Seen,
        deadline: float,
    ) -> bool:
        """Tell `seen` each region's observation as it comes (into `out`; a finished
        task leaves `pending`), until every task is done or the deadline passes. True
        when `seen` said it had enough: the caller need wait for nothing more."""
        for region, obs in list(out.items()):
            if obs.apply_error and seen(region, obs):
                return True  # a NACK or an ACK timeout: no need to wait for queries
        while pending:
            done, _ = await asyncio.wait(
                pending,
                timeout=max(0.0, deadline - self.clock()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                break
            for task in done:
                region = pending.pop(task)
                out[region] = task.result()
                if seen(region, out[region]):
                    return True
        return False

    def _confirm(
        self, svc: Service, state: RolloutState, now: float
    ) -> tuple[str, str, int, int] | None:
        """Start asking the `confirm_step` hooks when the wave waits on them (once per
        step; a refusal is asked again the next interval, as Flagger's confirm hooks)."""
        if not awaiting_confirmation(svc.rollout, state, now):
            return None
        wave = svc.rollout.wave_list(tuple(state.regions))[state.wave]
        live = [r for r in wave if state.regions[r].phase in LIVE]
        step = state.regions[live[0]].step
        key = (svc.name, state.canary_version, state.wave, step)
        if key not in self._confirms:
            context = confirm_context(svc, state, live, step)
            self._confirms[key] = asyncio.ensure_future(
                asyncio.get_running_loop().run_in_executor(
                    self._hook_threads, run_confirm_hooks, svc.rollout.confirm_step, context
                )
            )
        return key

    def _answer(self, key: tuple[str, str, int, int] | None) -> str | None:
        """The hooks' answer once they have all answered (and forgotten then, so that a
        refusal is asked again); None while they run."""
        if key is None or (run := self._confirms.get(key)) is None or not run.done():
            return None
        del self._confirms[key]
        if run.exception() is not None:
            return f"could not be asked: {run.exception()!r}"
        return run.result()

    def applied(self, region: str, plan: RolloutPlan, now: float) -> Observation:
        """Has the region's quorum of Envoys (`ack_quorum`) ACKed the routes that carry
        the current weights, each within `ack_timeout` of its own send (`xds.acks`)?
        Nodes not applied are left out of the analysis where the source can
        (`NodeFilter`); those that missed the step are the observation's stragglers;
        its `nodes` are the applied / unknown / lagging counts (signal health). Nodes
        nobody can see (unknown) never fail the step: a quorum that needs them is
        `apply_unknown`, a hold that `max_hold` ends (`decide._unknown_hold`)."""
        status = self.dataplane.routes_applied(region)
        gate = ack_gate(status, plan.ack_quorum, plan.nack_tolerance, plan.ack_timeout, now)
        if isinstance(self.metrics, NodeFilter):
            self.metrics.exclude_nodes(region, gate.excluded)
        if gate.error is not None:
            return Observation(
                apply_error=gate.error, stragglers=gate.stragglers, nodes=status.counts
            )
        # Not known to route by the step's weights: no evidence, neither way.
        return Observation(
            applied_at=gate.applied_at,
            apply_unknown=gate.unknown,
            stragglers=gate.stragglers,
            nodes=status.counts,
        )

    def stragglers(self, service: str, region: str) -> tuple[str, ...]:
        """The region's stragglers as the service's last look saw them, 'NODE (why)'
        (the admin API and the dashboard show them while the rollout is live)."""
        return tuple(self._stragglers.get((service, region), {}).values())

    def _straggler_note(self, service: str, region: str, obs: Observation) -> Observation:
        """`obs` with the audit's note when the region's stragglers changed since the
        last look (named, and who rejoined)."""
        now = {s.partition(" (")[0]: s for s in obs.stragglers}
        before = set(self._stragglers.get((service, region), {}))
        self._stragglers[(service, region)] = now
        if set(now) == before:
            return obs
        back = sorted(before - set(now))
        parts = [f"stragglers: {', '.join(now.values())}" if now else "stragglers: none"]
        if back:
            parts.append(f"rejoined: {', '.join(back)}")
        return replace(obs, stragglers_changed="; ".join(parts))

    async def _measure(self, at: StepRead, obs: Observation) -> Observation:
        """The canary over the sliding window (guardrails) and, over the whole step, the
        canary and its comparator (analysis); then what else the plan reads (reads.py)."""
        svc, region, pool = at.svc, at.region, at.comparator
        plan = svc.rollout.for_shadow() if at.shadowing else svc.rollout
        buckets = plan.needs_latency_buckets
        canary = cluster_name(svc.name, "canary")
        jobs = [
            self.metrics.measure(plan, region, canary, at.window),
            self.metrics.measure(plan, region, canary, at.step_age, p99=False, buckets=buckets),
        ]
        if pool is not None:
            jobs.append(
                self.metrics.measure(
                    plan, region, cluster_name(svc.name, pool), at.step_age, buckets=buckets
                )
            )
        results = await asyncio.gather(*jobs)
        comparison = Comparison(results[1], results[2] if pool else None, pool or "")
        window, comparison = await read_step(self.metrics, at, self._pairs, results[0], comparison)
        scrapes = Scrapes.of(comparison.signals, self.clock())
        if scrapes is None:
            self._scrapes.pop((svc.name, region), None)
        else:
            self._scrapes[(svc.name, region)] = scrapes
        return replace(obs, canary=window, step=comparison)

    def next_look(self, service: str, regions: Iterable[str], due: float, interval: float) -> float:
        """When the controller should look at `service` next: when the first of
        `regions` is to be read, each just after its Envoys' next scrape lands
        (scrapes.py, from its last look), or at `due` when that is not known."""
        regions = list(regions)
        known = {r: s for r in regions if (s := self._scrapes.get((service, r))) is not None}
        times = {r: due for r in regions} | look_times(due, interval, known)
        start = min(times.values(), default=due)
        for region, when in times.items():
            self._read_after[(service, region)] = when - start
        return start

    async def _warmup(self, svc: Service, state: RolloutState, region: str) -> Observation:
        """What keeps a warming region's pools from shadow traffic or their first step.
        First of all, production's hosts must pass the check: else it is misconfigured."""
        key = (svc.name, state.canary_version, region)
        if key not in self._production_passed:
            failed = await production_fails(self.prober, svc, region, _probe_timeout(svc))
            if failed:
                return Observation(warmup_error=failed)
            self._production_passed.add(key)
        waiting = await self._unhealthy_pools(svc, region)
        if svc.rollout.warmup.webhooks and not waiting:
            run = self._webhooks(svc, state, region)
            if not run.done():
                waiting.append("warm-up webhooks running")
            elif run.exception() is not None:
                return Observation(warmup_error=f"warm-up webhooks failed: {run.exception()!r}")
            elif run.result():
                return Observation(warmup_error=run.result())
        return Observation(warmup_pending=tuple(waiting))

    async def _unhealthy_pools(self, svc: Service, region: str) -> list[str]:
        plan = svc.rollout
        waiting: list[str] = []
        for pool in ("canary", "baseline"):
            hosts = self.dataplane.pool_hosts(region, cluster_name(svc.name, pool))
            if pool in svc.pools and hosts == 0:
                waiting.append(f"{pool}: no registered host in {region} yet")
        if waiting:
            return waiting
        timeout = _probe_timeout(svc)
        for pool in ("canary", "baseline"):
            if pool not in svc.pools or svc.health_check(pool) is None:
                continue
            why = ""
            if envoy_health_check(svc, pool) is None:  # a check only the control plane asks
                hosts, ok, why = await self._health.check(
                    self.prober, svc, pool, region, timeout, self.clock()
                )
                total, healthy = float(hosts), float(ok)
            else:
                try:
                    total, healthy = await self.metrics.pool_health(
                        plan, region, cluster_name(svc.name, pool)
                    )
                except Exception as exc:  # unreachable, rejected, or an unreadable answer
                    waiting.append(f"{pool} health unknown: {exc}")
                    continue
                if total and healthy < plan.warmup.min_healthy * total:
                    # Envoy says how many; the control plane asks the hosts why.
                    why = await why_unhealthy(self.prober, svc, pool, region, timeout)
            if total == 0:
                waiting.append(f"{pool}: no hosts in the region's Envoys yet")
            elif healthy < plan.warmup.min_healthy * total:
                cause = f" ({why})" if why else ""
                waiting.append(f"{pool}: {healthy:.0f} of {total:.0f} hosts healthy{cause}")
        return waiting

    def _webhooks(
        self, svc: Service, state: RolloutState, region: str
    ) -> asyncio.Future[str | None]:
        """The region's webhook run, started once. Hooks (smoke tests, cache primers) run
        against healthy pools only, in threads of their own: a slow hook must not take a
        thread a measurement needs."""
        key = (svc.name, state.canary_version, region)
        run = self._hooks.get(key)
        if run is None:
            context = hook_context(svc, state, region)
            run = self._hooks[key] = asyncio.ensure_future(
                asyncio.get_running_loop().run_in_executor(
                    self._hook_threads, run_webhooks, svc.rollout.warmup.webhooks, context
                )
            )
        return run

    def forget_failed_webhooks(self, service: str) -> None:
        """A webhook that blocked the warm-up runs again (after a resume), and the hosts
        the control plane checks itself start over."""
        self._health.forget(service)
        for key in [k for k, run in self._hooks.items() if k[0] == service]:
            run = self._hooks[key]
            if run.done() and (run.exception() is not None or run.result()):
                del self._hooks[key]
