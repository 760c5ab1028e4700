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

    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)

    @property
    def pause_requested(self) -> bool:
        """A metric without data whose rule for that is to pause (the state machine asks
        only once the hold has reached max_hold)."""
        return any(
            m.classification == MetricClass.NO_DATA and m.on_no_data == NoDataRule.PAUSE
            for m in self.metrics
        )


def finite(v: float | None) -> float | None:
    """A number, or None for none, NaN and infinities."""
    return None if v is None or math.isnan(v) or math.isinf(v) else float(v)
