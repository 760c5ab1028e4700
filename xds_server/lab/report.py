"""What a lab run reports: the addresses at the start, then `summary.json` (the outcome
per region, every decision, what a fault cost), the printed report and `rollout.png`
(matplotlib, imported here only, when the plot is drawn).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from xds_server.lab import partitions
from xds_server.lab.follow import FollowResult, followed_state
from xds_server.lab.layout import GROUP, VERSIONS, MeshOptions
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.scenarios import Scenario
from xds_server.rollout.audit import AuditEntry, rollback_cause


def write_report(
    mesh: LocalMesh,
    scenario: Scenario,
    res: FollowResult,
    proxyless_after: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`summary.json` and `rollout.png` into the lab's folder, and the report printed;
    the summary."""
    summary = summarize(mesh, scenario, res, proxyless_after)
    (mesh.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_path = mesh.workdir / "rollout.png"
    plot(mesh.state.audit(), plot_path, mesh.opts.regions)
    print_report(summary, mesh, plot_path)
    return summary


def summarize(
    mesh: LocalMesh,
    scenario: Scenario,
    res: FollowResult,
    proxyless_after: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`proxyless_after`: what the proxyless clients sent once the rollout had ended."""
    state = followed_state(mesh) or {"phase": "none", "regions": {}, "reason": ""}
    audit = mesh.state.audit()
    outcome = {r: s["phase"] for r, s in state["regions"].items()}
    load = mesh.processes.load
    results = load.snapshot() if load else []
    summary: dict[str, Any] = {
        "scenario": scenario.name,
        "protocol": mesh.opts.protocol,
        "expected": scenario.expect,
        "ok": not res.timed_out
        and bool(outcome)
        and all(p == scenario.expect for p in outcome.values())
        and _expected_cause(scenario, mesh.opts.protocol, _cause(audit))
        # A rollback before the fault is not the scenario's: something else went wrong.
        and (scenario.fault is None or res.fault_at is not None),
        "cause": _cause(audit),
        "outcome": outcome,
        "rollout": {"phase": state["phase"], "reason": state["reason"]},
        "timed_out": res.timed_out,
        "requests": {
            "total": len(results),
            "by_status": dict(Counter(str(r.status) for r in results)),
        },
        "decisions": [
            {
                "time": e.time,
                "service": e.service,
                "region": e.region,
                "kind": e.kind,
                "step": e.step,
                "phase_from": e.phase_from,
                "phase_to": e.phase_to,
                "verdict": e.verdict.outcome if e.verdict else None,
                "reason": e.reason,
            }
            for e in audit
        ],
        "audit_log": mesh.state.audit_log,
    }
    _add_sections(summary, mesh, scenario, res, audit, results, proxyless_after or {})
    return summary


def _add_sections(
    summary: dict[str, Any],
    mesh: LocalMesh,
    scenario: Scenario,
    res: FollowResult,
    audit: list[AuditEntry],
    results: list[Any],
    proxyless_after: Mapping[str, Any],
) -> None:
    """The summary's parts that only some runs have: replicas, proxyless clients, a
    fault (each can turn `ok` false)."""
    if mesh.processes.etcd is not None:
        summary["replicas"] = replica_summary(mesh, scenario, res, audit, results)
        summary["ok"] = summary["ok"] and summary["replicas"]["ok"]
        if scenario.replica_fault == "leader":
            summary["failover"] = summary["replicas"]["fault"]
    if mesh.processes.proxyless:
        summary["proxyless"] = proxyless_summary(mesh, scenario, proxyless_after)
        summary["ok"] = summary["ok"] and summary["proxyless"]["followed"]
    if mesh.opts.features:
        summary["group"] = group_summary(mesh, scenario, res, audit)
        summary["ok"] = summary["ok"] and summary["group"]["ok"]
    if res.partition is not None and scenario.partition is not None:
        summary["partition"] = partitions.summary(mesh, scenario, res.partition, audit, results)
        summary["ok"] = summary["ok"] and summary["partition"]["ok"]
    if scenario.fault is not None:
        fault = scenario.fault
        summary["fault"] = {
            **asdict(fault),
            "region": mesh.opts.regions[fault.region_index % len(mesh.opts.regions)],
            "started_at": res.fault_at,
            "to_zero_canary_s": (
                res.zero_canary_at - res.fault_at if res.fault_at and res.zero_canary_at else None
            ),
        }


def group_summary(
    mesh: LocalMesh, scenario: Scenario, res: FollowResult, audit: list[AuditEntry]
) -> dict[str, Any]:
    """Both services of the group: each one's outcome per region, its servers' own counts
    of the arms their requests carried (`arm_crossed` must be 0: no request met another
    arm than the pool serving it; `arm_missing`: requests without the header), the
    recommender's calls answered by another arm of features than its own, each one's
    time from the fault to every Envoy at 0% canary, and the pushes its rollback took
    per region (the snapshot versions of the rollback's entries: one expected)."""
    services: dict[str, Any] = {}
    rollbacks = [e for e in audit if e.kind == "transition" and e.phase_to == "rolled_back"]
    for service in mesh.layout.services():
        state = mesh.state.rollout(service) or {"regions": {}}
        counts = mesh.traffic.service_stats(service)
        done = res.zero_canary_by_service.get(service)
        services[service] = {
            "outcome": {r: s["phase"] for r, s in state["regions"].items()},
            "requests": counts.get("user_requests", 0),
            "crossed_arms": counts.get("arm_crossed", 0),
            "without_header": counts.get("arm_missing", 0),
            "same_arm": counts.get("arm_matched", 0),
            "calls": counts.get("downstream_calls", 0),
            "calls_failed": counts.get("downstream_failed", 0),
            "calls_crossed": counts.get("downstream_crossed", 0),
            "to_zero_canary_s": done - res.fault_at if done and res.fault_at else None,
        }
    both = res.zero_canary_at - res.fault_at if res.zero_canary_at and res.fault_at else None
    # The rollback's pushes per region: the snapshot versions of every member's entries.
    pushes = {
        r: len({e.snapshot_version for e in rollbacks if e.region == r})
        for r in mesh.opts.regions
        if any(e.region == r for e in rollbacks)
    }
    followers = {e.service for e in rollbacks if f"group {GROUP}: member " in e.reason}
    return {
        "name": GROUP,
        "consistent": mesh.spec.shape.group and mesh.spec.shape.consistent,
        "services": services,
        "to_zero_canary_s": both,
        "rollback_pushes": pushes,
        "decided_by": sorted({e.service for e in rollbacks} - followers),
        "ok": all(v == 1 for v in pushes.values())
        and all(
            s["crossed_arms"] == 0
            and s["outcome"]
            and all(p == scenario.expect for p in s["outcome"].values())
            for s in services.values()
        ),
    }


def replica_summary(
    mesh: LocalMesh,
    scenario: Scenario,
    res: FollowResult,
    audit: list[AuditEntry],
    results: list[Any],
) -> dict[str, Any]:
    """Who led, what was killed and what it cost: after a replica fault, the first
    decision committed after the kill (by the new leader: the old one is dead, or had
    no quorum to lose) and the requests that failed from the kill on."""
    out: dict[str, Any] = {"leader_at_end": mesh.state.leader(), "ok": True}
    if scenario.replica_fault is None:
        return out
    killed_at = res.replica_fault_at
    fault: dict[str, Any] = {
        "kind": scenario.replica_fault,
        "killed": res.killed,
        "killed_at": killed_at,
        "leader_before": res.leader_before,
    }
    if killed_at is not None:
        after = [e for e in audit if e.time > killed_at]
        first = min((e.time for e in after), default=None)
        fault["new_leader_s"] = first - killed_at if first is not None else None
        fault["failed_requests"] = sum(
            1 for r in results if r.time >= killed_at and not 200 <= r.status < 300
        )
    fault["failed_requests_in_run"] = sum(1 for r in results if not 200 <= r.status < 300)
    if res.instance is not None and killed_at is not None:
        fault.update(instance_loss(mesh, res.instance, killed_at, results))
    out["fault"] = fault
    out["ok"] = killed_at is not None and fault.get("new_leader_s") is not None
    if res.instance is not None:  # gone from the Envoys, and nothing failed after that
        out["ok"] = out["ok"] and fault.get("failed_after_gone") == 0
    return out


def instance_loss(
    mesh: LocalMesh, instance: dict[str, Any], killed_at: float, results: list[Any]
) -> dict[str, Any]:
    """The killed instance's region: how long its Envoys kept it (its lease's TTL, the
    store's watch, one push), and its requests that failed before they dropped it (sent
    to a dead host: connection refused) and after (none expected)."""
    gone = instance["gone_at"]
    region = instance["region"]
    mine = [r for r in results if r.time >= killed_at and r.target.startswith(f"{region}-")]
    failed = [r for r in mine if not 200 <= r.status < 300]
    return {
        "region": region,
        "killed_port": instance["killed_port"],
        "new_port": instance["new_port"],
        "registry_ttl": mesh.opts.registry_ttl,
        "gone_from_envoys_s": gone - killed_at if gone is not None else None,
        "failed_before_gone": sum(1 for r in failed if gone is None or r.time < gone),
        "failed_after_gone": sum(1 for r in failed if gone is not None and r.time >= gone),
        "failed_by_status": dict(Counter(str(r.status) for r in failed)),
    }


def proxyless_summary(
    mesh: LocalMesh, scenario: Scenario, after: Mapping[str, Any]
) -> dict[str, Any]:
    """The proxyless gRPC clients' calls, counted apart from the load through the Envoys:
    in all, per region, and after the end, when every call must reach the version the
    rollout ended on, without a failure."""
    final = VERSIONS["canary" if scenario.expect == "promoted" else "production"]
    return {
        "clients_per_region": mesh.opts.proxyless_per_region,
        "total": mesh.traffic.proxyless_counts(),
        "by_region": {r: mesh.traffic.proxyless_counts(r) for r in mesh.opts.regions},
        "after_end": dict(after),
        "final_version": final,
        "followed": bool(after.get("sent"))
        and set(after.get("by_version", {})) == {final}
        and not after.get("failed"),
    }


def _expected_cause(scenario: Scenario, protocol: str, cause: str) -> bool:
    wanted = (scenario.grpc_causes if protocol == "grpc" else ()) or (scenario.cause,)
    return any(w in cause for w in wanted)


def _cause(audit: list[AuditEntry]) -> str:
    """What rolled the rollout back: its region and metric, as the dashboard says."""
    cause = rollback_cause(audit)
    if cause is None:
        return ""
    return f"{cause.metric or 'no metric'} in {cause.region or 'every region'}: {cause.reason}"


def print_intro(scenario: Scenario, opts: MeshOptions, out: Path) -> None:
    print(f"lab: scenario {scenario.name}: {scenario.description}")
    print(f"lab: model servers speak the Open Inference Protocol over {opts.protocol.upper()}")
    if opts.ha:
        print(
            f"lab: replicas on etcd: one per region, a three-member etcd cluster, leader "
            f"lease {opts.leader_ttl:g}s"
        )
    print(f"lab: output in {out}")
    if opts.notify_url:
        print(f"lab: notifications (CloudEvents) to {opts.notify_url}")


def print_report(summary: dict[str, Any], mesh: LocalMesh, plot_path: Path) -> None:
    print()
    print(f"lab: rollout {summary['rollout']['phase']}: {summary['rollout']['reason']}")
    if summary.get("cause"):
        print(f"  rolled back by {summary['cause']}")
    decisions = summary["decisions"]
    _print_regions(summary, mesh)
    if "replicas" in summary and "fault" in summary["replicas"]:
        _print_replica_fault(summary["replicas"])
    if "fault" in summary:
        f = summary["fault"]
        took = f["to_zero_canary_s"]
        print(
            f"  fault in {f['region']} -> every Envoy at 0% canary: "
            + (f"{took:.2f}s" if took is not None else "not reached")
        )
    if "group" in summary:
        _print_group(summary["group"])
    if "partition" in summary:
        partitions.print_partition(summary["partition"])
    req = summary["requests"]
    print(f"  requests through the Envoys: {req['total']} by status {req['by_status']}")
    if "proxyless" in summary:
        p = summary["proxyless"]
        total, after = p["total"], p["after_end"]
        print(
            f"  proxyless gRPC calls: {total.get('sent', 0)} by version "
            f"{total.get('by_version', {})}, failures {total.get('failures', {})}; after the "
            f"end {after.get('by_version', {})} ({'all' if p['followed'] else 'NOT all'} "
            f"{p['final_version']})"
        )
    print(f"  audit log: {summary['audit_log']} ({len(decisions)} decisions)")
    print(f"  plot: {plot_path}")
    print(f"  summary: {plot_path.parent / 'summary.json'}")
    print(
        f"lab: {'as expected' if summary['ok'] else 'NOT as expected'}: "
        f"expected {summary['expected']}"
    )


def _print_regions(summary: Mapping[str, Any], mesh: LocalMesh) -> None:
    """Per region (with `features`: per service and region): its outcome, the steps it
    reached and its checks."""
    services = mesh.layout.services()
    group = summary.get("group", {}).get("services", {})
    for service in services:
        outcome = group.get(service, {}).get("outcome", summary["outcome"])
        for region in mesh.opts.regions:
            mine = [
                d
                for d in summary["decisions"]
                if d["region"] == region and d.get("service", service) == service
            ]
            verdicts = Counter(d["verdict"] or "warm-up" for d in mine if d["kind"] == "check")
            steps = [
                d["step"]
                for d in mine
                if d["kind"] == "transition" and d["phase_to"] == "progressing"
            ]
            where = f"{service} {region}" if len(services) > 1 else region
            print(
                f"  {where:<10} {outcome.get(region, '?'):<12} steps reached {steps}  checks: "
                + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
            )


def _print_group(group: Mapping[str, Any]) -> None:
    """Each member's outcome, crossed arms and time to 0% canary; who decided the
    rollback, and in how many pushes per region."""
    if group["decided_by"]:
        print(
            f"  group {group['name']}: rolled back by member {', '.join(group['decided_by'])}; "
            f"pushes per region {group['rollback_pushes']}"
        )
    for name, s in group["services"].items():
        took = s["to_zero_canary_s"]
        outcome = ", ".join(sorted(set(s["outcome"].values()))) or "no rollout"
        print(
            f"  group {group['name']} member {name}: {outcome}; crossed arms "
            f"{s['crossed_arms']} of {s['requests']} requests ({s['without_header']} "
            f"without the header)"
            + (
                f"; calls answered by another arm {s['calls_crossed']} of {s['calls']}"
                if s["calls"]
                else ""
            )
            + (
                f"; every Envoy at 0% canary {took:.2f}s after the fault"
                if took is not None
                else ""
            )
        )


def _print_replica_fault(replicas: Mapping[str, Any]) -> None:
    """What a replica fault killed, and what it cost."""
    f = replicas["fault"]
    took = f.get("new_leader_s")
    print(
        f"  {f['kind']} fault: killed {f['killed']} -> first decision committed after "
        + (f"{took:.2f}s" if took is not None else "never")
        + f" (leader before {f['leader_before']}, now {replicas['leader_at_end']})"
        + f"; failed requests after the kill: {f.get('failed_requests')}"
    )
    if "gone_from_envoys_s" in f:
        took = f["gone_from_envoys_s"]
        print(
            f"  the killed instance left every {f['region']} Envoy after "
            + (f"{took:.2f}s" if took is not None else "never (NOT gone)")
            + f" (lease TTL {f['registry_ttl']:g}s); its region's requests that failed "
            f"before that: {f['failed_before_gone']} {f['failed_by_status']}, after: "
            f"{f['failed_after_gone']}"
        )


def print_addresses(mesh: LocalMesh) -> None:
    """Where a person follows the rollout: the dashboard, and xdsctl on the admin API."""
    print(f"lab: dashboard {mesh.layout.dashboard_url}")
    print(f"lab: admin token for its actions and xdsctl's: {mesh.credentials.token_file}")
    print(f"lab: xdsctl --server {admin_servers(mesh)} status")
    etcd = mesh.processes.etcd
    if etcd is not None:
        print(f"lab: store {etcd.url}; leader now {mesh.state.wait_leader(15)}")


def admin_servers(mesh: LocalMesh) -> str:
    """xdsctl's --server: every replica's admin API (it tries them in order)."""
    replicas = mesh.processes.replicas
    if not replicas:
        return f"{mesh.layout.server_host()}:{mesh.layout.admin_port}"
    lay = mesh.layout
    return ",".join(f"{lay.replica_host(r)}:{lay.replica_admin(r)}" for r in replicas)


def print_keep(mesh: LocalMesh) -> None:
    print("\nlab: still running (--keep):")
    print(f"  dashboard       {mesh.layout.dashboard_url}")
    print(
        f"  admin API       xdsctl --server {admin_servers(mesh)} "
        f"--token-file {mesh.credentials.token_file} status"
    )
    print(f"  Prometheus      {mesh.layout.prometheus_url}")
    lay = mesh.layout
    print(
        f"  xds-server      xDS {lay.server_host()}:{lay.xds_port}, metrics http://"
        f"{lay.server_host()}:{lay.metrics_port}/metrics, log {mesh.workdir / 'xds-server.log'}"
    )
    for e in mesh.processes.envoys:
        print(f"  {e.name:<15} http://{e.opts.listen}/predict  admin {e.admin}")
    for (region, pool), port in mesh.layout.model_ports.items():
        host = mesh.layout.host(region)
        print(f"  model {region}/{pool}: http://{host}:{port}  (POST /fault to change faults)")
    print(f"  stop it all: xds-server lab down --out {mesh.workdir}")


def plot(audit: list[AuditEntry], path: Path, regions: tuple[str, ...]) -> None:
    """Canary weight, canary error rate and p99 per region over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = audit[0].time if audit else time.time()
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for region in regions:
        weight_t, weight = [], []
        for e in audit:
            if e.region == region and e.weights_after:
                weight_t.append(e.time - t0)
                weight.append(e.weights_after.canary)
        checks = [
            (e.time - t0, e.measurements.canary)
            for e in audit
            if e.region == region and e.kind == "check" and e.measurements
        ]
        ct = [t for t, _ in checks]
        err = [(canary.error_rate or 0) * 100 for _, canary in checks]
        p99 = [canary.p99_ms for _, canary in checks]
        axes[0].step(weight_t, weight, where="post", label=region)
        axes[1].plot(ct, err, marker=".", label=region)
        axes[2].plot(ct, p99, marker=".", label=region)
    axes[0].set_ylabel("canary weight %")
    axes[1].set_ylabel("canary 5xx %")
    axes[2].set_ylabel("canary p99 ms")
    axes[2].set_xlabel("seconds since the rollout started")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    fig.suptitle("canary rollout")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
