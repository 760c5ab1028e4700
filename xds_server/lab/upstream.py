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
- `GET /healthz` (200 or 503, Envoy's health check), `GET /stats`, `GET /crossings`,
  `GET /metrics`, `POST /fault`; any other GET is the legacy prediction
  `GET /predict?a=..&b=..&c=..` (one row, features default to 1), answered
  `{"region", "pool", "version", "score"}`.

With `--grpc-port`, a gRPC server on that port serves `inference.GRPCInferenceService`
(ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer: the
features as `contents.fp32_contents` or as little-endian FP32 `raw_input_contents`, the
scores answered as `contents.fp32_contents`, region and pool as string parameters) and
the standard `grpc.health.v1.Health`, SERVING or NOT_SERVING as the `healthy` knob says,
for "" and for "inference.GRPCInferenceService". Errors: NOT_FOUND (another model),
INVALID_ARGUMENT (a malformed tensor), UNAVAILABLE (the injected fault).

Fault knobs can be changed while it runs, with `POST /fault` and any of
`{"error_rate": 0.2, "latency_ms": 300, "healthy": false, "shadow_error_rate": 1.0,
"drift": true, "tenant_latency_ms": {"gold": 300}, "stall_fraction": 0.33,
"model_name": "other"}`. They apply
to every inference (legacy, REST and gRPC) alike:

- `healthy: false` fails its health checks (REST and gRPC);
- `error_rate` answers that share of user requests 503 (UNAVAILABLE over gRPC),
  `shadow_error_rate` that share of the requests Envoy mirrored (their Host or
  `:authority` ends with Envoy's `-shadow` suffix);
- `latency_ms` delays every prediction, `tenant_latency_ms` only those of the tenants
  it names (the `x-tenant` header or gRPC metadata; it replaces the previous map, `{}`
  clears it);
- `model_name` serves the model under that name from now on ("" restores `--model`):
  callers asking for the old name get 404 / NOT_FOUND (the wrong-model-name scenario);
- `drift: true` scores the features scaled by 0.01, as a mis-scaled input would: every
  score collapses to about `1 / (1 + exp(-b))`, still fast and 200;
- `stall_fraction` makes that share of user requests (deterministically: every request
  that brings the running sum of the fraction past a whole number) hang without an
  answer for `STALL_SECONDS`, until the caller hangs up (over gRPC: cancels, or its
  deadline passes), or until the server closes. At most `MAX_STALLED` hang at once (the
  rest answer normally), and a caller that hangs up frees its thread at once, so
  stalled threads cannot pile up.

`GET /stats` counts user and shadow requests apart (and stalls), gRPC inferences
included; `grpc_requests` counts the gRPC ones again on their own; `arm_*` the user
requests by the `x-xds-arm` header they carried against the server's pool (matched,
crossed, missing) and `downstream_*` the calls to the next service (`--downstream`:
each inference calls it through the region's Envoy, propagating the header, and answers
502 when that call fails; `lab/upstream_calls.py`). `GET /crossings` lists the latest of
those calls answered by another arm than the server's pool: when each answer came, the
arm the call carried, the pool that answered. `GET /metrics` is
Prometheus text, from a registry of its own:

- `model_prediction_score{version}`: histogram of every score answered (user and
  shadow requests, every protocol), buckets 0.05, 0.10, ..., 1.0;
- `model_requests_total{tenant, code}`: counter of predictions by tenant and HTTP
  status, gRPC calls under the status the same outcome has over REST ("200", "503",
  "400", "404"; "499" for a stalled request whose caller hung up first), so one query
  covers both protocols;
- `model_grpc_requests_total{tenant, grpc_code}`: the gRPC inferences again, by their
  gRPC status name ("OK", "UNAVAILABLE", ...), to tell the protocols apart;
- `model_arm_requests_total{arm}`: user requests by the `x-xds-arm` header they carried
  ("none" without one);
- `model_downstream_calls_total{arm, code}`: calls to the next service by the pool that
  answered and its status;
- `model_request_duration_ms{tenant}`: histogram of the time from the request's arrival
  to its answer, injected latency and stalls included, over Envoy's bootstrap buckets.

The tenant is the `x-tenant` header ("none" without one; at most `MAX_TENANTS` distinct
values, then "other"). Every series also has the label `canary_match`: "true" for a
request Envoy's `canary_match` route marked (`x-xds-canary-match: true`, header or gRPC
metadata), empty otherwise, so the analysis's queries can leave testers' requests out.
Region and pool are not labels here: Prometheus adds them from
its scrape configuration.

This module is the REST binding and the command line (`python -m xds_server.lab.upstream`,
which the lab runs); the model, its knobs, counts and metrics are `ServedModel`
(`lab/upstream_model.py`), and the gRPC binding and health service
`lab/upstream_grpc.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import select
import socket
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST

from xds_server.ha.registry import registered
from xds_server.ha.security import StoreSecurity, load_security
from xds_server.lab.oip.model import (
    FP32,
    OUTPUT_NAME,
    BadInput,
    Inference,
    model_metadata,
    rest_inference,
)
from xds_server.lab.upstream_calls import Downstream
from xds_server.lab.upstream_grpc import GrpcModelServer
from xds_server.lab.upstream_model import (
    CLIENT_CLOSED,
    DEFAULT_MODEL,
    SERVER_NAME,
    TENANT_HEADER,
    Call,
    ServedModel,
    is_canary_match,
    is_shadow,
)
from xds_server.spec.model import ARM_HEADER
from xds_server.spec.rollout import CANARY_MATCH_HEADER

MAX_BODY_BYTES = 1 << 20
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")


class ModelServer(ThreadingHTTPServer):
    """The REST server, and (with `grpc_port`) a gRPC server beside it: both serve the
    same model, faults, counts and metrics (`served`)."""

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
        self.served = ServedModel(region, pool, version, model)
        self._grpc: GrpcModelServer | None = None
        self.grpc_port = 0
        """The gRPC server's port (0 without one)."""
        if grpc_port is not None:
            try:
                self._grpc = GrpcModelServer(
                    self.served, address[0], grpc_port, f"upstream-grpc-{self.port}"
                )
            except Exception:
                super().server_close()
                raise
            self.grpc_port = self._grpc.port

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stats(self) -> dict[str, int]:
        """What `GET /stats` answers: user and shadow requests, gRPC ones, stalls."""
        return self.served.stats()

    def start_grpc(self) -> None:
        """Start the gRPC server (once; nothing without one)."""
        if self._grpc is not None:
            self._grpc.start()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.start_grpc()
        super().serve_forever(poll_interval)

    def server_close(self) -> None:
        self.served.closing.set()  # stalled requests end now, without an answer
        if self._grpc is not None:
            self._grpc.stop()
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
            s.served.tenant(self.headers.get(TENANT_HEADER)),
            is_shadow(self.headers.get("host")),
            started,
            canary_match=is_canary_match(self.headers.get(CANARY_MATCH_HEADER)),
            arm=self.headers.get(ARM_HEADER),
        )

    def do_GET(self) -> None:
        url = urlparse(self.path)
        healthy = self.server.served.faults.healthy
        if url.path == "/healthz":
            self._reply(200 if healthy else 503, {"ok": healthy})
        elif url.path == "/stats":
            self._reply(200, dict(self.server.stats()))
        elif url.path == "/crossings":
            self._reply(200, {"crossings": self.server.served.crossings()})
        elif url.path == "/metrics":
            self._send(200, self.server.served.metrics.exposition(), CONTENT_TYPE_LATEST)
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
            self.server.served.check_model(match[1], match[2])
        except BadInput as exc:
            self._reply(exc.code, {"error": str(exc)})
            return
        if match[3] == "/ready":
            healthy = self.server.served.faults.healthy
            self._reply(200 if healthy else 400, {"name": match[1], "ready": healthy})
        else:
            self._reply(200, model_metadata(self.server.served.served_name, self.server.version))

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

        outcome = s.served.infer(self._call(time.monotonic()), parse, self._gone)
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
            s.served.check_model(match[1], match[2])
            return rest_inference(body)

        outcome = s.served.infer(self._call(started), parse, self._gone)
        if outcome.code in (0, CLIENT_CLOSED):
            self.close_connection = True
        elif outcome.code != 200 or outcome.inference is None:
            self._reply(outcome.code, {"error": outcome.error})
        else:
            self._reply(
                200,
                {
                    "model_name": s.served.served_name,
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
        s.served.closing.wait(timeout)  # (a pipelined request: keep hanging)
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
        served = self.server.served
        try:
            knobs = json.loads(body or b"{}")
            if not isinstance(knobs, dict):
                raise ValueError("expected a JSON object")
            served.faults = served.faults.updated(knobs)
        except (ValueError, TypeError, AttributeError) as exc:
            self._reply(400, {"error": f"bad fault request: {exc}"})
            return
        self._reply(200, asdict(served.faults))


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
    for flag in ("--store-ca", "--store-cert", "--store-key", "--store-credentials"):
        p.add_argument(flag, metavar="FILE", help=f"with --register etcds://: xds-server's {flag}")
    p.add_argument("--service", default=DEFAULT_MODEL, help="the service it registers under")
    p.add_argument(
        "--downstream",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="call the next service through this Envoy for each inference (repeat: in turn)",
    )
    p.add_argument("--downstream-host", default="", help="the next service's Host (domain)")
    p.add_argument("--downstream-model", default="", help="the next service's model name")
    a = p.parse_args()
    server = ModelServer(
        (a.host, a.port), a.region, a.pool, a.version, a.model, a.grpc_port or None
    )
    if a.downstream:
        server.served.downstream = Downstream(
            a.downstream, a.downstream_host or a.downstream_model, a.downstream_model
        )
    if a.register:
        # Where Envoy sends: the gRPC port when there is one. The baseline is production's
        # version: registered for the baseline pool only.
        # Its own address, bound (a lab's namespace), else loopback.
        host = a.host if a.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        address = f"{host}:{a.grpc_port or a.port}"
        pool = a.pool if a.pool in ("baseline", "production") else ""
        security = load_security(
            a.register.startswith("etcds://"),
            a.store_ca, a.store_cert, a.store_key, a.store_credentials,
        )  # fmt: skip
        stay = _stay_registered(
            a.register, a.service, a.version, a.region, address, a.register_ttl, pool, security
        )
        threading.Thread(
            target=asyncio.run,
            args=(stay,),
            name="registration",
            daemon=True,
        ).start()
    server.serve_forever()


async def _stay_registered(
    store: str,
    service: str,
    version: str,
    region: str,
    address: str,
    ttl: float,
    pool: str,
    security: StoreSecurity | None = None,
) -> None:
    """The three lines a model server needs to be found: register, and stay registered
    while it runs (the lease goes with the process). `security`: etcds://'s files."""
    kept = registered(
        store, service, version, region, address, ttl=ttl, pool=pool, security=security
    )
    async with kept:
        await asyncio.Event().wait()


if __name__ == "__main__":
    main()
