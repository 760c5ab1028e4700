"""The rollout plan: steps, timing, guardrails, region order and PromQL templates.

A plan comes from the spec's `rollout:` sections: the top-level one gives defaults, a
service's own overrides them key by key. Parsing reports problems through the spec
validator's `fail(path, message)`, so a plan mistake reads like any other spec mistake.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from xds_server.traffic import WEIGHT_TOTAL, Split

DEFAULT_QUERIES: Mapping[str, str] = {
    # Over Envoy's own cluster stats, scraped from each Envoy with a `region` label.
    "requests": 'sum(increase(envoy_cluster_upstream_rq_total{{region="{region}",'
    'envoy_cluster_name="{cluster}"}}[{window}]))',
    "errors": 'sum(increase(envoy_cluster_upstream_rq_xx{{region="{region}",'
    'envoy_cluster_name="{cluster}",envoy_response_code_class="5"}}[{window}]))',
    "p99_ms": "histogram_quantile(0.99, sum by (le) (rate(envoy_cluster_upstream_rq_time_bucket"
    '{{region="{region}",envoy_cluster_name="{cluster}"}}[{window}])))',
    # One series per bucket (`le`), counts of requests at or below each bound, in ms.
    "latency_buckets": "sum by (le) (increase(envoy_cluster_upstream_rq_time_bucket"
    '{{region="{region}",envoy_cluster_name="{cluster}"}}[{window}]))',
    # Every Envoy of the region: how many of the pool's hosts it sees, and how many healthy.
    "hosts": "sum(envoy_cluster_membership_total"
    '{{region="{region}",envoy_cluster_name="{cluster}"}})',
    "healthy_hosts": "sum(envoy_cluster_membership_healthy"
    '{{region="{region}",envoy_cluster_name="{cluster}"}})',
}
"""PromQL templates; `{region}`, `{cluster}` and `{window}` (like `30s`) are filled in."""


@dataclass(frozen=True)
class Guardrails:
    max_error_rate: float = 0.05
    """Ceiling on the canary's 5xx responses over all its responses."""
    max_p99_ms: float = 500.0
    min_requests: int = 20
    """Below this many canary requests in the window there is no evidence: hold."""


ERRORS, LATENCY, TAIL = "errors", "latency", "tail"
SCOPE_ROLLOUT, SCOPE_STEP = "rollout", "step"
INCREASE, DECREASE, EITHER = "increase", "decrease", "either"
NO_DATA_FAIL, NO_DATA_PAUSE, NO_DATA_PASS = "fail", "pause", "pass"


@dataclass(frozen=True)
class MetricSpec:
    """One statistical comparison of canary against its comparator (baseline or production).

    `errors` compares 5xx counts as proportions of requests; `latency` compares the
    request-time histograms (Mann-Whitney U on the buckets); `tail` compares the shares of
    requests slower than the two pools' joint `quantile` (a p99 regression that leaves
    the median alone). All are sequential tests: looking every interval does not raise
    the false-alarm rate above 1 - confidence (over the whole rollout, or per step: see
    `Analysis.false_alarm_scope`).
    """

    name: str
    kind: str = ERRORS
    direction: str = INCREASE
    """Which change is bad: an increase, a decrease, or either."""
    allowed_change: float = 1.0
    """Ratio canary/comparator that is not a regression (1.1: up to 10% worse is fine)."""
    detect_change: float = 2.0
    """errors: the ratio the data must be able to rule out before the metric may pass."""
    ignore_below: float = 0.01
    """errors: a canary error rate shown to be below this passes whatever the comparator."""
    quantile: float = 0.5
    """latency: the quantile whose ratio is the effect size (the effect-size floor);
    tail: the quantile that splits slow requests from the rest."""
    confidence: float = 0.99
    min_requests: int = 50
    """latency, tail: fewer samples on either side is no data."""
    critical: bool = False
    """A failure of a critical metric scores 0 and fails the verdict at once."""
    group: str = ""
    on_no_data: str = NO_DATA_FAIL
    """Too little data holds the step; once that hold reaches `max_hold`: fail, pause or
    pass this metric."""


DEFAULT_METRICS: tuple[MetricSpec, ...] = (
    # Too few requests to tell is not a failure: a person decides (pause), not the noise.
    MetricSpec("error_rate", ERRORS, critical=True, group="errors", on_no_data=NO_DATA_PAUSE),
    # The absolute p99 guardrail still holds when latency has too few samples to compare.
    MetricSpec("latency", LATENCY, allowed_change=1.1, group="latency", on_no_data=NO_DATA_PASS),
    # The slowest 1%: a regression there is what users of a model server feel first.
    MetricSpec(
        "latency_p99",
        TAIL,
        allowed_change=1.2,
        quantile=0.99,
        min_requests=200,
        critical=True,
        group="tail",
        on_no_data=NO_DATA_PASS,
    ),
)


@dataclass(frozen=True)
class Analysis:
    """How the statistical comparison is scored (Kayenta's model: groups, weights, 0-100)."""

    metrics: tuple[MetricSpec, ...] = DEFAULT_METRICS
    groups: Mapping[str, float] = field(
        default_factory=lambda: {"errors": 40, "latency": 40, "tail": 20}
    )
    """Weight of each metric group in the score; a group not listed weighs 1."""
    pass_score: float = 95.0
    marginal_score: float = 75.0
    """At or above: hold (neither pass nor fail); below: fail."""
    false_alarm_scope: str = SCOPE_ROLLOUT
    """What a metric's 1 - confidence bounds. `rollout`: its false alarms over the whole
    rollout, shared equally by the sequential tests it runs there (one per analysed phase
    and region), so a healthy canary is rarely rolled back however many steps and regions
    it crosses; `step`: each phase in each region on its own, as Kayenta's judge does."""


@dataclass(frozen=True)
class Webhook:
    name: str
    url: str
    timeout: float = 10.0
    retries: int = 2


@dataclass(frozen=True)
class HealthCheck:
    path: str = "/healthz"
    interval: float = 1.0
    timeout: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 2


@dataclass(frozen=True)
class Warmup:
    """What a region does before its canary and baseline pools take any user traffic."""

    health_check: HealthCheck | None = None
    """Active HTTP health checks on every pool; weight waits for healthy pools."""
    min_healthy: float = 1.0
    """Share of a pool's hosts every Envoy of the region must see healthy."""
    shadow_percent: float = 0.0
    """Share of production's requests mirrored to canary and baseline meanwhile."""
    shadow_duration: float = 0.0
    """How long shadow traffic is judged before the first real step; 0: no shadow phase."""
    slow_start: float = 0.0
    """Envoy's slow_start_config window for the canary cluster; 0: off."""
    webhooks: tuple[Webhook, ...] = ()

    @property
    def needed(self) -> bool:
        return bool(self.health_check or self.shadow_duration or self.webhooks)


@dataclass(frozen=True)
class RolloutPlan:
    steps: tuple[float, ...] = (5, 20, 75, 100)
    step_duration: float = 60.0
    interval: float = 10.0
    window: float = 60.0
    """The sliding analysis window; it never reaches back before the step's start."""
    ack_timeout: float = 30.0
    max_hold: float = 300.0
    on_max_hold: str = "rollback"
    failures_before_rollback: int = 2
    waves: tuple[tuple[str, ...], ...] | None = None
    """None: lockstep (every region passes a step before any moves on)."""
    guardrails: Guardrails = field(default_factory=Guardrails)
    analysis: Analysis = field(default_factory=Analysis)
    warmup: Warmup = field(default_factory=Warmup)
    queries: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_QUERIES))

    def wave_list(self, regions: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        return self.waves if self.waves is not None else (regions,)

    def analysis_tests(self, regions: int) -> int:
        """How many sequential tests each metric runs in a rollout over `regions` regions
        (steps below 100% and the shadow phase have a comparator), when its false-alarm
        level is shared by the rollout; 1 when it is per step."""
        if self.analysis.false_alarm_scope == SCOPE_STEP:
            return 1
        phases = sum(1 for w in self.steps if w < 100) + (1 if self.warmup.shadow_duration else 0)
        return max(1, phases * max(1, regions))


def split_for(canary_percent: float, has_baseline: bool) -> Split:
    """canary = w; baseline = min(w, 100 - w) when there is one; production the rest."""
    canary = round(canary_percent * WEIGHT_TOTAL / 100)
    baseline = min(canary, WEIGHT_TOTAL - canary) if has_baseline else 0
    return Split(WEIGHT_TOTAL - canary - baseline, baseline, canary)


# ---- parsing ----

Fail = Callable[[str, str], None]
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_PLAN_KEYS = {
    "steps",
    "step_duration",
    "interval",
    "window",
    "ack_timeout",
    "max_hold",
    "on_max_hold",
    "failures_before_rollback",
    "regions",
    "guardrails",
    "analysis",
    "warmup",
    "queries",
}


def parse_plan(
    value: Any, path: str, base: RolloutPlan, regions: tuple[str, ...], fail: Fail
) -> RolloutPlan:
    """Overlay a `rollout:` mapping on `base`; report each problem through `fail`."""
    if value is None:
        return base
    if not isinstance(value, dict):
        fail(path, "expected a mapping")
        return base
    for key in value:
        if key not in _PLAN_KEYS:
            fail(
                f"{path}.{key}", f"unknown field (expected one of: {', '.join(sorted(_PLAN_KEYS))})"
            )
    changes: dict[str, Any] = {}
    if "steps" in value:
        changes["steps"] = _steps(value["steps"], f"{path}.steps", fail) or base.steps
    for key in ("step_duration", "interval", "window", "ack_timeout", "max_hold"):
        if key in value:
            seconds = parse_duration(value[key])
            if seconds is None or seconds <= 0:
                fail(
                    f"{path}.{key}",
                    f"bad duration {value[key]!r}: expected a positive "
                    "number of seconds or a string like 500ms, 30s, 5m",
                )
            else:
                changes[key] = seconds
    if "on_max_hold" in value:
        if value["on_max_hold"] in ("rollback", "pause"):
            changes["on_max_hold"] = value["on_max_hold"]
        else:
            fail(f"{path}.on_max_hold", "expected 'rollback' or 'pause'")
    if "failures_before_rollback" in value:
        n = value["failures_before_rollback"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            fail(f"{path}.failures_before_rollback", f"expected a whole number >= 1, got {n!r}")
        else:
            changes["failures_before_rollback"] = n
    if "regions" in value:
        changes["waves"] = _waves(value["regions"], f"{path}.regions", regions, fail)
    if "guardrails" in value:
        changes["guardrails"] = _guardrails(
            value["guardrails"], f"{path}.guardrails", base.guardrails, fail
        )
    if "analysis" in value:
        changes["analysis"] = _analysis(value["analysis"], f"{path}.analysis", base.analysis, fail)
    if "warmup" in value:
        changes["warmup"] = _warmup(value["warmup"], f"{path}.warmup", base.warmup, fail)
    if "queries" in value:
        changes["queries"] = _queries(value["queries"], f"{path}.queries", base.queries, fail)
    return replace(base, **changes)


def parse_duration(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    return None


def _steps(value: Any, path: str, fail: Fail) -> tuple[float, ...] | None:
    if not isinstance(value, list) or not value:
        fail(path, "expected a non-empty list of canary percentages")
        return None
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 100 for v in value
    ):
        fail(path, f"each step must be a percentage above 0 and at most 100, got {value!r}")
        return None
    if any(b <= a for a, b in itertools.pairwise(value)):
        fail(path, f"steps must increase, got {value!r}")
        return None
    if value[-1] != 100:
        fail(path, f"the last step must be 100 (the canary takes all traffic), got {value[-1]}")
        return None
    return tuple(float(v) for v in value)


def _waves(
    value: Any, path: str, regions: tuple[str, ...], fail: Fail
) -> tuple[tuple[str, ...], ...] | None:
    if value == "lockstep":
        return None
    waves = value.get("waves") if isinstance(value, dict) and set(value) == {"waves"} else None
    if (
        not isinstance(waves, list)
        or not waves
        or not all(isinstance(w, list) and w for w in waves)
    ):
        fail(path, "expected 'lockstep' or {waves: [[region, ...], ...]}")
        return None
    seen: list[str] = []
    for i, wave in enumerate(waves):
        for r in wave:
            if r not in regions:
                fail(f"{path}.waves[{i}]", f"unknown region {r!r} (regions: {', '.join(regions)})")
            elif r in seen:
                fail(f"{path}.waves[{i}]", f"region {r!r} is in more than one wave")
            seen.append(r)
    missing = [r for r in regions if r not in seen]
    if missing:
        fail(f"{path}.waves", f"regions in no wave: {', '.join(missing)}")
    return tuple(tuple(w) for w in waves)


def _guardrails(value: Any, path: str, base: Guardrails, fail: Fail) -> Guardrails:
    if not isinstance(value, dict):
        fail(path, "expected a mapping")
        return base
    known = {f.name for f in fields(Guardrails)}
    changes: dict[str, Any] = {}
    for key, v in value.items():
        if key not in known:
            fail(f"{path}.{key}", f"unknown field (expected one of: {', '.join(sorted(known))})")
            continue
        number = _number(v)
        if number is None or number < 0:
            fail(f"{path}.{key}", f"expected a non-negative number, got {v!r}")
        elif key == "min_requests":
            changes[key] = int(number)
        else:
            changes[key] = number
    return replace(base, **changes)


def _number(v: Any) -> float | None:
    """A number, or a percentage string like '5%' (as a fraction)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            return float(v.strip()[:-1]) / 100
        except ValueError:
            return None
    return None


def _queries(value: Any, path: str, base: Mapping[str, str], fail: Fail) -> Mapping[str, str]:
    if not isinstance(value, dict):
        fail(path, "expected a mapping of measurement to PromQL template")
        return base
    out = dict(base)
    for key, template in value.items():
        if key not in DEFAULT_QUERIES:
            fail(
                f"{path}.{key}",
                f"unknown measurement (expected one of: {', '.join(DEFAULT_QUERIES)})",
            )
        elif not isinstance(template, str) or not template.strip():
            fail(f"{path}.{key}", "expected a PromQL template string")
        else:
            try:
                template.format(region="r", cluster="c", window="1s")
            except (KeyError, IndexError, ValueError) as exc:
                fail(
                    f"{path}.{key}",
                    f"bad template: {exc!r}; use {{region}}, {{cluster}}, "
                    "{window}, and double braces {{ }} for PromQL's own",
                )
                continue
            out[key] = template
    return out


def _analysis(value: Any, path: str, base: Analysis, fail: Fail) -> Analysis:
    keys = {"metrics", "groups", "pass_score", "marginal_score", "false_alarm_scope"}
    m = _mapping(value, path, keys, fail)
    changes: dict[str, Any] = {}
    if "false_alarm_scope" in m:
        if m["false_alarm_scope"] not in (SCOPE_ROLLOUT, SCOPE_STEP):
            fail(
                f"{path}.false_alarm_scope",
                f"expected {SCOPE_ROLLOUT} or {SCOPE_STEP}, got {m['false_alarm_scope']!r}",
            )
        else:
            changes["false_alarm_scope"] = m["false_alarm_scope"]
    for key in ("pass_score", "marginal_score"):
        if key in m:
            n = _number(m[key])
            if n is None or not 0 <= n <= 100:
                fail(f"{path}.{key}", f"expected a score from 0 to 100, got {m[key]!r}")
            else:
                changes[key] = n
    if changes.get("marginal_score", base.marginal_score) > changes.get(
        "pass_score", base.pass_score
    ):
        fail(f"{path}.marginal_score", "must not be above pass_score")
    if "groups" in m:
        groups = m["groups"]
        if not isinstance(groups, dict) or not all(
            isinstance(k, str) and (w := _number(v)) is not None and w > 0
            for k, v in groups.items()
        ):
            fail(f"{path}.groups", "expected a mapping of group name to a positive weight")
        else:
            changes["groups"] = {k: float(v) for k, v in groups.items()}
    if "metrics" in m:
        metrics = m["metrics"]
        if not isinstance(metrics, dict) or not metrics:
            fail(f"{path}.metrics", "expected a non-empty mapping of metric name to settings")
        else:
            changes["metrics"] = tuple(
                _metric(str(name), spec, f"{path}.metrics.{name}", fail)
                for name, spec in metrics.items()
            )
    return replace(base, **changes)


_CHOICES = {
    "kind": (ERRORS, LATENCY, TAIL),
    "direction": (INCREASE, DECREASE, EITHER),
    "on_no_data": (NO_DATA_FAIL, NO_DATA_PAUSE, NO_DATA_PASS),
}


def _metric(name: str, value: Any, path: str, fail: Fail) -> MetricSpec:
    known = {f.name for f in fields(MetricSpec)} - {"name"}
    m = _mapping(value if value is not None else {}, path, known, fail)
    default = next((d for d in DEFAULT_METRICS if d.name == name), None)
    kind = m.get("kind", default.kind if default else ERRORS)
    base = default if default is not None and default.kind == kind else MetricSpec(name, kind)
    if kind == LATENCY and default is None:
        base = replace(base, allowed_change=1.1, on_no_data=NO_DATA_PASS)
    if kind == TAIL and default is None:
        base = replace(
            base, allowed_change=1.2, quantile=0.99, min_requests=200, on_no_data=NO_DATA_PASS
        )
    if kind not in _CHOICES["kind"]:
        base = MetricSpec(name)
    changes: dict[str, Any] = {}
    for key, v in m.items():
        if key in _CHOICES:
            if v not in _CHOICES[key]:
                fail(f"{path}.{key}", f"expected one of: {', '.join(_CHOICES[key])}; got {v!r}")
            else:
                changes[key] = v
        elif key in ("critical",):
            if not isinstance(v, bool):
                fail(f"{path}.{key}", f"expected true or false, got {v!r}")
            else:
                changes[key] = v
        elif key == "group":
            changes[key] = str(v)
        elif key == "min_requests":
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail(f"{path}.{key}", f"expected a whole number >= 1, got {v!r}")
            else:
                changes[key] = v
        else:
            n = _number(v)
            limits = {
                "allowed_change": (1.0, None),
                "detect_change": (1.0, None),
                "ignore_below": (0.0, 1.0),
                "quantile": (0.0, 1.0),
                "confidence": (0.5, 1.0),
            }[key]
            lo, hi = limits
            if n is None or n < lo or (hi is not None and n >= hi and key != "ignore_below"):
                bound = f"from {lo:g}" + (f" to below {hi:g}" if hi is not None else " up")
                fail(f"{path}.{key}", f"expected a number {bound}, got {v!r}")
            else:
                changes[key] = n
    out = replace(base, **changes)
    if out.detect_change <= out.allowed_change and out.kind == ERRORS:
        fail(f"{path}.detect_change", "must be above allowed_change")
    if not out.group:
        out = replace(out, group=out.kind)
    return out


def _warmup(value: Any, path: str, base: Warmup, fail: Fail) -> Warmup:
    keys = {"health_check", "min_healthy", "shadow", "slow_start", "webhooks"}
    m = _mapping(value, path, keys, fail)
    changes: dict[str, Any] = {}
    if "health_check" in m:
        hc = m["health_check"]
        if hc is None or hc is False:
            changes["health_check"] = None
        else:
            changes["health_check"] = _health_check(
                {} if hc is True else hc, f"{path}.health_check", fail
            )
    if "min_healthy" in m:
        n = _number(m["min_healthy"])
        if n is None or not 0 < n <= 1:
            fail(
                f"{path}.min_healthy",
                f"expected a share above 0 and at most 1, got {m['min_healthy']!r}",
            )
        else:
            changes["min_healthy"] = n
    if "shadow" in m:
        sh = _mapping(m["shadow"], f"{path}.shadow", {"percent", "duration"}, fail)
        pct = sh.get("percent", 10)
        if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 < pct <= 100:
            fail(
                f"{path}.shadow.percent", f"expected a percentage above 0, at most 100, got {pct!r}"
            )
        else:
            changes["shadow_percent"] = float(pct)
        if "duration" not in sh:
            fail(f"{path}.shadow.duration", "required: how long shadow traffic is judged")
        else:
            d = parse_duration(sh["duration"])
            if d is None or d <= 0:
                fail(f"{path}.shadow.duration", f"bad duration {sh['duration']!r}")
            else:
                changes["shadow_duration"] = d
    if "slow_start" in m:
        d = parse_duration(m["slow_start"])
        if d is None or d < 0:
            fail(f"{path}.slow_start", f"bad duration {m['slow_start']!r}")
        else:
            changes["slow_start"] = d
    if "webhooks" in m:
        hooks = m["webhooks"]
        if not isinstance(hooks, list):
            fail(f"{path}.webhooks", "expected a list of {name, url, timeout?, retries?}")
        else:
            changes["webhooks"] = tuple(
                h
                for i, raw in enumerate(hooks)
                if (h := _webhook(raw, f"{path}.webhooks[{i}]", fail)) is not None
            )
    return replace(base, **changes)


def _health_check(value: Any, path: str, fail: Fail) -> HealthCheck:
    known = {f.name for f in fields(HealthCheck)}
    m = _mapping(value, path, known, fail)
    changes: dict[str, Any] = {}
    for key, v in m.items():
        if key == "path":
            if not isinstance(v, str) or not v.startswith("/"):
                fail(f"{path}.path", f"expected an HTTP path starting with '/', got {v!r}")
            else:
                changes[key] = v
        elif key in ("interval", "timeout"):
            d = parse_duration(v)
            if d is None or d <= 0:
                fail(f"{path}.{key}", f"bad duration {v!r}")
            else:
                changes[key] = d
        elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
            fail(f"{path}.{key}", f"expected a whole number >= 1, got {v!r}")
        else:
            changes[key] = v
    return replace(HealthCheck(), **changes)


def _webhook(value: Any, path: str, fail: Fail) -> Webhook | None:
    m = _mapping(value, path, {"name", "url", "timeout", "retries"}, fail)
    url = m.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        fail(f"{path}.url", f"expected an http(s) URL, got {url!r}")
        return None
    hook = Webhook(str(m.get("name", url)), url)
    if "timeout" in m:
        d = parse_duration(m["timeout"])
        if d is None or d <= 0:
            fail(f"{path}.timeout", f"bad duration {m['timeout']!r}")
        else:
            hook = replace(hook, timeout=d)
    if "retries" in m:
        r = m["retries"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            fail(f"{path}.retries", f"expected a whole number >= 0, got {r!r}")
        else:
            hook = replace(hook, retries=r)
    return hook


def _mapping(value: Any, path: str, known: set[str], fail: Fail) -> dict[str, Any]:
    if not isinstance(value, dict):
        fail(path, "expected a mapping")
        return {}
    for key in value:
        if key not in known:
            fail(f"{path}.{key}", f"unknown field (expected one of: {', '.join(sorted(known))})")
    return {k: v for k, v in value.items() if k in known}
