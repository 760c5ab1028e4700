"""What the judge reads beyond the pools' requests, errors and latency: the spec's own
metrics (ratio, value, distribution, output), each tenant's slice of the canary, and
what the canary delivered against its weight's share. All through the `MetricSource`
port, concurrently; a failure is a reading with a `problem` (no evidence), never an
exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from xds_server.rollout.evidence import (
    Comparison,
    Measurement,
    MetricReading,
    Signals,
    Throughput,
)
from xds_server.rollout.ports import MetricSource, Where
from xds_server.spec import MetricKind, MetricSpec, Service
from xds_server.spec.rollout import USER_QUERY_KINDS
from xds_server.xds.resources import cluster_name


@dataclass(frozen=True)
class StepRead:
    """One region's step, as the observer sees it this interval."""

    svc: Service
    region: str
    version: str
    comparator: str | None
    """The comparator pool, None when the canary takes every request."""
    step_started: float
    step_age: float
    window: float
    canary_share: float
    shadowing: bool = False
    """The warm-up's shadow phase: canary and comparator see mirrored requests only."""
    shares: Mapping[str, float] = field(default_factory=dict)
    """Each pool's configured share of the region's requests (0-1): what the sample-ratio
    test holds the routed requests to. Empty: the signals are not read."""


@dataclass
class PairBook:
    """`value` metrics: the per-interval (canary, comparator) readings of each region's
    current step, kept in memory (a restarted leader starts the step's pairs afresh)."""

    _pairs: dict[tuple[str, str, str, str], tuple[float, list[tuple[float, float]]]] = field(
        default_factory=dict
    )

    def add(
        self, at: StepRead, metric: str, pair: tuple[float | None, float | None]
    ) -> tuple[tuple[float, float], ...]:
        key = (at.svc.name, at.version, at.region, metric)
        started, pairs = self._pairs.get(key, (at.step_started, []))
        if started != at.step_started:
            pairs = []  # a new step: its evidence starts anew
        canary, comparator = pair
        if canary is not None and comparator is not None:
            pairs.append((canary, comparator))
        self._pairs[key] = (at.step_started, pairs)
        return tuple(pairs)


async def read_step(
    source: MetricSource, at: StepRead, book: PairBook, canary: Measurement, cmp: Comparison
) -> tuple[Measurement, Comparison]:
    """`canary` (the window) and `cmp` (the step) with the user metrics' readings, the
    tenants' slices and the throughput added."""
    (window, step, comparator), tenants, throughput, signals = await asyncio.gather(
        _readings(source, at, book),
        _tenants(source, at),
        _throughput(source, at),
        _signals(source, at),
    )
    if throughput is not None and signals is not None and not signals.problem:
        throughput = replace(throughput, sent=signals.sent.get("canary", 0.0))
    canary = replace(canary, readings=window, tenants=tenants)
    cmp = replace(cmp, canary=replace(cmp.canary, readings=step), throughput=throughput)
    cmp = replace(cmp, signals=signals)
    if cmp.comparator is not None:
        cmp = replace(cmp, comparator=replace(cmp.comparator, readings=comparator))
    return canary, cmp


Readings = dict[str, MetricReading]


async def _readings(
    source: MetricSource, at: StepRead, book: PairBook
) -> tuple[Readings, Readings, Readings]:
    """The user metrics: the canary over the window (for `max`/`min`), and canary and
    comparator over the step (a `value` metric: over the last interval, kept as pairs)."""
    plan = at.svc.rollout
    keys: list[tuple[str, MetricSpec]] = []
    jobs = []
    for m in plan.analysis.metrics:
        if m.kind not in USER_QUERY_KINDS:
            continue
        if m.max is not None or m.min is not None:
            keys.append(("window", m))
            jobs.append(source.read(plan, m, _where(at, "canary"), at.window))
        if at.comparator is None:
            continue
        span = plan.interval if m.kind == MetricKind.VALUE else at.step_age
        keys += [("canary", m), ("comparator", m)]
        jobs.append(source.read(plan, m, _where(at, "canary"), span))
        jobs.append(source.read(plan, m, _where(at, at.comparator), span))
    out: dict[str, Readings] = {"window": {}, "canary": {}, "comparator": {}}
    for (which, m), reading in zip(keys, await asyncio.gather(*jobs), strict=True):
        out[which][m.name] = reading
    step, comparator = out["canary"], out["comparator"]
    for m in plan.analysis.metrics:
        if m.kind == MetricKind.VALUE and m.name in step:
            pair = (step[m.name].value, comparator[m.name].value)
            step[m.name] = replace(step[m.name], pairs=book.add(at, m.name, pair))
    return out["window"], step, comparator


async def _tenants(source: MetricSource, at: StepRead) -> dict[str, Measurement]:
    plan = at.svc.rollout
    names = list(plan.guardrails.tenants.budgets)
    where = _where(at, "canary")
    slices = await asyncio.gather(*(source.tenant(plan, where, t, at.window) for t in names))
    return dict(zip(names, slices, strict=True))


async def _throughput(source: MetricSource, at: StepRead) -> Throughput | None:
    plan = at.svc.rollout
    if plan.guardrails.min_throughput_ratio <= 0 or at.canary_share <= 0:
        return None
    delivered, total = await source.throughput(plan, _where(at, "canary"), at.step_age)
    return Throughput(delivered, total, at.canary_share)


async def _signals(source: MetricSource, at: StepRead) -> Signals | None:
    """The region's signal health over the step (freshness, targets, routed requests);
    None when the plan's steps are not read that way (no shares), or the source cannot
    say (a test double that predates it)."""
    read = getattr(source, "signals", None)
    if read is None or not at.shares:
        return None
    signals: Signals = await read(at.svc.rollout, at.region, at.svc.name, at.shares, at.step_age)
    if at.shadowing:
        # Envoy mirrors production's requests to canary and baseline: their upstream
        # counts are copies, not a split. Freshness still holds the shadow phase.
        signals = replace(signals, srm_skipped="not tested: shadow traffic is mirrored")
    return signals


def _where(at: StepRead, pool: str) -> Where:
    version = at.svc.pools[pool].version if pool in at.svc.pools else ""
    return Where(at.region, at.svc.name, pool, version, cluster_name(at.svc.name, pool))
