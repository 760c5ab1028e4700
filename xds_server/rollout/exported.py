"""What the rollout engine exports on `/metrics`: weights, phases, steps, verdicts,
decisions (a `TrafficSink` of committed views) and the state store's health."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from xds_server.rollout.commits import StoreHealth
from xds_server.rollout.decide import Decision, EntryKind
from xds_server.rollout.ports import Committed
from xds_server.rollout.state import LIVE, PHASE_GAUGES, PROGRESSING
from xds_server.spec import POOL_NAMES, MeshSpec
from xds_server.traffic import TrafficState


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.weight = Gauge(
            "xds_traffic_weight_percent",
            "Share of a service's traffic per pool",
            ["service", "region", "pool"],
            registry=r,
        )
        self.phase = Gauge(
            "xds_rollout_phase",
            "1 for the rollout's current phase",
            ["service", "phase"],
            registry=r,
        )
        self.step = Gauge(
            "xds_rollout_step",
            "Current step index per region (-1: not started)",
            ["service", "region"],
            registry=r,
        )
        self.score = Gauge(
            "xds_rollout_score",
            "The canary analysis score (0-100) of a region's latest verdict",
            ["service", "region"],
            registry=r,
        )
        self.metric_results = Counter(
            "xds_rollout_metric_results",
            "Canary analysis metric classifications (pass, high, low, no_data)",
            ["service", "metric", "classification"],
            registry=r,
        )
        self.decisions = Counter(
            "xds_rollout_decisions",
            "Rollout decisions by outcome",
            ["service", "outcome"],
            registry=r,
        )
        self.signals = SignalMetrics(r)
        self.store = StoreMetrics(r)

    def set_weights(self, traffic: TrafficState, spec: MeshSpec) -> None:
        for service in spec.services:
            for region in spec.regions:
                split = traffic.split(service.name, region).percent()
                for pool in POOL_NAMES:
                    self.weight.labels(service.name, region, pool).set(split[pool])

    def follow(self, event: Committed) -> None:
        """The `TrafficSink`: weights, phase, steps and decisions of a committed view."""
        self.set_weights(event.traffic, event.spec)
        state = event.state
        if state is None or event.decision is None:
            return
        for phase in PHASE_GAUGES:
            self.phase.labels(state.service, phase).set(1 if state.phase == phase else 0)
        for region, rs in state.regions.items():
            self.step.labels(state.service, region).set(rs.step)
        self.signals.follow(state.service, event.decision)
        for t in event.decision.transitions:
            outcome = str(
                t.verdict.outcome if t.kind == EntryKind.CHECK and t.verdict else t.phase_to
            )
            if (
                t.kind == EntryKind.TRANSITION
                and t.step_to != t.step_from
                and t.phase_to == PROGRESSING
            ):
                outcome = "advance"
            self.decisions.labels(state.service, outcome).inc()
            if t.verdict is not None and t.region is not None:
                if t.verdict.score is not None:
                    self.score.labels(state.service, t.region).set(t.verdict.score)
                for m in t.verdict.metrics:
                    self.metric_results.labels(state.service, m.name, m.classification).inc()


class SignalMetrics:
    """Signal health per service and region (issue 27): the data plane's nodes on the
    current routes, the evidence's age, Prometheus's Envoy targets, the sample-ratio
    test's p-value, and whether the region's evidence is trusted."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        labels = ["service", "region"]
        self.nodes = Gauge(
            "xds_rollout_signal_nodes",
            "A region's data-plane nodes on the current routes, by state "
            "(applied, unknown: replica gone or silent, lagging: not ACKed yet)",
            [*labels, "state"],
            registry=r,
        )
        self.stragglers = Gauge(
            "xds_stragglers",
            "A region's stragglers (issue 28): nodes past ack_timeout without ACKing the "
            "step's routes, or NACKing within nack_tolerance, while the ack_quorum holds; "
            "left out of the analysis (0 once the region's rollout is over)",
            labels,
            registry=r,
        )
        self.age = Gauge(
            "xds_rollout_signal_evidence_age_seconds",
            "Age of the oldest Envoy target's newest sample in Prometheus",
            labels,
            registry=r,
        )
        self.targets = Gauge(
            "xds_rollout_signal_targets",
            "The region's Envoy targets Prometheus scrapes, by state (up, down)",
            [*labels, "state"],
            registry=r,
        )
        self.srm_p = Gauge(
            "xds_rollout_signal_srm_p_value",
            "The sample-ratio mismatch test's always-valid p-value over the step",
            labels,
            registry=r,
        )
        self.trusted = Gauge(
            "xds_rollout_signal_trusted",
            "1 while a region's evidence is fresh and its split as configured, 0 while "
            "its step holds on untrusted evidence (stale, partial, reset, SRM)",
            labels,
            registry=r,
        )

    def follow(self, service: str, decision: Decision) -> None:
        for region, obs in decision.observations.items():
            if obs.nodes is not None:
                for state, n in zip(("applied", "unknown", "lagging"), obs.nodes, strict=True):
                    self.nodes.labels(service, region, state).set(n)
                self.stragglers.labels(service, region).set(len(obs.stragglers))
        for region, rs in decision.state.regions.items():
            if rs.phase not in LIVE:  # (promoted, rolled back: no step, no straggler)
                self.stragglers.labels(service, region).set(0)
        for t in decision.transitions:
            if t.region is None or t.verdict is None or t.verdict.signals is None:
                continue
            s = t.verdict.signals
            if s.age_s is not None:
                self.age.labels(service, t.region).set(s.age_s)
            self.targets.labels(service, t.region, "up").set(s.targets_up)
            self.targets.labels(service, t.region, "down").set(s.targets - s.targets_up)
            if s.srm_p is not None:
                self.srm_p.labels(service, t.region).set(s.srm_p)
            self.trusted.labels(service, t.region).set(0 if t.verdict.untrusted else 1)


class StoreMetrics:
    """The state store's health, as the controller's `CommitLog` reports it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._failures_seen = 0
        self.writable = Gauge(
            "xds_store_writable",
            "1 while the rollout state store accepts writes, 0 while they fail",
            registry=registry,
        )
        self.writable.set(1)
        self.failures = Counter(
            "xds_store_write_failures",
            "Failed writes to the rollout state store (retries included)",
            registry=registry,
        )
        self.unsaved = Gauge(
            "xds_store_unsaved_rollbacks",
            "Rollbacks pushed to the data plane but not yet committed to the store",
            registry=registry,
        )

    def on_health(self, health: StoreHealth) -> None:
        self.writable.set(1 if health.ok else 0)
        self.unsaved.set(health.unsaved_rollbacks)
        grown = health.failed_writes - self._failures_seen
        if grown > 0:
            self.failures.inc(grown)
            self._failures_seen = health.failed_writes
