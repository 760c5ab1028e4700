"""Rollouts end to end: `xds-server serve`, three real Envoys, a real Prometheus scraping
them every second, model servers whose faults the test controls, steady bounded load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import holds_for, mesh_steps, mesh_under_load, wait_for, wait_shares
from xds_server.lab.layout import MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.procs import http_get
from xds_server.lab.scenarios import FAST_PLAN
from xds_server.lab.traffic import canary_share, envoy_weights
from xds_server.rollout.metrics import PrometheusSource


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    with mesh_under_load(tmp_path / "mesh", FAST_PLAN) as m:
        yield m


def wait_step(mesh: LocalMesh, step: int, timeout: float) -> None:
    """Wait until every region is at `step`; on timeout, say where the rollout was."""
    try:
        wait_for(
            lambda: mesh_steps(mesh) == {step}, f"every region at step {step}", timeout=timeout
        )
    except TimeoutError as exc:
        recent = [f"{e.region} {e.kind}: {e.reason}" for e in mesh.state.audit()[-6:]]
        raise AssertionError(f"{exc}; state {mesh.state.rollout()}; last: {recent}") from None


def test_healthy_canary_is_promoted_with_zero_failed_requests(mesh: LocalMesh) -> None:
    load = mesh.processes.load
    assert load is not None
    mesh.spec.add_canary()
    state = mesh.state.wait_phase({"promoted", "rolled_back"}, 120)
    assert state["phase"] == "promoted", state
    assert all(r["phase"] == "promoted" for r in state["regions"].values())
    for envoy in mesh.processes.envoys:
        assert envoy_weights(envoy) == {"canary": 10_000}
    assert load.failures() == []
    # Every region went through every step, in order, and the audit says why.
    audit = mesh.state.audit()
    for region in mesh.opts.regions:
        advanced = [
            e.step
            for e in audit
            if e.region == region and e.kind == "transition" and e.phase_to == "progressing"
        ]
        assert advanced == [0, 1, 2, 3], advanced
    final = [e for e in audit if e.region is None][-1]
    assert final.phase_to == "promoted"
    checks = [e for e in audit if e.kind == "check" and e.verdict and e.verdict.outcome == "pass"]
    assert checks and all(
        e.measurements and (e.measurements.canary.requests or 0) >= 5 for e in checks
    )
    # The server's own /metrics says the same.
    status, body, _ = http_get(f"http://127.0.0.1:{mesh.layout.metrics_port}/metrics")
    assert status == 200
    text = body.decode()
    assert 'xds_rollout_phase{phase="promoted",service="recommender"} 1.0' in text
    assert (
        'xds_traffic_weight_percent{pool="canary",region="eu-west",service="recommender"} '
        "100.0" in text
    )
    passed = 'xds_rollout_metric_results_total{classification="pass",metric="error_rate",'
    assert passed in text
    assert 'xds_rollout_score{region="us-east",service="recommender"}' in text


def test_fault_in_one_region_rolls_back_every_region_within_seconds(mesh: LocalMesh) -> None:
    mesh.spec.add_canary()
    wait_step(mesh, 1, 60)
    wait_shares(mesh.processes.envoys, 20)
    fault_at = time.time()
    mesh.faults.set("eu-west", "canary", error_rate=0.2)
    wait_shares(mesh.processes.envoys, 0, timeout=20, interval=0.05)
    elapsed = time.time() - fault_at
    print(f"\nfault start -> every Envoy at 0% canary: {elapsed:.2f}s")
    assert elapsed <= 10
    state = mesh.state.rollout()
    assert state is not None and state["phase"] == "rolled_back"
    assert all(r["phase"] == "rolled_back" for r in state["regions"].values())
    rollback = [e for e in mesh.state.audit() if e.region is None and e.phase_to == "rolled_back"]
    (entry,) = rollback
    assert "eu-west" in entry.reason and "error_rate" in entry.reason
    # Whichever saw it first: the 5% ceiling (twice in a row, or once when its window
    # proves the breach), or the analysis at once.
    verdict = entry.verdict
    assert verdict is not None
    failed = verdict.failed()
    high = [m for m in verdict.metrics if m.classification == "high"]
    if verdict.conclusive and failed:
        assert "limit 0.05" in entry.reason and "certain:" in entry.reason
        assert failed[0].metric == "error_rate" and failed[0].value > 0.05
    elif verdict.conclusive:
        assert verdict.score == 0 and "error_rate high" in entry.reason
        assert [m.name for m in high] == ["error_rate"] and (high[0].effect or 0) > 2
    else:
        assert "limit 0.05" in entry.reason
        assert failed[0].metric == "error_rate" and failed[0].value > 0.05


def test_latency_breach_rolls_back(mesh: LocalMesh) -> None:
    for region in mesh.opts.regions:
        mesh.faults.set(region, "canary", latency_ms=400)
    mesh.spec.add_canary()
    state = mesh.state.wait_phase({"promoted", "rolled_back"}, 60)
    assert state["phase"] == "rolled_back"
    assert "p99_ms" in state["reason"] and "limit 250" in state["reason"]
    wait_shares(mesh.processes.envoys, 0)


def test_prometheus_outage_holds_then_the_rollout_continues(mesh: LocalMesh) -> None:
    mesh.spec.add_canary()
    wait_step(mesh, 1, 60)
    mesh.faults.stop_prometheus()

    def still_at_step_1() -> None:
        state = mesh.state.rollout()
        assert state is not None and state["phase"] == "progressing"
        assert mesh_steps(mesh) == {1}

    # Over two step durations without Prometheus, nothing advances and nothing rolls back.
    holds_for(still_at_step_1, 7, interval=0.2)
    holds = [
        e
        for e in mesh.state.audit()
        if e.kind == "check" and e.verdict and e.verdict.outcome == "no_data"
    ]
    assert any("unreachable" in e.reason for e in holds)
    mesh.processes.start_prometheus()
    state = mesh.state.wait_phase({"promoted", "rolled_back"}, 120)
    assert state["phase"] == "promoted"


def test_sigkill_mid_rollout_resumes_same_step_without_failed_requests(mesh: LocalMesh) -> None:
    load = mesh.processes.load
    assert load is not None
    mesh.spec.add_canary()
    wait_step(mesh, 1, 60)
    wait_shares(mesh.processes.envoys, 20)
    shares: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():  # bounded by the test below
            shares.extend(canary_share(e) for e in mesh.processes.envoys)
            stop.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    killed_at = time.time()
    try:
        mesh.faults.kill_server()
        assert mesh_steps(mesh) == {1}
        wait_for(
            lambda: len(load.snapshot()) > 0 and load.snapshot()[-1].time > killed_at + 2,
            "load while the server is down",
            timeout=10,
        )
        mesh.processes.start_server()
        wait_for(
            lambda: "resuming rollout of recommender v2" in mesh.processes.server.tail(200),
            "the restarted server to resume",
            timeout=20,
        )
        state = mesh.state.wait_phase({"promoted", "rolled_back"}, 120)
    finally:
        stop.set()
        watcher.join(5)
    assert state["phase"] == "promoted"
    assert load.failures() == []
    # From the kill until the restarted server advanced, Envoys never fell back to 0%.
    first_after = next(i for i, s in enumerate(shares) if s != 20)
    assert shares[first_after] > 20, shares[: first_after + 3]
    resumed = [
        e
        for e in mesh.state.audit()
        if e.kind == "transition" and e.region == "us-east" and e.phase_to == "progressing"
    ]
    assert [e.step for e in resumed] == [0, 1, 2, 3]  # no completed step repeated


def test_a_query_prometheus_rejects_is_a_configuration_error(tmp_path: Path) -> None:
    plan = {**FAST_PLAN, "queries": {"p99_ms": "histogram_quantile(0.99, rate(x[{window}]"}}
    with LocalMesh(tmp_path / "mesh", MeshOptions(rollout=plan)) as mesh:
        mesh.spec.add_canary()
        state = mesh.state.wait_phase({"paused", "rolled_back", "promoted"}, 30)
        assert state["phase"] == "paused"
        assert state["reason"].startswith(
            "configuration error: query 'p99_ms' is rejected by Prometheus: bad_data: "
        )
        assert "configuration error" in mesh.processes.server.tail(50)  # type: ignore[union-attr]


def test_a_query_that_never_answers_for_a_serving_pool_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    """A template with a wrong metric name is valid PromQL that returns nothing: without
    this check the judge would wait on it forever, or pass without looking."""
    typo = (
        "sum by (le) (increase(envoy_cluster_upstream_rq_tme_bucket"
        '{{region="{region}",envoy_cluster_name="{cluster}"}}[{window}]))'
    )
    plan = {**FAST_PLAN, "queries": {"latency_buckets": typo}}
    with LocalMesh(tmp_path / "mesh", MeshOptions(rollout=plan)) as mesh:
        load = mesh.processes.start_load()
        assert mesh.processes.prometheus is not None
        source = PrometheusSource(f"http://127.0.0.1:{mesh.layout.prometheus_port}")
        wait_for(
            lambda: source.query(
                "sum(increase(envoy_cluster_upstream_rq_total"
                '{envoy_cluster_name="recommender|production"}[4s]))'
            ),
            "production traffic in Prometheus",
            timeout=20,
        )
        assert load.failures() == []
        mesh.spec.add_canary()
        state = mesh.state.wait_phase({"paused", "rolled_back", "promoted"}, 30)
        assert state["phase"] == "paused"
        reason = state["reason"]
        assert "configuration error: query 'latency_buckets' returns no data for " in reason
        assert "which receives traffic" in reason
