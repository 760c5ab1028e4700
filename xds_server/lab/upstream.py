"""A tiny model server that speaks the Open Inference Protocol, with fault knobs.

The "model" is a fixed logistic scorer, `1 / (1 + exp(-(w . x + b)))` over three
features (which the load generator draws from N(0, 1)); its weights depend on the
version, so v1 and v2 really answer differently: on the load generator's inputs the
population stability index between their score distributions is about 0.03 (0.03-0.07
measured on a couple of thousand requests).

Protocol surface. The model is served under one name (`--model`, "model" by default;
the lab passes the service's name): input tensor "features", FP32, shape [N, 3] (N rows
of the three features), output "score", FP32, shape [N]. The REST port (`--port`)
serves the Open Inference Protocol (KServe v2) over HTTP/1.1 and the lab's own paths:

- `POST /v2/models/{name}[/versions/{version}]/infer`: `{"id": .., "inputs": [{"name":
  "features", "shape": [N, 3], "datatype": "FP32", "data": [...]}]}` (data flat or as
  rows) -> `{"model_name", "model_version" (the server's version), "id" (echoed),
  "parameters": {"region", "pool"}, "outputs": [{"name": "score", "shape": [N],
  "datatype": "FP32", "data": [...]}]}`; errors are `{"error": ".."}` with 400 for a
  malformed request, 404 for another model or version, 503 for the injected fault;
- `GET /v2/health/live` (always 200), `GET /v2/health/ready` and
  `GET /v2/models/{name}/ready` (200 while healthy, 400 not: the protocol's 4xx for
  false), `GET /v2` (server metadata), `GET /v2/models/{name}` (model metadata);
- `GET /healthz` (200 or 503, Envoy's health check), `GET /stats`, `GET /metrics`,
  `POST /fault`; any other GET is the legacy prediction `GET /predict?a=..&b=..&c=..`
  (one row, features default to 1), answered `{"region", "pool", "version", "score"}`.

With `--grpc-port`, a gRPC server on that port serves `inference.GRPCInferenceService`
(ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer: the
features as `contents.fp32_contents` or as little-endian FP32 `raw_input_contents`, the
scores answered as `contents.fp32_contents`, region and pool as string parameters) and
the standard `grpc.health.v1.Health`, SERVING or NOT_SERVING as the `healthy` knob says,
for "" and for "inference.GRPCInferenceService". Errors: NOT_FOUND (another model),
INVALID_ARGUMENT (a malformed tensor), UNAVAILABLE (the injected fault).

Fault knobs can be changed while it runs, with `POST /fault` and any of
`{"error_rate": 0.2, "latency_ms": 300, "healthy": false, "shadow_error_rate": 1.0,
"drift": true, "tenant_latency_ms": {"gold": 300}, "stall_fraction": 0.33}`. They apply
to every inference (legacy, REST and gRPC) alike:

- `healthy: false` fails its health checks (REST and gRPC);
- `error_rate` answers that share of user requests 503 (UNAVAILABLE over gRPC),
  `shadow_error_rate` that share of the requests Envoy mirrored (their Host or
  `:authority` ends with Envoy's `-shadow` suffix);
- `latency_ms` delays every prediction, `tenant_latency_ms` only those of the tenants
  it names (the `x-tenant` header or gRPC metadata; it replaces the previous map, `{}`
  clears it);
- `drift: true` scores the features scaled by 0.01, as a mis-scaled input would: every
  score collapses to about `1 / (1 + exp(-b))`, still fast and 200;
- `stall_fraction` makes that share of user requests (deterministically: every request
  that brings the running sum of the fraction past a whole number) hang without an
  answer for `STALL_SECONDS`, until the caller hangs up (over gRPC: cancels, or its
  deadline passes), or until the server closes. At most `MAX_STALLED` hang at once (the
  rest answer normally), and a caller that hangs up frees its thread at once, so
  stalled threads cannot pile up.

`GET /stats` counts user and shadow requests apart (and stalls), gRPC inferences
included; `grpc_requests` counts the gRPC ones again on their own. `GET /metrics` is
Prometheus text, from a registry of its own:

- `model_prediction_score{version}`: histogram of every score answered (user and
  shadow requests, every protocol), buckets 0.05, 0.10, ..., 1.0;
- `model_requests_total{tenant, code}`: counter of predictions by tenant and HTTP
  status, gRPC calls under the status the same outcome has over REST ("200", "503",
  "400", "404"; "499" for a stalled request whose caller hung up first), so one query
  covers both protocols;
- `model_grpc_requests_total{tenant, grpc_code}`: the gRPC inferences again, by their
  gRPC status name ("OK", "UNAVAILABLE", ...), to tell the protocols apart;
- `model_request_duration_ms{tenant}`: histogram of the time from the request's arrival
  to its answer, injected latency and stalls included, over Envoy's bootstrap buckets.

The tenant is the `x-tenant` header ("none" without one; at most `MAX_TENANTS` distinct
values, then "other"). Region and pool are not labels here: Prometheus adds them from
its scrape configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlparse

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from xds_server.ha.registry import registered
from xds_server.lab.oip.model import (
    FP32,
    OUTPUT_NAME,
    PLATFORM,
    BadInput,
    Inference,
    grpc_inference,
    model_metadata,
    rest_inference,
)
from xds_server.lab.oip.v2 import grpc_predict_v2_pb2 as oip
from xds_server.lab.oip.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
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
SHADOW_SUFFIX = "-shadow"
"""Envoy appends this to the Host (`:authority`) of the requests it mirrors."""

DEFAULT_MODEL = "model"
MAX_BODY_BYTES = 1 << 20
SERVER_NAME = "xds-lab-model-server"
INFERENCE_SERVICE = "inference.GRPCInferenceService"
GRPC_SPARE_WORKERS = 64
"""gRPC worker threads beyond the MAX_STALLED a stall fault may hold."""
GRPC_CODES: dict[int, grpc.StatusCode] = {
    200: grpc.StatusCode.OK,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    503: grpc.StatusCode.UNAVAILABLE,
    CLIENT_CLOSED: grpc.StatusCode.CANCELLED,
}
"""An inference's outcome (its HTTP status over REST) -> its gRPC status."""
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")
_PORT = re.compile(r":\d+$")


def score(version: str, features: tuple[float, float, float], scale: float = 1.0) -> float:
    """The model's answer in (0, 1): a logistic of the version's linear score."""
    weights, bias = MODEL_WEIGHTS.get(version, OTHER_MODEL)
    z = bias + sum(w * x * scale for w, x in zip(weights, features, strict=True))
    z = max(-60.0, min(60.0, z))
    return round(1.0 / (1.0 + math.exp(-z)), 6)


def is_shadow(host: str | None) -> bool:
    """Whether Envoy mirrored this request: its Host or `:authority`, without a port,
    ends with `-shadow` ("recommender-shadow", "recommender-shadow:8080")."""
    return bool(host) and _PORT.sub("", host or "").endswith(SHADOW_SUFFIX)


@dataclass(frozen=True)
class Call:
    """Who made one inference, whatever the protocol: what the faults and metrics use."""

    tenant: str
    shadow: bool
    started: float
    over_grpc: bool = False


@dataclass(frozen=True)
class Outcome:
    """An inference's end: `code` is its HTTP status (as over REST), 0 when the server
    closed during a stall (nothing is answered nor counted)."""

    code: int
    inference: Inference | None = None
    scores: tuple[float, ...] = ()
    error: str = ""


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
            "Predictions by tenant (the x-tenant header) and HTTP status (gRPC calls: the "
            "status the same outcome has over REST)",
            ["tenant", "code"],
            registry=self.registry,
        )
        self.grpc_requests = Counter(
            "model_grpc_requests",
            "gRPC inferences by tenant (the x-tenant metadata) and gRPC status name",
            ["tenant", "grpc_code"],
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
    """The REST server, and (with `grpc_port`) a gRPC server beside it: both serve the
    same model, faults, counts and metrics."""

    daemon_threads = True
    block_on_close = False  # closing never waits for a stalled request's thread
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        region: str,
        pool: str,
        version: str,
        model: str = DEFAULT_MODEL,
        grpc_port: int | None = None,
    ) -> None:
        """`grpc_port`: None for no gRPC server, 0 for any free port (see `grpc_port`)."""
        super().__init__(address, _Handler)
        self.region, self.pool, self.version, self.model = region, pool, version, model
        self._health: health.HealthServicer | None = None
        self._faults = Faults()
        self.metrics = ModelMetrics()
        self.requests = 0
        self.shadow_requests = 0
        self.grpc_requests = 0
        self.stalled_total = 0
        self.stalled_now = 0
        self.stall_seconds = STALL_SECONDS
        self.closing = threading.Event()
        self._stall_credit = 0.0
        self._tenants: set[str] = set()
        self._lock = threading.Lock()
        self._grpc: grpc.Server | None = None
        self._grpc_pool: ThreadPoolExecutor | None = None
        self._grpc_started = False
        self.grpc_port = 0
        """The gRPC server's port (0 without one)."""
        if grpc_port is not None:
            try:
                self._bind_grpc(address[0], grpc_port)
            except Exception:
                super().server_close()
                raise

    def _bind_grpc(self, host: str, port: int) -> None:
        self._grpc_pool = ThreadPoolExecutor(
            MAX_STALLED + GRPC_SPARE_WORKERS, thread_name_prefix=f"upstream-grpc-{self.port}"
        )
        self._grpc = grpc.server(self._grpc_pool)
        self._grpc.add_generic_rpc_handlers((inference_handler(InferenceServicer(self)),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self.faults = self._faults  # the health statuses follow the knob from the start
        bracketed = f"[{host}]" if ":" in host else host
        self.grpc_port = self._grpc.add_insecure_port(f"{bracketed}:{port}")

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        """New knobs; the gRPC health service says SERVING or NOT_SERVING as they do."""
        self._faults = faults
        if self._health is not None:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if faults.healthy
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in ("", INFERENCE_SERVICE):
                self._health.set(service, status)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def count(self, shadow: bool, over_grpc: bool = False) -> None:
        with self._lock:
            if shadow:
                self.shadow_requests += 1
            else:
                self.requests += 1
            if over_grpc:
                self.grpc_requests += 1

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

    def check_model(self, name: str, version: str | None = None) -> None:
        """BadInput 404 unless this is the model (and version, when one is named) served."""
        if name != self.model:
            raise BadInput(404, f"unknown model {name!r}: this server has {self.model!r}")
        if version and version != self.version:
            raise BadInput(404, f"model {name!r} has no version {version!r}")

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

    def stall(self, gone: Callable[[float], bool]) -> str:
        """Hang: "answer" after the stall, "hung up" when `gone(timeout)` (which waits
        at most that long) says the caller left first, "closing" when the server closes."""
        deadline = time.monotonic() + self.stall_seconds
        while not self.closing.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return "answer"
            if gone(min(left, 0.1)):
                return "closing" if self.closing.is_set() else "hung up"
        return "closing"

    def infer(
        self, call: Call, parse: Callable[[], Inference], gone: Callable[[float], bool]
    ) -> Outcome:
        """One inference, whatever the protocol: faults (latency, stall, injected error),
        then `parse` (which may raise BadInput), then the scores; counted and timed."""
        faults = self.faults
        self.count(call.shadow, call.over_grpc)
        delay_ms = faults.latency_ms + faults.tenant_latency_ms.get(call.tenant, 0.0)
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)  # the injected latency fault (not a wait for anything)
        if not call.shadow and self.begin_stall(faults.stall_fraction):
            try:
                how = self.stall(gone)
            finally:
                self.end_stall()
            if how == "hung up":
                self.metrics.answered(call.tenant, CLIENT_CLOSED, call.started)
                return Outcome(CLIENT_CLOSED, error="the caller hung up")
            if how == "closing":
                return Outcome(0, error="the server is closing")
        error_rate = faults.shadow_error_rate if call.shadow else faults.error_rate
        if error_rate and random.random() < error_rate:
            self.metrics.answered(call.tenant, 503, call.started)
            return Outcome(503, error="injected fault")
        try:
            inference = parse()
        except BadInput as exc:
            self.metrics.answered(call.tenant, exc.code, call.started)
            return Outcome(exc.code, error=str(exc))
        scale = DRIFT_SCALE if faults.drift else 1.0
        scores = tuple(score(self.version, row, scale) for row in inference.rows)
        for s in scores:
            self.metrics.scores.labels(self.version).observe(s)
        self.metrics.answered(call.tenant, 200, call.started)
        return Outcome(200, inference, scores)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "user_requests": self.requests,
                "shadow_requests": self.shadow_requests,
                "grpc_requests": self.grpc_requests,
                "stalled_requests": self.stalled_total,
                "stalled_now": self.stalled_now,
            }

    def start_grpc(self) -> None:
        """Start the gRPC server (once; nothing without one)."""
        with self._lock:
            if self._grpc is None or self._grpc_started:
                return
            self._grpc_started = True
        self._grpc.start()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.start_grpc()
        super().serve_forever(poll_interval)

    def server_close(self) -> None:
        self.closing.set()  # stalled requests end now, without an answer
        if self._grpc is not None:
            if self._health is not None:
                self._health.enter_graceful_shutdown()
            self._grpc.stop(grace=None).wait(5)
            if self._grpc_pool is not None:
                self._grpc_pool.shutdown(wait=False, cancel_futures=True)
        super().server_close()

    def start_in_thread(self) -> ModelServer:
        self.start_grpc()  # before returning: a caller may dial it at once
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

    def _call(self, started: float) -> Call:
        s = self.server
        return Call(
            s.tenant(self.headers.get(TENANT_HEADER)), is_shadow(self.headers.get("host")), started
        )

    def do_GET(self) -> None:
        url = urlparse(self.path)
        healthy = self.server.faults.healthy
        if url.path == "/healthz":
            self._reply(200 if healthy else 503, {"ok": healthy})
        elif url.path == "/stats":
            self._reply(200, dict(self.server.stats()))
        elif url.path == "/metrics":
            self._send(200, self.server.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif url.path == "/v2/health/live":
            self._reply(200, {"live": True})
        elif url.path == "/v2/health/ready":
            self._reply(200 if healthy else 400, {"ready": healthy})
        elif url.path == "/v2":
            self._reply(
                200, {"name": SERVER_NAME, "version": self.server.version, "extensions": []}
            )
        elif url.path.startswith("/v2/"):
            self._model_get(url.path)
        else:
            self._predict(url.query)

    def _model_get(self, path: str) -> None:
        """GET /v2/models/{name}[/versions/{version}][/ready]: metadata or readiness."""
        match = _MODEL_PATH.match(path)
        if match is None or match[3] == "/infer":
            self._reply(404 if match is None else 405, {"error": f"no GET {path}"})
            return
        try:
            self.server.check_model(match[1], match[2])
        except BadInput as exc:
            self._reply(exc.code, {"error": str(exc)})
            return
        if match[3] == "/ready":
            healthy = self.server.faults.healthy
            self._reply(200 if healthy else 400, {"name": match[1], "ready": healthy})
        else:
            self._reply(200, model_metadata(self.server.model, self.server.version))

    def _predict(self, query: str) -> None:
        """The legacy prediction: one row from `?a=..&b=..&c=..` (each 1 when absent)."""
        s = self.server

        def parse() -> Inference:
            try:
                q = parse_qs(query)
                row = tuple(float(q.get(k, ["1"])[0]) for k in ("a", "b", "c"))
            except ValueError:
                raise BadInput(400, "features a, b, c must be numbers") from None
            return Inference("", [(row[0], row[1], row[2])])

        outcome = s.infer(self._call(time.monotonic()), parse, self._gone)
        ident = {"region": s.region, "pool": s.pool, "version": s.version}
        if outcome.code in (0, CLIENT_CLOSED):
            self.close_connection = True
        elif outcome.code != 200:
            self._reply(outcome.code, {**ident, "error": outcome.error})
        else:
            self._reply(200, {**ident, "score": outcome.scores[0]})

    def _infer(self, path: str, body: bytes, started: float) -> None:
        """POST /v2/models/{name}[/versions/{version}]/infer, the protocol's inference."""
        s = self.server
        match = _MODEL_PATH.match(path)
        assert match is not None

        def parse() -> Inference:
            s.check_model(match[1], match[2])
            return rest_inference(body)

        outcome = s.infer(self._call(started), parse, self._gone)
        if outcome.code in (0, CLIENT_CLOSED):
            self.close_connection = True
        elif outcome.code != 200 or outcome.inference is None:
            self._reply(outcome.code, {"error": outcome.error})
        else:
            self._reply(
                200,
                {
                    "model_name": s.model,
                    "model_version": s.version,
                    "id": outcome.inference.id,
                    "parameters": {"region": s.region, "pool": s.pool},
                    "outputs": [
                        {
                            "name": OUTPUT_NAME,
                            "shape": [len(outcome.scores)],
                            "datatype": FP32,
                            "data": list(outcome.scores),
                        }
                    ],
                },
            )

    def _gone(self, timeout: float) -> bool:
        """Whether the caller closed the connection, waiting at most `timeout`."""
        s = self.server
        readable, _, _ = select.select([self.connection], [], [], timeout)
        if not readable:
            return False
        try:
            if not self.connection.recv(1, socket.MSG_PEEK):
                return True
        except OSError:
            return True
        s.closing.wait(timeout)  # (a pipelined request: keep hanging)
        return False

    def _body(self) -> bytes | None:
        """The request's body; None (and the connection closes) when it is too long."""
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._reply(413, {"error": f"the body is over {MAX_BODY_BYTES} bytes"})
            return None
        return self.rfile.read(length)

    def do_POST(self) -> None:
        started = time.monotonic()
        path = urlparse(self.path).path
        body = self._body()  # read first: a stall then sees only the caller hanging up
        if body is None:
            return
        match = _MODEL_PATH.match(path)
        if match is not None and match[3] == "/infer":
            self._infer(path, body, started)
        elif path == "/fault":
            self._fault(body)
        else:
            self._reply(404, {"error": f"no POST {path}"})

    def _fault(self, body: bytes) -> None:
        try:
            knobs = json.loads(body or b"{}")
            if not isinstance(knobs, dict):
                raise ValueError("expected a JSON object")
            self.server.faults = self.server.faults.updated(knobs)
        except (ValueError, TypeError, AttributeError) as exc:
            self._reply(400, {"error": f"bad fault request: {exc}"})
            return
        self._reply(200, asdict(self.server.faults))


def _authority(context: grpc.ServicerContext) -> str:
    """The call's `:authority`. The sync server's public API does not expose it, so this
    reads the call details the core hands over, which only a call to a generic handler
    has (see `inference_handler`); "" if that ever changes (tests cover it)."""
    details = getattr(getattr(context, "_rpc_event", None), "call_details", None)
    host = getattr(details, "host", b"")
    return host.decode(errors="replace") if isinstance(host, bytes) else str(host or "")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with this status (`context.abort` raises; typed here as it does)."""
    context.abort(code, message)
    raise RuntimeError("context.abort returned")  # (it never does)


def _metadata(context: grpc.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return None


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over a ModelServer's model, faults and metrics."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip.ServerReadyResponse(ready=self.server.faults.healthy)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=self.server.version)

    def _check(self, name: str, version: str, context: grpc.ServicerContext) -> None:
        try:
            self.server.check_model(name, version)
        except BadInput as exc:
            _abort(context, GRPC_CODES[exc.code], str(exc))

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check(request.name, request.version, context)
        return oip.ModelReadyResponse(ready=self.server.faults.healthy)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check(request.name, request.version, context)
        meta = model_metadata(self.server.model, self.server.version)
        tensors = {
            k: [oip.ModelMetadataResponse.TensorMetadata(**t) for t in meta[k]]
            for k in ("inputs", "outputs")
        }
        return oip.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=PLATFORM, **tensors
        )

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The inference: faults, counts and metrics as over REST; a stall ends when the
        call ends (the caller cancels, or its deadline passes)."""
        s = self.server
        call = Call(
            s.tenant(_metadata(context, TENANT_HEADER)),
            is_shadow(_authority(context)),
            time.monotonic(),
            over_grpc=True,
        )
        ended = threading.Event()
        if not context.add_callback(ended.set):
            ended.set()  # (already over)

        def parse() -> Inference:
            s.check_model(request.model_name, request.model_version)
            return grpc_inference(request)

        outcome = s.infer(call, parse, ended.wait)
        if outcome.code == 0:
            _abort(context, grpc.StatusCode.UNAVAILABLE, outcome.error)
        code = GRPC_CODES.get(outcome.code, grpc.StatusCode.UNKNOWN)
        s.metrics.grpc_requests.labels(call.tenant, code.name).inc()
        if code != grpc.StatusCode.OK or outcome.inference is None:
            _abort(context, code, outcome.error)
        return self._response(outcome.inference.id, outcome.scores)

    def _response(self, ident: str, scores: Sequence[float]) -> Any:
        s = self.server
        return oip.ModelInferResponse(
            model_name=s.model,
            model_version=s.version,
            id=ident,
            parameters={
                "region": oip.InferParameter(string_param=s.region),
                "pool": oip.InferParameter(string_param=s.pool),
            },
            outputs=[
                oip.ModelInferResponse.InferOutputTensor(
                    name=OUTPUT_NAME,
                    datatype=FP32,
                    shape=[len(scores)],
                    contents=oip.InferTensorContents(fp32_contents=scores),
                )
            ],
        )


_RPCS: dict[str, tuple[Any, Any]] = {
    "ServerLive": (oip.ServerLiveRequest, oip.ServerLiveResponse),
    "ServerReady": (oip.ServerReadyRequest, oip.ServerReadyResponse),
    "ModelReady": (oip.ModelReadyRequest, oip.ModelReadyResponse),
    "ServerMetadata": (oip.ServerMetadataRequest, oip.ServerMetadataResponse),
    "ModelMetadata": (oip.ModelMetadataRequest, oip.ModelMetadataResponse),
    "ModelInfer": (oip.ModelInferRequest, oip.ModelInferResponse),
}


def inference_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The service as a generic handler. The generated `add_..._to_server` also registers
    each method with the core, and a call to a registered method reaches the servicer
    without its `:authority`: shadow calls could not be told apart."""
    return grpc.method_handlers_generic_handler(
        INFERENCE_SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(servicer, name),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (request, response) in _RPCS.items()
        },
    )


def main() -> None:
    p = argparse.ArgumentParser(description="a tiny model server for the lab")
    p.add_argument("--port", type=int, required=True, help="REST: OIP, /healthz, /metrics, ...")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--region", required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the name the model is served as")
    p.add_argument("--grpc-port", type=int, default=0, help="gRPC OIP and health (0: none)")
    p.add_argument("--register", metavar="etcd://...", help="register in the shared registry")
    p.add_argument("--register-ttl", type=float, default=10.0)
    p.add_argument("--service", default=DEFAULT_MODEL, help="the service it registers under")
    a = p.parse_args()
    server = ModelServer(
        (a.host, a.port), a.region, a.pool, a.version, a.model, a.grpc_port or None
    )
    if a.register:
        # Where Envoy sends: the gRPC port when there is one. The baseline is production's
        # version: registered for the baseline pool only.
        port = a.grpc_port or a.port
        pool = a.pool if a.pool in ("baseline", "production") else ""
        threading.Thread(
            target=asyncio.run,
            args=(
                _stay_registered(
                    a.register, a.service, a.version, a.region, port, a.register_ttl, pool
                ),
            ),
            name="registration",
            daemon=True,
        ).start()
    server.serve_forever()


async def _stay_registered(
    store: str, service: str, version: str, region: str, port: int, ttl: float, pool: str
) -> None:
    """The three lines a model server needs to be found: register, and stay registered
    while it runs (the lease goes with the process)."""
    async with registered(store, service, version, region, f"127.0.0.1:{port}", ttl=ttl, pool=pool):
        await asyncio.Event().wait()


if __name__ == "__main__":
    main()
