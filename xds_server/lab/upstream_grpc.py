"""The model server's gRPC binding: `inference.GRPCInferenceService` (the Open Inference
Protocol over gRPC) and the standard `grpc.health.v1.Health`, on a port of its own beside
the REST one (`lab/upstream.py`'s docstring has the surface). Each inference goes to the
same `ServedModel` as over REST.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from xds_server.lab.oip.model import (
    FP32,
    OUTPUT_NAME,
    PLATFORM,
    BadInput,
    Inference,
    grpc_inference,
    model_metadata,
)
from xds_server.lab.oip.v2 import grpc_predict_v2_pb2 as oip
from xds_server.lab.oip.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from xds_server.lab.upstream_model import (
    CLIENT_CLOSED,
    MAX_STALLED,
    SERVER_NAME,
    TENANT_HEADER,
    Call,
    Faults,
    ServedModel,
    canary_match_label,
    is_canary_match,
    is_shadow,
)
from xds_server.spec.model import ARM_HEADER
from xds_server.spec.rollout import CANARY_MATCH_HEADER

INFERENCE_SERVICE = "inference.GRPCInferenceService"
GRPC_SPARE_WORKERS = 64
"""gRPC worker threads beyond the MAX_STALLED a stall fault may hold."""
GRPC_CODES: dict[int, grpc.StatusCode] = {
    200: grpc.StatusCode.OK,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    CLIENT_CLOSED: grpc.StatusCode.CANCELLED,
}
"""An inference's outcome (its HTTP status over REST) -> its gRPC status."""


class GrpcModelServer:
    """The gRPC server of one model server: bound at once (its port known), started once,
    its health statuses following the `healthy` knob from the start."""

    def __init__(self, served: ServedModel, host: str, port: int, name: str) -> None:
        """`port`: 0 for any free one (see `port`); `name`: its threads' prefix."""
        self.served = served
        self._pool = ThreadPoolExecutor(MAX_STALLED + GRPC_SPARE_WORKERS, thread_name_prefix=name)
        self._server = grpc.server(self._pool)
        self._server.add_generic_rpc_handlers((inference_handler(InferenceServicer(served)),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        served.on_faults.append(self._follow)
        self._follow(served.faults)
        bracketed = f"[{host}]" if ":" in host else host
        self.port = self._server.add_insecure_port(f"{bracketed}:{port}")
        self._lock = threading.Lock()
        self._started = False

    def _follow(self, faults: Faults) -> None:
        """SERVING or NOT_SERVING, as the knobs say, for "" and the inference service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if faults.healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", INFERENCE_SERVICE):
            self._health.set(service, status)

    def start(self) -> None:
        """Start serving (once)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self._server.start()

    def stop(self) -> None:
        self._health.enter_graceful_shutdown()
        self._server.stop(grace=None).wait(5)
        self._pool.shutdown(wait=False, cancel_futures=True)


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
    """`inference.GRPCInferenceService` over a served model, its faults and metrics."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip.ServerReadyResponse(ready=self.served.faults.healthy)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=self.served.version)

    def _check(self, name: str, version: str, context: grpc.ServicerContext) -> None:
        try:
            self.served.check_model(name, version)
        except BadInput as exc:
            _abort(context, GRPC_CODES[exc.code], str(exc))

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check(request.name, request.version, context)
        return oip.ModelReadyResponse(ready=self.served.faults.healthy)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check(request.name, request.version, context)
        meta = model_metadata(self.served.served_name, self.served.version)
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
        s = self.served
        call = Call(
            s.tenant(_metadata(context, TENANT_HEADER)),
            is_shadow(_authority(context)),
            time.monotonic(),
            over_grpc=True,
            canary_match=is_canary_match(_metadata(context, CANARY_MATCH_HEADER)),
            arm=_metadata(context, ARM_HEADER),
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
        direct = canary_match_label(call.canary_match)
        s.metrics.grpc_requests.labels(call.tenant, code.name, direct).inc()
        if code != grpc.StatusCode.OK or outcome.inference is None:
            _abort(context, code, outcome.error)
        return self._response(outcome.inference.id, outcome.scores)

    def _response(self, ident: str, scores: Sequence[float]) -> Any:
        s = self.served
        return oip.ModelInferResponse(
            model_name=s.served_name,
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
