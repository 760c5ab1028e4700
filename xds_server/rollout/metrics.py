"""Reading canary and baseline health from Prometheus (prometheus-api-client).

Queries are the plan's PromQL templates with region, cluster and window filled in. A
failure never raises into the controller: it becomes a Measurement with a `problem`,
which the judge treats as "no evidence" (hold, never promote).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable, Collection, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from xds_server.rollout.evidence import Measurement, MetricReading, Signals
from xds_server.rollout.ports import QueryCheck, Where
from xds_server.rollout.signals import EnvoyJobs, envoy_jobs, read_signals
from xds_server.rollout.stats import Buckets
from xds_server.spec import MetricKind, MetricSpec, RolloutPlan
from xds_server.spec.rollout import QUERY_PLACEHOLDERS

T = TypeVar("T")
P = ParamSpec("P")


class QueryError(Exception):
    def __init__(self, message: str, *, bad_query: bool) -> None:
        super().__init__(message)
        self.bad_query = bad_query
        """True when Prometheus rejected the query itself: a configuration error."""


NODE_LABEL = "node"
"""The label naming the Envoy (its node id) on the series scraped from it: a target
label of the scrape config (the lab sets it; manifests/prometheus/prometheus.yml says
how). By it the reads leave out the nodes not known to route by the step's weights
(`exclude_nodes`: stragglers, issue 28). A series without it (a model server's, or an
Envoy scraped without the label) is never left out: it matches `node!~"..."`."""


def node_matcher(nodes: Collection[str]) -> str:
    """`,node!~"A|B"`: a PromQL matcher (to follow `region="R"`) that leaves out the
    series of these nodes, each a literal inside a regex inside a quoted string."""
    special = set(".^$*+?()[]{}|\\")
    alternation = "|".join(
        "".join(f"\\\\{c}" if c in special else c for c in node).replace('"', '\\"')
        for node in sorted(nodes)
    )
    return f',{NODE_LABEL}!~"{alternation}"'


def window_text(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


def fill(template: str, where: Where | None = None, window_s: float = 1, **extra: str) -> str:
    """A template with its placeholders filled in; those `where` does not give are
    filled with an empty string (a template that needs one reads nothing)."""
    values = dict.fromkeys(QUERY_PLACEHOLDERS, "")
    if where is not None:
        values.update(
            region=where.region,
            service=where.service,
            pool=where.pool,
            version=where.version,
            cluster=where.cluster,
        )
    values.update(window=window_text(window_s), **extra)
    return template.format(**values)


def _in_thread(
    blocking: Callable[Concatenate[PrometheusSource, P], T],
) -> Callable[Concatenate[PrometheusSource, P], Coroutine[Any, Any, T]]:
    """A `MetricSource` method from its blocking body: the HTTP client is synchronous, so
    each call runs in the source's own threads. A hanging Prometheus holds these (each
    query for at most `timeout`), never the threads the rest of the server uses."""

    async def in_thread(self: PrometheusSource, /, *args: P.args, **kwargs: P.kwargs) -> T:
        call = functools.partial(blocking, self, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._threads, call)

    functools.update_wrapper(in_thread, blocking)
    return in_thread


@dataclass
class PrometheusSource:
    """The `MetricSource` on a Prometheus server. Each of the port's methods is a blocking
    body that `_in_thread` runs in a worker thread, off the controller's loop."""

    url: str
    timeout: float = 2.0
    """Per query: to connect, and to read the answer."""
    scrape_interval: float | None = None
    """Seconds between Prometheus's scrapes of Envoy's stats (stale: older than two);
    None: read from Prometheus's configuration API (`envoy_jobs`)."""
    _envoy: EnvoyJobs | None = field(default=None, init=False, repr=False)
    _without: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    """Region -> the matcher leaving out its excluded nodes (`exclude_nodes`)."""
    _threads: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(16, thread_name_prefix="prometheus"),
        init=False,
        repr=False,
    )

    def _client(self) -> PrometheusConnect:
        return PrometheusConnect(url=self.url, retry=Retry(total=0), timeout=self.timeout)

    def exclude_nodes(self, region: str, nodes: Collection[str]) -> None:
        """The `NodeFilter`: from now on every query of `region` (each `region="R"`
        matcher of a filled template, the signals' too) leaves out these nodes' series
        (by `NODE_LABEL`); () puts every node back."""
        if nodes:
            self._without[region] = node_matcher(nodes)
        else:
            self._without.pop(region, None)

    def scoped(self, promql: str) -> str:
        """`promql` with each excluded region's nodes left out (`exclude_nodes`)."""
        for region, matcher in list(self._without.items()):
            promql = promql.replace(f'region="{region}"', f'region="{region}"{matcher}')
        return promql

    def _vector(self, promql: str, client: PrometheusConnect | None) -> list[dict[str, Any]]:
        """One instant query's raw result; QueryError (saying whose fault) on failure."""
        client = client or self._client()
        promql = self.scoped(promql)
        try:
            result: list[dict[str, Any]] = client.custom_query(promql, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise QueryError(
                f"Prometheus unreachable at {self.url}: {type(exc).__name__}", bad_query=False
            ) from None
        except PrometheusApiClientException as exc:
            raise QueryError(_api_error(exc), bad_query="400" in str(exc)) from None
        return result

    def query(self, promql: str, client: PrometheusConnect | None = None) -> float | None:
        """One instant query -> a number, None for an empty result; QueryError on failure."""
        values = [float(r["value"][1]) for r in self._vector(promql, client)]
        if not values:
            return None
        return sum(values) if len(values) > 1 else values[0]

    def buckets(self, promql: str, client: PrometheusConnect | None = None) -> Buckets | None:
        """A `sum by (le)` query -> cumulative (upper bound, count) pairs, ascending."""
        result = self._vector(promql, client)
        pairs = []
        for r in result:
            le, value = r["metric"].get("le"), float(r["value"][1])
            if le is None:
                raise QueryError(f"bucket query has no 'le' label: {promql}", bad_query=True)
            if not math.isnan(value):
                pairs.append((float(le), value))
        return tuple(sorted(pairs)) or None

    @_in_thread
    def measure(
        self,
        plan: RolloutPlan,
        region: str,
        cluster: str,
        window_s: float,
        *,
        p99: bool = True,
        buckets: bool = False,
    ) -> Measurement:
        client = self._client()
        out: dict[str, float | None] = {}
        latency: Buckets | None = None

        def filled(key: str) -> str:
            return fill(plan.queries[key], None, window_s, region=region, cluster=cluster)

        client_errors = any(m.kind == MetricKind.CLIENT_ERRORS for m in plan.analysis.metrics)
        keys = ("requests", "errors", *(("p99_ms",) if p99 else ()))
        try:
            for key in (*keys, *(("client_errors",) if client_errors else ())):
                out[key] = self.query(filled(key), client)
            if buckets:
                latency = self.buckets(filled("latency_buckets"), client)
        except QueryError as exc:
            return Measurement(problem=str(exc))
        except Exception as exc:  # an answer we cannot read is no evidence, not a crash
            return Measurement(problem=f"unreadable answer from Prometheus: {exc!r}")
        # Envoy exports a response class's (a status's) series only once one happened.
        errors, caller = out["errors"], out.get("client_errors")
        if out["requests"] is not None:
            errors, caller = errors or 0.0, caller or 0.0
        p = out.get("p99_ms")
        return Measurement(
            out["requests"],
            errors,
            None if p is None or math.isnan(p) else p,
            latency_buckets=tuple(latency) if latency else None,
            client_errors=caller if client_errors else None,
        )

    @_in_thread
    def read(
        self, plan: RolloutPlan, metric: MetricSpec, where: Where, window_s: float
    ) -> MetricReading:
        client = self._client()
        try:
            if metric.kind == MetricKind.RATIO:
                return MetricReading(
                    numerator=self.query(fill(metric.numerator, where, window_s), client),
                    denominator=self.query(fill(metric.denominator, where, window_s), client),
                )
            if metric.kind == MetricKind.VALUE:
                return MetricReading(value=self.query(fill(metric.query, where, window_s), client))
            buckets = self.buckets(fill(metric.query, where, window_s), client)
            if buckets is None:
                return MetricReading(problem=f"{metric.name}: no data")
            return MetricReading(buckets=tuple(buckets))
        except QueryError as exc:
            return MetricReading(problem=str(exc))
        except Exception as exc:  # an answer we cannot read is no evidence, not a crash
            return MetricReading(problem=f"unreadable answer from Prometheus: {exc!r}")

    @_in_thread
    def tenant(self, plan: RolloutPlan, where: Where, tenant: str, window_s: float) -> Measurement:
        client = self._client()
        q = plan.queries
        try:
            requests, errors, p99 = (
                self.query(fill(q[k], where, window_s, tenant=tenant), client)
                for k in ("tenant_requests", "tenant_errors", "tenant_p99_ms")
            )
        except QueryError as exc:
            return Measurement(problem=str(exc))
        except Exception as exc:
            return Measurement(problem=f"unreadable answer from Prometheus: {exc!r}")
        if errors is None and requests is not None:
            errors = 0.0
        return Measurement(requests, errors, None if p99 is None or math.isnan(p99) else p99)

    @_in_thread
    def throughput(
        self, plan: RolloutPlan, where: Where, window_s: float
    ) -> tuple[float | None, float | None]:
        client = self._client()
        try:
            delivered = self.query(fill(plan.queries["delivered"], where, window_s), client)
            total = self.query(fill(plan.queries["service_requests"], where, window_s), client)
        except Exception:  # no evidence either way: the check is skipped this interval
            return None, None
        return delivered or 0.0, total

    @_in_thread
    def signals(
        self,
        plan: RolloutPlan,
        region: str,
        service: str,
        configured: Mapping[str, float],
        step_age: float,
    ) -> Signals:
        """The region's signal health over the step: freshness and `up` of its Envoy
        targets, counter resets, and the requests Envoy routed to each pool
        (`signals.py`). A failure is a `problem` (no data), never an exception."""
        client = self._client()
        try:
            jobs = self._envoy_jobs(client)
            return read_signals(
                self._vector, client, jobs, region, service, step_age, configured, plan.window
            )
        except QueryError as exc:
            return Signals(problem=f"signals unreadable: {exc}", configured=configured)
        except Exception as exc:  # an answer we cannot read is no evidence, not a crash
            return Signals(problem=f"signals unreadable: {exc!r}", configured=configured)

    def _envoy_jobs(self, client: PrometheusConnect) -> EnvoyJobs:
        """Prometheus's jobs that scrape Envoy's stats and their interval, read once."""
        if self._envoy is None:
            found = envoy_jobs(self._config(client))
            if self.scrape_interval is not None:
                found = EnvoyJobs(found.jobs, self.scrape_interval)
            self._envoy = found
        return self._envoy

    def _config(self, client: PrometheusConnect) -> str:
        try:
            response = requests.get(f"{self.url}/api/v1/status/config", timeout=self.timeout)
            response.raise_for_status()
            return str(response.json()["data"]["yaml"])
        except (requests.RequestException, KeyError, ValueError) as exc:
            raise QueryError(
                f"Prometheus's configuration unreadable at {self.url}: {exc}", bad_query=False
            ) from None

    @_in_thread
    def pool_health(self, plan: RolloutPlan, region: str, cluster: str) -> tuple[float, float]:
        """(hosts, healthy hosts) summed over the region's Envoys, as the Envoys see them."""
        client = self._client()
        total, healthy = (
            self.query(fill(plan.queries[k], None, 1, region=region, cluster=cluster), client)
            for k in ("hosts", "healthy_hosts")
        )
        return total or 0.0, healthy or 0.0

    @_in_thread
    def check_queries(
        self,
        plan: RolloutPlan,
        region: str,
        cluster: str,
        serving: str | None = None,
        versions: Mapping[str, str] | None = None,
    ) -> QueryCheck:
        """Run every template once; say what makes the rollout unjudgeable.

        A template that Prometheus rejects is a problem. So is a template that returns
        nothing for `serving`, a pool that is receiving traffic right now: it would never
        return data for the canary either, and the judge would wait on it forever. An
        unreachable or hanging Prometheus ends the check at its first query.
        """
        problems: list[str] = []
        client = self._client()
        templates = {**plan.queries, **_user_templates(plan)}

        def run(key: str, pool_cluster: str) -> object:
            service, _, pool = pool_cluster.partition("|")
            where = Where(region, service, pool, (versions or {}).get(pool, ""), pool_cluster)
            promql = fill(templates[key], where, plan.window, tenant=_any_tenant(plan))
            bucketed = key == "latency_buckets" or key.endswith(".buckets")
            return (self.buckets if bucketed else self.query)(promql, client)

        try:
            for key in templates:
                try:
                    run(key, cluster)
                except QueryError as exc:
                    if not exc.bad_query:
                        raise
                    problems.append(f"query {key!r} is rejected by Prometheus: {exc}")
            if serving is None or problems or not run("requests", serving):
                return QueryCheck(tuple(problems))  # no traffic to tell from: no more
            for key in _needed(plan, templates):
                if run(key, serving) is None:
                    problems.append(
                        f"query {key!r} returns no data for {serving} in {region}, "
                        "which receives traffic: check the template and its labels"
                    )
        except QueryError as exc:
            return QueryCheck(tuple(problems), unreachable=str(exc))
        return QueryCheck(tuple(problems))


def _user_templates(plan: RolloutPlan) -> dict[str, str]:
    """The spec's own metrics' queries, keyed `metric.part` (`.buckets` for histograms)."""
    out = {}
    for m in plan.analysis.metrics:
        if m.kind == MetricKind.RATIO:
            out[f"{m.name}.numerator"], out[f"{m.name}.denominator"] = m.numerator, m.denominator
        elif m.kind == MetricKind.VALUE:
            out[f"{m.name}.value"] = m.query
        elif m.query:
            out[f"{m.name}.buckets"] = m.query
    return out


def _needed(plan: RolloutPlan, templates: dict[str, str]) -> list[str]:
    """What must answer for a pool that takes traffic. ("errors" is legitimately empty
    until the first error; a ratio's numerator may be too; tenants' and throughput's
    series are checked by their own judging, per tenant and per step.)"""
    needed = ["p99_ms", "hosts", "healthy_hosts"]
    if plan.needs_latency_buckets:
        needed.append("latency_buckets")
    needed += [k for k in templates if k.endswith((".denominator", ".value", ".buckets"))]
    return needed


def _any_tenant(plan: RolloutPlan) -> str:
    return next(iter(plan.guardrails.tenants.budgets), "")


def _api_error(exc: PrometheusApiClientException) -> str:
    text = str(exc)
    start = text.find("(b'")
    if start != -1:
        try:
            body = json.loads(text[start + 3 : text.rfind("')")].encode().decode("unicode_escape"))
            return f"{body.get('errorType', 'error')}: {body.get('error', text)}"
        except (ValueError, UnicodeDecodeError):
            pass
    return text
