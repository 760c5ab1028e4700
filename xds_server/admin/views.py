"""What the admin API and the dashboard show: the running pieces of `serve` (an
`AdminView`) as the admin API's messages. One rendering for both doors: the dashboard's
JSON is these messages through protobuf's JSON mapping."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from xds_server.admin.v1 import admin_pb2
from xds_server.ha.instances import Instance
from xds_server.ha.maintainer import StoreMaintainer
from xds_server.ha.maintenance import MemberStatus
from xds_server.ha.replicas import Directory
from xds_server.outputs.istio_apply import IstioApplier
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.audit_codec import (
    canonical,
    measurements_json,
    verdict_json,
    weights_json,
)
from xds_server.rollout.controller import RolloutController
from xds_server.rollout.evidence import Verdict
from xds_server.rollout.ports import Committed, StateStore
from xds_server.rollout.state import LIVE, RolloutState, region_split
from xds_server.spec import MeshSpec
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.status import NodeStatus
from xds_server.xds.types import SEND_ORDER, short


class AdminView(Protocol):
    """What the admin API reads and drives: the pieces `serve` runs (`app.Running`, read-only)."""

    @property
    def spec(self) -> MeshSpec: ...

    @property
    def publisher(self) -> XdsPublisher: ...

    @property
    def controller(self) -> RolloutController | None:
        """None in a replica that does not decide rollouts."""
        ...

    @property
    def store(self) -> StateStore | None: ...

    @property
    def istio(self) -> IstioApplier | None: ...

    @property
    def directory(self) -> Directory | None:
        """Replicas on etcd: every replica's key in the store; None for one process."""
        ...

    @property
    def etcd(self) -> StoreMaintainer | None:
        """Replicas on etcd: its size, alarms and upkeep; None for one process."""
        ...

    def rollouts(self) -> Mapping[str, RolloutState]:
        """The current rollouts: the controller's, or what a follower read from the store."""
        ...

    def nodes(self, region: str | None = None) -> list[NodeStatus]:
        """Every node connected to this process (of `region`), then those of the other
        workers of `serve --workers`."""
        ...

    def workers(self) -> list[dict[str, Any]]:
        """`serve --workers` on SQLite: every worker's row; [] otherwise."""
        ...


def group_name(view: AdminView, service: str) -> str:
    """The rollout group `service` moves with; "" for none."""
    group = view.spec.group_of(service)
    return group.name if group is not None else ""


def waiting_reason(view: AdminView, service: str) -> str:
    """Why `service`'s canary has not started (a group member without a canary, an
    `after:` dependency not promoted yet), as the controller sees it now; "" when
    nothing waits, or in a process that does not decide (it is not stored)."""
    controller = view.controller
    return controller.waiting.get(service, "") if controller is not None else ""


def waiting_message(view: AdminView, service: str, why: str) -> admin_pb2.Rollout:
    """A service whose canary waits to start: no phase, no regions yet."""
    svc = view.spec.service(service)
    return admin_pb2.Rollout(
        service=service,
        canary_version=svc.canary_version or "",
        steps=list(svc.rollout.steps),
        group=group_name(view, service),
        waiting=why,
    )


def service_rollout(view: AdminView, service: str) -> admin_pb2.Rollout | None:
    """`service`'s current rollout, or its canary waiting to start; None for neither."""
    state = view.rollouts().get(service)
    if state is not None:
        return rollout_message(view, state)
    why = waiting_reason(view, service)
    return waiting_message(view, service, why) if why else None


def rollout_messages(view: AdminView) -> list[admin_pb2.Rollout]:
    """Every current rollout, then every service whose canary waits to start."""
    rollouts = view.rollouts()
    out = [rollout_message(view, s) for s in rollouts.values()]
    for svc in view.spec.services:
        why = waiting_reason(view, svc.name) if svc.name not in rollouts else ""
        if why:
            out.append(waiting_message(view, svc.name, why))
    return out


def group_answer(
    view: AdminView, states: Sequence[RolloutState], group: str = ""
) -> admin_pb2.Rollout:
    """The answer to an action on a rollout group: the first member's rollout, with
    every member's in `group_rollouts`. One state and no `group`: that rollout alone."""
    messages = [rollout_message(view, s) for s in states]
    if not group and len(messages) == 1:
        return messages[0]
    out = admin_pb2.Rollout()
    if messages:
        out.CopyFrom(messages[0])
    out.group = out.group or group
    out.group_rollouts.extend(messages)
    return out


def rollout_message(view: AdminView, state: RolloutState) -> admin_pb2.Rollout:
    svc = view.spec.service(state.service)
    store = view.store
    latest = store.latest_checks(state.service, state.canary_version) if store else {}
    out = admin_pb2.Rollout(
        service=state.service,
        canary_version=state.canary_version,
        phase=state.phase,
        reason=state.reason,
        steps=list(svc.rollout.steps),
        group=group_name(view, state.service),
        waiting=waiting_reason(view, state.service),
    )
    for region, rs in state.regions.items():
        split = region_split(svc.rollout, rs, svc.has_baseline).percent()
        check = latest.get(region)
        # "null": a check that measured nothing (as this field always said); "": no check
        measured = "" if check is None else measurements_json(check.measurements) or "null"
        out.regions.append(
            admin_pb2.RegionRollout(
                region=region,
                phase=rs.phase,
                step=rs.step,
                reason=rs.reason,
                production_percent=split["production"],
                baseline_percent=split["baseline"],
                canary_percent=split["canary"],
                manual=rs.manual_canary is not None,
                latest_measurements_json=measured,
                signals=signal_health(
                    view,
                    region,
                    check.verdict if check else None,
                    stragglers(view, state.service, region),
                ),
            )
        )
    return out


def stragglers(view: AdminView, service: str, region: str) -> tuple[str, ...]:
    """The nodes that missed the live step of `service` in `region` (issue 28), each
    'NODE (why)', as the controller's last look saw them; () elsewhere (a follower, a
    rollout over, a region not live)."""
    controller = view.controller
    state = controller.rollouts.get(service) if controller is not None else None
    if controller is None or state is None:
        return ()
    rs = state.regions.get(region)
    if rs is None or rs.phase not in LIVE:
        return ()
    return controller.observer.stragglers(service, region)


def stragglers_by_node(view: AdminView) -> dict[tuple[str, str], str]:
    """(region, node id) -> why it is a straggler of some live rollout (`stragglers`)."""
    controller = view.controller
    out: dict[tuple[str, str], str] = {}
    for service, state in (controller.rollouts if controller is not None else {}).items():
        for region in state.regions:
            for entry in stragglers(view, service, region):
                node, _, why = entry.partition(" (")
                out.setdefault((region, node), f"{service}: {why.removesuffix(')')}")
    return out


def signal_health(
    view: AdminView, region: str, verdict: Verdict | None, missed: Sequence[str] = ()
) -> admin_pb2.SignalHealth:
    """A region's signal health: its nodes on the current routes (the deciding process's
    data plane, which counts every replica's nodes), its stragglers (`missed`), and what
    the latest check read."""
    out = admin_pb2.SignalHealth(evidence_age_s=-1, srm_p_value=-1, trusted=True)
    out.stragglers.extend(missed)
    controller = view.controller
    if controller is not None:
        applied, unknown, lagging = controller.dataplane.routes_applied(region).counts
        out.nodes_known = True
        out.nodes_applied, out.nodes_unknown, out.nodes_lagging = applied, unknown, lagging
    if verdict is None or verdict.signals is None:
        return out
    s = verdict.signals
    out.read = True
    out.evidence_age_s = s.age_s if s.age_s is not None else -1
    out.scrape_interval_s = s.scrape_interval or 0.0
    out.targets, out.targets_up, out.resets, out.problem = (
        s.targets,
        s.targets_up,
        s.resets,
        s.problem,
    )
    out.srm_p_value = s.srm_p if s.srm_p is not None else -1
    out.srm_note = verdict.untrusted if verdict.untrusted.startswith("sample") else s.srm_skipped
    share = s.canary_share
    out.canary_routed_percent = share * 100 if share is not None else -1
    out.canary_configured_percent = s.configured.get("canary", 0.0) * 100
    out.trusted = not verdict.untrusted
    return out


def node_message(publisher: XdsPublisher, n: NodeStatus, straggler: str = "") -> admin_pb2.Node:
    """A node as the admin API shows it; `straggler`: why it missed a live rollout's
    step (`stragglers_by_node`), else ""."""
    snap = publisher.cache.get(n.region)
    current = {t: snap.type_version(t) if snap else "" for t in SEND_ORDER}
    types = []
    for t in SEND_ORDER:
        ts = n.types[t]
        types.append(
            admin_pb2.TypeStatus(
                type=short(t),
                current_version=current[t],
                sent_version=ts.sent_version,
                acked_version=ts.acked_version,
                nack_version=ts.nack_version,
                nack_error=ts.nack_error,
                sent_at=ts.sent_at or 0,
                acked_at=ts.acked_at or 0,
                nack_at=ts.nack_at or 0,
                sync_state=n.sync_state(t, current[t]),
            )
        )
    return admin_pb2.Node(
        id=n.node_id,
        region=n.region,
        connected_since=n.connected_since,
        listen=n.listen,
        user_agent=n.user_agent,
        types=types,
        sync_state=n.overall_sync(current),
        stream_id=n.stream_id,
        identity=n.identity,
        client_type=n.client_type,
        straggler=straggler,
    )


def store_message(view: AdminView) -> admin_pb2.StoreStatus:
    controller = view.controller
    if controller is None:
        return admin_pb2.StoreStatus(known=False, writable=True)
    h = controller.store_health
    return admin_pb2.StoreStatus(
        known=True,
        writable=h.ok,
        error=h.error,
        failing_since=h.since or 0.0,
        failed_writes=h.failed_writes,
        unsaved_rollbacks=h.unsaved_rollbacks,
    )


def audit_message(e: AuditEntry, with_canonical: bool = False) -> admin_pb2.AuditEntry:
    """The entry, its parts as the JSON the audit log keeps ("" for none); its chain
    link, and (`with_canonical`) the bytes its hash covers, for `xdsctl audit verify`."""
    return admin_pb2.AuditEntry(
        id=e.id,
        time=e.time,
        service=e.service,
        canary_version=e.canary_version,
        region=e.region or "",
        kind=e.kind,
        step=e.step if e.step is not None else -1,
        phase_from=e.phase_from or "",
        phase_to=e.phase_to or "",
        reason=e.reason,
        verdict_json=verdict_json(e.verdict) or "",
        measurements_json=measurements_json(e.measurements) or "",
        weights_before_json=weights_json(e.weights_before) or "",
        weights_after_json=weights_json(e.weights_after) or "",
        snapshot_version=e.snapshot_version or 0,
        actor=e.actor,
        group=e.group or "",
        prev_hash=e.chain.prev if e.chain else "",
        hash=e.chain.hash if e.chain else "",
        canonical=canonical(e).decode("ascii") if with_canonical else "",
    )


class WatchQueue:
    """A `TrafficSink` for one watcher (`xdsctl rollout watch`, a dashboard page) of one
    service's decisions, or of every service's (""): a slow watcher loses the oldest."""

    def __init__(self, service: str = "", size: int = 1000) -> None:
        self.service = service
        self.queue: asyncio.Queue[Committed] = asyncio.Queue(maxsize=size)

    def follow(self, event: Committed) -> None:
        state = event.state
        if state is None or (self.service and state.service != self.service):
            return
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(event)


def event_message(view: AdminView, event: Committed) -> admin_pb2.RolloutEvent:
    """A committed decision, as a watcher sees it."""
    assert event.state is not None and event.decision is not None
    return admin_pb2.RolloutEvent(
        time=event.time,
        actor=event.actor,
        rollout=rollout_message(view, event.state),
        transitions=[
            f"{t.region or 'all'}: {t.phase_from} -> {t.phase_to}: {t.reason}"
            for t in event.decision.transitions
        ],
    )


# ---- replicas ----

LOCAL_REPLICA = "local"
"""The id one process without a store gives itself in `ListReplicas`."""


def replica_documents(directory: Directory) -> dict[str, dict[str, Any]]:
    """Every replica's document in the store, this replica's as of now (its own key lags
    by up to the directory's publish interval, and is missing before its first write)."""
    docs = dict(directory.store.view.replicas)
    docs[directory.info.replica_id] = directory.document()
    return docs


def leader_id(directory: Directory) -> str | None:
    """The replica that leads: the leader key's holder; without one in view, the single
    document that says it leads. None while nobody (known) leads."""
    key = directory.store.view.leader
    if key is not None:
        return key.replica
    leading = [rid for rid, doc in replica_documents(directory).items() if doc.get("leader")]
    return leading[0] if len(leading) == 1 else None


def leader_hint(directory: Directory) -> str:
    """Where a change should go instead: "the leader is eu-west (admin 127.0.0.1:18001)"."""
    rid = leader_id(directory)
    if rid is None or (rid == directory.info.replica_id and not directory.leading):
        return "no replica leads right now (an election is under way): try again shortly"
    admin = str(replica_documents(directory).get(rid, {}).get("admin", "") or "")
    return f"the leader is {rid}" + (f" (admin {admin})" if admin else "")


def replicas_message(
    view: AdminView, started: float, admin_address: str, xds_address: str = ""
) -> admin_pb2.ListReplicasResponse:
    """Every replica, as this one sees the store; one process answers with itself alone
    (described by the arguments: the directory knows a replica's own)."""
    directory = view.directory
    if directory is None and (workers := view.workers()):
        pid = os.getpid()  # (the workers of `serve --workers` on SQLite)
        return admin_pb2.ListReplicasResponse(
            replicas=[
                replica_message(doc, leader=bool(doc.get("leader")), this=doc.get("pid") == pid)
                for doc in workers
            ]
        )
    if directory is None:
        port = view.publisher.port
        nodes = [{"region": n.region} for n in view.publisher.node_status()]
        doc = {
            "id": LOCAL_REPLICA,
            "xds": xds_address or (f":{port}" if port else ""),
            "admin": admin_address,
            "started": started,
            "updated": time.time(),
            "nodes": nodes,
        }
        local = replica_message(doc, leader=view.controller is not None, this=True)
        return admin_pb2.ListReplicasResponse(replicas=[local])
    leader = leader_id(directory)
    me = directory.info.replica_id
    return admin_pb2.ListReplicasResponse(
        replicas=[
            replica_message(doc, leader=rid == leader, this=rid == me, rid=rid)
            for rid, doc in sorted(replica_documents(directory).items())
        ],
        store=str(directory.store.address),
        etcd=etcd_message(view.etcd),
    )


def etcd_message(maintainer: StoreMaintainer | None) -> admin_pb2.EtcdStatus:
    """etcd as this replica last polled it, and the upkeep it made (when it led)."""
    status = maintainer.status if maintainer is not None else None
    if maintainer is None or status is None:
        return admin_pb2.EtcdStatus(known=False)
    options = maintainer.options
    compaction, defrag = maintainer.last_compaction, maintainer.last_defrag
    return admin_pb2.EtcdStatus(
        known=True,
        polled_at=status.at,
        members=[etcd_member(m) for m in status.members],
        alarms=[admin_pb2.EtcdAlarm(member_id=a.member_id, alarm=a.kind) for a in status.alarms],
        quota_bytes=options.quota_bytes,
        keys=status.keys,
        revision=status.revision,
        writes_held=maintainer.admit(critical=False) or "",
        retention_seconds=options.retention,
        compacted_revision=maintainer.revisions.compacted,
        last_compaction=compaction.describe() if compaction else "",
        last_defrag=defrag.describe() if defrag else "",
        last_recovery=maintainer.last_recovery,
        error=status.error,
    )


def etcd_member(m: MemberStatus) -> admin_pb2.EtcdMember:
    return admin_pb2.EtcdMember(
        endpoint=m.endpoint,
        member_id=m.member_id,
        db_size=m.db_size,
        db_size_in_use=m.in_use,
        raft_leader=m.raft_leader,
        error=m.error,
    )


def replica_message(
    doc: Mapping[str, Any], *, leader: bool, this: bool, rid: str = ""
) -> admin_pb2.Replica:
    """One replica's document (ha/replicas.py's `Directory.document`). Read leniently:
    a key written by hand or by another version lacks fields, it does not fail the call."""
    by_region: dict[str, int] = {}
    nodes = doc.get("nodes")
    for n in nodes if isinstance(nodes, list) else []:
        region = str(n.get("region", "")) if isinstance(n, dict) else ""
        by_region[region] = by_region.get(region, 0) + 1
    regions = doc.get("regions")
    return admin_pb2.Replica(
        id=str(doc.get("id") or rid),
        regions=[str(r) for r in regions] if isinstance(regions, list) else [],
        xds_address=str(doc.get("xds", "")),
        admin_address=str(doc.get("admin", "")),
        leader=leader,
        nodes=sum(by_region.values()),
        nodes_by_region=by_region,
        started=_number(doc.get("started")),
        updated=_number(doc.get("updated")),
        this=this,
    )


# ---- the shared registry ----

NO_REGISTRY = "no registry: this server runs without --store etcd://..."
"""What `ListInstances` answers (FAILED_PRECONDITION) on one process without a store."""
LEASE_UNKNOWN = -1.0
"""`Instance.lease_ttl_left` of a lease that is gone, or whose time etcd did not tell."""


def registry_instances(directory: Directory, service: str = "", region: str = "") -> list[Instance]:
    """The registered instances in this replica's view of the store, of `service` and in
    `region` ("": any), by service, region, version and address."""
    return sorted(
        (
            i
            for i in directory.store.view.registry.values()
            if (not service or i.service == service) and (not region or i.region == region)
        ),
        key=lambda i: (i.service, i.region, i.version, i.address),
    )


def instances_message(
    directory: Directory,
    instances: Sequence[Instance],
    ttl_left: Mapping[int, float],
    lease_error: str = "",
    now: float | None = None,
) -> admin_pb2.ListInstancesResponse:
    """`instances` with the seconds each one's lease has left (`ttl_left`, by lease id;
    a lease missing from it is unknown)."""
    now = time.time() if now is None else now
    return admin_pb2.ListInstancesResponse(
        instances=[
            admin_pb2.Instance(
                service=i.service,
                version=i.version,
                region=i.region,
                address=i.address,
                registered_at=i.registered_at,
                age_seconds=max(0.0, now - i.registered_at),
                lease_ttl_left=ttl_left.get(i.lease, LEASE_UNKNOWN),
                lease=i.lease,
                ttl=i.ttl,
            )
            for i in instances
        ],
        store=str(directory.store.address),
        lease_error=lease_error,
    )


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
