"""What the judge reads and what it returns: one pool's numbers (`Measurement`), canary
and comparator over a step (`Comparison`), and the `Verdict` with its guardrail `Check`s
and analysis `MetricResult`s. Plain records, light to import (the audit log, xdsctl and
the notifications read them without the statistics behind the judge)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from xds_server.spec import NoDataRule


class Outcome(StrEnum):
    """A verdict on one region's canary."""

    PASS = "pass"
    FAIL = "fail"
    NO_DATA = "no_data"
    MARGINAL = "marginal"


class MetricClass(StrEnum):
    """How one analysis metric came out (Kayenta's classes)."""

    PASS = "pass"
    HIGH = "high"
    LOW = "low"
    NO_DATA = "no_data"


PASS, FAIL, NO_DATA, MARGINAL = Outcome.PASS, Outcome.FAIL, Outcome.NO_DATA, Outcome.MARGINAL
HIGH, LOW = MetricClass.HIGH, MetricClass.LOW


@dataclass(frozen=True)
class MetricReading:
    """A user metric's reading for one pool: two counts (ratio), a value, or a histogram
    (distribution, output)."""

    numerator: float | None = None
    denominator: float | None = None
    value: float | None = None
    buckets: tuple[tuple[float, float], ...] | None = None
    pairs: tuple[tuple[float, float], ...] = ()
    """value: the step's per-interval (canary, comparator) readings so far."""
    problem: str | None = None


@dataclass(frozen=True)
class Throughput:
    """Over the step: what the canary delivered (completed, non-5xx) of every request the
    service's pools were sent in the region, and the canary's share of the weight."""

    delivered: float | None
    requests: float | None
    share: float
    sent: float | None = None
    """Requests Envoy sent the canary over the step (None: not known): when known, the
    guardrail is delivered vs sent, the canary's own doing, apart from the split (SRM)."""


@dataclass(frozen=True)
class Signals:
    """Whether one region's evidence can be trusted this interval (issue 27): how fresh
    Prometheus's samples of the region's Envoys are, whether every Envoy target is up,
    whether a counter restarted within the step, and the requests Envoy routed to each
    pool (for the sample-ratio mismatch test) against the configured shares."""

    age_s: float | None = None
    """Age of the oldest target's newest sample (seconds); None: no sample at all."""
    scrape_interval: float | None = None
    """Prometheus's scrape interval for Envoy's stats: stale is older than two."""
    targets: int = 0
    """The region's Envoy targets Prometheus scraped recently."""
    targets_up: int = 0
    resets: int = 0
    """Counter resets of the service's Envoy series within the step."""
    problem: str = ""
    """Why the region's numbers are no evidence (stale, partial, reset, unreadable);
    "" when fresh."""
    sent: Mapping[str, float] = field(default_factory=dict)
    """Requests Envoy's routers sent each pool over the step (retries not counted twice)."""
    configured: Mapping[str, float] = field(default_factory=dict)
    """Each pool's configured share of the service's requests (0-1)."""
    srm_p: float | None = None
    """The sample-ratio mismatch test's always-valid p-value (the judge fills it in)."""
    srm_skipped: str = ""
    """Why no sample-ratio test ran ("" when it did, or could not for lack of data)."""

    @property
    def canary_share(self) -> float | None:
        """The canary's share of the requests routed to the service's pools."""
        total = sum(self.sent.values())
        return self.sent.get("canary", 0.0) / total if total > 0 else None


@dataclass(frozen=True)
class Measurement:
    """One pool's numbers in one region over a window."""

    requests: float | None = None
    errors: float | None = None
    p99_ms: float | None = None
    problem: str | None = None
    """Why the numbers could not be read (Prometheus unreachable, a query error)."""
    latency_buckets: tuple[tuple[float, float], ...] | None = None
    """Request-time histogram, cumulative (upper bound in ms, count), +inf last."""
    readings: Mapping[str, MetricReading] = field(default_factory=dict)
    """The user metrics' readings, by metric name."""
    tenants: Mapping[str, Measurement] = field(default_factory=dict)
    """Per tenant (the canary over the window): requests, errors, p99."""
    client_errors: float | None = None
    """Answers that blame the caller (4xx; gRPC's caller-class statuses): read when a
    `client_errors` metric judges them; None reads as none, as `errors` does."""

    @property
    def error_rate(self) -> float | None:
        requests = finite(self.requests)
        if not requests:
            return None
        return (finite(self.errors) or 0.0) / requests


@dataclass(frozen=True)
class Comparison:
    """Canary and comparator over the whole step so far: what the analysis judges."""

    canary: Measurement
    comparator: Measurement | None
    comparator_pool: str
    """`baseline` or `production`; None comparator: no pool to compare with this step."""
    throughput: Throughput | None = None
    signals: Signals | None = None
    """Freshness, targets and routed requests of the region (None: not read)."""


@dataclass(frozen=True)
class Check:
    metric: str
    value: float
    limit: float
    ok: bool
    floor: bool = False
    """The limit is a floor (a minimum), not a ceiling."""

    def describe(self) -> str:
        op = (">=" if self.ok else "<") if self.floor else ("<=" if self.ok else ">")
        return f"{self.metric} {self.value:.4g} {op} limit {self.limit:.4g}"


@dataclass(frozen=True)
class MetricResult:
    name: str
    classification: MetricClass
    effect: float | None
    p_value: float | None
    detail: str
    group: str
    critical: bool
    on_no_data: NoDataRule
    alpha: float = 0.0
    """The p-value at or below which this metric is a regression (its share of the
    false-alarm level)."""


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str
    checks: tuple[Check, ...] = ()
    metrics: tuple[MetricResult, ...] = ()
    score: float | None = None
    conclusive: bool = False
    """A failure that needs no second look (the analysis's sequential tests)."""
    untrusted: str = ""
    """Why the evidence itself cannot be judged (a sample-ratio mismatch, stale or
    partial series): the step holds, and at max_hold the rollout pauses for an operator
    (not the canary's fault: never a rollback)."""
    signals: Signals | None = None
    """The region's signal health as judged (with the SRM p-value)."""

    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)

    @property
    def pause_requested(self) -> bool:
        """A metric without data whose rule for that is to pause (the state machine asks
        only once the hold has reached max_hold); untrusted evidence always pauses."""
        return bool(self.untrusted) or any(
            m.classification == MetricClass.NO_DATA and m.on_no_data == NoDataRule.PAUSE
            for m in self.metrics
        )


def finite(v: float | None) -> float | None:
    """A number, or None for none, NaN and infinities."""
    return None if v is None or math.isnan(v) or math.isinf(v) else float(v)
