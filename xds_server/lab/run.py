"""`xds-server lab run`: one canary rollout across a local multi-region mesh, watched live.

Starts (on 127.0.0.1, free ports) model servers, Prometheus, `xds-server serve` and real
Envoys, sends steady load, adds a canary to the spec and follows the rollout to its end.
A scenario may inject a fault into one region's canary mid-rollout. Writes the audit
log, `summary.json` and `rollout.png` into the output folder; exits 0 when the rollout
ended as the scenario expects.

This module orchestrates; the scenarios are `lab/scenarios.py`'s table, the mesh is
`lab/mesh.py`'s, following the rollout is `lab/follow.py` and the report
`lab/report.py`. `lab down` stops what `lab.json` (written here) lists, and with
`--netns` removes the lab's network namespaces, links and rules (their record is in
`lab.json` before any is made, so a crashed lab's go too).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from xds_server.lab import mlserver
from xds_server.lab.follow import follow
from xds_server.lab.layout import DEFAULT_REGIONS, MeshOptions
from xds_server.lab.load import LoadResults
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.netns import NetnsError, destroy_recorded
from xds_server.lab.polling import wait_for
from xds_server.lab.report import print_addresses, print_intro, print_keep, write_report
from xds_server.lab.scenarios import FAST_PLAN, LAB_PLAN, SCENARIOS, Scenario
from xds_server.lab.view import LiveView, PlainLog

LAB_ROOT = Path(".lab")
CURRENT = LAB_ROOT / "current"


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
    models: str = "builtin",
    netns: bool = False,
    fast: bool = False,
) -> int:
    """`proxyless`: gRPC client processes per region that route by xDS themselves (they
    imply `protocol="grpc"`: they call the model servers' gRPC ports). `ha`: a replica
    per region on a three-member etcd cluster (a scenario with a replica fault implies
    it). `models="mlserver"`: every pool a real MLServer (`_on_models`). `netns`: each
    region in a network namespace of its own (`MeshOptions.netns`). `fast`: a scenario on
    the lab's default plan runs the rollout tests' short one (`FAST_PLAN`: 3 s steps, no
    warm-up, no output gate); a scenario with a plan of its own keeps it."""
    scenario = SCENARIOS[scenario_name]
    if fast and scenario.plan is None:
        scenario = replace(scenario, plan=FAST_PLAN)
    ha, netns = ha or scenario.needs_ha, netns or scenario.needs_netns
    scenario, plan = _on_models(scenario, models, "grpc" if proxyless else protocol, ha)
    out = (out or LAB_ROOT / f"{time.strftime('%Y%m%d-%H%M%S')}-{scenario.name}").resolve()
    opts = replace(
        MeshOptions(region_names(regions), envoys_per_region, rollout=plan, mtls=mtls, ha=ha),
        admin_token=secrets.token_urlsafe(18),  # for the dashboard's actions and xdsctl's
        notify_url=notify_url,
        protocol="grpc" if proxyless else protocol,
        proxyless_per_region=proxyless,
        models=models,
        canary_model=scenario.name,
        features=scenario.features,
        netns=netns,
    )
    if problems := opts.problems():
        print(f"lab: scenario {scenario.name} cannot run so: " + "; ".join(problems))
        return 2
    print_intro(scenario, opts, out)
    live = sys.stdout.isatty() if live is None else live
    return _run_until_done(LocalMesh(out, opts), scenario, timeout, live, keep)


def _run_until_done(
    mesh: LocalMesh, scenario: Scenario, timeout: float, live: bool, keep: bool
) -> int:
    """Run the scenario; stop everything after, unless kept (the exit code: 0 as
    expected, 1 not, 130 interrupted)."""
    # Ctrl-C, kill, or the terminal going away: all end the lab cleanly.
    previous = {
        sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    kept = False
    try:
        ok = _run(mesh, scenario, timeout, live)
        if keep:
            kept = True
            print_keep(mesh)
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\nlab: interrupted; stopping everything")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not kept:
            mesh.stop()
            _clear_current(mesh.workdir)


def _on_models(
    scenario: Scenario, models: str, protocol: str, registered: bool
) -> tuple[Scenario, dict[str, Any]]:
    """The scenario and its plan on these model servers. On MLServer the fault is the
    canary's model, there from the start (`lab/mlserver.py`), not a knob set mid-rollout."""
    if models != "mlserver":
        return scenario, dict(scenario.plan or LAB_PLAN)
    plan = mlserver.lab_plan(scenario.plan or LAB_PLAN, protocol, registered)
    description = mlserver.CANARY_MODELS[scenario.name].description or scenario.description
    return replace(scenario, fault=None, description=description), plan


def _run(mesh: LocalMesh, scenario: Scenario, timeout: float, live: bool) -> bool:
    """Start the mesh and its traffic, add the canary, follow the rollout to its end and
    report; whether it ended as the scenario expects."""
    write_lab_file(mesh)  # the network's record, before anything of it is made
    mesh.start()
    write_lab_file(mesh)
    print_addresses(mesh)
    load = _start_traffic(mesh, timeout)
    mesh.spec.add_canary()
    view = LiveView(mesh) if live else PlainLog(mesh)
    result = follow(mesh, scenario, timeout, view, started=lambda: write_lab_file(mesh))
    after = {}
    if mesh.opts.proxyless_per_region:
        after = mesh.traffic.proxyless_since(time.time(), 10 * len(mesh.opts.regions))
    load.stop()
    summary = write_report(mesh, scenario, result, after)
    return bool(summary["ok"])


def _start_traffic(mesh: LocalMesh, timeout: float) -> LoadResults:
    """The load through the Envoys and the proxyless clients, until both are answered
    and Prometheus has the series a rollout checks at its start."""
    load = mesh.processes.start_load(max_seconds=timeout)
    mesh.processes.start_proxyless(max_seconds=timeout)
    wait_for(lambda: len(load.snapshot()) >= 20, "load through the Envoys", timeout=15)
    mesh.traffic.wait_latency_series()
    if mesh.opts.proxyless_per_region:
        wait_for(
            lambda: mesh.traffic.proxyless_counts().get("ok", 0) >= 5 * len(mesh.opts.regions),
            "answers to the proxyless gRPC clients",
            timeout=30,
        )
    return load


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


# ---- lab.json: what `lab down` stops ----


def write_lab_file(mesh: LocalMesh) -> None:
    doc: dict[str, Any] = {
        "processes": [{"name": p.name, "pid": p.pid} for p in mesh.processes.all()],
        "started_at": time.time(),
    }
    if mesh.net is not None:
        doc["netns"] = mesh.net.record()
    mesh.workdir.mkdir(parents=True, exist_ok=True)
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
    doc = json.loads(lab_file.read_text())
    procs = doc["processes"]
    for p in procs:
        _stop_group(p["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p["pid"]) for p in procs):
        time.sleep(0.1)  # waiting for processes to exit, bounded
    for p in procs:
        if _alive(p["pid"]):
            _stop_group(p["pid"], signal.SIGKILL)
    print(f"lab down: stopped {len(procs)} processes of {out}")
    code = _remove_network(doc.get("netns"), lab_file)
    _clear_current(out)
    return code


def _remove_network(record: Any, lab_file: Path) -> int:
    """The lab's namespaces, links and rules, from their record (None: it had none)."""
    if record is None:
        return 0
    if not isinstance(record, dict):
        print(f"lab down: {lab_file}: netns: not an object")
        return 1
    try:
        removed = destroy_recorded(record, where=f"{lab_file}: netns")
    except NetnsError as exc:
        print(f"lab down: {exc}")
        return 1
    namespaces = sum(1 for what in removed if what.startswith("netns "))
    print(f"lab down: removed the lab's network ({namespaces} namespaces, {len(removed)} parts)")
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
