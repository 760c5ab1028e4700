"""Following one scenario's rollout to its end: the view kept up to date, the scenario's
fault injected when every region has reached its step, and the times the report needs
(the fault, every Envoy at 0% canary, a killed instance gone from the Envoys).

With the `features` option two services roll out as one group: the rollout followed is
both of theirs (`group_state`), over once both have ended, and after a fault once every
Envoy routes 0% to the canary of both.

A partition (issue 29) is cut once every Envoy routes by the scenario's step, watched
while it lasts (who leads, where a region's Envoys get their xDS from), healed on its
kind's event, and the run is over once the rollout has ended and the cut region has
converged to the committed state (or failed to within `converge_within`). Whatever
happens, `follow` heals every cut it made before it returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xds_server.lab import partitions
from xds_server.lab.layout import SERVICE
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.partitions import PartitionResult
from xds_server.lab.polling import wait_for
from xds_server.lab.scenarios import Fault, Scenario
from xds_server.lab.traffic import canary_share
from xds_server.lab.view import LiveView, PlainLog


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
    second: tuple[str, int, int] | None = None
    """canary-instance: the second canary instance, added at the first step: its
    region, the port Envoy sends to and its REST port."""
    instance: dict[str, Any] | None = None
    """canary-instance: the region, the killed and the new instance's ports, and when
    the killed one was gone from every Envoy of the region."""
    zero_canary_by_service: dict[str, float] = field(default_factory=dict)
    """After a fault: when every Envoy first routed 0% to each service's canary."""
    partition: PartitionResult | None = None
    """A partition scenario's cut, heal and what was seen in between."""


def follow(
    mesh: LocalMesh,
    scenario: Scenario,
    timeout: float,
    view: LiveView | PlainLog,
    started: Callable[[], None] = lambda: None,
) -> FollowResult:
    """Watch until the rollout ends (and, after a fault, every Envoy is at 0% canary).
    `started` is called when the scenario has started a process of its own (a second
    canary instance), so that the lab's record of its processes lists it."""
    res = FollowResult(phase="progressing")
    if scenario.partition is not None:
        res.partition = PartitionResult(scenario.partition.kind)
    deadline = time.monotonic() + timeout
    try:
        with view:
            while time.monotonic() < deadline:
                state = followed_state(mesh)
                view.update(state)
                if state is not None and _look(mesh, scenario, res, state, view, started):
                    view.update(state)
                    return res
                time.sleep(0.1)  # the live view's poll period, bounded by the deadline
        res.timed_out = True
        return res
    finally:
        if res.partition is not None:
            partitions.finish(mesh, res.partition, view, lambda: followed_state(mesh))


def _look(
    mesh: LocalMesh,
    scenario: Scenario,
    res: FollowResult,
    state: dict[str, Any],
    view: LiveView | PlainLog,
    started: Callable[[], None],
) -> bool:
    """One look at the rollout: inject what the scenario injects once its step has come,
    note what the report times; whether the run is over."""
    res.phase = state["phase"]
    if scenario.partition is not None and res.partition is not None:
        return partitions.look(mesh, scenario.partition, res.partition, state, view)
    steps = [r["step"] for r in state["regions"].values()]
    if (
        scenario.replica_fault == "canary-instance"
        and res.second is None
        and state["phase"] == "progressing"
    ):
        view.note(_add_canary_instance(mesh, res, started))
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
        view.note(inject_fault(mesh, fault, res))
    if res.fault_at is not None and res.zero_canary_at is None:
        _note_zero_canary(mesh, res, state)
    return state["phase"] == "promoted" or (
        state["phase"] == "rolled_back" and (res.fault_at is None or res.zero_canary_at is not None)
    )


def _note_zero_canary(mesh: LocalMesh, res: FollowResult, state: dict[str, Any]) -> None:
    """After a fault, the first look at which every Envoy routes 0% to each service's
    canary (each service's time once its own rollout has ended), and to every one's."""
    for service, own in state.get("services", {SERVICE: state}).items():
        if (
            service not in res.zero_canary_by_service
            and own is not None
            and own["phase"] == "rolled_back"
            and all(canary_share(e, service) == 0 for e in mesh.processes.envoys)
        ):
            res.zero_canary_by_service[service] = time.time()
    if state["phase"] == "rolled_back" and set(res.zero_canary_by_service) >= set(
        mesh.layout.services()
    ):
        res.zero_canary_at = max(res.zero_canary_by_service.values())


def followed_state(mesh: LocalMesh) -> dict[str, Any] | None:
    """The rollout a lab run follows: the recommender's; with `features`, the group's
    (`group_state`)."""
    if not mesh.opts.features:
        return mesh.state.rollout(SERVICE)
    return group_state({s: mesh.state.rollout(s) for s in mesh.layout.services()})


def group_state(states: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """Several services' rollouts as one: ended (promoted, rolled back) once each has
    ended so, each region at the lowest step any of them is at; each service's own
    state under `services`. None until every one has started."""
    if any(s is None for s in states.values()):
        return None
    own = [s for s in states.values() if s is not None]
    phases = {s["phase"] for s in own}
    first = own[0]
    regions = {
        r: {
            "phase": rs["phase"],
            "step": min(s["regions"].get(r, rs)["step"] for s in own),
        }
        for r, rs in first["regions"].items()
    }
    return {
        **first,
        "phase": phases.pop() if len(phases) == 1 else "progressing",
        "reason": "; ".join(f"{s.get('service', '?')}: {s['reason']}" for s in own),
        "regions": regions,
        "services": states,
    }


def inject_fault(mesh: LocalMesh, fault: Fault, res: FollowResult) -> str:
    """Set the fault's knobs on its region's canary (of its service); what was done, for
    the view."""
    region = mesh.opts.regions[fault.region_index % len(mesh.opts.regions)]
    mesh.faults.set(region, "canary", service=fault.service, **fault.knobs())
    res.fault_at = time.time()
    return f"fault injected in {region}: {fault.service}'s canary {fault.describe()}"


def inject_replica_fault(mesh: LocalMesh, scenario: Scenario, res: FollowResult) -> str:
    """SIGKILL the leading replica, a canary instance or an etcd member; what was killed,
    for the view."""
    etcd = mesh.processes.etcd
    assert etcd is not None
    res.leader_before = mesh.state.leader() or ""
    if scenario.replica_fault == "leader":
        res.killed = res.leader_before
        mesh.faults.kill_replica(res.killed)
        what = f"SIGKILLed the leading replica ({res.killed})"
    elif scenario.replica_fault == "canary-instance":
        what = _lose_canary_instance(mesh, res)
    else:
        res.killed = mesh.faults.kill_etcd_member()
        what = f"SIGKILLed etcd member {res.killed} (of {len(etcd.members)})"
    res.replica_fault_at = time.time()
    return what


def _add_canary_instance(mesh: LocalMesh, res: FollowResult, started: Callable[[], None]) -> str:
    """A second canary instance in the second region, at the first step (it ramps up
    over the canary's slow start, at 5%, before its first is lost at 20%)."""
    region = mesh.opts.regions[1 % len(mesh.opts.regions)]
    port, rest_port = mesh.processes.add_instance(region, "canary")
    started()  # (so that `lab down` stops it too)
    res.second = (region, port, rest_port)
    return f"a second {region} canary instance registered (port {port})"


def _lose_canary_instance(mesh: LocalMesh, res: FollowResult) -> str:
    """Once the second canary instance is in every Envoy of its region and takes
    requests, the first one SIGKILLed."""
    assert res.second is not None
    region, port, rest_port = res.second
    envoys = [e for e in mesh.processes.envoys if e.opts.region == region]
    wait_for(
        lambda: all(port in mesh.traffic.envoy_hosts(e, "canary") for e in envoys),
        f"the second canary instance in {region}'s Envoys",
        timeout=10,
    )
    # Until it takes its share: the requests a dead host refuses are retried on another
    # only once one is there.
    wait_for(
        lambda: mesh.traffic.model_stats_at(rest_port)["user_requests"] >= 20,
        f"the second canary instance in {region} taking requests",
        timeout=30,
    )
    old = mesh.faults.kill_model(region, "canary")
    res.killed = f"{region} canary instance 127.0.0.1:{old}"
    res.instance = {"region": region, "killed_port": old, "new_port": port, "gone_at": None}
    return f"SIGKILLed {res.killed} (a second one, port {port}, is in every Envoy)"


def _instance_gone(mesh: LocalMesh, instance: dict[str, Any]) -> float | None:
    """When the killed instance is out of every Envoy of its region (now), or None."""
    envoys = [e for e in mesh.processes.envoys if e.opts.region == instance["region"]]
    if any(instance["killed_port"] in mesh.traffic.envoy_hosts(e, "canary") for e in envoys):
        return None
    return time.time()
