"""A tiny model server: answers with its region, pool, version and a score, with fault knobs.

The "model" is a fixed logistic scorer, `1 / (1 + exp(-(w . x + b)))` over the request's
three features (`?a=..&b=..&c=..`, which the load generator draws from N(0, 1)); its
weights depend on the version, so v1 and v2 really answer differently: on the load
generator's inputs the population stability index between their score distributions is
about 0.03 (0.03-0.07 measured on a couple of thousand requests).

Fault knobs can be changed while it runs, with `POST /fault` and any of
`{"error_rate": 0.2, "latency_ms": 300, "healthy": false, "shadow_error_rate": 1.0,
"drift": true, "tenant_latency_ms": {"gold": 300}, "stall_fraction": 0.33}`:

- `healthy: false` fails its health check;
- `error_rate` answers that share of user requests 503, `shadow_error_rate` that share
  of the requests Envoy mirrored (their Host carries Envoy's `-shadow` suffix);
- `latency_ms` delays every prediction, `tenant_latency_ms` only those of the tenants
  it names (the `x-tenant` header; it replaces the previous map, `{}` clears it);
- `drift: true` scores the features scaled by 0.01, as a mis-scaled input would: every
  score collapses to about `1 / (1 + exp(-b))`, still fast and 200;
- `stall_fraction` makes that share of user requests (deterministically: every request
  that brings the running sum of the fraction past a whole number) hang without an
  answer for `STALL_SECONDS`, until the caller hangs up, or until the server closes.
  At most `MAX_STALLED` hang at once (the rest answer normally), and a caller that
  hangs up frees its thread at once, so stalled threads cannot pile up.

`GET /stats` counts user and shadow requests apart (and stalls), so a test can tell
which ones reached it. `GET /metrics` is Prometheus text, from a registry of its own:

- `model_prediction_score{version}`: histogram of every score answered (user and
  shadow requests alike), buckets 0.05, 0.10, ..., 1.0;
- `model_requests_total{tenant, code}`: counter of predictions by tenant and HTTP
  status ("200", "503"; "499" for a stalled request whose caller hung up first);
- `model_request_duration_ms{tenant}`: histogram of the time from the request's arrival
  to its answer, injected latency and stalls included, over Envoy's bootstrap buckets.

The tenant is the `x-tenant` header ("none" without one; at most `MAX_TENANTS` distinct
values, then "other"). Region and pool are not labels here: Prometheus adds them from
its scrape configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import select
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from xds_server.render.bootstrap import LATENCY_BUCKETS_MS

MODEL_WEIGHTS: dict[str, tuple[tuple[float, float, float], float]] = {
    "v1": ((1.2, 0.9, 0.9), -0.4),
    "v2": ((1.5, 0.6, 0.9), -0.1),
}
"""Per version: the weights of features a, b, c and the bias of the logistic scorer."""
OTHER_MODEL = ((1.0, 1.0, 1.0), 0.0)
DRIFT_SCALE = 0.01
"""With `drift: true`, the features are multiplied by this before scoring."""
SCORE_BUCKETS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))
TENANT_HEADER = "x-tenant"
NO_TENANT = "none"
OTHER_TENANT = "other"
MAX_TENANTS = 64
"""Distinct tenant label values a server exports; a client cannot grow the series."""
STALL_SECONDS = 30.0
MAX_STALLED = 256
CLIENT_CLOSED = 499
"""The code recorded for a stalled request whose caller hung up first (nginx's)."""


def score(version: str, features: tuple[float, float, float], scale: float = 1.0) -> float:
    """The model's answer in (0, 1): a logistic of the version's linear score."""
    weights, bias = MODEL_WEIGHTS.get(version, OTHER_MODEL)
    z = bias + sum(w * x * scale for w, x in zip(weights, features, strict=True))
    z = max(-60.0, min(60.0, z))
    return round(1.0 / (1.0 + math.exp(-z)), 6)


@dataclass
class Faults:
    error_rate: float = 0.0
    latency_ms: float = 0.0
    healthy: bool = True
    shadow_error_rate: float = 0.0
    drift: bool = False
    tenant_latency_ms: dict[str, float] = field(default_factory=dict)
    stall_fraction: float = 0.0

    def updated(self, body: Mapping[str, Any]) -> Faults:
        """These faults with a POST /fault body's knobs applied; ValueError if one is bad."""
        unknown = set(body) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown knobs {sorted(unknown)}")
        new = dataclasses.replace(self, tenant_latency_ms=dict(self.tenant_latency_ms))
        for name in ("error_rate", "latency_ms", "shadow_error_rate", "stall_fraction"):
            if name in body:
                setattr(new, name, float(body[name]))
        for name in ("healthy", "drift"):
            if name in body:
                if not isinstance(body[name], bool):
                    raise ValueError(f"{name}: expected true or false")
                setattr(new, name, body[name])
        if "tenant_latency_ms" in body:
            new.tenant_latency_ms = {str(k): float(v) for k, v in body["tenant_latency_ms"].items()}
        if not 0 <= new.stall_fraction <= 1:
            raise ValueError("stall_fraction: expected a share from 0 to 1")
        return new


class ModelMetrics:
    """The server's /metrics: its own registry, so servers in one process stay apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.scores = Histogram(
            "model_prediction_score",
            "The score answered for each prediction (user and shadow requests)",
            ["version"],
            buckets=SCORE_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "model_requests",
            "Predictions by tenant (the x-tenant header) and HTTP status",
            ["tenant", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "model_request_duration_ms",
            "Time from a prediction's arrival to its answer, in milliseconds",
            ["tenant"],
            buckets=LATENCY_BUCKETS_MS,
            registry=self.registry,
        )

    def answered(self, tenant: str, code: int, started: float) -> None:
        self.requests.labels(tenant, str(code)).inc()
        if code != CLIENT_CLOSED:  # never answered: no time to answer (as in Envoy's)
            self.duration.labels(tenant).observe((time.monotonic() - started) * 1000)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # closing never waits for a stalled request's thread
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], region: str, pool: str, version: str) -> None:
        super().__init__(address, _Handler)
        self.region, self.pool, self.version = region, pool, version
        self.faults = Faults()
        self.metrics = ModelMetrics()
        self.requests = 0
        self.shadow_requests = 0
        self.stalled_total = 0
        self.stalled_now = 0
        self.stall_seconds = STALL_SECONDS
        self.closing = threading.Event()
        self._stall_credit = 0.0
        self._tenants: set[str] = set()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def count(self, shadow: bool) -> None:
        with self._lock:
            if shadow:
                self.shadow_requests += 1
            else:
                self.requests += 1

    def tenant(self, header: str | None) -> str:
        """The tenant label for a request's `x-tenant` header (bounded cardinality)."""
        if not header:
            return NO_TENANT
        name = header[:64]
        with self._lock:
            if name in self._tenants:
                return name
            if len(self._tenants) >= MAX_TENANTS:
                return OTHER_TENANT
            self._tenants.add(name)
            return name

    def begin_stall(self, fraction: float) -> bool:
        """Whether this request stalls: every time the fraction's running sum passes a
        whole number, while fewer than MAX_STALLED hang."""
        if fraction <= 0:
            return False
        with self._lock:
            self._stall_credit += fraction
            if self._stall_credit < 1:
                return False
            self._stall_credit -= 1
            if self.stalled_now >= MAX_STALLED:
                return False  # (this request's turn passes: no burst of stalls later)
            self.stalled_total += 1
            self.stalled_now += 1
            return True

    def end_stall(self) -> None:
        with self._lock:
            self.stalled_now -= 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "user_requests": self.requests,
                "shadow_requests": self.shadow_requests,
                "stalled_requests": self.stalled_total,
                "stalled_now": self.stalled_now,
            }

    def server_close(self) -> None:
        self.closing.set()  # stalled requests end now, without an answer
        super().server_close()

    def start_in_thread(self) -> ModelServer:
        threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"upstream-{self.port}",
            daemon=True,
        ).start()
        return self


class _Handler(BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        self._send(code, json.dumps(body).encode(), "application/json")

    def _send(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.send_header("x-pool", self.server.pool)
        self.send_header("x-region", self.server.region)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/healthz":
            healthy = self.server.faults.healthy
            self._reply(200 if healthy else 503, {"ok": healthy})
        elif url.path == "/stats":
            self._reply(200, dict(self.server.stats()))
        elif url.path == "/metrics":
            self._send(200, self.server.metrics.exposition(), CONTENT_TYPE_LATEST)
        else:
            self._predict(url.query)

    def _predict(self, query: str) -> None:
        started = time.monotonic()
        s, faults = self.server, self.server.faults
        shadow = "-shadow" in (self.headers.get("host") or "")
        tenant = s.tenant(self.headers.get(TENANT_HEADER))
        s.count(shadow)
        delay_ms = faults.latency_ms + faults.tenant_latency_ms.get(tenant, 0.0)
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)
        if not shadow and s.begin_stall(faults.stall_fraction):
            try:
                outcome = self._stall()
            finally:
                s.end_stall()
            if outcome != "answer":
                if outcome == "hung up":
                    s.metrics.answered(tenant, CLIENT_CLOSED, started)
                self.close_connection = True
                return
        ident = {"region": s.region, "pool": s.pool, "version": s.version}
        error_rate = faults.shadow_error_rate if shadow else faults.error_rate
        if error_rate and random.random() < error_rate:
            s.metrics.answered(tenant, 503, started)
            self._reply(503, {**ident, "error": "injected fault"})
            return
        try:
            q = parse_qs(query)
            a, b, c = (float(q.get(k, ["1"])[0]) for k in ("a", "b", "c"))
        except ValueError:
            s.metrics.answered(tenant, 400, started)
            self._reply(400, {**ident, "error": "features a, b, c must be numbers"})
            return
        result = score(s.version, (a, b, c), DRIFT_SCALE if faults.drift else 1.0)
        s.metrics.scores.labels(s.version).observe(result)
        s.metrics.answered(tenant, 200, started)
        self._reply(200, {**ident, "score": result})

    def _stall(self) -> str:
        """Hang: "answer" after the stall, "hung up" when the caller closed the
        connection first, "closing" when the server closes."""
        s = self.server
        deadline = time.monotonic() + s.stall_seconds
        while not s.closing.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return "answer"
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.1))
            if readable:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return "hung up"
                except OSError:
                    return "hung up"
                s.closing.wait(min(left, 0.1))  # (a pipelined request: keep hanging)
        return "closing"

    def do_POST(self) -> None:
        if urlparse(self.path).path != "/fault":
            self._reply(404, {"error": "not found"})
            return
        length = int(self.headers.get("content-length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            self.server.faults = self.server.faults.updated(body)
        except (ValueError, TypeError, AttributeError) as exc:
            self._reply(400, {"error": f"bad fault request: {exc}"})
            return
        self._reply(200, asdict(self.server.faults))


def main() -> None:
    p = argparse.ArgumentParser(description="a tiny model server for the lab")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--region", required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--version", required=True)
    a = p.parse_args()
    ModelServer((a.host, a.port), a.region, a.pool, a.version).serve_forever()


if __name__ == "__main__":
    main()
