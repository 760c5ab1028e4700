"""The lab's model, whatever the protocol it is called over: the scorer, the fault knobs,
the counts and the metrics one model server keeps (`ServedModel`).

`lab/upstream.py` serves it over REST (and is the model server's command line),
`lab/upstream_grpc.py` over gRPC; both hand each inference to `ServedModel.infer`, so
the faults, counts and metrics are the same whichever binding a call came by.
`lab/upstream.py`'s docstring says what each knob does and what /metrics exports.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from xds_server.lab.oip.model import BadInput, Inference
from xds_server.lab.upstream_calls import ArmCounts, Downstream, DownstreamAnswer, arm_label
from xds_server.render.bootstrap import LATENCY_BUCKETS_MS
from xds_server.spec.rollout import CANARY_MATCH_LABEL

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
BAD_GATEWAY = 502
"""The code of an inference whose call to the next service failed (`Downstream`)."""
"""The code recorded for a stalled request whose caller hung up first (nginx's)."""
SHADOW_SUFFIX = "-shadow"
"""Envoy appends this to the Host (`:authority`) of the requests it mirrors."""
DEFAULT_MODEL = "model"
SERVER_NAME = "xds-lab-model-server"
_PORT = re.compile(r":\d+$")


def score(version: str, features: tuple[float, float, float], scale: float = 1.0) -> float:
    """The model's answer in (0, 1): a logistic of the version's linear score."""
    weights, bias = MODEL_WEIGHTS.get(version, OTHER_MODEL)
    z = bias + sum(w * x * scale for w, x in zip(weights, features, strict=True))
    z = max(-60.0, min(60.0, z))
    return round(1.0 / (1.0 + math.exp(-z)), 6)


def canary_match_label(marked: bool) -> str:
    """The CANARY_MATCH_LABEL's value: "true", or "" (Prometheus keeps no empty label:
    the split's series look as they did before the label existed)."""
    return "true" if marked else ""


def is_canary_match(value: str | None) -> bool:
    """Whether Envoy marked the request as sent by a `canary_match` route."""
    return value == "true"


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
    canary_match: bool = False
    """Sent by a `canary_match` route (Envoy's CANARY_MATCH_HEADER): counted under the
    CANARY_MATCH_LABEL, which the analysis leaves out."""
    arm: str | None = None
    """The `ARM_HEADER` the request carried (a consistent group's arm), if any."""


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
    model_name: str = ""
    """Serve the model under this name ("": the server's own, `--model`)."""

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
        if "model_name" in body:
            if not isinstance(body["model_name"], str):
                raise ValueError("model_name: expected a string")
            new.model_name = body["model_name"]
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
            ["version", CANARY_MATCH_LABEL],
            buckets=SCORE_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "model_requests",
            "Predictions by tenant (the x-tenant header) and HTTP status (gRPC calls: the "
            "status the same outcome has over REST)",
            ["tenant", "code", CANARY_MATCH_LABEL],
            registry=self.registry,
        )
        self.grpc_requests = Counter(
            "model_grpc_requests",
            "gRPC inferences by tenant (the x-tenant metadata) and gRPC status name",
            ["tenant", "grpc_code", CANARY_MATCH_LABEL],
            registry=self.registry,
        )
        self.arms = Counter(
            "model_arm_requests",
            "User requests by the x-xds-arm header they carried (none: without it); one "
            "naming another arm than the server's pool crossed arms",
            ["arm"],
            registry=self.registry,
        )
        self.downstream = Counter(
            "model_downstream_calls",
            "Calls to the next service, by the pool that answered (none: no answer) and "
            "its HTTP status (0: no answer)",
            ["arm", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "model_request_duration_ms",
            "Time from a prediction's arrival to its answer, in milliseconds",
            ["tenant", CANARY_MATCH_LABEL],
            buckets=LATENCY_BUCKETS_MS,
            registry=self.registry,
        )

    def answered(self, call: Call, code: int) -> None:
        direct = canary_match_label(call.canary_match)
        self.requests.labels(call.tenant, str(code), direct).inc()
        if code != CLIENT_CLOSED:  # never answered: no time to answer (as in Envoy's)
            elapsed = (time.monotonic() - call.started) * 1000
            self.duration.labels(call.tenant, direct).observe(elapsed)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ServedModel:
    """One model server's model, knobs, counts and metrics, shared by its REST and gRPC
    bindings (each request on a thread of its own: counts are taken under a lock)."""

    def __init__(self, region: str, pool: str, version: str, model: str = DEFAULT_MODEL) -> None:
        self.region, self.pool, self.version = region, pool, version
        self.model = model
        """The name the model is served as."""
        self._faults = Faults()
        self.on_faults: list[Callable[[Faults], None]] = []
        """Told of every new set of knobs (the gRPC health service follows `healthy`)."""
        self.metrics = ModelMetrics()
        self.arms = ArmCounts(pool)
        self.downstream: Downstream | None = None
        """The next service this server calls for each inference (None: none)."""
        self.requests = 0
        self.shadow_requests = 0
        self.grpc_requests = 0
        self.stalled_total = 0
        self.stalled_now = 0
        self.stall_seconds = STALL_SECONDS
        self.closing = threading.Event()
        """Set when the server closes: stalled requests end then, without an answer."""
        self._stall_credit = 0.0
        self._tenants: set[str] = set()
        self._lock = threading.Lock()

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._faults = faults
        for listener in self.on_faults:
            listener(faults)

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

    @property
    def served_name(self) -> str:
        """The name the model answers to now (the `model_name` knob may change it)."""
        return self.faults.model_name or self.model

    def check_model(self, name: str, version: str | None = None) -> None:
        """BadInput 404 unless this is the model (and version, when one is named) served."""
        if name != self.served_name:
            raise BadInput(404, f"unknown model {name!r}: this server has {self.served_name!r}")
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
        if not call.shadow:
            arm = arm_label(call.arm)
            self.arms.seen(arm)
            self.metrics.arms.labels(arm).inc()
        delay_ms = faults.latency_ms + faults.tenant_latency_ms.get(call.tenant, 0.0)
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)  # the injected latency fault (not a wait for anything)
        if not call.shadow and self.begin_stall(faults.stall_fraction):
            try:
                how = self.stall(gone)
            finally:
                self.end_stall()
            if how == "hung up":
                self.metrics.answered(call, CLIENT_CLOSED)
                return Outcome(CLIENT_CLOSED, error="the caller hung up")
            if how == "closing":
                return Outcome(0, error="the server is closing")
        error_rate = faults.shadow_error_rate if call.shadow else faults.error_rate
        if error_rate and random.random() < error_rate:
            self.metrics.answered(call, 503)
            return Outcome(503, error="injected fault")
        try:
            inference = parse()
        except BadInput as exc:
            self.metrics.answered(call, exc.code)
            return Outcome(exc.code, error=str(exc))
        if self.downstream is not None:
            answer = self.call_downstream(call, inference)
            if answer.code != 200:
                self.metrics.answered(call, BAD_GATEWAY)
                return Outcome(BAD_GATEWAY, inference, error=answer.error)
        scale = DRIFT_SCALE if faults.drift else 1.0
        scores = tuple(score(self.version, row, scale) for row in inference.rows)
        histogram = self.metrics.scores.labels(self.version, canary_match_label(call.canary_match))
        for s in scores:
            histogram.observe(s)
        self.metrics.answered(call, 200)
        return Outcome(200, inference, scores)

    def call_downstream(self, call: Call, inference: Inference) -> DownstreamAnswer:
        """The next service's inference on the same rows, on the arm this request came
        by; counted (by the pool that answered) whatever its outcome."""
        assert self.downstream is not None
        answer = self.downstream.call(call.arm, inference.id, inference.rows)
        self.arms.called(answer, arm_label(call.arm))
        self.metrics.downstream.labels(arm_label(answer.pool), str(answer.code)).inc()
        return answer

    def crossings(self) -> list[dict[str, Any]]:
        """The latest calls to the next service answered by another arm (`GET /crossings`)."""
        return self.arms.crossings()

    def stats(self) -> dict[str, int]:
        arms = self.arms.stats()
        with self._lock:
            return {
                **arms,
                "user_requests": self.requests,
                "shadow_requests": self.shadow_requests,
                "grpc_requests": self.grpc_requests,
                "stalled_requests": self.stalled_total,
                "stalled_now": self.stalled_now,
            }
