"""`/metrics` keeps its names and labels: every family the server exported before each
part came to own its collectors (recorded from that version), on a real `serve`.

Dashboards and alerts (manifests/) and users' own rules read these names: a rename or a
lost label is a breaking change, whichever part of the code owns the collector."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support import wait_for
from xds_server.app.metrics import ProcessMetrics
from xds_server.lab.procs import Process, free_port, http_get

from .conftest import REGIONS, make_spec_doc, write_spec

CLI = [sys.executable, "-m", "xds_server.cli"]

FAMILIES = {
    ("xds_connected_nodes", "gauge", ("region",)),
    ("xds_etcd_alarm", "gauge", ("alarm",)),
    ("xds_etcd_compacted_revision", "gauge", ()),
    ("xds_etcd_compactions", "counter", ()),
    ("xds_etcd_db_size_bytes", "gauge", ("member",)),
    ("xds_etcd_db_size_in_use_bytes", "gauge", ("member",)),
    ("xds_etcd_defrags", "counter", ()),
    ("xds_etcd_keys", "gauge", ()),
    ("xds_etcd_quota_bytes", "gauge", ()),
    ("xds_etcd_revision", "gauge", ()),
    ("xds_etcd_writes_held", "gauge", ()),
    ("xds_istio_apply", "counter", ("region", "result")),
    ("xds_istio_apply_consecutive_failures", "gauge", ("region",)),
    ("xds_istio_apply_pending", "gauge", ("region",)),
    ("xds_leader", "gauge", ()),
    ("xds_leader_elections", "counter", ()),
    ("xds_nacks", "counter", ("region", "type")),
    ("xds_nodes_sync", "gauge", ("region", "state")),
    ("xds_notifications_dropped", "counter", ("target",)),
    ("xds_notifications_failed", "counter", ("target", "type")),
    ("xds_notifications_queued", "gauge", ("target",)),
    ("xds_notifications_retries", "counter", ("target",)),
    ("xds_notifications_sent", "counter", ("target", "type")),
    ("xds_push_duration_seconds", "histogram", ("region",)),
    ("xds_pushes", "counter", ("region",)),
    ("xds_registered_instances", "gauge", ("service", "version", "region")),
    ("xds_rollout_decisions", "counter", ("service", "outcome")),
    ("xds_rollout_metric_results", "counter", ("service", "metric", "classification")),
    ("xds_rollout_phase", "gauge", ("service", "phase")),
    ("xds_rollout_score", "gauge", ("service", "region")),
    ("xds_rollout_step", "gauge", ("service", "region")),
    ("xds_rollout_signal_evidence_age_seconds", "gauge", ("service", "region")),
    ("xds_rollout_signal_nodes", "gauge", ("service", "region", "state")),
    ("xds_rollout_signal_srm_p_value", "gauge", ("service", "region")),
    ("xds_rollout_signal_targets", "gauge", ("service", "region", "state")),
    ("xds_rollout_signal_trusted", "gauge", ("service", "region")),
    ("xds_stragglers", "gauge", ("service", "region")),
    ("xds_store_unsaved_rollbacks", "gauge", ()),
    ("xds_store_writable", "gauge", ()),
    ("xds_store_write_failures", "counter", ()),
    ("xds_traffic_weight_percent", "gauge", ("service", "region", "pool")),
}
"""(name, type, label names) of every family, as the single `Telemetry` hub registered them."""


def registered(metrics: ProcessMetrics) -> set[tuple[str, str, tuple[str, ...]]]:
    out = set()
    for collector in metrics.registry._collector_to_names:  # the registry's own table
        name, kind = collector._name, collector._type  # type: ignore[attr-defined]
        labels = tuple(collector._labelnames)  # type: ignore[attr-defined]
        out.add((name, kind, labels))
    return out


def test_every_family_keeps_its_name_type_and_labels() -> None:
    assert registered(ProcessMetrics.create()) == FAMILIES


def test_a_changed_label_is_seen() -> None:
    """The comparison above can fail: one more label on one family is a difference."""
    from prometheus_client import CollectorRegistry, Gauge

    metrics = ProcessMetrics.create(CollectorRegistry())
    Gauge("xds_extra", "x", ["region"], registry=metrics.registry)
    assert registered(metrics) - FAMILIES == {("xds_extra", "gauge", ("region",))}


def test_a_serving_process_exposes_every_family(tmp_path: Path) -> None:
    """A real `serve` (one process, SQLite) shows every family on /metrics, leader-only
    sinks' included, before anything happened."""
    ports = {(r, p): free_port() for r in REGIONS for p in ("production", "canary")}
    spec = tmp_path / "mesh.yaml"
    write_spec(spec, make_spec_doc(ports))
    metrics_port = free_port()
    argv = [*CLI, "serve", "--spec", str(spec),
            "--xds-address", f"127.0.0.1:{free_port()}",
            "--admin-address", f"127.0.0.1:{free_port()}",
            "--metrics-address", f"127.0.0.1:{metrics_port}", "--ui-address", "",
            "--state-dir", str(tmp_path / "state"),
            "--prometheus-url", f"http://127.0.0.1:{free_port()}"]  # fmt: skip
    server = Process("serve", argv, tmp_path / "serve.log")
    try:
        body = wait_for(
            lambda: http_get(f"http://127.0.0.1:{metrics_port}/metrics")[1].decode(),
            "/metrics answering",
            timeout=30,
        )
        typed = {line.split()[2] for line in body.splitlines() if line.startswith("# TYPE ")}
        exposed = {f"{n}_total" if kind == "counter" else n for n, kind, _ in FAMILIES}
        created = {f"{n}_created" for n, kind, _ in FAMILIES if kind in ("counter", "histogram")}
        assert exposed <= typed
        assert {t for t in typed if t.startswith("xds_")} - exposed <= created
        assert "xds_leader 1.0" in body.splitlines()
    finally:
        server.stop()
