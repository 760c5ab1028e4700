"""`xds-server lab run`: one canary rollout across a local multi-region mesh, watched live.

Starts (on 127.0.0.1, free ports) model servers, Prometheus, `xds-server serve` and real
Envoys, sends steady load, adds a canary to the spec and follows the rollout to its end.
A scenario may inject a fault into one region's canary mid-rollout. Writes the audit
log, `summary.json` and `rollout.png` into the output folder; exits 0 when the rollout
ended as the scenario expects.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xds_server.lab.mesh import VERSIONS, LocalMesh, MeshOptions, canary_share
from xds_server.lab.procs import wait_for
from xds_server.lab.scenarios import LAB_PLAN, SCENARIOS, Scenario
from xds_server.lab.view import LiveView, PlainLog
from xds_server.rollout.audit import AuditEntry, rollback_cause
from xds_server.rollout.store import FILE_NAME

LAB_ROOT = Path(".lab")
CURRENT = LAB_ROOT / "current"
DEFAULT_REGIONS = ("us-east", "eu-west", "ap-south")


def region_names(n: int) -> tuple[str, ...]:
    return tuple(
        DEFAULT_REGIONS[i] if i < len(DEFAULT_REGIONS) else f"region-{i + 1}" for i in range(n)
    )


def run_lab(
    scenario_name: str,
    regions: int = 3,
    envoys_per_region: int = 2,
    keep: bool = False,
    out: Path | None = None,
    timeout: float = 240,
    live: bool | None = None,
    mtls: bool = False,
    notify_url: str | None = None,
    protocol: str = "http",
    proxyless: int = 0,
    ha: bool = False,
) -> int:
    """`proxyless`: gRPC client processes per region that route by xDS themselves (they
    imply `protocol="grpc"`: they call the model servers' gRPC ports). `ha`: a replica
    per region on a three-member etcd cluster (a scenario with a replica fault implies
    it)."""
    scenario = SCENARIOS[scenario_name]
    ha = ha or scenario.replica_fault is not None
    out = out or LAB_ROOT / f"{time.strftime('%Y%m%d-%H%M%S')}-{scenario.name}"
    out = out.resolve()
    opts = MeshOptions(
        region_names(regions),
        envoys_per_region,
        rollout=dict(scenario.plan or LAB_PLAN),
        load_rate=50,
        mtls=mtls,
        admin_token=secrets.token_urlsafe(18),  # for the dashboard's actions and xdsctl's
        notify_url=notify_url,
        protocol="grpc" if proxyless else protocol,
        proxyless_per_region=proxyless,
        ha=ha,
    )
    mesh = LocalMesh(out, opts)
    live = sys.stdout.isatty() if live is None else live
    # Ctrl-C, kill, or the terminal going away: all end the lab cleanly.
    previous = {
        sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    print_intro(scenario, opts, out)
    kept = False
    try:
        mesh.start()
        write_lab_file(mesh)
        print_addresses(mesh)
        load = mesh.start_load(max_seconds=timeout)
        mesh.start_proxyless(max_seconds=timeout)
        wait_for(lambda: len(load.snapshot()) >= 20, 15, "load through the Envoys")
        mesh.wait_latency_series()
        if proxyless:
            wait_for(
                lambda: mesh.proxyless_counts().get("ok", 0) >= 5 * len(mesh.opts.regions),
                30,
                "answers to the proxyless gRPC clients",
            )
        mesh.begin_rollout()
        result = follow(mesh, scenario, timeout, LiveView(mesh) if live else PlainLog(mesh))
        after = mesh.proxyless_since(time.time(), 10 * len(mesh.opts.regions)) if proxyless else {}
        load.stop()
        summary = summarize(mesh, scenario, result, after)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_path = out / "rollout.png"
        plot(mesh.audit(), plot_path, mesh.opts.regions)
        print_report(summary, mesh, plot_path)
        if keep:
            kept = True
            print_keep(mesh)
        return 0 if summary["ok"] else 1
    except KeyboardInterrupt:
        print("\nlab: interrupted; stopping everything")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not kept:
            mesh.stop()
            _clear_current(out)


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


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@dataclass
class FollowResult:
    phase: str
    fault_at: float | None = None
    zero_canary_at: float | None = None
    timed_out: bool = False
    replica_fault_at: float | None = None
    killed: str = ""
    """The replica (its region) or etcd member SIGKILLed."""
    leader_before: str = ""
    instance: dict[str, Any] | None = None
    """canary-instance: the region, the killed and the new instance's ports, and when
    the killed one was gone from every Envoy of the region."""


def _instance_gone(mesh: LocalMesh, instance: dict[str, Any]) -> float | None:
    """When the killed instance is out of every Envoy of its region (now), or None."""
    envoys = [e for e in mesh.envoys if e.opts.region == instance["region"]]
    if any(instance["killed_port"] in mesh.envoy_hosts(e, "canary") for e in envoys):
        return None
    return time.time()


def inject_replica_fault(mesh: LocalMesh, scenario: Scenario, res: FollowResult) -> str:
    """SIGKILL the leading replica or an etcd member; what was killed, for the view."""
    assert mesh.etcd is not None
    res.leader_before = mesh.leader() or ""
    if scenario.replica_fault == "leader":
        res.killed = res.leader_before
        mesh.replicas[res.killed].kill()
        what = f"SIGKILLed the leading replica ({res.killed})"
    elif scenario.replica_fault == "canary-instance":
        region = mesh.opts.regions[1 % len(mesh.opts.regions)]
        port, rest_port = mesh.add_instance(region, "canary")
        write_lab_file(mesh)  # (so that `lab down` stops it too)
        envoys = [e for e in mesh.envoys if e.opts.region == region]
        wait_for(
            lambda: all(port in mesh.envoy_hosts(e, "canary") for e in envoys),
            10,
            f"the second canary instance in {region}'s Envoys",
        )
        # Until it takes its share: a new host ramps up over the canary's slow start, and
        # the requests a dead host refuses are retried on another only once one is there.
        wait_for(
            lambda: mesh.model_stats_at(rest_port)["user_requests"] >= 20,
            30,
            f"the second canary instance in {region} taking requests",
        )
        old = mesh.pool_port(region, "canary")
        mesh.models[(region, "canary")].kill()
        res.killed = f"{region} canary instance 127.0.0.1:{old}"
        res.instance = {"region": region, "killed_port": old, "new_port": port, "gone_at": None}
        what = f"SIGKILLed {res.killed} (a second one, port {port}, is in every Envoy)"
    else:
        index = len(mesh.etcd.members) - 1
        res.killed = mesh.etcd.members[index].name
        mesh.etcd.kill(index)
        what = f"SIGKILLed etcd member {res.killed} (of {len(mesh.etcd.members)})"
    res.replica_fault_at = time.time()
    return what


def follow(
    mesh: LocalMesh, scenario: Scenario, timeout: float, view: LiveView | PlainLog
) -> FollowResult:
    """Watch until the rollout ends (and, after a fault, every Envoy is at 0% canary)."""
    res = FollowResult(phase="progressing")
    deadline = time.monotonic() + timeout
    with view:
        while time.monotonic() < deadline:
            state = mesh.rollout_state()
            view.update(state)
            if state is not None:
                res.phase = state["phase"]
                steps = [r["step"] for r in state["regions"].values()]
                if (
                    scenario.replica_fault
                    and res.replica_fault_at is None
                    and state["phase"] == "progressing"
                    and min(steps) >= 1
                ):
                    view.note(inject_replica_fault(mesh, scenario, res))
                if res.instance is not None and res.instance["gone_at"] is None:
                    gone = _instance_gone(mesh, res.instance)
                    if gone is not None:
                        res.instance["gone_at"] = gone
                        took = gone - (res.replica_fault_at or gone)
                        view.note(f"the killed instance is gone from every Envoy: {took:.2f}s")
                fault = scenario.fault
                if (
                    fault
                    and res.fault_at is None
                    and state["phase"] == "progressing"
                    and min(steps) >= fault.at_step
                ):
                    region = mesh.opts.regions[fault.region_index % len(mesh.opts.regions)]
                    mesh.set_fault(region, "canary", **fault.knobs())
                    res.fault_at = time.time()
                    view.note(f"fault injected in {region}: canary {fault.describe()}")
                if (
                    res.fault_at is not None
                    and res.zero_canary_at is None
                    and state["phase"] == "rolled_back"
                    and all(canary_share(e) == 0 for e in mesh.envoys)
                ):
                    res.zero_canary_at = time.time()
                if state["phase"] == "promoted" or (
                    state["phase"] == "rolled_back"
                    and (res.fault_at is None or res.zero_canary_at is not None)
                ):
                    view.update(state)
                    return res
            time.sleep(0.1)  # the live view's poll period, bounded by the deadline
    res.timed_out = True
    return res


def summarize(
    mesh: LocalMesh,
    scenario: Scenario,
    res: FollowResult,
    proxyless_after: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`proxyless_after`: what the proxyless clients sent once the rollout had ended."""
    state = mesh.rollout_state() or {"phase": "none", "regions": {}, "reason": ""}
    audit = mesh.audit()
    outcome = {r: s["phase"] for r, s in state["regions"].items()}
    results = mesh.load.snapshot() if mesh.load else []
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
                "region": e.region,
                "kind": e.kind,
                "step": e.step,
                "phase_from": e.phase_from,
                "phase_to": e.phase_to,
                "verdict": e.verdict["outcome"] if e.verdict else None,
                "reason": e.reason,
            }
            for e in audit
        ],
        "audit_log": str(mesh.etcd.url) if mesh.etcd else str(mesh.state_dir / FILE_NAME),
    }
    if mesh.etcd is not None:
        summary["replicas"] = replica_summary(mesh, scenario, res, audit, results)
        summary["ok"] = summary["ok"] and summary["replicas"]["ok"]
        if scenario.replica_fault == "leader":
            summary["failover"] = summary["replicas"]["fault"]
    if mesh.proxyless:
        summary["proxyless"] = proxyless_summary(mesh, scenario, proxyless_after or {})
        summary["ok"] = summary["ok"] and summary["proxyless"]["followed"]
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
    return summary


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
    out: dict[str, Any] = {"leader_at_end": mesh.leader(), "ok": True}
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
        "total": mesh.proxyless_counts(),
        "by_region": {r: mesh.proxyless_counts(r) for r in mesh.opts.regions},
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


def print_report(summary: dict[str, Any], mesh: LocalMesh, plot_path: Path) -> None:
    print()
    print(f"lab: rollout {summary['rollout']['phase']}: {summary['rollout']['reason']}")
    if summary.get("cause"):
        print(f"  rolled back by {summary['cause']}")
    decisions = summary["decisions"]
    for region in mesh.opts.regions:
        mine = [d for d in decisions if d["region"] == region]
        verdicts = Counter(d["verdict"] or "warm-up" for d in mine if d["kind"] == "check")
        steps = [
            d["step"] for d in mine if d["kind"] == "transition" and d["phase_to"] == "progressing"
        ]
        print(
            f"  {region:<10} {summary['outcome'].get(region, '?'):<12} steps reached "
            f"{steps}  checks: " + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
        )
    if "replicas" in summary and "fault" in summary["replicas"]:
        f = summary["replicas"]["fault"]
        took = f.get("new_leader_s")
        print(
            f"  {f['kind']} fault: killed {f['killed']} -> first decision committed after "
            + (f"{took:.2f}s" if took is not None else "never")
            + f" (leader before {f['leader_before']}, now {summary['replicas']['leader_at_end']})"
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
    if "fault" in summary:
        f = summary["fault"]
        took = f["to_zero_canary_s"]
        print(
            f"  fault in {f['region']} -> every Envoy at 0% canary: "
            + (f"{took:.2f}s" if took is not None else "not reached")
        )
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


def print_addresses(mesh: LocalMesh) -> None:
    """Where a person follows the rollout: the dashboard, and xdsctl on the admin API."""
    print(f"lab: dashboard {mesh.dashboard_url}")
    print(f"lab: admin token for its actions and xdsctl's: {mesh.token_file}")
    print(f"lab: xdsctl --server {admin_servers(mesh)} status")
    if mesh.etcd is not None:
        print(f"lab: store {mesh.etcd.url}; leader now {mesh.wait_leader(15)}")


def admin_servers(mesh: LocalMesh) -> str:
    """xdsctl's --server: every replica's admin API (it tries them in order)."""
    if not mesh.replicas:
        return f"127.0.0.1:{mesh.admin_port}"
    return ",".join(f"127.0.0.1:{mesh.replica_admin(r)}" for r in mesh.replicas)


def print_keep(mesh: LocalMesh) -> None:
    print("\nlab: still running (--keep):")
    print(f"  dashboard       {mesh.dashboard_url}")
    print(
        f"  admin API       xdsctl --server {admin_servers(mesh)} "
        f"--token-file {mesh.token_file} status"
    )
    print(f"  Prometheus      http://127.0.0.1:{mesh.prometheus_port}")
    print(
        f"  xds-server      xDS 127.0.0.1:{mesh.xds_port}, metrics "
        f"http://127.0.0.1:{mesh.metrics_port}/metrics, log {mesh.workdir / 'xds-server.log'}"
    )
    for e in mesh.envoys:
        print(f"  {e.name:<15} http://{e.opts.listen}/predict  admin {e.admin}")
    for (region, pool), port in mesh.model_ports.items():
        print(f"  model {region}/{pool}: http://127.0.0.1:{port}  (POST /fault to change faults)")
    print(f"  stop it all: xds-server lab down --out {mesh.workdir}")


# ---- lab.json: what `lab down` stops ----


def write_lab_file(mesh: LocalMesh) -> None:
    doc = {
        "processes": [{"name": p.name, "pid": p.pid} for p in mesh.processes()],
        "started_at": time.time(),
    }
    (mesh.workdir / "lab.json").write_text(json.dumps(doc, indent=2))
    LAB_ROOT.mkdir(exist_ok=True)
    CURRENT.write_text(str(mesh.workdir))


def _clear_current(out: Path) -> None:
    if CURRENT.exists() and CURRENT.read_text().strip() == str(out):
        CURRENT.unlink()


def lab_down(out: Path | None) -> int:
    if out is None:
        if not CURRENT.exists():
            print("lab down: no running lab recorded in .lab/current; pass --out DIR")
            return 1
        out = Path(CURRENT.read_text().strip())
    lab_file = out / "lab.json"
    if not lab_file.exists():
        print(f"lab down: {lab_file} not found")
        return 1
    procs = json.loads(lab_file.read_text())["processes"]
    for p in procs:
        _stop_group(p["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p["pid"]) for p in procs):
        time.sleep(0.1)  # waiting for processes to exit, bounded
    for p in procs:
        if _alive(p["pid"]):
            _stop_group(p["pid"], signal.SIGKILL)
    print(f"lab down: stopped {len(procs)} processes of {out}")
    _clear_current(out)
    return 0


def _stop_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


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
                weight.append(e.weights_after["canary"])
        checks = [e for e in audit if e.region == region and e.kind == "check" and e.measurements]
        ct = [e.time - t0 for e in checks]
        err = [
            (e.measurements["canary"]["error_rate"] or 0) * 100  # type: ignore[index]
            for e in checks
        ]
        p99 = [e.measurements["canary"]["p99_ms"] for e in checks]  # type: ignore[index]
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
