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
}
"""PromQL templates; `{region}`, `{cluster}` and `{window}` (like `30s`) are filled in."""


@dataclass(frozen=True)
class Guardrails:
    max_error_rate: float = 0.05
    """Ceiling on the canary's 5xx responses over all its responses."""
    max_p99_ms: float = 500.0
    min_requests: int = 20
    """Below this many canary requests in the window there is no evidence: hold."""
    max_error_rate_increase: float | None = 0.02
    """Canary error rate minus baseline error rate, when a baseline has data."""
    max_p99_ratio: float | None = 1.5
    """Canary p99 over baseline p99, when a baseline has data."""
    p99_ratio_floor_ms: float = 25.0
    """Below this canary p99 the ratio is not judged: 3 ms against 1 ms is noise, not a
    regression (an effect-size floor, as Kayenta's judge has)."""


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
    queries: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_QUERIES))

    def wave_list(self, regions: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        return self.waves if self.waves is not None else (regions,)


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
        optional = key in ("max_error_rate_increase", "max_p99_ratio")
        if v is None and optional:
            changes[key] = None
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
