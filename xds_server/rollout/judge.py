"""Judging one region's canary against the SLA guardrails. Pure: no I/O, no clock.

The outcome is `pass`, `fail` or `no_data`. Missing or unusable numbers are never a
pass: too few requests, a failed query or a NaN all mean "no evidence", and the caller
holds. Every check records the measured value and its limit, so an audit entry can say
exactly which guardrail failed and by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xds_server.rollout.plan import Guardrails

PASS, FAIL, NO_DATA = "pass", "fail", "no_data"


@dataclass(frozen=True)
class Measurement:
    """One pool's numbers in one region over the analysis window."""

    requests: float | None = None
    errors: float | None = None
    p99_ms: float | None = None
    problem: str | None = None
    """Why the numbers could not be read (Prometheus unreachable, a query error)."""

    @property
    def error_rate(self) -> float | None:
        requests = _num(self.requests)
        if not requests:
            return None
        return (_num(self.errors) or 0.0) / requests

    def as_dict(self) -> dict[str, float | str | None]:
        return {
            "requests": _num(self.requests),
            "errors": _num(self.errors),
            "error_rate": _num(self.error_rate),
            "p99_ms": _num(self.p99_ms),
            "problem": self.problem,
        }


@dataclass(frozen=True)
class Check:
    metric: str
    value: float
    limit: float
    ok: bool

    def describe(self) -> str:
        op = "<=" if self.ok else ">"
        return f"{self.metric} {self.value:.4g} {op} limit {self.limit:.4g}"


@dataclass(frozen=True)
class Verdict:
    outcome: str
    reason: str
    checks: tuple[Check, ...] = ()

    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)


def judge(g: Guardrails, canary: Measurement, baseline: Measurement | None) -> Verdict:
    if canary.problem:
        return Verdict(NO_DATA, f"canary metrics unavailable: {canary.problem}")
    requests = _num(canary.requests)
    if requests is None or requests < g.min_requests:
        got = "none" if requests is None else f"{requests:.0f}"
        return Verdict(
            NO_DATA, f"too few canary requests in the window: {got} (need {g.min_requests})"
        )
    rate = canary.error_rate or 0.0
    checks = [Check("error_rate", rate, g.max_error_rate, rate <= g.max_error_rate)]
    p99 = _num(canary.p99_ms)
    if p99 is None:
        return Verdict(NO_DATA, "canary latency p99 unavailable", tuple(checks))
    checks.append(Check("p99_ms", p99, g.max_p99_ms, p99 <= g.max_p99_ms))
    base_requests = _num(baseline.requests) if baseline and not baseline.problem else None
    if baseline is not None and base_requests is not None and base_requests >= g.min_requests:
        if g.max_error_rate_increase is not None:
            increase = rate - (baseline.error_rate or 0.0)
            checks.append(
                Check(
                    "error_rate_increase",
                    increase,
                    g.max_error_rate_increase,
                    increase <= g.max_error_rate_increase,
                )
            )
        base_p99 = _num(baseline.p99_ms)
        if g.max_p99_ratio is not None and base_p99 and p99 > g.p99_ratio_floor_ms:
            ratio = p99 / base_p99
            checks.append(Check("p99_ratio", ratio, g.max_p99_ratio, ratio <= g.max_p99_ratio))
    failed = [c for c in checks if not c.ok]
    if failed:
        return Verdict(FAIL, "; ".join(c.describe() for c in failed), tuple(checks))
    return Verdict(PASS, f"within guardrails ({requests:.0f} requests)", tuple(checks))


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) or math.isinf(v) else float(v)
