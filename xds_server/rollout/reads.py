"""What the judge reads beyond the pools' requests, errors and latency: the spec's own
metrics (ratio, value, distribution, output), each tenant's slice of the canary, and
what the canary delivered against its weight's share. All through the `MetricSource`
port, concurrently; a failure is a reading with a `problem` (no evidence), never an
exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from xds_server.rollout.judge import Comparison, Measurement, MetricReading, Throughput
from xds_server.rollout.ports import MetricSource, Where
from xds_server.spec import MetricKind, Service
from xds_server.spec.rollout import USER_QUERY_KINDS
from xds_server.xds.resources import cluster_name

T = TypeVar("T")


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
    plan = at.svc.rollout
    user = [m for m in plan.analysis.metrics if m.kind in USER_QUERY_KINDS]
    jobs: dict[str, Awaitable[object]] = {}
    for m in user:
        if m.max is not None or m.min is not None:
            jobs[f"window {m.name}"] = source.read(plan, m, _where(at, "canary"), at.window)
        if at.comparator is None:
            continue
        span = plan.interval if m.kind == MetricKind.VALUE else at.step_age
        jobs[f"canary {m.name}"] = source.read(plan, m, _where(at, "canary"), span)
        jobs[f"comparator {m.name}"] = source.read(plan, m, _where(at, at.comparator), span)
    for tenant in plan.guardrails.tenants.budgets:
        jobs[f"tenant {tenant}"] = source.tenant(plan, _where(at, "canary"), tenant, at.window)
    if plan.guardrails.min_throughput_ratio > 0 and at.canary_share > 0:
        jobs["throughput"] = source.throughput(plan, _where(at, "canary"), at.step_age)
    got = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
    window, step, comparator = {}, {}, {}
    for m in user:
        if (r := got.get(f"window {m.name}")) is not None:
            window[m.name] = _reading(r)
        rc, rb = got.get(f"canary {m.name}"), got.get(f"comparator {m.name}")
        if rc is None or rb is None:
            continue
        rc, rb = _reading(rc), _reading(rb)
        if m.kind == MetricKind.VALUE:
            rc = replace(rc, pairs=book.add(at, m.name, (rc.value, rb.value)))
        step[m.name], comparator[m.name] = rc, rb
    tenants = {
        t: r
        for t in plan.guardrails.tenants.budgets
        if isinstance(r := got[f"tenant {t}"], Measurement)
    }
    canary = replace(canary, readings=window, tenants=tenants)
    cmp = replace(cmp, canary=replace(cmp.canary, readings=step))
    if cmp.comparator is not None:
        cmp = replace(cmp, comparator=replace(cmp.comparator, readings=comparator))
    if isinstance(t := got.get("throughput"), tuple):
        cmp = replace(cmp, throughput=Throughput(t[0], t[1], at.canary_share))
    return canary, cmp


def _where(at: StepRead, pool: str) -> Where:
    version = at.svc.pools[pool].version if pool in at.svc.pools else ""
    return Where(at.region, at.svc.name, pool, version, cluster_name(at.svc.name, pool))


def _reading(value: object) -> MetricReading:
    return value if isinstance(value, MetricReading) else MetricReading(problem=repr(value))
