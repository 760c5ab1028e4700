"""`client_errors`: answers that blame the caller (4xx; gRPC's caller-class statuses) which
the canary gives and its comparator does not. The spec's built-in metric and its queries,
the judge both ways, and a canary serving its model under another name rolled back by a
real Envoy's stats in a real Prometheus, over REST and over gRPC."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support import wait_for, wait_shares
from xds_server.lab.layout import MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import free_port
from xds_server.lab.prometheus import Prometheus, ScrapeTarget
from xds_server.lab.scenarios import FAST_PLAN, SCENARIOS, WRONG_MODEL_NAME
from xds_server.rollout.evidence import (
    FAIL,
    HIGH,
    PASS,
    Comparison,
    Measurement,
    MetricClass,
)
from xds_server.rollout.judge import judge
from xds_server.rollout.metrics import PrometheusSource, QueryError, fill
from xds_server.rollout.ports import Where
from xds_server.spec import MetricKind, RolloutPlan, SpecError, validate_spec
from xds_server.spec.rollout import (
    CLIENT_ERRORS,
    DEFAULT_QUERIES,
    UPSTREAM_4XX,
    Guardrails,
)

REGION = "us-east"


def spec_doc(protocol: str = "http", **extra: Any) -> dict[str, Any]:
    service: dict[str, Any] = {
        "name": "recommender",
        "protocol": protocol,
        "pools": {
            p: {"version": v, "endpoints": {REGION: [f"127.0.0.1:{port}"]}}
            for p, v, port in (("production", "v1", 9001), ("canary", "v2", 9002))
        },
        **extra,
    }
    return {
        "regions": [REGION],
        "rollout": {"analysis": {"metrics": {"error_rate": {}, CLIENT_ERRORS: {}}}},
        "services": [service],
    }


def plan_of(doc: dict[str, Any]) -> RolloutPlan:
    return validate_spec(doc, "mesh.yaml").services[0].rollout


def grpc_codes(query: str) -> list[int]:
    return sorted({int(n) for n in re.findall(r"envoy_cluster_grpc_(\d+)\{", query)})


# ---- the spec ----


def test_client_errors_is_a_default_metric_judged_like_error_rate() -> None:
    """A spec that says nothing about analysis judges client errors: the canary that
    answered every call with NOT_FOUND was promoted by a default spec."""
    doc = spec_doc()
    del doc["rollout"]
    metrics = {m.name: m for m in plan_of(doc).analysis.metrics}
    m = metrics[CLIENT_ERRORS]
    assert (m.kind, m.critical, m.group) == (MetricKind.CLIENT_ERRORS, True, "errors")
    assert (m.allowed_change, m.detect_change) == (
        metrics["error_rate"].allowed_change,
        metrics["error_rate"].detect_change,
    )


def test_http_services_read_envoys_4xx_class() -> None:
    q = plan_of(spec_doc()).queries["client_errors"]
    assert q == UPSTREAM_4XX == DEFAULT_QUERIES["client_errors"]
    assert 'envoy_response_code_class="4"' in q
    assert q.endswith("or vector(0))")  # no series yet: none, not no data


def test_grpc_services_read_the_caller_class_statuses() -> None:
    q = plan_of(spec_doc("grpc")).queries["client_errors"]
    # INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED,
    # FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNAUTHENTICATED: neither OK, CANCELLED
    # nor a server fault (those are error_rate's).
    assert grpc_codes(q) == [3, 5, 6, 7, 8, 9, 10, 11, 16]
    # A status counted as an error is not a client error as well.
    doc = spec_doc("grpc", grpc={"error_codes": ["UNAVAILABLE", "NOT_FOUND"]})
    q = plan_of(doc).queries["client_errors"]
    assert grpc_codes(q) == [2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16]


def test_the_spec_may_tune_replace_or_leave_out_client_errors() -> None:
    own = 'sum(increase(my_4xx{{region="{region}",envoy_cluster_name="{cluster}"}}[{window}]))'
    doc = spec_doc("grpc")
    doc["rollout"]["queries"] = {"client_errors": own}
    doc["rollout"]["analysis"]["metrics"][CLIENT_ERRORS] = {"confidence": 0.95}
    plan = plan_of(doc)
    assert plan.queries["client_errors"] == own  # the spec's own query is kept
    assert plan.analysis.metrics[1].confidence == 0.95
    doc["rollout"]["analysis"]["metrics"] = {"error_rate": {}}
    assert [m.name for m in plan_of(doc).analysis.metrics] == ["error_rate"]
    doc["rollout"]["analysis"]["metrics"] = {CLIENT_ERRORS: {"query": own}}
    with pytest.raises(SpecError, match=r"client_errors: a client_errors metric reads Envoy"):
        plan_of(doc)


# ---- the judge ----


def step(canary: tuple[float | None, float], comparator: tuple[float | None, float]) -> Comparison:
    def pool(reading: tuple[float | None, float]) -> Measurement:
        numerator, requests = reading
        return Measurement(requests=requests, errors=0, client_errors=numerator)

    return Comparison(pool(canary), pool(comparator), "baseline")


PLAN = plan_of(spec_doc())
WINDOW = Measurement(requests=200, errors=0, p99_ms=50.0)
JUDGED = RolloutPlan(
    guardrails=Guardrails(max_p99_ms=1e9, min_requests=5),
    analysis=PLAN.analysis,
)


def test_a_canary_answering_not_found_where_the_comparator_answers_ok_fails_at_once() -> None:
    v = judge(JUDGED, WINDOW, step((12, 12), (0, 220)), regions=3)
    (result,) = [m for m in v.metrics if m.name == CLIENT_ERRORS]
    assert result.classification == HIGH
    assert v.outcome == FAIL and v.conclusive and v.score == 0
    assert "client_errors high" in v.reason and "canary 12/12" in v.reason


def test_a_steady_share_of_bad_requests_in_every_version_passes() -> None:
    # 10% of the callers' requests are malformed, whichever version answers them.
    v = judge(JUDGED, WINDOW, step((52, 500), (48, 500)), regions=3)
    (result,) = [m for m in v.metrics if m.name == CLIENT_ERRORS]
    assert result.classification == MetricClass.PASS, v.reason
    assert v.outcome == PASS, v.reason


def test_a_missing_client_error_series_reads_as_none() -> None:
    """Envoy makes a response class's series on its first response: no series is no
    client error (a pass with enough requests), never "no data"."""
    v = judge(JUDGED, WINDOW, step((None, 2000), (None, 2000)), regions=1)
    (result,) = [m for m in v.metrics if m.name == CLIENT_ERRORS]
    assert result.classification == MetricClass.PASS, result.detail
    # Without requests, though, there is nothing to judge: hold.
    v = judge(JUDGED, WINDOW, step((None, 0), (None, 0)))
    (result,) = [m for m in v.metrics if m.name == CLIENT_ERRORS]
    assert result.classification == MetricClass.NO_DATA


# ---- end to end: wrong-model-name ----


def test_wrong_model_name_is_in_the_scenario_table() -> None:
    scenario = SCENARIOS["wrong-model-name"]
    assert scenario.expect == "rolled_back" and scenario.cause == CLIENT_ERRORS
    assert scenario.fault is not None and scenario.fault.knobs() == {"model_name": WRONG_MODEL_NAME}
    assert CLIENT_ERRORS in FAST_PLAN["analysis"]["metrics"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_canary_serving_its_model_under_another_name_is_rolled_back(
    tmp_path: Path, protocol: str
) -> None:
    """Every canary inference is NOT_FOUND (gRPC) / 404 (REST), fast and never a 5xx: only
    client_errors, over Envoy's stats in Prometheus, can tell; the rollback names it."""
    opts = MeshOptions(regions=(REGION,), rollout=FAST_PLAN, protocol=protocol)
    with LocalMesh(tmp_path / "mesh", opts) as mesh:
        load = mesh.processes.start_load()
        wait_for(lambda: len(load.versions()) >= 1, "answers through Envoy", timeout=15)
        mesh.faults.set(REGION, "canary", model_name=WRONG_MODEL_NAME)
        mesh.spec.add_canary()
        state = mesh.state.wait_phase({"rolled_back", "promoted"}, 90)
        assert state["phase"] == "rolled_back", state
        wait_shares(mesh.processes.envoys, 0, timeout=20)
        (rollback,) = [
            e for e in mesh.state.audit() if e.region is None and e.phase_to == "rolled_back"
        ]
        assert "client_errors high" in rollback.reason, rollback.reason
        assert "error_rate high" not in rollback.reason
        failed = {f.grpc_code if protocol == "grpc" else str(f.status) for f in load.failures()}
        assert failed == {"NOT_FOUND" if protocol == "grpc" else "404"}, failed


# ---- the gRPC status queries against a real Prometheus ----


class _Exporter(ThreadingHTTPServer):
    """Serves `text` as Prometheus metrics: a stand-in for one Envoy's stats."""

    text = ""


class _Handler(BaseHTTPRequestHandler):
    server: _Exporter

    def do_GET(self) -> None:
        data = self.server.text.encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain; version=0.0.4")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _stats(not_found: int, unavailable: int) -> str:
    c = 'envoy_cluster_name="recommender|canary"'
    return (
        f"envoy_cluster_upstream_rq_total{{{c}}} {10 + not_found + unavailable}\n"
        f"envoy_cluster_grpc_5{{{c}}} {not_found}\nenvoy_cluster_grpc_14{{{c}}} {unavailable}\n"
    )


def test_two_statuses_of_one_cluster_are_counted_not_refused(tmp_path: Path) -> None:
    """One selector over `__name__=~"envoy_cluster_grpc_(5|14)"` made Prometheus refuse
    the query once both series existed ("vector cannot contain metrics with the same
    labelset"): errors then read as unavailable, and a failing gRPC canary held instead
    of rolling back. Each status is its own term now."""
    exporter = _Exporter(("127.0.0.1", 0), _Handler)
    exporter.text = _stats(1, 1)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    target = ScrapeTarget(f"127.0.0.1:{exporter.server_address[1]}", "/metrics", {"region": REGION})
    prometheus = Prometheus(tmp_path / "prometheus", free_port(), [target])
    try:
        source = PrometheusSource(prometheus.url)
        seen = f'count(envoy_cluster_grpc_14{{region="{REGION}"}})'
        wait_for(lambda: source.query(seen) == 1, "both statuses in Prometheus", timeout=30)
        exporter.text = _stats(4, 3)
        grpc = plan_of(spec_doc("grpc", grpc={"error_codes": ["UNAVAILABLE"]}))
        queries = {
            "errors": grpc.queries["errors"],
            "client_errors": grpc.queries["client_errors"],
            "one selector": 'sum(increase({{__name__=~"envoy_cluster_grpc_(5|14)",'
            'region="{region}",envoy_cluster_name="{cluster}"}}[{window}]))',
        }
        where = Where(REGION, "recommender", "canary", "v2", "recommender|canary")

        def read(key: str) -> float:
            return source.query(fill(queries[key], where, 60)) or 0.0

        wait_for(lambda: read("errors") >= 2, "UNAVAILABLE's increase", timeout=30)
        assert read("client_errors") >= 3  # NOT_FOUND's, from the same cluster
        with pytest.raises(QueryError, match="same labelset"):
            read("one selector")
    finally:
        prometheus.stop()
        exporter.shutdown()
        exporter.server_close()
