"""The lab's model servers speak the Open Inference Protocol (KServe v2), over REST and
gRPC, and the lab's clients (the load generator, the proxyless caller) speak it to them.

Real servers on loopback, real HTTP connections and gRPC channels, no mocks. Every wait
is a poll with a deadline; every load is bounded in count and time.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import wait_for
from xds_server.lab.load import LoadGenerator
from xds_server.lab.oip.v2 import grpc_predict_v2_pb2 as oip
from xds_server.lab.oip.v2 import grpc_predict_v2_pb2_grpc as oip_grpc
from xds_server.lab.proxyless import ProxylessCaller, TenantCycle, parse_shares
from xds_server.lab.upstream import ModelServer
from xds_server.lab.upstream_model import DRIFT_SCALE, score

MODEL = "recommender"
INFER = f"/v2/models/{MODEL}/infer"
ROWS = [(0.5, -1.0, 0.25), (1.5, 0.2, -0.75)]
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def start_model(version: str = "v2", pool: str = "canary") -> ModelServer:
    return ModelServer(
        ("127.0.0.1", 0), "us-east", pool, version, MODEL, grpc_port=0
    ).start_in_thread()


def stop_model(server: ModelServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def model() -> Iterator[ModelServer]:
    server = start_model()
    try:
        yield server
    finally:
        stop_model(server)


@pytest.fixture
def models() -> Iterator[dict[str, ModelServer]]:
    servers: dict[str, ModelServer] = {}
    try:
        servers["v1"] = start_model("v1", "baseline")
        servers["v2"] = start_model("v2", "canary")
        yield servers
    finally:
        for server in servers.values():
            stop_model(server)


@pytest.fixture
def channel(model: ModelServer) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(f"127.0.0.1:{model.grpc_port}")
    try:
        yield ch
    finally:
        ch.close()


@pytest.fixture
def stub(channel: grpc.Channel) -> Any:
    return oip_grpc.GRPCInferenceServiceStub(channel)


def rest(
    server: ModelServer,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request on its own connection: (status, JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def set_fault(server: ModelServer, **knobs: object) -> None:
    status, body = rest(server, "POST", "/fault", knobs)
    assert status == 200, body


def metric(server: ModelServer, name: str, **labels: str) -> float:
    """The sum of the server's /metrics samples of that name whose labels include these."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    total = 0.0
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and m[1] == name and labels.items() <= dict(LABEL.findall(m[2] or "")).items():
            total += float(m[3])
    return total


def tensor(data: object, shape: tuple[int, int] = (2, 3), datatype: str = "FP32") -> dict[str, Any]:
    """A "features" input tensor as the protocol's JSON."""
    return {"name": "features", "shape": list(shape), "datatype": datatype, "data": data}


def grpc_request(
    rows: list[tuple[float, float, float]] | None = None,
    *,
    model: str = MODEL,
    raw: bool = False,
    datatype: str = "FP32",
    shape: list[int] | None = None,
    name: str = "features",
) -> Any:
    rows = ROWS if rows is None else rows
    flat = [x for r in rows for x in r]
    contents = None if raw else oip.InferTensorContents(fp32_contents=flat)
    request = oip.ModelInferRequest(
        model_name=model,
        id="call-1",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name=name,
                datatype=datatype,
                shape=[len(rows), 3] if shape is None else shape,
                contents=contents,
            )
        ],
    )
    if raw:
        request.raw_input_contents.append(struct.pack(f"<{len(flat)}f", *flat))
    return request


def fp32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def expected(
    version: str, rows: list[tuple[float, float, float]], f32: bool = False
) -> list[float]:
    cast = fp32 if f32 else float
    return [score(version, (cast(a), cast(b), cast(c))) for a, b, c in rows]


def grpc_code(
    call: Any, request: Any, timeout: float = 5, metadata: list[tuple[str, str]] | None = None
) -> grpc.StatusCode:
    """The status of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=timeout, metadata=metadata)
    code: grpc.StatusCode = info.value.code()
    return code


# ---- REST ----


def test_rest_infer_answers_per_the_protocol(model: ModelServer) -> None:
    flat = [x for r in ROWS for x in r]
    status, body = rest(model, "POST", INFER, {"id": "req-1", "inputs": [tensor(flat)]})
    assert status == 200, body
    assert body["model_name"] == MODEL and body["model_version"] == "v2"
    assert body["id"] == "req-1"
    assert body["parameters"] == {"region": "us-east", "pool": "canary"}
    [out] = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("score", "FP32", [2])
    assert out["data"] == expected("v2", ROWS)
    # The data may come as rows; the version may be named; no id is answered as "".
    as_rows = {"inputs": [tensor([list(r) for r in ROWS])]}
    versioned = f"/v2/models/{MODEL}/versions/v2/infer"
    status, body = rest(model, "POST", versioned, as_rows, {"x-tenant": "gold"})
    assert status == 200 and body["outputs"][0]["data"] == expected("v2", ROWS)
    assert body["id"] == ""
    assert metric(model, "model_requests_total", tenant="gold", code="200") == 1
    assert metric(model, "model_prediction_score_count", version="v2") == 4  # one per row
    # The legacy GET /predict still answers.
    status, body = rest(model, "GET", "/predict?a=0.5&b=-1&c=0.25")
    assert status == 200 and body["score"] == expected("v2", ROWS[:1])[0]
    assert body["pool"] == "canary"
    assert model.stats()["user_requests"] == 3 and model.stats()["grpc_requests"] == 0


@pytest.mark.parametrize(
    ("path", "body", "code", "what"),
    [
        (INFER, b"{not json", 400, "not JSON"),
        (INFER, {"inputs": "x"}, 400, "inputs list"),
        (INFER, {"inputs": [tensor([1, 2, 3], shape=(1, 4))]}, 400, "shape"),
        (INFER, {"inputs": [tensor([1, 2, 3], shape=(1, 3), datatype="INT64")]}, 400, "datatype"),
        (INFER, {"inputs": [tensor([1, 2], shape=(1, 3))]}, 400, "2 values"),
        (INFER, {"inputs": [tensor(["a", 2, 3], shape=(1, 3))]}, 400, "numbers"),
        (INFER, {"inputs": [{**tensor([1, 2, 3], shape=(1, 3)), "name": "x"}]}, 400, "features"),
        (INFER, {"inputs": [tensor([1, 2, 3], (1, 3))], "outputs": [{"name": "p"}]}, 400, "score"),
        ("/v2/models/other/infer", {"inputs": [tensor([1, 2, 3], (1, 3))]}, 404, "unknown"),
        (f"/v2/models/{MODEL}/versions/v9/infer", {"inputs": []}, 404, "no version"),
    ],
)
def test_rest_errors_are_protocol_error_bodies(
    model: ModelServer, path: str, body: object, code: int, what: str
) -> None:
    status, answer = rest(model, "POST", path, body)
    assert status == code
    assert list(answer) == ["error"] and what in answer["error"]
    assert metric(model, "model_requests_total", tenant="none", code=str(code)) == 1


def test_rest_injected_error_is_a_503_error_body(model: ModelServer) -> None:
    set_fault(model, error_rate=1.0)
    status, body = rest(model, "POST", INFER, {"inputs": [tensor([1, 2, 3], (1, 3))]})
    assert (status, body) == (503, {"error": "injected fault"})
    assert metric(model, "model_requests_total", code="503") == 1


def test_rest_health_readiness_and_metadata(model: ModelServer) -> None:
    assert rest(model, "GET", "/v2/health/live") == (200, {"live": True})
    assert rest(model, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert rest(model, "GET", f"/v2/models/{MODEL}/ready") == (200, {"name": MODEL, "ready": True})
    assert rest(model, "GET", "/v2/models/other/ready")[0] == 404
    status, meta = rest(model, "GET", f"/v2/models/{MODEL}")
    assert status == 200
    assert (meta["name"], meta["versions"]) == (MODEL, ["v2"])
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1]}]
    status, server_meta = rest(model, "GET", "/v2")
    assert status == 200 and server_meta["version"] == "v2"
    set_fault(model, healthy=False)
    assert rest(model, "GET", "/v2/health/ready") == (400, {"ready": False})
    assert rest(model, "GET", f"/v2/models/{MODEL}/ready")[0] == 400
    assert rest(model, "GET", "/v2/health/live") == (200, {"live": True})
    assert rest(model, "GET", "/healthz")[0] == 503


# ---- gRPC ----


@pytest.mark.parametrize("raw", [False, True], ids=["fp32_contents", "raw_input_contents"])
def test_grpc_model_infer(model: ModelServer, stub: Any, raw: bool) -> None:
    response = stub.ModelInfer(grpc_request(raw=raw), timeout=5)
    assert (response.model_name, response.model_version, response.id) == (MODEL, "v2", "call-1")
    assert response.parameters["pool"].string_param == "canary"
    [out] = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("score", "FP32", [2])
    assert not response.raw_output_contents
    want = expected("v2", ROWS, f32=True)
    assert all(
        math.isclose(a, b, abs_tol=1e-6)
        for a, b in zip(out.contents.fp32_contents, want, strict=True)
    )
    counts = model.stats()
    assert {k: counts[k] for k in ("user_requests", "shadow_requests", "grpc_requests")} == {
        "user_requests": 1,
        "shadow_requests": 0,
        "grpc_requests": 1,
    }
    assert (counts["stalled_requests"], counts["stalled_now"]) == (0, 0)
    # Called directly, not through Envoy: no arm header, so neither matched nor crossed.
    assert (counts["arm_missing"], counts["arm_matched"], counts["arm_crossed"]) == (1, 0, 0)
    assert metric(model, "model_prediction_score_count", version="v2") == 2


def test_grpc_readiness_and_metadata(model: ModelServer, stub: Any) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest(), timeout=5).live
    assert stub.ServerReady(oip.ServerReadyRequest(), timeout=5).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name=MODEL), timeout=5).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name=MODEL, version="v2"), timeout=5).ready
    meta = stub.ModelMetadata(oip.ModelMetadataRequest(name=MODEL), timeout=5)
    assert (meta.name, list(meta.versions)) == (MODEL, ["v2"])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("features", "FP32", [-1, 3])
    ]
    assert stub.ServerMetadata(oip.ServerMetadataRequest(), timeout=5).version == "v2"
    missing = oip.ModelReadyRequest(name="other")
    assert grpc_code(stub.ModelReady, missing) == grpc.StatusCode.NOT_FOUND
    set_fault(model, healthy=False)
    assert not stub.ServerReady(oip.ServerReadyRequest(), timeout=5).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name=MODEL), timeout=5).ready


def test_grpc_errors_are_not_found_and_invalid_argument(model: ModelServer, stub: Any) -> None:
    bad_raw = grpc_request(raw=True)
    bad_raw.raw_input_contents[0] = b"\x00" * 5
    cases = {
        "unknown model": (grpc_request(model="other"), grpc.StatusCode.NOT_FOUND),
        "datatype": (grpc_request(datatype="FP64"), grpc.StatusCode.INVALID_ARGUMENT),
        "shape": (grpc_request(shape=[2, 4]), grpc.StatusCode.INVALID_ARGUMENT),
        "count": (grpc_request(shape=[3, 3]), grpc.StatusCode.INVALID_ARGUMENT),
        "raw bytes": (bad_raw, grpc.StatusCode.INVALID_ARGUMENT),
        "no features": (grpc_request(name="x"), grpc.StatusCode.INVALID_ARGUMENT),
    }
    got = {what: grpc_code(stub.ModelInfer, req) for what, (req, _) in cases.items()}
    assert got == {what: code for what, (_, code) in cases.items()}
    assert metric(model, "model_requests_total", code="404") == 1
    assert metric(model, "model_requests_total", code="400") == 5
    assert metric(model, "model_grpc_requests_total", grpc_code="INVALID_ARGUMENT") == 5


def test_grpc_health_follows_the_healthy_knob(model: ModelServer, channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    def statuses() -> set[int]:
        return {
            health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status
            for s in ("", "inference.GRPCInferenceService")
        }

    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert statuses() == {serving}
    set_fault(model, healthy=False)
    wait_for(lambda: statuses() == {not_serving}, "NOT_SERVING", timeout=5)
    set_fault(model, healthy=True)
    wait_for(lambda: statuses() == {serving}, "SERVING again", timeout=5)


def test_grpc_injected_errors_are_unavailable_and_counted_as_503(
    model: ModelServer, stub: Any
) -> None:
    set_fault(model, error_rate=1.0)
    gold = [("x-tenant", "gold")]
    assert grpc_code(stub.ModelInfer, grpc_request(), metadata=gold) == grpc.StatusCode.UNAVAILABLE
    assert metric(model, "model_requests_total", tenant="gold", code="503") == 1
    assert metric(model, "model_grpc_requests_total", tenant="gold", grpc_code="UNAVAILABLE") == 1
    set_fault(model, error_rate=0.0)
    stub.ModelInfer(grpc_request(), timeout=5, metadata=[("x-tenant", "silver")])
    assert metric(model, "model_requests_total", tenant="silver", code="200") == 1
    assert metric(model, "model_grpc_requests_total", tenant="silver", grpc_code="OK") == 1
    assert metric(model, "model_request_duration_ms_count", tenant="silver") == 1


def test_grpc_latency_and_drift_faults(model: ModelServer, stub: Any) -> None:
    set_fault(model, tenant_latency_ms={"gold": 300}, drift=True)
    t0 = time.monotonic()
    stub.ModelInfer(grpc_request(), timeout=5, metadata=[("x-tenant", "gold")])
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()
    response = stub.ModelInfer(grpc_request(), timeout=5, metadata=[("x-tenant", "free")])
    assert time.monotonic() - t0 < 0.25
    drifted = [score("v2", (fp32(a), fp32(b), fp32(c)), DRIFT_SCALE) for a, b, c in ROWS]
    got = list(response.outputs[0].contents.fp32_contents)
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(got, drifted, strict=True))


def test_grpc_shadow_calls_are_told_apart_by_their_authority(model: ModelServer) -> None:
    set_fault(model, shadow_error_rate=1.0)
    target = f"127.0.0.1:{model.grpc_port}"
    for authority, code in (
        (f"{MODEL}-shadow:8080", grpc.StatusCode.UNAVAILABLE),
        (f"{MODEL}-shadow", grpc.StatusCode.UNAVAILABLE),
        (MODEL, grpc.StatusCode.OK),
    ):
        ch = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
        try:
            infer = oip_grpc.GRPCInferenceServiceStub(ch).ModelInfer
            if code == grpc.StatusCode.OK:
                infer(grpc_request(), timeout=5)
            else:
                assert grpc_code(infer, grpc_request()) == code
        finally:
            ch.close()
    stats = model.stats()
    assert (stats["shadow_requests"], stats["user_requests"], stats["grpc_requests"]) == (2, 1, 3)


def test_grpc_stalled_call_ends_with_the_callers_deadline(model: ModelServer, stub: Any) -> None:
    set_fault(model, stall_fraction=1.0)
    t0 = time.monotonic()
    code = grpc_code(stub.ModelInfer, grpc_request(), timeout=0.5)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5  # the deadline, not STALL_SECONDS
    wait_for(
        lambda: model.stats()["stalled_now"] == 0, "the stalled call to free its slot", timeout=5
    )
    assert model.stats()["stalled_requests"] == 1
    wait_for(
        lambda: metric(model, "model_requests_total", code="499") == 1,
        "a 499 in /metrics",
        timeout=5,
    )
    assert metric(model, "model_grpc_requests_total", grpc_code="CANCELLED") == 1
    set_fault(model, stall_fraction=0.0)
    assert stub.ModelInfer(grpc_request(), timeout=5).model_version == "v2"


# ---- the clients ----


def run_load(load: LoadGenerator, n: int) -> LoadGenerator:
    """Start it; return once each target has `n` results (bounded by max_requests)."""
    load.start()
    try:
        wait_for(lambda: len(load.snapshot()) == n * len(load.targets), f"{n} results", timeout=30)
    finally:
        load.stop()
    return load


def test_load_generator_over_grpc_records_versions_and_failures(
    models: dict[str, ModelServer],
) -> None:
    targets = {v: f"127.0.0.1:{s.grpc_port}" for v, s in models.items()}
    n = 40
    load = run_load(
        LoadGenerator(targets, rate=200, max_requests=n, protocol="grpc", model=MODEL), n
    )
    by_target = Counter(
        (r.target, r.version, r.pool, r.status, r.grpc_code) for r in load.snapshot()
    )
    assert by_target == Counter(
        {("v1", "v1", "baseline", 200, "OK"): n, ("v2", "v2", "canary", 200, "OK"): n}
    )
    assert load.versions() == Counter({"v1": n, "v2": n})
    for server in models.values():
        assert metric(server, "model_requests_total", tenant="gold", code="200") == n / 10
        assert metric(server, "model_grpc_requests_total", tenant="free", grpc_code="OK") == n * 0.9
        assert server.stats()["grpc_requests"] == n

    set_fault(models["v2"], error_rate=1.0)
    set_fault(models["v1"], stall_fraction=0.5)
    m = 10
    load = run_load(
        LoadGenerator(
            targets, rate=100, max_requests=m, protocol="grpc", model=MODEL, timeout_s=0.5
        ),
        m,
    )
    failures = Counter((r.target, r.status, r.grpc_code, r.error) for r in load.failures())
    assert failures == Counter(
        {("v2", 503, "UNAVAILABLE", ""): m, ("v1", 504, "DEADLINE_EXCEEDED", "timeout"): m // 2}
    )
    assert load.statuses() == Counter({503: m, 504: m // 2, 200: m // 2})
    assert metric(models["v2"], "model_requests_total", code="503") == m


def test_load_generator_over_rest_records_versions(models: dict[str, ModelServer]) -> None:
    targets = {v: f"127.0.0.1:{s.port}" for v, s in models.items()}
    n = 20
    load = run_load(LoadGenerator(targets, rate=200, max_requests=n, model=MODEL), n)
    got = Counter((r.target, r.version, r.pool, r.status, r.grpc_code) for r in load.snapshot())
    assert got == Counter(
        {("v1", "v1", "baseline", 200, ""): n, ("v2", "v2", "canary", 200, ""): n}
    )
    assert metric(models["v1"], "model_prediction_score_count", version="v1") == n
    wrong = run_load(LoadGenerator(targets, rate=200, max_requests=5, model="other"), 5)
    assert wrong.statuses() == Counter({404: 10})


def test_tenant_shares_spread_deterministically() -> None:
    cycle = TenantCycle(parse_shares("gold=1,free=9"))
    tenants = [cycle.next() for _ in range(100)]
    assert Counter(tenants) == Counter({"gold": 10, "free": 90})
    assert all(tenants[i : i + 10].count("gold") == 1 for i in range(0, 100, 10))
    assert TenantCycle(parse_shares("")).next() == ""
    for bad in ("gold", "gold=-1", "gold=0"):
        with pytest.raises(ValueError):
            parse_shares(bad)


def test_proxyless_caller_counts_versions_and_failures(model: ModelServer) -> None:
    target = f"127.0.0.1:{model.grpc_port}"
    caller = ProxylessCaller(target, MODEL, rate=100, duration_s=0.5, tenant_shares={"gold": 1})
    tally = caller.run(threading.Event())
    assert tally.done and 20 <= tally.sent <= 60
    assert (tally.ok, tally.failed) == (tally.sent, 0)
    assert tally.by_version == Counter({"v2": tally.sent})
    assert tally.by_tenant == Counter({"gold": tally.sent})
    assert metric(model, "model_requests_total", tenant="gold", code="200") == tally.sent

    set_fault(model, error_rate=1.0)
    tally = caller.run(threading.Event())
    assert tally.ok == 0 and tally.failures == Counter({"UNAVAILABLE": tally.sent})
    summary = tally.summary()
    assert summary["in_flight"] == 0 and summary["failed"] == tally.sent > 0


def test_proxyless_process_writes_counts_and_stops_on_sigterm(
    model: ModelServer, tmp_path: Path
) -> None:
    out = tmp_path / "counts.json"
    argv = [
        sys.executable,
        "-m",
        "xds_server.lab.proxyless",
        "--target",
        f"127.0.0.1:{model.grpc_port}",
        "--model",
        MODEL,
        "--rate",
        "50",
        "--duration",
        "60",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:

        def progress() -> dict[str, Any] | None:
            doc: dict[str, Any] = json.loads(out.read_text())
            return doc if doc["ok"] >= 20 else None

        first = wait_for(progress, "the proxyless client's counts", timeout=30)
        assert not first["done"] and first["model"] == MODEL
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout:
            proc.stdout.close()
    last = json.loads(out.read_text())
    assert last["done"] and last["in_flight"] == 0 and last["failed"] == 0
    assert last["by_version"] == {"v2": last["ok"]} and last["ok"] >= first["ok"]
    assert last["by_tenant"].get("gold", 0) >= 1 and set(last["by_tenant"]) <= {"gold", "free"}
    assert metric(model, "model_grpc_requests_total", grpc_code="OK") == last["ok"]
