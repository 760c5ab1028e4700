"""The statistics behind the canary judge. Pure functions of counts: no I/O, no clock.

Both tests are *sequential*: the controller looks at the growing data of a step every
interval, and a test that is simply re-run at a fixed level would raise false alarms
with every look. Each test here gives a likelihood ratio against "no regression" that is
a (super)martingale under that hypothesis, so by Ville's inequality the chance that it
*ever* reaches 1/alpha over all looks of a step is at most alpha. Its reciprocal is an
always-valid p-value.

- Error counts: given the total number of errors in canary and comparator, each error is
  the canary's with a probability fixed by the two pools' request counts and the rate
  ratio. That is a binomial in the ratio alone, whatever the base error rate, and it
  counts requests rather than averaging per-interval ratios, so sparse data is weighed
  for what it is. The alternative is a mixture over ratios above the allowed one.
- Latency: Mann-Whitney U over the two request-time histograms (ties inside a bucket
  count one half), standardised, with a normal mixture over the effect (Robbins' mixture
  sequential probability ratio test, as used by always-valid A/B testing).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.special import betaincinv

# Alternatives for the error-ratio mixture: ratio0 * 2**(k/4), up to 16 times ratio0.
_RATIO_STEPS = tuple(2 ** (k / 4) for k in range(1, 17))
_LATENCY_TAU = 0.1
"""Prior scale of the Mann-Whitney effect (probability of superiority - 1/2)."""


@dataclass(frozen=True)
class TestResult:
    effect: float | None
    """Canary over comparator: error-rate ratio, or latency ratio at the chosen quantile."""
    p_value: float
    """Always-valid: 1 / the largest likelihood ratio in the bad direction(s), at most 1."""
    significant: bool
    upper: float | None = None
    """errors: upper confidence bound of the rate ratio (None when unbounded)."""
    canary_rate_upper: float | None = None
    """errors: upper confidence bound of the canary's own error rate."""
    higher: bool | None = None
    """Which way the test saw the canary move (None: judge by the effect)."""


def error_ratio_test(
    canary_errors: float,
    canary_requests: float,
    base_errors: float,
    base_requests: float,
    allowed_ratio: float,
    confidence: float,
    increase_is_bad: bool = True,
    decrease_is_bad: bool = False,
    alpha: float | None = None,
) -> TestResult:
    """Is the canary's error rate above (or below) `allowed_ratio` times the comparator's?

    `alpha`: the level at which a regression is declared (default 1 - confidence);
    `confidence` also sets the upper bounds that let an error metric pass."""
    # Counts from PromQL's increase() are extrapolated, not whole: round half up.
    xc, xb = math.floor(max(canary_errors, 0) + 0.5), math.floor(max(base_errors, 0) + 0.5)
    nc, nb = max(canary_requests, float(xc)), max(base_requests, float(xb))
    alpha = 1 - confidence if alpha is None else alpha
    sides = int(increase_is_bad) + int(decrease_is_bad)
    log_lr = -math.inf
    if increase_is_bad:
        log_lr = max(log_lr, _ratio_mixture_log_lr(xc, xb, nc, nb, allowed_ratio))
    if decrease_is_bad:
        log_lr = max(log_lr, _ratio_mixture_log_lr(xb, xc, nb, nc, allowed_ratio))
    p = min(1.0, max(sides, 1) * math.exp(-log_lr)) if log_lr > 0 else 1.0
    effect = ((xc + 0.5) / nc) / ((xb + 0.5) / nb) if nc > 0 and nb > 0 else None
    upper = None
    if xc + xb > 0 and nc > 0 and nb > 0:
        pi_up = binomial_upper(xc, xc + xb, confidence)
        upper = None if pi_up >= 1 else pi_up / (1 - pi_up) * nb / nc
    rate_up = binomial_upper(xc, round(nc), confidence) if nc >= 1 else None
    return TestResult(effect, p, sides > 0 and p <= alpha, upper, rate_up)


def _ratio_mixture_log_lr(x: int, y: int, nx: float, ny: float, ratio0: float) -> float:
    """Log of the mixture likelihood ratio of 'x's rate is above ratio0 times y's', given
    the x + y events. Kept in logs: overwhelming evidence must not overflow."""
    if x + y == 0 or nx <= 0 or ny <= 0:
        return -math.inf
    pi0 = ratio0 * nx / (ratio0 * nx + ny)
    logs = []
    for step in _RATIO_STEPS:
        r = ratio0 * step
        pi = r * nx / (r * nx + ny)
        logs.append(x * math.log(pi / pi0) + y * math.log((1 - pi) / (1 - pi0)))
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs) / len(logs))


def binomial_upper(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on a binomial proportion (k of n)."""
    if n <= 0 or k >= n:
        return 1.0
    return float(betaincinv(k + 1, n - k, confidence))


# ---- latency ----


Buckets = Sequence[tuple[float, float]]
"""Cumulative histogram: (upper bound, requests at or below it), ascending, +inf last."""


def bucket_counts(buckets: Buckets) -> tuple[list[float], list[float]]:
    """Cumulative (le, count) pairs -> bounds and per-bucket counts (never negative)."""
    bounds, counts, prev = [], [], 0.0
    for le, cum in sorted(buckets, key=lambda b: b[0]):
        bounds.append(le)
        counts.append(max(0.0, cum - prev))
        prev = max(prev, cum)
    return bounds, counts


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """Linear interpolation inside the bucket, as PromQL's histogram_quantile does."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen, lower = q * total, 0.0, 0.0
    for le, c in zip(bounds, counts, strict=True):
        if c > 0 and seen + c >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - seen) / c
        seen += c
        if not math.isinf(le):
            lower = le
    return lower


def latency_test(
    canary: Buckets,
    base: Buckets,
    q: float,
    allowed_ratio: float,
    confidence: float,
    increase_is_bad: bool = True,
    decrease_is_bad: bool = False,
    alpha: float | None = None,
) -> TestResult:
    """Mann-Whitney U on two histograms, against "no worse than `allowed_ratio`".

    `alpha`: the level at which a regression is declared (default 1 - confidence).

    The null hypothesis is the allowed change itself: the canary's request times are
    divided by `allowed_ratio` (multiplied, for a decrease) before they are ranked
    against the comparator's, so a canary 5% slower under a 10% allowance is not a
    regression however much data there is. The ratio of the q-quantiles must also be
    beyond `allowed_ratio`, as in Kayenta's judge.
    """
    cb, cc = bucket_counts(canary)
    bb, bc = bucket_counts(base)
    if cb != bb:  # different bounds: align on the union, counts at missing bounds are 0
        bounds = sorted(set(cb) | set(bb))
        cc = [dict(zip(cb, cc, strict=True)).get(b, 0.0) for b in bounds]
        bc = [dict(zip(bb, bc, strict=True)).get(b, 0.0) for b in bounds]
        cb = bb = bounds
    n1, n2 = sum(cc), sum(bc)
    qc, qb = quantile(cb, cc, q), quantile(bb, bc, q)
    effect = qc / qb if qc is not None and qb else None
    if n1 < 1 or n2 < 1:
        return TestResult(effect, 1.0, False)
    sides = int(increase_is_bad) + int(decrease_is_bad)
    up = down = -math.inf
    if increase_is_bad:
        theta, var = _rank_effect(_scaled(cb, cc, allowed_ratio), bc)
        if theta > 0 and var > 0:
            up = normal_mixture_log_lr(theta, var, _LATENCY_TAU)
    if decrease_is_bad:
        theta, var = _rank_effect(_scaled(cb, cc, 1 / allowed_ratio), bc)
        if theta < 0 and var > 0:
            down = normal_mixture_log_lr(theta, var, _LATENCY_TAU)
    slower = up >= down
    log_lr = max(up, down)
    beyond = effect is not None and (
        (slower and effect > allowed_ratio) or (not slower and effect < 1 / allowed_ratio)
    )
    p = min(1.0, sides * math.exp(-log_lr)) if log_lr > 0 else 1.0
    significant = beyond and p <= (1 - confidence if alpha is None else alpha)
    return TestResult(effect, p, significant, higher=slower if log_lr > -math.inf else None)


def _scaled(bounds: Sequence[float], counts: Sequence[float], factor: float) -> list[float]:
    """Per-bucket counts of the request times divided by `factor`, on the same bounds
    (linear inside each bucket, as histogram_quantile assumes)."""
    if factor == 1:
        return list(counts)
    cum, total, points = 0.0, sum(counts), [(0.0, 0.0)]
    for le, c in zip(bounds, counts, strict=True):
        cum += c
        if not math.isinf(le):
            points.append((le, cum))

    def cdf(x: float) -> float:  # the original histogram's count at or below x
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            if x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
        return points[-1][1]

    out, prev = [], 0.0
    for le in bounds:
        at = total if math.isinf(le) else min(total, cdf(le * factor))
        out.append(max(0.0, at - prev))
        prev = max(prev, at)
    return out


def _rank_effect(cc: Sequence[float], bc: Sequence[float]) -> tuple[float, float]:
    """Probability of superiority minus 1/2 (ties count half), and its variance under the
    null of no difference, with the tie correction."""
    n1, n2 = sum(cc), sum(bc)
    u, below = 0.0, 0.0
    for c, b in zip(cc, bc, strict=True):
        u += c * (below + b / 2)
        below += b
    n = n1 + n2
    ties = sum((c + b) ** 3 - (c + b) for c, b in zip(cc, bc, strict=True))
    var_u = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1) if n > 1 else 1))
    return u / (n1 * n2) - 0.5, var_u / (n1 * n2) ** 2


def tail_counts(
    canary: Buckets, base: Buckets, q: float
) -> tuple[float, float, float, float, float]:
    """Requests slower than the pooled q-quantile's bucket bound, on each side.

    The bound comes from both pools together, so under "no difference" neither side is
    favoured by how it was chosen. Returns (bound, canary slow, canary total, comparator
    slow, comparator total); the bound is inf when no finite bucket holds the quantile.
    """
    cb, cc = bucket_counts(canary)
    bb, bc = bucket_counts(base)
    c_at = dict(zip(cb, cc, strict=True))
    b_at = dict(zip(bb, bc, strict=True))
    bounds = sorted(set(cb) | set(bb))
    n1, n2 = sum(cc), sum(bc)
    total, bound = n1 + n2, math.inf
    c_below = b_below = 0.0
    for le in bounds:
        c_below += c_at.get(le, 0.0)
        b_below += b_at.get(le, 0.0)
        seen = c_below + b_below
        if not math.isinf(le) and total > 0 and seen >= q * total:
            bound = le
            break
    if math.isinf(bound):
        return bound, 0.0, n1, 0.0, n2
    return bound, n1 - c_below, n1, n2 - b_below, n2


def normal_mixture_log_lr(theta: float, var: float, tau: float) -> float:
    """Log likelihood ratio of an N(0, tau^2) mixture of effects against 0, for an estimate
    `theta` with variance `var` (the mixture sequential probability ratio test)."""
    t2 = tau * tau
    return 0.5 * math.log(var / (var + t2)) + t2 * theta * theta / (2 * var * (var + t2))
