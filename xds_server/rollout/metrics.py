"""Reading canary and baseline health from Prometheus (prometheus-api-client).

Queries are the plan's PromQL templates with region, cluster and window filled in. A
failure never raises into the controller: it becomes a Measurement with a `problem`,
which the judge treats as "no evidence" (hold, never promote).
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from xds_server.rollout.judge import Measurement
from xds_server.rollout.plan import RolloutPlan


class QueryError(Exception):
    def __init__(self, message: str, *, bad_query: bool) -> None:
        super().__init__(message)
        self.bad_query = bad_query
        """True when Prometheus rejected the query itself: a configuration error."""


def window_text(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


@dataclass
class PrometheusSource:
    url: str
    timeout: float = 2.0

    def _client(self) -> PrometheusConnect:
        return PrometheusConnect(url=self.url, retry=Retry(total=0), timeout=self.timeout)

    def query(self, promql: str, client: PrometheusConnect | None = None) -> float | None:
        """One instant query -> a number, None for an empty result; QueryError on failure."""
        client = client or self._client()
        try:
            result: list[dict[str, Any]] = client.custom_query(promql, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise QueryError(
                f"Prometheus unreachable at {self.url}: {type(exc).__name__}", bad_query=False
            ) from None
        except PrometheusApiClientException as exc:
            raise QueryError(_api_error(exc), bad_query="400" in str(exc)) from None
        values = [float(r["value"][1]) for r in result]
        if not values:
            return None
        return sum(values) if len(values) > 1 else values[0]

    def measure_sync(
        self, plan: RolloutPlan, region: str, cluster: str, window_s: float
    ) -> Measurement:
        client = self._client()
        out: dict[str, float | None] = {}
        try:
            for key in ("requests", "errors", "p99_ms"):
                promql = plan.queries[key].format(
                    region=region, cluster=cluster, window=window_text(window_s)
                )
                out[key] = self.query(promql, client)
        except QueryError as exc:
            return Measurement(problem=str(exc))
        errors = out["errors"]
        if errors is None and out["requests"] is not None:
            errors = 0.0  # Envoy exports the 5xx series only once a 5xx has happened
        p99 = out["p99_ms"]
        return Measurement(out["requests"], errors, None if p99 is None or math.isnan(p99) else p99)

    async def measure(
        self, plan: RolloutPlan, region: str, cluster: str, window_s: float
    ) -> Measurement:
        return await asyncio.to_thread(self.measure_sync, plan, region, cluster, window_s)

    def check_queries(self, plan: RolloutPlan, region: str, cluster: str) -> list[str]:
        """Run every template once; return the ones Prometheus rejects (not: unreachable)."""
        problems = []
        client = self._client()
        for key, template in plan.queries.items():
            try:
                self.query(
                    template.format(
                        region=region, cluster=cluster, window=window_text(plan.window)
                    ),
                    client,
                )
            except QueryError as exc:
                if exc.bad_query:
                    problems.append(f"query {key!r} is rejected by Prometheus: {exc}")
        return problems


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
