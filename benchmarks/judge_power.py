"""The canary judge's power and false-alarm rate, on simulated traffic.

Each trial is one rollout step: canary and baseline each receive `rps` requests/s
(Poisson arrivals per pool), every request fails with a fixed probability, and request
times come from a long-tailed mixture (a lognormal body around 30 ms and a 3% slow tail
around 150 ms) counted into the histogram buckets `xds-server bootstrap` configures
(`--buckets envoy-default`: Envoy's own). Every `--interval` seconds
the controller's view is rebuilt from the simulated counts -- the sliding-window canary
Measurement (p99 from the buckets) for the guardrails and the whole step so far for the
analysis -- and handed to the real `decide()` (which calls `judge()`), with guardrails
set so they never trip: the benchmark measures the statistical analysis alone.

The step is the first of the default plan in a rollout over `--regions` regions: with
`false_alarm_scope: rollout` (the default) each metric's false-alarm level is shared by
every analysed step in every region, so one step gets its share. A healthy rollout is
falsely rolled back when any of its steps is; the steps and regions see separate data,
so the per-rollout rate follows from the per-step one.

Cases: healthy (canary identical to baseline), a 2x error rate, 1.3x request times
(every quantile, p99 included, 30% slower) and a slower tail alone, at 10, 100 and
1,000 requests/s, for the chosen base error rate and for a second one.

    python benchmarks/judge_power.py [--trials 400] [--healthy-trials 1000] [--json]

Time to detect is from the step's start to the look at which decide() rolls back; it
leaves out the scrape and query lag and the push to Envoy (rollback_latency.py has those).

Then the model-output gate and custom metrics, on the statistics alone (stats.psi_test,
stats.ratio_of_means_test, stats.error_ratio_test as an `errors`-like `ratio` metric),
with each kind's default settings and the same share of the false-alarm level; a
rollback is the first look at which the metric fails (PSI: `high`), since every one of
these tests is sequential. `--skip-custom` leaves them out.
- output: model scores in 20 buckets over [0, 1], one per request; v1 Beta(2, 5);
  output_psi_0.05: a healthy v2 whose PSI against v1 is 0.05 (Beta(~2.35, 5): not a
  failure, the allowance is 0.1); output_psi_0.15 (a moderate shift: marginal, held),
  output_psi_0.35 (beyond the 0.25 fail line); output_collapse: every score in the lowest
  two buckets.
- value: tokens/s read per interval and pool (the mean over the interval's requests,
  each lognormal, sigma 0.5; both pools move together with the load, sd 20%); a
  decrease is bad, allowed 10%: value_healthy (same), value_at_allowed (canary exactly
  10% down: the null's boundary, the worst case for false alarms), value_-30%. Read every
  `--interval` and every 10 s (the default plan's interval: 6 readings in a 60 s step).
- ratio: a click-through rate (5% of requests; clicks over requests, cumulative), a
  decrease bad, judged like errors: ratio_healthy, ratio_-30%.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import lognorm

from xds_server.render.bootstrap import ENVOY_DEFAULT_BUCKETS_MS, LATENCY_BUCKETS_MS
from xds_server.rollout import decide as sm
from xds_server.rollout import stats
from xds_server.rollout.decide import Observation
from xds_server.rollout.evidence import HIGH, LOW, Comparison, Measurement, Signals
from xds_server.rollout.judge import SRM_CONFIDENCE, srm
from xds_server.spec import FalseAlarmScope, Guardrails, MetricKind, RolloutPlan
from xds_server.spec.rollout import metric_defaults

ENVOY_BUCKETS_MS: tuple[float, ...] = (*ENVOY_DEFAULT_BUCKETS_MS, math.inf)
"""Envoy's default request-time histogram bounds (ms), +Inf last."""
BUCKET_SETS: dict[str, tuple[float, ...]] = {
    "xds-server": (*LATENCY_BUCKETS_MS, math.inf),
    "envoy-default": ENVOY_BUCKETS_MS,
}
"""`xds-server`: the buckets `xds-server bootstrap` configures; `envoy-default`: Envoy's."""

BODY_MEDIAN_MS, BODY_SIGMA = 30.0, 0.5
TAIL_SHARE, TAIL_MEDIAN_MS, TAIL_SIGMA = 0.03, 150.0, 0.7
LATENCY_MODEL = (
    f"{1 - TAIL_SHARE:.0%} lognormal(median {BODY_MEDIAN_MS:g} ms, sigma {BODY_SIGMA:g}) + "
    f"{TAIL_SHARE:.0%} lognormal(median {TAIL_MEDIAN_MS:g} ms, sigma {TAIL_SIGMA:g})"
)

HEALTHY, ERRORS_2X, LATENCY_13X = "healthy", "errors_2x", "latency_1.3x"
TAIL_13X = "tail_1.3x"
SCENARIOS: dict[str, tuple[float, float, float]] = {
    # canary's error-rate multiplier, request-time multiplier, slow-tail-only multiplier
    HEALTHY: (1.0, 1.0, 1.0),
    ERRORS_2X: (2.0, 1.0, 1.0),
    LATENCY_13X: (1.0, 1.3, 1.0),
    TAIL_13X: (1.0, 1.0, 1.3),
}
REGION = "bench"
PASSED = "passed"
CHUNK = 50
"""Trials per task handed to a worker process."""

FALSE_ROLLBACK_TARGET = 0.01
DETECT_TARGET_S, DETECT_TARGET_RPS = 10.0, 100


def bucket_probs(buckets: tuple[float, ...], scale: float, tail_scale: float = 1.0) -> np.ndarray:
    """Probability of each bucket for the latency mixture, request times x `scale` (and
    the slow component's alone x `tail_scale`)."""
    finite = np.array(buckets[:-1])
    cdf = (1 - TAIL_SHARE) * lognorm.cdf(
        finite, BODY_SIGMA, scale=BODY_MEDIAN_MS * scale
    ) + TAIL_SHARE * lognorm.cdf(finite, TAIL_SIGMA, scale=TAIL_MEDIAN_MS * scale * tail_scale)
    probs = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    probs = np.clip(probs, 0.0, None)
    return np.asarray(probs / probs.sum())


def model_quantile(q: float, scale: float = 1.0, tail_scale: float = 1.0) -> float:
    """The latency mixture's true q-quantile in ms (before bucketing), by bisection."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        cdf = (1 - TAIL_SHARE) * lognorm.cdf(
            mid, BODY_SIGMA, scale=BODY_MEDIAN_MS * scale
        ) + TAIL_SHARE * lognorm.cdf(mid, TAIL_SIGMA, scale=TAIL_MEDIAN_MS * scale * tail_scale)
        lo, hi = (mid, hi) if cdf < q else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Params:
    interval: float
    duration: float
    window: float
    buckets: tuple[float, ...]
    regions: int = 3
    scope: str = FalseAlarmScope.ROLLOUT

    @property
    def looks(self) -> int:
        return max(1, round(self.duration / self.interval))

    @property
    def window_looks(self) -> int:
        return max(1, round(self.window / self.interval))

    def plan(self) -> RolloutPlan:
        """The default steps and analysis; guardrails that never trip; no hold expiry.
        The step lasts the whole trial, so only the last look can pass it."""
        plan = RolloutPlan(
            step_duration=self.looks * self.interval - 1e-9,
            interval=self.interval,
            window=self.window,
            max_hold=1e9,
            guardrails=Guardrails(max_error_rate=1.0, max_p99_ms=1e12, min_requests=20),
        )
        return replace(plan, analysis=replace(plan.analysis, false_alarm_scope=self.scope))

    def region_names(self) -> tuple[str, ...]:
        """The simulated region first; the others only count for the false-alarm share."""
        return (REGION, *(f"other-{i}" for i in range(1, self.regions)))

    @property
    def tests_per_rollout(self) -> int:
        """Analysed steps x regions: the sequential tests a whole rollout runs per metric."""
        return sum(1 for w in self.plan().steps if w < 100) * self.regions


@dataclass(frozen=True)
class Task:
    scenario: str
    rps: float
    base_error_rate: float
    trials: int
    seed: np.random.SeedSequence
    params: Params


def simulate_pool(
    rng: np.random.Generator, task: Task, error_rate: float, probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per trial and interval: requests, errors, and requests per latency bucket."""
    shape = (task.trials, task.params.looks)
    requests = rng.poisson(task.rps * task.params.interval, size=shape)
    errors = rng.binomial(requests, min(error_rate, 1.0))
    buckets = rng.multinomial(requests, probs)
    return requests, errors, buckets


def run_task(task: Task) -> list[tuple[float, str]]:
    """Per trial: rollback time in seconds (inf: never) and the metrics that failed, or
    `PASSED` when the last look passed the step, or "" when it was still held."""
    rng = np.random.default_rng(task.seed)
    error_mult, time_mult, tail_mult = SCENARIOS[task.scenario]
    p = task.params
    plan = p.plan()
    canary_latency = bucket_probs(p.buckets, time_mult, tail_mult)
    canary = simulate_pool(rng, task, task.base_error_rate * error_mult, canary_latency)
    base = simulate_pool(rng, task, task.base_error_rate, bucket_probs(p.buckets, 1.0))
    bounds = list(p.buckets)
    # Step totals so far: cumulative over time; histograms cumulative over buckets too.
    c_req, c_err = (np.cumsum(a, axis=1).tolist() for a in canary[:2])
    b_req, b_err = (np.cumsum(a, axis=1).tolist() for a in base[:2])
    c_hist = np.cumsum(np.cumsum(canary[2], axis=1), axis=2).tolist()
    b_hist = np.cumsum(np.cumsum(base[2], axis=1), axis=2).tolist()
    # The sliding window (never before the step's start): per-bucket counts, not cumulative.
    w = p.window_looks
    c_win_time = np.cumsum(canary[2], axis=1)
    shifted = np.zeros_like(c_win_time)
    shifted[:, w:, :] = c_win_time[:, :-w, :]
    win_buckets = (c_win_time - shifted).tolist()
    c_req_a, c_err_a = np.cumsum(canary[0], axis=1), np.cumsum(canary[1], axis=1)
    win_req = (c_req_a - np.pad(c_req_a, ((0, 0), (w, 0)))[:, : p.looks]).tolist()
    win_err = (c_err_a - np.pad(c_err_a, ((0, 0), (w, 0)))[:, : p.looks]).tolist()

    out: list[tuple[float, str]] = []
    for i in range(task.trials):
        state = sm.start(plan, "svc", "v2", p.region_names(), now=0.0).state
        detected, cause = math.inf, ""
        for k in range(p.looks):
            now = (k + 1) * p.interval
            window = Measurement(
                requests=win_req[i][k],
                errors=win_err[i][k],
                p99_ms=stats.quantile(bounds, win_buckets[i][k], 0.99),
            )
            step = Comparison(
                Measurement(
                    requests=c_req[i][k],
                    errors=c_err[i][k],
                    latency_buckets=tuple(zip(bounds, c_hist[i][k], strict=True)),
                ),
                Measurement(
                    requests=b_req[i][k],
                    errors=b_err[i][k],
                    latency_buckets=tuple(zip(bounds, b_hist[i][k], strict=True)),
                ),
                "baseline",
            )
            obs = Observation(applied_at=0.0, canary=window, step=step)
            decision = sm.decide(plan, state, {REGION: obs}, now)
            if decision.rollback:
                detected, cause = now, failed_metrics(decision)
                break
            state = decision.state
        if math.isinf(detected) and state.regions[REGION].step_passed:
            cause = PASSED
        out.append((detected, cause))
    return out


def failed_metrics(decision: sm.Decision) -> str:
    """Which analysis metrics the rolling-back verdict classed high or low (or 'guardrail')."""
    verdict = next((t.verdict for t in decision.transitions if t.verdict is not None), None)
    if verdict is None:
        return "other"
    names = [m.name for m in verdict.metrics if m.classification in (HIGH, LOW)]
    return "+".join(names) or "guardrail"


def nearest_rank(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank: no interpolation, so inf (never detected) stays inf."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def wilson_upper(successes: int, n: int, z: float = 1.96) -> float:
    if n == 0:
        return 1.0
    phat = successes / n
    denom = 1 + z * z / n
    centre = phat + z * z / (2 * n)
    spread = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / denom)


def summarise(
    scenario: str, rps: float, rate: float, trials: list[tuple[float, str]], tests: int
) -> dict[str, Any]:
    """`tests`: steps x regions of a whole rollout, for the per-rollout false rollbacks."""
    times = [t for t, _ in trials]
    causes: dict[str, int] = {}
    for t, cause in trials:
        if math.isfinite(t):
            causes[cause] = causes.get(cause, 0) + 1
    passed = sum(1 for t, cause in trials if math.isinf(t) and cause == PASSED)
    n = len(times)
    hits = sum(1 for t in times if math.isfinite(t))
    median, p95 = nearest_rank(times, 0.5), nearest_rank(times, 0.95)
    case: dict[str, Any] = {
        "scenario": scenario,
        "rps": rps,
        "base_error_rate": rate,
        "trials": n,
        "rolled_back": hits,
        "rollback_share": hits / n if n else 0.0,
        "passed_share": passed / n if n else 0.0,
        "held_share": (n - hits - passed) / n if n else 0.0,
        "detect_median_s": median if math.isfinite(median) else None,
        "detect_p95_s": p95 if math.isfinite(p95) else None,
        "false_rollback_rate": None,
        "false_rollback_upper95": None,
        "false_rollback_rate_per_rollout": None,
        "false_rollback_per_rollout_upper95": None,
        "rollbacks_by_metric": dict(sorted(causes.items())),
    }
    if scenario == HEALTHY:
        # On identical versions every rollback is a false one; nothing is there to detect.
        case["false_rollback_rate"] = hits / n if n else 0.0
        case["false_rollback_upper95"] = wilson_upper(hits, n)
        # The steps and regions of a rollout are judged on separate data: independent.
        for key, per_step in (
            ("false_rollback_rate_per_rollout", case["false_rollback_rate"]),
            ("false_rollback_per_rollout_upper95", case["false_rollback_upper95"]),
        ):
            case[key] = 1 - (1 - per_step) ** tests
    return case


def build_tasks(args: argparse.Namespace, rates: list[float], params: Params) -> list[Task]:
    tasks: list[Task] = []
    root = np.random.SeedSequence(args.seed)
    cases = [(s, r, rate) for rate in rates for s in SCENARIOS for r in args.rps]
    for (scenario, rps, rate), case_seed in zip(cases, root.spawn(len(cases)), strict=True):
        total = args.healthy_trials if scenario == HEALTHY else args.trials
        sizes = [min(CHUNK, total - start) for start in range(0, total, CHUNK)]
        for size, seed in zip(sizes, case_seed.spawn(len(sizes)), strict=True):
            tasks.append(Task(scenario, float(rps), rate, size, seed, params))
    return tasks


def fmt_s(v: float | None, duration: float) -> str:
    return f">{duration:g}" if v is None else f"{v:g}"


def print_table(result: dict[str, Any]) -> None:
    prm = result["parameters"]
    dur = prm["duration_s"]
    print("Judge power and false rollbacks, simulated (benchmarks/judge_power.py)")
    print(
        f"  one step per trial, looked at every {prm['interval_s']:g}s for {dur:g}s; "
        f"guardrail window {prm['window_s']:g}s (guardrails set never to trip)"
    )
    print("  requests/s is per pool: canary and baseline EACH receive that rate (Poisson arrivals)")
    print(f"  latency model: {prm['latency_model']}, histogram buckets: {prm['buckets']}")
    print(
        f"    true p50 {prm['model_p50_ms']:.1f} ms, p99 {prm['model_p99_ms']:.1f} ms; "
        "latency_1.3x: every request time x1.3 (p99 +30%)"
    )
    print(
        f"    tail_1.3x: only the slow {TAIL_SHARE:.0%} x1.3: p50 {prm['tail_p50_ms']:.1f} ms, "
        f"p99 {prm['tail_p99_ms']:.1f} ms (+{prm['tail_p99_ms'] / prm['model_p99_ms'] - 1:.0%})"
    )
    print(
        f"  analysis: default metrics, error_rate confidence {prm['error_confidence']:g} "
        f"(allowed x{prm['error_allowed_change']:g}, detect x{prm['error_detect_change']:g}), "
        f"latency confidence {prm['latency_confidence']:g} "
        f"(p{prm['latency_quantile'] * 100:g} allowed x{prm['latency_allowed_change']:g})"
    )
    shared = prm["tests_sharing_alpha"]
    print(
        f"  false_alarm_scope {prm['false_alarm_scope']}: each metric's 1 - confidence is "
        f"shared by {shared} test(s); a rollout of the default steps over {prm['regions']} "
        f"region(s) runs {prm['tests_per_rollout']}"
    )
    print(
        "  rollback = decide() rolls back: a FAIL that is conclusive or "
        f"{prm['failures_before_rollback']} FAILs; seed {prm['seed']}"
    )
    print(
        "  detect times in s from step start (look granularity); p95 over all trials, "
        f"'>{dur:g}' = not detected within the step"
    )
    print(
        "  not rolled back at the end of the step: passed (the last look passed: the canary"
        " moves on) or held (no data / marginal)"
    )
    for rate in prm["base_error_rates"]:
        print()
        print(f"base error rate {rate:g} (both pools; errors_2x canary at {2 * rate:g})")
        header = (
            f"  {'scenario':<13}{'rps':>6}{'trials':>8}{'rolled back':>13}"
            f"{'median s':>10}{'p95 s':>8}{'false rb rate':>15}{'(95% up)':>10}"
            f"{'per rollout':>12}{'passed':>8}{'held':>7}  rollbacks by metric"
        )
        print(header)
        print("  " + "-" * (len(header) - 2))
        for c in result["cases"]:
            if c["base_error_rate"] != rate:
                continue
            fr = c["false_rollback_rate"]
            false_col = f"{fr:.2%}" if fr is not None else "-"
            up = c["false_rollback_upper95"]
            up_col = f"{up:.2%}" if up is not None else ""
            pr = c["false_rollback_rate_per_rollout"]
            pr_col = f"{pr:.2%}" if pr is not None else "-"
            by_metric = ", ".join(f"{k} {v}" for k, v in c["rollbacks_by_metric"].items())
            print(
                f"  {c['scenario']:<13}{c['rps']:>6g}{c['trials']:>8}"
                f"{c['rollback_share']:>13.1%}"
                f"{fmt_s(c['detect_median_s'], dur):>10}{fmt_s(c['detect_p95_s'], dur):>8}"
                f"{false_col:>15}{up_col:>10}{pr_col:>12}"
                f"{c['passed_share']:>8.1%}{c['held_share']:>7.1%}  {by_metric}"
            )
    print()
    print("targets:")
    for t in result["targets"].values():
        print(f"  [{'met' if t['met'] else 'NOT met'}] {t['description']}: {t['observed']}")
    print(f"wall time {result['wall_time_s']:.1f}s on {prm['processes']} process(es)")


# ---- the model-output gate and custom metrics: the statistics alone ----

SCORE_EDGES = np.linspace(0.0, 1.0, 21)
SCORE_BOUNDS: tuple[float, ...] = (*SCORE_EDGES[1:-1].tolist(), math.inf)
V1_BETA = (2.0, 5.0)
HEALTHY_V2_PSI = 0.05
OUTPUT_PSI, OUTPUT_COLLAPSE = f"output_psi_{HEALTHY_V2_PSI:g}", "output_collapse"
OUTPUT_SHIFTS = {OUTPUT_PSI: HEALTHY_V2_PSI, "output_psi_0.15": 0.15, "output_psi_0.35": 0.35}
"""Scenario -> the true PSI of v2's scores against v1's (Beta(a, 5), a found to match)."""
VALUE_HEALTHY, VALUE_AT_ALLOWED, VALUE_DROP = "value_healthy", "value_at_allowed", "value_-30%"
RATIO_HEALTHY, RATIO_DROP = "ratio_healthy", "ratio_-30%"
CUSTOM_HEALTHY = (OUTPUT_PSI, VALUE_HEALTHY, VALUE_AT_ALLOWED, RATIO_HEALTHY)
"""No regression: every rollback in these is a false one."""
VALUE_REQUEST_SIGMA, VALUE_LOAD_SD, CTR = 0.5, 0.2, 0.05
DEFAULT_PLAN_INTERVAL = 10.0
MARGINAL = "marginal"


def score_probs(a: float, b: float) -> np.ndarray:
    p = np.diff(beta_dist.cdf(SCORE_EDGES, a, b))
    return np.asarray(p / p.sum())


def shifted_probs(target: float) -> np.ndarray:
    """Beta(a, 5) scores with the PSI `target` against v1's, by bisection on a."""
    v1 = score_probs(*V1_BETA)
    lo, hi = V1_BETA[0], V1_BETA[0] + 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        psi = stats.population_stability_index(list(score_probs(mid, V1_BETA[1])), list(v1))
        lo, hi = (mid, hi) if psi < target else (lo, mid)
    return score_probs((lo + hi) / 2, V1_BETA[1])


@dataclass(frozen=True)
class CustomTask:
    scenario: str
    rps: float
    interval: float
    trials: int
    seed: np.random.SeedSequence
    params: Params

    @property
    def looks(self) -> int:
        return max(1, round(self.params.duration / self.interval))

    def alpha(self, kind: MetricKind) -> float:
        """The metric kind's default 1 - confidence, shared as the analysis shares it."""
        tests = self.params.plan().analysis_tests(self.params.regions)
        return (1 - metric_defaults("m", kind).confidence) / tests


def run_custom(task: CustomTask) -> list[tuple[float, str]]:
    """Per trial: rollback time (inf: never) and, when not rolled back, PASSED, MARGINAL
    (output: a real moderate shift, held) or "" (held: no data)."""
    rng = np.random.default_rng(task.seed)
    if task.scenario.startswith("output"):
        v1 = score_probs(*V1_BETA)
        if task.scenario == OUTPUT_COLLAPSE:
            canary = np.zeros_like(v1)
            canary[:2] = (0.6, 0.4)
        else:
            canary = shifted_probs(OUTPUT_SHIFTS[task.scenario])
        return [_output_trial(rng, task, canary, v1) for _ in range(task.trials)]
    if task.scenario.startswith("value"):
        return [_value_trial(rng, task) for _ in range(task.trials)]
    return [_ratio_trial(rng, task) for _ in range(task.trials)]


def _output_trial(
    rng: np.random.Generator, task: CustomTask, canary: np.ndarray, v1: np.ndarray
) -> tuple[float, str]:
    """Scores per look: Poisson counts a pool, multinomial over the buckets, cumulative."""
    spec = metric_defaults("output", MetricKind.OUTPUT)
    sizes = rng.poisson(task.rps * task.interval, size=(2, task.looks))
    c_cum = np.cumsum(np.cumsum(rng.multinomial(sizes[0], canary), axis=0), axis=1)
    b_cum = np.cumsum(np.cumsum(rng.multinomial(sizes[1], v1), axis=0), axis=1)
    fail = spec.fail_change if spec.fail_change is not None else math.inf
    cls = ""
    for k in range(task.looks):
        r = stats.psi_test(
            tuple(zip(SCORE_BOUNDS, c_cum[k].tolist(), strict=True)),
            tuple(zip(SCORE_BOUNDS, b_cum[k].tolist(), strict=True)),
            spec.allowed_change,
            fail,
            task.alpha(MetricKind.OUTPUT),
            spec.min_requests,
        )
        if r.severe:
            return (k + 1) * task.interval, "output"
        cls = r.classification
    return math.inf, {"pass": PASSED, "marginal": MARGINAL}.get(cls, "")


def _value_trial(rng: np.random.Generator, task: CustomTask) -> tuple[float, str]:
    """Readings: the mean over each interval's requests (lognormal, its mean's log-sd
    from the count), both pools times the same load factor; no request: a reading of 0."""
    spec = metric_defaults("value", MetricKind.VALUE)
    ratio = {VALUE_HEALTHY: 1.0, VALUE_AT_ALLOWED: 1 / spec.allowed_change}.get(task.scenario, 0.7)
    n = rng.poisson(task.rps * task.interval, size=(2, task.looks))
    cv2 = math.exp(VALUE_REQUEST_SIGMA**2) - 1
    noise = rng.normal(size=(2, task.looks)) * np.sqrt(np.log1p(cv2 / np.maximum(n, 1)))
    load = np.exp(rng.normal(0.0, VALUE_LOAD_SD, size=task.looks))
    readings = 100.0 * load * np.exp(noise) * np.where(n > 0, 1.0, 0.0)
    pairs = list(zip((ratio * readings[0]).tolist(), readings[1].tolist(), strict=True))
    last = None
    for k in range(task.looks):
        last = stats.ratio_of_means_test(
            pairs[: k + 1], spec.allowed_change, False, True, task.alpha(MetricKind.VALUE)
        )
        if last.significant:
            return (k + 1) * task.interval, "value"
    return math.inf, PASSED if last is not None and last.enough else ""


def _ratio_trial(rng: np.random.Generator, task: CustomTask) -> tuple[float, str]:
    """Clicks over requests, cumulative; a decrease is bad; judged like errors."""
    spec = metric_defaults("ctr", MetricKind.RATIO)
    ctr = CTR * (0.7 if task.scenario == RATIO_DROP else 1.0)
    n = np.cumsum(rng.poisson(task.rps * task.interval, size=(2, task.looks)), axis=1)
    clicks = np.cumsum(rng.binomial(np.diff(n, prepend=0), [[ctr], [CTR]]), axis=1)
    alpha = task.alpha(MetricKind.RATIO)
    for k in range(task.looks):
        if n[0, k] < 1 or n[1, k] < 1:
            continue
        t = stats.error_ratio_test(
            clicks[0, k], n[0, k], clicks[1, k], n[1, k], spec.allowed_change,
            spec.confidence, False, True, alpha,
        )  # fmt: skip
        if t.significant:
            return (k + 1) * task.interval, "ratio"
    return math.inf, PASSED


def build_custom_tasks(args: argparse.Namespace, params: Params) -> list[CustomTask]:
    cases: list[tuple[str, float, float]] = []
    for rps in args.rps:
        cases += [(s, rps, params.interval) for s in (*OUTPUT_SHIFTS, OUTPUT_COLLAPSE)]
        for interval in sorted({params.interval, DEFAULT_PLAN_INTERVAL}):
            cases += [(s, rps, interval) for s in (VALUE_HEALTHY, VALUE_AT_ALLOWED, VALUE_DROP)]
        cases += [(s, rps, params.interval) for s in (RATIO_HEALTHY, RATIO_DROP)]
    tasks: list[CustomTask] = []
    root = np.random.SeedSequence([args.seed, 16])
    for (scenario, rps, interval), seed in zip(cases, root.spawn(len(cases)), strict=True):
        total = args.healthy_trials if scenario in CUSTOM_HEALTHY else args.trials
        sizes = [min(CHUNK, total - start) for start in range(0, total, CHUNK)]
        for size, sub in zip(sizes, seed.spawn(len(sizes)), strict=True):
            tasks.append(CustomTask(scenario, float(rps), interval, size, sub, params))
    return tasks


def summarise_custom(
    tasks: list[CustomTask], results: list[list[tuple[float, str]]], tests: int
) -> list[dict[str, Any]]:
    grouped: dict[tuple[str, float, float], list[tuple[float, str]]] = {}
    for task, res in zip(tasks, results, strict=True):
        grouped.setdefault((task.scenario, task.rps, task.interval), []).extend(res)
    cases = []
    for (scenario, rps, interval), trials in grouped.items():
        case = summarise(scenario, rps, math.nan, trials, tests)
        del case["base_error_rate"]
        case["interval_s"] = interval
        case["marginal_share"] = sum(1 for t, c in trials if math.isinf(t) and c == MARGINAL) / len(
            trials
        )
        if scenario in CUSTOM_HEALTHY:
            hits = case["rolled_back"]
            case["false_rollback_rate"] = hits / len(trials)
            case["false_rollback_upper95"] = wilson_upper(hits, len(trials))
            for key, rate in (
                ("false_rollback_rate_per_rollout", case["false_rollback_rate"]),
                ("false_rollback_per_rollout_upper95", case["false_rollback_upper95"]),
            ):
                case[key] = 1 - (1 - rate) ** tests
        cases.append(case)
    return cases


def print_custom_table(cases: list[dict[str, Any]], duration: float, tests: int) -> None:
    print()
    print(
        "model output (PSI, allowed 0.1, fail 0.25) and custom metrics: the stats alone, "
        f"a look every interval; false rollbacks per rollout over {tests} tests"
    )
    header = (
        f"  {'case':<18}{'rps':>6}{'every':>7}{'trials':>8}{'rolled back':>13}"
        f"{'median s':>10}{'p95 s':>8}{'false rb rate':>15}{'(95% up)':>10}"
        f"{'per rollout':>12}{'passed':>8}{'marginal':>10}{'held':>7}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for c in cases:
        fr, up, pr = (
            c["false_rollback_rate"],
            c["false_rollback_upper95"],
            c["false_rollback_rate_per_rollout"],
        )
        held = c["held_share"] - c["marginal_share"]
        print(
            f"  {c['scenario']:<18}{c['rps']:>6g}{c['interval_s']:>6g}s{c['trials']:>8}"
            f"{c['rollback_share']:>13.1%}"
            f"{fmt_s(c['detect_median_s'], duration):>10}{fmt_s(c['detect_p95_s'], duration):>8}"
            f"{(f'{fr:.2%}' if fr is not None else '-'):>15}"
            f"{(f'{up:.2%}' if up is not None else ''):>10}"
            f"{(f'{pr:.2%}' if pr is not None else '-'):>12}"
            f"{c['passed_share']:>8.1%}{c['marginal_share']:>10.1%}{held:>7.1%}"
        )


# ---- sample-ratio mismatch: false alarms on healthy splits, and detection ----


SRM_TARGET = 0.001
"""SRM false alarms: under 0.1% of healthy steps (a region's step holds, then pauses)."""
SRM_SPLITS: dict[str, tuple[float, float, float]] = {
    # configured (production, baseline, canary) shares of the default plan's steps
    "5%": (0.90, 0.05, 0.05),
    "20%": (0.60, 0.20, 0.20),
    "50%": (0.0, 0.50, 0.50),
}
SRM_OFF = "20% sent as 14%"
"""Detection case: an Envoy share off its weights, the canary sent 14% (baseline 20%)."""


@dataclass(frozen=True)
class SrmTask:
    case: str
    sent: tuple[float, float, float]
    """The shares Envoy really routes with."""
    configured: tuple[float, float, float]
    rps: float
    """Requests/s of the whole service in the region."""
    steps: int
    seed: np.random.SeedSequence
    params: Params


def run_srm(task: SrmTask) -> list[float]:
    """Per simulated step: the first look (seconds) at which the judge's SRM test (the
    real `judge.srm`, at the rollout's shared level) holds the step; inf: never. The
    routed requests are multinomial per interval with the `sent` shares (Envoy's
    weighted clusters pick a pool at random per request)."""
    rng = np.random.default_rng(task.seed)
    p = task.params
    plan = p.plan()
    tests = plan.analysis_tests(p.regions)
    alpha = (1 - SRM_CONFIDENCE) / tests
    names = ("production", "baseline", "canary")
    configured = dict(zip(names, task.configured, strict=True))
    shares = np.array(task.sent)
    out: list[float] = []
    for _ in range(task.steps):
        per_look = rng.poisson(task.rps * p.interval, size=p.looks)
        counts = np.cumsum(rng.multinomial(per_look, shares), axis=0)
        first = math.inf
        for k in range(p.looks):
            sent = dict(zip(names, counts[k].tolist(), strict=True))
            signals = srm(plan, Signals(sent=sent, configured=configured), tests)
            if signals.srm_p is not None and signals.srm_p <= alpha:
                first = (k + 1) * p.interval
                break
        out.append(first)
    return out


def build_srm_tasks(args: argparse.Namespace, params: Params) -> list[SrmTask]:
    tasks: list[SrmTask] = []
    root = np.random.SeedSequence([args.seed, 27])
    cases = [(name, shares, shares) for name, shares in SRM_SPLITS.items()]
    cases.append((SRM_OFF, (0.66, 0.20, 0.14), SRM_SPLITS["20%"]))
    grid = [(c, rps) for c in cases for rps in args.rps]
    for ((name, sent, configured), rps), seed in zip(grid, root.spawn(len(grid)), strict=True):
        total = args.srm_steps if sent == configured else min(args.trials, args.srm_steps)
        sizes = [min(CHUNK * 4, total - start) for start in range(0, total, CHUNK * 4)]
        for size, sub in zip(sizes, seed.spawn(len(sizes)), strict=True):
            # rps: per pool of the judge's simulation; the service sends its share to each
            tasks.append(
                SrmTask(name, sent, configured, rps / max(configured[2], 0.05), size, sub, params)
            )
    return tasks


def summarise_srm(tasks: list[SrmTask], results: list[list[float]]) -> list[dict[str, Any]]:
    grouped: dict[tuple[str, float], list[float]] = {}
    healthy: dict[tuple[str, float], bool] = {}
    for task, res in zip(tasks, results, strict=True):
        key = (task.case, task.rps)
        grouped.setdefault(key, []).extend(res)
        healthy[key] = task.sent == task.configured
    cases = []
    for (case, rps), times in grouped.items():
        n, hits = len(times), sum(1 for t in times if math.isfinite(t))
        median, p95 = nearest_rank(times, 0.5), nearest_rank(times, 0.95)
        cases.append(
            {
                "case": case,
                "service_rps": rps,
                "healthy": healthy[(case, rps)],
                "steps": n,
                "holds": hits,
                "hold_rate": hits / n if n else 0.0,
                "hold_upper95": wilson_upper(hits, n),
                "detect_median_s": median if math.isfinite(median) else None,
                "detect_p95_s": p95 if math.isfinite(p95) else None,
            }
        )
    return cases


def print_srm_table(cases: list[dict[str, Any]], duration: float) -> None:
    print("\nsample-ratio mismatch (routed requests vs configured shares, every look):")
    print(
        f"{'case':<18} {'service rps':>11} {'steps':>6} {'holds':>6} {'rate':>8} "
        f"{'95% upper':>9} {'median s':>8} {'p95 s':>6}"
    )
    for c in cases:
        print(
            f"{c['case']:<18} {c['service_rps']:>11.0f} {c['steps']:>6} {c['holds']:>6} "
            f"{c['hold_rate']:>8.3%} {c['hold_upper95']:>9.3%} "
            f"{fmt_s(c['detect_median_s'], duration):>8} {fmt_s(c['detect_p95_s'], duration):>6}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--trials", type=int, default=400, help="trials per regression case")
    p.add_argument("--healthy-trials", type=int, default=1000, help="trials per healthy case")
    p.add_argument("--rps", type=float, nargs="+", default=[10, 100, 1000])
    p.add_argument("--interval", type=float, default=1.0, help="seconds between looks")
    p.add_argument("--duration", type=float, default=60.0, help="step length, seconds")
    p.add_argument("--window", type=float, default=10.0, help="guardrail window, seconds")
    p.add_argument(
        "--buckets",
        choices=sorted(BUCKET_SETS),
        default="xds-server",
        help="latency histogram bounds: as xds-server's bootstrap configures, or Envoy's own",
    )
    p.add_argument("--base-error-rate", type=float, default=0.01)
    p.add_argument(
        "--second-base-error-rate",
        type=float,
        default=None,
        help="also run every case at this base error rate (default 0.05, or 0.01 when "
        "--base-error-rate is 0.05; 0: do not)",
    )
    p.add_argument(
        "--regions", type=int, default=3, help="regions of the rollout (default 3, as the lab)"
    )
    p.add_argument(
        "--false-alarm-scope",
        choices=(FalseAlarmScope.ROLLOUT, FalseAlarmScope.STEP),
        default=FalseAlarmScope.ROLLOUT,
        help="analysis.false_alarm_scope: the level shared by the rollout (default) or per step",
    )
    p.add_argument(
        "--srm-steps", type=int, default=5000, help="healthy steps per SRM split and rps"
    )
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke test")
    p.add_argument(
        "--skip-custom",
        action="store_true",
        help="leave out the model-output (PSI) and custom-metric (value, ratio) cases",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.healthy_trials = min(args.trials, 12), min(args.healthy_trials, 20)
        args.srm_steps = min(args.srm_steps, 10)
    second = args.second_base_error_rate
    if second is None:
        second = 0.05 if args.base_error_rate != 0.05 else 0.01
    rates = [args.base_error_rate] + ([second] if second and second != args.base_error_rate else [])
    params = Params(
        args.interval,
        args.duration,
        args.window,
        BUCKET_SETS[args.buckets],
        args.regions,
        args.false_alarm_scope,
    )
    plan = params.plan()
    err_spec, lat_spec = plan.analysis.metrics[0], plan.analysis.metrics[1]

    started = time.perf_counter()
    tasks = build_tasks(args, rates, params)
    custom_tasks = [] if args.skip_custom else build_custom_tasks(args, params)
    srm_tasks = build_srm_tasks(args, params)
    if args.processes > 1:
        with multiprocessing.get_context("fork").Pool(args.processes) as pool:
            results = pool.map(run_task, tasks, chunksize=1)
            custom_results = pool.map(run_custom, custom_tasks, chunksize=1)
            srm_results = pool.map(run_srm, srm_tasks, chunksize=1)
    else:
        results = [run_task(t) for t in tasks]
        custom_results = [run_custom(t) for t in custom_tasks]
        srm_results = [run_srm(t) for t in srm_tasks]
    wall = time.perf_counter() - started

    times: dict[tuple[str, float, float], list[tuple[float, str]]] = {}
    for task, res in zip(tasks, results, strict=True):
        times.setdefault((task.scenario, task.rps, task.base_error_rate), []).extend(res)
    tests = params.tests_per_rollout
    cases = [summarise(s, r, rate, t, tests) for (s, r, rate), t in times.items()]

    primary = [c for c in cases if c["base_error_rate"] == args.base_error_rate]
    healthy = [c for c in primary if c["scenario"] == HEALTHY]
    worst = max(healthy, key=lambda c: c["false_rollback_rate"], default=None)
    target_case = next(
        (c for c in primary if c["scenario"] == ERRORS_2X and c["rps"] == DETECT_TARGET_RPS),
        None,
    )
    targets: dict[str, Any] = {}
    if worst is not None:
        targets["false_rollbacks"] = {
            "description": f"false rollbacks under {FALSE_ROLLBACK_TARGET:.0%} of healthy trials "
            f"(every rps, base error rate {args.base_error_rate:g})",
            "met": all(c["false_rollback_rate"] < FALSE_ROLLBACK_TARGET for c in healthy),
            "observed": f"worst {worst['false_rollback_rate']:.2%} at {worst['rps']:g} rps "
            f"(95% upper {worst['false_rollback_upper95']:.2%})",
        }
        per_rollout = max(c["false_rollback_rate_per_rollout"] for c in healthy)
        targets["false_rollbacks_per_rollout"] = {
            "description": f"false rollbacks under {FALSE_ROLLBACK_TARGET:.0%} of healthy "
            f"rollouts ({tests} steps x regions, from the per-step rate)",
            "met": per_rollout < FALSE_ROLLBACK_TARGET,
            "observed": f"worst {per_rollout:.2%} (95% upper "
            f"{max(c['false_rollback_per_rollout_upper95'] for c in healthy):.2%})",
        }
    if target_case is not None:
        p95 = target_case["detect_p95_s"]
        targets["errors_2x_detect"] = {
            "description": f"2x error rate at {DETECT_TARGET_RPS} rps detected within "
            f"{DETECT_TARGET_S:g}s in 95% of trials (base error rate {args.base_error_rate:g})",
            "met": p95 is not None and p95 <= DETECT_TARGET_S,
            "observed": f"p95 {fmt_s(p95, args.duration)}s, "
            f"{target_case['rollback_share']:.1%} detected within the step",
        }
    custom_cases = summarise_custom(custom_tasks, custom_results, tests)
    srm_cases = summarise_srm(srm_tasks, srm_results)
    srm_healthy = [c for c in srm_cases if c["healthy"]]
    if srm_healthy:
        worst_srm = max(srm_healthy, key=lambda c: c["hold_rate"])
        steps = sum(c["steps"] for c in srm_healthy)
        holds = sum(c["holds"] for c in srm_healthy)
        targets["srm_false_alarms"] = {
            "description": f"SRM holds under {SRM_TARGET:.1%} of healthy steps (every split "
            "and rps, looked at every interval)",
            "met": all(c["hold_rate"] < SRM_TARGET for c in srm_healthy),
            "observed": f"{holds} in {steps} healthy steps ({holds / steps:.3%}, 95% upper "
            f"{wilson_upper(holds, steps):.3%}); worst {worst_srm['hold_rate']:.3%} "
            f"({worst_srm['case']} at {worst_srm['service_rps']:g} rps)",
        }
    result = {
        "parameters": {
            "interval_s": args.interval,
            "duration_s": args.duration,
            "window_s": args.window,
            "rps_per_pool": args.rps,
            "base_error_rates": rates,
            "trials": args.trials,
            "healthy_trials": args.healthy_trials,
            "seed": args.seed,
            "processes": args.processes,
            "latency_model": LATENCY_MODEL,
            "buckets": args.buckets,
            "model_p50_ms": model_quantile(0.5),
            "model_p99_ms": model_quantile(0.99),
            "tail_p50_ms": model_quantile(0.5, 1.0, 1.3),
            "tail_p99_ms": model_quantile(0.99, 1.0, 1.3),
            "error_confidence": err_spec.confidence,
            "error_allowed_change": err_spec.allowed_change,
            "error_detect_change": err_spec.detect_change,
            "latency_confidence": lat_spec.confidence,
            "latency_quantile": lat_spec.quantile,
            "latency_allowed_change": lat_spec.allowed_change,
            "failures_before_rollback": plan.failures_before_rollback,
            "regions": args.regions,
            "false_alarm_scope": args.false_alarm_scope,
            "tests_per_rollout": tests,
            "tests_sharing_alpha": plan.analysis_tests(args.regions),
        },
        "cases": cases,
        "custom_cases": custom_cases,
        "srm_cases": srm_cases,
        "targets": targets,
        "wall_time_s": wall,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        if custom_tasks:
            print_custom_table(custom_cases, args.duration, tests)
        print_srm_table(srm_cases, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
