"""Only the split's traffic is evidence (issue 27, item 5): requests a `canary_match` route
sends to the canary are marked by Envoy (a caller cannot mark its own), the lab's model
servers label their series with the mark, and every model-side series the analysis
reads (the output histogram, tenants' slices) leaves them out. Real Envoy, Prometheus
scraping the model servers, no load but the test's own requests."""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path

import grpc
import pytest

from tests.support import wait_for
from xds_server.lab.layout import SERVICE, MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.rollout.metrics import PrometheusSource
from xds_server.rollout.ports import Where
from xds_server.spec import MetricKind, RolloutPlan
from xds_server.spec.rollout import (
    CANARY_MATCH_HEADER,
    DEFAULT_QUERIES,
    PREDICTION_BUCKETS_QUERY,
    SPLIT_ONLY,
    metric_defaults,
)
from xds_server.xds.resources import cluster_name

REGION = "us-east"
TESTER = {"x-canary": "always"}


def infer(port: int, headers: dict[str, str]) -> str:
    """One OIP inference through Envoy: the pool that answered ("" on a failure)."""
    body = {
        "inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]}]
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(
            "POST",
            f"/v2/models/{SERVICE}/infer",
            json.dumps(body),
            {"content-type": "application/json", "x-tenant": "gold", **headers},
        )
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    return str(answer.get("parameters", {}).get("pool", "")) if response.status == 200 else ""


def where(pool: str, version: str) -> Where:
    return Where(REGION, SERVICE, pool, version, cluster_name(SERVICE, pool))


def test_requests_canary_match_sends_never_reach_what_the_analysis_reads(tmp_path: Path) -> None:
    plan = {**FAST_PLAN, "canary_match": [{"header": "x-canary", "value": "always"}]}
    plan["max_hold"] = "10m"  # (no load: the rollout holds at 5% while the test looks)
    with LocalMesh(tmp_path / "mesh", MeshOptions(regions=(REGION,), rollout=plan)) as mesh:
        port = mesh.layout.envoys[0].listen_port
        mesh.spec.add_canary()
        wait_for(lambda: infer(port, TESTER) == "canary", "the canary_match route", timeout=30)
        testers = [infer(port, TESTER) for _ in range(40)]
        assert testers == ["canary"] * 40
        source = PrometheusSource(f"http://127.0.0.1:{mesh.layout.prometheus_port}")
        # (increase() counts from a series' second sample: production's first.)
        first = [infer(port, {}) for _ in range(5)]
        seen = f'sum(model_prediction_score_count{{region="{REGION}",pool="production"}})'
        wait_for(lambda: source.query(seen) is not None, "production's outputs", timeout=20)
        # A caller that sets the mark itself takes the split like anyone (5% canary, 5%
        # baseline, 90% production), and is analysed like anyone.
        spoofed = [infer(port, {CANARY_MATCH_HEADER: "true"}) for _ in range(40)]
        production = spoofed.count("production")
        assert production >= 30 and "" not in spoofed + first, spoofed
        marked = (
            f'sum(model_prediction_score_count{{region="{REGION}",pool="canary",'
            'canary_match="true"})'
        )
        wait_for(
            lambda: (source.query(marked) or 0) >= 41,
            "Prometheus holds the canary's canary_match predictions",
            timeout=20,
        )
        shift = metric_defaults("prediction_shift", MetricKind.OUTPUT)
        assert SPLIT_ONLY in PREDICTION_BUCKETS_QUERY and shift.query == PREDICTION_BUCKETS_QUERY
        default = RolloutPlan()
        assert all(SPLIT_ONLY in DEFAULT_QUERIES[k] for k in ("tenant_requests", "tenant_p99_ms"))

        async def analysed() -> tuple[float, float, float | None]:
            canary, prod = where("canary", "v2"), where("production", "v1")
            readings = await asyncio.gather(
                source.read(default, shift, canary, 120), source.read(default, shift, prod, 120)
            )
            tenant = await source.tenant(default, canary, "gold", 120)
            totals = [max((c for _, c in r.buckets or ()), default=0.0) for r in readings]
            return totals[0], totals[1], tenant.requests

        # What the analysis reads: none of the testers' 41 canary predictions; every
        # spoofed request production answered (the mark was stripped before it).
        wait_for(
            lambda: asyncio.run(analysed())[1] >= production,
            "production's analysed outputs to count the spoofed requests",
            timeout=20,
        )
        canary_outputs, _, canary_gold = asyncio.run(analysed())
        split_canary = (spoofed + first).count("canary")
        assert canary_outputs <= split_canary * 1.5, (canary_outputs, split_canary)
        assert (canary_gold or 0) <= split_canary * 1.5, (canary_gold, split_canary)


def test_the_lab_model_server_labels_marked_requests_over_both_bindings() -> None:
    """The mark arrives as a header (REST) or as metadata (gRPC); the server's series
    carry `canary_match="true"` for it, and no such label for the rest. The
    `model_name` knob (wrong-model-name) answers NOT_FOUND / 404 for the old name."""
    from tests.test_inference_protocol import metric, rest, set_fault, start_model, stop_model
    from xds_server.lab.oip.v2 import grpc_predict_v2_pb2 as oip
    from xds_server.lab.oip.v2 import grpc_predict_v2_pb2_grpc as oip_grpc

    server = start_model()
    tensor = {"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]}
    path = f"/v2/models/{server.model}/infer"
    request = oip.ModelInferRequest(
        model_name=server.model,
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="features",
                datatype="FP32",
                shape=[1, 3],
                contents=oip.InferTensorContents(fp32_contents=[1, 1, 1]),
            )
        ],
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(request, metadata=((CANARY_MATCH_HEADER, "true"),), timeout=5)
            stub.ModelInfer(request, timeout=5)
            assert (
                rest(server, "POST", path, {"inputs": [tensor]}, {CANARY_MATCH_HEADER: "true"})[0]
                == 200
            )
            assert rest(server, "POST", path, {"inputs": [tensor]})[0] == 200
            assert metric(server, "model_prediction_score_count", canary_match="true") == 2
            assert metric(server, "model_requests_total", canary_match="true", code="200") == 2
            assert metric(server, "model_grpc_requests_total", canary_match="true") == 1
            assert metric(server, "model_requests_total", canary_match="") == 2

            set_fault(server, model_name="other-name")
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert rest(server, "POST", path, {"inputs": [tensor]})[0] == 404
            renamed = "/v2/models/other-name/infer"
            assert rest(server, "POST", renamed, {"inputs": [tensor]})[0] == 200
    finally:
        stop_model(server)
