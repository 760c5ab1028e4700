"""Partitions (issue 29): a partition scenario's cut made and healed while the lab
follows the rollout (`look`, `finish`), and what the report makes of it (`summary`:
`summary.json`'s `partition.*`, each check of the outcome the scenario must reach).

Why apart from `lab/follow.py` and `lab/report.py`: a partition is watched (who leads,
where a region's Envoys get their xDS from, when the cut region converges) and judged
(the hold, the outcome, what the cut region served) in ways no process fault is, and
each kind has checks of its own (`scenarios.PARTITION_KINDS` says what each cuts).

A cut is made once every Envoy routes by the scenario's step (so "kept its weights"
means the step's), healed on its kind's event, and the run is over once the rollout has
ended and the cut region has converged to the committed state (its Envoys' weights and,
with replicas, each listed in sync by a replica again) or failed to within
`Partition.converge_within`. `finish` heals whatever is still cut, whatever ended the run.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xds_server.ha.store import StoreReadError
from xds_server.lab.mesh import LocalMesh
from xds_server.lab.scenarios import Partition, Scenario
from xds_server.lab.traffic import canary_share
from xds_server.lab.view import LiveView, PlainLog
from xds_server.rollout.audit import AuditEntry
from xds_server.spec.values import parse_duration


@dataclass
class PartitionResult:
    """One partition as the lab did and saw it (times: Unix seconds)."""

    kind: str
    region: str = ""
    """The region cut (for "leader": the leader's at the cut)."""
    unavailable: str = ""
    """Why no cut was made (a lab on loopback: no root, no namespaces)."""
    cut_at: float | None = None
    healed_at: float | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)
    """Every `netns.Change` made, as JSON."""
    leader_before: str = ""
    leader_after: str = ""
    new_leader_at: float | None = None
    """When the store first named another leader than the one at the cut."""
    stepped_down_at: float | None = None
    """When the cut leader's own /metrics first said it no longer leads."""
    failed_over_at: float | None = None
    """asymmetric: when every Envoy of the region had its xDS from another replica."""
    xds_servers: dict[str, list[str]] = field(default_factory=dict)
    """asymmetric: each of the region's Envoys' xDS connections at the failover."""
    converged_at: float | None = None
    """After the heal: the region's Envoys route by the committed state, and (with
    replicas) each is listed in sync by a replica again."""
    shares: dict[str, dict[str, float]] = field(default_factory=dict)
    """"cut", "healed", "end" -> node id -> its canary share (%) then."""
    expected_share: dict[str, dict[str, float]] = field(default_factory=dict)
    """"cut", "healed", "end" -> region -> its committed canary share (%) then."""


# ---- while the run follows the rollout ----

ENDED = ("promoted", "rolled_back", "paused")


def look(
    mesh: LocalMesh,
    p: Partition,
    part: PartitionResult,
    state: dict[str, Any],
    view: LiveView | PlainLog,
) -> bool:
    """Cut when the step has come; while cut, watch and heal on the kind's event; once
    healed, until the cut region has converged. Whether the run is over."""
    now = time.time()
    if mesh.layout.net is None:  # (on loopback: nothing to cut; said once, then followed)
        if not part.unavailable:
            part.unavailable = mesh.layout.netns_unavailable or "the lab runs without --netns"
            view.note(f"partition {p.kind}: not made, no network namespaces: {part.unavailable}")
        return state["phase"] in ENDED
    if part.cut_at is None:
        steps = [r["step"] for r in state["regions"].values()]
        if state["phase"] == "progressing" and min(steps) >= p.at_step and _routed(mesh, state):
            view.note(cut(mesh, p, part, state))
        return state["phase"] in ENDED  # (ended before the cut: the report says so)
    if part.healed_at is None:
        _watch_cut(mesh, p, part, view)
        if _heal_due(mesh, p, part, state, now):
            part.shares["healed"] = _shares(mesh)
            part.expected_share["healed"] = _expected_shares(mesh, state)
            view.note(heal(mesh, part))
        return False
    if part.converged_at is None and _converged(mesh, part.kind, part.region, state):
        part.converged_at = time.time()
        view.note(
            f"{part.region} converged {part.converged_at - part.healed_at:.2f}s after the heal"
        )
    late = now - part.healed_at > p.converge_within
    return state["phase"] in ENDED and (part.converged_at is not None or late)


def cut(mesh: LocalMesh, p: Partition, part: PartitionResult, state: dict[str, Any]) -> str:
    """Make the partition's cut; what was done, for the view."""
    regions = mesh.opts.regions
    part.region = regions[p.region_index % len(regions)]
    if mesh.processes.etcd is not None:
        part.leader_before = mesh.state.leader() or ""
    if p.kind == "leader":
        part.region = part.leader_before
    elif part.region == part.leader_before:
        # Another region than the leader's (the next one): a leader cut from everything
        # is the leader's kind, and a leader cut from Prometheus reads no region at all.
        i = regions.index(part.region)
        part.region = next(r for r in (*regions[i:], *regions[:i]) if r != part.leader_before)
    part.shares["cut"] = _shares(mesh)
    part.expected_share["cut"] = _expected_shares(mesh, state)
    faults = mesh.faults
    change = {
        "region": faults.cut_region,
        "leader": faults.cut_from_regions,
        "prometheus": faults.cut_prometheus,
        "asymmetric": faults.drop_xds,
    }[p.kind](part.region)
    part.changes.append(change.as_json())
    part.cut_at = change.at
    return f"partition: {p.describe(part.region)} ({change.namespace}: {change.what})"


def heal(mesh: LocalMesh, part: PartitionResult) -> str:
    """Remove every cut of the lab; what was done, for the view."""
    changes = mesh.faults.heal()
    part.changes.extend(c.as_json() for c in changes)
    part.healed_at = max(c.at for c in changes)
    took = part.healed_at - (part.cut_at or part.healed_at)
    return f"partition healed after {took:.1f}s"


def finish(
    mesh: LocalMesh,
    part: PartitionResult,
    view: LiveView | PlainLog,
    followed: Callable[[], dict[str, Any] | None],
) -> None:
    """Whatever ended the run: no cut left behind, and the Envoys' shares at the end
    (`followed`: the rollout's state now)."""
    if part.cut_at is not None and part.healed_at is None:
        view.note(heal(mesh, part))
    try:
        part.shares["end"] = _shares(mesh)
        state = followed()
        if state is not None:
            part.expected_share["end"] = _expected_shares(mesh, state)
    except OSError as exc:  # (an Envoy gone: the report says what is missing)
        view.note(f"partition: the end's shares not read: {exc}")


def _watch_cut(
    mesh: LocalMesh, p: Partition, part: PartitionResult, view: LiveView | PlainLog
) -> None:
    """While cut: a leader cut from etcd stepping down and another one leading; a
    region's Envoys failing over to another replica."""
    if p.kind == "leader":
        if part.stepped_down_at is None and mesh.state.replica_leads(part.region) is False:
            part.stepped_down_at = time.time()
            took = part.stepped_down_at - (part.cut_at or 0)
            view.note(f"{part.region}'s replica no longer leads: {took:.2f}s after the cut")
        if part.new_leader_at is None:
            lead = _leader(mesh)
            if lead and lead != part.leader_before:
                part.new_leader_at, part.leader_after = time.time(), lead
                took = part.new_leader_at - (part.cut_at or 0)
                view.note(f"{lead}'s replica leads: {took:.2f}s after the cut")
    if p.kind == "asymmetric" and part.failed_over_at is None:
        own = f"{mesh.layout.replica_host(part.region)}:{mesh.layout.region_xds_port(part.region)}"
        servers = {
            e.opts.node_id: mesh.traffic.xds_servers(e)
            for e in mesh.processes.envoys
            if e.opts.region == part.region
        }
        if all(found and own not in found for found in servers.values()):
            part.failed_over_at = time.time()
            part.xds_servers = {node: sorted(found) for node, found in servers.items()}
            took = part.failed_over_at - (part.cut_at or 0)
            view.note(f"{part.region}'s Envoys failed over ({took:.2f}s): {part.xds_servers}")


def _leader(mesh: LocalMesh) -> str | None:
    """The store's leader, or None when the store does not answer the driver now."""
    try:
        return mesh.state.leader()
    except StoreReadError:  # (no member answers now: the next look asks again)
        return None


def _heal_due(
    mesh: LocalMesh, p: Partition, part: PartitionResult, state: dict[str, Any], now: float
) -> bool:
    """Heal now? "prometheus": after `lasts`; "leader": once another replica leads and
    has committed a decision (the old one stepped down); "region", "asymmetric": once the
    rollout has ended (followed on_max_hold, or promoted); every kind after `lasts`."""
    assert part.cut_at is not None
    if p.lasts and now - part.cut_at >= p.lasts:
        return True
    if p.kind == "prometheus":
        return False
    if p.kind == "leader":
        if part.new_leader_at is None or part.stepped_down_at is None:
            return False
        return any(e.time > part.new_leader_at for e in mesh.state.audit())
    return state["phase"] in ENDED


def expected_share(mesh: LocalMesh, state: dict[str, Any], region: str) -> float:
    """The canary share (%) the committed state gives a region (its step's, 0 rolled
    back, 100 promoted)."""
    rs = state["regions"].get(region, {"phase": "", "step": -1})
    if rs["phase"] == "promoted":
        return 100.0
    if rs["phase"] in ("progressing", "paused") and rs["step"] >= 0:
        return float(mesh.opts.rollout.get("steps", [5, 20, 75, 100])[rs["step"]])
    return 0.0


def _expected_shares(mesh: LocalMesh, state: dict[str, Any]) -> dict[str, float]:
    return {r: expected_share(mesh, state, r) for r in mesh.opts.regions}


def _routed(mesh: LocalMesh, state: dict[str, Any]) -> bool:
    """Does every Envoy route by its region's committed step?"""
    return all(
        abs(canary_share(e) - expected_share(mesh, state, e.opts.region)) < 0.01
        for e in mesh.processes.envoys
    )


def _shares(mesh: LocalMesh) -> dict[str, float]:
    return {e.opts.node_id: round(canary_share(e), 2) for e in mesh.processes.envoys}


def _converged(mesh: LocalMesh, part_kind: str, region: str, state: dict[str, Any]) -> bool:
    """The region's Envoys route by the committed state and, with replicas, each is
    listed in sync by a replica (the leader's ACK gate sees them again); cut from
    Prometheus only: Prometheus scrapes every one of them again."""
    if part_kind == "prometheus":  # (nothing of the region was cut but its scrapes)
        return mesh.traffic.targets_up(region)
    envoys = [e for e in mesh.processes.envoys if e.opts.region == region]
    want = expected_share(mesh, state, region)
    if any(abs(canary_share(e) - want) >= 0.01 for e in envoys):
        return False
    if mesh.processes.etcd is None:
        return True
    return mesh.state.listed_in_sync({e.opts.node_id for e in envoys})


# ---- the report ----

HELD = {
    "region": ("holding", "no data:"),
    "leader": ("holding", "no data:"),
    "prometheus": ("no data:",),
    "asymmetric": ("not known to be applied", "not ACKed"),
}
"""Per kind: words of the cut region's check entry that holds its step for want of
evidence (a step held for ordinary reasons, too few requests yet, does not count)."""
STALE_GRACE = 3.0
"""Seconds after a cut in which the cut region's last samples may still count as fresh
(two scrape intervals of the lab's 1 s, and one look)."""


def summary(
    mesh: LocalMesh,
    scenario: Scenario,
    part: PartitionResult,
    audit: list[AuditEntry],
    results: list[Any],
) -> dict[str, Any]:
    """`partition.*`: when it was cut and healed, what each region served meanwhile, the
    times to hold, to the rollout's outcome and to converge after the heal, and each
    check of the outcome the scenario must reach (`checks`; `ok` when all hold)."""
    cut, healed = part.cut_at, part.healed_at
    rollout = mesh.opts.rollout
    after = [e for e in audit if cut is not None and e.time >= cut]
    mine = [e for e in after if e.region == part.region and e.kind == "check"]
    held = next((e for e in mine if any(w in e.reason for w in HELD[part.kind])), None)
    ended = next((e for e in after if e.phase_to in ("paused", "rolled_back")), None)
    out: dict[str, Any] = {
        "kind": part.kind,
        "region": part.region,
        "unavailable": part.unavailable,
        "cut_at": cut,
        "healed_at": healed,
        "cut_s": healed - cut if cut is not None and healed is not None else None,
        "changes": part.changes,
        "plan": {k: rollout.get(k) for k in ("ack_timeout", "max_hold", "on_max_hold")},
        "to_hold_s": held.time - cut if held and cut is not None else None,
        "hold_reason": held.reason if held else "",
        "to_outcome_s": ended.time - cut if ended and cut is not None else None,
        "outcome": f"{ended.phase_to}: {ended.reason}" if ended else "",
        "to_converge_s": part.converged_at - healed
        if part.converged_at is not None and healed is not None
        else None,
        "served": _served(mesh, part, results),
        "expected_share": part.expected_share,
        "audit": [_line(e) for e in after if healed is None or e.time <= healed + 1][:60],
    }
    if part.kind == "leader":
        out["leader"] = _leader_figures(mesh, part, audit)
    if part.kind == "asymmetric":
        out["failover"] = {
            "failed_over_s": part.failed_over_at - cut if part.failed_over_at and cut else None,
            "xds_servers": part.xds_servers,
        }
    out["checks"] = checks(mesh, scenario, part, out, after)
    out["ok"] = all(out["checks"].values())
    return out


def _line(e: AuditEntry) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(e.time)) + f".{int(e.time * 10) % 10}"
    move = f"{e.phase_from}->{e.phase_to}"
    return f"{stamp} {e.region or 'all'} {e.kind} {move} step {e.step}: {e.reason}"


def _served(mesh: LocalMesh, part: PartitionResult, results: list[Any]) -> dict[str, Any]:
    """Per region: its own requests while cut (by status and by the pool that answered)
    and its Envoys' canary shares at the cut, the heal and the end."""
    cut = part.cut_at or 0.0
    healed = part.healed_at or float("inf")
    out: dict[str, Any] = {}
    for region in mesh.opts.regions:
        nodes = [e.opts.node_id for e in mesh.processes.envoys if e.opts.region == region]
        during = [r for r in results if r.target in nodes and cut <= r.time <= healed]
        failed = [r for r in during if not 200 <= r.status < 300]
        out[region] = {
            "requests": len(during),
            "failed": len(failed),
            "by_status": dict(Counter(str(r.status) for r in during)),
            "by_pool": dict(Counter(r.pool or "none" for r in during)),
            "canary_share": {
                moment: {n: shares.get(n) for n in nodes} for moment, shares in part.shares.items()
            },
        }
    return out


def _leader_figures(
    mesh: LocalMesh, part: PartitionResult, audit: list[AuditEntry]
) -> dict[str, Any]:
    """The cut leader: when it stopped leading, when another led and first committed, and
    what was committed between the cut and the new leader (nothing, if the old one
    committed nothing: its etcd member was a minority)."""
    cut = part.cut_at or 0.0
    new = part.new_leader_at
    first = min((e.time for e in audit if new is not None and e.time >= new), default=None)
    return {
        "before": part.leader_before,
        "after": part.leader_after,
        "ttl": mesh.opts.leader_ttl,
        "stepped_down_s": part.stepped_down_at - cut if part.stepped_down_at else None,
        "new_leader_s": new - cut if new is not None else None,
        "new_leader_first_commit_s": first - cut if first is not None else None,
        # Until another leads (or, if none did, the heal): only the cut leader could
        # have committed, and it cannot without etcd's majority.
        "committed_between_cut_and_new_leader": sum(
            1 for e in audit if cut < e.time < (new or part.healed_at or float("inf"))
        ),
    }


def checks(
    mesh: LocalMesh,
    scenario: Scenario,
    part: PartitionResult,
    out: dict[str, Any],
    after: list[AuditEntry],
) -> dict[str, bool]:
    """The outcome each kind must reach (issue 29), one named check each."""
    p = scenario.partition
    assert p is not None
    served = out["served"].get(part.region, {})
    found = {
        "cut": part.cut_at is not None,
        "healed": part.healed_at is not None,
        "converged_after_heal": out["to_converge_s"] is not None
        and out["to_converge_s"] <= p.converge_within,
    }
    if part.kind in ("region", "leader", "asymmetric"):
        found["cut_region_served_without_failures"] = (
            served.get("requests", 0) > 0 and served.get("failed", 1) == 0
        )
    kinds = {
        "region": _region_checks,
        "leader": _leader_checks,
        "prometheus": _prometheus_checks,
        "asymmetric": _asymmetric_checks,
    }
    found.update(kinds[part.kind](mesh, part, out, after))
    return found


def _region_checks(
    mesh: LocalMesh, part: PartitionResult, out: dict[str, Any], after: list[AuditEntry]
) -> dict[str, bool]:
    """Held (no pause nor rollback before max_hold), then on_max_hold's phase, pushed to
    every region it can reach (their Envoys on the committed weights at the heal), and
    the cut region's Envoys at the heal on the weights they had at the cut."""
    rollout = mesh.opts.rollout
    max_hold = _seconds(rollout.get("max_hold", "300s"))
    wanted = {"pause": "paused", "rollback": "rolled_back"}[
        str(rollout.get("on_max_hold", "rollback"))
    ]
    shares = out["served"].get(part.region, {}).get("canary_share", {})
    expected = part.expected_share.get("healed", {})
    reachable = [
        share == expected.get(node.rsplit("-envoy-", 1)[0])
        for region, served in out["served"].items()
        if region != part.region
        for node, share in served["canary_share"].get("healed", {}).items()
    ]
    return {
        "reachable_regions_followed": bool(reachable) and all(reachable),
        "held_until_max_hold": out["to_outcome_s"] is not None
        and out["to_outcome_s"] >= max_hold - 1.0,
        "followed_on_max_hold": out["outcome"].startswith(wanted),
        "cut_region_kept_its_weights": bool(shares.get("cut"))
        and shares.get("cut") == shares.get("healed"),
    }


def _leader_checks(
    mesh: LocalMesh, part: PartitionResult, out: dict[str, Any], after: list[AuditEntry]
) -> dict[str, bool]:
    """Stopped leading within its TTL (and a look's allowance: the lab polls its
    /metrics), another replica leads and commits, nothing committed in between."""
    lead = out["leader"]
    return {
        "stopped_leading_within_ttl": lead["stepped_down_s"] is not None
        and lead["stepped_down_s"] <= mesh.opts.leader_ttl + 1.0,
        "another_replica_leads": bool(lead["after"]) and lead["after"] != lead["before"],
        "old_leader_committed_nothing": lead["committed_between_cut_and_new_leader"] == 0,
        "new_leader_went_on": lead["new_leader_first_commit_s"] is not None,
    }


def _prometheus_checks(
    mesh: LocalMesh, part: PartitionResult, out: dict[str, Any], after: list[AuditEntry]
) -> dict[str, bool]:
    """After the grace its last samples get: the cut region's checks no data, the
    others' judged, and no step advanced until the heal."""
    cut, healed = part.cut_at, part.healed_at
    if cut is None or healed is None:
        return {"cut_region_no_data": False}
    during = [e for e in after if e.kind == "check" and cut <= e.time <= healed]
    mine = [e for e in during if e.region == part.region and e.verdict is not None]
    others = {e.region for e in during if e.region != part.region and e.verdict is not None}
    return {
        "cut_region_no_data": any(e.verdict.outcome == "no_data" for e in mine if e.verdict)
        and not any(
            e.verdict.outcome == "pass" for e in mine if e.verdict and e.time >= cut + STALE_GRACE
        ),
        "others_judged": others == set(mesh.opts.regions) - {part.region},
        "nothing_advanced_on_partial_evidence": not _advances(after, cut, healed),
    }


def _asymmetric_checks(
    mesh: LocalMesh, part: PartitionResult, out: dict[str, Any], after: list[AuditEntry]
) -> dict[str, bool]:
    """The region's Envoys failed over to another replica (that they then route by the
    committed state is `converged_after_heal`'s, and the end's shares the outcome's)."""
    return {"envoys_failed_over": part.failed_over_at is not None}


def _advances(after: list[AuditEntry], cut: float | None, healed: float | None) -> list[Any]:
    """Steps advanced while the cut region's evidence was stale (after the grace)."""
    if cut is None or healed is None:
        return []
    return [
        e
        for e in after
        if e.kind == "transition"
        and e.phase_to in ("progressing", "promoted")
        and cut + STALE_GRACE <= e.time <= healed
    ]


def _seconds(value: Any) -> float:
    return parse_duration(value) or 0.0


def print_partition(part: Mapping[str, Any]) -> None:
    """The cut, what it cost the cut region, the three times, and each check."""

    def secs(v: float | None) -> str:
        return f"{v:.2f}s" if v is not None else "never"

    if part.get("unavailable"):
        print(f"  partition {part['kind']}: not made ({part['unavailable']})")
    served = part["served"].get(part["region"], {})
    print(
        f"  partition {part['kind']} ({part['region']}): cut {secs(part['cut_s'])}; its own "
        f"requests meanwhile {served.get('requests', 0)}, failed {served.get('failed', 0)} "
        f"{served.get('by_pool', {})}"
    )
    print(
        f"    to hold {secs(part['to_hold_s'])}, to {part['outcome'].split(':')[0] or 'outcome'} "
        f"{secs(part['to_outcome_s'])}, to converge after the heal {secs(part['to_converge_s'])}"
    )
    for name in ("leader", "failover"):
        if name in part:
            print(f"    {name}: {part[name]}")
    print(
        "    checks: "
        + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in part["checks"].items())
    )
