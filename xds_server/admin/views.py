"""What the admin API and the dashboard show: the running pieces of `serve` (an
`AdminView`) as the admin API's messages. One rendering for both doors: the dashboard's
JSON is these messages through protobuf's JSON mapping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, Protocol

from xds_server.admin.v1 import admin_pb2
from xds_server.outputs.istio_apply import IstioApplier
from xds_server.rollout.audit import AuditEntry
from xds_server.rollout.controller import RolloutController
from xds_server.rollout.ports import Committed, StateStore
from xds_server.rollout.state import RolloutState, region_split
from xds_server.spec import MeshSpec
from xds_server.xds.publisher import XdsPublisher
from xds_server.xds.status import NodeStatus
from xds_server.xds.types import SEND_ORDER, short


class AdminView(Protocol):
    """What the admin API reads and drives: the pieces `serve` wired (`app.Parts`)."""

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

    def rollouts(self) -> Mapping[str, RolloutState]:
        """The current rollouts: the controller's, or what a follower read from the store."""
        ...


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
    )
    for region, rs in state.regions.items():
        split = region_split(svc.rollout, rs, svc.has_baseline).percent()
        check = latest.get(region)
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
                latest_measurements_json=json.dumps(check.measurements) if check else "",
            )
        )
    return out


def node_message(publisher: XdsPublisher, n: NodeStatus) -> admin_pb2.Node:
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


def audit_message(e: AuditEntry) -> admin_pb2.AuditEntry:
    def js(v: Any) -> str:
        return json.dumps(v) if v is not None else ""

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
        verdict_json=js(e.verdict),
        measurements_json=js(e.measurements),
        weights_before_json=js(e.weights_before),
        weights_after_json=js(e.weights_after),
        snapshot_version=e.snapshot_version or 0,
        actor=e.actor,
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
