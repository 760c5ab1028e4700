"""Parsing a `rollout:` section into a `RolloutPlan`, overlaid on its defaults.

The top-level section overlays the built-in defaults and a service's own section
overlays the top-level result, key by key; every problem goes to the spec's `Checker`,
so a plan mistake reads like any other spec mistake.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from xds_server.spec.checker import Checker
from xds_server.spec.rollout import (
    BUILTIN_KINDS,
    DEFAULT_METRICS,
    DEFAULT_QUERIES,
    QUERY_PLACEHOLDERS,
    USER_QUERY_KINDS,
    Analysis,
    CheckType,
    FalseAlarmScope,
    Gate,
    Guardrails,
    HealthCheck,
    MatchRule,
    MetricKind,
    MetricSpec,
    OnMaxHold,
    RolloutPlan,
    Sticky,
    TenantBudget,
    Tenants,
    Warmup,
    Webhook,
    metric_defaults,
)
from xds_server.spec.values import parse_number

_PLAN_KEYS = (
    "steps",
    "step_duration",
    "interval",
    "window",
    "ack_timeout",
    "ack_quorum",
    "nack_tolerance",
    "max_hold",
    "on_max_hold",
    "failures_before_rollback",
    "regions",
    "guardrails",
    "analysis",
    "warmup",
    "queries",
    "bake",
    "confirm_step",
    "canary_match",
    "sticky",
)
_DURATIONS = ("step_duration", "interval", "window", "ack_timeout", "max_hold")
_HEADER_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}")
"""An HTTP header (or cookie) name: an RFC 9110 token."""


def parse_plan(
    c: Checker, value: Any, path: str, base: RolloutPlan, regions: tuple[str, ...]
) -> RolloutPlan:
    """Overlay a `rollout:` mapping on `base`."""
    if value is None:
        return base
    m = c.mapping(value, path, _PLAN_KEYS)
    changes: dict[str, Any] = {}
    if "steps" in m and (parsed := _steps(c, m["steps"], f"{path}.steps")) is not None:
        changes["steps"], changes["gates"] = parsed
    if "bake" in m and (bake := c.duration(m["bake"], f"{path}.bake", zero_ok=True)) is not None:
        changes["bake"] = bake
    if "confirm_step" in m:
        changes["confirm_step"] = _webhooks(c, m["confirm_step"], f"{path}.confirm_step")
    if "canary_match" in m:
        changes["canary_match"] = _canary_match(c, m["canary_match"], f"{path}.canary_match")
    if "sticky" in m:
        changes["sticky"] = _sticky(c, m["sticky"], f"{path}.sticky")
    for key in _DURATIONS:
        if key in m and (seconds := c.duration(m[key], f"{path}.{key}")) is not None:
            changes[key] = seconds
    if "on_max_hold" in m and (
        rule := c.choice(m["on_max_hold"], f"{path}.on_max_hold", OnMaxHold)
    ):
        changes["on_max_hold"] = rule
    if "failures_before_rollback" in m:
        n = c.whole_number(m["failures_before_rollback"], f"{path}.failures_before_rollback", 1)
        if n is not None:
            changes["failures_before_rollback"] = n
    changes.update(_ack_gate(c, m, path, base))
    if "regions" in m:
        changes["waves"] = _waves(c, m["regions"], f"{path}.regions", regions)
    if "guardrails" in m:
        changes["guardrails"] = _guardrails(
            c, m["guardrails"], f"{path}.guardrails", base.guardrails
        )
    if "analysis" in m:
        changes["analysis"] = _analysis(c, m["analysis"], f"{path}.analysis", base.analysis)
    if "warmup" in m:
        changes["warmup"] = _warmup(c, m["warmup"], f"{path}.warmup", base.warmup)
    if "queries" in m:
        changes["queries"] = _queries(c, m["queries"], f"{path}.queries", base.queries)
    return replace(base, **changes)


def _ack_gate(c: Checker, m: dict[str, Any], path: str, base: RolloutPlan) -> dict[str, Any]:
    """`ack_quorum` (a share above 0, at most 1) and `nack_tolerance` (a count of
    nodes); tolerating a NACK needs a quorum below 1 (at 1 every node must ACK)."""
    out: dict[str, Any] = {}
    if "ack_quorum" in m:
        q = c.number(
            m["ack_quorum"],
            f"{path}.ack_quorum",
            0,
            1,
            "a share of the region's nodes above 0 and at most 1 (0.9 or '90%')",
            open_low=True,
        )
        if q is not None:
            out["ack_quorum"] = q
    if "nack_tolerance" in m:
        n = c.whole_number(m["nack_tolerance"], f"{path}.nack_tolerance", 0)
        if n is not None:
            out["nack_tolerance"] = n
    quorum = out.get("ack_quorum", base.ack_quorum)
    if out.get("nack_tolerance", 0) > 0 and quorum >= 1:
        c.fail(
            f"{path}.nack_tolerance",
            "tolerating NACKs needs ack_quorum below 1 (at 1 every node must ACK the routes)",
        )
    return out


def _steps(c: Checker, value: Any, path: str) -> tuple[tuple[float, ...], dict[int, Gate]] | None:
    """Percentages, with `{pause: DURATION}` or `{pause: until_promoted}` between them:
    (the steps, the gates by the index of the step each follows)."""
    if not isinstance(value, list) or not value:
        c.fail(path, "expected a non-empty list of canary percentages")
        return None
    steps: list[Any] = []
    gates: dict[int, Gate] = {}
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            steps.append(item)
            continue
        gate = _gate(c, item, f"{path}[{i}]")
        if gate is None:
            return None
        if not steps or (len(steps) - 1) in gates:
            c.fail(f"{path}[{i}]", "a pause must follow a step (a percentage)")
            return None
        gates[len(steps) - 1] = gate
    if not steps:
        c.fail(path, "expected a non-empty list of canary percentages")
        return None
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 100 for v in steps
    ):
        c.fail(path, f"each step must be a percentage above 0 and at most 100, got {value!r}")
        return None
    if any(b <= a for a, b in itertools.pairwise(steps)):
        c.fail(path, f"steps must increase, got {steps!r}")
        return None
    if steps[-1] != 100:
        c.fail(path, f"the last step must be 100 (the canary takes all traffic), got {steps[-1]}")
        return None
    if len(steps) - 1 in gates:
        c.fail(path, "a pause after the last step: use `bake` to hold at 100%")
        return None
    return tuple(float(v) for v in steps), gates


def _gate(c: Checker, item: dict[Any, Any], path: str) -> Gate | None:
    if set(item) != {"pause"}:
        c.fail(path, f"expected a percentage or {{pause: DURATION | until_promoted}}, got {item!r}")
        return None
    if item["pause"] == "until_promoted":
        return Gate()
    seconds = c.duration(item["pause"], f"{path}.pause")
    return Gate(seconds) if seconds is not None else None


def _webhooks(c: Checker, value: Any, path: str) -> tuple[Webhook, ...]:
    if not isinstance(value, list):
        c.fail(path, "expected a list of {name, url, timeout?, retries?}")
        return ()
    return tuple(
        h for i, raw in enumerate(value) if (h := _webhook(c, raw, f"{path}[{i}]")) is not None
    )


def _header_or_cookie(c: Checker, m: dict[str, Any], path: str) -> dict[str, str] | None:
    """Exactly one of `header:` and `cookie:`, a valid name; header names lowercased."""
    given = [k for k in ("header", "cookie") if k in m]
    if len(given) != 1:
        c.fail(path, "expected exactly one of `header:` and `cookie:`")
        return None
    key = given[0]
    name = m[key]
    if not isinstance(name, str) or not _HEADER_RE.fullmatch(name):
        c.fail(f"{path}.{key}", f"expected a {key} name (letters, digits, '-', ...), got {name!r}")
        return None
    if key == "header" and name.lower() in ("cookie", "host", ":authority", ":path"):
        c.fail(f"{path}.header", f"{name!r} cannot be matched on (use `cookie:` for cookies)")
        return None
    return {key: name.lower() if key == "header" else name}


def _canary_match(c: Checker, value: Any, path: str) -> tuple[MatchRule, ...]:
    if not isinstance(value, list):
        c.fail(path, "expected a list of {header: NAME, value: V} or {cookie: NAME, value: V}")
        return ()
    rules = []
    for i, raw in enumerate(value):
        m = c.mapping(raw, f"{path}[{i}]", ("header", "cookie", "value"))
        which = _header_or_cookie(c, m, f"{path}[{i}]")
        v = m.get("value")
        if not isinstance(v, str | int) or isinstance(v, bool) or not str(v):
            c.fail(f"{path}[{i}].value", f"expected the exact value to match, got {v!r}")
            continue
        if which is not None:
            rules.append(MatchRule(str(v), **which))
    return tuple(rules)


def _sticky(c: Checker, value: Any, path: str) -> Sticky | None:
    if value is None or value is False:
        return None
    which = _header_or_cookie(c, c.mapping(value, path, ("header", "cookie")), path)
    return Sticky(**which) if which is not None else None


def _waves(
    c: Checker, value: Any, path: str, regions: tuple[str, ...]
) -> tuple[tuple[str, ...], ...] | None:
    if value == "lockstep":
        return None
    waves = value.get("waves") if isinstance(value, dict) and set(value) == {"waves"} else None
    if (
        not isinstance(waves, list)
        or not waves
        or not all(isinstance(w, list) and w for w in waves)
    ):
        c.fail(path, "expected 'lockstep' or {waves: [[region, ...], ...]}")
        return None
    seen: list[str] = []
    for i, wave in enumerate(waves):
        for r in wave:
            if r not in regions:
                c.fail(
                    f"{path}.waves[{i}]", f"unknown region {r!r} (regions: {', '.join(regions)})"
                )
            elif r in seen:
                c.fail(f"{path}.waves[{i}]", f"region {r!r} is in more than one wave")
            seen.append(r)
    missing = [r for r in regions if r not in seen]
    if missing:
        c.fail(f"{path}.waves", f"regions in no wave: {', '.join(missing)}")
    return tuple(tuple(w) for w in waves)


def _guardrails(c: Checker, value: Any, path: str, base: Guardrails) -> Guardrails:
    m = c.mapping(value, path, [f.name for f in fields(Guardrails)])
    changes: dict[str, Any] = {}
    for key, v in m.items():
        n: float | None
        if key == "tenants":
            changes[key] = _tenants(c, v, f"{path}.tenants")
            continue
        if key == "min_requests":
            n = c.whole_number(v, f"{path}.{key}", 0)
        elif key in ("max_error_rate", "min_throughput_ratio"):
            n = c.number(v, f"{path}.{key}", 0, 1, "a share from 0 to 1 (or a percentage)")
        else:
            n = c.number(v, f"{path}.{key}", 0, None, "a non-negative number")
        if n is not None:
            changes[key] = n
    return replace(base, **changes)


def _tenants(c: Checker, value: Any, path: str) -> Tenants:
    m = c.mapping(value, path, ("header", "budgets", "min_requests"))
    out = Tenants()
    if "header" in m:
        if not isinstance(m["header"], str) or not m["header"].strip():
            c.fail(f"{path}.header", "expected the header that names the tenant")
        else:
            out = replace(out, header=m["header"].lower())
    if "min_requests" in m:
        n = c.whole_number(m["min_requests"], f"{path}.min_requests", 1)
        if n is not None:
            out = replace(out, min_requests=n)
    budgets = m.get("budgets", {})
    if not isinstance(budgets, dict) or not budgets:
        c.fail(f"{path}.budgets", "expected {TENANT: {max_p99_ms?, max_error_rate?}, ...}")
        return out
    parsed: dict[str, TenantBudget] = {}
    for name, raw in budgets.items():
        where = f"{path}.budgets.{name}"
        b = c.mapping(raw, where, ("max_p99_ms", "max_error_rate"))
        if not b:
            c.fail(where, "expected max_p99_ms and/or max_error_rate")
            continue
        p99 = b.get("max_p99_ms")
        rate = b.get("max_error_rate")
        what = "a non-negative number"
        budget = TenantBudget(
            c.number(p99, f"{where}.max_p99_ms", 0, None, what) if p99 is not None else None,
            c.number(rate, f"{where}.max_error_rate", 0, 1, "a share from 0 to 1")
            if rate is not None
            else None,
        )
        parsed[str(name)] = budget
    return replace(out, budgets=parsed)


def _queries(c: Checker, value: Any, path: str, base: Any) -> Any:
    m = c.mapping(value, path, DEFAULT_QUERIES)
    out = dict(base)
    for key, template in m.items():
        if _template(c, template, f"{path}.{key}"):
            out[key] = template
    return out


def _template(c: Checker, template: Any, path: str) -> bool:
    """A PromQL template that fills in: only the known placeholders, PromQL's own
    braces doubled."""
    if not isinstance(template, str) or not template.strip():
        c.fail(path, "expected a PromQL template string")
        return False
    try:
        template.format(**{name: "x" for name in QUERY_PLACEHOLDERS})
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
        # ({region.x} and {region[a]} reach into the value: AttributeError, TypeError)
        names = ", ".join(f"{{{n}}}" for n in QUERY_PLACEHOLDERS)
        c.fail(
            path,
            f"bad template: {exc!r}; use {names}, and double braces {{{{ }}}} for PromQL's own",
        )
        return False
    return True


def _analysis(c: Checker, value: Any, path: str, base: Analysis) -> Analysis:
    keys = ("metrics", "groups", "pass_score", "marginal_score", "false_alarm_scope")
    m = c.mapping(value, path, keys)
    changes: dict[str, Any] = {}
    if "false_alarm_scope" in m:
        scope = c.choice(m["false_alarm_scope"], f"{path}.false_alarm_scope", FalseAlarmScope)
        if scope is not None:
            changes["false_alarm_scope"] = scope
    for key in ("pass_score", "marginal_score"):
        if key in m:
            n = c.number(m[key], f"{path}.{key}", 0, 100, "a score from 0 to 100")
            if n is not None:
                changes[key] = n
    if changes.get("marginal_score", base.marginal_score) > changes.get(
        "pass_score", base.pass_score
    ):
        c.fail(f"{path}.marginal_score", "must not be above pass_score")
    if "groups" in m:
        groups = m["groups"]
        if not isinstance(groups, dict) or not all(
            isinstance(k, str) and (w := _finite(v)) is not None and w > 0
            for k, v in groups.items()
        ):
            c.fail(f"{path}.groups", "expected a mapping of group name to a positive weight")
        else:
            changes["groups"] = {k: float(v) for k, v in groups.items()}
    if "metrics" in m:
        metrics = m["metrics"]
        if not isinstance(metrics, dict) or not metrics:
            c.fail(f"{path}.metrics", "expected a non-empty mapping of metric name to settings")
        else:
            changes["metrics"] = tuple(
                _metric(c, str(name), spec, f"{path}.metrics.{name}")
                for name, spec in metrics.items()
            )
    return replace(base, **changes)


def _finite(v: Any) -> float | None:
    """A YAML number as a finite float; None otherwise (also for an integer too large
    for a float, where math.isfinite and float() raise OverflowError)."""
    n = parse_number(v) if isinstance(v, int | float) else None
    return n if n is not None and math.isfinite(n) else None


_METRIC_RANGES: dict[str, tuple[float, float | None, bool, str]] = {
    # low, high, high excluded, how the range reads
    "allowed_change": (1.0, None, False, "a number from 1 up"),
    "detect_change": (1.0, None, False, "a number from 1 up"),
    "ignore_below": (0.0, 1.0, False, "a number from 0 to 1"),
    "quantile": (0.0, 1.0, True, "a number from 0 to below 1"),
    "confidence": (0.5, 1.0, True, "a number from 0.5 to below 1"),
}


def _metric(c: Checker, name: str, value: Any, path: str) -> MetricSpec:
    known = [f.name for f in fields(MetricSpec) if f.name != "name"]
    m = c.mapping(value if value is not None else {}, path, known)
    default = next((d for d in DEFAULT_METRICS if d.name == name), None)
    kind = m.get("kind", BUILTIN_KINDS.get(name, MetricKind.ERRORS))
    if "kind" in m:
        kind = c.choice(kind, f"{path}.kind", MetricKind) or MetricKind.ERRORS
    elif name not in BUILTIN_KINDS and {"query", "numerator", "denominator"} & set(m):
        c.fail(f"{path}.kind", "required for a metric of your own: ratio, value or distribution")
    base = default if default is not None and default.kind == kind else metric_defaults(name, kind)
    changes: dict[str, Any] = {}
    for key, v in m.items():
        field_path = f"{path}.{key}"
        if key == "kind":
            continue
        if key in ("query", "numerator", "denominator"):
            if _template(c, v, field_path):
                changes[key] = v
            continue
        if key in ("max", "min"):
            changes[key] = c.number(v, field_path, -math.inf, None, "a number")
            continue
        if kind == MetricKind.OUTPUT and key in ("allowed_change", "fail_change"):
            what = "a PSI above 0"
            changes[key] = c.number(v, field_path, 0, None, what, open_low=True)
            continue
        if key in ("direction", "on_no_data"):
            enum = type(getattr(base, key))
            parsed: Any = c.choice(v, field_path, enum)
        elif key == "critical":
            parsed = c.boolean(v, field_path)
        elif key == "group":
            parsed = str(v)
        elif key == "min_requests":
            parsed = c.whole_number(v, field_path, 1)
        else:
            low, high, open_high, what = _METRIC_RANGES[key]
            parsed = c.number(v, field_path, low, high, what, open_high=open_high)
        if parsed is not None:
            changes[key] = parsed
    out = replace(base, **{k: v for k, v in changes.items() if v is not None})
    if out.detect_change <= out.allowed_change and out.kind in (
        MetricKind.ERRORS,
        MetricKind.CLIENT_ERRORS,
        MetricKind.RATIO,
    ):
        c.fail(f"{path}.detect_change", "must be above allowed_change")
    _check_queries(c, out, path)
    return out


def _check_queries(c: Checker, m: MetricSpec, path: str) -> None:
    """Each kind has the queries it reads, and no others."""
    if m.kind == MetricKind.RATIO and not (m.numerator and m.denominator):
        c.fail(path, "a ratio metric needs `numerator:` and `denominator:` queries")
    elif m.kind in (MetricKind.VALUE, MetricKind.DISTRIBUTION) and not m.query:
        c.fail(f"{path}.query", f"required: the PromQL template a {m.kind} metric reads")
    elif m.kind not in USER_QUERY_KINDS and (m.query or m.numerator or m.denominator):
        c.fail(path, f"a {m.kind} metric reads Envoy's stats: it takes no query")
    if m.kind != MetricKind.RATIO and (m.numerator or m.denominator):
        c.fail(path, "`numerator:` and `denominator:` are for ratio metrics (others: `query:`)")
    if m.fail_change is not None and m.fail_change < m.allowed_change:
        c.fail(f"{path}.fail_change", "must be at least allowed_change")
    if m.max is not None and m.min is not None and m.min > m.max:
        c.fail(f"{path}.min", "must not be above max")


def _warmup(c: Checker, value: Any, path: str, base: Warmup) -> Warmup:
    keys = ("health_check", "min_healthy", "shadow", "slow_start", "webhooks")
    m = c.mapping(value, path, keys)
    changes: dict[str, Any] = {}
    if "health_check" in m:
        hc = m["health_check"]
        if hc is None or hc is False:
            changes["health_check"] = None
        else:
            changes["health_check"] = parse_health_check(
                c, {} if hc is True else hc, f"{path}.health_check"
            )
    if "min_healthy" in m:
        what = "a share above 0 and at most 1"
        n = c.number(m["min_healthy"], f"{path}.min_healthy", 0, 1, what, open_low=True)
        if n is not None:
            changes["min_healthy"] = n
    if "shadow" in m:
        changes.update(_shadow(c, m["shadow"], f"{path}.shadow"))
    if "slow_start" in m:
        d = c.duration(m["slow_start"], f"{path}.slow_start", zero_ok=True)
        if d is not None:
            changes["slow_start"] = d
    if "webhooks" in m:
        changes["webhooks"] = _webhooks(c, m["webhooks"], f"{path}.webhooks")
    return replace(base, **changes)


def _shadow(c: Checker, value: Any, path: str) -> dict[str, float]:
    sh = c.mapping(value, path, ("percent", "duration"))
    out: dict[str, float] = {}
    pct = sh.get("percent", 10)
    if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 < pct <= 100:
        c.fail(f"{path}.percent", f"expected a percentage above 0, at most 100, got {pct!r}")
    else:
        out["shadow_percent"] = float(pct)
    if "duration" not in sh:
        c.fail(f"{path}.duration", "required: how long shadow traffic is judged")
    elif (d := c.duration(sh["duration"], f"{path}.duration")) is not None:
        out["shadow_duration"] = d
    return out


def parse_health_check(c: Checker, value: Any, path: str) -> HealthCheck:
    """A `health_check:` mapping (`true`: every default), at `path`."""
    if value is True:
        value = {}
    m = c.mapping(value, path, [f.name for f in fields(HealthCheck) if f.init and f.compare])
    changes: dict[str, Any] = {"where": path, "given": frozenset(m)}
    for key, v in m.items():
        if key == "type":
            if (kind := c.choice(v, f"{path}.type", CheckType)) is not None:
                changes[key] = kind
        elif key == "path":
            if not isinstance(v, str) or not v.startswith("/"):
                c.fail(f"{path}.path", f"expected an HTTP path starting with '/', got {v!r}")
            else:
                changes[key] = v
        elif key == "grpc_service":
            if not isinstance(v, str):
                c.fail(f"{path}.{key}", f'expected a gRPC service name (or ""), got {v!r}')
            else:
                changes[key] = v
        elif key == "model":
            if not isinstance(v, str | int) or isinstance(v, bool) or not str(v).strip():
                c.fail(f"{path}.model", f"expected the name the model is served under, got {v!r}")
            else:
                changes[key] = str(v)
        elif key in ("interval", "timeout"):
            if (d := c.duration(v, f"{path}.{key}")) is not None:
                changes[key] = d
        elif key == "port":
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
                c.fail(f"{path}.port", f"bad port {v!r}: expected an integer from 1 to 65535")
            else:
                changes[key] = v
        elif (n := c.whole_number(v, f"{path}.{key}", 1)) is not None:
            changes[key] = n
    return replace(HealthCheck(), **changes)


_READ_BY = {"path": CheckType.HTTP, "grpc_service": CheckType.GRPC, "model": CheckType.OIP}
"""The health-check fields that one type of check reads, and no other."""


def check_health(
    c: Checker,
    hc: HealthCheck | None,
    service: str,
    grpc: bool,
    health_ports: Mapping[str, bool],
) -> None:
    """What a service's warm-up check means once its protocol is known; every field the
    check would ignore is an error at the field it was written at. `health_ports`:
    endpoint field path -> True (the endpoints that name a `health_port`), False for the
    pools without one (and registered pools)."""
    if hc is None:
        for where, named in health_ports.items():
            if named:
                c.fail(where, "nothing asks a health port without `rollout.warmup.health_check`")
        return
    kind = hc.for_protocol(grpc)
    whose = f"the check of service {service!r} is `type: {kind}`"
    for key, reads in _READ_BY.items():
        if key in hc.given and kind != reads:
            c.fail(f"{hc.where}.{key}", f"only a `type: {reads}` check reads it ({whose})")
    if kind == CheckType.OIP and not hc.model:
        c.fail(f"{hc.where}.model", "required for `type: oip`: the model whose readiness is asked")
    if kind == CheckType.GRPC and not grpc:
        # Envoy health-checks over gRPC only clusters that speak HTTP/2 to their hosts.
        c.fail(f"{hc.where}.type", f"`grpc` checks need `protocol: grpc` (service {service!r})")
    elif kind == CheckType.HTTP and grpc and hc.port is None and not all(health_ports.values()):
        c.fail(
            f"{hc.where}.port",
            f"required: service {service!r} serves gRPC on its traffic ports, which an "
            "`http` check cannot ask; give the port that answers HTTP (or a `health_port` "
            "on every endpoint)",
        )


def _webhook(c: Checker, value: Any, path: str) -> Webhook | None:
    m = c.mapping(value, path, ("name", "url", "timeout", "retries"))
    url = m.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        c.fail(f"{path}.url", f"expected an http(s) URL, got {url!r}")
        return None
    hook = Webhook(str(m.get("name", url)), url)
    if "timeout" in m and (d := c.duration(m["timeout"], f"{path}.timeout")) is not None:
        hook = replace(hook, timeout=d)
    if "retries" in m and (r := c.whole_number(m["retries"], f"{path}.retries", 0)) is not None:
        hook = replace(hook, retries=r)
    return hook
