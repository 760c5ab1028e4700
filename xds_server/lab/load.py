"""A bounded load generator: a steady rate of real inferences through each Envoy, every
result kept.

Each target gets a scheduler thread that sends at `rate` requests per second through a
pool of at most `max_in_flight` worker threads, so a stalled request does not hold up
the next ones. Load is bounded in time (`max_seconds`), in count (`max_requests` per
target) and in concurrency; every request has a client timeout (`timeout_s`); it also
stops on `stop()`.

Every request is an Open Inference Protocol (KServe v2) inference of the model `model`:
one row of the input "features" (FP32, shape [1, n_features]: 3 for the lab's built-in
model, 30 for the lab's scikit-learn models on MLServer).

- `protocol="http"` (the default): `POST /v2/models/{model}/infer` with the protocol's
  JSON, each worker on its own keep-alive HTTP/1.1 connection; the answer's
  `model_version` says which version answered, its `parameters.pool` which pool.
- `protocol="grpc"`: `inference.GRPCInferenceService/ModelInfer` over one h2c channel
  per target (`grpc.insecure_channel` to the same listener address), the features as
  `contents.fp32_contents`, the client timeout as the call's deadline; the version is
  the response's `model_version`, the pool its `pool` string parameter. A gRPC failure
  is kept under the HTTP status the same outcome has (`GRPC_TO_HTTP`: UNAVAILABLE is
  503, DEADLINE_EXCEEDED 504, ...), with the gRPC status name beside it.

Either way the `:authority` (Host) is `authority` when given, else the target's
HOST:PORT, so Envoy's virtual hosts match alike.

Inputs and tenants are deterministic: the features are drawn from N(0, 1) by a
generator seeded with `seed` (so every target gets the same sequence), and request i of
a target carries the tenant `tenants[i % len(tenants)]` (the `x-tenant` header or gRPC
metadata; by default "gold" on every 10th request from the first, "free" on the rest;
none when `tenants` is empty).

In a lab with namespaces (issue 29) a region's load cannot come from the lab's own
process (in the root namespace: a cut region would lose its callers with its links), so
each region runs `python -m xds_server.lab.load` inside its namespace, which appends its
results to a JSON-lines file; `ResultFiles` reads them back for the driver with the same
methods as `LoadGenerator` (`LoadResults`), so a region's own traffic keeps flowing, and
counted, while it is cut off.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from xds_server.lab.oip.model import FP32, INPUT_NAME, N_FEATURES
from xds_server.lab.oip.v2 import grpc_predict_v2_pb2 as oip
from xds_server.lab.oip.v2 import grpc_predict_v2_pb2_grpc as oip_grpc

TENANT_HEADER = "x-tenant"
DEFAULT_TENANTS: tuple[str, ...] = ("gold", *("free",) * 9)
DEFAULT_MODEL = "model"
"""The name a model server serves its model under without `--model`."""
PROTOCOLS = ("http", "grpc")
CLIENT_TIMEOUT_S = 2.0
"""Shorter than Envoy's route timeout (15 s: the builder sets none), so a request that an
upstream stalls is cancelled by its caller, as a user's client would, and Envoy never
answers it: it shows in the cluster's `upstream_rq_total` but neither in its 5xx count
nor in its request-time histogram."""
MAX_BURST_S = 1.0
"""After falling behind (every worker busy), catch up on at most this much of the schedule."""
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
"""A gRPC status -> the HTTP status of the same outcome (as grpc-gateway maps them)."""

Features = tuple[float, ...]


@dataclass(frozen=True)
class Result:
    time: float
    target: str
    status: int
    """HTTP status (over gRPC: the HTTP equivalent of the gRPC status, `GRPC_TO_HTTP`);
    0 when an HTTP request failed before any response (see `error`)."""
    pool: str
    latency_s: float
    tenant: str = ""
    error: str = ""
    """"timeout" (no answer within the client timeout: the caller gave up and closed the
    connection, or the gRPC deadline passed), "connection" (refused, reset, malformed);
    "" with a response."""
    version: str = ""
    """The model version that answered (the answer's `model_version`); "" on a failure."""
    grpc_code: str = ""
    """Over gRPC, the call's status name ("OK", "UNAVAILABLE", ...); "" over HTTP."""


@dataclass(frozen=True)
class Answer:
    """What one request came back with, before it is timed and labelled as a Result."""

    status: int
    pool: str = ""
    version: str = ""
    error: str = ""
    grpc_code: str = ""


def draw_features(rng: random.Random, n: int = N_FEATURES) -> Features:
    """One request's model inputs."""
    return tuple(round(rng.gauss(0, 1), 4) for _ in range(n))


def rest_body(features: Features, ident: str) -> bytes:
    """An Open Inference Protocol JSON inference request of one row."""
    tensor = {
        "name": INPUT_NAME,
        "shape": [1, len(features)],
        "datatype": FP32,
        "data": list(features),
    }
    return json.dumps({"id": ident, "inputs": [tensor]}).encode()


def infer_request(model: str, rows: Sequence[Features], ident: str = "") -> Any:
    """A ModelInferRequest of these rows of features (as `contents.fp32_contents`)."""
    return oip.ModelInferRequest(
        model_name=model,
        id=ident,
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name=INPUT_NAME,
                datatype=FP32,
                shape=[len(rows), len(rows[0]) if rows else N_FEATURES],
                contents=oip.InferTensorContents(fp32_contents=[x for r in rows for x in r]),
            )
        ],
    )


def grpc_answer(
    call: Any, request: Any, timeout_s: float, metadata: Sequence[tuple[str, str]]
) -> Answer:
    """Call `ModelInfer` (`call`: a stub's method) and read the answer, or the failure."""
    try:
        return answer_of(call(request, timeout=timeout_s, metadata=metadata))
    except grpc.RpcError as exc:
        return failure_of(exc)


def answer_of(response: Any) -> Answer:
    """A ModelInferResponse as an Answer: its version, and its pool's string parameter."""
    pool = response.parameters["pool"].string_param if "pool" in response.parameters else ""
    return Answer(200, pool, response.model_version, grpc_code=grpc.StatusCode.OK.name)


def failure_of(exc: grpc.RpcError) -> Answer:
    """A failed call as an Answer: its gRPC status, and the HTTP status of the same outcome."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    error = "timeout" if code == grpc.StatusCode.DEADLINE_EXCEEDED else ""
    return Answer(GRPC_TO_HTTP.get(code, 500), error=error, grpc_code=code.name)


class LoadResults:
    """What the lab, its report and the tests read of a load, wherever it runs."""

    def snapshot(self) -> list[Result]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def statuses(self, since: float = 0.0) -> Counter[int]:
        return Counter(r.status for r in self.snapshot() if r.time >= since)

    def failures(self, since: float = 0.0) -> list[Result]:
        return [r for r in self.snapshot() if r.time >= since and r.status != 200]

    def versions(self, since: float = 0.0) -> Counter[str]:
        """Answers by the model version that gave them (failures left out)."""
        return Counter(r.version for r in self.snapshot() if r.time >= since and r.version)


@dataclass
class LoadGenerator(LoadResults):
    targets: dict[str, str]
    """label -> HOST:PORT of an Envoy listener (or of a model server, directly)."""
    rate: float = 50.0
    """Requests per second per target."""
    max_seconds: float = 600.0
    max_requests: int = 100_000
    protocol: str = "http"
    """"http" (the protocol's REST binding) or "grpc" (its gRPC binding), see above."""
    model: str = DEFAULT_MODEL
    """The model each request names (the lab serves the service's name)."""
    authority: str | None = None
    """The Host / `:authority` of every request; None: the target's HOST:PORT."""
    path: str | None = None
    """The REST inference path; None: `/v2/models/{model}/infer`."""
    timeout_s: float = CLIENT_TIMEOUT_S
    """Each request's client timeout (connecting, and waiting for each read; over gRPC
    the call's deadline)."""
    max_in_flight: int = 64
    """Requests outstanding at once per target; when all are, the schedule waits."""
    tenants: tuple[str, ...] = DEFAULT_TENANTS
    seed: int = 0
    n_features: int = N_FEATURES
    """Features per request (the model's signature: 3 for the built-in model)."""
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {PROTOCOLS}, not {self.protocol!r}")

    def start(self) -> LoadGenerator:
        for label, address in self.targets.items():
            t = threading.Thread(
                target=self._run, args=(label, address), daemon=True, name=f"load-{label}"
            )
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 10)

    def halt(self) -> None:
        """Send nothing more, without waiting for the requests in flight."""
        self._stop.set()

    def running(self) -> bool:
        """Is any target's schedule still sending (its duration or count not over)?"""
        return any(t.is_alive() for t in self._threads)

    def _run(self, label: str, address: str) -> None:
        """The schedule of one target: a slot and a worker per request."""
        rng = random.Random(self.seed)
        slots = threading.Semaphore(self.max_in_flight)
        client = self._client(address)
        start = time.monotonic()
        next_at = start
        try:
            with ThreadPoolExecutor(self.max_in_flight, thread_name_prefix=f"load-{label}") as pool:
                for i in range(self.max_requests):
                    features = draw_features(rng, self.n_features)
                    if not self._wait_until(next_at, start) or not self._take(slots, start):
                        break
                    next_at = max(next_at + 1.0 / self.rate, time.monotonic() - MAX_BURST_S)
                    tenant = self.tenants[i % len(self.tenants)] if self.tenants else ""
                    pool.submit(self._send, label, client, features, f"{label}-{i}", tenant, slots)
        finally:
            client.close()

    def _client(self, address: str) -> _Client:
        if self.protocol == "grpc":
            return _GrpcClient(address, self.model, self.authority, self.timeout_s)
        path = self.path or f"/v2/models/{self.model}/infer"
        return _HttpClient(address, path, self.authority, self.timeout_s)

    def _running(self, start: float) -> bool:
        return not self._stop.is_set() and time.monotonic() - start <= self.max_seconds

    def _wait_until(self, at: float, start: float) -> bool:
        delay = at - time.monotonic()
        if delay > 0 and self._stop.wait(delay):
            return False
        return self._running(start)

    def _take(self, slots: threading.Semaphore, start: float) -> bool:
        while not slots.acquire(timeout=0.1):
            if not self._running(start):
                return False
        return True

    def _send(
        self,
        label: str,
        client: _Client,
        features: Features,
        ident: str,
        tenant: str,
        slots: threading.Semaphore,
    ) -> None:
        t0 = time.monotonic()
        try:
            a = client.send(features, ident, tenant)
        finally:
            slots.release()
        result = Result(
            time.time(),
            label,
            a.status,
            a.pool,
            time.monotonic() - t0,
            tenant,
            a.error,
            a.version,
            a.grpc_code,
        )
        with self._lock:
            self.results.append(result)

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def since(self, index: int) -> list[Result]:
        """The results after the first `index` (in the order they were kept)."""
        with self._lock:
            return self.results[index:]


class _Client:
    """How one target's requests go out: `send` from any worker thread, `close` once."""

    def send(self, features: Features, ident: str, tenant: str) -> Answer:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _HttpClient(_Client):
    """One keep-alive connection per worker thread, all closed at the end."""

    def __init__(self, address: str, path: str, authority: str | None, timeout_s: float) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.path = path
        self.headers = {"content-type": "application/json"}
        if authority:
            self.headers["host"] = authority
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def mine(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def send(self, features: Features, ident: str, tenant: str) -> Answer:
        conn = self.mine()
        headers = {**self.headers, TENANT_HEADER: tenant} if tenant else self.headers
        try:
            conn.request("POST", self.path, body=rest_body(features, ident), headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                return Answer(resp.status)
            doc = json.loads(body)
            pool = (doc.get("parameters") or {}).get("pool") or resp.getheader("x-pool") or ""
            return Answer(200, str(pool), str(doc.get("model_version", "")))
        except TimeoutError:
            conn.close()  # the caller hangs up: Envoy resets the upstream request
            return Answer(0, error="timeout")
        except (OSError, http.client.HTTPException, ValueError, AttributeError):
            conn.close()
            return Answer(0, error="connection")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()


class _GrpcClient(_Client):
    """One h2c channel for every worker (gRPC multiplexes calls on it), closed at the end."""

    def __init__(self, address: str, model: str, authority: str | None, timeout_s: float) -> None:
        options = [("grpc.default_authority", authority)] if authority else []
        self.channel = grpc.insecure_channel(address, options=options)
        self.infer = oip_grpc.GRPCInferenceServiceStub(self.channel).ModelInfer
        self.model = model
        self.timeout_s = timeout_s

    def send(self, features: Features, ident: str, tenant: str) -> Answer:
        metadata = [(TENANT_HEADER, tenant)] if tenant else []
        request = infer_request(self.model, [features], ident)
        return grpc_answer(self.infer, request, self.timeout_s, metadata)

    def close(self) -> None:
        self.channel.close()


# ---- a load of its own process (a region's, in its namespace) ----

FLUSH_S = 0.25
"""How often a load process appends its new results to its file."""


class ResultFiles(LoadResults):
    """The results of load processes, read back from the JSON-lines files they append
    to (whole lines only: a line being written is read at the next call). `stop` stops
    the processes (`stoppers`) and reads what they wrote last."""

    def __init__(self, paths: Sequence[Path], stoppers: Sequence[Any] = ()) -> None:
        self.paths = list(paths)
        self.stoppers = list(stoppers)
        """Objects with `stop()` (the processes), stopped by `stop`."""
        self._offsets = dict.fromkeys(self.paths, 0)
        self._results: list[Result] = []
        self._lock = threading.Lock()

    def snapshot(self) -> list[Result]:
        with self._lock:
            for path in self.paths:
                self._read(path)
            return list(self._results)

    def _read(self, path: Path) -> None:
        try:
            with path.open("rb") as f:
                f.seek(self._offsets[path])
                data = f.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        self._offsets[path] += len(complete)
        for line in complete.splitlines():
            if line.strip():
                self._results.append(Result(**json.loads(line)))

    def stop(self) -> None:
        for process in self.stoppers:
            process.stop()
        self.snapshot()


def _append(load: LoadGenerator, out: IO[str], written: int) -> int:
    new = load.since(written)
    if new:
        out.write("".join(json.dumps(asdict(r)) + "\n" for r in new))
        out.flush()
    return written + len(new)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m xds_server.lab.load --target LABEL=HOST:PORT ... --out FILE`: a
    `LoadGenerator` in a process of its own, appending its results to FILE every
    `FLUSH_S`, until its duration ends or SIGTERM (then the last ones, and exit)."""
    p = argparse.ArgumentParser(description="the lab's load, as a process of its own")
    p.add_argument("--target", action="append", required=True, metavar="LABEL=HOST:PORT")
    p.add_argument("--rate", type=float, default=50.0, help="requests per second per target")
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--protocol", choices=PROTOCOLS, default="http")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--n-features", type=int, default=N_FEATURES)
    p.add_argument("--out", required=True, metavar="FILE", help="results, one JSON per line")
    a = p.parse_args(argv)
    targets = dict(t.split("=", 1) for t in a.target)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    load = LoadGenerator(
        targets,
        rate=a.rate,
        max_seconds=a.duration,
        protocol=a.protocol,
        model=a.model,
        n_features=a.n_features,
    ).start()
    written = 0
    with Path(a.out).open("w") as out:
        while not stopped.wait(FLUSH_S) and load.running():
            written = _append(load, out, written)
        load.halt()  # requests in flight end within their timeout; not waited for
        written = _append(load, out, written)


if __name__ == "__main__":
    main()
