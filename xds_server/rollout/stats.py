"""The statistics behind the canary judge. Pure functions of counts: no I/O, no clock.

The tests are *sequential*: the controller looks at the growing data of a step every
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
- Model output: the population stability index of two histograms, significant when an
  e-value (universal inference: Dirichlet-multinomial mixtures over the pooled MLE)
  rejects "one distribution for both".
- Custom values read per interval: the mean log ratio canary / comparator, with the same
  normal mixture on a plug-in variance.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import betaincinv, gammaln

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
    return _log_mean_exp(logs)


def _log_mean_exp(logs: Sequence[float]) -> float:
    """log(mean(exp(logs))), without overflow."""
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs) / len(logs))


def share_below_test(successes: float, trials: float, share0: float, alpha: float) -> bool:
    """Do `successes` of `trials` rule out a success probability of `share0` or more?
    A mixture likelihood ratio over alternatives share0 / 2^(k/4) (the error test's
    grid, downwards): for any true share at or above share0 it is a supermartingale, so
    looking every interval keeps the chance of a false "yes" below alpha (Ville's
    inequality). The throughput guardrail's test."""
    k, n = max(0.0, successes), max(successes, trials)
    share0 = min(share0, 1 - 1e-6)  # (at 100%, every request is the canary's)
    if n <= 0 or share0 <= 0:
        return False
    logs = [
        k * math.log(1 / step) + (n - k) * math.log((1 - share0 / step) / (1 - share0))
        for step in _RATIO_STEPS
    ]
    return _log_mean_exp(logs) >= math.log(1 / alpha)


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


# ---- model output: the population stability index ----


PSI_EPSILON = 1e-4
"""The share an empty bucket counts for in the PSI (a share of 0 has no logarithm): the
usual floor of PSI tools. Each term (p - q) ln(p / q) stays >= 0 with the floor, so the
PSI does too, and a bucket empty on both sides adds nothing."""
_DIRICHLET_PRIOR = 0.5
"""Dirichlet(1/2, ..., 1/2) (Jeffreys, the Krichevsky-Trofimov mixture) over each pool's
bucket shares, in the numerator of the PSI test's e-value."""

PsiClass = Literal["pass", "high", "marginal", "no_data"]


@dataclass(frozen=True)
class PsiResult:
    """The PSI of the canary's output histogram against the comparator's, and whether the
    two differ at all. Every part of the class is a field (`significant`, `severe`,
    `marginal`, `within`, `enough`); `classification` only combines them."""

    psi: float | None
    """Population stability index over the common buckets (None: a pool is empty)."""
    p_value: float
    """Always-valid, for "the two pools draw from one distribution": 1 / e-value, <= 1."""
    significant: bool
    """p_value <= alpha: the two distributions differ (by how much is the PSI's to say)."""
    severe: bool
    """significant and psi > fail_psi: a regression."""
    marginal: bool
    """significant and allowed_psi < psi <= fail_psi: a moderate shift that is real."""
    within: bool
    """psi <= allowed_psi (significant or not: a real shift inside the allowance)."""
    enough: bool
    """Both pools hold at least min_samples scores (a PSI at or under allowed_psi on
    fewer is no pass)."""
    canary_total: float
    comparator_total: float
    buckets: int
    """How many buckets (common to both histograms) were compared."""
    excess: float | None = None
    """The PSI beyond what noise alone gives two samples of this size (its expectation
    under one distribution, (K - 1)(1/n + 1/m) over the K occupied buckets), at least 0:
    what `severe` and `marginal` compare with the bands, so an early, noisy PSI of a
    modest shift does not cross the fail line."""

    @property
    def passed(self) -> bool:
        """At or under the allowance, on enough scores."""
        return self.enough and self.within and not self.severe

    @property
    def classification(self) -> PsiClass:
        """high (fail), marginal (hold: a person looks), pass, or no_data (too few scores
        to pass, or a PSI above allowed that is not yet significant: keep looking)."""
        if self.severe:
            return "high"
        if self.marginal:
            return "marginal"
        return "pass" if self.passed else "no_data"


def psi_test(
    canary_buckets: Buckets,
    comparator_buckets: Buckets,
    allowed_psi: float,
    fail_psi: float,
    alpha: float,
    min_samples: float = 100,
    epsilon: float = PSI_EPSILON,
) -> PsiResult:
    """The PSI of two cumulative histograms (the `Buckets` format of request times, +inf
    last), with a sequential test of "no difference at all".

    Effect: PSI = sum_i (p_i - q_i) ln(p_i / q_i) over the per-bucket shares p (canary)
    and q (comparator), each floored at `epsilon`. Histograms with different bounds are
    compared on the bounds they share (their cumulative counts there are exact).

    Significance, valid under continuous monitoring (universal inference): the e-value is
    the product of the two pools' Dirichlet-multinomial marginal likelihoods (a mixture
    over each pool's bucket shares: predictable, so a valid sequential numerator) over
    the multinomial likelihood of both samples at the pooled maximum-likelihood shares
    (the null's MLE). Under "one distribution p0 for both", that ratio is at most the
    likelihood ratio against p0, a nonnegative martingale: by Ville's inequality the
    chance that it *ever* reaches 1/alpha is at most alpha. Identical histograms get an
    e-value <= 1 (p = 1) whatever their size.

    The PSI of two samples is biased upward: noise alone makes it about (K - 1) *
    (1/n + 1/m) for K buckets of n and m scores (PSI is the Jeffreys divergence, and
    n m / (n + m) times it is roughly chi-square with K - 1 degrees of freedom), more when
    sparse buckets sit on the epsilon floor: 20 buckets, 100 scores a side, one
    distribution: a PSI near 0.4, above the usual 0.25 fail line (tests/test_stats_output.py
    measures it). So a PSI alone never fails a canary: `severe` and `marginal` need the
    e-value test to reject too, and compare the PSI *beyond* that noise (`excess`) with
    the bands; a PSI at or under `allowed_psi` is a pass only with `min_samples` scores
    on each side (fewer is `no_data`).
    """
    cc, bc = _common_bucket_counts(canary_buckets, comparator_buckets)
    n, m = sum(cc), sum(bc)
    if n <= 0 or m <= 0 or len(cc) < 2:
        return PsiResult(None, 1.0, False, False, False, False, False, n, m, len(cc))
    psi = population_stability_index(cc, bc, epsilon)
    log_e = same_distribution_log_e(cc, bc)
    p = math.exp(-min(log_e, 700.0)) if log_e > 0 else 1.0
    significant = p <= alpha
    enough = min(n, m) >= min_samples
    occupied = sum(1 for a, b in zip(cc, bc, strict=True) if a + b > 0)
    excess = max(0.0, psi - max(0, occupied - 1) * (1 / n + 1 / m))
    severe = significant and excess > fail_psi
    marginal = significant and allowed_psi < excess <= fail_psi
    within = psi <= allowed_psi
    return PsiResult(psi, p, significant, severe, marginal, within, enough, n, m, len(cc), excess)


def _common_bucket_counts(a: Buckets, b: Buckets) -> tuple[list[float], list[float]]:
    """Per-bucket whole counts of two cumulative histograms on the bounds both have
    (counts from PromQL's increase() are extrapolated: rounded half up, as errors are)."""
    ca = {le: max(0.0, c) for le, c in a}
    cb = {le: max(0.0, c) for le, c in b}
    out_a, out_b, prev_a, prev_b = [], [], 0.0, 0.0
    for le in sorted(set(ca) & set(cb)):
        # Cumulative counts never go down: a dip (a counter reset mid-window) counts 0.
        at_a, at_b = max(prev_a, ca[le]), max(prev_b, cb[le])
        out_a.append(math.floor(at_a + 0.5) - math.floor(prev_a + 0.5))
        out_b.append(math.floor(at_b + 0.5) - math.floor(prev_b + 0.5))
        prev_a, prev_b = at_a, at_b
    return [float(x) for x in out_a], [float(x) for x in out_b]


def population_stability_index(
    canary: Sequence[float], comparator: Sequence[float], epsilon: float = PSI_EPSILON
) -> float:
    """sum_i (p_i - q_i) ln(p_i / q_i) over per-bucket shares, each floored at `epsilon`
    (not renormalised: every term stays >= 0). Counts, not shares, on the same buckets."""
    n, m = sum(canary), sum(comparator)
    total = 0.0
    for c, b in zip(canary, comparator, strict=True):
        p, q = max(c / n, epsilon), max(b / m, epsilon)
        total += (p - q) * math.log(p / q)
    return total


def same_distribution_log_e(canary: Sequence[float], comparator: Sequence[float]) -> float:
    """Log e-value against "both pools draw their buckets from one distribution":
    Dirichlet(1/2)-multinomial marginal likelihoods of each pool's sequence, over the
    likelihood of both at the pooled maximum-likelihood shares."""
    c = np.asarray(canary, dtype=float)
    b = np.asarray(comparator, dtype=float)
    pooled = c + b
    total = float(pooled.sum())
    nonzero = pooled[pooled > 0]
    log_null = float(np.sum(nonzero * np.log(nonzero / total)))
    return _dirichlet_multinomial_log(c) + _dirichlet_multinomial_log(b) - log_null


def _dirichlet_multinomial_log(counts: np.ndarray) -> float:
    """Log probability of one ordered sequence with these bucket counts under a
    Dirichlet(a, ..., a) mixture of multinomials (the product of its predictive
    probabilities (a + seen_i) / (K a + seen))."""
    a, k, n = _DIRICHLET_PRIOR, len(counts), float(counts.sum())
    return float(gammaln(k * a) - gammaln(k * a + n) + np.sum(gammaln(a + counts) - gammaln(a)))


# ---- custom value metrics: the mean log ratio ----


_VALUE_G = (0.25, 1.0, 4.0, 16.0, 64.0)
"""Prior variances of the standardised effect (mean / sd of the log ratios beyond the
allowed one) in the value test's mixture, equally weighted: the large ones let a gross
change fail in 5-6 readings, the small ones keep power for a change near the noise."""


@dataclass(frozen=True)
class RatioOfMeansResult:
    effect: float | None
    """exp(mean of ln(canary / comparator)) over the usable pairs (None: none)."""
    p_value: float
    """Always-valid (for normal log ratios: see `ratio_of_means_test`), at most 1."""
    significant: bool
    higher: bool | None
    """Which way the canary moved beyond the allowance (None: neither side tested)."""
    pairs: int
    """Pairs used: both values positive and finite."""
    skipped: int
    """Pairs left out: a value <= 0, NaN or infinite (no logarithm)."""
    enough: bool
    """At least `min_pairs` pairs used; fewer is no data."""


def ratio_of_means_test(
    pairs: Sequence[tuple[float, float]],
    allowed_change: float,
    increase_is_bad: bool = True,
    decrease_is_bad: bool = False,
    alpha: float = 0.01,
    min_pairs: int = 5,
) -> RatioOfMeansResult:
    """A `value` metric (a rate or a gauge read once per interval from each pool): is the
    canary beyond `allowed_change` times its comparator?

    `pairs`: (canary, comparator) per interval, in order, every one of the step so far.
    d_i = ln(canary_i / comparator_i); with an increase bad, H0 is mean(d) <= ln(allowed)
    (a decrease: mean(d) >= -ln(allowed)); with either, each side at alpha / 2. Effect:
    exp(mean(d)). The pairs are taken as independent: one reading per interval, windows
    that do not overlap. A pair with a value <= 0 (or not finite) has no log ratio: it is
    skipped and counted in `skipped`. Fewer than `min_pairs` usable pairs is no data.

    The sequential test is `t_mixture_log_lr`: the normal mixture of
    `normal_mixture_log_lr` with the unknown variance integrated out (scale-invariant)
    rather than plugged in. A plug-in sample variance over a handful of readings is
    too often small by chance: looking after every pair from the 5th to the 60th, normal
    d at the boundary (100,000 runs), it rejected in 0.7-1.0% of runs at alpha 0.001 and
    1.3-2.0% at alpha 0.01 (the judge's levels are of that order); the scale-invariant
    mixture, 0.02-0.03% and 0.2% (it is exact for normal d, whatever their variance).
    """
    logs, skipped = [], 0
    for c, b in pairs:
        if c > 0 and b > 0 and math.isfinite(c) and math.isfinite(b):
            logs.append(math.log(c / b))
        else:
            skipped += 1
    n = len(logs)
    effect = math.exp(sum(logs) / n) if n else None
    if n < max(min_pairs, 2):
        return RatioOfMeansResult(effect, 1.0, False, None, n, skipped, False)
    mean = sum(logs) / n
    bound = math.log(allowed_change)
    sides = int(increase_is_bad) + int(decrease_is_bad)
    up = down = -math.inf
    if increase_is_bad and mean - bound > 0:
        up = t_mixture_log_lr([d - bound for d in logs])
    if decrease_is_bad and mean + bound < 0:
        down = t_mixture_log_lr([d + bound for d in logs])
    log_lr = max(up, down)
    p = min(1.0, sides * math.exp(-min(log_lr, 700.0))) if log_lr > 0 else 1.0
    higher = (up >= down) if log_lr > -math.inf else None
    return RatioOfMeansResult(effect, p, sides > 0 and p <= alpha, higher, n, skipped, True)


def t_mixture_log_lr(xs: Sequence[float], gs: Sequence[float] = _VALUE_G) -> float:
    """Log Bayes factor of "the x_i are N(delta sigma, sigma^2)", delta ~ N(0, g) (an
    equal mixture over `gs`), against "N(0, sigma^2)", sigma unknown under both with the
    right Haar prior d sigma / sigma (Lai's sequential t-test; Perez-Ortiz, Lardy, de
    Heide and Gruenwald, "E-statistics, group invariance and anytime-valid testing"):
    a test martingale under the null whatever sigma, so Ville's inequality holds.

    For one g: (1 + n g)^(-1/2) (S / (S - g (sum x)^2 / (1 + n g)))^(n/2), S = sum x^2;
    with sigma known it would be `normal_mixture_log_lr` with tau^2 = g sigma^2. It is 1
    for a single x; a mixture of these is one too."""
    n = len(xs)
    total = sum(xs)
    sq = sum(x * x for x in xs)
    if n < 2 or sq <= 0:
        return 0.0
    logs = []
    for g in gs:
        rest = sq - g * total * total / (1 + n * g)  # > 0: at least sq / (1 + n g)
        rest = max(rest, sq / (1 + n * g))
        logs.append(-0.5 * math.log1p(n * g) + n / 2 * (math.log(sq) - math.log(rest)))
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs) / len(logs))


# ---- sample-ratio mismatch: were the requests split as configured? ----

SRM_CONCENTRATION = 100.0
"""The SRM test's prior: Dirichlet(SRM_CONCENTRATION * configured shares), centred on
the configured split; 100 puts its weight on shifts of a few points of share (20% sent
as 14% or 26%), where a mismatch is subtle enough to need a test at all."""


@dataclass(frozen=True)
class SrmResult:
    """The requests Envoy routed to each pool against the configured shares."""

    shares: tuple[float, ...]
    """Observed share of each pool (of the routed requests counted), in input order."""
    p_value: float
    """Always-valid: 1 / the Dirichlet-multinomial Bayes factor, at most 1."""
    significant: bool
    requests: float
    """The requests counted (whole)."""


def srm_test(counts: Sequence[float], shares: Sequence[float], alpha: float) -> SrmResult:
    """Is the split of `counts` (requests routed to each pool) not `shares` (the
    configured weights, summing to 1)?

    Each routed request picks its pool at random with the configured probabilities
    (Envoy's weighted clusters), so under "the split is the configured one" the counts
    are multinomial with known shares p0. The Bayes factor of a Dirichlet-multinomial
    mixture (prior Dirichlet(c p0)) against that point null is a nonnegative martingale
    under it (Lindon and Malek, "Anytime-valid inference for multinomial count data",
    the test Netflix and Optimizely run for sample-ratio mismatch): by Ville's inequality
    the chance it *ever* reaches 1/alpha, however often it is looked at, is at most
    alpha. Pools with a configured share of 0 must be left out by the caller (one
    request there is certain proof, and belongs to another check). Counts from
    Prometheus may be fractional: rounded half up."""
    if len(counts) != len(shares) or any(s <= 0 for s in shares):
        raise ValueError("srm_test: one positive configured share per count")
    xs = [math.floor(max(c, 0.0) + 0.5) for c in counts]
    total = sum(shares)
    p0 = [s / total for s in shares]
    n = sum(xs)
    observed = tuple(x / n if n else 0.0 for x in xs)
    if n == 0 or len(xs) < 2:
        return SrmResult(observed, 1.0, False, float(n))
    log_bf = srm_log_bayes_factor(xs, p0)
    p = math.exp(-min(log_bf, 700.0)) if log_bf > 0 else 1.0
    return SrmResult(observed, p, p <= alpha, float(n))


def srm_log_bayes_factor(
    counts: Sequence[int], p0: Sequence[float], concentration: float = SRM_CONCENTRATION
) -> float:
    """log of [Gamma(A) / Gamma(A + n)] prod Gamma(a_i + x_i) / Gamma(a_i) / prod p0_i^x_i,
    a_i = A p0_i: the Dirichlet-multinomial marginal likelihood of the sequence over its
    likelihood under p0 (math.lgamma: no scipy needed)."""
    a = [concentration * p for p in p0]
    n = sum(counts)
    log_m = math.lgamma(concentration) - math.lgamma(concentration + n)
    log_m += sum(math.lgamma(ai + x) - math.lgamma(ai) for ai, x in zip(a, counts, strict=True))
    log_null = sum(x * math.log(p) for x, p in zip(counts, p0, strict=True) if x)
    return log_m - log_null
