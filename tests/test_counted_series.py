"""Counting a counter that Envoy makes on first use (a response class, a gRPC status,
gRPC's calls), against a real Prometheus: a series born within the window counts all it
holds and no more; one that was there counts its increase. A canary failing every call
reads an error rate of 1, not more (the sum of a young series' extrapolated increase and
its first sample read 14 errors of 9 calls), and a series is never read as nothing
because Prometheus is younger than the window."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.support import wait_for
from tests.test_client_errors import _Exporter, _Handler
from xds_server.lab.procs import free_port
from xds_server.lab.prometheus import Prometheus, ScrapeTarget
from xds_server.rollout.metrics import PrometheusSource, fill
from xds_server.rollout.ports import Where
from xds_server.spec.rollout import DEFAULT_QUERIES, GRPC_SERVER_FAULTS, grpc_queries

REGION = "us-east"
WINDOW_S = 8
CLUSTER = 'envoy_cluster_name="recommender|canary"'


def _stats(requests: int, failed: int | None) -> str:
    """One Envoy's stats: the cluster's request counter (there from its start) and, once
    the canary has failed (`failed` not None), the 5xx class, gRPC's calls and NOT_FOUND."""
    text = f"envoy_cluster_upstream_rq_total{{{CLUSTER}}} {requests}\n"
    if failed is not None:
        text += (
            f'envoy_cluster_upstream_rq_xx{{{CLUSTER},envoy_response_code_class="5"}} {failed}\n'
            f"envoy_cluster_grpc_total{{{CLUSTER}}} {failed}\n"
            f"envoy_cluster_grpc_5{{{CLUSTER}}} {failed}\n"
        )
    return text


def test_a_series_born_in_the_window_counts_what_it_holds_once(tmp_path: Path) -> None:
    exporter = _Exporter(("127.0.0.1", 0), _Handler)
    exporter.text = _stats(100, None)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    target = ScrapeTarget(f"127.0.0.1:{exporter.server_address[1]}", "/metrics", {"region": REGION})
    prometheus = Prometheus(tmp_path / "prometheus", free_port(), [target])
    try:
        source = PrometheusSource(prometheus.url)
        where = Where(REGION, "recommender", "canary", "v2", "recommender|canary")
        grpc = grpc_queries(GRPC_SERVER_FAULTS)

        def read(template: str) -> float | None:
            return source.query(fill(template, where, WINDOW_S))

        before = f"count(envoy_cluster_upstream_rq_total offset {WINDOW_S}s)"
        wait_for(
            lambda: source.query(before) == 1, "the Envoy scraped before the window", timeout=40
        )
        # The canary fails: every series below is born now, at 4, and grows to 8.
        exporter.text = _stats(104, 4)
        born = "last_over_time(envoy_cluster_grpc_total[1m])"
        wait_for(lambda: source.query(born) == 4, "the series' first sample", timeout=20)
        exporter.text = _stats(108, 8)
        wait_for(lambda: source.query(born) == 8, "a later sample", timeout=20)
        for template in (DEFAULT_QUERIES["errors"], grpc["requests"], grpc["client_errors"]):
            assert read(template) == 8, template  # all of it, once
        # A window reaching back before Prometheus scraped anything (it was restarted, or
        # is new): a first sample may hold older counts, so the increase is counted, but
        # never nothing (a step whose window grows from there would hold forever).
        longer = fill(grpc["requests"], where, 3600)
        assert 0 < (source.query(longer) or 0) < 9  # extrapolated a little
        # A series that was there when the window began counts its increase only.
        wait_for(
            lambda: (read(grpc["requests"]) or 0) < 1, "no calls in the latest window", timeout=30
        )
    finally:
        prometheus.stop()
        exporter.shutdown()
        exporter.server_close()
