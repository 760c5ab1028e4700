"""Reading a region's signal health from Prometheus (issue 27): is the evidence fresh,
is every Envoy target up, did a counter restart within the step, and how many requests
did Envoy's routers send each pool?

- **Which targets**: the scrape jobs whose `metrics_path` is Envoy's `/stats/prometheus`
  (read from Prometheus's configuration API, with their scrape interval), labelled with
  the region.
- **Fresh**: the newest sample of every such target seen over the step (or the last
  five minutes, if longer) is at most two scrape intervals old, by Prometheus's clock;
  a target no longer scraped (its job removed, say) keeps its last sample and so turns
  stale. Partial: a target whose `up` is 0. Reset: a counter of the service's clusters
  went down within the guardrails' window (an Envoy restarted). Each is no data for the
  region. (A reset earlier in the step only leaves the step's split untested.)
- **Sent**: per pool, Envoy's upstream requests plus those it routed there but could
  not hand to a connection (no healthy host, a connection that failed, the circuit
  breaker), less the retries (a retry stays in the cluster of its first try: counted
  once). Counted as the last sample in the step's window less the first (max - min of
  a counter without resets): whole requests routed after the step applied, none from
  before, none made up by `increase()`'s extrapolation. `canary_match` requests go to
  the `SERVICE|canary-direct` cluster and are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import yaml

from xds_server.rollout.evidence import Signals

ENVOY_STATS_PATH = "/stats/prometheus"
DEFAULT_INTERVAL = 60.0
"""Prometheus's own default scrape interval."""
STALE_INTERVALS = 2
"""A sample older than this many scrape intervals is stale."""
MIN_LOOK = 300.0
"""Targets are looked for over the step, or this many seconds if the step is younger."""
SENT = (
    "upstream_rq_total",
    "upstream_rq_pending_failure_eject",
    "upstream_rq_pending_overflow",
    "upstream_cx_none_healthy",
)
RETRIES = "upstream_rq_retry"
POOLS = ("production", "baseline", "canary")

Vector = Callable[[str, Any], list[dict[str, Any]]]
"""One instant query's raw result (the source's `_vector`); raises on failure."""


@dataclass(frozen=True)
class EnvoyJobs:
    jobs: tuple[str, ...]
    """Scrape jobs of Envoy's stats."""
    interval: float
    """Their scrape interval in seconds (the longest, if they differ)."""


def envoy_jobs(config_yaml: str) -> EnvoyJobs:
    """The jobs of a Prometheus configuration that scrape Envoy's stats; ("envoy",) and
    the global interval when none says so."""
    config = yaml.safe_load(config_yaml) or {}
    default = _seconds(config.get("global", {}).get("scrape_interval"), DEFAULT_INTERVAL)
    jobs: list[str] = []
    intervals: list[float] = []
    for job in config.get("scrape_configs") or []:
        if job.get("metrics_path") == ENVOY_STATS_PATH:
            jobs.append(str(job["job_name"]))
            intervals.append(_seconds(job.get("scrape_interval"), default))
    if not jobs:
        return EnvoyJobs(("envoy",), default)
    return EnvoyJobs(tuple(jobs), max(intervals))


def _seconds(text: object, default: float) -> float:
    """A Prometheus duration (`1s`, `15s`, `1m`, `500ms`, `1m30s`) in seconds."""
    if not isinstance(text, str) or not text:
        return default
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total, number = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not number:
            return default
        total += float(number) * units[unit]
        number, i = "", i + len(unit)
    return total if total > 0 and not number else default


def read_signals(
    vector: Vector,
    client: Any,
    envoy: EnvoyJobs,
    region: str,
    service: str,
    step_age: float,
    configured: Mapping[str, float],
    recent: float = math.inf,
) -> Signals:
    """The region's signals over the step (see the module's docstring); `recent`: the
    guardrails' sliding window (seconds), where a counter reset is no data."""
    targets = f'job=~"{"|".join(envoy.jobs)}",region="{region}"'
    look = max(step_age, MIN_LOOK)
    resolution = max(0.1, min(5.0, envoy.interval / 2))
    ages = {
        _target(r): float(r["value"][1])
        for r in vector(
            f"time() - max by (job, instance) (max_over_time(timestamp(up{{{targets}}})"
            f"[{look:.0f}s:{round(resolution * 1000)}ms]))",
            client,
        )
    }
    for r in vector(f"time() - timestamp(up{{{targets}}})", client):
        # Present now: the exact age of its newest sample (the subquery's is coarse).
        ages[_target(r)] = min(ages.get(_target(r), math.inf), float(r["value"][1]))
    down = [
        _target(r)
        for r in vector(f"min by (job, instance) (up{{{targets}}})", client)
        if float(r["value"][1]) < 1
    ]
    window = f"{max(1, math.floor(step_age))}s"
    clusters = f'region="{region}",envoy_cluster_name=~"{_escape(service)}\\\\|({"|".join(POOLS)})"'

    def resets(span: str) -> int:
        query = f"sum(resets(envoy_cluster_upstream_rq_total{{{clusters}}}[{span}]))"
        return round(sum(float(r["value"][1]) for r in vector(query, client)))

    # A reset within the guardrails' window is no data (that window's numbers are cut
    # short); one earlier in the step only voids the routed counts (max - min across
    # a reset means nothing): the SRM test skips the step, increase() copes with it.
    recent_resets = resets(f"{max(1, math.floor(min(step_age, recent)))}s")
    step_resets = resets(window)
    sent = _sent(vector, client, clusters, window, service)
    signals = Signals(
        age_s=max(ages.values()) if ages else None,
        scrape_interval=envoy.interval,
        targets=len(ages),
        targets_up=len(ages) - len([t for t in down if t in ages]),
        resets=recent_resets,
        sent=sent,
        configured=dict(configured),
        srm_skipped="not tested: a counter reset within the step" if step_resets else "",
    )
    return _problem(signals, region, ages, down, envoy.interval, look)


def _problem(
    s: Signals,
    region: str,
    ages: Mapping[str, float],
    down: list[str],
    interval: float,
    look: float,
) -> Signals:
    """The signals with why they are no evidence, if they are not."""
    limit = STALE_INTERVALS * interval
    if not ages:
        why = f"no Envoy target of {region} scraped by Prometheus in the last {look:.0f}s"
    elif stale := sorted(t for t, age in ages.items() if age > limit):
        worst = max(ages[t] for t in stale)
        why = (
            f"stale: {len(stale)} of {len(ages)} Envoy targets of {region} not scraped for "
            f"{worst:.1f}s (scrape interval {interval:g}s, stale past {limit:g}s): "
            + ", ".join(stale)
        )
    elif down:
        why = f"partial: {len(down)} of {len(ages)} Envoy targets of {region} down: " + ", ".join(
            sorted(down)
        )
    elif s.resets:
        why = f"counter reset in the last window ({s.resets} in {region}): an Envoy restarted"
    else:
        return s
    return replace(s, problem=why)


def _sent(
    vector: Vector, client: Any, clusters: str, window: str, service: str
) -> dict[str, float]:
    """Requests routed to each pool over the window (max - min of each counter)."""
    out: dict[str, float] = {}
    for name, sign in [*((n, 1.0) for n in SENT), (RETRIES, -1.0)]:
        series = f"envoy_cluster_{name}{{{clusters}}}"
        promql = (
            f"sum by (envoy_cluster_name) (max_over_time({series}[{window}]) "
            f"- min_over_time({series}[{window}]))"
        )
        for r in vector(promql, client):
            pool = str(r["metric"].get("envoy_cluster_name", "")).rpartition("|")[2]
            value = float(r["value"][1])
            if pool in POOLS and math.isfinite(value):
                out[pool] = out.get(pool, 0.0) + sign * value
    return {pool: max(0.0, n) for pool, n in sorted(out.items(), key=lambda kv: POOLS.index(kv[0]))}


def _target(row: Mapping[str, Any]) -> str:
    labels = row["metric"]
    return f"{labels.get('job', '')}/{labels.get('instance', '')}"


def _escape(text: str) -> str:
    """A literal inside a PromQL regex inside a double-quoted string."""
    special = set(".^$*+?()[]{}|\\")
    return "".join(f"\\\\{c}" if c in special else c for c in text)
