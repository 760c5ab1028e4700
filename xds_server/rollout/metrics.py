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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from xds_server.rollout.judge import Measurement
from xds_server.rollout.ports import QueryCheck
from xds_server.rollout.stats import Buckets
from xds_server.spec import RolloutPlan

T = TypeVar("T")


class QueryError(Exception):
    def __init__(self, message: str, *, bad_query: bool) -> None:
        super().__init__(message)
        self.bad_query = bad_query
        """True when Prometheus rejected the query itself: a configuration error."""


def window_text(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


@dataclass
class PrometheusSource:
    """The `MetricSource` on a Prometheus server. The HTTP client is synchronous, so each
    query runs in a worker thread, off the controller's loop."""

    url: str
    timeout: float = 2.0
    """Per query: to connect, and to read the answer."""
    _threads: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(16, thread_name_prefix="prometheus"),
        init=False,
        repr=False,
    )

    def _client(self) -> PrometheusConnect:
        return PrometheusConnect(url=self.url, retry=Retry(total=0), timeout=self.timeout)

    def _vector(self, promql: str, client: PrometheusConnect | None) -> list[dict[str, Any]]:
        """One instant query's raw result; QueryError (saying whose fault) on failure."""
        client = client or self._client()
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

    def measure_sync(
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

        def fill(key: str) -> str:
            return plan.queries[key].format(
                region=region, cluster=cluster, window=window_text(window_s)
            )

        try:
            for key in ("requests", "errors", *(("p99_ms",) if p99 else ())):
                out[key] = self.query(fill(key), client)
            if buckets:
                latency = self.buckets(fill("latency_buckets"), client)
        except QueryError as exc:
            return Measurement(problem=str(exc))
        except Exception as exc:  # an answer we cannot read is no evidence, not a crash
            return Measurement(problem=f"unreadable answer from Prometheus: {exc!r}")
        errors = out["errors"]
        if errors is None and out["requests"] is not None:
            errors = 0.0  # Envoy exports the 5xx series only once a 5xx has happened
        p = out.get("p99_ms")
        return Measurement(
            out["requests"],
            errors,
            None if p is None or math.isnan(p) else p,
            latency_buckets=tuple(latency) if latency else None,
        )

    async def measure(
        self,
        plan: RolloutPlan,
        region: str,
        cluster: str,
        window_s: float,
        *,
        p99: bool = True,
        buckets: bool = False,
    ) -> Measurement:
        return await self._in_thread(
            lambda: self.measure_sync(plan, region, cluster, window_s, p99=p99, buckets=buckets)
        )

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Queries run in threads of their own: a hanging Prometheus holds these (each
        query for at most `timeout`), never the threads the rest of the server uses."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(fn, *args))

    async def pool_health(
        self, plan: RolloutPlan, region: str, cluster: str
    ) -> tuple[float, float]:
        return await self._in_thread(self.pool_health_sync, plan, region, cluster)

    async def check_queries(
        self, plan: RolloutPlan, region: str, cluster: str, serving: str | None = None
    ) -> QueryCheck:
        return await self._in_thread(self.check_queries_sync, plan, region, cluster, serving)

    def pool_health_sync(self, plan: RolloutPlan, region: str, cluster: str) -> tuple[float, float]:
        """(hosts, healthy hosts) summed over the region's Envoys, as the Envoys see them."""
        client = self._client()
        total, healthy = (
            self.query(plan.queries[k].format(region=region, cluster=cluster, window="1s"), client)
            for k in ("hosts", "healthy_hosts")
        )
        return total or 0.0, healthy or 0.0

    def check_queries_sync(
        self, plan: RolloutPlan, region: str, cluster: str, serving: str | None = None
    ) -> QueryCheck:
        """Run every template once; say what makes the rollout unjudgeable.

        A template that Prometheus rejects is a problem. So is a template that returns
        nothing for `serving`, a pool that is receiving traffic right now: it would never
        return data for the canary either, and the judge would wait on it forever. An
        unreachable or hanging Prometheus ends the check at its first query.
        """
        problems: list[str] = []
        client = self._client()
        window = window_text(plan.window)

        def run(key: str, pool: str) -> object:
            fill = plan.queries[key].format(region=region, cluster=pool, window=window)
            return (self.buckets if key == "latency_buckets" else self.query)(fill, client)

        try:
            for key in plan.queries:
                try:
                    run(key, cluster)
                except QueryError as exc:
                    if not exc.bad_query:
                        raise
                    problems.append(f"query {key!r} is rejected by Prometheus: {exc}")
            if serving is None or problems or not run("requests", serving):
                return QueryCheck(tuple(problems))  # no traffic to tell from: no more
            # "errors" is legitimately empty until the first error; the rest must answer.
            needed = ["p99_ms", "hosts", "healthy_hosts"]
            if plan.needs_latency_buckets:
                needed.append("latency_buckets")
            for key in needed:
                if run(key, serving) is None:
                    problems.append(
                        f"query {key!r} returns no data for {serving} in {region}, "
                        "which receives traffic: check the template and its labels"
                    )
        except QueryError as exc:
            return QueryCheck(tuple(problems), unreachable=str(exc))
        return QueryCheck(tuple(problems))


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
